"""Builds the tiny default models from scratch, since nothing can be downloaded at run time.

The policy is a 2-layer Llama (hidden 128, byte-level BPE vocab 512) pretrained for a few
seconds on `tasks.make_corpus`, so it writes review-like text with a mix of positive and
negative words: a starting point the "positive reviews" reward can move. Both models are
saved with `save_pretrained` and load with the same `from_pretrained` / vLLM code paths as
real checkpoints. Builds are cached by path, atomic (temp dir + rename, `.complete` marker
written last) and deterministic given the seed.

    python -m rlhf_dist.tiny_model [path]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf_dist.tasks import make_corpus

CACHE_ENV = "RLHF_DIST_CACHE"
MODEL_NAME = "tiny-llama-v1"  # bump the suffix when the recipe below changes
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
VOCAB_SIZE = 512
CORPUS_LINES = 6000
PRETRAIN_STEPS = 300
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
NUM_THREADS = 2
_COMPLETE = ".complete"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def default_model_dir() -> pathlib.Path:
    """Where the default policy lives: `$RLHF_DIST_CACHE/tiny-llama-v1`, else under ~/.cache/rlhf_dist."""
    root = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "rlhf_dist"
    return pathlib.Path(root) / MODEL_NAME


def build_tiny_policy(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build (or reuse, if `path/.complete` exists) the tokenizer + pretrained tiny Llama policy."""
    return _build_atomically(pathlib.Path(path), seed, lambda tmp: _build_policy_into(tmp, seed))


def build_tiny_reward_model(
    path: str | os.PathLike, policy_path: str | os.PathLike, seed: int = 0
) -> pathlib.Path:
    """Build (or reuse) a randomly initialised LlamaForSequenceClassification (num_labels=1)
    with the policy's tokenizer; it exercises hosting an AutoModelForSequenceClassification."""
    policy_path = pathlib.Path(policy_path)
    if not (policy_path / _COMPLETE).exists():
        raise FileNotFoundError(
            f"policy_path={policy_path} is not a built tiny policy (no {_COMPLETE}); "
            "call build_tiny_policy(policy_path) first"
        )
    return _build_atomically(pathlib.Path(path), seed, lambda tmp: _build_reward_model_into(tmp, policy_path, seed))


def _build_atomically(path: pathlib.Path, seed: int, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    marker = f"seed={seed}\n"
    if (path / _COMPLETE).exists():
        found = (path / _COMPLETE).read_text()
        if found != marker:
            raise ValueError(
                f"{path} was built with {found.strip()!r}, not seed={seed}; use another path or delete it"
            )
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists but has no {_COMPLETE} marker (not a finished build); delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp dir next to `path` keeps the final rename on one filesystem, hence atomic.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is read by other processes and users
    try:
        build(tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors files are written owner-only
        (tmp / _COMPLETE).write_text(marker)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / _COMPLETE).exists():
                raise
            # Another process finished the same build first; keep its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _build_policy_into(out: pathlib.Path, seed: int) -> None:
    lines = make_corpus(CORPUS_LINES, seed)
    tokenizer = _train_tokenizer(lines)
    tokenizer.save_pretrained(out)
    with _seeded_cpu(seed):
        model = LlamaForCausalLM(_llama_config(tokenizer))
        _pretrain(model, tokenizer, lines, seed)
    model.save_pretrained(out)


def _build_reward_model_into(out: pathlib.Path, policy_path: pathlib.Path, seed: int) -> None:
    for name in _TOKENIZER_FILES:  # copied, not re-saved, so the files stay byte-identical
        shutil.copyfile(policy_path / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with _seeded_cpu(seed):
        model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    model.save_pretrained(out)


def _train_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer)
    # add_bos_token makes every encode (HF and vLLM prompts alike) start with <s>, as in pretraining.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=256,
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, **extra: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **extra,
    )


@contextlib.contextmanager
def _seeded_cpu(seed: int) -> Iterator[None]:
    """Seed torch and pin NUM_THREADS inside the block; the caller's RNG state and threads come back after."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(NUM_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, lines: list[str], seed: int) -> None:
    # Each line becomes "<s> line </s>": the tokenizer adds <s>, we append </s>.
    sequences = [torch.tensor(ids + [tokenizer.eos_token_id]) for ids in tokenizer(lines)["input_ids"]]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine)
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(PRETRAIN_STEPS):
        batch = [sequences[i] for i in torch.randint(len(sequences), (BATCH_SIZE,), generator=generator)]
        input_ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=tokenizer.pad_token_id)
        attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in batch], batch_first=True)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    print(
        f"[tiny_model] pretrained {PRETRAIN_STEPS} steps x {BATCH_SIZE} lines in "
        f"{time.perf_counter() - start:.1f}s, loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f} (last 20)",
        file=sys.stderr,
        flush=True,
    )


def _warmup_cosine(step: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, PRETRAIN_STEPS - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the tiny default policy (cached) and print its path.")
    parser.add_argument("path", nargs="?", type=pathlib.Path, default=None, help="default: default_model_dir()")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_policy(args.path or default_model_dir(), seed=args.seed))


if __name__ == "__main__":
    main()
