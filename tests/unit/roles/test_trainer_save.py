"""save_model of a trainer rank writes the full parameters through ``_full_params``, tied heads
included. The rank runs without DeepSpeed here: ZeRO-0 parameters, which ``_full_params`` yields
as they are (the ZeRO-3 gathers are exercised by tests/integration/test_ppo_stack.py)."""

from types import SimpleNamespace

import pytest
import torch

from rlhf_dist.config import ModelConfig, TrainerConfig, TrainerPlan
from rlhf_dist.models.modeling import load_causal_lm
from rlhf_dist.models.tiny import build_random_lm
from rlhf_dist.roles.spec import RankSpec
from rlhf_dist.roles.trainer import SFTTrainer


def _rank(model, model_path: str, rank: int) -> SFTTrainer:
    spec = RankSpec(rank=rank, world_size=2, device="cpu", seed=0, timeout_s=10.0, model_path=model_path)
    plan = TrainerPlan(per_rank_minibatch=1, grad_accum_steps=1, optimizer_steps=1)
    trainer = SFTTrainer(spec=spec, cfg=TrainerConfig(), model_cfg=ModelConfig(), plan=plan, lr=1e-3)
    trainer.engine = SimpleNamespace(module=model)  # what save_model reads of a DeepSpeed engine
    return trainer


@pytest.mark.parametrize("family", ["llama-tied", "llama"])
def test_save_model_writes_every_trained_weight(family, tiny_policy, tmp_path):
    path = str(build_random_lm(tmp_path / family, family, tiny_policy))
    model = load_causal_lm(path, "float32")
    with torch.no_grad():  # "training": the saved weights must be these, not the initial ones
        for p in model.parameters():
            p.add_(0.5)
    assert _rank(model, path, rank=1).save_model(str(tmp_path / "out")) == ""  # only rank 0 writes
    assert not (tmp_path / "out").exists()
    out = _rank(model, path, rank=0).save_model(str(tmp_path / "out"), extra_files={"note.txt": "hi"})
    saved = load_causal_lm(out, "float32")
    expected, got = model.state_dict(), saved.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # a tied head is one tensor, written once under the embedding's name and tied again on load
    tied = family == "llama-tied"
    assert (saved.lm_head.weight is saved.model.embed_tokens.weight) == tied
    assert (tmp_path / "out" / "note.txt").read_text() == "hi"
