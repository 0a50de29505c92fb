"""Run by ``test_detokenize.py`` in a process of its own (vLLM in process, no Ray):

    python -m tests.integration.detokenize_check <out dir> <byte-level tokenizer dir>

For each tokenizer family (the embedded byte-level BPE; SentencePiece-style BPEs with byte fallback
as Llama 2 and Gemma build them, made here), a tiny random Llama with that tokenizer and an
in-process vLLM engine that samples responses of random tokens (a random model samples nearly
uniformly: byte tokens, special tokens, characters cut at the end), detokenized by vLLM.
Every other request samples only tokens that are whole characters alone (clean text). Prints one
JSON line per family: how many responses, how many of them differ between vLLM's text and
``models.detokenize.response_texts`` (the first few shown), and how many exercised each edge case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CORPUS = [
    "the pasta was great and the service was friendly",
    "café au lait, crème brûlée — très bien",
    "日本語のテキストと絵文字 🍝☕ mixed with words",
    "numbers 12 345 and symbols #$%&*() are here too",
] * 8
PROMPTS = ["the pasta", "café", "日本", "numbers 12", "🍝 is", "très", "and", "x"]


def sentencepiece_style(out: Path, strip_leading_space: bool) -> Path:
    """A BPE over "▁"-joined words with byte fallback (<0x00>..<0xFF>), as Llama 2's tokenizer.json
    (its decoder strips the one leading space) or Gemma's (it does not; no "▁" prepended either)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if strip_leading_space else []) + [normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if strip_leading_space else []))
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True, model_max_length=256)
    fast.save_pretrained(out)
    return out


def check(name: str, tokenizer_dir: Path, out: Path) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from rlhf_dist.models.detokenize import REPLACEMENT, fast_tokenizer, response_texts
    from rlhf_dist.models.tiny import build_random_lm

    path = build_random_lm(out / name, "llama", tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = fast_tokenizer(tokenizer)
    special = set(tokenizer.all_special_ids)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] * 16
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=96, kv_cache_memory_bytes=2**26,
              seed=0)
    # every other request samples only tokens that decode to whole characters alone: clean text (the
    # fast path), with SentencePiece's leading spaces; the others sample anything (bytes, specials)
    clean = [t for t in range(len(tokenizer)) if t not in special and REPLACEMENT not in raw.decode([t], False)]
    params = [SamplingParams(max_tokens=1 + i % 24, temperature=1.0, seed=i, ignore_eos=True,
                             allowed_token_ids=clean if i % 2 else None) for i in range(len(prompts))]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    responses = [list(o.outputs[0].token_ids) for o in outputs]
    ours = response_texts(raw, prompts, responses)
    alone = raw.decode_batch(responses, True)
    whole = raw.decode_batch([p + r for p, r in zip(prompts, responses)], True)
    differ = [{"prompt": p, "response": r, "vllm": o.outputs[0].text, "ours": t}
              for p, r, o, t in zip(prompts, responses, outputs, ours) if o.outputs[0].text != t]
    return {
        "family": name, "responses": len(responses), "differ": len(differ), "first": differ[:3],
        "clean": sum(REPLACEMENT not in w for w in whole),
        "cut_at_end": sum(w.endswith(REPLACEMENT) for w in whole),
        "with_special": sum(bool(special & set(r)) for r in responses),
        "differ_decoded_alone": sum(a != o.outputs[0].text for a, o in zip(alone, outputs)),
        "replacement_inside": sum(REPLACEMENT in o.outputs[0].text for o in outputs),
    }


def main() -> None:
    out, byte_level = Path(sys.argv[1]), Path(sys.argv[2])
    families = {
        "byte_level_bpe": byte_level,
        "sentencepiece_llama2": sentencepiece_style(out / "tok_llama2", strip_leading_space=True),
        "sentencepiece_gemma": sentencepiece_style(out / "tok_gemma", strip_leading_space=False),
    }
    for name, tokenizer_dir in families.items():
        print("DETOKENIZE " + json.dumps(check(name, tokenizer_dir, out)), flush=True)


if __name__ == "__main__":
    main()
