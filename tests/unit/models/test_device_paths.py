"""Every trainer-side forward path builds its tensors on its inputs' device (issue 24).

No GPU here, so the CPU stands in for the accelerator and the ``meta`` device for "anywhere
else": under ``torch.device("meta")`` a tensor factory called without ``device=`` makes a meta
tensor, and mixing one with the CPU model and inputs raises "Tensor on device cpu is not on the
expected device meta". A path that passes here keeps every tensor it makes where its inputs are,
so on a GPU it cannot hand the model CPU ids. Before the fix, every packed path failed here (the
packed layout was built with ``torch.zeros``/``arange``/``tensor`` on the default device) while
the padded ones passed. ``scripts/gpu_check.sh`` runs the same paths on a real GPU.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_dist.core.experience import collate, collate_rankings
from rlhf_dist.core.losses import actor_loss, ranking_loss, sft_loss, value_loss
from rlhf_dist.models.modeling import (
    load_causal_lm,
    load_critic,
    load_reward_model,
    ranking_scores,
    response_logprobs,
    response_values,
)
from rlhf_dist.roles.reference import ReferenceModel
from rlhf_dist.roles.spec import RankSpec

LAYOUTS = [(False, 0), (True, 0), (True, 5)]  # (packed, chunk_tokens)


@pytest.fixture(scope="module")
def exp():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 1, 5)]
    responses = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (6, 1, 3)]
    out = collate(prompts, responses, pad_id=0)
    mask = out.response_mask
    return out.with_fields(old_logprobs=-5.0 * mask, ref_logprobs=-5.0 * mask,
                           advantages=torch.ones_like(mask), returns=mask.clone(), old_values=torch.zeros_like(mask))


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return load_causal_lm(tiny_policy, "float32")


@pytest.mark.parametrize("packed,chunk", LAYOUTS)
def test_policy_and_sft_passes_with_their_losses_stay_on_the_inputs_device(policy, exp, packed, chunk):
    with torch.device("meta"):
        logprobs, entropy = response_logprobs(policy, exp, 0.7, True, packed=packed, chunk_tokens=chunk)
        loss, _ = actor_loss(
            logprobs, exp.old_logprobs, exp.ref_logprobs, exp.advantages, entropy, exp.response_mask, 0.2,
            clip_eps_high=None, dual_clip=None, agg="token_mean", max_len=6, rollout_weights=None,
            entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3",
        )
        (loss + sft_loss(logprobs, exp.response_mask)).backward()
    assert logprobs.device.type == "cpu" and torch.isfinite(loss)


@pytest.mark.parametrize("packed,chunk", LAYOUTS)
def test_reference_logprobs_stay_on_the_inputs_device(tiny_policy, exp, packed, chunk):
    spec = RankSpec(rank=0, world_size=1, device="cpu", seed=0, timeout_s=10.0, model_path=tiny_policy)
    reference = ReferenceModel(spec=spec, dtype="float32", batch_size=2, temperature=0.7, packing=packed,
                               chunk_tokens=chunk)
    with torch.device("meta"):
        logprobs = reference.logprobs(exp)
    assert logprobs.shape == exp.response_mask.shape and logprobs.device.type == "cpu"


@pytest.mark.parametrize("packed", [False, True])
def test_critic_values_and_value_loss_stay_on_the_inputs_device(tiny_policy, exp, packed):
    critic = load_critic(tiny_policy, "float32")
    with torch.device("meta"):
        values = response_values(critic, exp, packed)
        loss, _ = value_loss(values, exp.old_values, exp.returns, exp.response_mask, 0.2)
        loss.backward()
    assert values.device.type == "cpu" and torch.isfinite(loss)


@pytest.mark.parametrize("packed", [False, True])
def test_reward_model_scores_and_ranking_loss_stay_on_the_inputs_device(tiny_reward_model, packed):
    model = load_reward_model(tiny_reward_model, "float32")
    pad = model.config.pad_token_id
    # a ranking of three with a tie, and a pair (an empty slot)
    batch = collate_rankings([[[5, 6, 7], [9, 10], [4]], [[8], [11, 12, 13, 14]]], [[0, 1, 1], [0, 1]], pad)
    with torch.device("meta"):
        scores = ranking_scores(model, batch, pad, packed=packed)
        loss, _ = ranking_loss(scores, batch.ranks)
        loss.backward()
    assert scores.device.type == "cpu" and torch.isfinite(loss)
