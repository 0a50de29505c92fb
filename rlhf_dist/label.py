"""A round's labelling, for the iterated pipeline: ``python -m rlhf_dist.label
+eval.policies.policy=DIR +eval.policies.sft=DIR pipeline.ranking_k=4``.

``pipeline.label_prompts`` prompts of ``data.prompts`` (train split, a fresh draw for each
``pipeline.label_round``) each get ``pipeline.ranking_k`` responses, split between the named
policies in order (the first, the current policy, gets the larger half), sampled at
``rollout.temperature`` on one vLLM engine per policy; the built-in task's labeller
(``Task.rank_responses``: the hidden annotator with ``data.annotator_noise``, a human's noise)
ranks them. Rankings whose responses all tie are dropped. Written to ``<out>/rankings.jsonl``
(``{"prompt", "responses" best first, "ranks", "policies"}``: which policy wrote each response),
the reward-model stage's ``data.preferences``; the summary says how often each policy's response
was ranked first (``label/<name>/best``: the labeller's verdict on the round).

People as labellers (``pipeline.labeller=human``): the samples go to ``<out>/to_rank.jsonl``
(``{"id", "prompt", "responses"}``, each prompt's distinct responses in a shuffled order, no
policy named) and the stage pauses (exit code 3). Rank each row's responses best first into a
JSONL file of ``{"id", "responses"[, "ranks"]}`` rows (``ranks`` as in a preference row: equal
ranks a tie), then import it::

    python -m rlhf_dist.label hydra.run.dir=<out> pipeline.import_rankings=ranked.jsonl

Each row is checked against the export: an unknown or repeated id, a response not in that row's
export, one listed twice, or a ranking that leaves some out is one line naming file and line.
A prompt left unranked is dropped (counted in ``label/unranked``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf_dist.cli import Paused, entry_point
from rlhf_dist.config import Config, ConfigError, as_dict, validate_config
from rlhf_dist.core.experience import split_sizes
from rlhf_dist.core.seeds import LABEL_ROUND, derive_seed

RANKINGS_FILE = "rankings.jsonl"
EXPORT_FILE = "to_rank.jsonl"  # what people rank (pipeline.labeller=human)
KEY_FILE = "samples.jsonl"  # the export's rows with each response's policy (not for the labellers)


def labeller(cfg: Config):
    """The built-in task's ``rank_responses``, or a one-line error naming what is missing."""
    from rlhf_dist.registry import TASKS
    from rlhf_dist.tasks.base import load_task

    name = cfg.data.prompts.removeprefix("builtin:")
    if not cfg.data.prompts.startswith("builtin:") or name not in TASKS:
        raise ConfigError(f"data.prompts={cfg.data.prompts!r}: labelling a round needs a built-in task's labeller "
                          "(builtin:reviews); rank the samples by hand and pass them as data.preferences")
    rank = load_task(name).rank_responses
    if rank is None:
        raise ConfigError(f"data.prompts={cfg.data.prompts!r}: the task {name!r} has no labeller (Task.rank_responses)")
    return rank


def validate(cfg: Config) -> None:
    if cfg.pipeline.import_rankings:
        return  # checked against the export when imported
    validate_config(cfg)
    if not cfg.eval.policies:
        raise ConfigError("eval.policies={}: name the policies to sample, e.g. +eval.policies.policy=DIR "
                          "+eval.policies.sft=DIR")
    if len(cfg.eval.policies) > cfg.pipeline.ranking_k:
        raise ConfigError(f"pipeline.ranking_k={cfg.pipeline.ranking_k}: fewer responses than the "
                          f"{len(cfg.eval.policies)} policies to sample")
    if cfg.pipeline.labeller == "builtin":
        labeller(cfg)


def rank_samples(cfg: Config, texts: list[str], samples: dict[str, list[list[str]]]) -> list[dict]:
    """Each prompt's responses (``samples[policy][prompt]``, the policies in order) ranked by the
    labeller; each row also says which policy wrote each response. All-tie prompts are dropped."""
    rank = labeller(cfg)
    rng = random.Random(derive_seed(LABEL_ROUND, cfg.seed, cfg.pipeline.label_round, 1))
    rows = []
    for i, prompt in enumerate(texts):
        responses = [(name, r) for name, per_prompt in samples.items() for r in per_prompt[i]]
        row = rank(prompt, [r for _, r in responses], cfg.data.annotator_noise, rng)
        if row is None:
            continue
        writer = {}
        for name, r in responses:
            writer.setdefault(r, name)  # a response two policies both wrote: the first's
        rows.append({**row, "policies": [writer[r] for r in row["responses"]]})
    return rows


def best_shares(rows: list[dict], names: list[str]) -> dict[str, float]:
    """How often each policy wrote a best-ranked response (rank 0; a tie at the top counts for each)."""
    counts = dict.fromkeys(names, 0)
    for row in rows:
        for name in {p for p, r in zip(row["policies"], row["ranks"]) if r == 0}:
            counts[name] += 1
    return {f"label/{name}/best": counts[name] / max(len(rows), 1) for name in names}


def export_samples(cfg: Config, out_dir: Path, texts: list[str], samples: dict[str, list[list[str]]]) -> Path:
    """Write what people rank (``EXPORT_FILE``: each prompt's distinct responses, shuffled, no
    policy named) and its key (``KEY_FILE``: the same rows with each response's policy)."""
    rng = random.Random(derive_seed(LABEL_ROUND, cfg.seed, cfg.pipeline.label_round, 1))
    export, key = [], []
    for i, prompt in enumerate(texts):
        writer: dict[str, str] = {}
        for name, per_prompt in samples.items():
            for r in per_prompt[i]:
                writer.setdefault(r, name)
        responses = list(writer)
        rng.shuffle(responses)
        if len(responses) < 2:
            continue  # every policy wrote the same response: nothing to rank
        export.append({"id": i, "prompt": prompt, "responses": responses})
        key.append({**export[-1], "policies": [writer[r] for r in responses]})
    (out_dir / KEY_FILE).write_text("".join(json.dumps(r) + "\n" for r in key))
    path = out_dir / EXPORT_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in export))
    return path


def waiting_for_rankings(out_dir: Path) -> str:
    return (f"{out_dir / EXPORT_FILE} waits for its rankings: rank each row's responses best first into a JSONL "
            f'file of {{"id", "responses"[, "ranks"]}} rows, import it with `python -m rlhf_dist.label '
            f"hydra.run.dir={out_dir} pipeline.import_rankings=FILE`, then run the pipeline again")


def import_rankings(path: Path, key: list[dict]) -> list[dict]:
    """The rankings of ``path`` checked against the export (``key``'s rows) and completed with each
    row's prompt and the policies of its responses; a bad row raises naming file and line."""
    from rlhf_dist.driver.data import DataError, ranking_of

    exported = {row["id"]: row for row in key}
    seen: dict[object, int] = {}
    rows = []
    for line, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            row = json.loads(raw)
            ranking = row["responses"]
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f'{where}: not a {{"id", "responses"}} row ({type(e).__name__}: {e})') from e
        item = exported.get(row.get("id"))
        if item is None:
            raise DataError(f"{where}: id {row.get('id')!r} is not in the export")
        if item["id"] in seen:
            raise DataError(f"{where}: id {item['id']} ranked twice (first on line {seen[item['id']]})")
        seen[item["id"]] = line
        for text in ranking:
            if text not in item["responses"]:
                raise DataError(f"{where}: response {text!r:.60} is not one of id {item['id']}'s exported responses")
            if ranking.count(text) > 1:
                raise DataError(f"{where}: response {text!r:.60} listed {ranking.count(text)} times")
        if len(ranking) != len(item["responses"]):
            raise DataError(f"{where}: incomplete ranking: {len(ranking)} of id {item['id']}'s "
                            f"{len(item['responses'])} responses")
        try:
            responses, ranks = ranking_of({"responses": ranking, "ranks": row.get("ranks")})
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: {e}") from e
        writer = dict(zip(item["responses"], item["policies"]))
        rows.append({"prompt": item["prompt"], "responses": responses, "ranks": ranks,
                     "policies": [writer[r] for r in responses]})
    if not rows:
        raise DataError(f"{path}: no rankings")
    return rows


def import_run(cfg: Config, out_dir: Path) -> dict:
    """``pipeline.import_rankings``: a person's rankings of this stage's export become its
    ``rankings.jsonl``, and the stage is completed."""
    key_path = out_dir / KEY_FILE
    if not key_path.is_file():
        raise ConfigError(f"pipeline.import_rankings={cfg.pipeline.import_rankings!r}: {out_dir} holds no export "
                          f"({KEY_FILE}); run the round's label stage with pipeline.labeller=human first")
    key = [json.loads(line) for line in key_path.read_text().splitlines()]
    rows = import_rankings(Path(cfg.pipeline.import_rankings), key)
    path = out_dir / RANKINGS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    names = list(dict.fromkeys(p for row in key for p in row["policies"]))
    summary.update({"status": "completed", "rankings_path": str(path), "label/rankings": len(rows),
                    "label/unranked": len(key) - len(rows), **best_shares(rows, names)})
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rlhf_dist label: imported {len(rows)} rankings ({len(key) - len(rows)} prompts unranked) -> {path}",
          flush=True)
    return summary


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    from transformers import AutoTokenizer

    from rlhf_dist.cluster.start import place_roles, stage_actors, start_engines, wait_started
    from rlhf_dist.driver.data import load_prompts
    from rlhf_dist.driver.preemption import PREEMPTION
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.models.modeling import resolve_model_path

    if cfg.pipeline.import_rankings:
        return import_run(cfg, out_dir)
    validate(cfg)
    p = cfg.pipeline
    names = list(cfg.eval.policies)
    paths = {n: resolve_model_path(path, cfg.cache_dir, f"eval.policies.{n}") for n, path in cfg.eval.policies.items()}
    prompts = load_prompts(cfg.data.prompts, cfg.data, AutoTokenizer.from_pretrained(paths[names[0]]),
                           cfg.model.max_prompt_len, cfg.seed)
    chosen = random.Random(derive_seed(LABEL_ROUND, cfg.seed, p.label_round, 0)).sample(
        range(len(prompts)), min(p.label_prompts, len(prompts)))
    per_policy = dict(zip(names, split_sizes(p.ranking_k, len(names))))
    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), 1, group, desc="label", headline="", postfix=())
    logger.message(f"rlhf_dist label: round {p.label_round}, {len(chosen)} prompts x {p.ranking_k} responses "
                   f"({', '.join(f'{per_policy[n]} of {n}' for n in names)})")
    with stage_actors(logger) as actors:
        slots = place_roles(cfg, {"generation": len(names)})
        engines = {n: start_engines(cfg, f"generation[{n}]", paths[n], slots["generation"][i : i + 1])
                   for i, n in enumerate(names)}
        actors.extend(engines.values())
        wait_started(cfg, list(engines.values()))
        PREEMPTION.check("no rankings written")
        pending = {}
        for n, e in engines.items():
            k = per_policy[n]
            ids = [prompts.token_ids[i] for i in chosen for _ in range(k)]
            seeds = [(derive_seed(LABEL_ROUND, cfg.seed, p.label_round, 2 + i) + j + 97 * names.index(n)) % 2**31
                     for i in chosen for j in range(k)]
            pending[n] = (k, e.generate_async(ids, seeds))
        samples = {}
        for n, (k, call) in pending.items():
            texts = [g.text for g in call.result()]
            samples[n] = [texts[i * k : (i + 1) * k] for i in range(len(chosen))]
    if p.labeller == "human":
        export = export_samples(cfg, out_dir, [prompts.texts[i] for i in chosen], samples)
        logger.add_summary({"export_path": str(export)})
        logger.finish("waiting_for_rankings")
        raise Paused(waiting_for_rankings(out_dir))
    rows = rank_samples(cfg, [prompts.texts[i] for i in chosen], samples)
    if not rows:
        raise ConfigError(f"pipeline.label_prompts={p.label_prompts}: every prompt's responses tied; nothing to rank")
    path = out_dir / RANKINGS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shares = best_shares(rows, names)
    logger.add_summary({"rankings_path": str(path), "label/rankings": len(rows),
                        "label/all_tied": len(chosen) - len(rows), **shares})
    logger.message(f"rlhf_dist label: {len(rows)} rankings ({len(chosen) - len(rows)} all tied) -> {path}; best: "
                   + ", ".join(f"{n} {shares[f'label/{n}/best']:.2f}" for n in names))
    return logger.finish("completed")


main = entry_point("label", run, validate, objective="")

if __name__ == "__main__":
    main()
