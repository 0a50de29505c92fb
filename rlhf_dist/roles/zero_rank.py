"""One DeepSpeed ZeRO data-parallel rank (``DeepSpeedRank``), what every trainer role shares.

Each Ray actor is one data-parallel rank. ``setup`` joins torch.distributed
(gloo on CPU, nccl on GPU) and wraps the model with ``deepspeed.initialize``.
Every rank receives an equal shard of the batch and cuts it into the same number of
micro-batches (a fixed number of rows, or as many as the largest token budget needs on
any rank), so under ZeRO-3 all ranks run the same number of forward passes (their
parameter all-gathers must pair up).

A minibatch's loss is normalised by the minibatch's own totals (its valid tokens or
sequences, summed over all ranks), not per micro-batch: each micro-batch contributes its
sum divided by that total, so the gradient of a minibatch is the same however it is cut
(micro-batch size, token budget, packing, number of ranks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from rlhf_dist.config import ModelConfig, TrainerConfig, TrainerPlan
from rlhf_dist.core.experience import Experience, TensorRows, minibatch_rows, split_sizes
from rlhf_dist.core.packing import budget_micro_batches
from rlhf_dist.core.schedule import lr_multiplier
from rlhf_dist.core.seeds import MINIBATCH_ORDER, derive_seed
from rlhf_dist.models.modeling import (
    moe_block_classes,
    response_logprobs,
    write_model_dir,
)
from rlhf_dist.roles.endpoint import node_endpoint
from rlhf_dist.roles.reshard import checkpoint_classes, universal_checkpoint, weights_only_loads
from rlhf_dist.roles.spec import RankSpec
from rlhf_dist.weight_sync.transport import ParamSpec, bucket_bounds

CHECKPOINT_TAG = "state"  # DeepSpeed's sub-directory of a trainer checkpoint
ADAPTER_DIR = "adapter"  # the sub-directory of an exported model that holds its LoRA adapters (peft's format)


def _spec(name: str, p: torch.nn.Parameter) -> ParamSpec:
    """(name, dtype, full shape) of a parameter, partitioned by ZeRO-3 or not."""
    shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
    return ParamSpec(name, str(p.dtype).removeprefix("torch."), shape)


def gathered(params):
    """A context in which these parameters are full: DeepSpeed's ZeRO-3 gather of the partitioned ones
    (a collective: every rank enters it with the same parameters), nothing otherwise."""
    import deepspeed

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(partitioned) if partitioned else contextlib.nullcontext()


def safe_checkpoint_engine(ds_config):
    """DeepSpeed's torch checkpoint engine, loading with ``torch.load(weights_only=True)``.

    DeepSpeed loads its own checkpoints with ``weights_only=False``, i.e. by unpickling
    arbitrary objects. Ours hold only tensors, containers and the three plain DeepSpeed
    classes below, so everything else is refused: a tampered checkpoint cannot run code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = checkpoint_classes()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(ds_config)


def deepspeed_config(cfg: TrainerConfig, plan: TrainerPlan, dtype: str) -> dict:
    """The trainer's micro-batch loop, not DeepSpeed's counter, marks the accumulation boundary
    (``set_gradient_accumulation_boundary``) and scales the loss, so the batch sizes below are
    bookkeeping only. In bfloat16 the parameters and activations are bf16 and the master weights and
    optimizer state fp32 (DeepSpeed's bf16 mode); with ZeRO 1-3 the micro-batches' gradients also
    add up in fp32 (``grad_accum_dtype``: DeepSpeed's default is the parameters' bf16, whose 8-bit
    mantissa would make an update depend on how its batch was cut). ZeRO-0 cannot (DeepSpeed 0.19
    refuses bf16 parameters with fp32 accumulation outside ZeRO) and accumulates in bf16."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    precision: dict = {"bf16": {"enabled": dtype == "bfloat16"}}
    if dtype == "bfloat16" and cfg.zero_stage >= 1:
        precision["data_types"] = {"grad_accum_dtype": "fp32"}
    return {
        "train_batch_size": plan.per_rank_minibatch * cfg.world_size,
        "train_micro_batch_size_per_gpu": plan.per_rank_minibatch // plan.grad_accum_steps,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        **precision,
        # We pass a torch AdamW (DeepSpeed's fused Adam needs CUDA).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def _stat_weight(rows: TensorRows) -> float:
    """The weight of a micro-batch's mean stats: its valid response tokens, or its rows (pairs)."""
    return float(rows.response_mask.sum()) if isinstance(rows, Experience) else float(len(rows))


class DeepSpeedRank:
    """Shared set-up of one ZeRO data-parallel rank; subclasses own the model and loss."""

    def __init__(self, *, spec: RankSpec, cfg: TrainerConfig, model_cfg: ModelConfig, plan: TrainerPlan) -> None:
        self.cfg, self.model_cfg, self.plan = cfg, model_cfg, plan
        self.model_path, self.rank, self.device = spec.model_path, spec.rank, spec.device
        self.seed, self.collective_timeout_s = spec.seed, spec.timeout_s
        self.engine = None
        self.bucket_bytes = 0  # ZeRO-3 gathers (and weight-sync broadcasts) of about this many bytes

    def endpoint(self) -> tuple[str, int]:
        return node_endpoint()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the data-parallel group and build the DeepSpeed engine; returns the parameter count."""
        import deepspeed

        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.cfg.world_size), LOCAL_RANK="0",
        )
        if self.device == "cuda":
            torch.cuda.set_device(0)  # Ray exposes exactly this actor's GPU
        # DeepSpeed's CPU shared-memory all-reduce serves only its inference kernels, never
        # training. Loading it probes compilers and JIT-builds a C++ op under a file lock on every
        # rank, and a rank killed while holding that lock (a run stopped during start-up) leaves
        # every later run waiting on it until timeouts.actor_start_s.
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
        # No shorter than any wait the controller allows (config.trainer_collective_timeout_s): past it
        # NCCL's watchdog kills the process.
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device == "cuda" else "gloo",
            timeout=timedelta(seconds=self.collective_timeout_s),
        )
        torch.manual_seed(self.seed)  # freshly initialised heads are identical on every rank
        model = self.build_model()
        if blocks := moe_block_classes(model):
            # Under ZeRO-3 each MoE block is gathered whole (router and experts) in one fetch.
            # transformers 5 keeps a block's experts as stacked tensors of one module, gathered
            # whole whatever the routing, so two ranks routing apart do not hang (measured, ZeRO-3
            # on two ranks); the flag (DeepSpeed's default for Mixtral and Qwen2/3-MoE blocks only)
            # saves the per-submodule fetches, and keeps a model whose experts are a list of
            # modules, fetched only where routed, from all-gathers that never pair up.
            deepspeed.utils.set_z3_leaf_modules(model, blocks)
        torch.manual_seed(self.seed + self.rank)
        trained = [p for p in model.parameters() if p.requires_grad]  # all but a LoRA model's frozen base
        if self.cfg.offload_optimizer:
            # The optimizer step runs on CPU: DeepSpeed's vectorised AdamW (JIT-built C++ op).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                trained, lr=self.lr, weight_decay=self.cfg.weight_decay, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(s, self.cfg.warmup_steps, self.plan.optimizer_steps, self.cfg.lr_schedule),
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule,
            config=deepspeed_config(self.cfg, self.plan, self.model_cfg.dtype),
        )
        self.engine.checkpoint_engine = safe_checkpoint_engine(self.engine._config)
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())

    def pid(self) -> int:
        return os.getpid()

    def probe_dir(self, directory: str, token: str) -> tuple[str, int, bool]:
        """Whether this rank sees the driver's probe file ``.probe-<token>`` in ``directory`` (the
        checkpoints it will write there), after leaving its own, ``.probe-<token>-<pid>``, for the
        driver to see: (this node's IP, this process's id, seen)."""
        root = Path(directory)
        seen = (root / f".probe-{token}").is_file()
        if seen:
            (root / f".probe-{token}-{os.getpid()}").write_text(f"{self.rank}\n")
        import ray

        return ray.util.get_node_ip_address(), os.getpid(), seen

    def save_checkpoint(self, directory: str) -> None:
        """Model, optimizer, LR schedule and step counters of every rank (DeepSpeed's format, each
        rank its partition) and this rank's torch RNG state (safetensors). A collective: all ranks
        call it; the directory must be one every rank can write (a shared filesystem across nodes)."""
        from safetensors.torch import save_file

        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)
        save_file({"cpu": torch.get_rng_state()}, str(Path(directory) / f"rng_rank{self.rank}.safetensors"))

    def load_checkpoint(self, directory: str, universal: str = "") -> int:
        """Restore what ``save_checkpoint`` wrote; returns the optimizer steps taken so far.

        ``universal``: the checkpoint's universal form (``convert_checkpoint``), for one written
        with another world size or ZeRO stage; a rank the checkpoint did not have takes rank 0's
        RNG state."""
        from safetensors.torch import load_file

        self.engine._config.load_universal_checkpoint = bool(universal)  # DeepSpeed reads it at each load
        try:
            with weights_only_loads() if universal else contextlib.nullcontext():
                path, _ = self.engine.load_checkpoint(
                    universal or directory, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        rng = Path(directory) / f"rng_rank{self.rank}.safetensors"
        if universal and not rng.exists():
            rng = Path(directory) / "rng_rank0.safetensors"
        torch.set_rng_state(load_file(str(rng))["cpu"])
        return self.engine.global_steps

    def convert_checkpoint(self, directory: str) -> str:
        """The universal form of the DeepSpeed checkpoint in ``directory``, made beside it once
        (``reshard.universal_checkpoint``): what ``load_checkpoint`` reads onto another shape."""
        return universal_checkpoint(directory, CHECKPOINT_TAG)

    # Subclass hooks: the model this rank trains and its learning rate.
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def adapter_writer(self) -> Callable[[Path], None] | None:
        """What writes this rank's adapters as a directory of their own beside the exported model, or
        None: a subclass hook, called on every rank (it may gather), whose result rank 0 uses."""
        return None

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step of ``_train``."""

    def _logprobs(
        self, micro: Experience, temperature: float, entropy_grad: bool = True, router_aux: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(logprobs, entropy), each (b, T), of a micro-batch on this rank's device (``entropy_grad``
        False: the entropy is a metric only); with ``router_aux`` also the routers' load-balancing
        loss of this forward pass (a mixture-of-experts model). A micro-batch with ``routing``
        (algo.routing_replay) is routed as the engine routed it."""
        return response_logprobs(self.engine, micro, temperature, with_entropy=True, packed=self.cfg.packing,
                                 chunk_tokens=self.cfg.logprob_chunk_tokens, entropy_grad=entropy_grad,
                                 routing=micro.routing, router_aux=router_aux, agree_chunks=self._agree_chunks)

    def _agree_chunks(self, chunks: int) -> int:
        """The most logprob chunks any rank's micro-batch needs: under ZeRO-3 each rank runs as many
        (``modeling.head_outputs``: each call of the head gathers its weight, a collective)."""
        if self.cfg.zero_stage < 3 or self.cfg.world_size == 1:
            return chunks
        return int(self._all_reduce([float(chunks)], "max")[0])

    def _to_device(self, rows: TensorRows) -> TensorRows:
        return rows.map_tensors(lambda t: t.to(self.engine.device))

    def _minibatches(self, exp: TensorRows, epoch: int) -> list[TensorRows]:
        """This rank's part of each minibatch of this epoch over ``exp``, the whole batch (every
        rank gets it all): the batch shuffled by a generator keyed on (seed, optimizer steps so
        far, epoch), a different order every step, reproducible from the state, and each
        minibatch dealt across the ranks (``minibatch_rows``: the same minibatches on any number
        of ranks)."""
        key = derive_seed(MINIBATCH_ORDER, self.seed, self.engine.global_steps, epoch)
        world = self.cfg.world_size
        parts = minibatch_rows(len(exp), self.plan.per_rank_minibatch * world, world, self.rank,
                               torch.Generator().manual_seed(key))
        return [exp.select(rows) for rows in parts]

    def _shard(self, rows: TensorRows) -> torch.Tensor:
        """This rank's contiguous share of a whole batch's rows (as ``TensorRows.split`` deals them)."""
        sizes = split_sizes(len(rows), self.cfg.world_size)
        start = sum(sizes[: self.rank])
        return torch.arange(start, start + sizes[self.rank])

    def _gather_rows(self, index: torch.Tensor, values: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The (num_rows, ...) tensor of a whole batch whose rows ``index`` this rank computed as
        ``values``, the other ranks the rest (each row on exactly one rank): a sum over ranks."""
        full = torch.zeros((num_rows, *values.shape[1:]), dtype=values.dtype)
        full[index] = values.cpu()
        if self.cfg.world_size == 1:
            return full
        import torch.distributed as dist

        full = full.to(self.engine.device)
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
        return full.cpu()

    # Stats that are parts of a minibatch's loss (``accumulate``).
    LOSS_STATS = ("loss", "policy_loss", "kl_loss", "value_loss")

    def _train(self, exp: TensorRows, epochs: int, loss_fn) -> dict[str, float]:
        """Epochs x minibatches, one optimizer step per minibatch (``accumulate``, then DeepSpeed's step)."""
        self.engine.train()
        sums: dict[str, float] = {}  # each stat's value per minibatch, summed over minibatches
        minibatches = 0
        for epoch in range(epochs):
            for minibatch in self._minibatches(exp, epoch):
                for key, value in self.accumulate(minibatch, loss_fn).items():
                    sums[key] = sums.get(key, 0.0) + value
                self.engine.step()
                self.after_optimizer_step()
                minibatches += 1
        out = {k: v / minibatches for k, v in sums.items()}
        out["lr"] = self.engine.get_lr()[0]
        if self.device == "cuda":
            # Engines sharing this GPU (colocated) wake into it next: hand back the blocks the
            # caching allocator keeps from the update's activations, or the wake-up may not fit.
            torch.cuda.empty_cache()
        return out

    def accumulate(self, minibatch: TensorRows, loss_fn) -> dict[str, float]:
        """Forward and backward passes over this rank's micro-batches of a minibatch, leaving its
        gradient accumulated for the optimizer step; returns the minibatch's stats.

        ``loss_fn(micro, totals)`` returns the micro-batch's part of the minibatch's loss,
        normalised by ``totals`` (``_totals``: the minibatch's tokens and sequences on all ranks),
        and its stats. DeepSpeed averages gradients over ranks, hence the factor world_size: the
        gradient is exactly the minibatch loss's, whatever the micro-batches. The stats are the
        whole minibatch's, the same on every rank (summed over ranks: a collective): those in
        ``LOSS_STATS`` are such parts, summed into the minibatch's loss; the others are means,
        weighted by tokens (or rows)."""
        totals = self._totals(minibatch)
        micros = self._micro_batches(minibatch)
        parts: dict[str, float] = {}
        weights: dict[str, float] = {}
        for k, (index, filler) in enumerate(micros):
            micro = self._to_device(minibatch.select(index))
            if filler and isinstance(micro, Experience):
                micro = micro.with_fields(row_index=None)  # not a row of the batch: no old logprobs from it
            self.engine.set_gradient_accumulation_boundary(k == len(micros) - 1)
            loss, stats = loss_fn(micro, totals)
            self.engine.backward(loss * (0.0 if filler else float(self.cfg.world_size)), scale_wrt_gas=False)
            if filler:
                continue
            weight = _stat_weight(micro)
            for key, value in stats.items():
                w = 1.0 if key in self.LOSS_STATS else weight
                parts[key] = parts.get(key, 0.0) + w * value
                weights[key] = weights.get(key, 0.0) + w
        keys = sorted(parts)  # the same on every rank: every rank has a real micro-batch
        summed = self._all_reduce([parts[k] for k in keys] + [weights[k] for k in keys], "sum")
        return {key: summed[i] if key in self.LOSS_STATS else summed[i] / summed[len(keys) + i]
                for i, key in enumerate(keys)}

    def _totals(self, minibatch: TensorRows) -> dict[str, float]:
        """The minibatch's valid response tokens and sequences (rows, or pairs), summed over ranks."""
        tokens = float(minibatch.response_mask.sum()) if isinstance(minibatch, Experience) else 0.0
        tokens, sequences = self._all_reduce([tokens, float(len(minibatch))], "sum")
        return {"tokens": tokens, "sequences": sequences}

    def _micro_batches(self, rows: TensorRows) -> list[tuple[torch.Tensor, bool]]:
        """(row indices, filler) of this rank's micro-batches of ``rows``: ``micro_batch_size`` rows
        each, in order, or with ``max_tokens_per_micro_batch`` as many as that token budget needs
        on the rank needing the most (``packing.budget_micro_batches``). A filler repeats the
        shortest row where this rank has fewer rows than micro-batches: it runs the forward and
        backward passes the other ranks' collectives wait for, with a loss weight of 0.
        A collective when a token budget is set: every rank calls it."""
        budget = self.cfg.max_tokens_per_micro_batch
        if not budget:
            size = self.cfg.micro_batch_size
            return [(torch.arange(i, min(i + size, len(rows))), False) for i in range(0, len(rows), size)]
        lengths = rows.sequence_lengths()
        (count,) = self._all_reduce([float(len(budget_micro_batches(lengths, budget)))], "max")
        shortest = min(range(len(lengths)), key=lambda i: (lengths[i], i))
        return [
            (torch.tensor(part or [shortest], dtype=torch.long), not part)
            for part in budget_micro_batches(lengths, budget, int(count))
        ]

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        """``values`` summed (op "sum") or maximised ("max") over the data-parallel ranks."""
        if self.cfg.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def _per_row(self, rows: TensorRows, fn) -> list[torch.Tensor]:
        """``fn(micro)`` of each micro-batch (``_micro_batches``; a forward pass with no gradient),
        its (b, ...) outputs put back in the rows' order: one tensor per output of ``fn``."""
        parts = []
        for index, filler in self._micro_batches(rows):
            out = fn(self._to_device(rows.select(index)))
            if not filler:
                parts.append((index, out if isinstance(out, tuple) else (out,)))
        order = torch.cat([index for index, _ in parts]).argsort()
        return [torch.cat([o[k].cpu() for _, o in parts])[order] for k in range(len(parts[0][1]))]

    def exports(self) -> list[tuple[str, tuple[torch.nn.Parameter, ...], Callable[[], torch.Tensor]]]:
        """What the engines and the exported model receive, in ``named_parameters`` order (a tied tensor
        once, under its first name): (name, the parameters its value is computed from, the first
        giving its dtype and shape, a function computing it while they are gathered). Here every
        parameter as it is; a policy with LoRA adapters merges them (``models.lora.merged_exports``)."""
        return [(name, (p,), lambda p=p: p.data) for name, p in self.engine.module.named_parameters()]

    def sync_exports(self) -> list[tuple[str, tuple[torch.nn.Parameter, ...], Callable[[], torch.Tensor]]]:
        """What a weight sync sends, as ``exports``: here the same tensors as the exported model."""
        return self.exports()

    def weight_specs(self) -> list[ParamSpec]:
        """(name, dtype, full shape) of every tensor a weight sync sends (``sync_exports``)."""
        return [_spec(name, params[0]) for name, params, _ in self.sync_exports()]

    def _full_params(self, bucket_bytes: int = 0, sync: bool = False):
        """(name, full tensor) of every tensor of ``exports`` (``sync``: of ``sync_exports``). Under ZeRO-3
        the parameters are gathered a bucket at a time (``weight_sync.transport.bucket_bounds``; 0: one at a
        time), each gather a collective on every rank, and a tensor is full only until the generator
        leaves its bucket."""
        exports = self.sync_exports() if sync else self.exports()
        sizes = [_spec(name, params[0]).nbytes for name, params, _ in exports]
        # The partition the weight senders derive from the same specs: a bucket's gather is its broadcast.
        for start, end in bucket_bounds(sizes, bucket_bytes):
            with gathered([p for _, params, _ in exports[start:end] for p in params]):
                for name, _, value in exports[start:end]:
                    yield name, value()

    def save_model(self, path: str, extra_files: dict[str, str] | None = None, replace: bool = False) -> str:
        """Write the trained model as a Hugging Face directory (safetensors + config + tokenizer,
        plus ``extra_files``), atomically (``replace``: swapping out an existing one); ZeRO-3
        parameters are gathered. All ranks must call this (the gather is a collective); rank 0
        writes and returns the path, the others ""."""
        module = self.engine.module
        state: dict[str, torch.Tensor] = {}
        for name, full in self._full_params(self.bucket_bytes):  # every rank iterates: the ZeRO-3 gathers pair up
            if self.rank == 0:
                # A copy now: a ZeRO-3 parameter is partitioned again once the generator moves on.
                state[name] = full.detach().cpu().clone()
        write_adapter = self.adapter_writer()  # every rank: it may gather too
        if self.rank != 0:
            return ""

        def write(tmp):
            from transformers import AutoTokenizer

            module.save_pretrained(tmp, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(tmp)
            for file_name, text in (extra_files or {}).items():
                (tmp / file_name).write_text(text)
            if write_adapter is not None:
                write_adapter(tmp / ADAPTER_DIR)

        return str(write_model_dir(path, write, replace))
