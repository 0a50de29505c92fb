"""Every critic-free estimator and recipe (DAPO, GSPO) through the real stack on the verifiable
arithmetic task: one set of actors (no critic is created), one RL step per estimator and loss
option, a held-out greedy evaluation, then the engines still serve the trainer's weights."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_dist.cluster.start import shutdown_ray, start_roles
from rlhf_dist.config import validate_config
from rlhf_dist.controller import make_kl_controller, rl_step
from rlhf_dist.core.advantages import informative_groups
from rlhf_dist.core.experience import collate
from rlhf_dist.driver.data import load_prompts
from rlhf_dist.driver.timeline import Timeline
from rlhf_dist.evaluation import evaluate
from rlhf_dist.models.modeling import resolve_model_path
from rlhf_dist.rollout.queue import RolloutQueue
from tests.conftest import compose_config

pytestmark = pytest.mark.slow

COMMON = [
    "task=arithmetic", "rollout.n=4", "rollout.batch_size=8", "algo.minibatch_size=16",
    "trainer.micro_batch_size=4", "eval.num_prompts=32", "logger.progress_bar=false",
    # the passes streamed while the engines generate (off in local_cpu): the reference's 4 samples at a time
    "rollout.stream_passes=true", "reference.batch_size=4",
]
CASES = {
    "grpo": ["algo=grpo"],
    "dr_grpo": ["algo=dr_grpo", "rollout.stream_passes=false"],  # the passes after the rollout
    "rloo": ["algo=rloo"],
    "reinforce_pp": ["algo=reinforce_pp"],
    # the loss options on top of GRPO: clip-higher, dual clip, entropy bonus, adaptive k2 KL in the reward
    "grpo_options": ["algo=grpo", "algo.clip_eps_high=0.28", "algo.dual_clip=3.0", "algo.entropy_coef=0.01",
                     "algo.kl_in=reward", "algo.kl_estimator=k2", "algo.kl_controller=adaptive",
                     "algo.loss_agg=seq_mean_token_mean", "algo.mask_truncated=true"],
    # one optimizer step per step (4 prompts x 4: one minibatch of 16, the trainers' size): pi_old from
    # the update's own forward
    "grpo_one_pass": ["algo=grpo", "rollout.batch_size=4"],
    # DAPO: dynamic sampling refills the groups whose 4 rewards are equal; overlong shaping (buffer 1 of 4)
    "dapo": ["algo=dapo"],
    # GSPO: sequence-level ratios, composed with the off-policy correction's weights
    "gspo": ["algo=gspo", "algo.rollout_correction=tis"],
}


def test_critic_free_estimators_one_step_each():
    from transformers import AutoTokenizer

    configs = {name: compose_config(COMMON + extra) for name, extra in CASES.items()}
    first = configs["grpo"]
    policy_path = resolve_model_path(first.model.path, first.cache_dir)
    roles = start_roles(first, validate_config(first), policy_path, policy_path)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    data = first.data
    prompts = load_prompts(data.prompts, data, tokenizer, first.model.max_prompt_len, first.seed)
    held_out = load_prompts(data.eval_prompts, data, tokenizer, first.model.max_prompt_len, first.seed, split="test")
    assert not set(prompts.texts) & set(held_out.texts)
    probe = [tokenizer(t)["input_ids"] for t in ("12 + 7 = 19", "40 - 3 = 37")]
    results, batches = {}, {}
    try:
        assert roles.critic is None
        for step, (name, cfg) in enumerate(configs.items()):
            validate_config(cfg)
            batch = RolloutQueue(cfg, roles, prompts, Timeline(enabled=False)).take(step)  # syncs the last step's update
            batches[name] = batch
            results[name], _ = rl_step(step, cfg, roles, batch, make_kl_controller(cfg.algo), Timeline(enabled=False))
        streamed = batches["grpo"]
        whole = collate(streamed.prompt_ids, [g.response_ids for g in streamed.generations], pad_id=0)
        whole_pass = roles.reference.logprobs_async(whole).result()
        RolloutQueue(first, roles, prompts, Timeline(enabled=False)).sync_engines(len(configs))
        evaluation, _ = evaluate(first, roles, held_out)
        engine_lp = roles.generation.sequence_logprobs_async(probe).result()[0]
        trainer_lp, _ = roles.policy.logprobs_async(
            collate([p[:1] for p in probe], [p[1:] for p in probe], pad_id=tokenizer.pad_token_id)
        ).result()
    finally:
        roles.kill()
        shutdown_ray()

    for name, metrics in results.items():
        assert all(math.isfinite(v) for v in metrics.values()), (name, metrics)
        assert "loss/value" not in metrics  # no critic
        assert metrics["reward/dropped"] == 0
        assert metrics["ppo/clipfrac"] >= 0
    assert "loss/kl" in results["grpo"] and "loss/kl" not in results["rloo"]
    # exact-match rewards are 0 or 1, so the held-out mean is an accuracy over 32 prompts
    assert evaluation["eval/num_prompts"] == 32
    assert evaluation["eval/reward_mean"] * 32 == round(evaluation["eval/reward_mean"] * 32)
    # the adaptive controller starts from algo.kl_coef
    assert results["grpo_options"]["kl/coef"] == configs["grpo_options"].algo.kl_coef
    # truncated responses (4 tokens, no EOS) are masked out of the policy gradient, and counted
    options = results["grpo_options"]
    truncated = sum(g.truncated for g in batches["grpo_options"].generations)
    assert options["rollout/masked_truncated"] == truncated
    assert options["response_length/truncated_frac"] == truncated / 32
    # DAPO: the step holds 8 groups of 4, informative ones unless the rounds ran out (then filled)
    dapo, batch = results["dapo"], batches["dapo"]
    assert len(batch.generations) == 32 and 1 <= dapo["rollout/sampling_rounds"] <= 3
    # the filter counted the task's scores (exact match), not the overlong-shaped ones: the first
    # 8 - filled groups are informative on those, so none of them is all-correct (or all-wrong)
    # answers of different lengths, which the shaping alone would have made unequal
    task = torch.tensor([s + (len(g.response_ids) == 4) for g, s in zip(batch.generations, batch.scores)])
    useful = informative_groups(task, 4)
    informative = useful.sum().item()
    assert informative == 8 - dapo["rollout/filled_groups"] and useful[:informative].all()
    assert dapo["rollout/prompts_sampled"] >= dapo["rollout/filtered_groups"] + informative
    assert dapo["rollout/filtered_groups"] > 0 and dapo["rollout/sampling_rounds"] >= 2  # this seed refills
    # overlong shaping: a 4-token response (the budget) scores its exact match (0 or 1) minus 1
    for g, score in zip(batch.generations, batch.scores):
        assert score in ((-1.0, 0.0) if len(g.response_ids) == 4 else (0.0, 1.0))
    assert dapo["reward/overlong_frac"] == sum(len(g.response_ids) == 4 for g in batch.generations) / 32
    assert "rollout_corr/truncated_frac" in results["gspo"]
    # no separate old-logprob pass, the ratio is exactly 1, and the old logprobs the update returned
    # are the engines' (each row in its place: the step was on-policy)
    one_pass = results["grpo_one_pass"]
    assert "time/values" not in one_pass and "time/values" in results["grpo"]
    assert one_pass["ppo/approx_kl"] == 0.0 and one_pass["ppo/clipfrac"] == 0.0
    assert one_pass["logprob_gap/mean"] < 1e-5 and one_pass["kl/mean"] >= 0.0
    for name in ("dapo", "gspo"):  # no KL penalty, reference.monitor=false: no reference call, no KL
        assert not {"kl/mean", "kl/token_mean", "loss/kl"} & set(results[name]), name
    assert "kl/mean" in results["dr_grpo"]  # kl_coef 0 too, but its KL is monitored (the default)
    # the reference logprobs passed on micro-batches while the rollout streamed are the whole batch's
    width = whole.response_mask.shape[1]
    assert set(streamed.streamed_fields(width)) == {"ref_logprobs", "old_logprobs", "entropy"}
    assert batches["dr_grpo"].streamed_fields(width) == {}
    torch.testing.assert_close(streamed.streamed_fields(width)["ref_logprobs"] * whole.response_mask,
                               whole_pass * whole.response_mask, atol=1e-5, rtol=0)
    assert {"time/reference", "time/values"} <= set(results["grpo"]) & set(results["dr_grpo"])
    for i, seq in enumerate(engine_lp):
        torch.testing.assert_close(torch.tensor(seq), trainer_lp[i, : len(seq)].float(), atol=1e-4, rtol=0)
