"""The package's layers, as contracts: imports point down, no cycles, config and tasks stay light.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are checked by
import-linter on grimp's import graph, which holds function-local imports too (checked below:
a layer broken inside a function body is still broken). The light imports are also checked by
behaviour: importing ``rlhf_dist.config`` in a fresh interpreter loads neither torch nor Ray.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO


def test_every_import_contract_is_kept():
    # Layers, one module per weight-sync transport, no cycles, light config, pure tasks and math;
    # the report names each broken import.
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 0, out.stdout[out.stdout.find("Broken contracts"):] + out.stderr


def test_the_import_graph_holds_function_local_imports():
    # rlhf_dist.models.modeling imports the tiny-model builder only inside resolve_model_path: the
    # layering contracts see it as an import all the same.
    graph = grimp.build_graph("rlhf_dist", cache_dir=None)
    details = graph.get_import_details(importer="rlhf_dist.models.modeling", imported="rlhf_dist.models.tiny")
    assert details and all(d["line_contents"].startswith("from rlhf_dist.models import tiny") for d in details)
    source = (REPO / "rlhf_dist" / "models" / "modeling.py").read_text().splitlines()
    assert all(source[d["line_number"] - 1].startswith("    ") for d in details)  # indented: inside a function


@pytest.mark.parametrize("module", ["rlhf_dist.config", "rlhf_dist.registry", "rlhf_dist.tasks.calculator",
                                    "rlhf_dist.tasks.arithmetic", "rlhf_dist.tasks.reviews"])
def test_config_and_task_modules_import_neither_torch_nor_ray(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'ray', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
