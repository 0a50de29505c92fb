"""README command 1's job with LoRA adapters (model.lora.rank=8), through the real stack: peft's adapters
on the DeepSpeed ranks, the engines served the merged weights after every sync (verified), the KL
reference from the policy ranks with the adapters disabled (no reference actor), the exported policy
both merged and as a peft adapter, and an exact resume.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.test_reliability import deterministic, run_job
from tests.integration.test_reliability import rows as metric_rows

pytestmark = pytest.mark.slow

LORA = ["model.lora.rank=8", "trainer.lr=1e-4", "total_steps=3", "checkpoint.every_steps=2", "logger.progress_bar=false"]


def _train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_job(out, *LORA, *overrides)


def test_default_job_with_lora_serves_the_adapted_policy_and_resumes_exactly(tiny_policy, tmp_path):
    whole = _train(tmp_path / "whole")
    rows = metric_rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "the KL reference is the policy with its adapters disabled (no reference actor)" in whole.stdout
    assert "reference" not in json.loads((tmp_path / "whole" / "actors.json").read_text())
    # peft starts every B at 0: at step 0 the policy is its base, so the KL to the base is exactly 0;
    # after an update it is not (the reference really is the base, not the adapted policy)
    assert rows[0]["kl/mean"] == 0.0 and rows[1]["kl/mean"] != 0.0 and rows[2]["kl/mean"] != 0.0
    # every sync (before steps 1 and 2) verified, and the engines sample from the adapted policy:
    # float32's gaps, not a base model's
    assert all(r["weight_sync/probe_gap"] < 1e-5 for r in rows[1:]), [r.get("weight_sync/probe_gap") for r in rows]
    assert all(r["logprob_gap/mean"] < 1e-5 for r in rows), [r["logprob_gap/mean"] for r in rows]
    _check_export(tmp_path / "whole" / "policy", tiny_policy)

    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000002"
    _train(tmp_path / "resumed", f"resume={checkpoint}")
    resumed = metric_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [2]
    assert deterministic(resumed[0]) == deterministic(rows[2])


def _check_export(policy: Path, base_path: str) -> None:
    """The merged model computes what peft's base + adapter computes, and the adapter moved it off the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(policy).eval()
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, policy / "adapter").eval()
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
        assert (merged(ids).logits - base_logits).abs().max() > 1e-3
