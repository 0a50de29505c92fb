"""LoRA adapters served by vLLM on every dense family of the architecture matrix (tied and untied
heads, q/k/v biases, q/k norms, Gemma's norms and scaled embedding, Phi-3's fused qkv_proj and
gate_up_proj, Granite's multipliers): the tensors an adapter-only sync sends, loaded by the engines'
``AdapterReceiver`` in memory, give the logprobs of transformers + peft with those adapters to float32
precision, and the base model alone (what an engine that dropped the adapter serves) is far from them.
A mixture of experts, whose experts vLLM does not adapt from peft's tensors, is refused in one line, by
the check the engines run at start (``unknown_adapter_layers``) and by the load itself.
One process (``lora_serving.py``, vLLM in process, no Ray), one engine per family. The transport and
the verification around it run in ``test_lora.py`` and the ``phi3-lora`` case of ``test_architectures.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

FAMILIES = ("llama-tied", "qwen2", "qwen3", "gemma3", "phi3", "granite")


def test_every_dense_family_serves_the_trainers_adapters_and_a_moe_is_refused_in_one_line(tiny_policy, tmp_path):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.lora_serving", str(tmp_path), tiny_policy,
                           *FAMILIES, "qwen3-moe"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in (json.loads(line.removeprefix("LORA_SERVING "))
                                     for line in proc.stdout.splitlines() if line.startswith("LORA_SERVING "))}
    assert list(rows) == [*FAMILIES, "qwen3-moe"], proc.stdout[-3000:]
    for family in FAMILIES:
        row = rows[family]
        assert "error" not in row, row
        # every projection of both layers adapted (Phi-3's are fused in its checkpoint: half the tensors)
        assert row["layers"] == 8 and row["tensors"] == (16 if family == "phi3" else 28) and row["unknown"] == [], row
        assert row["adapter"] < 1e-4 and row["base"] > 1e-2, row
    # refused by the check at start (GenerationEngine.check_adapter: before any sync), and by the load
    moe = rows["qwen3-moe"]
    assert moe["unknown"] == ["model.layers.0.mlp.experts.base_layer", "model.layers.1.mlp.experts.base_layer"], moe
    assert moe["error"] == ("ValueError: adapter tensors for 2 layers this engine cannot adapt (model.layers.0.mlp."
                            "experts.base_layer, model.layers.1.mlp.experts.base_layer); use model.lora.sync=merged"), moe
