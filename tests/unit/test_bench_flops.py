"""The benchmarks' model FLOPs per phase (hand-computed) and the GEMM peak's measurement."""

from __future__ import annotations

import pytest

from scripts.bench_flops import Shape, gemm_peak, shape_of


def test_forward_flops_are_matmuls_plus_causal_attention():
    shape = Shape(linear_params=10, attention_width=3)
    # S=2: 2*10*2 = 40 in the matmuls; attention: queries at positions 1 and 2 see 1 + 2 = 3 keys,
    # 4 FLOPs (QK^T and AV) per key and unit of A = 3: 36
    assert shape.forward([2]) == 76.0
    # S=1: 20 + 12; S=3: 60 + 72
    assert shape.forward([1, 3]) == 164.0


def test_phases_count_generation_without_the_last_token_and_the_update_three_times():
    shape = Shape(linear_params=10, attention_width=3)
    phases = shape.phases(prompt_lens=[1, 2], response_lens=[2, 0], ppo_epochs=2)
    # full sequences 3 and 2 -> 132 + 76; generated 2 (the empty response generated nothing) -> 76
    assert phases == {"generate": 76.0, "reference": 208.0, "old_logprobs": 208.0, "update": 2 * 3 * 208.0}


def test_shape_of_a_llama_counts_every_linear_layer_and_the_attention_width():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    shape = shape_of(LlamaForCausalLM(cfg))
    # per layer: q, o 128x128; k, v 128x64 (2 KV heads of 32); gate, up, down 128x256; head 512x128
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256
    assert shape == Shape(linear_params=2 * per_layer + 512 * 128, attention_width=2 * 4 * 32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemm_peak_is_a_positive_rate(dtype):
    assert gemm_peak(dtype, threads=1, sizes=(64,), seconds=0.05) > 0
