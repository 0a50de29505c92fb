"""The embedded InstructGPT task: the hidden annotator, demonstrations and noisy preferences."""

import itertools
import math
import random

import pytest

from rlhf_dist.tasks.reviews import corpus, feedback
from rlhf_dist.tasks.reviews.feedback import annotator_score


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (" great .", 1.0),  # one positive word
        (" great and lovely .", 2.0),
        (" great , lovely , fun and superb .", 3.0),  # positives are capped at 3
        (" bad .", -1.0),
        (" great but the soup was bland .", 0.0),  # +1 - 1
        (" long .", 0.0),  # no sentiment
        (" great great great .", -1.0),  # 1 distinct positive - 2 repeats
        (" bad bad .", -2.0),  # 1 negative + 1 repeat
        (" great and lovely", 1.0),  # 2 - 1 for the missing full stop
        ("", -1.0),  # an empty response is unfinished
        (" GREAT .", 1.0),  # case-insensitive
    ],
)
def test_annotator_score_by_hand(response, expected):
    assert annotator_score("the pasta was", response) == expected


def test_sample_response_uses_the_prompts_domain_and_ends_with_a_full_stop():
    rng = random.Random(0)
    food = set(corpus.DOMAINS["food"][0])
    others = set(feedback._ALL_NOUNS) - food
    for _ in range(200):
        response = feedback.sample_response("review : the pasta was", rng)
        assert response.startswith(" ") and response.endswith(" .")
        assert not (set(response.split()) & others)  # a second noun comes from the food domain


def test_demonstrations_have_mixed_quality():
    rows = feedback.sft_rows(600, seed=0)
    assert len(rows) == 600 and all(set(r) == {"prompt", "response"} for r in rows)
    gold = [annotator_score(r["prompt"], r["response"]) for r in rows]
    # roughly a third positive, a third negative, a third mixed or neutral
    for share in (sum(g > 0 for g in gold), sum(g < 0 for g in gold), sum(g == 0 for g in gold)):
        assert 150 < share < 250
    # demonstrations never repeat a sentiment word: the reward model cannot learn that penalty
    assert min(gold) >= -2 and all(not r["response"].count(" great great") for r in rows)


def test_preferences_follow_the_annotator_up_to_the_noise():
    rows = feedback.preference_rows(2000, seed=1, noise=0.1)
    assert len(rows) == 2000
    agree = [annotator_score(r["prompt"], r["chosen"]) > annotator_score(r["prompt"], r["rejected"]) for r in rows]
    # ties are skipped, so every pair is strictly ordered; ~10% of labels are flipped
    assert all(
        annotator_score(r["prompt"], r["chosen"]) != annotator_score(r["prompt"], r["rejected"]) for r in rows
    )
    assert 0.87 < sum(agree) / len(agree) < 0.93


def test_noise_free_preferences_always_agree_and_splits_differ():
    rows = feedback.preference_rows(300, seed=2, noise=0.0)
    assert all(annotator_score(r["prompt"], r["chosen"]) > annotator_score(r["prompt"], r["rejected"]) for r in rows)
    test = feedback.preference_rows(300, seed=2, noise=0.0, split="test")
    assert rows != test
    assert feedback.preference_rows(300, seed=2, noise=0.0) == rows  # deterministic


def test_noise_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="noise=0.5"):
        feedback.preference_rows(10, seed=0, noise=0.5)


def _pairs_as_before(num: int, seed: int, noise: float, split: str) -> list[dict]:
    """The pair generator as it was before rankings (issue 27): kept here to pin that the default
    (data.ranking_k=2) gives the same rows, hence the same pipeline."""
    from rlhf_dist.core.seeds import FEEDBACK, derive_seed, split_index

    rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 21))
    prompt_rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 22))
    rows: list[dict] = []
    while len(rows) < num:
        prompt = corpus.make_prompts(1, prompt_rng.randrange(2**31))[0]
        a, b = feedback.sample_response(prompt, rng), feedback.sample_response(prompt, rng)
        ga, gb = annotator_score(prompt, a), annotator_score(prompt, b)
        if ga == gb:
            continue
        better, worse = (a, b) if ga > gb else (b, a)
        if rng.random() < noise:
            better, worse = worse, better
        rows.append({"prompt": prompt, "chosen": better, "rejected": worse})
    return rows


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_pairs_are_rankings_of_two_and_unchanged(noise):
    for split, num in (("train", 4096), ("test", 512)):  # the default run's data
        assert feedback.preference_rows(num, 0, noise, split) == _pairs_as_before(num, 0, noise, split)
    rankings = feedback.ranking_rows(50, 0, noise, 2)
    assert [[r["chosen"], r["rejected"]] for r in feedback.preference_rows(50, 0, noise)] == [
        r["responses"] for r in rankings
    ]
    assert all(r["ranks"] == [0, 1] for r in rankings)


def test_level_order_is_mallows_by_repeated_insertion():
    # Two levels: reversed exactly when the one draw is below flip (today's pair noise).
    assert feedback.level_order(2, 0.3, random.Random(0)) == [0, 1]  # Random(0).random() = 0.844
    assert feedback.level_order(2, 0.9, random.Random(0)) == [1, 0]
    # Three levels, flip 0.2, phi = 0.2 / 0.8 = 1/4: P(order) = phi^inversions / Z with
    # Z = (1 + phi)(1 + phi + phi^2) = 1.25 * 1.3125 = 1.640625:
    #   [0,1,2] 1/Z = 0.6095; [1,0,2], [0,2,1] 0.25/Z = 0.1524; [1,2,0], [2,0,1] 0.0625/Z = 0.0381;
    #   [2,1,0] 0.015625/Z = 0.0095
    phi, z = 0.25, 1.640625
    expected = {(0, 1, 2): 1 / z, (1, 0, 2): phi / z, (0, 2, 1): phi / z, (1, 2, 0): phi**2 / z,
                (2, 0, 1): phi**2 / z, (2, 1, 0): phi**3 / z}
    rng, draws = random.Random(1), 40000
    counts: dict[tuple, int] = {}
    for _ in range(draws):
        order = tuple(feedback.level_order(3, 0.2, rng))
        counts[order] = counts.get(order, 0) + 1
    for order, p in expected.items():  # 4 standard errors: sqrt(p (1 - p) / n) <= 0.0025
        assert abs(counts[order] / draws - p) < 4 * math.sqrt(p * (1 - p) / draws), order


def test_out_of_order_is_the_exact_mallows_marginal():
    # Three levels, phi = flip / (1 - flip): the orders with level 2 above level 0 are [2,0,1] and
    # [1,2,0] (2 inversions each) and [2,1,0] (3), so P = (2 phi^2 + phi^3) / Z; levels 0, 1:
    # [1,0,2] (1), [1,2,0] (2), [2,1,0] (3): (phi + phi^2 + phi^3) / Z = phi / (1 + phi) = flip.
    flip = 0.2
    phi = flip / (1 - flip)
    z = (1 + phi) * (1 + phi + phi**2)
    assert feedback.out_of_order(flip, 0, 2) == pytest.approx((2 * phi**2 + phi**3) / z, abs=1e-12)
    assert feedback.out_of_order(flip, 0, 1) == pytest.approx(flip, abs=1e-12)
    # every pair against the Mallows weights of all 5! orders of five levels
    orders = list(itertools.permutations(range(5)))
    weight = {o: phi ** sum(o[i] > o[j] for i in range(5) for j in range(i + 1, 5)) for o in orders}
    for a, b in itertools.combinations(range(5), 2):
        expected = sum(w for o, w in weight.items() if o.index(b) < o.index(a)) / sum(weight.values())
        assert feedback.out_of_order(flip, a, b) == pytest.approx(expected, abs=1e-12), (a, b)


def test_the_flip_is_calibrated_so_a_comparison_is_out_of_order_with_probability_noise():
    assert feedback.calibrated_flip(0.1, (3, 1)) == 0.1 and feedback.calibrated_flip(0.0, (1, 2, 3)) == 0.0
    # Levels of sizes 1, 2, 1 at flip f: pairs (0,1) x2, (1,2) x2 are adjacent, (0,2) x1 two apart:
    # the share is (4 f + P02) / 5 with P02 < f, so it is below f and the calibrated flip above 0.1.
    f = 0.1
    share = (4 * f + feedback.out_of_order(f, 0, 2)) / 5
    assert feedback.pair_flip_share(f, (1, 2, 1)) == pytest.approx(share, abs=1e-12) and share < f
    for sizes in ((1, 1, 1), (1, 2, 1), (2, 3, 3, 1), (1, 2, 3, 2, 1)):
        flip = feedback.calibrated_flip(0.1, sizes)
        assert flip > 0.1 and feedback.pair_flip_share(flip, sizes) == pytest.approx(0.1, abs=1e-9)


@pytest.mark.parametrize("k", [4, 9])
def test_rankings_follow_the_annotator_with_ties_and_the_noise_of_a_pair(k):
    rows = feedback.ranking_rows(1500, seed=1, noise=0.1, k=k)
    assert len(rows) == 1500 and all(len(r["responses"]) == len(r["ranks"]) == k for r in rows)
    flipped = comparisons = 0
    for r in rows:
        gold = [annotator_score(r["prompt"], x) for x in r["responses"]]
        assert r["ranks"] == sorted(r["ranks"]) and len(set(r["ranks"])) == len(set(gold)) > 1  # best first
        for i in range(k):
            for j in range(i + 1, k):
                assert (gold[i] == gold[j]) == (r["ranks"][i] == r["ranks"][j])  # equal scores are the ties
                comparisons += gold[i] != gold[j]
                flipped += gold[i] < gold[j]  # i is ranked above j, the annotator prefers j
    # Seeded, so exact; the share of comparable pairs out of order is the pair noise 0.1 to within
    # the sampling error (uncalibrated, flip = 0.1 gives 0.075 at k = 4 and 0.057 at k = 9).
    assert 0.09 < flipped / comparisons < 0.11
    clean = feedback.ranking_rows(300, seed=1, noise=0.0, k=k)
    for r in clean:
        gold = [annotator_score(r["prompt"], x) for x in r["responses"]]
        assert gold == sorted(gold, reverse=True)
    assert feedback.ranking_rows(300, seed=1, noise=0.0, k=k) == clean  # deterministic


def test_a_ranking_of_one_is_rejected():
    with pytest.raises(ValueError, match="k=1: a ranking needs at least 2"):
        feedback.ranking_rows(10, seed=0, noise=0.1, k=1)
