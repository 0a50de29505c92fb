"""The reward actor's sources, called directly (the actor class is plain Python): a function with
or without metadata (and its import path), a real HTTP endpoint on localhost, weighted sums, and
invalid scores."""

from __future__ import annotations

import json
import math
from http.server import BaseHTTPRequestHandler

import pytest

from rlhf_dist.config import RewardConfig
from rlhf_dist.registry import import_function
from rlhf_dist.roles.reward import RewardError, RewardScorer
from tests.conftest import local_http_server, local_scorer, send_json


def length_reward(prompt: str, response: str) -> float:
    return float(len(response))


def answer_reward(prompt: str, response: str, metadata: dict) -> float:
    return 1.0 if response.strip() == metadata["answer"] else 0.0


def flaky_reward(prompt: str, response: str) -> float:
    if response == "boom":
        raise RuntimeError("cannot score")
    return math.inf if response == "inf" else 0.5


def two_required_args_only(prompt: str) -> float:
    return 0.0


def scorer(**fields) -> RewardScorer:
    return local_scorer(RewardConfig(**fields))


def test_function_with_metadata():
    s = scorer(function=f"{__name__}:answer_reward")
    assert s.score(["1 + 1 =", "2 + 2 ="], [" 2", " 5"], [{"answer": "2"}, {"answer": "4"}]) == [1.0, 0.0]


def test_function_signature_is_checked_at_start():
    with pytest.raises(ValueError, match=r"must accept \(prompt, response\[, metadata\]\)"):
        scorer(function=f"{__name__}:two_required_args_only")


def test_invalid_score_fails_the_step_naming_the_sample():
    s = scorer(function=f"{__name__}:flaky_reward")
    with pytest.raises(RewardError, match=r"raised on sample 1 \(prompt 'p1'\)"):
        s.score(["p0", "p1"], ["ok", "boom"], [{}, {}])
    with pytest.raises(RewardError, match=r"reward for sample 0 \(prompt 'p0'\) is inf"):
        s.score(["p0"], ["inf"], [{}])


def test_invalid_scores_are_marked_for_dropping():
    s = scorer(function=f"{__name__}:flaky_reward", on_invalid="drop")
    out = s.score(["a", "b", "c"], ["ok", "boom", "inf"], [{}, {}, {}])
    assert out[0] == 0.5 and math.isnan(out[1]) and math.isnan(out[2])


class _ScoreHandler(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls == 1:  # the first attempt fails: the client must retry
            self.send_response(503)
            self.end_headers()
            return
        scores = [10.0 * len(r) + float(m.get("bonus", 0)) for r, m in zip(body["responses"], body["metadata"])]
        send_json(self, json.dumps({"scores": scores}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def score_server():
    _ScoreHandler.calls = 0
    with local_http_server(_ScoreHandler) as url:
        yield url


def test_weighted_sum_of_function_and_http(score_server):
    s = scorer(function=f"{__name__}:length_reward", function_weight=0.5,
               http_weight=2.0, http_url=score_server, http_retries=1, http_timeout_s=5)
    # "ab": function 2 * 0.5 = 1; http (10 * 2 + 1) * 2 = 42 -> 43.  "abc": 1.5 + 60 = 61.5
    assert s.score(["p", "q"], ["ab", "abc"], [{"bonus": 1}, {}]) == [43.0, 61.5]
    assert _ScoreHandler.calls == 2  # one failure, one retry


def test_http_failure_is_one_clear_error():
    # Nothing listens on this localhost port (bound, then closed): every attempt is refused.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = scorer(function_weight=0.0, http_weight=1.0, http_url=f"http://127.0.0.1:{port}/x", http_retries=1)
    with pytest.raises(RewardError, match=rf"^reward\.http_url='http://127\.0\.0\.1:{port}/x': failed after 2 attempts"):
        s.score(["p"], ["r"], [{}])


def test_reward_model_scores_are_normalised_with_the_saved_statistics(tiny_reward_model, tmp_path):
    import shutil

    from rlhf_dist.roles.reward import NORMALIZATION_FILE

    model = tmp_path / "rm"
    shutil.copytree(tiny_reward_model, model)
    prompts, responses, meta = ["the soup was"] * 2, [" great .", " bad ."], [{}, {}]
    raw = scorer(function_weight=0.0, model_weight=1.0, model_path=str(model)).score(prompts, responses, meta)
    (model / NORMALIZATION_FILE).write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    normed = scorer(function_weight=0.0, model_weight=1.0, model_path=str(model)).score(prompts, responses, meta)
    assert normed == pytest.approx([(r - 0.5) / 2.0 for r in raw])
    off = scorer(function_weight=0.0, model_weight=1.0, model_path=str(model), normalize=False)
    assert off.score(prompts, responses, meta) == pytest.approx(raw)
    (model / NORMALIZATION_FILE).write_text(json.dumps({"mean": 0.5, "std": 0.0}))
    with pytest.raises(ValueError, match="invalid normalisation"):
        scorer(function_weight=0.0, model_weight=1.0, model_path=str(model))


def test_import_function_both_spellings():
    from rlhf_dist.tasks.reviews import positive_sentiment_reward

    assert import_function("rlhf_dist.tasks.reviews:positive_sentiment_reward") is positive_sentiment_reward
    assert import_function("rlhf_dist.tasks.reviews.positive_sentiment_reward") is positive_sentiment_reward


@pytest.mark.parametrize(
    "path", ["rlhf_dist.tasks.reviews:nope", "no_such_module:f", "rlhf_dist.tasks.reviews.corpus:POSITIVE_WORDS"]
)
def test_import_function_errors_name_the_key(path):
    with pytest.raises(ValueError, match=rf"^reward\.function='{path}'"):
        import_function(path)
