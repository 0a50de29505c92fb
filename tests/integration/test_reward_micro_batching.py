"""A reward-model minibatch of rankings gives the same gradient, loss and accuracy however it is
cut: micro-batch sizes, token budgets, packing, ZeRO stage. Two real DeepSpeed ranks (gloo, one
process each) accumulate the ranking loss of one minibatch of 8 prompts, each with 2 to 5
responses of 1 to 30 tokens (ties, empty slots), under every cut; the full gradient must equal
that of ``ranking_loss`` over the whole minibatch in one plain torch forward pass, and the
accuracy the exact share of its comparisons ordered right (a mean of per-micro-batch shares
weighted by prompts would not be: prompts give 1 to 10 comparisons). As
``test_micro_batching.py`` does for the policy.
"""

from __future__ import annotations

import dataclasses
import multiprocessing

import pytest
import torch

from rlhf_dist.config import ModelConfig, TrainerConfig, TrainerPlan
from rlhf_dist.core.experience import collate_rankings
from rlhf_dist.core.losses import ranking_loss
from rlhf_dist.models.modeling import load_reward_model, ranking_scores
from tests.integration.test_micro_batching import _free_port

pytestmark = pytest.mark.slow

PROMPTS, WORLD = 8, 2
# (micro_batch_size, max_tokens_per_micro_batch, packing)
CUTS = [(1, 0, False), (2, 0, True), (4, 0, False), (4, 0, True), (4, 60, True), (4, 90, False)]
RANKS = [[0, 1, 2, 3, 4], [1, 0], [0, 1, 1, 2], [2, 2, 0], [0, 1], [0, 0, 1, 1, 2], [3, 1, 2, 0], [1, 0, 0]]


def _minibatch(vocab: int, pad: int):
    gen = torch.Generator().manual_seed(0)
    responses = [[[t for t in torch.randint(3, vocab, (int(torch.randint(1, 31, (1,), generator=gen)),),
                                            generator=gen).tolist() if t != pad] or [3] for _ in ranks]
                 for ranks in RANKS]
    return collate_rankings(responses, RANKS, pad)


def _rank_main(rank: int, port: int, model_path: str, batch, out_path: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    from rlhf_dist.roles.spec import RankSpec
    from rlhf_dist.roles.trainer import RewardModelTrainer

    torch.set_num_threads(1)
    shard = batch.split(WORLD)[rank]
    results = {}
    for stage in (2, 3):
        spec = RankSpec(rank=rank, world_size=WORLD, device="cpu", seed=0, timeout_s=60.0, model_path=model_path)
        cfg = TrainerConfig(world_size=WORLD, zero_stage=stage, micro_batch_size=1, lr=1e-30, grad_clip=0.0)
        plan = TrainerPlan(per_rank_minibatch=PROMPTS // WORLD, grad_accum_steps=PROMPTS // WORLD, optimizer_steps=100)
        trainer = RewardModelTrainer(spec=spec, cfg=cfg, model_cfg=ModelConfig(), plan=plan, lr=1e-30)
        trainer.setup("127.0.0.1", port + stage)
        trainer.engine.train()
        for micro, budget, packing in CUTS:
            trainer.cfg = dataclasses.replace(cfg, micro_batch_size=micro, max_tokens_per_micro_batch=budget,
                                              packing=packing)
            stats = trainer.accumulate(shard, trainer._ranking_loss)
            grads = {n: safe_get_full_grad(p).clone() for n, p in trainer.engine.module.named_parameters()}
            results[(stage, micro, budget, packing)] = (grads, stats["loss"], stats["accuracy"])
            trainer.engine.step()  # lr ~0: clears the accumulated gradient, leaves the weights
    torch.save(results, f"{out_path}.{rank}")


def test_a_minibatch_of_rankings_is_the_same_however_it_is_cut(tiny_reward_model, tmp_path):
    model = load_reward_model(tiny_reward_model, "float32")
    pad = model.config.pad_token_id
    batch = _minibatch(model.config.vocab_size, pad)
    scores = ranking_scores(model, batch, pad)
    expected_loss, expected_stats = ranking_loss(scores, batch.ranks)
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert batch.comparisons() == 10 + 1 + 5 + 2 + 1 + 8 + 6 + 2

    port, out = _free_port(), tmp_path / "grads.pt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, port, tiny_reward_model, batch, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0, f"a DeepSpeed rank failed (exit {p.exitcode})"
    per_rank = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for key, (grads, _, _) in per_rank[0].items():
        cut = "zero{} micro={} budget={} packing={}".format(*key)
        # the group's stats: the mean over ranks of each rank's parts (times world size)
        loss = sum(r[key][1] for r in per_rank) / WORLD
        accuracy = sum(r[key][2] for r in per_rank) / WORLD
        assert loss == pytest.approx(expected_loss.item(), abs=1e-6), cut
        assert accuracy == pytest.approx(expected_stats["accuracy"], abs=1e-9), cut
        for name, g in expected.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, cut=cut, name=name: f"{cut} {name}: {m}")
