"""The default RLHF task, "positive reviews": a synthetic review corpus, prompts, and a rule reward.

Pure Python (no torch) so that the reward can run anywhere, cheaply and deterministically.
Text is lowercase, space-separated words with punctuation as separate tokens
("the film was wonderful and the acting was great ."), which keeps the tiny model's
tokenizer and the reward's word matching trivially aligned. The vocabulary (word lists,
domains, descriptors, intensifiers) and ``words`` are public: the embedded InstructGPT task
(``reviews/feedback.py``) writes its demonstrations and judges them with the same ones.
"""

from __future__ import annotations

import random
import re

from rlhf_dist.core.seeds import REVIEW_PROMPTS, derive_seed, split_index

POSITIVE_WORDS: tuple[str, ...] = (
    "good", "great", "wonderful", "excellent", "amazing", "delicious", "brilliant", "lovely",
    "fantastic", "superb", "perfect", "beautiful", "enjoyable", "charming", "fresh", "tasty",
    "delightful", "pleasant", "stunning", "memorable", "clever", "gripping", "moving", "fun",
    "friendly", "impressive", "outstanding", "marvelous", "generous", "loved",
)  # fmt: skip

NEGATIVE_WORDS: tuple[str, ...] = (
    "bad", "terrible", "awful", "boring", "bland", "dull", "horrible", "poor", "disappointing",
    "stale", "mediocre", "weak", "slow", "messy", "rude", "greasy", "forgettable", "confusing",
    "tedious", "annoying", "overpriced", "soggy", "clumsy", "lifeless", "dreadful", "worst",
    "hated", "painful", "predictable", "noisy",
)  # fmt: skip

# Each domain pairs nouns with the verbs that make sense for them ("read the novel", not
# "ate the novel"); a sentence draws all its slots from one domain.
DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "film": (("film", "movie", "acting", "plot", "ending", "soundtrack", "script", "show", "episode"), ("watched", "saw")),
    "food": (("pasta", "soup", "pizza", "dessert", "bread", "coffee", "salad", "cake", "curry", "tea"), ("ate", "ordered", "tried")),
    "book": (("book", "novel", "story", "chapter", "prose", "poem", "hero"), ("read", "finished")),
    "music": (("album", "song", "concert", "band", "singer", "melody"), ("heard", "played")),
    "place": (("hotel", "room", "museum", "beach", "garden", "restaurant", "cafe"), ("visited", "explored")),
    "game": (("game", "level", "puzzle"), ("played", "finished")),
}  # fmt: skip

# Descriptors with no sentiment, for the neutral sentences in the mixed/neutral third.
NEUTRAL_DESCRIPTORS: tuple[str, ...] = ("long", "short", "new", "old", "quiet", "simple", "small", "big")

NEUTRAL_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [word for nouns, verbs in DOMAINS.values() for word in (*nouns, *verbs)] + list(NEUTRAL_DESCRIPTORS)
    )
)

INTENSIFIERS: tuple[str, ...] = ("really", "very", "quite", "so", "truly")
_TIMES: tuple[str, ...] = ("last night", "last week", "yesterday", "on sunday", "this morning")

# Slots: {n}, {m} nouns and {v} a verb from one domain; {a}, {b} adjectives; {i} intensifier;
# {t} a time. One-adjective templates use only {a}.
_ONE_ADJECTIVE_TEMPLATES: tuple[str, ...] = (
    "the {n} was {a} .",
    "review : the {n} was {a} .",
    "my opinion of the {n} : {a} .",
    "i {v} the {n} and it was {a} .",
    "overall the {n} was {a} .",
    "the {n} was {i} {a} .",
    "i think the {n} is {a} .",
    "we {v} the {n} {t} . it was {a} .",
)
_TWO_ADJECTIVE_TEMPLATES: tuple[str, ...] = (
    "the {n} was {a} and the {m} was {b} .",
    "review : the {n} was {a} and the {m} was {b} .",
    "my opinion of the {n} : {a} , and the {m} was {b} .",
    "we {v} the {n} {t} . it was {a} and {b} .",
    "a {a} {n} with a {b} {m} .",
    "i {v} the {n} . the {m} was {i} {a} and {b} .",
)
# Contrast templates for the mixed sentences: {a} and {b} have opposite polarity.
_CONTRAST_TEMPLATES: tuple[str, ...] = (
    "the {n} was {a} but the {m} was {b} .",
    "review : the {n} was {a} but the {m} was {b} .",
    "my opinion of the {n} : {a} , but the {m} was {b} .",
    "i {v} the {n} . it was {a} but {b} .",
)
_NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "i {v} the {n} {t} .",
    "review : the {n} was {d} .",
    "my opinion of the {n} : it was {d} .",
    "we {v} the {n} {t} and then the {m} .",
    "the {n} was {d} and the {m} was {d2} .",
)
_PROMPT_TEMPLATES: tuple[str, ...] = (
    "review : the {n} was",
    "my opinion of the {n} :",
    "the {n} was",
    "i {v} the {n} and it was",
    "overall the {n} was",
    "i think the {n} is",
    "we {v} the {n} {t} . it was",
)


def _fill(template: str, rng: random.Random, a: str = "", b: str = "") -> str:
    nouns, verbs = DOMAINS[rng.choice(sorted(DOMAINS))]
    n, m = rng.sample(nouns, 2)
    d, d2 = rng.sample(NEUTRAL_DESCRIPTORS, 2)
    return template.format(
        n=n, m=m, v=rng.choice(verbs), a=a, b=b, d=d, d2=d2, i=rng.choice(INTENSIFIERS), t=rng.choice(_TIMES)
    )


def _polar_sentence(words: tuple[str, ...], rng: random.Random) -> str:
    if rng.random() < 0.5:
        return _fill(rng.choice(_ONE_ADJECTIVE_TEMPLATES), rng, a=rng.choice(words))
    a, b = rng.sample(words, 2)
    return _fill(rng.choice(_TWO_ADJECTIVE_TEMPLATES), rng, a=a, b=b)


def _mixed_or_neutral_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return _fill(rng.choice(_NEUTRAL_TEMPLATES), rng)
    a, b = rng.choice(POSITIVE_WORDS), rng.choice(NEGATIVE_WORDS)
    if rng.random() < 0.5:
        a, b = b, a
    return _fill(rng.choice(_CONTRAST_TEMPLATES), rng, a=a, b=b)


def make_corpus(num_lines: int, seed: int) -> list[str]:
    """Synthetic review sentences: exactly num_lines // 3 (rounded) each positive, negative,
    and mixed/neutral, shuffled. Deterministic given seed."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 3
        if kind == 0:
            lines.append(_polar_sentence(POSITIVE_WORDS, rng))
        elif kind == 1:
            lines.append(_polar_sentence(NEGATIVE_WORDS, rng))
        else:
            lines.append(_mixed_or_neutral_sentence(rng))
    rng.shuffle(lines)
    return lines


def make_prompts(num: int, seed: int) -> list[str]:
    """Short sentiment-free review prefixes ("review : the pasta was"), the continuation of
    which decides the sentiment. Deterministic given seed."""
    rng = random.Random(seed)
    return [_fill(rng.choice(_PROMPT_TEMPLATES), rng) for _ in range(num)]


def prompt_rows(num: int, seed: int, split: str) -> list[dict[str, str]]:
    """``builtin:reviews``: ``num`` rows {"prompt": prefix} of ``split``, each split drawn from its
    own seed (the prefixes have no answer to hold out, so the splits differ by seed only)."""
    return [{"prompt": p} for p in make_prompts(num, derive_seed(REVIEW_PROMPTS, seed, split_index(split)))]


_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)
_WORD_RE = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """The words a reward counts: runs of letters of ``text.lower()`` (punctuation is not a word)."""
    return _WORD_RE.findall(text.lower())


REWARD_SCALE = 2.0  # a 9-word sentence with 2 positive words scores 2 * 2 / 9 = 0.44


def positive_sentiment_reward(prompt: str, response: str) -> float:
    """Rule reward in [-1, 1] for how positive the response is.

        words  = runs of letters in response.lower()   (punctuation is not a word)
        reward = clip(REWARD_SCALE * (#positive - #negative) / max(1, len(words)), -1, 1)

    Only the response counts, so the policy is scored on what it writes, not on the prompt.
    No negation handling ("not good" counts as positive): the task is a toy with a known optimum.
    """
    del prompt  # part of the reward-function interface; this rule ignores it
    found = words(response)
    score = sum(w in _POSITIVE for w in found) - sum(w in _NEGATIVE for w in found)
    return max(-1.0, min(1.0, REWARD_SCALE * score / max(1, len(found))))


def positive_word_count(prompt: str, response: str) -> float:
    """An unbounded rule reward: how many of the response's words are positive (the throughput
    benchmark's, ``scripts/bench_workloads.py``: it keeps rewarding longer responses)."""
    del prompt  # only the completion is scored
    return float(sum(w in _POSITIVE for w in words(response)))
