"""Model loading and the forward passes shared by the trainer, critic and reference roles.

Every role loads models through ``from_pretrained``, so a hub id or a local
directory of a real model works exactly like the embedded tiny default.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from rlhf_dist.core.experience import Experience, RankingBatch, TensorRows, collate, pad_sequences
from rlhf_dist.core.moe import load_balancing_loss
from rlhf_dist.core.packing import ScoreLayout, TokenLayout, score_layout, token_layout
from rlhf_dist.core.stats import entropy_from_logits, logprobs_from_logits
from rlhf_dist.models.routing import RoutingReplay, layout_routing
from rlhf_dist.registry import TASKS
from rlhf_dist.tasks.base import load_task

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def resolve_model_path(path: str, cache_dir: str, key: str = "model.path") -> str:
    """An embedded model name (a built-in task's tiny policy: ``TaskEntry.model``, e.g. "tiny") -> its
    directory, built and cached on first use; an existing local path (or one starting with / . ~) ->
    its absolute path, which must be a Hugging Face model directory; anything else is a hub id, whose
    config.json is fetched now (or found in the hub cache). A path that cannot be used raises
    FileNotFoundError: the commands print it as one line naming ``key`` (the config key the path
    came from), before any actor starts."""
    task_name = {entry.model: name for name, entry in TASKS.items()}.get(path)
    if task_name is not None:
        from rlhf_dist.models import tiny  # the builder imports transformers and tokenizers: only when used

        task = load_task(task_name)
        root = Path(cache_dir) if cache_dir else tiny.cache_root()
        return str(tiny.build_task_policy(task, root / task.recipe.name))
    local = Path(path).expanduser()
    if path.startswith(("/", ".", "~")) or local.exists():
        if not local.exists():
            raise FileNotFoundError(f"{key}={path!r}: does not exist")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{key}={path!r}: not a Hugging Face model directory (no config.json)")
        return str(local.resolve())  # absolute: actors need not share the driver's working directory
    _check_hub_id(path, key)
    return path


def _check_hub_id(path: str, key: str) -> None:
    # Without this, a typo fails inside from_pretrained with a traceback, after a minute of retries offline.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        hf_hub_download(path, "config.json")
    except HFValidationError as e:
        raise FileNotFoundError(f"{key}={path!r}: neither a local path nor a hub id ({e})") from e
    except OSError as e:  # not on the hub, gated, offline and not cached, no network
        raise FileNotFoundError(
            f"{key}={path!r}: not a local path, and the Hugging Face hub (or its cache) has no such "
            f"model ({type(e).__name__})"
        ) from e


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def token_vocab_size(path: str) -> int:
    """Token ids both the tokenizer and the model of ``path`` know (vLLM refuses an id past the
    tokenizer's; a model's embedding may be padded past it, e.g. Qwen2.5)."""
    from transformers import AutoConfig, AutoTokenizer

    return min(len(AutoTokenizer.from_pretrained(path)), AutoConfig.from_pretrained(path).get_text_config().vocab_size)


def load_causal_lm(path: str, dtype: str, gradient_checkpointing: bool = False) -> nn.Module:
    """A causal LM whose forward also computes token logprobs (``enable_token_outputs``), checked
    against its own logits on a probe batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_token_outputs(model)
    check_token_outputs(model, path)
    return model


def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The classes of ``model``'s mixture-of-experts blocks, in first-seen order: modules with a
    child named ``experts`` (transformers' name for a block's experts in its MoE families)."""
    return list(dict.fromkeys(type(m) for m in model.modules() if "experts" in m._modules))


def enable_token_outputs(model: nn.Module) -> nn.Module:
    """Give a causal LM's forward a second mode: called with ``layout=`` (a ``TokenLayout``), it
    returns the logprobs (M,) of the layout's response tokens, and their entropies with
    ``with_entropy``, from the backbone's hidden states at exactly those positions, in chunks of
    ``chunk_tokens`` (0: one chunk), at ``temperature``. Logits are never computed at prompt or
    padding positions, and with chunks the full (M, V) float32 logits never exist at once: each
    chunk's are recomputed in the backward pass (activation checkpointing) instead of kept.

    A mixture-of-experts model takes two more arguments: ``routing``, (R * L, layers, k) expert
    ids of the layout's tokens (``routing.layout_routing``) that its routers then use
    (``routing.RoutingReplay``; None: they choose), and ``router_aux``: then it returns
    (outputs, the routers' load-balancing loss over the layout's real tokens).

    The forward is replaced on the instance, so parameter names, ``save_pretrained`` and the
    weight sync are untouched, and DeepSpeed's engine (whose ZeRO-3 hooks gather parameters as
    each submodule runs) calls it like the original. Without ``layout`` it is the original."""
    plain_forward = model.forward
    text_config = model.config.get_text_config()
    transform = logit_transform(text_config)
    replay = RoutingReplay(model) if moe_block_classes(model) else None

    def forward(*args, layout: TokenLayout | None = None, temperature: float = 1.0, with_entropy: bool = False,
                chunk_tokens: int = 0, entropy_grad: bool = True, routing: torch.Tensor | None = None,
                router_aux: bool = False, agree_chunks: Callable[[int], int] | None = None, **kwargs):
        if replay is None and (routing is not None or router_aux):
            raise ValueError(f"{type(model).__name__} has no mixture-of-experts routers to replay or balance")
        if replay is not None:
            replay.set(routing)  # every forward sets it: None is the routers' own choice
        if layout is None:
            return plain_forward(*args, **kwargs)
        out = model.base_model(
            input_ids=layout.input_ids, attention_mask=layout.attention_mask, position_ids=layout.position_ids,
            use_cache=False,  # with a cache transformers would not read packed sequences from the position ids
            **({"output_router_logits": True} if router_aux else {}),
        )
        hidden = out.last_hidden_state.flatten(0, 1)[layout.source]
        outputs = head_outputs(model.get_output_embeddings(), hidden, layout.labels, temperature, transform,
                               with_entropy, chunk_tokens, entropy_grad, agree_chunks)
        if not router_aux:
            return outputs
        real = hidden.new_zeros(layout.input_ids.numel(), dtype=torch.float).index_fill_(0, layout.tokens, 1.0)
        return outputs, load_balancing_loss(out.router_logits, text_config.num_experts_per_tok, real)

    model.forward = forward
    model.routing_replay = replay  # its counts: how often a replayed routing differed from the routers' own
    return model


@dataclass(frozen=True)
class LogitTransform:
    """What a model's own forward does to its output head's logits before returning them:
    ``logits * scale``, then, with ``softcap``, ``softcap * tanh(logits / softcap)`` (no family
    both scales and caps, so the order is moot). The default is the identity."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# model_type -> the factor its CausalLM forward multiplies the head's logits by, read from its text
# config (transformers' models/<type>/modeling_<type>.py; vLLM's implementation of each applies
# the same through LogitsProcessor(scale=...)). Not listed: 1. The same key means opposite things:
# Granite divides by `logits_scaling`, HyperCLOVAX multiplies by it, hence a table by family.
LOGIT_SCALES: dict[str, Callable[[PretrainedConfig], float]] = {
    "granite": lambda c: 1 / c.logits_scaling,
    "granite_swa": lambda c: 1 / c.logits_scaling,
    "granitemoe": lambda c: 1 / c.logits_scaling,
    "granitemoe_swa": lambda c: 1 / c.logits_scaling,
    "granitemoeshared": lambda c: 1 / c.logits_scaling,
    "granitemoehybrid": lambda c: 1 / c.logits_scaling,
    "minicpm3": lambda c: 1 / c.logits_scaling,  # divides the hidden states before its bias-free head: the same
    "hyperclovax": lambda c: c.logits_scaling,
    "cohere": lambda c: c.logit_scale,
    "cohere2": lambda c: c.logit_scale,
    "cohere2_moe": lambda c: c.logit_scale,
    "falcon_h1": lambda c: c.lm_head_multiplier,
}


def logit_transform(text_config: PretrainedConfig) -> LogitTransform:
    """The output transform of the model whose text config (``config.get_text_config()``) this is:
    its family's ``LOGIT_SCALES`` entry, and ``final_logit_softcapping`` wherever the config has
    one (every family that defines the key caps with it: Gemma 2/3/3n/4, VaultGemma, nanochat).
    ``check_token_outputs`` refuses at start a model whose logits this does not reproduce."""
    scale = LOGIT_SCALES.get(text_config.model_type)
    return LogitTransform(
        scale=scale(text_config) if scale else 1.0,
        softcap=getattr(text_config, "final_logit_softcapping", None),  # most configs have no such key
    )


def head_outputs(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float,
    transform: Callable[[torch.Tensor], torch.Tensor], with_entropy: bool, chunk_tokens: int,
    entropy_grad: bool = True, agree_chunks: Callable[[int], int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logprobs (M,) of ``labels`` (and entropies (M,) with ``with_entropy``) under
    ``transform(head(hidden))`` / temperature, ``hidden`` (M, H): the model's own logits
    (``transform``: its ``logit_transform``, in float32) at that temperature, computed
    ``chunk_tokens`` rows at a time (0: all at once). With gradients, each chunk is checkpointed:
    only its inputs are kept, and its logits are recomputed in the backward pass. ``entropy_grad``
    False: the entropies are a metric only (no entropy bonus), computed without a graph, so
    nothing of them is kept.

    ``agree_chunks`` (ZeRO-3 over several ranks): maps this rank's number of chunks to the most
    any rank needs (a collective). ZeRO-3 gathers the head's weight in every call of the head, and
    again in the backward pass, so every rank must call it as often: a rank with fewer chunks
    adds empty ones, which take part in the backward pass (through a zero added to the output)."""
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, y: torch.Tensor):
        logits = head(h).float()  # the module, not its weight: ZeRO-3 gathers the weight in its hook
        logits = transform(logits) / temperature
        lp = logprobs_from_logits(logits, y)
        if not with_entropy:
            return lp
        if entropy_grad:
            return lp, entropy_from_logits(logits)
        with torch.no_grad():
            return lp, entropy_from_logits(logits)

    chunks = max(math.ceil(len(hidden) / chunk_tokens), 1) if chunk_tokens else 1
    if agree_chunks is not None and chunk_tokens:  # unchunked, every rank calls the head once: nothing to agree
        chunks = agree_chunks(chunks)
    if chunks == 1:
        return chunk(hidden, labels)
    pieces = list(zip(hidden.split(chunk_tokens), labels.split(chunk_tokens))) if len(hidden) else []
    empty = chunks - len(pieces)
    pieces += [(hidden[:0], labels[:0])] * empty
    parts = [checkpoint(chunk, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, y)
             for h, y in pieces]
    lps = [p[0] if with_entropy else p for p in parts]
    # autograd skips a 1-d empty tensor in cat's backward: a sum over each empty chunk joins the graph
    lp = torch.cat(lps[: len(lps) - empty]) if empty < len(lps) else lps[0]
    if empty:
        lp = lp + 0.0 * sum(p.sum() for p in lps[len(lps) - empty :])
    if with_entropy:
        return lp, torch.cat([ent for _, ent in parts])
    return lp


PROBE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def _probe_gap(model: nn.Module, probe: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(max |got - expected|, the tolerance for the model's dtype) of ``probe()``'s pair, run in
    eval mode without gradients (the model's mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            got, expected = probe()
    finally:
        model.train(was_training)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return (got - expected).abs().max().item(), PROBE_TOLERANCE.get(dtype, 5e-2)


def check_token_outputs(model: nn.Module, label: str) -> None:
    """Compare ``enable_token_outputs``'s logprobs, padded and packed, with the model's own logits
    on a fixed probe batch of different lengths, and raise naming ``label`` if they differ: an
    architecture that transforms its logits in a way ``logit_transform`` does not know (a family
    missing from ``LOGIT_SCALES``), or whose attention ignores packed position ids, is refused at
    start, not trained wrong."""
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (7, 2, 5)]
    exp = collate([r[:2] for r in rows], [r[2:] for r in rows], pad_id=0)

    def probe(packed: bool):
        logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids,
                       use_cache=False).logits
        expected = logprobs_from_logits(_response_slice(exp, logits).float(), exp.response_ids) * exp.response_mask
        return response_logprobs(model, exp, 1.0, packed=packed, chunk_tokens=2)[0], expected

    for packed in (False, True):
        gap, tolerance = _probe_gap(model, lambda: probe(packed))
        if gap > tolerance:
            mode = "packed" if packed else "padded"
            raise ValueError(
                f"{label}: logprobs from the hidden states ({mode}) differ from the model's own logits by "
                f"{gap:.3g} on a probe batch: this architecture transforms its logits (or masks packed "
                f"sequences) in a way rlhf_dist does not reproduce"
                + ("; set trainer.packing=false" if packed else "")
            )


def load_reward_model(path: str, dtype: str) -> nn.Module:
    """A one-logit sequence classifier from ``path``: a trained reward model, or a causal-LM
    backbone whose score head is then freshly initialised (as InstructGPT started from SFT)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(dtype))
    score_pad_id(model, path, f"reward model {path!r}")
    if isinstance(getattr(model, "score", None), nn.Linear):  # transformers' decoder classifiers' head
        enable_packed_scores(model)
    return model


def enable_packed_scores(model: nn.Module) -> nn.Module:
    """Give a sequence classifier's forward a second mode: called with ``layout=`` (a
    ``ScoreLayout``, e.g. packed), it returns the (B,) scores at the layout's score positions,
    from the backbone's hidden states there (see ``enable_token_outputs`` for why the forward is
    replaced on the instance). Checked against the model's own scores on a probe batch."""
    plain_forward = model.forward

    def forward(*args, layout: ScoreLayout | None = None, **kwargs):
        if layout is None:
            return plain_forward(*args, **kwargs)
        hidden = model.base_model(
            input_ids=layout.input_ids, attention_mask=layout.attention_mask, position_ids=layout.position_ids,
            use_cache=False,
        ).last_hidden_state
        return model.score(hidden.flatten(0, 1)[layout.source])[:, 0].float()

    model.forward = forward
    model.packed_scores = True
    pad = model.config.pad_token_id
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [[t for t in torch.randint(vocab, (n,), generator=gen).tolist() if t != pad] or [1] for n in (6, 2, 4)]
    ids, mask = pad_sequences(rows, pad)
    gap, tolerance = _probe_gap(model, lambda: (
        forward(layout=score_layout(ids, mask, pad, packed=True)),
        plain_forward(input_ids=ids, attention_mask=mask).logits[:, 0].float(),
    ))
    if gap > tolerance:
        raise ValueError(f"reward model: packed scores differ from the model's own by {gap:.3g} on a probe batch; "
                         "set trainer.packing=false")
    return model


def score_pad_id(model: nn.Module, path: str, label: str) -> int:
    """The pad id of the sequence classifier ``model`` loaded from ``path``: its config's, else its
    tokenizer's (then written into the config). Transformers reads the score at the last token that
    is not the config's pad id, so inputs must be padded with exactly this id."""
    if model.config.pad_token_id is None:
        from transformers import AutoTokenizer

        pad = AutoTokenizer.from_pretrained(path).pad_token_id
        if pad is None:
            raise ValueError(
                f"{label}: neither config.json nor the tokenizer defines a pad token (the score is read at the "
                "last non-pad token); set pad_token_id in config.json"
            )
        model.config.pad_token_id = pad
    return model.config.pad_token_id


def ranking_scores(model: nn.Module, batch: RankingBatch, pad: int, packed: bool = False) -> torch.Tensor:
    """Scores (B, K) of every response of a batch of rankings in one forward pass over the responses,
    each scored once (K rows per prompt, however many comparisons they give); 0 in empty slots.
    ``pad`` is the model's pad token id (the score is read at the last non-pad token); ``packed``:
    the sequences packed (``enable_packed_scores``), the same numbers without the padding. Rows run
    slot by slot (every prompt's first response, then every second one...): for pairs, the chosen
    then the rejected exchanges, as one forward pass over both halves always has."""
    present = (batch.ranks >= 0).T.flatten()  # (K * B,) slot-major
    ids = batch.input_ids.transpose(0, 1).flatten(0, 1)[present]
    mask = batch.attention_mask.transpose(0, 1).flatten(0, 1)[present]
    if packed:
        scores = model(layout=score_layout(ids, mask, pad, packed=True))
    else:
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    slots = scores.new_zeros(len(present)).index_copy(0, present.nonzero().flatten(), scores)
    return slots.view(batch.ranks.shape[1], len(batch)).T


def write_model_dir(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Fill a temporary directory next to ``path`` with ``write`` and rename it into place, so
    ``path`` either does not exist or is complete. An existing ``path`` is never overwritten,
    unless ``replace``: then it is swapped out only once the new one is complete."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists: refusing to overwrite a saved model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = path.parent / f".{path.name}.replaced"
    try:
        write(tmp)
        tmp.chmod(0o755)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


class CriticModel(nn.Module):
    """A causal-LM backbone with a scalar value head on every position."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, layout: TokenLayout) -> torch.Tensor:
        """Values (M,) of the states before the layout's response tokens."""
        hidden = self.backbone(
            input_ids=layout.input_ids, attention_mask=layout.attention_mask, position_ids=layout.position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.value_head(hidden.flatten(0, 1)[layout.source]).squeeze(-1).float()


def load_critic(path: str, dtype: str, gradient_checkpointing: bool = False) -> CriticModel:
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(path, dtype=torch_dtype(dtype))
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic = CriticModel(backbone, backbone.config.hidden_size)
    return critic.to(torch_dtype(dtype))


def _response_slice(exp: Experience, per_position: torch.Tensor) -> torch.Tensor:
    # The output at position i predicts token i+1: response token t (column P+t) is
    # predicted by position P+t-1.
    width, steps = exp.prompt_width, exp.response_mask.shape[1]
    return per_position[:, width - 1 : width + steps - 1]


def layout_of(exp: Experience, packed: bool) -> TokenLayout:
    return token_layout(exp.input_ids, exp.attention_mask, exp.position_ids, exp.prompt_width, packed)


def response_logprobs(
    model: nn.Module, exp: Experience, temperature: float, with_entropy: bool = False, *,
    packed: bool = False, chunk_tokens: int = 0, entropy_grad: bool = True, routing: torch.Tensor | None = None,
    router_aux: bool = False, agree_chunks: Callable[[int], int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Logprobs (B, T) of the response tokens under ``model`` (logits / temperature), and their
    entropies with ``with_entropy`` (else None); 0 at padding. ``model`` is a causal LM from
    ``load_causal_lm`` (or a DeepSpeed engine around one); ``packed`` and ``chunk_tokens`` as in
    ``packing.token_layout`` and ``enable_token_outputs``: the numbers are the same either way;
    ``entropy_grad`` as in ``head_outputs``. A mixture-of-experts model: ``routing``, (B, W,
    layers, k) expert ids of the rows' tokens (-1 where not recorded), is the routing its
    routers use; ``router_aux`` adds a third output, the routers' load-balancing loss over the
    rows' real tokens (``core.moe.load_balancing_loss``: the same packed or padded).
    ``agree_chunks`` as in ``head_outputs`` (ZeRO-3 ranks call the head as often)."""
    layout = layout_of(exp, packed)
    laid = None if routing is None else layout_routing(layout, routing, exp.attention_mask)
    out = model(layout=layout, temperature=temperature, with_entropy=with_entropy, chunk_tokens=chunk_tokens,
                entropy_grad=entropy_grad, routing=laid, router_aux=router_aux, agree_chunks=agree_chunks)
    out, aux = out if router_aux else (out, None)
    logprobs, entropy = out if with_entropy else (out, None)
    logprobs, entropy = layout.scatter(logprobs), None if entropy is None else layout.scatter(entropy)
    return (logprobs, entropy, aux) if router_aux else (logprobs, entropy)


def response_values(critic: nn.Module, exp: Experience, packed: bool = False) -> torch.Tensor:
    """Values (B, T) of the states before each response token; 0 at padding."""
    layout = layout_of(exp, packed)
    return layout.scatter(critic(layout))


Rows = TypeVar("Rows", bound=TensorRows)


def micro_batches(rows: Rows, size: int) -> Iterator[Rows]:
    """Consecutive row slices of ``rows`` (an Experience, a RankingBatch), ``size`` rows each, in
    order; the last may be shorter."""
    for start in range(0, len(rows), size):
        yield rows.select(slice(start, start + size))


def in_chunks(fn: Callable[[Rows], torch.Tensor], rows: Rows, chunk: int) -> torch.Tensor:
    """Apply ``fn`` to row chunks of ``rows`` (``micro_batches``) and concatenate the (b, ...) results."""
    return torch.cat([fn(micro) for micro in micro_batches(rows, chunk)], dim=0)
