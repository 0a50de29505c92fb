"""The embedded InstructGPT task: demonstrations, simulated human preferences and a hidden gold metric.

Everything the three stages need, offline and deterministic given a seed:

* **Prompts**: the review prefixes of ``corpus.make_prompts`` ("review : the pasta was").
* **Demonstrations** (SFT): continuations written by simulated labellers of mixed quality:
  a third positive, a third negative, a third mixed or neutral, like real demonstrations.
* **Preferences** (reward model): two continuations sampled for the same prompt, ranked by the
  hidden annotator with label noise: with probability ``noise`` the labeller picks the worse
  one. Pairs the annotator scores equal are skipped (a labeller's "tie"). A perfect reward
  model therefore agrees with the held-out labels at most ``1 - noise`` of the time. Or
  rankings of K continuations (``ranking_rows``, InstructGPT's K = 4 to 9), equal scores tied,
  with the same noise per pair on average, correlated within a ranking as a human's errors are.
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

import functools
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


def _insertion_weights(i: int, flip: float) -> list[float]:
    """Unnormalised P(the level inserted i-th lands j places above the bottom), j = 0..i."""
    return [flip**j * (1.0 - flip) ** (i - j) for j in range(i + 1)]


def level_order(levels: int, flip: float, rng: random.Random) -> list[int]:
    """A labeller's order of ``levels`` quality levels (0 the best), best first, with noise: the
    Mallows distribution around the true order, P(order) ~ (flip / (1 - flip)) ** (pairs out of order),
    drawn by repeated insertion: level i (i = 1, 2, ..., below every level placed so far) lands
    j places above the bottom with probability ~ flip**j (1 - flip)**(i - j), i.e. as j wrong
    comparisons with the levels already placed. One ``rng.random()`` per insertion; with two levels,
    reversed exactly when it is below ``flip`` (today's pairs)."""
    order = [0]
    for i in range(1, levels):
        weights = _insertion_weights(i, flip)
        u, cumulative, up = rng.random() * sum(weights), 0.0, 0
        for j in range(1, i + 1):  # the errors first, so that two levels flip iff u < flip
            cumulative += weights[j]
            if u < cumulative:
                up = j
                break
        order.insert(len(order) - up, i)
    return order


def out_of_order(flip: float, a: int, b: int) -> float:
    """P(levels a < b end in the wrong order) in ``level_order(levels, flip)``, for any ``levels``
    above b (later insertions do not reorder them): b lands above a. Exact, by tracking the
    distribution of a's place through the insertions up to b's."""
    place = [0.0] * (a + 1)  # place[p]: P(a is p-th from the top)
    weights = _insertion_weights(a, flip)
    for j, w in enumerate(weights):
        place[a - j] += w / sum(weights)
    for i in range(a + 1, b):  # i lands at index i - j, pushing a down when at or above it
        weights, moved = _insertion_weights(i, flip), [0.0] * (i + 1)
        for p, mass in enumerate(place):
            for j, w in enumerate(weights):
                moved[p + 1 if i - j <= p else p] += mass * w / sum(weights)
        place = moved
    weights = _insertion_weights(b, flip)
    return sum(mass * w / sum(weights) for p, mass in enumerate(place) for j, w in enumerate(weights) if b - j <= p)


def pair_flip_share(flip: float, sizes: tuple[int, ...]) -> float:
    """The expected share of comparable pairs out of order in a ranking whose levels (best first)
    hold ``sizes`` responses, ordered by ``level_order(len(sizes), flip)``: a pair of responses from
    levels a < b is out of order when those levels are."""
    pairs = [(sizes[a] * sizes[b], a, b) for a in range(len(sizes)) for b in range(a + 1, len(sizes))]
    return sum(n * out_of_order(flip, a, b) for n, a, b in pairs) / sum(n for n, _, _ in pairs)


@functools.cache
def calibrated_flip(noise: float, sizes: tuple[int, ...]) -> float:
    """The ``level_order`` flip at which a ranking with levels of ``sizes`` responses has, in
    expectation, a share ``noise`` of its comparable pairs out of order (``pair_flip_share``), as a
    pair has: two levels, ``noise`` itself. Mallows orders distant levels right more often than
    adjacent ones, so with three or more levels it is above ``noise``; bisection on [0, 0.5],
    where the share rises from 0 to 0.5."""
    if len(sizes) <= 2 or noise == 0.0:
        return noise
    low, high = 0.0, 0.5
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if pair_flip_share(mid, sizes) < noise else (low, mid)
    return (low + high) / 2


def ranking_rows(num: int, seed: int, noise: float, k: int, split: str = "train") -> list[dict]:
    """``{"prompt", "responses", "ranks"}`` rankings of ``k`` continuations sampled for one prompt,
    best first, by the hidden annotator with label noise; equal annotator scores are a tie (equal
    ranks), and a prompt whose ``k`` responses all tie is skipped, so exactly ``num`` rows.

    The noise is a human's: the labeller sees which responses are equally good, and orders the
    distinct score levels the way a Mallows model does (``level_order``: each wrong comparison
    with an already placed level costs a factor ``flip / (1 - flip)``, so confusions of adjacent
    levels are likelier than of distant ones, and the errors of one ranking are correlated), with
    ``flip`` calibrated to the ranking's levels (``calibrated_flip``) so that in expectation a share
    ``noise`` of its comparable pairs is out of order: a comparison is as noisy as a pair of
    ``preference_rows``, whatever K. With ``k = 2`` this is exactly ``preference_rows``: one draw,
    the pair reversed with probability ``noise``."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise={noise}: must be in [0, 0.5) (at 0.5 the labels carry no signal)")
    if k < 2:
        raise ValueError(f"k={k}: a ranking needs at least 2 responses")
    rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 21))
    prompt_rng = random.Random(derive_seed(FEEDBACK, seed, split_index(split), 22))
    rows: list[dict] = []
    while len(rows) < num:
        prompt = corpus.make_prompts(1, prompt_rng.randrange(2**31))[0]
        row = rank_responses(prompt, [sample_response(prompt, rng) for _ in range(k)], noise, rng)
        if row is not None:
            rows.append(row)
    return rows


def rank_responses(prompt: str, responses: list[str], noise: float, rng: random.Random) -> dict | None:
    """``{"prompt", "responses", "ranks"}``: ``responses`` ranked best first by the hidden annotator
    with a human's label noise (``ranking_rows``); None when they all tie (nothing to learn). The
    labeller of the iterated pipeline's rounds (``Task.rank_responses``)."""
    gold = [annotator_score(prompt, r) for r in responses]
    levels = sorted(set(gold), reverse=True)
    if len(levels) == 1:
        return None
    sizes = tuple(gold.count(level) for level in levels)
    perceived = level_order(len(levels), calibrated_flip(noise, sizes), rng)
    rank_of = {levels[level]: rank for rank, level in enumerate(perceived)}
    order = sorted(range(len(responses)), key=lambda i: rank_of[gold[i]])  # stable: a tie keeps the given order
    return {"prompt": prompt, "responses": [responses[i] for i in order], "ranks": [rank_of[gold[i]] for i in order]}


def preference_rows(num: int, seed: int, noise: float, split: str = "train") -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` pairs ranked by the hidden annotator; with
    probability ``noise`` the label is flipped. Ties are skipped, so exactly ``num`` rows
    (``ranking_rows`` of two)."""
    return [{"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][1]}
            for r in ranking_rows(num, seed, noise, 2, split)]


def supervised_rows(kind: str, num: int, seed: int, split: str, noise: float, ranking_k: int) -> list[dict]:
    """Rows of the embedded task for the SFT ("sft": demonstrations) or reward-model
    ("preferences": pairs, or rankings of ``ranking_k`` > 2 responses) stage, whose data source is
    named ``builtin:reviews``."""
    if kind == "sft":
        return sft_rows(num, seed, split)
    if kind == "preferences":
        if ranking_k == 2:
            return preference_rows(num, seed, noise, split)
        return ranking_rows(num, seed, noise, ranking_k, split)
    raise ValueError(f"unknown kind {kind!r}")
