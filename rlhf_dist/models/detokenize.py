"""Response text from token ids, decoded once per finished response, as vLLM's detokenizer makes it.

vLLM detokenizes every request token by token (``vllm/v1/engine/detokenizer.py``:
``FastIncrementalDetokenizer``, a ``tokenizers.decoders.DecodeStream`` primed with the prompt). On a
small model that costs ~14 % of the engines' time (docs/results.md, "Where w1's generation goes"),
for text nobody reads until the response is finished. ``response_texts`` gives the same text from
two batched decodes, and the engines ask vLLM for none (``detokenize=False``) where nothing needs it
while the request runs (single-turn; multi-turn turns end on stop strings that vLLM matches on text).

The same text, two ways:
- a response whose decoded text holds no U+FFFD (valid UTF-8 throughout, the usual case): the text
  its tokens add to the last prompt tokens' text, from the raw tokenizer's batched decode (not
  transformers' ``decode``, which would also apply ``clean_up_tokenization_spaces``). After its
  prompt, as the stream is primed: a SentencePiece-style "▁word" there is " word", alone "word";
- a response with bytes that make no character (cut at the end by the length budget, or invalid
  in between): vLLM's stream itself, token by token (``_streamed``). Its text there is not a
  function of the whole decode: it holds back bytes of a character still to come, and with a
  byte-fallback tokenizer a later byte can turn text it already emitted into U+FFFDs, where vLLM
  restarts the stream without the prompt and the held bytes are lost.
``tests/integration/test_detokenize.py`` checks the equality against vLLM's own output on a
byte-level BPE and on Llama-2- and Gemma-style SentencePiece BPEs with byte fallback, where most
responses hit one of these cases.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens a clean response is decoded after: enough for the context a decoder looks at (one
# UTF-8 character is at most 4 byte tokens; SentencePiece's leading-space rule needs one token).
PROMPT_CONTEXT = 8
REPLACEMENT = "\ufffd"
INVALID_PREFIX = "Invalid prefix encountered"  # tokenizers' error, as vLLM's detokenizer matches it


def fast_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` under a transformers fast tokenizer (the one vLLM's fast
    detokenizer uses); None for a slow tokenizer, which vLLM detokenizes another way."""
    from transformers import PreTrainedTokenizerFast

    return tokenizer.backend_tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else None


def response_texts(raw: Any, prompts: list[list[int]], responses: list[list[int]],
                   skip_special_tokens: bool = True) -> list[str]:
    """The text of each response after its prompt (``raw``: a ``tokenizers.Tokenizer``), as
    vLLM's incremental detokenizer gives it at the end of the request (module docstring)."""
    contexts = [list(p[-PROMPT_CONTEXT:]) for p in prompts]
    responses = [list(r) for r in responses]
    whole = raw.decode_batch([c + r for c, r in zip(contexts, responses)], skip_special_tokens)
    before = raw.decode_batch(contexts, skip_special_tokens)
    return [text[len(prefix):] if REPLACEMENT not in text and text.startswith(prefix)
            else _streamed(raw, list(prompt), response, skip_special_tokens)
            for prompt, response, text, prefix in zip(prompts, responses, whole, before)]


def _streamed(raw: Any, prompt: list[int], response: list[int], skip_special_tokens: bool) -> str:
    """vLLM's ``FastIncrementalDetokenizer`` over one response: a ``DecodeStream`` primed with the
    prompt, stepped token by token; restarted without the prompt on an invalid prefix, nothing
    emitted for an id it cannot take (``_protected_step``)."""
    from tokenizers.decoders import DecodeStream

    stream, text = DecodeStream(ids=prompt, skip_special_tokens=skip_special_tokens), []
    for token in response:
        try:
            piece = stream.step(raw, token)
        except (OverflowError, TypeError):  # an id the tokenizer cannot take: vLLM logs it and emits nothing
            piece = None
        except Exception as e:  # as vLLM: only the invalid prefix is recovered from, the rest re-raised
            if not str(e).startswith(INVALID_PREFIX):
                raise
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            piece = stream.step(raw, token)
        text.append(piece or "")
    return "".join(text)
