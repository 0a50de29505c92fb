"""Packed layouts, token-budget micro-batches, chunked logprobs and batch-level loss totals.

The layouts and the partition are checked on hand-built rows; the forward passes on the model
families users train (tiny random-init models from their Hugging Face configs): packed and
chunked logprobs, entropies, values, losses and gradients equal the padded, unchunked ones
within float32 rounding, on responses from 1 to 30 tokens, and the logprobs from the hidden
states equal those of the model's own logits (its logit scale or soft-cap included).
"""

import pytest
import torch

from rlhf_dist.core.experience import collate
from rlhf_dist.core.losses import actor_loss, aggregate_loss, loss_total
from rlhf_dist.core.packing import budget_micro_batches, token_layout
from rlhf_dist.core.stats import logprobs_from_logits
from rlhf_dist.models.modeling import (
    LOGIT_SCALES,
    CriticModel,
    LogitTransform,
    check_token_outputs,
    head_outputs,
    load_causal_lm,
    response_logprobs,
    response_values,
)
from rlhf_dist.models.tiny import FAMILIES, build_random_lm


def _three_rows():
    # prompts [5, 6] / [7] / [8, 9], responses [1, 2, 3] / [4] / [] (kept as one pad token, 0):
    #   ids       [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0], [8, 9, 0, 0, 0]]   P = 2, T = 3
    #   attention [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    return collate([[5, 6], [7], [8, 9]], [[1, 2, 3], [4], []], pad_id=0)


def test_the_padded_layout_reads_each_response_token_from_the_position_before_it():
    exp = _three_rows()
    lay = token_layout(exp.input_ids, exp.attention_mask, exp.position_ids, exp.prompt_width, packed=False)
    # real response tokens (row, col): (0,0) (0,1) (0,2) (1,0) (2,0); source = row * 5 + P + col - 1
    assert lay.rows.tolist() == [0, 0, 0, 1, 2] and lay.cols.tolist() == [0, 1, 2, 0, 0]
    assert lay.source.tolist() == [1, 2, 3, 6, 11]
    assert lay.labels.tolist() == [1, 2, 3, 4, 0]
    assert lay.attention_mask is exp.attention_mask
    assert lay.scatter(torch.tensor([1.0, 2, 3, 4, 5])).tolist() == [[1, 2, 3], [4, 0, 0], [5, 0, 0]]


def test_the_packed_layout_concatenates_real_tokens_into_rows_no_longer_than_the_longest():
    exp = _three_rows()
    lay = token_layout(exp.input_ids, exp.attention_mask, exp.position_ids, exp.prompt_width, packed=True)
    # Lengths 5, 2, 3; rows of at most 5 by first-fit decreasing: [row 0], [rows 2 and 1], each
    # packed row in stored order: row 1 (7, 4) then row 2 (8, 9, pad).
    assert lay.attention_mask is None
    assert lay.input_ids.tolist() == [[5, 6, 1, 2, 3], [7, 4, 8, 9, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    # row 0's response tokens are predicted at packed 1, 2, 3; row 1's (4, at packed 6) at 5;
    # row 2's pad token (packed 9) at 8
    assert lay.source.tolist() == [1, 2, 3, 5, 8]
    assert lay.labels.tolist() == [1, 2, 3, 4, 0]


def test_a_packed_row_ends_with_a_dummy_sequence_of_its_own():
    # Lengths 4 and 1 (a one-token prompt, a one-token response): rows [0] and [1] + 2 dummy tokens
    exp = collate([[5, 6, 7], [8]], [[1], [2]], pad_id=0)
    lay = token_layout(exp.input_ids, exp.attention_mask, exp.position_ids, exp.prompt_width, packed=True)
    assert lay.input_ids.tolist() == [[5, 6, 7, 1], [8, 2, 0, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert lay.source.tolist() == [2, 4]


def test_budget_micro_batches_first_fit_decreasing_then_split_to_a_count():
    # lengths 5, 9, 2, 7, 3 with a budget of 10, longest first: 9 -> [1]; 7 -> [3]; 5 -> [0];
    # 3 -> fits after 7 -> [3, 4]; 2 -> fits after 5 -> [0, 2]
    assert budget_micro_batches([5, 9, 2, 7, 3], 10) == [[1], [3, 4], [0, 2]]
    # to 4: the micro-batch with the most rows (the first of [3, 4] and [0, 2]) is halved
    assert budget_micro_batches([5, 9, 2, 7, 3], 10, count=4) == [[1], [3], [0, 2], [4]]
    # a row longer than the budget goes alone; past one row per micro-batch, empty ones are added
    assert budget_micro_batches([12, 1], 10, count=3) == [[0], [1], []]
    with pytest.raises(ValueError, match="count=1 is below the 2"):
        budget_micro_batches([9, 9], 10, count=1)
    with pytest.raises(ValueError, match="budget must be > 0"):
        budget_micro_batches([1], 0)


def test_aggregate_loss_parts_with_the_batch_total_add_up_to_the_batch_loss():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # token_mean: (1 + 2 + 3 + 4 + 5 + 6) / 6 = 3.5; the parts rows {0} and {1, 2} with total 6:
    # 3 / 6 + 18 / 6 = 0.5 + 3.0
    assert aggregate_loss(x, m, "token_mean").item() == pytest.approx(3.5, abs=1e-6)
    parts = [aggregate_loss(x[s], m[s], "token_mean", total=6.0).item() for s in (slice(0, 1), slice(1, 3))]
    assert parts == pytest.approx([0.5, 3.0], abs=1e-6)
    # a micro-batch of one row alone (the old per-micro-batch mean) would weigh row 0 as 1.5
    # seq_mean_token_mean: row means 1.5, 3, 5 -> 9.5 / 3; parts 1.5 / 3 and 8 / 3
    parts = [aggregate_loss(x[s], m[s], "seq_mean_token_mean", total=3.0).item() for s in (slice(0, 1), slice(1, 3))]
    assert parts == pytest.approx([0.5, 8 / 3], abs=1e-6)
    # sum_norm with max_len 4: sum / (S * 4) = 21 / 12; parts 3 / 12 and 18 / 12
    parts = [aggregate_loss(x[s], m[s], "seq_mean_token_sum_norm", 4, total=3.0).item()
             for s in (slice(0, 1), slice(1, 3))]
    assert parts == pytest.approx([0.25, 1.5], abs=1e-6)
    assert loss_total(m, "token_mean") == 6.0 and loss_total(m, "seq_mean_token_mean") == 3.0
    with pytest.raises(ValueError, match="total=0"):
        aggregate_loss(x, m, "token_mean", total=0.0)


def test_chunked_head_outputs_and_their_gradients_equal_one_chunk():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = torch.randint(50, (11,), generator=gen)
    results = []
    for chunk in (0, 4):
        head.zero_grad()
        hidden.grad = None
        lp, ent = head_outputs(head, hidden, labels, 0.7, LogitTransform(scale=0.5, softcap=5.0), True, chunk)
        (lp.sum() + 0.1 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for full, chunked in zip(*results):
        torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    lengths = [30, 1, 12, 1, 5, 22, 2, 1]
    prompts = [torch.randint(3, 500, (1 + 2 * i,), generator=gen).tolist() for i in range(len(lengths))]
    responses = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
    exp = collate(prompts, responses, pad_id=0)
    mask = exp.response_mask
    return exp.with_fields(
        old_logprobs=(-6.0 + torch.randn(mask.shape, generator=gen)) * mask,
        advantages=torch.randn(len(lengths), 1, generator=gen).expand_as(mask) * mask,
        returns=torch.randn(mask.shape, generator=gen) * mask,
        old_values=torch.zeros_like(mask),
    )


@pytest.fixture(scope="module")
def family_path(tiny_policy, tmp_path_factory):
    """family -> the directory of its tiny random-init model, built once for this module."""
    paths = {}

    def path(family: str) -> str:
        if family not in paths:
            paths[family] = str(build_random_lm(tmp_path_factory.mktemp(family) / family, family, tiny_policy))
        return paths[family]

    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logprobs_from_hidden_states_equal_the_models_own_logits_on_every_family(family, batch, family_path):
    # expected: log_softmax(forward(...).logits / T) at the response tokens, the logits of the
    # model's own forward (Granite's / logits_scaling, Cohere's * logit_scale, Gemma 2's soft-cap);
    # response token t (column P + t) is predicted at position P + t - 1
    model = load_causal_lm(family_path(family), "float32").eval()
    width, steps = batch.prompt_width, batch.response_mask.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        expected = logprobs_from_logits(logits[:, width - 1 : width + steps - 1].float() / 0.7, batch.response_ids)
        expected = expected * batch.response_mask
        for packed, chunk in ((False, 0), (True, 0), (True, 7)):
            got, _ = response_logprobs(model, batch, 0.7, packed=packed, chunk_tokens=chunk)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6,
                                       msg=lambda m: f"{family} packed={packed} chunk={chunk}: {m}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_chunked_passes_equal_padded_ones_on_every_family(family, batch, family_path):
    path = family_path(family)
    model = load_causal_lm(path, "float32")  # runs check_token_outputs too
    results = {}
    for packed, chunk in ((False, 0), (True, 0), (True, 7)):
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, batch, 0.7, True, packed=packed, chunk_tokens=chunk)
        loss, _ = actor_loss(
            logprobs, batch.old_logprobs, None, batch.advantages, entropy, batch.response_mask, 0.2,
            clip_eps_high=None, dual_clip=None, agg="token_mean", max_len=30, rollout_weights=None,
            entropy_coef=0.01, kl_coef=None, kl_estimator="k3",
        )
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[(packed, chunk)] = (logprobs.detach(), entropy.detach(), loss.detach(), grads)
    padded = results[(False, 0)]
    assert (padded[0][batch.response_mask == 0] == 0).all()  # nothing computed at padding
    for key, got in results.items():
        for name, g, e in zip(("logprobs", "entropy", "loss", "grads"), got, padded):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-6, msg=lambda m: f"{family} {key} {name}: {m}")

    from transformers import AutoModel

    critic = CriticModel(AutoModel.from_pretrained(path), 64)
    torch.nn.init.normal_(critic.value_head.weight, generator=torch.Generator().manual_seed(1))
    values = [response_values(critic, batch, packed) for packed in (False, True)]
    # values ~ N(0, 1)-weighted sums of 64 hidden units: float32 rounding of the hidden state reaches ~1e-5
    assert values[0].abs().max() > 0.5
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_are_transformed_otherwise_is_refused(tiny_policy, tmp_path):
    # A Llama with a softcap in its config: transformers' Llama ignores it, head_outputs would apply it.
    path = str(build_random_lm(tmp_path / "llama", "llama-tied", tiny_policy))
    model = load_causal_lm(path, "float32")
    model.config.final_logit_softcapping = 0.5
    from rlhf_dist.models.modeling import enable_token_outputs

    model.forward = type(model).forward.__get__(model)
    enable_token_outputs(model)
    with pytest.raises(ValueError, match="llama-probe: logprobs from the hidden states .padded. differ"):
        check_token_outputs(model, "llama-probe")


def test_a_family_whose_transform_is_not_reproduced_is_refused_at_start(family_path, monkeypatch):
    # Granite without its LOGIT_SCALES line: the logits the hidden states give are 8x the model's
    monkeypatch.delitem(LOGIT_SCALES, "granite")
    with pytest.raises(ValueError, match=r"granite: logprobs from the hidden states \(padded\) differ .* by 0\.\d"):
        load_causal_lm(family_path("granite"), "float32")


def test_packed_reward_model_scores_equal_padded_ones(tiny_reward_model):
    from rlhf_dist.core.experience import collate_rankings
    from rlhf_dist.models.modeling import load_reward_model, ranking_scores

    model = load_reward_model(tiny_reward_model, "float32")  # checks packed scores on a probe batch
    pad = model.config.pad_token_id
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 17, 4, 30, 2, 9, 12, 5)]
    # pairs, and rankings of four and of two side by side (empty slots)
    for responses, ranks in (([rows[0:2], rows[2:4], rows[4:6]], [[0, 1]] * 3),
                             ([rows[0:4], rows[4:6], rows[6:8]], [[0, 1, 1, 2], [1, 0], [0, 1]])):
        batch = collate_rankings(responses, ranks, pad)
        padded = ranking_scores(model, batch, pad, packed=False)
        packed = ranking_scores(model, batch, pad, packed=True)
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
        # each response's score is its own forward's: the model on that one sequence alone
        for b, seqs in enumerate(responses):
            for i, seq in enumerate(seqs):
                alone = model(input_ids=torch.tensor([seq])).logits[0, 0]
                torch.testing.assert_close(padded[b, i], alone, rtol=1e-5, atol=1e-5)
        assert (padded[batch.ranks < 0] == 0).all()
