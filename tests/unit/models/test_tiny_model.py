"""Tokenizers of the tiny models (training one takes well under a second; no model is built)."""

from rlhf_dist.models.tiny import _train_tokenizer
from rlhf_dist.tasks.arithmetic import make_corpus


def test_arithmetic_tokenizer_gives_one_token_per_digit() -> None:
    tokenizer = _train_tokenizer(make_corpus(2000, seed=0), split_digits=True)
    ids = tokenizer("12 + 7 = 19")["input_ids"]
    # "Ġ" is the byte-level space: the answer is " " then its digits, one token each.
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "1", "2", "Ġ+", "Ġ", "7", "Ġ=", "Ġ", "1", "9"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12 + 7 = 19"


def test_without_split_digits_bpe_merges_whole_numbers() -> None:
    # What split_digits prevents: every number of the corpus becomes one token.
    tokenizer = _train_tokenizer(make_corpus(2000, seed=0), split_digits=False)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12 + 7 = 19")["input_ids"])
    assert tokens == ["<s>", "12", "Ġ+", "Ġ7", "Ġ=", "Ġ19"]
