"""Memory and speed of a PPO update, padded vs packed vs checkpointed vs chunked, and weight-sync
time per tensor vs bucketed vs the raw one-buffer broadcast, on a 22 M-parameter Llama with a
32,768-token vocabulary (tied embeddings, built in code, random init).

    .venv/bin/python scripts/bench_memory.py [--out bench_out/memory] [--repeats 3] [--parts update,sync,moe,lora]

Update: one real ``PolicyTrainer`` rank (DeepSpeed ZeRO-2, world size 1, float32) per
configuration, each in a fresh process so that its peak RSS (``ru_maxrss``) is its own. The
batch: 16 responses of 3 to 600 tokens (prompts of 16), micro-batches of 8 rows, one optimizer
step of the PPO actor loss (token_mean, clip 0.2, entropy bonus 0.01, so entropies are
computed). Reported per configuration: the peak RSS of the rank, its growth over the RSS before
the update (the update's own memory: activations, logits, gradients, optimizer state), and real
tokens (prompt + response) per second of the update, the median of ``--repeats`` updates.

Weight sync: trainer rank 0's real ``GlooWeightSender`` to one receiver process over gloo, the
receiver running ``GlooWeightTransferEngine.receive_weights`` (ours) with a model whose
``load_weights`` copies each tensor into a preallocated parameter, as vLLM's default loader
does; no vLLM engine is started. Per tensor (bucket 0) vs buckets of 256 MiB, against the limit:
one gloo broadcast of a flat buffer of the same bytes. Medians of ``--repeats`` syncs.

Experts (``--parts moe``): the same update (packed, logits unchunked) on a
mixture of experts of the same shape, Qwen3-MoE with 8 experts of intermediate 512, 2 per token
(about the dense model's active parameters, twice its total), against the dense model, on ZeRO-2
and ZeRO-3, one rank and two (the batch split between them, each in its own process; the larger
rank's figures). ZeRO-3 partitions the experts with everything else and gathers each MoE block
whole as it runs (a leaf module, ``roles/zero_rank.py``): the experts' memory per rank is then
their shard plus one block at a time.

LoRA (``--parts lora``): the packed update (ZeRO-2, one rank) of full fine-tuning against LoRA at rank
8 and 64 on every projection (``model.lora``): parameters trained, update time, what the rank holds
(parameters + optimizer) and its peak RSS, the bytes a sync sends (model.lora.sync=merged: the
full weights; adapter, the default: the adapters' own tensors, the trainer's ``weight_specs``), and
the processes the default layout starts (LoRA starts no reference actor).

Writes ``<out>/memory.json`` and prints a table. Wrap it in ``flock /tmp/rlhf_heavy.lock`` on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LENGTHS = [3, 600, 9, 14, 520, 22, 31, 5, 47, 64, 96, 128, 160, 256, 7, 384]
PROMPT = 16
MICRO = 8
CONFIGS = {  # name -> (packing, logprob_chunk_tokens, gradient_checkpointing)
    "padded": (False, 0, False),
    "packed": (True, 0, False),
    "packed+ckpt": (True, 0, True),
    "packed+chunked": (True, 1024, False),  # trainer.logprob_chunk_tokens, its default
    "packed+chunked+ckpt": (True, 1024, True),
    "packed+chunked256+ckpt": (True, 256, True),
}
BUCKET_MB = 256
LORA_CONFIGS = {"full": 0, "lora r8": 8, "lora r64": 64}  # name -> model.lora.rank, each packed, ZeRO-2, one rank
# name -> (model: dense or moe, zero_stage, ranks), each packed, logits unchunked
MOE_CONFIGS = {
    "dense zero2": ("dense", 2, 1),
    "moe zero2": ("moe", 2, 1),
    "dense zero3 x2": ("dense", 3, 2),
    "moe zero3 x2": ("moe", 3, 2),
}
SHAPE = {"vocab_size": 32768, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
         "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True, "pad_token_id": 0}


def build_model(path: Path, moe: bool = False) -> Path:
    """The dense Llama (intermediate 1,024), or with ``moe`` a Qwen3-MoE of the same shape: 8
    experts of intermediate 512, 2 per token (the dense model's active MLP width)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    if moe:
        config = Qwen3MoeConfig(**SHAPE, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                                norm_topk_prob=True)
        Qwen3MoeForCausalLM(config).save_pretrained(path)
    else:
        LlamaForCausalLM(LlamaConfig(**SHAPE, intermediate_size=1024)).save_pretrained(path)
    return path


def batch(vocab: int):
    import torch

    from rlhf_dist.core.experience import collate

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (PROMPT,), generator=gen).tolist() for _ in LENGTHS]
    responses = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in LENGTHS]
    exp = collate(prompts, responses, pad_id=0)
    mask = exp.response_mask
    return exp.with_fields(
        old_logprobs=(-10.4 + 0.1 * torch.randn(mask.shape, generator=gen)) * mask,
        advantages=torch.randn(len(LENGTHS), 1, generator=gen).expand_as(mask) * mask,
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def update_main(name: str, model_path: str, repeats: int, port: int, queue, rank: int = 0, ranks: int = 1,
                zero_stage: int = 2, lora_rank: int = 0) -> None:
    import torch

    from rlhf_dist.config import AlgoConfig, LoraConfig, ModelConfig, TrainerConfig
    from rlhf_dist.config.plan import RunPlan
    from rlhf_dist.roles.spec import RankSpec
    from rlhf_dist.roles.trainer import PolicyTrainer

    torch.set_num_threads(2 if ranks == 1 else 1)
    # The expert rows: packed, logits unchunked (with chunks, ZeRO-3 ranks whose halves need different
    # numbers of chunks gather the head a different number of times, and their all-gathers mismatch)
    packing, chunk, ckpt = CONFIGS.get(name, CONFIGS["packed"])
    cfg = TrainerConfig(world_size=ranks, zero_stage=zero_stage, micro_batch_size=MICRO, lr=1e-6, packing=packing,
                        logprob_chunk_tokens=chunk, gradient_checkpointing=ckpt)
    rows = len(LENGTHS) // ranks
    plan = RunPlan(per_rank_minibatch=rows, grad_accum_steps=rows // MICRO, optimizer_steps=100,
                   rollout_batch=len(LENGTHS), minibatches_per_epoch=1)
    spec = RankSpec(rank=rank, world_size=ranks, device="cpu", seed=0, timeout_s=600.0, model_path=model_path)
    trainer = PolicyTrainer(spec=spec, cfg=cfg, model_cfg=ModelConfig(lora=LoraConfig(rank=lora_rank)), plan=plan,
                            temperature=1.0, max_new_tokens=max(LENGTHS))
    params = trainer.setup("127.0.0.1", port)
    exp = batch(trainer.engine.module.config.vocab_size)
    exp = exp.select(torch.arange(rank, len(LENGTHS), ranks))  # each rank a long and a short half
    algo = AlgoConfig(loss_agg="token_mean", entropy_coef=0.01, kl_coef=0.0, ppo_epochs=1)
    before = rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train(exp, 1, algo, 0.0)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = int(exp.attention_mask.sum())
    queue.put({"config": name, "rank": rank, "params": params, "tokens": tokens, "padded_tokens": exp.input_ids.numel(),
               "update_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times),
               "rss_before_mb": before, "peak_rss_mb": peak, "update_growth_mb": peak - before,
               # what a sync sends: model.lora.sync=adapter (the default: the adapters alone) and merged (full weights)
               "lora_rank": lora_rank, "sync_bytes": sum(spec.nbytes for spec in trainer.weight_specs()),
               "merged_bytes": sum(p[0].numel() * p[0].element_size() for _, p, _ in trainer.exports()),
               "trained_bytes": sum(p.numel() * p.element_size() for p in trainer.engine.module.parameters()
                                    if p.requires_grad),
               **held_mb(trainer.engine)})


def held_mb(engine) -> dict:
    """What this rank holds, in MB: the model's parameters (under ZeRO-3 its partitions), the
    optimizer's (DeepSpeed's flat float32 partitions and Adam's two moments), and of them the
    experts' (their stacked tensors); the largest MoE block, which ZeRO-3 gathers whole as it runs.
    The process's RSS hides these: each rank loads the whole model before DeepSpeed partitions it."""
    import torch

    from rlhf_dist.models.modeling import moe_block_classes

    def nbytes(p) -> int:  # a ZeRO-3 parameter's own partition, else the tensor
        return p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor") else p.numel() * p.element_size()

    def full_bytes(p) -> int:
        return (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()

    module, inner = engine.module, engine.optimizer.optimizer
    # ZeRO-3 keeps its float32 partitions out of the torch optimizer's param_groups between steps
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    flats = flats if flats is not None else [p for group in inner.param_groups for p in group["params"]]
    optimizer = sum(p.numel() * p.element_size() for p in flats)
    optimizer += sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor))
    blocks = [m for m in module.modules() if type(m) in moe_block_classes(module)]
    return {"params_mb": sum(nbytes(p) for p in module.parameters()) / 2**20,
            "experts_mb": sum(nbytes(p) for b in blocks for p in b.experts.parameters()) / 2**20,
            "optimizer_mb": optimizer / 2**20,
            "largest_block_mb": max((sum(full_bytes(p) for p in b.parameters()) for b in blocks), default=0) / 2**20}


class _CopyingModel:
    """Loads like vLLM's default weight loader: each tensor copied into its preallocated parameter."""

    def __init__(self, specs) -> None:
        import torch

        self.params = {s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for s in specs}

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.params[name].copy_(tensor)


def sync_main(rank: int, model_path: str, repeats: int, port: int, queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    from rlhf_dist.weight_sync.gloo import TRANSPORT, GlooReceiver, GlooUpdateInfo, GlooWeightSender
    from rlhf_dist.weight_sync.transport import ParamSpec

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    named = list(model.named_parameters())
    specs = [ParamSpec(n, str(p.dtype).removeprefix("torch."), tuple(p.shape)) for n, p in named]
    total = sum(s.nbytes for s in specs)
    results = {}
    for offset, mode in enumerate(("per_tensor", "bucketed", "raw_one_buffer")):
        bucket = BUCKET_MB * 2**20 if mode == "bucketed" else 0
        times = []
        if mode == "raw_one_buffer":
            group = stateless_init_torch_distributed_process_group("127.0.0.1", port + offset, rank, 2, backend="gloo")
            buffer = torch.ones(total, dtype=torch.uint8)
            for _ in range(repeats):
                start = time.perf_counter()
                group.broadcast(buffer, 0).wait()
                times.append(time.perf_counter() - start)
        elif rank == 0:
            sender = GlooWeightSender("127.0.0.1", port + offset, 2, 600.0, specs, bucket)
            for _ in range(repeats):
                start = time.perf_counter()
                sender.send((n, p.data) for n, p in named)
                times.append(time.perf_counter() - start)
        else:
            receiver = GlooReceiver.__new__(GlooReceiver)  # the engine's receiving end, without a vLLM model
            receiver.model, receiver.device, receiver._buckets = _CopyingModel(specs), torch.device("cpu"), {}
            receiver._group = stateless_init_torch_distributed_process_group(
                "127.0.0.1", port + offset, 1, 2, backend="gloo")
            info = GlooUpdateInfo(**TRANSPORT.update_info(specs, bucket))
            for _ in range(repeats):
                start = time.perf_counter()
                receiver.receive_weights(info)
                times.append(time.perf_counter() - start)
            got = receiver.model.params
            assert all(torch.equal(got[n], p.data) for n, p in named), f"{mode}: the received weights differ"
        results[mode] = statistics.median(times)
    if rank == 1:  # the receiver's clock: the sync is done when the last tensor is loaded
        queue.put({"bytes": total, "tensors": len(specs), "bucket_mb": BUCKET_MB, **{f"{k}_s": v for k, v in results.items()}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_updates(model_path: str, repeats: int, ctx, queue) -> list[dict]:
    updates = []
    for name in CONFIGS:
        proc = ctx.Process(target=update_main, args=(name, model_path, repeats, free_port(), queue))
        proc.start()
        updates.append(queue.get(timeout=3600))
        proc.join()
        print(f"  {name}: {updates[-1]['update_s']:.2f} s, peak RSS {updates[-1]['peak_rss_mb']:.0f} MB", flush=True)
    return updates


def run_moe(out: Path, repeats: int, ctx, queue) -> list[dict]:
    """The MOE_CONFIGS rows: per configuration its ranks' processes, the figures of the rank with
    the larger peak RSS (update time: the slower rank's)."""
    from transformers import AutoConfig

    paths = {"dense": str(build_model(out / "model")), "moe": str(build_model(out / "model-moe", moe=True))}
    rows = []
    for name, (model, stage, ranks) in MOE_CONFIGS.items():
        port = free_port()
        procs = [ctx.Process(target=update_main, args=(name, paths[model], repeats, port, queue, r, ranks, stage))
                 for r in range(ranks)]
        for proc in procs:
            proc.start()
        per_rank = [queue.get(timeout=3600) for _ in procs]
        for proc in procs:
            proc.join()
        row = dict(max(per_rank, key=lambda r: r["peak_rss_mb"]))
        config = AutoConfig.from_pretrained(paths[model])
        experts = getattr(config, "num_experts", 0)
        row.update(model=model, zero_stage=stage, ranks=ranks, update_s=max(r["update_s"] for r in per_rank),
                   tokens=sum(r["tokens"] for r in per_rank), experts=experts,
                   experts_per_token=getattr(config, "num_experts_per_tok", 0))
        rows.append(row)
        print(f"  {name}: {row['update_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def run_lora(model_path: str, repeats: int, ctx, queue) -> list[dict]:
    """The LORA_CONFIGS rows: the packed update of full fine-tuning and of LoRA at each rank, one process each."""
    from rlhf_dist.config import Config, actor_counts

    rows = []
    for name, lora_rank in LORA_CONFIGS.items():
        proc = ctx.Process(target=update_main, args=(name, model_path, repeats, free_port(), queue),
                           kwargs={"lora_rank": lora_rank})
        proc.start()
        rows.append(queue.get(timeout=3600))
        proc.join()
        cfg = Config()  # the default run's layout: LoRA takes the KL reference from the policy ranks
        cfg.model.lora.rank = lora_rank
        rows[-1]["processes"] = sum(actor_counts(cfg).values())
        print(f"  {name}: {rows[-1]['update_s']:.2f} s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def run_sync(model_path: str, repeats: int, ctx, queue) -> dict:
    port = free_port()
    procs = [ctx.Process(target=sync_main, args=(r, model_path, repeats, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    sync = queue.get(timeout=3600)
    for p in procs:
        p.join()
    sync["per_tensor_vs_raw"] = sync["per_tensor_s"] / sync["raw_one_buffer_s"]
    sync["bucketed_vs_raw"] = sync["bucketed_s"] / sync["raw_one_buffer_s"]
    return sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="update,sync,moe,lora", help="any of update, sync, moe, lora (the others' figures "
                        "are kept from an earlier memory.json in --out)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = str(build_model(out / "model"))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    earlier = json.loads((out / "memory.json").read_text()) if (out / "memory.json").exists() else {}
    updates = run_updates(model_path, args.repeats, ctx, queue) if "update" in parts else earlier.get("updates")
    sync = run_sync(model_path, args.repeats, ctx, queue) if "sync" in parts else earlier.get("weight_sync")
    experts = run_moe(out, args.repeats, ctx, queue) if "moe" in parts else earlier.get("experts")
    lora = run_lora(model_path, args.repeats, ctx, queue) if "lora" in parts else earlier.get("lora")
    result = {"model": {"vocab": 32768, "hidden": 384, "layers": 6},
              "batch": {"lengths": LENGTHS, "prompt": PROMPT, "micro_batch_size": MICRO},
              "updates": updates, "weight_sync": sync, "experts": experts, "lora": lora,
              "goals": {"packed_tokens_per_s_vs_padded": ">= 1.5", "memory_all_vs_padded": "<= 0.4",
                        "bucketed_vs_raw": "<= 1.5"}}
    if updates:
        print_updates(updates)  # adds each configuration's ratios to padded, written below
    if sync:
        print_sync(sync)
    if experts:
        print_experts(experts)
    if lora:
        print_lora(lora)
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'memory.json'}")


def print_updates(updates: list[dict]) -> None:
    padded = updates[0]
    for u in updates:
        u["tokens_per_s_vs_padded"] = u["tokens_per_s"] / padded["tokens_per_s"]
        u["update_growth_vs_padded"] = u["update_growth_mb"] / padded["update_growth_mb"]
        u["peak_rss_vs_padded"] = u["peak_rss_mb"] / padded["peak_rss_mb"]
    print(f"\nPPO update, {padded['params'] / 1e6:.1f} M params, vocab 32768, {len(LENGTHS)} responses of "
          f"{min(LENGTHS)}-{max(LENGTHS)} tokens ({padded['tokens']} real tokens, {padded['padded_tokens']} padded)")
    print(f"{'config':<22}{'update s':>10}{'tokens/s':>10}{'x padded':>10}{'peak RSS MB':>13}{'growth MB':>11}"
          f"{'x padded':>10}")
    for u in updates:
        print(f"{u['config']:<22}{u['update_s']:>10.2f}{u['tokens_per_s']:>10.0f}{u['tokens_per_s_vs_padded']:>10.2f}"
              f"{u['peak_rss_mb']:>13.0f}{u['update_growth_mb']:>11.0f}{u['update_growth_vs_padded']:>10.2f}")
    print("goals: packed >= 1.5 x padded tokens/s; packed+chunked(+256)+ckpt memory <= 0.4 x padded")


def print_sync(sync: dict) -> None:
    print(f"\nweight sync, {sync['tensors']} tensors, {sync['bytes'] / 2**20:.0f} MiB, gloo, one receiver")
    for mode in ("per_tensor", "bucketed", "raw_one_buffer"):
        ratio = sync[f"{mode}_s"] / sync["raw_one_buffer_s"]
        print(f"{mode:<22}{sync[f'{mode}_s']:>10.3f} s{ratio:>8.2f} x raw")
    print("goal: bucketed <= 1.5 x raw")


def print_experts(rows: list[dict]) -> None:
    print("\nexperts: packed update, dense vs MoE (8 experts, 2 per token), per rank (the larger peak RSS)")
    print(f"{'config':<16}{'params M':>9}{'update s':>9}{'held: params':>13}{'experts':>9}{'optimizer':>10}"
          f"{'block':>7}{'peak RSS':>10}{'growth':>8}   (MB)")
    for r in rows:
        print(f"{r['config']:<16}{r['params'] / 1e6:>9.1f}{r['update_s']:>9.2f}{r['params_mb']:>13.0f}"
              f"{r['experts_mb']:>9.0f}{r['optimizer_mb']:>10.0f}{r['largest_block_mb']:>7.1f}{r['peak_rss_mb']:>10.0f}"
              f"{r['update_growth_mb']:>8.0f}")


def print_lora(rows: list[dict]) -> None:
    """Full fine-tuning against LoRA: held memory (parameters + optimizer), peak RSS, update time, what a
    sync sends (model.lora.sync=merged: the full weights; adapter, the default: the adapters alone)."""
    full = rows[0]
    print("\nLoRA vs full fine-tuning: packed update, ZeRO-2, one rank, float32 (MB; ratios to full)")
    print(f"{'config':<10}{'trained M':>10}{'update s':>9}{'x full':>7}{'held':>7}{'x full':>7}{'peak RSS':>9}{'x full':>7}"
          f"{'growth':>7}{'merged MB':>10}{'adapter MB':>11}{'% of full':>10}{'processes':>10}")
    for r in rows:
        held, full_held = r["params_mb"] + r["optimizer_mb"], full["params_mb"] + full["optimizer_mb"]
        r["held_vs_full"], r["peak_rss_vs_full"] = held / full_held, r["peak_rss_mb"] / full["peak_rss_mb"]
        r["update_s_vs_full"] = r["update_s"] / full["update_s"]
        r["adapter_vs_full_weights"] = r["sync_bytes"] / full["sync_bytes"]
        print(f"{r['config']:<10}{r['trained_bytes'] / 4e6:>10.2f}{r['update_s']:>9.2f}{r['update_s_vs_full']:>7.2f}"
              f"{held:>7.0f}{r['held_vs_full']:>7.2f}{r['peak_rss_mb']:>9.0f}{r['peak_rss_vs_full']:>7.2f}"
              f"{r['update_growth_mb']:>7.0f}{r.get('merged_bytes', r['sync_bytes']) / 2**20:>10.1f}"
              f"{r['sync_bytes'] / 2**20:>11.2f}"
              f"{r['adapter_vs_full_weights']:>10.1%}{r['processes']:>10}")
    print("goals (issue 30): LoRA r8 trainer memory <= 0.5 x full; bytes per sync <= 5 % of the full weights at r8 "
          "(the adapter column: model.lora.sync=adapter, the default)")


if __name__ == "__main__":
    main()
