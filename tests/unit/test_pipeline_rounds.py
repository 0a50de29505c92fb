"""The iterated pipeline's plan, without running a stage: which stages run in which directory,
with which artifacts, and how a round's samples are ranked and summarised."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.config import Config, ConfigError, PipelineConfig
from rlhf_dist.driver.data import DataError
from rlhf_dist.label import (
    KEY_FILE,
    best_shares,
    export_samples,
    import_rankings,
    labeller,
    rank_samples,
    waiting_for_rankings,
)
from rlhf_dist.pipeline import Artifacts, stage_config, stage_plan, validate


def test_one_round_is_the_pipeline_of_old_and_each_further_round_has_its_directory():
    assert stage_plan(1) == [(1, "sft", "sft"), (1, "reward_model", "reward_model"), (1, "ppo", "ppo"),
                             (1, "evaluate", "evaluate")]
    assert [where for _, _, where in stage_plan(3)[3:]] == [
        "round_2/label", "round_2/reward_model", "round_2/ppo", "round_3/label", "round_3/reward_model",
        "round_3/ppo", "evaluate"]


def test_each_stage_gets_the_artifacts_of_the_ones_before():
    cfg = Config()
    art = Artifacts()
    art.record("sft", {"model_path": "/o/sft/model"})
    assert stage_config(cfg, 1, "reward_model", art).rm.init_path == "/o/sft/model"
    art.record("reward_model", {"model_path": "/o/rm1"})
    ppo1 = stage_config(cfg, 1, "ppo", art)
    assert (ppo1.model.path, ppo1.reference.path, ppo1.reward.model_path) == ("/o/sft/model", "", "/o/rm1")
    art.record("ppo", {"policy_path": "/o/ppo/policy"})
    label = stage_config(cfg, 2, "label", art)
    assert label.eval.policies == {"policy": "/o/ppo/policy", "sft": "/o/sft/model"}
    assert label.pipeline.label_round == 2
    art.record("label", {"rankings_path": "/o/round_2/label/rankings.jsonl"})
    rm2 = stage_config(cfg, 2, "reward_model", art)
    # continued from the previous reward model on the new rankings, held out on the first round's set
    assert (rm2.rm.init_path, rm2.data.preferences) == ("/o/rm1", "/o/round_2/label/rankings.jsonl")
    assert rm2.data.eval_preferences == "builtin:reviews"
    art.record("reward_model", {"model_path": "/o/rm2"})
    ppo2 = stage_config(cfg, 2, "ppo", art)
    assert (ppo2.model.path, ppo2.reference.path, ppo2.reward.model_path) == ("/o/ppo/policy", "/o/sft/model", "/o/rm2")
    previous = stage_config(Config(pipeline=PipelineConfig(kl_reference="previous")), 2, "ppo", art)
    assert previous.reference.path == "/o/ppo/policy"
    art.record("ppo", {"policy_path": "/o/round_2/ppo/policy"})
    ev = stage_config(cfg, 2, "evaluate", art)
    assert ev.eval.policies == {"sft": "/o/sft/model", "round_1": "/o/ppo/policy", "ppo": "/o/round_2/ppo/policy"}
    assert ev.eval.baseline == "sft" and ev.reward.model_path == "/o/rm2"


def test_the_labeller_ranks_each_prompts_samples_and_names_their_writers():
    cfg = Config()
    cfg.data.annotator_noise = 0.0
    texts = ["the pasta was", "the room was"]
    samples = {"policy": [["great great good", "great"], ["bad", "bad"]],
               "sft": [["bad awful"], ["bad"]]}
    rows = rank_samples(cfg, texts, samples)
    assert len(rows) == 1  # the second prompt's three responses tie: nothing to learn, dropped
    (row,) = rows
    assert row["prompt"] == "the pasta was" and row["ranks"] == sorted(row["ranks"])
    assert row["responses"][-1] == "bad awful" and row["policies"][-1] == "sft"
    assert set(row["policies"][:2]) == {"policy"}
    assert best_shares(rows, ["policy", "sft"]) == {"label/policy/best": 1.0, "label/sft/best": 0.0}


def test_rounds_need_a_labeller():
    cfg = Config()
    cfg.data.prompts = "/data/prompts.jsonl"
    with pytest.raises(ConfigError, match=r"^data.prompts='/data/prompts.jsonl': labelling a round needs"):
        labeller(cfg)
    cfg.pipeline.rounds = 2
    cfg.reward.model_weight, cfg.reward.function_weight = 1.0, 0.0
    with pytest.raises(ConfigError, match="labelling a round needs"):
        validate(cfg)


def test_an_export_imported_back_becomes_the_rankings_and_bad_rows_are_one_line(tmp_path):
    cfg = Config()
    samples = {"policy": [["good", "fine"], ["same", "same"]], "sft": [["bad"], ["same"]]}
    export = export_samples(cfg, tmp_path, ["p0", "p1"], samples)
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    # prompt 1's three responses are one text: nothing to rank, not exported; no policy is named
    assert [r["id"] for r in rows] == [0] and set(rows[0]) == {"id", "prompt", "responses"}
    assert sorted(rows[0]["responses"]) == ["bad", "fine", "good"]
    assert "waits for its rankings" in waiting_for_rankings(tmp_path)
    key = [json.loads(line) for line in (tmp_path / KEY_FILE).read_text().splitlines()]

    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"id": 0, "responses": ["good", "fine", "bad"], "ranks": [0, 0, 1]}) + "\n")
    (row,) = import_rankings(ranked, key)
    assert row == {"prompt": "p0", "responses": ["good", "fine", "bad"], "ranks": [0, 0, 1],
                   "policies": ["policy", "policy", "sft"]}

    bad = {
        '{"id": 7, "responses": ["good", "fine", "bad"]}': "ranked.jsonl:1: id 7 is not in the export",
        '{"id": 0, "responses": ["good", "great", "bad"]}': "ranked.jsonl:1: response 'great' is not one of id 0's",
        '{"id": 0, "responses": ["good", "good", "bad"]}': "ranked.jsonl:1: response 'good' listed 2 times",
        '{"id": 0, "responses": ["good", "bad"]}': "ranked.jsonl:1: incomplete ranking: 2 of id 0's 3 responses",
        '{"id": 0, "responses": ["good", "fine", "bad"]}\n{"id": 0, "responses": ["bad", "fine", "good"]}':
            "ranked.jsonl:2: id 0 ranked twice (first on line 1)",
        '{"id": 0, "responses": ["good", "fine", "bad"], "ranks": [1, 1, 1]}': "ranked.jsonl:1: all 3 responses are tied",
        '{"id": 0}': 'ranked.jsonl:1: not a {"id", "responses"} row',
    }
    for text, message in bad.items():
        ranked.write_text(text + "\n")
        with pytest.raises(DataError) as e:
            import_rankings(ranked, key)
        assert str(e.value).startswith(str(tmp_path / message.split(":", 1)[0]) + ":" + message.split(":", 1)[1]), (
            str(e.value))
