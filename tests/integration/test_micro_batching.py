"""A minibatch's gradient does not depend on how it is cut: micro-batch sizes, token budgets,
packing, ranks, activation checkpointing. Two real DeepSpeed ZeRO ranks (gloo, one process
each) accumulate the PPO actor loss of one minibatch of very different response lengths (1 to
40 tokens) under every cut; the full gradient (``deepspeed.utils.safe_get_full_grad``) must
equal the gradient of the same loss over the whole minibatch in one plain torch forward pass,
on one process.

Each rank holds 8 of the 16 rows. The token budgets cut the two ranks' shards into different
numbers of micro-batches, so the ranks with fewer run fillers (``_micro_batches``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import socket

import pytest
import torch

from rlhf_dist.config import AlgoConfig, ModelConfig, TrainerConfig
from rlhf_dist.config.plan import RunPlan
from rlhf_dist.core.experience import collate
from rlhf_dist.core.losses import actor_loss
from rlhf_dist.models.modeling import load_causal_lm, response_logprobs
from rlhf_dist.models.tiny import build_random_lm

pytestmark = pytest.mark.slow

ROWS, WORLD = 16, 2
# (micro_batch_size, max_tokens_per_micro_batch, packing)
CUTS = [(1, 0, False), (2, 0, False), (8, 0, False), (8, 0, True), (2, 0, True), (8, 40, True), (8, 64, False)]
AGGS = ["token_mean", "seq_mean_token_mean"]
TEMPERATURE = 0.7


def _minibatch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    # Rank 0's shard (rows 0-7) has the long responses, so a token budget needs more micro-batches there.
    lengths = [40, 1, 33, 1, 25, 2, 17, 9, 1, 3, 1, 6, 2, 1, 4, 1]
    prompts = [torch.randint(3, vocab, (2 + i % 5,), generator=gen).tolist() for i in range(ROWS)]
    responses = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    exp = collate(prompts, responses, pad_id=0)
    mask = exp.response_mask
    return exp.with_fields(
        old_logprobs=(-3.0 + 0.3 * torch.randn(mask.shape, generator=gen)) * mask,
        advantages=torch.randn(ROWS, 1, generator=gen).expand_as(mask) * mask,
    )


def _rank_main(rank: int, port: int, model_path: str, exp, out_path: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    from rlhf_dist.roles.spec import RankSpec
    from rlhf_dist.roles.trainer import PolicyTrainer

    torch.set_num_threads(1)
    shard = exp.split(WORLD)[rank]
    results = {}
    for stage in (2, 3):
        spec = RankSpec(rank=rank, world_size=WORLD, device="cpu", seed=0, timeout_s=60.0, model_path=model_path)
        cfg = TrainerConfig(world_size=WORLD, zero_stage=stage, micro_batch_size=1, lr=1e-30, grad_clip=0.0)
        plan = RunPlan(per_rank_minibatch=ROWS // WORLD, grad_accum_steps=ROWS // WORLD, optimizer_steps=100,
                       rollout_batch=ROWS, minibatches_per_epoch=1)
        trainer = PolicyTrainer(spec=spec, cfg=cfg, model_cfg=ModelConfig(), plan=plan, temperature=TEMPERATURE,
                                max_new_tokens=40)
        trainer.setup("127.0.0.1", port + stage)
        trainer.engine.train()
        for agg in AGGS:
            loss_fn = trainer._actor_loss(AlgoConfig(loss_agg=agg, kl_coef=0.0), 0.0)
            for micro, budget, packing in CUTS:
                trainer.cfg = dataclasses.replace(cfg, micro_batch_size=micro, max_tokens_per_micro_batch=budget,
                                                  packing=packing)
                stats = trainer.accumulate(shard, loss_fn)
                grads = {n: safe_get_full_grad(p).clone() for n, p in trainer.engine.module.named_parameters()}
                results[(stage, agg, micro, budget, packing, False)] = (grads, stats["policy_loss"])
                trainer.engine.step()  # lr ~0: clears the accumulated gradient, leaves the weights
        # Then with the activations recomputed in the backward pass (trainer.gradient_checkpointing).
        trainer.engine.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.cfg = dataclasses.replace(cfg, micro_batch_size=2, packing=True)
        for agg in AGGS:
            stats = trainer.accumulate(shard, trainer._actor_loss(AlgoConfig(loss_agg=agg, kl_coef=0.0), 0.0))
            grads = {n: safe_get_full_grad(p).clone() for n, p in trainer.engine.module.named_parameters()}
            results[(stage, agg, 2, 0, True, True)] = (grads, stats["policy_loss"])
            trainer.engine.step()
    torch.save(results, f"{out_path}.{rank}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tiny_policy, tmp_path_factory) -> str:
    return str(build_random_lm(tmp_path_factory.mktemp("mb") / "llama-tied", "llama-tied", tiny_policy))


def _expected(model_path: str, exp, agg: str, per_micro: int | None = None) -> tuple[dict, float]:
    """The gradient of the loss over the whole minibatch in one padded forward pass; with
    ``per_micro``, of the old normalisation instead: a mean per micro-batch of that many rows."""
    model = load_causal_lm(model_path, "float32")
    chunks = [exp] if per_micro is None else exp.split(len(exp) // per_micro)
    total_loss = 0.0
    for part in chunks:
        logprobs, entropy = response_logprobs(model, part, TEMPERATURE, with_entropy=True)
        loss, _ = actor_loss(
            logprobs, part.old_logprobs, None, part.advantages, entropy, part.response_mask, 0.2,
            clip_eps_high=None, dual_clip=None, agg=agg, max_len=40, rollout_weights=None,
            entropy_coef=0.0, kl_coef=None, kl_estimator="k3",
        )
        (loss / len(chunks)).backward()
        total_loss += loss.item() / len(chunks)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, total_loss


def test_the_gradient_of_a_minibatch_is_the_same_however_it_is_cut(model_path, tmp_path):
    vocab = load_causal_lm(model_path, "float32").config.vocab_size
    exp = _minibatch(vocab)
    port, out = _free_port(), tmp_path / "grads.pt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, port, model_path, exp, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0, f"a DeepSpeed rank failed (exit {p.exitcode})"
    per_rank = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    results = {key: (grads, sum(r[key][1] for r in per_rank) / WORLD)  # the group's stat: mean over ranks
               for key, (grads, _) in per_rank[0].items()}

    for agg in AGGS:
        expected, expected_loss = _expected(model_path, exp, agg)
        # The batch discriminates: normalising per micro-batch of one row (the old way) moves the
        # gradient by far more than the tolerance below.
        old, _ = _expected(model_path, exp, agg, per_micro=1)
        if agg == "token_mean":
            assert max((old[n] - g).abs().max().item() for n, g in expected.items()) > 1e-3
        for (stage, got_agg, micro, budget, packing, ckpt), (grads, loss) in results.items():
            if got_agg != agg:
                continue
            cut = f"zero{stage} {agg} micro={micro} budget={budget} packing={packing} checkpointing={ckpt}"
            assert loss == pytest.approx(expected_loss, abs=1e-6), cut
            for name, g in expected.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{cut} {name}: {m}")
