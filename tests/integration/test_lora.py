"""README command 1's job with LoRA adapters (model.lora.rank=8), through the real stack: peft's adapters
on the DeepSpeed ranks, the engines sent the adapters alone at every sync and serving them as vLLM
LoRA adapters loaded in memory (verified: their logprobs equal the trainer's), the KL
reference from the policy ranks with the adapters disabled (no reference actor), the critic's backbone
with adapters too (its value head in full), the exported policy
both merged and as a peft adapter (loaded by transformers and peft, and the adapter served by vLLM
on the base with the merged model's logprobs), and an exact resume.
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

LORA = ["model.lora.rank=8", "model.critic_lora.rank=8", "trainer.lr=1e-4", "total_steps=3", "checkpoint.every_steps=2", "logger.progress_bar=false"]


def _train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_job(out, *LORA, *overrides)


def test_default_job_with_lora_serves_the_adapted_policy_and_resumes_exactly(tiny_policy, tmp_path):
    whole = _train(tmp_path / "whole")
    rows = metric_rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "each sync sends the engines the adapters alone (they keep the base); the KL reference is the policy " \
           "with its adapters disabled (no reference actor); the critic: LoRA rank 8" in whole.stdout
    assert "reference" not in json.loads((tmp_path / "whole" / "actors.json").read_text())
    # peft starts every B at 0: at step 0 the policy is its base, so the KL to the base is exactly 0;
    # after an update it is not (the reference really is the base, not the adapted policy)
    assert rows[0]["kl/mean"] == 0.0 and rows[1]["kl/mean"] != 0.0 and rows[2]["kl/mean"] != 0.0
    # every sync (before steps 1 and 2) verified, and the engines sample from the adapted policy:
    # float32's gaps, not a base model's
    assert all(r["weight_sync/probe_gap"] < 1e-5 for r in rows[1:]), [r.get("weight_sync/probe_gap") for r in rows]
    assert all(r["logprob_gap/mean"] < 1e-5 for r in rows), [r["logprob_gap/mean"] for r in rows]
    _check_export(tmp_path / "whole" / "policy", tiny_policy)
    _check_vllm_serves_the_exported_adapter(tmp_path / "whole" / "policy", tiny_policy)

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


SERVE_ADAPTER = """
import json, sys
from vllm import LLM, SamplingParams, TokensPrompt
from vllm.lora.request import LoRARequest
base, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model=base, dtype="float32", enable_lora=True, max_lora_rank=8, enforce_eager=True, max_model_len=64,
          kv_cache_memory_bytes=2**26)
params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=LoRARequest("exported", 1, adapter))[0]
print(json.dumps([step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]))
"""


def _check_vllm_serves_the_exported_adapter(policy: Path, base_path: str) -> None:
    """vLLM serves the exported adapter directory on the base model (a LoRARequest of its path) with the
    merged export's logprobs."""
    import os
    import sys

    from transformers import AutoModelForCausalLM

    ids = list(range(3, 19))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run([sys.executable, "-c", SERVE_ADAPTER, base_path, str(policy / "adapter"), json.dumps(ids)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(policy).eval()(torch.tensor([ids])).logits[0, :-1]
    merged = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(served, merged, atol=1e-4, rtol=0)
