"""The README's family matrix says what is true: its families are ``models.tiny.FAMILIES``, with
their classes, experts and heads, and its ZeRO stages and engines are those the integration cases
(``tests/integration/test_architectures.py``) run."""

from __future__ import annotations

from rlhf_dist.models.tiny import FAMILIES
from tests.conftest import REPO, compose_config
from tests.integration.test_architectures import CASES, _config

HEADING = "### Model families and mixtures of experts"


def _matrix() -> dict[str, list[str]]:
    """family -> its row's other cells, from the first table under HEADING."""
    text = (REPO / "README.md").read_text()
    rows = {}
    for line in text[text.index(HEADING):].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("| `"):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_matrix_lists_every_family_with_its_class_experts_and_head():
    matrix = _matrix()
    assert list(matrix) == list(FAMILIES)
    for name, family in FAMILIES.items():
        model, experts, head = matrix[name][:3]
        assert model == family.model
        moe = "num_experts" in family.overrides
        assert experts == (f"{family.overrides['num_experts']}, top-{family.overrides['num_experts_per_tok']}"
                           if moe else "dense"), name
        assert head == ("tied" if family.tied else "untied"), name


def test_the_matrix_says_how_each_family_runs_the_whole_stack():
    matrix = _matrix()
    # a family's case is named after it; a variant of it in another dtype or with LoRA adds a suffix
    variants = {name for name in CASES if name not in FAMILIES}
    assert variants == {"qwen3-bf16", "llama-tied-lora", "phi3-lora"}
    readme = (REPO / "README.md").read_text()
    assert "again in bfloat16 (`qwen3-bf16`" in readme
    assert "again with LoRA (`llama-tied-lora`" in readme and "again with LoRA (`phi3-lora`" in readme
    assert {name for name, row in matrix.items() if row[3] != "—"} == set(CASES) - variants
    for name in set(CASES) - variants:
        cfg = _config(CASES[name])
        stage, engines = matrix[name][3:5]
        assert stage == str(cfg.trainer.zero_stage), name
        assert engines == f"{cfg.rollout.num_engines} × {cfg.rollout.tensor_parallel_size}", name
    assert compose_config([]).resources.weight_sync_backend == "gloo"  # the transport the matrix names
