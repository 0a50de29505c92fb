"""rlhf_dist.driver.run_logger: the run summary arithmetic, metrics.jsonl per step, refusing a used directory,
the W&B credentials of an online run looked up before anything starts.
How a resumed run's logs continue is tested with the checkpoints (test_checkpoint.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from rlhf_dist.config import LoggerConfig
from rlhf_dist.driver.run_logger import RunLogger, summarize
from tests.conftest import REPO


def test_summarize_fifths():
    # 10 steps -> a fifth is 2 steps. Rewards 0..9: first fifth mean (0+1)/2 = 0.5,
    # last fifth mean (8+9)/2 = 8.5, improvement 8.0.
    history = [{"step": i, "reward/mean": float(i)} for i in range(10)]
    s = summarize(history)
    assert (s["steps"], s["reward/first_fifth_mean"], s["reward/last_fifth_mean"]) == (10, 0.5, 8.5)
    assert s["reward/improvement"] == 8.0
    assert s["final"] == {"step": 9, "reward/mean": 9.0}
    # 3 steps -> floor(3/5) = 0, so a "fifth" is at least one step: first 0.0, last 2.0.
    s = summarize(history[:3])
    assert (s["reward/first_fifth_mean"], s["reward/last_fifth_mean"]) == (0.0, 2.0)


def test_run_logger_writes_jsonl_per_step_and_summary(tmp_path):
    logger = RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, total_steps=2, group="")
    before = time.time()
    logger.log(0, {"reward/mean": 0.25, "kl/mean": 0.0})
    # Written (line-buffered) before the run ends: a crash keeps finished steps; each row says when
    # its step ended (Unix seconds, rounded to the millisecond)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 0, "reward/mean": 0.25, "kl/mean": 0.0, "time/end": row["time/end"]}
    assert round(before, 3) <= row["time/end"] <= round(time.time(), 3)
    logger.log(1, {"reward/mean": 0.75, "kl/mean": 0.1})
    summary = logger.finish("failed", error="RoleError: x")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert (summary["status"], summary["error"], summary["reward/improvement"]) == ("failed", "RoleError: x", 0.5)


def test_run_logger_refuses_a_directory_that_holds_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="already holds a run: choose another hydra.run.dir"):
        RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, total_steps=1, group="")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # untouched


def without_wandb_credentials(home) -> dict[str, str]:
    """The environment of a user who never logged in to W&B: ``home`` as HOME (no ~/.netrc, no wandb
    settings), no W&B variables; the tiny models still come from the usual cache."""
    from rlhf_dist.models.tiny import cache_root

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return env | {"HOME": str(home), "RLHF_DIST_CACHE": str(cache_root())}


def test_cli_online_wandb_without_a_key_is_one_line_before_anything_starts(tmp_path):
    # Before: wandb.init, after the prompts and the tokenizer were loaded, ended the run with a
    # 25-line traceback ending in "wandb.errors.errors.UsageError: No API key configured".
    started = time.perf_counter()
    command = ["logger=wandb", "logger.mode=online", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "rlhf_dist.train", *command], cwd=REPO,
                          env=without_wandb_credentials(tmp_path), capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [(
        "rlhf_dist: config error: logger.mode='online': no W&B API key is configured for "
        "https://api.forge.coreweave.com; run `wandb login`, set WANDB_API_KEY, or log offline with logger.mode=offline"
    )]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no run logger, no data, no Ray
    assert time.perf_counter() - started < 30.0


def test_wandb_credentials_are_found_where_wandb_looks_for_them(tmp_path):
    # In a fresh process (wandb caches its settings per process): none, then ~/.netrc as `wandb login`
    # writes it, then WANDB_API_KEY; a key of the wrong form is refused without asking the server.
    script = textwrap.dedent("""
        import os, pathlib
        from rlhf_dist.config import ConfigError, LoggerConfig
        from rlhf_dist.driver.run_logger import check_wandb_credentials

        def check(**kw):
            try:
                check_wandb_credentials(LoggerConfig(**{"backend": "wandb", "mode": "online", **kw}))
                return "ok"
            except ConfigError as e:
                return str(e)

        print(check(mode="offline"), check(backend="console"))  # nothing to look up
        print(check())
        netrc = pathlib.Path.home() / ".netrc"
        netrc.write_text("machine api.forge.coreweave.com\\n  login user\\n  password " + "k" * 40 + "\\n")
        netrc.chmod(0o600)
        print(check())
        netrc.unlink()
        os.environ["WANDB_API_KEY"] = "k" * 40
        print(check())
        os.environ["WANDB_API_KEY"] = "short"
        print(check())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=without_wandb_credentials(tmp_path),
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    fix = "run `wandb login`, set WANDB_API_KEY, or log offline with logger.mode=offline"
    assert proc.stdout.splitlines() == [
        "ok ok",
        f"logger.mode='online': no W&B API key is configured for https://api.forge.coreweave.com; {fix}",
        "ok",
        "ok",
        ("logger.mode='online': the W&B credentials for https://api.forge.coreweave.com are unusable "
         f"(WANDB_API_KEY invalid: API key must have 40+ characters, has 5.); {fix}"),
    ]
