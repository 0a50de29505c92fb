"""The trainer-side passes on a GPU, with nothing but PyTorch (CUDA), transformers and pytest.

``scripts/gpu_check.sh`` runs this module. On the device: the policy's, the reference's, the
critic's and the reward model's forward passes, packed and padded, chunked logprobs against the
model's own logits, in float32 and bfloat16 (bounds: ``assert_close``), the losses with their
backward passes, a mixture of experts (packed = padded, its own routing replayed, a backward pass
with the routers' load-balancing loss), LoRA adapters when peft is installed (only they get gradients,
disabled they give the base model, their merge gives the adapted policy), and, when DeepSpeed (and hydra-core/omegaconf, which the trainer's config
imports) are installed, one ZeRO-2 update of each trainer rank. No vLLM, Ray or network: the tiny
models are built locally. What only the full stack checks (vLLM on CUDA, the NCCL weight sync,
sleep/wake) is ``scripts/gpu_smoke.sh``'s.

Skipped without CUDA; ``RLHF_DIST_CHECK_DEVICE=cpu`` runs it on the CPU with the meta device as
the default one (``off_device``), so a tensor made without ``device=`` fails there as on a GPU.
"""

from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import pytest
import torch

from rlhf_dist.core.experience import Experience, RankingBatch, collate, collate_rankings
from rlhf_dist.core.losses import actor_loss, ranking_loss, sft_loss, value_loss
from rlhf_dist.core.stats import logprobs_from_logits
from rlhf_dist.models.modeling import (
    PROBE_TOLERANCE,
    load_causal_lm,
    load_critic,
    load_reward_model,
    ranking_scores,
    response_logprobs,
    response_values,
)
from rlhf_dist.models.routing import own_routing
from rlhf_dist.roles.reference import ReferenceModel
from rlhf_dist.roles.spec import RankSpec
from tests.gpu.conftest import DEVICE_ENV, check_device, off_device

DEVICE = check_device()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason=f"no CUDA device ({DEVICE_ENV}=cpu runs these checks on the CPU)"),
]
TEMPERATURE = 0.7
CHUNK = 7  # response tokens per logprob chunk: several chunks per pass


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def dtype(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rows() -> Experience:
    """8 rows, on the CPU: prompts of 1-15 tokens, responses of 1-30 (one empty, kept as one pad),
    with the fields a PPO update reads."""
    gen = torch.Generator().manual_seed(0)
    lengths = [30, 1, 12, 0, 5, 22, 2, 9]
    prompts = [torch.randint(3, 500, (1 + 2 * i,), generator=gen).tolist() for i in range(len(lengths))]
    responses = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
    exp = collate(prompts, responses, pad_id=0)
    mask = exp.response_mask
    return exp.with_fields(
        old_logprobs=(-6.0 + torch.randn(mask.shape, generator=gen)) * mask,
        ref_logprobs=(-6.0 + torch.randn(mask.shape, generator=gen)) * mask,
        advantages=torch.randn(len(lengths), 1, generator=gen).expand_as(mask) * mask,
        returns=torch.randn(mask.shape, generator=gen) * mask,
        old_values=torch.zeros_like(mask),
    )


@pytest.fixture(scope="module")
def exp(rows) -> Experience:
    return rows.map_tensors(lambda t: t.to(DEVICE))


@pytest.fixture(scope="module")
def pair_rows() -> RankingBatch:
    """Preferences, on the CPU, padded with the tiny models' pad id (0): rankings of three (one with
    a tie) beside a pair, whose third slot is empty."""
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 17, 4, 30, 2, 9, 12, 6)]
    return collate_rankings([rows[:3], rows[3:5], rows[5:]], [[0, 1, 1], [0, 1], [2, 0, 1]], pad_id=0)


def _critic(path: str, dtype: str):
    critic = load_critic(path, dtype)
    # The head starts at zero (values 0 everywhere, a comparison that cannot fail): N(0, 1/H) gives
    # values of order 1, drawn in float32 so both dtypes' heads are the same numbers.
    head = critic.value_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(2)) * head.shape[1] ** -0.5)
    return critic.to(DEVICE).eval()


@pytest.fixture(scope="module")
def policy(tiny_policy, dtype):
    return load_causal_lm(tiny_policy, dtype).to(DEVICE).eval()  # load_causal_lm probes it on the CPU first


@pytest.fixture(scope="module")
def critic(tiny_policy, dtype):
    return _critic(tiny_policy, dtype)


@pytest.fixture(scope="module")
def reward_model(tiny_reward_model, dtype):
    return load_reward_model(tiny_reward_model, dtype).to(DEVICE).eval()


@pytest.fixture(scope="module")
def float32_padded(tiny_policy, tiny_reward_model, exp, pair_rows):
    """The padded passes in float32 on the device: (logprobs, entropy), values, scores. A bfloat16
    pass differs from them by its own rounding, which packing must not add much to."""
    with torch.no_grad():
        policy = load_causal_lm(tiny_policy, "float32").to(DEVICE).eval()
        logprobs = torch.stack(response_logprobs(policy, exp, TEMPERATURE, True))
        values = response_values(_critic(tiny_policy, "float32"), exp)
        reward_model = load_reward_model(tiny_reward_model, "float32").to(DEVICE).eval()
        pairs = pair_rows.map_tensors(lambda t: t.to(DEVICE))
        scores = ranking_scores(reward_model, pairs, reward_model.config.pad_token_id)
    return {"logprobs": logprobs, "values": values, "scores": scores}


def assert_close(
    got: torch.Tensor, expected: torch.Tensor, float32: torch.Tensor, dtype: str, record_gap, what: str = ""
) -> None:
    """max |got - expected| <= PROBE_TOLERANCE[dtype] + max |expected - float32|: in float32 the load-time
    probe's bound; in bfloat16 that plus the rounding the dtype itself already shows against float32
    (on the tiny policy at temperature 0.7, logprobs up to -25: ~0.1 in bfloat16, more than the probe's
    5e-2 alone, which packing shifts by ~0.07 at worst). A packing bug moves values by far more."""
    assert got.device == expected.device and got.shape == expected.shape
    noise = 0.0 if dtype == "float32" else (expected.float() - float32).abs().max().item()
    gap, tolerance = (got.float() - expected.float()).abs().max().item(), PROBE_TOLERANCE[dtype] + noise
    record_gap(gap, tolerance, what)
    assert gap <= tolerance, f"max |gap| {gap:.3g} > {tolerance:.3g} ({dtype}: probe's + own rounding {noise:.3g})"


@torch.no_grad()
def test_policy_logprobs_and_entropies_packed_and_chunked_equal_padded(policy, exp, float32_padded, dtype, record_gap):
    with off_device(DEVICE):
        padded = response_logprobs(policy, exp, TEMPERATURE, True)
        packed = response_logprobs(policy, exp, TEMPERATURE, True, packed=True, chunk_tokens=CHUNK)
    assert padded[0].device.type == DEVICE
    assert (padded[0][exp.response_mask == 0] == 0).all()  # nothing computed at padding
    assert_close(torch.stack(packed), torch.stack(padded), float32_padded["logprobs"], dtype, record_gap)


@torch.no_grad()
def test_chunked_logprobs_equal_the_models_own_logits(policy, exp, float32_padded, dtype, record_gap):
    # The output at position P + t - 1 predicts response token t (modeling._response_slice).
    width, steps = exp.prompt_width, exp.response_mask.shape[1]
    logits = policy(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids,
                    use_cache=False).logits[:, width - 1 : width + steps - 1]
    expected = logprobs_from_logits(logits.float() / TEMPERATURE, exp.response_ids) * exp.response_mask
    for packed in (False, True):
        with off_device(DEVICE):
            got, _ = response_logprobs(policy, exp, TEMPERATURE, packed=packed, chunk_tokens=CHUNK)
        assert_close(got, expected, float32_padded["logprobs"][0], dtype, record_gap, "packed" if packed else "padded")


@torch.no_grad()
def test_reference_logprobs_packed_equal_padded(tiny_policy, rows, float32_padded, dtype, record_gap):
    spec = RankSpec(rank=0, world_size=1, device=DEVICE, seed=0, timeout_s=60.0, model_path=tiny_policy)
    out = []
    for packed in (False, True):
        reference = ReferenceModel(spec=spec, dtype=dtype, batch_size=3, temperature=TEMPERATURE, packing=packed,
                                   chunk_tokens=CHUNK)
        with off_device(DEVICE):
            out.append(reference.logprobs(rows))  # the role moves the rows to its device and back
    assert_close(out[1], out[0], float32_padded["logprobs"][0].cpu(), dtype, record_gap)


@torch.no_grad()
def test_critic_values_packed_equal_padded(critic, exp, float32_padded, dtype, record_gap):
    with off_device(DEVICE):
        padded, packed = (response_values(critic, exp, packed) for packed in (False, True))
    assert padded.abs().max() > 0.1
    assert_close(packed, padded, float32_padded["values"], dtype, record_gap)


@torch.no_grad()
def test_reward_model_ranking_scores_packed_equal_padded(reward_model, pair_rows, float32_padded, dtype, record_gap):
    pairs = pair_rows.map_tensors(lambda t: t.to(DEVICE))
    pad = reward_model.config.pad_token_id
    with off_device(DEVICE):
        padded, packed = (ranking_scores(reward_model, pairs, pad, packed) for packed in (False, True))
    assert padded.device.type == DEVICE
    assert_close(packed, padded, float32_padded["scores"], dtype, record_gap)


def _assert_gradients_finite_on_device(model: torch.nn.Module) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter got a gradient"
    assert all(g.device.type == DEVICE and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_actor_and_sft_losses_backward(policy, exp, dtype):
    policy.train()
    try:
        with off_device(DEVICE):
            logprobs, entropy = response_logprobs(policy, exp, TEMPERATURE, True, packed=True, chunk_tokens=CHUNK)
            loss, stats = actor_loss(
                logprobs, exp.old_logprobs, exp.ref_logprobs, exp.advantages, entropy, exp.response_mask, 0.2,
                clip_eps_high=0.28, dual_clip=3.0, agg="token_mean", max_len=30, rollout_weights=None,
                entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3",
            )
            loss = loss + sft_loss(logprobs, exp.response_mask)
            loss.backward()
    finally:
        policy.eval()
    assert torch.isfinite(loss) and loss.device.type == DEVICE, stats
    _assert_gradients_finite_on_device(policy)


def test_value_loss_backward(critic, exp, dtype):
    with off_device(DEVICE):
        values = response_values(critic, exp, packed=True)
        loss, _ = value_loss(values, exp.old_values, exp.returns, exp.response_mask, 0.2)
        loss.backward()
    assert torch.isfinite(loss) and loss.device.type == DEVICE
    _assert_gradients_finite_on_device(critic)


def test_ranking_loss_backward(reward_model, pair_rows, dtype):
    pairs = pair_rows.map_tensors(lambda t: t.to(DEVICE))
    with off_device(DEVICE):
        scores = ranking_scores(reward_model, pairs, reward_model.config.pad_token_id, packed=True)
        loss, _ = ranking_loss(scores, pairs.ranks)
        loss.backward()
    assert torch.isfinite(loss) and loss.device.type == DEVICE
    _assert_gradients_finite_on_device(reward_model)


# ---------------------------------------------------------------- one DeepSpeed ZeRO-2 update per rank kind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer_module():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed==0.19.8)")
    try:
        from rlhf_dist.roles import trainer
    except ModuleNotFoundError as e:  # rlhf_dist.config imports hydra and omegaconf
        if e.name not in ("hydra", "omegaconf"):
            raise
        pytest.skip(f"rlhf_dist.roles.trainer needs {e.name} (pip install hydra-core==1.3.8 omegaconf)")
    return trainer


@pytest.mark.parametrize("role", ["policy", "critic", "reward"])
def test_deepspeed_zero2_update(role, tiny_policy, tiny_reward_model, rows, pair_rows, dtype):
    """A rank as the trainer group builds it (``setup``: torch.distributed, nccl on CUDA, and
    ``deepspeed.initialize``), alone in its group: a forward pass, then one optimizer step of 2
    micro-batches, packed and chunked, moves the weight matrices the gradient reaches."""
    trainer = _trainer_module()
    from rlhf_dist.config import AlgoConfig, ModelConfig, RunPlan, TrainerConfig

    path = tiny_reward_model if role == "reward" else tiny_policy
    spec = RankSpec(rank=0, world_size=1, device=DEVICE, seed=0, timeout_s=120.0, model_path=path)
    cfg = TrainerConfig(world_size=1, zero_stage=2, micro_batch_size=4, logprob_chunk_tokens=CHUNK)
    plan = RunPlan(per_rank_minibatch=len(rows), grad_accum_steps=2, optimizer_steps=1, rollout_batch=len(rows),
                   minibatches_per_epoch=1)
    common = {"spec": spec, "cfg": cfg, "model_cfg": ModelConfig(path=path, dtype=dtype), "plan": plan}
    if role == "policy":
        rank = trainer.PolicyTrainer(**common, temperature=TEMPERATURE, max_new_tokens=30)
    elif role == "critic":
        rank = trainer.CriticTrainer(**common, value_clip_eps=0.2)
    else:
        rank = trainer.RewardModelTrainer(**common, lr=1e-3)
    rank.setup("127.0.0.1", _free_port())
    assert rank.engine.device.type == DEVICE
    before = {n: p.detach().clone() for n, p in rank.engine.module.named_parameters() if p.dim() == 2}
    if role == "policy":
        old, _ = rank.logprobs(rows)
        stats, used, _ = rank.train(rows.with_fields(old_logprobs=old), 1, AlgoConfig(kl_in="loss", kl_estimator="k3"),
                                    0.1)
        assert torch.equal(used, old)  # the pi_old it was given is the one it used
        loss = stats["policy_loss"]
    elif role == "critic":
        values = rank.values(rows)
        stats = rank.train(rows.with_fields(old_values=values), 1)
        loss = stats["value_loss"]
    else:
        scores = rank.scores(pair_rows)
        assert scores.shape == pair_rows.ranks.shape
        loss = rank.train(pair_rows)["loss"]
    assert math.isfinite(loss), loss
    moved = {n for n, p in rank.engine.module.named_parameters() if n in before and not torch.equal(p, before[n])}
    # The critic's value head starts at zero, so no gradient reaches its backbone in the first step.
    expected = {"value_head.weight"} if role == "critic" else set(before)
    assert moved == expected, f"weights not updated: {sorted(expected - moved)}; updated: {sorted(moved - expected)}"


@pytest.fixture(scope="module")
def moe_policy(tiny_policy, tmp_path_factory, dtype):
    """The tiny Qwen3-MoE (4 experts, 2 per token, random init) on the device."""
    from rlhf_dist.models.tiny import build_random_lm

    path = build_random_lm(tmp_path_factory.mktemp("moe") / "qwen3-moe", "qwen3-moe", tiny_policy)
    return load_causal_lm(str(path), dtype).to(DEVICE)


def test_moe_packed_equals_padded_and_replayed_routing_gives_its_own_logprobs(moe_policy, exp, dtype, record_gap):
    """A mixture of experts on the device: packed and chunked logprobs equal padded ones; the routing
    its routers choose, replayed (routing replay's forced top-k on the device), gives its logprobs;
    and a backward pass with the routers' load-balancing loss reaches the routers and the experts."""
    model = moe_policy.eval()
    routing = own_routing(model, exp)
    assert routing.device.type == DEVICE
    with torch.no_grad(), off_device(DEVICE):
        padded, _ = response_logprobs(model, exp, TEMPERATURE)
        packed, _ = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
        replayed, _ = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK, routing=routing)
    assert_close(packed, padded, padded.float(), dtype, record_gap, "packed")
    # packed, routed as the padded pass chose (in bfloat16 packing alone could flip a near-tied router)
    assert_close(replayed, padded, padded.float(), dtype, record_gap, "replayed")
    model.train()
    model.zero_grad()
    with off_device(DEVICE):
        logprobs, _, aux = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK,
                                             routing=routing, router_aux=True)
    ((logprobs * exp.response_mask).sum() + aux).backward()
    layer = model.model.layers[0].mlp
    assert layer.gate.weight.grad.abs().max() > 0 and layer.experts.gate_up_proj.grad.abs().max() > 0
    model.zero_grad()


# ---------------------------------------------------------------- LoRA adapters (model.lora)

# config.LoraConfig's fields (that module imports hydra, which the GPU check does not need)
LORA = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules="all-linear", targets="all-linear")


@pytest.fixture(scope="module")
def lora_policy(tiny_policy, dtype):
    """The tiny policy with rank-4 adapters on every projection (peft), on the device, each B drawn
    (peft starts B at 0, where adapter and base agree and no comparison could fail)."""
    pytest.importorskip("peft", reason="peft is not installed (pip install peft==0.21.0)")
    from rlhf_dist.models.lora import add_adapters

    model = load_causal_lm(tiny_policy, dtype)
    peft = add_adapters(model, LORA)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.to(DEVICE).eval(), peft


def test_lora_adapters_train_alone_and_disabled_give_the_base_model(lora_policy, policy, exp, dtype, record_gap):
    """The adapted policy on the device: a backward pass reaches the adapters and nothing else; with
    the adapters disabled (the KL reference of a LoRA run) its logprobs are the base model's."""
    model, peft = lora_policy
    with torch.no_grad(), off_device(DEVICE):
        adapted, _ = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
        with peft.disable_adapter():
            disabled, _ = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
        base, _ = response_logprobs(policy, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
    assert_close(disabled, base, base.float(), dtype, record_gap, "adapters disabled = base")
    assert (adapted - base).abs().max() > 1e-2, "the adapters change nothing: the check below could not fail"
    model.train()
    try:
        with off_device(DEVICE):
            logprobs, _ = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
            (logprobs * exp.response_mask).sum().backward()
    finally:
        model.eval()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if "lora_" in n} and got
    _assert_gradients_finite_on_device(model)


def test_lora_merged_weights_compute_what_base_and_adapter_compute(lora_policy, tiny_policy, exp, dtype, record_gap):
    """What the engines are sent (``merged_exports``: each base weight plus its adapter's product),
    loaded into a plain model on the device, gives the adapted policy's logprobs."""
    from rlhf_dist.models.lora import add_adapters, merged_exports

    model, _ = lora_policy
    merged = load_causal_lm(tiny_policy, dtype)
    merged.load_state_dict({name: value().cpu() for name, _, value in merged_exports(model)}, strict=False)
    merged = merged.to(DEVICE).eval()
    # the same weights computing in float32: what bf16's own rounding is measured against
    float32 = load_causal_lm(tiny_policy, "float32")
    add_adapters(float32, LORA)
    float32.load_state_dict({n: t.float().cpu() for n, t in model.state_dict().items()})
    float32 = float32.to(DEVICE).eval()
    with torch.no_grad(), off_device(DEVICE):
        adapted, _ = response_logprobs(model, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
        served, _ = response_logprobs(merged, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
        exact, _ = response_logprobs(float32, exp, TEMPERATURE, packed=True, chunk_tokens=CHUNK)
    assert_close(served, adapted, exact, dtype, record_gap, "merged = base + adapter")
