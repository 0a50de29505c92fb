"""Bad input ends in one line naming the bad value, or in a counted skip (data.on_bad_row=skip).

The cases of docs/reliability.md ("Bad input") that other unit tests did not already check; the
table there names the test of every case. Real functions on small real inputs: JSONL files in
tmp_path, the embedded tiny tokenizer and models, the Hydra config, the CLI as a subprocess.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from rlhf_dist.config import ConfigError, DataConfig, RewardConfig, supervised_plan, validate_config
from rlhf_dist.driver.data import DataError, load_preferences, load_prompts, load_sft
from rlhf_dist.roles.reward import RewardError
from tests.conftest import REPO, compose_config, local_http_server, local_scorer, send_json


@pytest.fixture(scope="module")
def tokenizer(tiny_policy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy)


def write_jsonl(path: Path, rows: list[dict | bytes]) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def copy_model(src: str, dst: Path, tokenizer_pad: bool = True, config_pad: bool = True) -> Path:
    """A copy of a tiny model directory, without the tokenizer's and/or the config's pad token."""
    shutil.copytree(src, dst)
    drops = (("tokenizer_config.json", "pad_token", tokenizer_pad), ("config.json", "pad_token_id", config_pad))
    for file, key, keep in drops:
        if not keep:
            data = json.loads((dst / file).read_text())
            del data[key]
            (dst / file).write_text(json.dumps(data))
    return dst


def run_cli(module: str, *overrides: str, run_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )
    return proc, time.perf_counter() - started


# --- dataset rows -----------------------------------------------------------------------------


def test_real_tokenizer_counts_every_kind_of_bad_prompt_row(tokenizer, tmp_path):
    fits = "the soup was"
    limit = len(tokenizer(fits)["input_ids"])  # <s> counts: it is part of what the engine reads
    too_long = fits + " great and the staff was kind"
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": fits},
        {"text": fits},  # line 2: missing key
        {"prompt": ""},  # empty
        b'{"prompt": "caf\xff"}',  # invalid UTF-8
        {"prompt": too_long},
        {"prompt": fits, "answer": "7"},
    ])
    prompts = load_prompts(str(path), DataConfig(), tokenizer, limit, seed=0)
    assert prompts.texts == [fits, fits] and prompts.metadata == [{}, {"answer": "7"}]
    assert prompts.skipped == 4  # missing key, empty, invalid UTF-8, over-long

    with pytest.raises(DataError) as excinfo:
        load_prompts(str(path), DataConfig(on_bad_row="error"), tokenizer, limit, seed=0)
    assert str(excinfo.value) == f"{path}:2: bad row (KeyError: 'prompt')"

    # Error mode, the over-long row alone, as held-out prompts: the message names data.eval_prompts.
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": too_long}])
    with pytest.raises(DataError) as excinfo:
        load_prompts(str(only_long), DataConfig(on_bad_row="error"), tokenizer, limit, seed=0, split="test")
    n = len(tokenizer(too_long)["input_ids"])
    assert n > limit
    assert str(excinfo.value) == (
        f"data.eval_prompts={str(only_long)!r}: prompt of {n} tokens exceeds model.max_prompt_len={limit}: {too_long!r}"
    )


LOADERS = {
    "prompts": (load_prompts, "prompts"),
    "sft": (load_sft, "rows"),
    "preferences": (load_preferences, "rows"),
}


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("content", [b"", b"\n   \n"], ids=["empty-file", "blank-lines"])
def test_empty_source_is_one_error(tokenizer, tmp_path, kind, content):
    load, what = LOADERS[kind]
    path = tmp_path / f"{kind}.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load(str(path), DataConfig(), tokenizer, 64, seed=0)
    assert str(excinfo.value) == f"data.{kind}={str(path)!r}: no usable {what} (it is empty)"


@pytest.mark.parametrize(
    ("kind", "rows"),
    [
        ("sft", [{"prompt": "a"}, {"prompt": "a", "response": " "}]),  # missing key, empty response
        ("preferences", [{"prompt": "p", "chosen": " a", "rejected": " a"}, b"not json"]),  # identical pair, bad JSON
    ],
    ids=["sft", "preferences"],
)
def test_source_with_only_bad_rows_is_one_error(tokenizer, tmp_path, kind, rows):
    # The prompt-set case: tests/unit/driver/test_data.py::test_load_prompts_with_nothing_usable.
    load, _ = LOADERS[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        load(str(path), DataConfig(), tokenizer, 64, seed=0)
    assert str(excinfo.value) == f"data.{kind}={str(path)!r}: no usable rows (2 rows skipped)"


# --- rewards ----------------------------------------------------------------------------------


def nan_reward(prompt: str, response: str) -> float:
    return math.nan


def minus_inf_reward(prompt: str, response: str) -> float:
    return -math.inf


def none_reward(prompt: str, response: str) -> None:
    return None


def raising_reward(prompt: str, response: str) -> float:
    raise KeyError("answer")


def scored_unless_bad(prompt: str, response: str) -> float:
    return {"nan": math.nan, "none": None}.get(response, 0.25)  # type: ignore[return-value]


HINT = " (reward.on_invalid=drop skips such samples)"


@pytest.mark.parametrize(
    ("fn", "problem"),
    [
        ("nan_reward", ": reward for sample 0 (prompt 'p') is nan"),
        ("minus_inf_reward", ": reward for sample 0 (prompt 'p') is -inf"),
        ("none_reward", " returned None on sample 0 (prompt 'p'), not a number"),
        ("raising_reward", " raised on sample 0 (prompt 'p'): KeyError('answer')"),
    ],
    ids=["nan", "minus-inf", "none", "raises"],
)
def test_invalid_reward_fails_the_step_naming_function_and_sample(fn, problem):
    path = f"{__name__}:{fn}"
    s = local_scorer(RewardConfig(function=path))
    with pytest.raises(RewardError) as excinfo:
        s.score(["p"], ["r"], [{}])
    assert str(excinfo.value) == f"reward.function={path!r}{problem}{HINT}"


def test_invalid_rewards_are_dropped_and_the_rest_kept():
    s = local_scorer(RewardConfig(function=f"{__name__}:scored_unless_bad", function_weight=2.0, on_invalid="drop"))
    out = s.score(["a", "b", "c"], ["ok", "nan", "none"], [{}, {}, {}])
    # 2.0 x 0.25 = 0.5; NaN marks a dropped sample (counted in reward/dropped by the controller)
    assert out[0] == 0.5 and math.isnan(out[1]) and math.isnan(out[2])


class _BadScoresHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        send_json(self, b'{"scores": [0.5, NaN, null]}')  # Python's json reads NaN; null is not a number

    def log_message(self, *args):
        pass


@pytest.fixture
def bad_score_server():
    with local_http_server(_BadScoresHandler) as url:
        yield url


def test_http_endpoint_nan_or_null_score(bad_score_server):
    fields = {"function_weight": 0.0, "http_weight": 1.0, "http_url": bad_score_server, "http_retries": 0}
    prompts, responses, meta = ["a", "b", "c"], ["x", "y", "z"], [{}, {}, {}]
    s = local_scorer(RewardConfig(**fields))
    with pytest.raises(RewardError) as excinfo:
        s.score(prompts, responses, meta)
    assert str(excinfo.value) == f"reward.http_url={bad_score_server!r}: reward for sample 1 (prompt 'b') is nan{HINT}"
    dropped = local_scorer(RewardConfig(**fields, on_invalid="drop"))
    out = dropped.score(prompts, responses, meta)
    assert out[0] == 0.5 and math.isnan(out[1]) and math.isnan(out[2])


# --- model paths ------------------------------------------------------------------------------


def test_unusable_local_model_paths(tmp_path):
    from rlhf_dist.models.modeling import resolve_model_path

    (tmp_path / "weights.bin").write_bytes(b"")
    for path, problem in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path, "not a Hugging Face model directory (no config.json)"),
        (tmp_path / "weights.bin", "not a Hugging Face model directory (no config.json)"),
    ):
        with pytest.raises(FileNotFoundError) as excinfo:
            resolve_model_path(str(path), cache_dir="")
        assert str(excinfo.value) == f"model.path={str(path)!r}: {problem}"


def test_relative_model_directory_becomes_absolute(tmp_path, monkeypatch):
    from rlhf_dist.models.modeling import resolve_model_path

    (tmp_path / "sft_out").mkdir()
    (tmp_path / "sft_out" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    # Without a leading "./" it used to be taken for a hub id; actors need not share the driver's cwd.
    assert resolve_model_path("sft_out", cache_dir="") == str(tmp_path.resolve() / "sft_out")


def test_unknown_hub_id_is_one_error_not_a_traceback(monkeypatch):
    import huggingface_hub.constants

    from rlhf_dist.models.modeling import resolve_model_path

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in unit tests
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model_path("no-such-org/no-such-model", cache_dir="", key="rm.init_path")
    assert str(excinfo.value) == (
        "rm.init_path='no-such-org/no-such-model': not a local path, and the Hugging Face hub (or its cache) has no "
        "such model (LocalEntryNotFoundError)"
    )
    with pytest.raises(FileNotFoundError, match=r"^model.path='a/b/c': neither a local path nor a hub id \(Repo id"):
        resolve_model_path("a/b/c", cache_dir="")


@pytest.mark.parametrize("key", ["model.path", "reward.model_path"])
def test_cli_missing_model_is_one_line_before_any_actor(tmp_path, key):
    missing = tmp_path / "missing-model"
    preset = ["reward=model"] if key == "reward.model_path" else []
    proc, elapsed = run_cli("rlhf_dist.train", *preset, f"{key}={missing}", run_dir=tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"rlhf_dist: error: {key}='{missing}': does not exist"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # the run logger, made before any actor, never was
    assert elapsed < 30.0  # imports only; starting the actors takes minutes



@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("rlhf_dist.config:nope", "cannot import it (module 'rlhf_dist.config' has no attribute 'nope')"),
        ("rlhf_dist.config:GROUPS", "tuple is not callable"),
        ("rlhf_dist.config:as_dict",
         "signature (cfg: 'Config') -> 'dict[str, Any]' must accept (prompt, response[, metadata])"),
    ],
    ids=["missing", "not-callable", "signature"],
)
def test_bad_gold_function_is_named_by_its_own_key(path, problem):
    # eval.gold_function is imported and bound like reward.function, but reported as itself
    from rlhf_dist.evaluate import gold_function

    with pytest.raises(ConfigError) as excinfo:
        gold_function(compose_config([f"eval.gold_function={path}"]))
    assert str(excinfo.value) == f"eval.gold_function={path!r}: {problem}"


def test_cli_bad_gold_function_is_one_line_before_any_actor(tmp_path):
    proc, _ = run_cli("rlhf_dist.train", "eval.gold_function=rlhf_dist.config:nope", run_dir=tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("rlhf_dist:")] == [
        "rlhf_dist: error: eval.gold_function='rlhf_dist.config:nope': cannot import it "
        "(module 'rlhf_dist.config' has no attribute 'nope')"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- tokenizers without a pad token -----------------------------------------------------------


def test_ppo_needs_no_pad_token(tiny_policy, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_dist.core.experience import collate
    from rlhf_dist.models.modeling import load_causal_lm, response_logprobs

    model_dir = copy_model(tiny_policy, tmp_path / "no-pad", tokenizer_pad=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token_id is None
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the soup was"}, {"prompt": "my visit to the new cafe was"}])
    prompts = load_prompts(str(path), DataConfig(), tokenizer, 64, seed=0)
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in (" great and warm .", " bad")]
    assert len({len(p) for p in prompts.token_ids}) == 2 and len({len(r) for r in responses}) == 2  # both padded
    # The controller collates with pad id 0; any id gives the same logprobs, since pads are masked out.
    model = load_causal_lm(str(model_dir), "float32")
    with torch.no_grad():
        by_pad = {}
        for pad in (0, 7):
            exp = collate(prompts.token_ids, responses, pad_id=pad)
            logprobs, _ = response_logprobs(model, exp, temperature=1.0)
            by_pad[pad] = torch.where(exp.response_mask.bool(), logprobs, 0.0)
    torch.testing.assert_close(by_pad[0], by_pad[7], atol=1e-6, rtol=0)


def test_sft_needs_an_eos_token(tiny_policy, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.eos_token = None
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "the soup was", "response": " great ."}])
    with pytest.raises(DataError) as excinfo:
        load_sft(str(path), DataConfig(), tokenizer, 64, seed=0)
    assert str(excinfo.value) == (
        "data.sft: the tokenizer has no EOS token, so the policy could not learn to stop; add one"
    )


def test_reward_model_stage_refuses_a_tokenizer_without_pad(tiny_policy, tmp_path):
    init = copy_model(tiny_policy, tmp_path / "no-pad", tokenizer_pad=False)
    proc, _ = run_cli("rlhf_dist.reward_model", f"rm.init_path={init}", run_dir=tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    expected = (f"rlhf_dist: error: rm.init_path='{init}': the tokenizer has no pad token (the score is read at "
                "the last non-pad token); add one to the tokenizer")
    assert [line for line in proc.stderr.splitlines() if line.startswith("rlhf_dist:")] == [expected]
    assert "Traceback" not in proc.stderr


def test_reward_model_pads_with_the_config_pad_id(tiny_reward_model, tmp_path):
    from rlhf_dist.models.modeling import load_reward_model

    # Different lengths, so the batch is padded; scored one at a time nothing is padded.
    prompts, responses, meta = ["the soup was", "my visit to the new cafe was"], [" great and warm .", " bad"], [{}, {}]

    def scores(path: Path, batch_size: int = 32) -> list[float]:
        cfg = RewardConfig(function_weight=0.0, model_weight=1.0, model_path=str(path), batch_size=batch_size,
                           normalize=False)
        return local_scorer(cfg).score(prompts, responses, meta)

    unpadded = scores(tiny_reward_model, batch_size=1)
    assert scores(tiny_reward_model) == pytest.approx(unpadded, abs=1e-5)
    no_tokenizer_pad = copy_model(tiny_reward_model, tmp_path / "no-tok-pad", tokenizer_pad=False)
    assert scores(no_tokenizer_pad) == pytest.approx(unpadded, abs=1e-5)
    no_config_pad = copy_model(tiny_reward_model, tmp_path / "no-cfg-pad", config_pad=False)
    assert scores(no_config_pad) == pytest.approx(unpadded, abs=1e-5)  # the tokenizer's pad id (0) is used
    assert load_reward_model(str(no_config_pad), "float32").config.pad_token_id == 0  # the trainer's loader too

    neither = copy_model(tiny_reward_model, tmp_path / "no-pad", tokenizer_pad=False, config_pad=False)
    problem = ("neither config.json nor the tokenizer defines a pad token (the score is read at the last non-pad "
               "token); set pad_token_id in config.json")
    with pytest.raises(ValueError) as excinfo:
        scores(neither)
    assert str(excinfo.value) == f"reward.model_path={str(neither)!r}: {problem}"
    with pytest.raises(ValueError) as excinfo:
        load_reward_model(str(neither), "float32")
    assert str(excinfo.value) == f"reward model {str(neither)!r}: {problem}"


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # 16 prompts x 1 sample < the minibatch of 32
        (["rollout.batch_size=16"], "algo.minibatch_size=32: must be <= rollout.batch_size x rollout.n = 16"),
        # the presets set rollout.n=4; a later override takes it back to 1
        (["algo=rloo", "rollout.n=1"],
         "rollout.n=1: algo.estimator=rloo compares samples of a prompt: set rollout.n >= 2"),
        (["algo=dr_grpo", "rollout.n=1"],
         "rollout.n=1: algo.estimator=dr_grpo compares samples of a prompt: set rollout.n >= 2"),
    ],
    ids=["minibatch-over-batch", "rloo-n1", "dr_grpo-n1"],
)
def test_inconsistent_rl_config(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        validate_config(compose_config(overrides))
    assert str(excinfo.value) == message


@pytest.mark.parametrize(
    ("overrides", "stage", "rows", "message"),
    [
        (["sft.batch_size=33"], "sft", None, "sft.batch_size=33: must be divisible by trainer.world_size=2"),
        # 24 / 2 ranks = 12 per rank; 12 % 8 = 4
        (["sft.batch_size=24"], "sft", None,
         "trainer.micro_batch_size=8: must divide sft.batch_size / trainer.world_size = 12"),
        ([], "rm", 10, "rm.batch_size=32: must be <= the 10 usable rows of the data"),
    ],
    ids=["sft-batch-vs-world-size", "sft-micro-batch", "rm-batch-over-rows"],
)
def test_inconsistent_supervised_config(overrides, stage, rows, message):
    with pytest.raises(ConfigError) as excinfo:
        supervised_plan(compose_config(overrides), stage, rows)
    assert str(excinfo.value) == message


def test_cli_unknown_key_without_plus_is_hydras_error_not_a_traceback(tmp_path):
    # With "+" the key reaches to_config: tests/unit/config/test_config.py::test_added_unknown_key_is_rejected_by_name.
    proc, elapsed = run_cli("rlhf_dist.train", "trainer.bogus=1", run_dir=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[:3] == [
        "Could not override 'trainer.bogus'.", "To append to your config use +trainer.bogus=1",
        "Key 'bogus' not in 'TrainerConfig'",
    ]
    assert elapsed < 10.0


def test_cli_misspelt_group_option_is_hydras_list_not_a_traceback(tmp_path):
    proc, elapsed = run_cli("rlhf_dist.train", "algo=gpro", run_dir=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[:3] == ["In 'config': Could not find 'algo/gpro'", "", "Available options in 'algo':"]
    assert "\tgrpo" in lines
    assert elapsed < 10.0


def test_cli_output_dir_that_cannot_be_written_is_one_line_before_hydra_makes_it(tmp_path):
    # Before: Hydra's own mkdir failed with 15 lines of pathlib's traceback
    # (hydra.run.dir=/proc/x: FileNotFoundError; under a file: NotADirectoryError).
    (tmp_path / "a-file").write_text("")
    proc, elapsed = run_cli("rlhf_dist.train", run_dir=tmp_path / "a-file" / "run")
    assert proc.returncode == 1, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [(
        f"rlhf_dist: error: hydra.run.dir='{tmp_path / 'a-file' / 'run'}': cannot write the run's output there "
        "(NotADirectoryError: Not a directory); choose another hydra.run.dir"
    )]
    assert elapsed < 10.0
    sweep = tmp_path / "a-file" / "sweep"
    proc = subprocess.run([sys.executable, "-m", "rlhf_dist.train", "-m", f"hydra.sweep.dir={sweep}", "seed=1,2"],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [(
        f"rlhf_dist: error: hydra.sweep.dir='{sweep}': cannot write the run's output there "
        "(NotADirectoryError: Not a directory); choose another hydra.sweep.dir"
    )]
