import pytest

from rlhf_dist.tasks.reviews.corpus import (
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    POSITIVE_WORDS,
    make_corpus,
    make_prompts,
    positive_sentiment_reward,
)

# reward = clip(2 * (#positive - #negative) / max(1, #words), -1, 1); words are runs of letters.
REWARD_CASES = [
    # the film was wonderful and the acting was great -> 9 words, +2: 2 * 2 / 9 = 4/9
    ("the film was wonderful and the acting was great .", 4 / 9),
    # the soup was bland and the bread was stale -> 9 words, -2: 2 * -2 / 9 = -4/9
    ("the soup was bland and the bread was stale .", -4 / 9),
    # one positive (great), one negative (rude) cancel: 2 * 0 / 9 = 0
    ("the pasta was great but the service was rude .", 0.0),
    # i loved the novel the prose was lovely but the ending was weak -> 13 words,
    # +2 (loved, lovely) -1 (weak): 2 * 1 / 13 = 2/13
    ("i loved the novel , the prose was lovely but the ending was weak .", 2 / 13),
    # case and attached punctuation: great the soup was good really -> 6 words, +2: 2 * 2 / 6 = 2/3
    ("Great! The SOUP was good, really.", 2 / 3),
    # excellent -> 1 word, +1: 2 * 1 / 1 = 2, clipped to 1
    (" excellent .", 1.0),
    # terrible awful -> 2 words, -2: 2 * -2 / 2 = -2, clipped to -1
    ("terrible , awful .", -1.0),
    # no words at all: 0 / max(1, 0) = 0
    ("", 0.0),
    (" . , :", 0.0),
]


@pytest.mark.parametrize(("response", "expected"), REWARD_CASES)
def test_positive_sentiment_reward_hand_computed(response: str, expected: float) -> None:
    assert positive_sentiment_reward("review : the film was", response) == pytest.approx(expected, abs=1e-6)


def test_reward_ignores_the_prompt() -> None:
    # The prompt is full of positive words; the response "i saw it ." has 3 words, none polar: 0.
    assert positive_sentiment_reward("great wonderful excellent", " i saw it .") == 0.0


def test_word_lists_are_disjoint_and_sized() -> None:
    positive, negative, neutral = set(POSITIVE_WORDS), set(NEGATIVE_WORDS), set(NEUTRAL_WORDS)
    assert len(positive) == len(POSITIVE_WORDS) == 30
    assert len(negative) == len(NEGATIVE_WORDS) == 30
    assert len(neutral) == len(NEUTRAL_WORDS) >= 55
    assert not positive & negative and not (positive | negative) & neutral


def test_corpus_is_deterministic_given_seed() -> None:
    assert make_corpus(200, seed=3) == make_corpus(200, seed=3)
    assert make_corpus(200, seed=3) != make_corpus(200, seed=4)


def test_corpus_is_balanced_and_tokenised() -> None:
    lines = make_corpus(300, seed=0)
    assert len(lines) == 300
    # Line i is positive, negative or mixed/neutral by i % 3, so exactly 100 of each; a mixed
    # line has one word of each polarity and a neutral line none, so both score exactly 0.
    rewards = [positive_sentiment_reward("", line) for line in lines]
    assert sum(r > 0 for r in rewards) == 100
    assert sum(r < 0 for r in rewards) == 100
    assert sum(r == 0 for r in rewards) == 100
    for line in lines:
        assert line == line.lower() == " ".join(line.split())
        assert all(token.isalpha() or token in {".", ",", ":"} for token in line.split())
        assert line.endswith(" .")


def test_prompts_are_deterministic_diverse_and_sentiment_free() -> None:
    prompts = make_prompts(64, seed=0)
    assert prompts == make_prompts(64, seed=0)
    assert prompts != make_prompts(64, seed=1)
    assert len(set(prompts)) >= 48
    # A prompt must leave the sentiment to the policy: no polar word in it.
    assert all(positive_sentiment_reward("", prompt) == 0.0 for prompt in prompts)
    assert all(prompt == prompt.lower() == " ".join(prompt.split()) for prompt in prompts)
