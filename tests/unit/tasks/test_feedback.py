"""The embedded InstructGPT task: the hidden annotator, demonstrations and noisy preferences."""

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
