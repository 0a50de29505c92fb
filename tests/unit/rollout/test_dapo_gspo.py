"""DAPO and GSPO, by hand: the GSPO loss and gradient (algorithms.policy_loss, ratio_level=sequence),
the overlong penalty at its buffer's edges, the group filter of dynamic sampling and its refill
rounds (rollout.queue.GroupFilter, refill_prompts) on the task's scores before the overlong
shaping (rollout.scoring), and the presets' config. Each expected number is
worked out in a comment."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist import config
from rlhf_dist.config import ConfigError, needs_reference, validate_config
from rlhf_dist.core.advantages import informative_groups, overlong_penalty
from rlhf_dist.core.losses import RATIO_LEVELS, policy_loss
from rlhf_dist.core.stats import masked_mean
from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout import scoring
from rlhf_dist.rollout.queue import Draw, GroupFilter, RolloutBatch, refill_prompts
from tests.conftest import compose_config

TOL = {"atol": 1e-6, "rtol": 0.0}
F64 = torch.float64


def t64(data):
    return torch.tensor(data, dtype=F64)


def test_config_names_the_same_ratio_levels():
    assert config.RATIO_LEVELS == RATIO_LEVELS


# Row 0: two tokens with log ratios 0.2 and -0.1, A = +1. Row 1: one token (t=1 is padding) with
# log ratio 0.3, A = +1. clip_eps 0.2.
OLD = t64([[-1.0, -2.0], [-0.5, -4.0]])
NEW = t64([[-0.8, -2.1], [-0.2, -9.0]])  # padding's logprob is far off: it must not count
MASK = t64([[1.0, 1.0], [1.0, 0.0]])
ADV = t64([[1.0, 1.0], [1.0, 0.0]])


def test_gspo_loss_and_gradient_by_hand():
    logprobs = NEW.clone().requires_grad_(True)
    loss, stats = policy_loss(logprobs, OLD, ADV, MASK, 0.2, agg="seq_mean_token_mean", ratio_level="sequence")
    # s_0 = exp((0.2 - 0.1) / 2) = exp(0.05) = 1.0512711 inside [0.8, 1.2]: row 0's terms are -s_0.
    # s_1 = exp(0.3) = 1.3498588 > 1.2: clipped, -A * 1.2 = -1.2 is the larger, no gradient.
    # loss = mean over rows of each row's token mean = (-1.0512711 - 1.2) / 2 = -1.1256355
    s0 = math.exp(0.05)
    assert_close(loss, t64(-(s0 + 1.2) / 2), **TOL)
    loss.backward()
    # d/dlogp_{0,t} of 1/2 * 1/2 * sum_t -A * sg[s_0] * exp(logp_t - sg[logp_t]) = -s_0 / 4 on both
    # tokens (the same as d/dlogp_{0,t} of -s_0 / 2, s_0 = exp(mean_t(logp - old)): GSPO's gradient)
    assert_close(logprobs.grad, t64([[-s0 / 4, -s0 / 4], [0.0, 0.0]]), **TOL)
    # clipfrac: 1 of the 3 valid tokens (row 1's) is clipped; approx_kl stays per token:
    # 0.5 * (0.04 + 0.01 + 0.09) / 3 = 0.0233333
    assert stats["clipfrac"] == pytest.approx(1 / 3, abs=1e-9)
    assert stats["approx_kl"] == pytest.approx(0.5 * 0.14 / 3, abs=1e-9)


def test_gspo_token_form_equals_the_sequence_objective():
    # GSPO's own objective: 1/B sum_i max(-A_i s_i, -A_i clip(s_i)) with s_i = exp(mean_t(logp - old)):
    # the token form must give the same value and the same gradient, rows of different lengths.
    torch.manual_seed(0)
    old = torch.randn(3, 4, dtype=F64)
    new0 = old + 0.3 * torch.randn(3, 4, dtype=F64)
    mask = t64([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = t64([1.5, -0.5, 2.0]).unsqueeze(1) * mask
    new = new0.clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, adv, mask, 0.1, clip_eps_high=0.15, agg="seq_mean_token_mean",
                              ratio_level="sequence")
    loss.backward()
    ref = new0.clone().requires_grad_(True)
    s = torch.exp(masked_mean(ref - old, mask, dim=1))
    a = adv[:, 0]
    expected = torch.maximum(-a * s, -a * torch.clamp(s, 0.9, 1.15)).mean()
    expected.backward()
    assert_close(loss, expected, **TOL)
    assert_close(new.grad, ref.grad * mask, **TOL)


def test_gspo_composes_with_the_rollout_weights():
    # weights [0.5, 1] on row 0 and 2 on row 1 scale each token's term:
    # row 0: (-0.5 s_0 - s_0) / 2 = -0.75 s_0; row 1: -1.2 * 2 = -2.4; loss = (-0.75 s_0 - 2.4) / 2
    weights = t64([[0.5, 1.0], [2.0, 0.0]])
    loss, _ = policy_loss(NEW, OLD, ADV, MASK, 0.2, agg="seq_mean_token_mean", ratio_level="sequence",
                              rollout_weights=weights)
    assert_close(loss, t64((-0.75 * math.exp(0.05) - 2.4) / 2), **TOL)


def test_token_level_ratio_differs_where_the_tokens_do():
    # token level on the same rows: row 0's terms are -e^0.2 = -1.2214 -> clipped to -1.2 (the larger)
    # and -e^-0.1 = -0.904837; row 1: -1.2 (clipped). loss = ((-1.2 - 0.904837) / 2 - 1.2) / 2
    loss, stats = policy_loss(NEW, OLD, ADV, MASK, 0.2, agg="seq_mean_token_mean")
    assert_close(loss, t64(((-1.2 - math.exp(-0.1)) / 2 - 1.2) / 2), **TOL)
    assert stats["clipfrac"] == pytest.approx(2 / 3, abs=1e-9)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(NEW, OLD, ADV, MASK, 0.2, ratio_level="sentence")


def test_overlong_penalty_at_the_buffer_edges():
    # L = 10, C = 4: 0 up to 6 tokens, then (6 - l) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1; beyond L: -1
    lengths = torch.tensor([0, 6, 7, 8, 10, 12])
    assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]), **TOL)
    assert_close(overlong_penalty(lengths, 10, 4, factor=0.5),
                 torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]), **TOL)
    assert not overlong_penalty(lengths, 10, 0).any()  # buffer 0 is off
    # C = L: the penalty falls over the whole budget, -l / L
    assert_close(overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), torch.tensor([0.0, -0.5, -1.0]), **TOL)
    with pytest.raises(ValueError, match="buffer=11"):
        overlong_penalty(lengths, 10, 11)


def test_informative_groups():
    nan = math.nan
    scores = t64([1, 1, 1, 1,  0, 1, 0, 0,  nan, 1, nan, nan,  nan, 0, 1, nan,  0.5, 0.5, nan, 0.5])
    # all equal; one differs; one valid score (no baseline); two valid and unequal; valid ones equal
    assert informative_groups(scores, 4).tolist() == [False, True, False, True, False]


def draw(prompts: list[int], n: int) -> Draw:
    rows = [p for p in prompts for _ in range(n)]
    return Draw(prompts, [[p] for p in rows], [f"p{p}" for p in rows], [{} for _ in rows], list(range(len(rows))))


def gens(count: int, tag: int) -> list[Generation]:
    return [Generation([0], [tag, i], [0.0, 0.0], f"r{tag}.{i}") for i in range(count)]


def test_group_filter_refills_until_enough_informative_groups():
    groups = GroupFilter(want=2, n=2, max_rounds=3)
    groups.add(draw([10, 11, 12], 2), gens(6, 0), [1, 1, 0, 1, 0, 0], [])  # only prompt 11 is informative
    # 1 informative of 3: ceil(1 missing / (1/3)) = 3 prompts, at most want = 2
    assert groups.next_count() == 2
    groups.add(draw([13, 14], 2), gens(4, 1), [1, 0, 1, 1], [])  # prompt 13 is
    assert groups.next_count() == 0
    (prompt_ids, texts, _, generations, scores, refs), stats = groups.result()
    assert refs == [{}] * 4  # no pass streamed
    assert texts == ["p11", "p11", "p13", "p13"] and scores == [0, 1, 1, 0]
    assert [g.response_ids[0] for g in generations] == [0, 0, 1, 1]  # round 0's, then round 1's
    assert stats == {"rollout/sampling_rounds": 2.0, "rollout/prompts_sampled": 5.0,
                     "rollout/filtered_groups": 3.0, "rollout/filled_groups": 0.0}


def test_group_filter_fills_the_step_when_the_rounds_run_out():
    groups = GroupFilter(want=2, n=2, max_rounds=1)
    groups.add(draw([10, 11, 12], 2), gens(6, 0), [1, 1, 0, 1, 0, 0], [{"ref_logprobs": [float(i)]} for i in range(6)])
    assert groups.next_count() == 0  # one round only
    (_, texts, _, _, scores, refs), stats = groups.result()
    assert [r["ref_logprobs"] for r in refs] == [[2.0], [3.0], [0.0], [1.0]]  # each row's streamed passes follow it
    assert texts == ["p11", "p11", "p10", "p10"] and scores == [0, 1, 1, 1]  # informative first, then filled
    assert stats["rollout/filled_groups"] == 1.0 and stats["rollout/filtered_groups"] == 2.0
    nothing = GroupFilter(want=2, n=2, max_rounds=3)
    nothing.add(draw([1, 2], 2), gens(4, 0), [0, 0, 1, 1], [])
    assert nothing.next_count() == 2  # no informative group yet: a whole batch again


def test_the_filter_counts_correct_answers_and_the_overlong_shaping_comes_after():
    # Issue 28's cases, L = rollout.max_new_tokens = 4, C = reward.overlong_buffer = 2: a response of
    # l tokens gets min(0, max(-1, (2 - l) / 2)), i.e. 0 for l <= 2, -0.5 for 3, -1 for 4.
    cfg = compose_config(["algo=dapo", "rollout.max_new_tokens=4", "reward.overlong_buffer=2"])

    def sized(lengths):
        return [Generation([0], list(range(n)), [0.0] * n, f"r{n}") for n in lengths]

    groups = GroupFilter(want=2, n=2, max_rounds=1)
    # group 0: both correct, lengths [2, 4]: shaped [1, 0] would keep it, from length alone
    # group 1: [correct, wrong], lengths [4, 1]: shaped [0, 0] would drop it
    both_right, right_wrong = sized([2, 4]), sized([4, 1])
    task = [1.0, 1.0, 1.0, 0.0]
    groups.add(draw([10, 11], 2), both_right + right_wrong, task, [])
    (_, texts, _, generations, scores, _), stats = groups.result()
    assert texts == ["p11", "p11", "p10", "p10"]  # group 1 kept, group 0 only fills the step
    assert stats["rollout/filtered_groups"] == 1.0 and stats["rollout/filled_groups"] == 1.0
    shaped, overlong = scoring.shaped(cfg, generations, scores)
    assert shaped == [0.0, 0.0, 1.0, 0.0]  # [1 - 1, 0 + 0] then [1 + 0, 1 - 1]: what the advantages see
    assert overlong == {"reward/overlong_penalty_mean": -0.5, "reward/overlong_frac": 0.5}
    assert scoring.shaped(compose_config(["algo=grpo"]), generations, scores) == (scores, {})  # off: unchanged


def test_refill_prompts_are_keyed_on_the_round_and_skip_the_drawn():
    first = refill_prompts(seed=0, step=3, round_=1, count=5, num_prompts=20, drawn={0, 1, 2})
    assert first == refill_prompts(seed=0, step=3, round_=1, count=5, num_prompts=20, drawn={0, 1, 2})
    assert len(first) == 5 and not set(first) & {0, 1, 2}
    assert first != refill_prompts(seed=0, step=3, round_=2, count=5, num_prompts=20, drawn={0, 1, 2})
    assert refill_prompts(seed=0, step=3, round_=1, count=5, num_prompts=4, drawn={0, 1, 2}) == [3]


def test_rollout_batch_stats_and_truncation_survive_a_checkpoint_and_old_rows_load():
    batch = RolloutBatch(1, [[5]], ["p"], [{}], [Generation([5], [6], [-0.5], " x", truncated=True)], [1.0],
                         {"time/generate": 0.1}, {"rollout/sampling_rounds": 2.0})
    back = RolloutBatch.from_json(json.loads(json.dumps(batch.to_json())))
    assert back.stats == {"rollout/sampling_rounds": 2.0} and back.generations[0].truncated
    old = batch.to_json()  # a state.json written before these fields existed
    del old["stats"], old["generations"][0]["truncated"]
    back = RolloutBatch.from_json(old)
    assert back.stats == {} and not back.generations[0].truncated


def test_presets_compose_and_their_options_are_checked():
    dapo = compose_config(["algo=dapo", "rollout.max_new_tokens=40"])
    assert (dapo.algo.clip_eps, dapo.algo.clip_eps_high, dapo.algo.kl_coef) == (0.2, 0.28, 0.0)
    assert dapo.rollout.dynamic_sampling and dapo.reward.overlong_buffer == 8  # a fifth of the budget
    validate_config(dapo)
    gspo = compose_config(["algo=gspo"])
    assert (gspo.algo.ratio_level, gspo.algo.clip_eps, gspo.algo.clip_eps_high) == ("sequence", 3e-4, 4e-4)
    validate_config(gspo)
    # neither keeps a KL term, so neither starts a reference actor; GRPO's k3 loss, an adaptive
    # controller (which may raise beta from 0) and a KL-free run that monitors its KL do
    assert not needs_reference(dapo) and not needs_reference(gspo)
    assert needs_reference(compose_config(["algo=gspo", "reference.monitor=true"]))
    assert needs_reference(compose_config(["algo=grpo", "reference.monitor=false"]))
    assert needs_reference(compose_config(["algo.kl_coef=0"]))  # e.g. the kl_coef=0 arm of a sweep
    assert needs_reference(compose_config(["algo.kl_coef=0", "algo.kl_controller=adaptive", "reference.monitor=false"]))
    with pytest.raises(ConfigError, match=r"^rollout\.dynamic_sampling=True: .*algo\.estimator=gae"):
        validate_config(compose_config(["rollout.dynamic_sampling=true"]))
    with pytest.raises(ConfigError, match=r"^reward\.overlong_buffer=30: must be <= rollout\.max_new_tokens=24"):
        validate_config(compose_config(["reward.overlong_buffer=30"]))
    with pytest.raises(ConfigError, match=r"^algo\.ratio_level='sentence'"):
        validate_config(compose_config(["algo.ratio_level=sentence"]))


def test_overlong_watch_warns_once_when_the_buffer_covers_most_responses(tmp_path, capsys):
    from rlhf_dist.config import LoggerConfig
    from rlhf_dist.driver.metrics import OverlongWatch
    from rlhf_dist.driver.run_logger import RunLogger

    watch = OverlongWatch(RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, 4, ""))
    watch.observe(0, {"response_length/truncated_frac": 0.0})  # shaping off: nothing to say
    watch.observe(1, {"reward/overlong_frac": 0.5, "response_length/truncated_frac": 0.0})  # half: not most
    watch.observe(2, {"reward/overlong_frac": 0.75, "response_length/truncated_frac": 0.0625})
    watch.observe(3, {"reward/overlong_frac": 0.9, "response_length/truncated_frac": 0.0})
    out = capsys.readouterr().out
    assert out.count("warning") == 1
    assert "step 2: 75% of the responses got the overlong penalty (6% were cut off)" in out
