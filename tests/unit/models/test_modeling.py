"""rlhf_dist.models.modeling's row chunking (micro_batches, in_chunks) and logit transforms (every
family of LOGIT_SCALES, each against its own forward on a tiny random-init model)."""

import math

import pytest
import torch

from rlhf_dist.core.experience import RankingBatch
from rlhf_dist.core.stats import logprobs_from_logits
from rlhf_dist.models.modeling import (
    LOGIT_SCALES,
    LogitTransform,
    head_outputs,
    in_chunks,
    logit_transform,
    micro_batches,
)


def _rankings(rows: int) -> RankingBatch:
    # row i holds the value i in every field, so a slice shows which rows it took
    ids = torch.arange(rows).view(rows, 1, 1).repeat(1, 2, 3)
    return RankingBatch(ids, ids.clone(), ids[:, :, 0].clone())


def test_micro_batches_are_consecutive_slices_in_order():
    # 5 rows in micro-batches of 2: rows (0, 1), (2, 3), (4,) -- the last is shorter
    chunks = list(micro_batches(_rankings(5), 2))
    assert [c.input_ids[:, 0, 0].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert [c.ranks.shape for c in chunks] == [(2, 2), (2, 2), (1, 2)]
    assert all(isinstance(c, RankingBatch) for c in chunks)


def test_micro_batches_of_the_whole_batch_or_more_is_one_batch():
    for size in (4, 10):
        (only,) = micro_batches(_rankings(4), size)
        assert only.input_ids[:, 0, 0].tolist() == [0, 1, 2, 3]


def test_in_chunks_concatenates_in_row_order():
    # fn sees chunks of at most 2 rows and returns each row's value doubled: (0, 2, 4, 6, 8)
    seen = []

    def fn(chunk):
        seen.append(len(chunk))
        return chunk.input_ids[:, 0, :1] * 2

    out = in_chunks(fn, _rankings(5), 2)
    assert seen == [2, 2, 1]
    assert out.squeeze(1).tolist() == [0, 2, 4, 6, 8]


def test_a_logit_transform_scales_then_caps():
    logits = torch.tensor([2.0, -4.0, 0.0])
    assert LogitTransform()(logits) is logits  # the identity: no op at all, the same numbers as before
    assert LogitTransform(scale=0.25)(logits).tolist() == [0.5, -1.0, 0.0]
    # cap 2: 2 * tanh(2 / 2) = 1.5231884, 2 * tanh(-4 / 2) = -1.9280551
    torch.testing.assert_close(LogitTransform(softcap=2.0)(logits), torch.tensor([1.5231884, -1.9280551, 0.0]),
                               rtol=0, atol=1e-6)


def test_logit_transform_reads_the_family_and_its_config():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, HyperCLOVAXConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == LogitTransform(1.0, None)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == LogitTransform(0.125, None)  # logits / 8
    assert logit_transform(HyperCLOVAXConfig(logits_scaling=8.0)) == LogitTransform(8.0, None)  # the same key, x 8
    assert logit_transform(CohereConfig()) == LogitTransform(0.0625, None)
    assert logit_transform(Gemma2Config()) == LogitTransform(1.0, 30.0)


TINY = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 128, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
_MAMBA = {"mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_chunk_size": 16}  # 4 x 32 = 2 x 64
# Per LOGIT_SCALES family: the arguments of a tiny config whose scale is not 1
SCALED_CONFIGS = {
    "granite": {"logits_scaling": 4.0},
    "granite_swa": {"logits_scaling": 4.0},
    "granitemoe": {"logits_scaling": 4.0, **_MOE},
    "granitemoe_swa": {"logits_scaling": 4.0, **_MOE},
    "granitemoeshared": {"logits_scaling": 4.0, "shared_intermediate_size": 64, **_MOE},
    "granitemoehybrid": {"logits_scaling": 4.0, "shared_intermediate_size": 64, **_MOE, **_MAMBA},  # Mamba-2 layers
    # logits_scaling is hidden_size / dim_model_base = 4; multi-head latent attention's ranks
    "minicpm3": {"dim_model_base": 16, "num_key_value_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
                 "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16},
    "hyperclovax": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
    "cohere2": {"logit_scale": 0.25},
    "cohere2_moe": {"logit_scale": 0.25},
    "falcon_h1": {"lm_head_multiplier": 0.25, "mamba_d_ssm": 128, **_MAMBA},  # Mamba-2 and attention in every layer
}


def test_every_family_with_a_logit_scale_has_a_case():
    assert sorted(SCALED_CONFIGS) == sorted(LOGIT_SCALES)


@pytest.mark.parametrize("model_type", sorted(SCALED_CONFIGS))
def test_each_logit_scale_is_the_models_own(model_type):
    # expected: log_softmax(forward(ids).logits / T) at every position, from the family's own
    # CausalLM forward; got: head_outputs on its backbone's hidden states with logit_transform
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY, **SCALED_CONFIGS[model_type]})
    transform = logit_transform(config)
    assert not math.isclose(transform.scale, 1.0) and transform.softcap is None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(3, 300, (18,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = logprobs_from_logits(model(input_ids=ids, use_cache=False).logits.flatten(0, 1).float() / 0.7,
                                        labels)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
        got = head_outputs(model.get_output_embeddings(), hidden, labels, 0.7, transform, False, 0)
        unscaled = head_outputs(model.get_output_embeddings(), hidden, labels, 0.7, LogitTransform(), False, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    assert (unscaled - expected).abs().max() > 1e-2  # the transform is what makes them equal


class _CountingHead(torch.nn.Linear):
    """A head that counts its calls: under ZeRO-3 each one gathers the weight, a collective."""

    calls = 0

    def forward(self, h):
        self.calls += 1
        return super().forward(h)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunks_agreed_across_ranks_call_the_head_as_often_and_change_nothing(with_entropy):
    torch.manual_seed(0)
    head = _CountingHead(8, 11)
    hidden = torch.randn(7, 8, requires_grad=True)
    labels = torch.randint(11, (7,))

    def run(agree):
        head.calls = 0
        head.zero_grad()
        hidden.grad = None
        out = head_outputs(head, hidden, labels, 0.9, LogitTransform(), with_entropy, 3, agree_chunks=agree)
        lp, ent = out if with_entropy else (out, None)
        forward_calls = head.calls
        (lp.sum() + (ent.sum() if with_entropy else 0)).backward()
        return lp.detach(), forward_calls, head.calls, head.weight.grad.clone(), hidden.grad.clone()

    lp, fwd, total, w_grad, h_grad = run(None)
    assert (fwd, total) == (3, 6)  # 7 tokens in chunks of 3; each chunk recomputed in the backward pass
    # another rank needs 5 chunks: this one adds 2 empty ones, in the forward and in the backward pass
    lp5, fwd5, total5, w_grad5, h_grad5 = run(lambda n: max(n, 5))
    assert (fwd5, total5) == (5, 10)
    assert torch.equal(lp5, lp) and torch.equal(w_grad5, w_grad) and torch.equal(h_grad5, h_grad)
    # a rank with no response tokens at all (all its chunks empty) still calls the head as often
    head.calls = 0
    empty = head_outputs(head, hidden[:0], labels[:0], 1.0, LogitTransform(), False, 3, agree_chunks=lambda n: 2)
    (empty.sum() + 0 * hidden.sum()).backward()
    assert empty.shape == (0,) and head.calls == 4


def test_unchunked_logprobs_agree_on_nothing():
    # chunk_tokens=0: every rank calls the head once, so no collective is needed to agree on a count
    head = _CountingHead(8, 11)
    asked = []
    head_outputs(head, torch.randn(7, 8), torch.randint(11, (7,)), 1.0, LogitTransform(), False, 0,
                 agree_chunks=lambda n: asked.append(n) or 5)
    assert asked == [] and head.calls == 1
