"""``models.detokenize.response_texts`` on hand-made cases, against what vLLM's detokenizer does
token by token (a ``DecodeStream`` primed with the prompt). The same against vLLM itself, on sampled
responses: tests/integration/test_detokenize.py."""

from __future__ import annotations

import pytest

from rlhf_dist.models.detokenize import response_texts
from tests.integration.detokenize_check import sentencepiece_style


@pytest.fixture(scope="module")
def llama2_style(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sentencepiece_style(tmp_path_factory.mktemp("tok"), True))


def byte_tokens(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode()]


def test_a_word_after_the_prompt_keeps_its_leading_space(llama2_style) -> None:
    raw = llama2_style.backend_tokenizer
    prompt = llama2_style("the pasta")["input_ids"]
    response = llama2_style("was great", add_special_tokens=False)["input_ids"]  # "▁was▁great": the word's space
    assert raw.decode(response) == "was great"  # alone: SentencePiece's first space is stripped
    assert response_texts(raw, [prompt], [response]) == [" was great"]


def test_a_character_cut_at_the_end_is_held_back(llama2_style) -> None:
    raw = llama2_style.backend_tokenizer
    prompt = llama2_style("x")["input_ids"]
    cafe = byte_tokens(llama2_style, "café")  # é: two bytes
    assert response_texts(raw, [prompt] * 2, [cafe, cafe[:-1]]) == ["café", "caf"]


def test_special_tokens_are_skipped(llama2_style) -> None:
    raw = llama2_style.backend_tokenizer
    prompt = llama2_style("x")["input_ids"]
    eos = llama2_style.eos_token_id
    response = llama2_style("and", add_special_tokens=False)["input_ids"] + [eos]
    assert response_texts(raw, [prompt], [response]) == [" and"]
