"""Pure helpers around the roles: reward import paths, run summary arithmetic, sync payloads, seeds."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.config import LoggerConfig
from rlhf_dist.controller import sample_seeds
from rlhf_dist.roles.reward import import_function
from rlhf_dist.run_logger import RunLogger, summarize
from rlhf_dist.weight_sync import ParamSpec, engine_init_info, merge_ipc_handles, update_info


def test_import_function_both_spellings():
    from rlhf_dist.reviews import positive_sentiment_reward

    assert import_function("rlhf_dist.reviews:positive_sentiment_reward") is positive_sentiment_reward
    assert import_function("rlhf_dist.reviews.positive_sentiment_reward") is positive_sentiment_reward


@pytest.mark.parametrize("path", ["rlhf_dist.reviews:nope", "no_such_module:f", "rlhf_dist.reviews:POSITIVE_WORDS"])
def test_import_function_errors_name_the_key(path):
    with pytest.raises(ValueError, match=rf"^reward\.function='{path}'"):
        import_function(path)


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
    logger.log(0, {"reward/mean": 0.25, "kl/mean": 0.0})
    # Written (line-buffered) before the run ends: a crash keeps finished steps.
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "reward/mean": 0.25, "kl/mean": 0.0}
    logger.log(1, {"reward/mean": 0.75, "kl/mean": 0.1})
    summary = logger.finish("failed", error="RoleError: x")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert (summary["status"], summary["error"], summary["reward/improvement"]) == ("failed", "RoleError: x", 0.5)


def test_weight_sync_payloads():
    specs = [ParamSpec("model.embed_tokens.weight", "float32", (512, 128)), ParamSpec("lm_head.weight", "bfloat16", (512, 128))]
    assert update_info(specs) == {
        "names": ["model.embed_tokens.weight", "lm_head.weight"],
        "dtype_names": ["float32", "bfloat16"],
        "shapes": [[512, 128], [512, 128]],
    }
    gloo = engine_init_info("gloo", "127.0.0.1", 1234, 3, 5, 60.0)
    assert gloo == {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 3, "world_size": 5, "timeout_s": 60.0}
    nccl = engine_init_info("nccl", "127.0.0.1", 1234, 3, 5, 60.0)
    assert nccl["packed"] is False and "timeout_s" not in nccl
    assert engine_init_info("ipc", "127.0.0.1", 1234, 3, 5, 60.0) == {"packed": False}


def test_merge_ipc_handles_gives_every_gpu_its_handle_per_parameter():
    rank0 = [{"GPU-a": ("embed", 0)}, {"GPU-a": ("head", 0)}]
    rank1 = [{"GPU-b": ("embed", 1)}, {"GPU-b": ("head", 1)}]
    assert merge_ipc_handles([rank0, rank1]) == [
        {"GPU-a": ("embed", 0), "GPU-b": ("embed", 1)},
        {"GPU-a": ("head", 0), "GPU-b": ("head", 1)},
    ]
    with pytest.raises(ValueError, match=r"different parameter counts: \[2, 1\]"):
        merge_ipc_handles([rank0, rank1[:1]])


def test_sample_seeds_distinct_and_reproducible():
    a = sample_seeds(seed=0, step=3, n=64)
    assert a == sample_seeds(seed=0, step=3, n=64)
    assert len(set(a)) == 64
    assert not set(a) & set(sample_seeds(seed=0, step=4, n=64))
    assert sample_seeds(seed=1, step=3, n=64) != a


def test_run_logger_refuses_a_directory_that_holds_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="already holds a run: choose another hydra.run.dir"):
        RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, total_steps=1, group="")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # untouched
