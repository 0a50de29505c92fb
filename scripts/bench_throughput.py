"""Throughput: one workload on rlhf_dist (synchronous and overlapped) and on TRL 1.16's GRPOTrainer, one
after the other, each of our figures beside its limit (generation alone, training alone, reward alone).

    .venv/bin/python scripts/bench_throughput.py --workload w1|w2|w3 [--modes sync,overlap] [--steps 5]
        [--warmup 1] [--dtype float32|bfloat16] [--out bench_out/throughput]

Workloads are ``scripts/bench_workloads.py``'s (the same model, prompts and reward on both sides).
Each run takes ``--warmup`` + ``--steps`` steps; figures are medians over the ``--steps`` after the
warm-up. Tokens/s = generated tokens of a step / its step time.

- ours, per mode: ``python -m rlhf_dist.train`` with ``OUR_CONFIG`` (``sync``: rollout.max_staleness=0;
  ``overlap``: rollout.max_staleness=1 algo.rollout_correction=tis), metrics.jsonl's ``time/*``, and its
  timeline.json (``logger.timeline=true``) copied to ``timeline_<mode>.json``. A mode whose config is
  refused or whose run fails is recorded with its error and the benchmark goes on.
- limits: our roles started in this process (``cluster.start_roles``, the sync config), then per step
  the engines alone on that step's prompts and seeds (``roles.generate``), the reward actors alone on
  their responses, and training alone on one fixed batch (reference logprobs + old logprobs + the
  policy update), each timed with nothing else running. A synchronous step cannot beat
  gen + train (+ reward on w3), an overlapped one cannot beat the max of them.
- TRL: ``GRPOTrainer`` on the same model (HF generate, no gradient checkpointing, one optimizer
  step per generation batch), timed per optimizer step, with its generation, reward and reference
  phases timed inside.
- precision (``--dtype``): ours ``model.dtype`` (bfloat16: DeepSpeed's bf16 mode with float32 master
  weights, vLLM in bf16, the sync in bf16); TRL's ``bf16`` flag (mixed precision).
- the limit of the machine: the GEMM peak in ``--dtype`` on every core (``bench_flops.gemm_peak``), and
  each phase alone as model FLOPs per second and its share of that peak (MFU; ``bench_flops.Shape``).
- CPU per step of each of our runs, by process, against what the cores had (``bench_cpu.RunCpu``).

Writes ``<out>/<workload>[_bfloat16]/throughput.json`` and prints the tables. Wrap it in
``flock /tmp/rlhf_heavy.lock`` on a shared machine: the figures assume nothing else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import bench_workloads as B
from scripts.bench_cpu import RunCpu
from scripts.bench_cpu import table as cpu_table
from scripts.bench_flops import cpu_summary, gemm_peak, mfu_table, shape_of

SEED = 0
PHASES = ("generate", "rollout_wait", "reward", "reference", "values", "train", "weight_sync", "step")
MODES = {
    "sync": ["rollout.max_staleness=0"],
    "overlap": ["rollout.max_staleness=1", "algo.rollout_correction=tis"],
}
TIMELINE = "logger.timeline=true"
# How our system runs each workload on this 2-core machine (chosen by measurement: docs/results.md).
# rollout.stream_passes=true (off in local_cpu): the passes start while the rollout streams;
# reference.batch_size=64: each engine's 128 responses make two streamed reference micro-batches;
# w1: two reference actors (w1 has no EOS: every response ends at the last token, and the reference
# pass runs after the rollout, alone, so a second actor puts the second core to work: 1.64 against 1.77 s).
OUR_CONFIG = {
    "w1": ["trainer=zero0", "trainer.world_size=2", "trainer.micro_batch_size=64", "reference.batch_size=64",
           "reference.num_actors=2", "rollout.num_engines=2", "rollout.stream_passes=true"],
    "w2": ["trainer=zero0", "trainer.world_size=2", "trainer.micro_batch_size=16", "reference.batch_size=32",
           "rollout.num_engines=2", "rollout.kv_cache_gib=1", "rollout.stream_passes=true"],
    "w3": ["trainer=zero0", "trainer.world_size=2", "trainer.micro_batch_size=64", "reference.batch_size=64",
           "rollout.num_engines=2", "rollout.stream_passes=true"],
}
TRL_MICRO_BATCH = {"w1": 64, "w2": 16, "w3": 64}  # per_device_train_batch_size; accumulation fills the step


def workload_overrides(w: B.Workload, model_dir: Path, prompts_file: Path, steps: int, reward_url: str,
                       prompts_per_step: int) -> list[str]:
    """The algorithm and workload, the same as TRL's: GRPO, k3 KL 0.04 in the loss, one optimizer step
    per step at lr 1e-5, temperature 1, top_p 1 (vLLM's top_k is off by default)."""
    samples = prompts_per_step * w.samples_per_prompt
    out = [
        "algo=grpo", f"rollout.n={w.samples_per_prompt}", f"rollout.batch_size={prompts_per_step}",
        f"rollout.max_new_tokens={w.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "algo.ppo_epochs=1", f"algo.minibatch_size={samples}", "trainer.lr=1e-5",
        f"model.path={model_dir}", f"data.prompts={prompts_file}", f"total_steps={steps}", f"seed={SEED}",
        "checkpoint.every_steps=0", "logger.progress_bar=false",
    ]
    if w.http_reward:
        out += ["reward=http", f"reward.http_url={reward_url}"]
    else:
        out += [f"reward.function={B.REWARD_FUNCTION}"]
    return out


def merge(overrides: list[str], replacing: list[str]) -> list[str]:
    """``overrides`` with each key that ``replacing`` sets replaced by its value there."""
    keys = {o.split("=", 1)[0] for o in replacing}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + replacing


def compose(overrides: list[str]):
    """(Config, RunPlan) of ``overrides`` as ``rlhf_dist.train`` would build them; raises on a refused one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlhf_dist.config import register_configs, to_config, validate_config

    register_configs()  # the schema the defaults list starts from (base_config)
    with initialize_config_module(config_module="rlhf_dist.conf", version_base=None):
        cfg = to_config(hydra_compose("config", overrides=overrides))
    return cfg, validate_config(cfg)


def refusal(overrides: list[str]) -> str | None:
    """Why the config is refused (unknown key, bad value), in one line; None if it is accepted."""
    try:
        compose(overrides)
    except Exception as e:  # noqa: BLE001 -- Hydra, OmegaConf and ConfigError all mean "refused"
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict], warmup: int) -> dict:
    """Per-phase medians and tokens/s over the rows after the warm-up; rows hold ``time/*`` and ``tokens``."""
    later = rows[warmup:] or rows
    out = {f"time/{p}": median(later, f"time/{p}") for p in PHASES}
    out["tokens_per_s"] = statistics.median(r["tokens"] / r["time/step"] for r in later)
    out["tokens_per_step"] = statistics.median(r["tokens"] for r in later)
    out["steps_measured"] = len(later)
    return out


# ------------------------------------------------------------------ ours: the runs
def run_ours(mode: str, overrides: list[str], run_dir: Path, out_dir: Path, samples: int, warmup: int) -> dict:
    """One ``rlhf_dist.train`` run; its summary, or its error."""
    result: dict = {"overrides": overrides}
    refused = refusal(overrides)
    if refused and TIMELINE in overrides and refusal([o for o in overrides if o != TIMELINE]) is None:
        result["timeline_error"] = refused
        overrides = [o for o in overrides if o != TIMELINE]
        result["overrides"], refused = overrides, None
    if refused:
        return {**result, "error": f"config refused: {refused}"}
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "rlhf_dist.train", f"hydra.run.dir={run_dir}", *overrides]
    print(f"[ours {mode}] {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with RunCpu(run_dir / "metrics.jsonl", warmup) as cpu:  # each process's CPU over the measured steps
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    result["cpu_per_step"] = cpu.per_step()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench_stdout_stderr.log").write_text(proc.stdout + proc.stderr)
    result["wall_s"] = time.perf_counter() - started
    if proc.returncode:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-3:]
        return {**result, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    started_in = re.search(r"roles started in (\d+)s", proc.stdout + proc.stderr)
    result["roles_start_s"] = float(started_in.group(1)) if started_in else None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["tokens"] = r["response_length/mean"] * samples
    result["steps"] = [{k: v for k, v in r.items() if k.startswith(("time/", "rollout/", "rollout_corr/"))
                        or k in ("tokens", "reward/mean", "response_length/mean", "logprob_gap/mean")} for r in rows]
    result.update(summarize(rows, warmup))
    timeline = run_dir / "timeline.json"
    if timeline.is_file():
        shutil.copyfile(timeline, out_dir / f"timeline_{mode}.json")
        result["timeline"] = str(out_dir / f"timeline_{mode}.json")
    else:
        result.setdefault("timeline_error", "the run wrote no timeline.json")
    return result


# ------------------------------------------------------------------ ours: each part alone
def measure_limits(overrides: list[str], reps: int, warmup: int) -> dict:
    """Our roles in this process: per rep, generation alone on that step's prompts and seeds, the reward
    alone on its responses, training alone (reference + old logprobs + update) on rep 0's batch, and a
    weight sync alone. Medians after the warm-up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_dist.cluster.start import shutdown_ray, start_roles
    from rlhf_dist.config import updates_once
    from rlhf_dist.core.advantages import neutralise_dropped
    from rlhf_dist.core.experience import collate
    from rlhf_dist.core.kl import kl_estimate
    from rlhf_dist.driver.data import PromptSampler, load_prompts
    from rlhf_dist.rollout.queue import sample_seeds
    from rlhf_dist.rollout.scoring import advantages_for

    cfg, plan = compose(overrides)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    shape = shape_of(AutoModelForCausalLM.from_pretrained(cfg.model.path))
    prompts = load_prompts(cfg.data.prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed)
    sampler, n = PromptSampler(len(prompts), cfg.rollout.batch_size, cfg.seed), cfg.rollout.n
    started = time.perf_counter()
    roles = start_roles(cfg, plan, cfg.model.path, cfg.model.path)
    result: dict = {"roles_start_s": time.perf_counter() - started}
    rows, fixed = [], None
    try:
        for rep in range(reps):
            idx = [i for i in sampler.indices(rep) for _ in range(n)]
            prompt_ids = [prompts.token_ids[i] for i in idx]
            texts, metadata = [prompts.texts[i] for i in idx], [prompts.metadata[i] for i in idx]
            seeds = sample_seeds(cfg.seed, rep, len(idx))
            row: dict = {}
            t = time.perf_counter()
            gens = roles.generate(prompt_ids, seeds)
            row["generate"] = time.perf_counter() - t
            row["tokens"] = sum(len(g.response_ids) for g in gens)
            row["response_lengths"] = sorted(len(g.response_ids) for g in gens)
            t = time.perf_counter()
            scores = torch.tensor(roles.reward.score_async(texts, [g.text for g in gens], metadata).result())
            row["reward"] = time.perf_counter() - t
            if fixed is None:
                fixed = (collate(prompt_ids, [g.response_ids for g in gens], pad_id=0), scores)
                fixed_lengths = ([len(p) for p in prompt_ids], [len(g.response_ids) for g in gens])
            exp, scores = fixed
            work = shape.phases(*fixed_lengths, cfg.algo.ppo_epochs)
            row["flops"] = {"generate": shape.phases([len(p) for p in prompt_ids],
                                                     [len(g.response_ids) for g in gens])["generate"],
                            "reference": work["reference"], "update": work["update"],
                            "values": 0.0 if updates_once(cfg) else work["old_logprobs"]}
            t = time.perf_counter()
            ref = roles.reference.logprobs_async(exp).result()
            row["reference"] = time.perf_counter() - t
            kept_scores, kept = neutralise_dropped(scores, n)
            if updates_once(cfg):  # as rl_step: the update's own forward gives the old logprobs
                row["values"] = 0.0
                adv, _ = advantages_for(cfg.algo, kept_scores, torch.zeros_like(exp.response_mask),
                                        exp.response_mask, None, n, cfg.algo.kl_coef)
                batch = exp.with_fields(ref_logprobs=ref, advantages=adv * kept[:, None])
            else:
                t = time.perf_counter()
                old, _ = roles.policy.logprobs_async(exp).result()
                row["values"] = time.perf_counter() - t
                kl = kl_estimate(old, ref, cfg.algo.kl_estimator)
                adv, _ = advantages_for(cfg.algo, kept_scores, kl, exp.response_mask, None, n, cfg.algo.kl_coef)
                batch = exp.with_fields(old_logprobs=old, ref_logprobs=ref, advantages=adv * kept[:, None])
            t = time.perf_counter()
            roles.policy.train_async(batch, cfg.algo.ppo_epochs, cfg.algo, cfg.algo.kl_coef).result()
            row["train"] = time.perf_counter() - t
            row["train_alone"] = row["reference"] + row["values"] + row["train"]
            t = time.perf_counter()
            roles.weights.sync(version=rep + 1)
            row["weight_sync"] = time.perf_counter() - t
            rows.append(row)
            print(f"[limits] rep {rep}: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()
                                                       if isinstance(v, float)), flush=True)
    finally:
        roles.kill()
        shutdown_ray()
    later = rows[warmup:] or rows
    for key in ("generate", "reward", "reference", "values", "train", "train_alone", "weight_sync", "tokens"):
        result[key] = statistics.median(r[key] for r in later)
    result["flops"] = {k: statistics.median(r["flops"][k] for r in later) for k in later[0]["flops"]}
    result["flops"]["train_alone"] = sum(result["flops"][k] for k in ("reference", "values", "update"))
    result["shape"] = {"linear_params": shape.linear_params, "attention_width": shape.attention_width}
    lengths = [x for r in later for x in r["response_lengths"]]
    result["response_length"] = {"min": lengths[0] if lengths else None, "median": statistics.median(lengths),
                                 "max": max(lengths)}
    result["reps"] = [{k: v for k, v in r.items() if k not in ("response_lengths", "flops")} for r in rows]
    return result


def limits_of(alone: dict, w: B.Workload) -> dict:
    parts = {"gen": alone["generate"], "train": alone["train_alone"]}
    if w.http_reward:
        parts["reward"] = alone["reward"]
    return {"sync": sum(parts.values()), "overlap": max(parts.values()), "parts": parts}


# ------------------------------------------------------------------ TRL
def run_trl(w: B.Workload, model_dir: Path, prompts: list[str], steps: int, reward_url: str, micro: int,
            samples: int, work_dir: Path, bf16: bool = False) -> list[dict]:
    """TRL's GRPOTrainer for ``steps`` optimizer steps; per step its time and phases (same keys as ours).
    ``bf16``: the Trainer's bf16 mode (accelerate's mixed precision: float32 weights, the training and
    logprob forward passes autocast to bfloat16 on the CPU)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_dist.config import RewardConfig
    from rlhf_dist.roles.reward import post_scores

    torch.set_num_threads(os.cpu_count() or 1)  # one process: it gets every core
    http = RewardConfig(function_weight=0.0, http_weight=1.0, http_url=reward_url)

    def reward(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        if w.http_reward:
            return post_scores(http, prompts, completions, [{} for _ in prompts])
        return [B.positive_word_count(p, c) for p, c in zip(prompts, completions)]

    phases: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            return timed("generate", super()._generate)(prompts)

        def _calculate_rewards(self, *args):
            return timed("reward", super()._calculate_rewards)(*args)

        def _generate_and_score_completions(self, inputs):
            out = timed("rollout", super()._generate_and_score_completions)(inputs)
            phases["tokens"] = phases.get("tokens", 0.0) + float(out["completion_mask"].sum())
            return out

    rows: list[dict] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step, rollout = now - self.last, phases.get("rollout", 0.0)
            gen, rew = phases.get("generate", 0.0), phases.get("reward", 0.0)
            rows.append({"time/step": step, "time/generate": gen, "time/reward": rew,
                         "time/reference": rollout - gen - rew, "time/train": step - rollout,
                         "tokens": phases.get("tokens", 0.0)})
            print(f"[trl] step {len(rows)}: {step:.2f}s (generate {gen:.2f}s)", flush=True)
            phases.clear()
            self.last = now

    args = GRPOConfig(
        output_dir=str(work_dir), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=samples // micro, generation_batch_size=samples,
        num_generations=w.samples_per_prompt, num_iterations=1, beta=0.04, learning_rate=1e-5,
        lr_scheduler_type="constant", max_completion_length=w.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0, bf16=bf16, use_cpu=True, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", seed=SEED, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Timed(model=str(model_dir), reward_funcs=reward, args=args,
                    train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepClock()])
    trainer.train()
    return rows


# ------------------------------------------------------------------ report
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def add_ratios(report: dict) -> None:
    """Each of our modes gets its limit and the ratios ours/limit and ours/TRL (step times)."""
    limit = report.get("limits", {}).get("limit", {})
    for mode, r in report["ours"].items():
        if "error" not in r:
            r["limit_s"] = limit.get(mode)
            r["ratio_ours_over_limit"] = ratio(r["time/step"], r["limit_s"])
            r["ratio_ours_over_trl"] = ratio(r["time/step"], report["trl"].get("time/step"))
            r["ratio_tokens_per_s_ours_over_trl"] = ratio(r["tokens_per_s"], report["trl"].get("tokens_per_s"))


def table(report: dict) -> str:
    w, limits, trl = report["workload"], report.get("limits", {}), report["trl"]
    head = ("| system | mode | step s | limit s | ours/limit | ours/TRL | tokens/s | generate | wait for rollout "
            "| reward | reference | old logprobs | train | weight sync |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def phases(r: dict) -> str:
        return " | ".join(fmt(r.get(f"time/{p}")) for p in PHASES[:-1])

    trl_step = trl.get("time/step")
    for mode, r in report["ours"].items():
        if "error" in r:
            lines.append(f"| rlhf_dist | {mode} | failed: {r['error'][:160]} |" + " |" * 12)
            continue
        lines.append(f"| rlhf_dist | {mode} | {fmt(r['time/step'])} | {fmt(r['limit_s'])} "
                     f"| {fmt(r['ratio_ours_over_limit'])} | {fmt(r['ratio_ours_over_trl'])} "
                     f"| {fmt(r['tokens_per_s'], '.0f')} | {phases(r)} |")
    if "error" in trl:
        lines.append(f"| TRL 1.16 | sync | failed: {trl['error'][:160]} |" + " |" * 12)
    else:
        lines.append(f"| TRL 1.16 GRPOTrainer | sync | {fmt(trl_step)} | | | 1.00 | {fmt(trl['tokens_per_s'], '.0f')} "
                     f"| {phases(trl)} |")
    if "error" in limits:
        lines.append(f"\nlimits: failed: {limits['error']}")
    elif limits:
        parts = limits["limit"]["parts"]
        lines.append(f"\nalone (medians): generation {limits['generate']:.2f} s, training {limits['train_alone']:.2f} s "
                     f"(reference {limits['reference']:.2f} + old logprobs {limits['values']:.2f} + update "
                     f"{limits['train']:.2f}), reward {limits['reward']:.2f} s, weight sync {limits['weight_sync']:.2f} s; "
                     f"limit sync = {' + '.join(parts)} = {limits['limit']['sync']:.2f} s, overlapped = max = "
                     f"{limits['limit']['overlap']:.2f} s; response length min/median/max "
                     f"{limits['response_length']['min']}/{limits['response_length']['median']:.0f}/"
                     f"{limits['response_length']['max']}")
    return (f"workload {w}: {report['description']} ({report['samples_per_step']} samples per step, medians of "
            f"{report['steps']} steps after {report['warmup']} warm-up)\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(B.WORKLOADS), required=True)
    parser.add_argument("--modes", default="sync,overlap", help="comma-separated: sync, overlap")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the medians")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "throughput")
    parser.add_argument("--prompts-per-step", type=int, default=None, help="smaller batches for a quick check")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: ours, limits, trl")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="both systems' precision: our model.dtype (DeepSpeed bf16 mode, vLLM in bf16); TRL's bf16 flag")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="overrides of our config (replacing OUR_CONFIG's keys; config experiments)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; use {', '.join(MODES)}")
    skip = set(filter(None, args.skip.split(",")))
    w = B.WORKLOADS[args.workload]
    per_step = args.prompts_per_step or w.prompts_per_step
    samples, total = per_step * w.samples_per_prompt, args.warmup + args.steps
    out = args.out / (w.name if args.dtype == "float32" else f"{w.name}_{args.dtype}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    started = time.perf_counter()
    model_dir = B.build_model(w, B.cache_root(), SEED)
    print(f"model {model_dir} ready in {time.perf_counter() - started:.0f}s", flush=True)
    prompts = B.write_prompts(out / "prompts.jsonl", SEED)
    peak = {"dtype": args.dtype, "threads": os.cpu_count(), "cpu": cpu_summary(),
            "flops_per_s": gemm_peak(args.dtype, os.cpu_count() or 1)}
    print(f"GEMM peak {args.dtype}: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s on {peak['threads']} threads ({peak['cpu']})",
          flush=True)
    report: dict = {"workload": w.name, "description": w.description, "date": time.strftime("%Y-%m-%d"),
                    "dtype": args.dtype, "peak": peak,
                    "command": " ".join([Path(sys.executable).name, *sys.argv]), "steps": args.steps,
                    "warmup": args.warmup, "samples_per_step": samples, "model": str(model_dir), "cores": os.cpu_count()}
    server = B.LatencyRewardServer() if w.http_reward else contextlib.nullcontext()
    with server:
        url = server.url if w.http_reward else ""
        base = merge([*workload_overrides(w, model_dir, out / "prompts.jsonl", total, url, per_step),
                      *OUR_CONFIG[w.name], f"model.dtype={args.dtype}"], args.extra)
        report["our_config"] = base
        print("our config:", " ".join(base), flush=True)
        report["ours"] = {}
        for mode in modes if "ours" not in skip else []:
            report["ours"][mode] = run_ours(mode, [*base, *MODES[mode], TIMELINE], out / f"ours_{mode}", out,
                                            samples, args.warmup)
            print(f"[ours {mode}] " + json.dumps({k: v for k, v in report["ours"][mode].items()
                                                   if k not in ("steps", "overrides")}), flush=True)
        if "limits" not in skip:
            try:
                report["limits"] = measure_limits([*base, *MODES["sync"]], total, args.warmup)
                report["limits"]["limit"] = limits_of(report["limits"], w)
            except Exception as e:  # noqa: BLE001 -- recorded; the TRL side still runs
                report["limits"] = {"error": f"{type(e).__name__}: {e}"}
        if "trl" not in skip:
            try:
                rows = run_trl(w, model_dir, prompts, total, url, min(TRL_MICRO_BATCH[w.name], samples), samples,
                               out / "trl", bf16=args.dtype == "bfloat16")
                report["trl"] = {"steps": rows, **summarize(rows, args.warmup)}
            except Exception as e:  # noqa: BLE001 -- recorded in the report
                report["trl"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            report["trl"] = {"error": "skipped"}
        if w.http_reward:
            report["reward_server"] = {"url": url, "latency_s": server.latency_s, "samples_scored": server.samples}
    add_ratios(report)
    report["wall_s"] = time.perf_counter() - started
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(report))
    if "flops" in report.get("limits", {}):
        print("\n" + mfu_table(report["limits"], peak))
    for mode, run in report["ours"].items():
        if run.get("cpu_per_step"):
            print(f"\nCPU per step, ours {mode} (scripts/bench_cpu.py)\n" + cpu_table(run["cpu_per_step"]))
    print(f"\nwall time {report['wall_s']:.0f} s; {out / 'throughput.json'}")


if __name__ == "__main__":
    main()
