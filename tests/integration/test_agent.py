"""Multi-turn rollouts through the real stack: vLLM engine, environment calls, DeepSpeed policy.

One start of the roles (task=calculator, a tool that hangs on a quarter of the problems) serves
every check: a hanging call times out without holding up the other trajectories; the tokens the
trainer sees are exactly the ones sampled (its logprobs match the engine's at every model token,
and the observations are their own tokenisation); observation tokens carry no loss gradient; and
two overlapped, off-policy-corrected steps train and leave the engines serving the trainer's weights.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from rlhf_dist.cluster.start import shutdown_ray, start_roles
from rlhf_dist.config import validate_config
from rlhf_dist.controller import run_rl
from rlhf_dist.core.advantages import grpo_advantages
from rlhf_dist.core.experience import collate
from rlhf_dist.core.losses import policy_loss
from rlhf_dist.core.stats import broadcast_to_tokens
from rlhf_dist.driver.data import load_prompts
from rlhf_dist.driver.run_logger import RunLogger
from rlhf_dist.models.modeling import resolve_model_path
from rlhf_dist.roles.agent_loop import ENV_MARK, env_rows
from tests.conftest import compose_config
from tests.integration.agent_envs import hangs

pytestmark = pytest.mark.slow

ENV_STEP_S = 3.0
SAMPLES = 32


def _segments(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of an action mask."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def test_multi_turn_rollouts_train_on_the_sampled_tokens_and_survive_a_hanging_tool(tmp_path):
    from transformers import AutoTokenizer

    cfg = compose_config([
        "task=calculator", "rollout.env._target_=tests.integration.agent_envs.HangingCalculator",
        f"timeouts.env_step_s={ENV_STEP_S}", "total_steps=2", "rollout.batch_size=8", "algo.minibatch_size=16",
        "trainer.micro_batch_size=4", "rollout.max_staleness=1", "algo.rollout_correction=tis",
        "eval.every_steps=0", "logger.progress_bar=false", "logger.samples_every_steps=1", "checkpoint.every_steps=0",
    ])
    plan = validate_config(cfg)
    policy = resolve_model_path(cfg.model.path, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    prompts = load_prompts(cfg.data.prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed)
    roles = start_roles(cfg, plan, policy, policy)
    try:
        ids, texts, metadata = prompts.token_ids[:SAMPLES], prompts.texts[:SAMPLES], prompts.metadata[:SAMPLES]
        rows = env_rows(texts, metadata)
        started = time.monotonic()
        gens = roles.generate(ids, list(range(SAMPLES)), rows=rows)
        generate_s = time.monotonic() - started
        exp = collate(ids, [g.response_ids for g in gens], pad_id=0, action_masks=[g.action_mask for g in gens])
        trainer_logprobs, _ = roles.policy.logprobs_async(exp).result()

        logger = RunLogger(cfg.logger, tmp_path, {}, cfg.total_steps, "")
        run_rl(cfg, roles, prompts, None, logger)
        summary = logger.finish("completed")
        probe = [ids[0] + gens[0].response_ids, ids[1] + gens[1].response_ids]
        engine_after = roles.generation.sequence_logprobs_async(probe).result()[0]
        probe_exp = collate([p[:1] for p in probe], [p[1:] for p in probe], pad_id=0)
        trainer_after, _ = roles.policy.logprobs_async(probe_exp).result()
    finally:
        roles.kill()
        shutdown_ray()

    # A hanging tool ends its own trajectory at the timeout; the others finish.
    hung = [i for i in range(SAMPLES) if hangs(texts[i])]
    assert hung and len(hung) < SAMPLES
    assert [i for i, g in enumerate(gens) if g.env["error"] == "timeout"] == hung
    assert all(not gens[i].env["error"] and gens[i].env["turns"] >= 1 for i in range(SAMPLES) if i not in hung)
    assert generate_s < 60, f"generation took {generate_s:.0f}s: a hanging call held up the batch"

    # Token-in/token-out: the trainer's input is prompt + response exactly as sampled, its logprobs
    # equal the engine's at every model token, and each observation is its own tokenisation.
    called = 0
    for i, g in enumerate(gens):
        row = exp.input_ids[i, exp.prompt_width - len(ids[i]): exp.prompt_width + len(g.response_ids)]
        assert row.tolist() == ids[i] + g.response_ids
        model = torch.tensor(g.action_mask, dtype=torch.bool)
        gap = (trainer_logprobs[i, : len(g.response_ids)][model] - torch.tensor(g.response_logprobs)[model]).abs()
        assert gap.max() < 1e-3, f"sample {i}: trainer and engine logprobs differ by {gap.max():.2e}"
        for value, start, end in _segments(g.action_mask):
            if value == 0:
                called += 1
                text = tokenizer.decode(g.response_ids[start:end])
                assert g.response_ids[start:end] == tokenizer(text, add_special_tokens=False)["input_ids"]
                assert text.startswith("<result>") and text.endswith("</result>")
        assert torch.equal(exp.response_mask[i, : len(g.response_ids)], model.float())
    assert called > 0, "no sample called the tool: nothing here tests observation tokens"
    assert sum(g.env["turns"] > 1 for g in gens) == sum(0 in g.action_mask for g in gens)

    # Observation tokens carry no gradient: the policy loss on this batch, by position.
    logprobs = trainer_logprobs.detach().clone().requires_grad_(True)
    scores = torch.tensor([float(g.env["return"]) if not g.env["error"] else 0.0 for g in gens])
    advantages = broadcast_to_tokens(grpo_advantages(scores, 4), exp.response_mask)
    loss, _ = policy_loss(logprobs, trainer_logprobs + 0.1, advantages, exp.response_mask, clip_eps=0.2)
    loss.backward()
    assert logprobs.grad[exp.response_mask == 0].abs().max() == 0

    # Two overlapped steps (staleness 1, TIS) trained; the engines serve the trainer's policy after.
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and summary["status"] == "completed"
    for m in metrics:
        assert m["env/turns_mean"] >= 1 and m["env/timeouts"] >= 1 and m["env/errors"] == 0
        assert m["reward/dropped"] == m["env/timeouts"]  # reward.on_invalid=drop
        assert "rollout_corr/ratio_mean" in m and m["time/env"] > 0
    assert metrics[1]["rollout/staleness_max"] == 1
    samples = [json.loads(line) for line in (tmp_path / "rollout_samples.jsonl").read_text().splitlines()]
    assert any(ENV_MARK in s["response"] for s in samples)
    for i, seq in enumerate(engine_after):
        torch.testing.assert_close(torch.tensor(seq), trainer_after[i, : len(seq)].float(), atol=1e-4, rtol=0)
