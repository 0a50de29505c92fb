"""The throughput benchmark's workloads: the reward, the HTTP reward server, the w2 corpus, the recipes."""

from __future__ import annotations

from rlhf_dist.config import RewardConfig
from rlhf_dist.roles.reward import post_scores
from rlhf_dist.tasks.reviews.corpus import positive_word_count
from scripts import bench_workloads as B


def test_reward_counts_positive_words_of_the_response_only():
    # "great" and "lovely" are positive, "bad" is negative (not subtracted), "." is no word; the prompt is ignored
    assert positive_word_count("great great", "the film was great , lovely but bad .") == 2.0
    assert positive_word_count("", "") == 0.0


def test_http_server_scores_every_sample_with_the_rule():
    responses = [f"{'good ' * i}film ." for i in range(19)]  # 19 samples: three rounds of the 8 slots
    with B.LatencyRewardServer(latency_s=0.001, max_in_flight=8) as server:
        cfg = RewardConfig(function_weight=0.0, http_weight=1.0, http_url=server.url)
        scores = post_scores(cfg, ["p"] * 19, responses, [{}] * 19)
        assert server.samples == 19
    assert scores == [float(i) for i in range(19)]


def test_w2_texts_hold_1_to_12_sentences_so_lengths_spread():
    texts = B.w2_corpus(200, seed=0)
    words = sorted(len(t.split()) for t in texts)
    assert len(texts) == 200
    # a review sentence has 5-16 words here: 1 sentence is short, 12 are long
    assert words[0] <= 16 and words[-1] >= 100
    assert texts == B.w2_corpus(200, seed=0)


def test_recipes_match_the_workloads():
    assert (B.W1_RECIPE.hidden_size, B.W1_RECIPE.num_layers, B.W1_RECIPE.end_with_eos) == (128, 2, False)
    assert (B.W2_RECIPE.hidden_size, B.W2_RECIPE.num_layers, B.W2_RECIPE.end_with_eos) == (512, 8, True)
    assert B.WORKLOADS["w3"].recipe is B.W1_RECIPE and B.WORKLOADS["w3"].http_reward
    assert [B.WORKLOADS[w].samples_per_step for w in ("w1", "w2", "w3")] == [256, 128, 256]


def test_the_throughput_benchmark_configs_compose_as_train_composes_them(tmp_path):
    from pathlib import Path

    from scripts import bench_throughput as T

    for name, w in B.WORKLOADS.items():
        base = [*T.workload_overrides(w, Path("/m"), tmp_path / "p.jsonl", 3, "http://127.0.0.1:1/score",
                                     w.prompts_per_step),
                *T.OUR_CONFIG[name]]
        for dtype in ("float32", "bfloat16"):
            for mode in T.MODES.values():
                assert T.refusal([*base, f"model.dtype={dtype}", *mode, T.TIMELINE]) is None, (name, dtype, mode)
    assert T.refusal(["model.dtype=float16"]).startswith("ConfigError: model.dtype")
