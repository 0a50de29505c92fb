"""The sweep summary table, from job dirs laid out as Hydra writes them."""

import json

import pytest

from rlhf_dist.driver.sweep import collect_trials, markdown_table


def job(sweep, name, overrides, summary):
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (sweep / name / "summary.json").write_text(json.dumps(summary))


def test_trials_best_first_with_failures_last(tmp_path):
    job(tmp_path, "0", ["algo.kl_coef=0.1"], {"status": "completed", "reward/last_fifth_mean": 0.5, "wall_time_s": 9.0})
    job(tmp_path, "1", ["algo.kl_coef=0.2"], {"status": "completed", "reward/last_fifth_mean": 0.8})
    job(tmp_path, "2", ["algo.kl_coef=0.3"], {"status": "failed", "error": "RoleError: ..."})
    job(tmp_path, "3", ["algo.kl_coef=0.4"], None)  # killed before it wrote a summary
    rows = collect_trials(tmp_path)
    assert [r["job"] for r in rows] == ["1", "0", "2", "3"]
    assert rows[0] == {"job": "1", "overrides": "algo.kl_coef=0.2", "status": "completed",
                       "objective": "reward/last_fifth_mean", "value": 0.8, "direction": "max"}
    assert rows[1]["wall_time_s"] == 9.0
    assert [r["status"] for r in rows[2:]] == ["failed", "no summary"]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| job | status | objective | value | wall_time_s | overrides |"
    assert table[2].startswith("| 1 | completed | reward/last_fifth_mean | 0.8 |") and len(table) == 6


@pytest.mark.parametrize(("key", "better"), [("sft/final_eval_loss", "low"), ("eval/ppo/win_rate", "high")])
def test_objective_direction_follows_the_command(tmp_path, key, better):
    job(tmp_path, "0", ["x=1"], {"status": "completed", key: 0.7})
    job(tmp_path, "1", ["x=2"], {"status": "completed", key: 0.2})
    first = collect_trials(tmp_path)[0]["job"]
    assert first == ("1" if better == "low" else "0")
