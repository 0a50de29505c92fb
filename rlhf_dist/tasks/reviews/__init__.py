"""The default task, "positive reviews", with the embedded InstructGPT task's data: ``corpus`` (the
vocabulary, the review corpus and prompts, the rule reward) and ``feedback`` (the simulated
labellers' demonstrations and ranked pairs, the hidden annotator).

The names configs use are here: ``rlhf_dist.tasks.reviews:positive_sentiment_reward``
(``reward.function``) and ``rlhf_dist.tasks.reviews:annotator_score`` (``eval.gold_function``).
"""

from __future__ import annotations

from rlhf_dist.tasks.base import Recipe, Task
from rlhf_dist.tasks.reviews.corpus import make_corpus, positive_sentiment_reward, prompt_rows
from rlhf_dist.tasks.reviews.feedback import annotator_score, rank_responses, supervised_rows

__all__ = ["RECIPE", "TASK", "annotator_score", "positive_sentiment_reward"]

# The tiny policy: a 2-layer Llama (hidden 128, byte-level BPE of 512 tokens) pretrained for a few
# seconds on make_corpus, so it writes review-like text with a mix of positive and negative words:
# a starting point the positive-reviews reward can move.
RECIPE = Recipe(
    name="tiny-llama-v1", corpus_lines=6000, hidden_size=128, intermediate_size=256,
    split_digits=False, pretrain_steps=300, batch_size=32, learning_rate=3e-3,
)  # fmt: skip

TASK = Task(
    name="reviews", model="tiny", recipe=RECIPE, prompts=prompt_rows, corpus=make_corpus,
    supervised_rows=supervised_rows, rank_responses=rank_responses,
)  # fmt: skip
