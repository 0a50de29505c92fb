"""The embedded InstructGPT task: demonstrations, simulated human preferences and a hidden gold metric.

Everything the three stages need, offline and deterministic given a seed:

* **Prompts**: the review prefixes of ``corpus.make_prompts`` ("review : the pasta was").
* **Demonstrations** (SFT): continuations written by simulated labellers of mixed quality:
  a third positive, a third negative, a third mixed or neutral, like real demonstrations.
* **Preferences** (reward model): two continuations sampled for the same prompt, ranked by the
  hidden annotator with label noise: with probability ``noise`` the labeller picks the worse
  one. Pairs the annotator scores equal are skipped (a labeller's "tie"). A perfect reward
  model therefore agrees with the held-out labels at most ``1 - noise`` of the time.
* **The hidden annotator** (``annotator_score``) is the gold metric. The PPO stage never sees
  it: it optimises the reward model learned from the noisy rankings. The evaluation stage
  uses it to judge win rates.

The annotator likes distinct positive words (up to three), dislikes negative ones, and
penalises what a human would: a sentiment word said again, and a response cut off before its
full stop. Demonstrations never repeat a sentiment word, so the reward model never sees the
repetition penalty in its data: a policy pushed hard against the reward model (no KL penalty)
can find that blind spot, which is the over-optimisation the benchmark shows.
"""

from __future__ import annotations

import random

from rlhf_dist.core.seeds import FEEDBACK, derive_seed, split_index
from rlhf_dist.tasks.reviews import corpus

_NOUN_DOMAIN = {noun: nouns for nouns, _ in corpus.DOMAINS.values() for noun in nouns}
_ALL_NOUNS = tuple(sorted(_NOUN_DOMAIN))
_POSITIVE = frozenset(corpus.POSITIVE_WORDS)
_NEGATIVE = frozenset(corpus.NEGATIVE_WORDS)
MAX_REWARDED_POSITIVES = 3

# Continuations of a prompt that ends where an adjective fits ("... the pasta was").
# {a}, {b} adjectives; {m} another noun of the prompt's domain; {i} an intensifier.
_ONE = (" {a} .", " {i} {a} .")
_TWO = (" {a} and {b} .", " {a} and the {m} was {b} .", " {i} {a} , and the {m} was {b} .")
_CONTRAST = (" {a} but {b} .", " {a} but the {m} was {b} .")
_NEUTRAL = (" {d} .", " {d} and the {m} was {d2} .")


def annotator_score(prompt: str, response: str) -> float:
    """The hidden gold score of a response (higher is better).

        score = min(#distinct positive words, 3) - #distinct negative words
                - #repeated sentiment words - (1 if the response does not end with ".")

    Words are runs of letters of the lower-cased response; only the response is judged.
    """
    del prompt  # the annotator judges the continuation; the prompt is the same for both
    seen: set[str] = set()
    positives = negatives = repeats = 0
    for word in corpus.words(response):
        if word not in _POSITIVE and word not in _NEGATIVE:
            continue
        if word in seen:
            repeats += 1
            continue
        seen.add(word)
        positives += word in _POSITIVE
        negatives += word in _NEGATIVE
    unfinished = not response.rstrip().endswith(".")
    return float(min(positives, MAX_REWARDED_POSITIVES) - negatives - repeats - unfinished)


def sample_response(prompt: str, rng: random.Random) -> str:
    """One demonstration-style continuation of ``prompt``: positive, negative, or mixed/neutral
    with equal probability (a labeller of mixed quality)."""
    words = prompt.split()
    nouns = next((_NOUN_DOMAIN[w] for w in reversed(words) if w in _NOUN_DOMAIN), _ALL_NOUNS)
    m = rng.choice(nouns)
    i = rng.choice(corpus.INTENSIFIERS)
    kind = rng.randrange(3)
    if kind < 2:
        pool = corpus.POSITIVE_WORDS if kind == 0 else corpus.NEGATIVE_WORDS
        a, b = rng.sample(pool, 2)
        template = rng.choice(_ONE if rng.random() < 0.5 else _TWO)
    elif rng.random() < 0.5:
        a, b = rng.choice(corpus.POSITIVE_WORDS), rng.choice(corpus.NEGATIVE_WORDS)
        if rng.random() < 0.5:
            a, b = b, a
        template = rng.choice(_CONTRAST)
    else:
        a = b = ""
        template = rng.choice(_NEUTRAL)
    d, d2 = rng.sample(corpus.NEUTRAL_DESCRIPTORS, 2)
    return template.format(a=a, b=b, m=m, i=i, d=d, d2=d2)


def sft_rows(num: int, seed: int, split: str = "train") -> list[dict]:
    """``{"prompt", "response"}`` demonstrations."""
    rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 11))
    prompts = corpus.make_prompts(num, derive_seed(FEEDBACK, seed, split_index(split), 12))
    return [{"prompt": p, "response": sample_response(p, rng)} for p in prompts]


def preference_rows(num: int, seed: int, noise: float, split: str = "train") -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` pairs ranked by the hidden annotator; with
    probability ``noise`` the label is flipped. Ties are skipped, so exactly ``num`` rows."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise={noise}: must be in [0, 0.5) (at 0.5 the labels carry no signal)")
    rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 21))
    prompt_rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 22))
    rows: list[dict] = []
    while len(rows) < num:
        prompt = corpus.make_prompts(1, prompt_rng.randrange(2**31))[0]
        a, b = sample_response(prompt, rng), sample_response(prompt, rng)
        ga, gb = annotator_score(prompt, a), annotator_score(prompt, b)
        if ga == gb:
            continue
        better, worse = (a, b) if ga > gb else (b, a)
        if rng.random() < noise:
            better, worse = worse, better
        rows.append({"prompt": prompt, "chosen": better, "rejected": worse})
    return rows


def supervised_rows(kind: str, num: int, seed: int, split: str, noise: float) -> list[dict]:
    """Rows of the embedded task for the SFT ("sft": demonstrations) or reward-model
    ("preferences": ranked pairs) stage, whose data source is named ``builtin:reviews``."""
    if kind == "sft":
        return sft_rows(num, seed, split)
    if kind == "preferences":
        return preference_rows(num, seed, noise, split)
    raise ValueError(f"unknown kind {kind!r}")
