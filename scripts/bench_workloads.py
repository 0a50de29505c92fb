"""The throughput benchmark's workloads (``scripts/bench_throughput.py``): models, prompts and rewards
that both our system and TRL's GRPOTrainer run, built here because nothing can be downloaded.

- ``w1``: the embedded review Llama's shape (hidden 128, 2 layers, byte-level BPE vocab 512, ~0.46 M
  parameters), pretrained without </s> so every completion runs to ``max_new_tokens``; 64 prompts x 4
  samples x 64 tokens per step; reward = number of positive words in the completion.
- ``w2``: a ~25 M-parameter Llama (hidden 512, 8 layers) pretrained briefly on review texts of 1 to 12
  sentences, each ended by </s>, so responses spread over ~8-128 tokens; 32 prompts x 4 x 128 max.
- ``w3``: ``w1`` with the reward served over HTTP by ``LatencyRewardServer`` (100 ms per sample, at
  most 8 samples in flight), as an LLM judge or a code sandbox would serve it.

The reward function is the reviews task's ``positive_word_count``: Ray actors import it by path from the package.
"""

from __future__ import annotations

import json
import pathlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_dist.models import tiny as tiny_model
from rlhf_dist.tasks.base import Recipe
from rlhf_dist.tasks.reviews import corpus as reviews
from rlhf_dist.tasks.reviews.corpus import positive_word_count

REWARD_FUNCTION = "rlhf_dist.tasks.reviews.corpus:positive_word_count"
NUM_PROMPTS = 2048  # prompt pool; each step samples rollout.batch_size of them


W1_RECIPE = Recipe(
    name="bench-w1-noeos-v1", corpus_lines=6000, hidden_size=128, intermediate_size=256, split_digits=False,
    pretrain_steps=300, batch_size=32, learning_rate=3e-3, end_with_eos=False,
)  # fmt: skip
# ~25 M parameters: 8 x (4 x 512^2 attention + 3 x 512 x 1408 MLP) + 2 x 512 x 512 embeddings.
# 40 steps x 8 texts take ~1.5 min on 2 cores: about the </s> rate and little else, which is what
# the workload needs (responses of very different lengths).
W2_RECIPE = Recipe(
    name="bench-w2-eos-v1", corpus_lines=3000, hidden_size=512, intermediate_size=1408, split_digits=False,
    pretrain_steps=40, batch_size=8, learning_rate=2e-3, num_layers=8,
)  # fmt: skip
W2_MAX_SENTENCES = 12  # a w2 pretraining text holds 1..12 review sentences (~10-150 tokens), then </s>


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    recipe: Recipe
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    http_reward: bool  # reward served by LatencyRewardServer instead of called in process

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


WORKLOADS = {
    "w1": Workload("w1", "0.46 M Llama, no EOS, 64 prompts x 4 x 64 tokens, rule reward", W1_RECIPE, 64, 4, 64, False),
    "w2": Workload("w2", "25 M Llama (512 x 8), EOS, 32 prompts x 4 x <=128 tokens, rule reward", W2_RECIPE,
                   32, 4, 128, False),
    "w3": Workload("w3", "w1 with an HTTP reward: 100 ms per sample, 8 in flight", W1_RECIPE, 64, 4, 64, True),
}


def w2_corpus(num_texts: int, seed: int) -> list[str]:
    """Review texts of 1..W2_MAX_SENTENCES sentences (uniform), so </s> comes at very different lengths."""
    rng = random.Random(seed)
    sentences = reviews.make_corpus(num_texts * (W2_MAX_SENTENCES + 1) // 2, seed)
    texts, start = [], 0
    for _ in range(num_texts):
        k = rng.randint(1, W2_MAX_SENTENCES)
        if start + k > len(sentences):
            start = 0
        texts.append(" ".join(sentences[start : start + k]))
        start += k
    return texts


def build_model(workload: Workload, cache_root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The workload's policy (tokenizer + pretrained Llama), built once under ``cache_root/<recipe name>``."""
    recipe = workload.recipe
    corpus = w2_corpus(recipe.corpus_lines, seed) if recipe is W2_RECIPE else reviews.make_corpus(recipe.corpus_lines, seed)
    return tiny_model.build_tiny_lm(cache_root / recipe.name, corpus, recipe, seed)


def write_prompts(path: pathlib.Path, seed: int = 0) -> list[str]:
    """NUM_PROMPTS review prefixes as a JSONL prompt file (``data.prompts``); returns the texts."""
    texts = reviews.make_prompts(NUM_PROMPTS, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return texts


class LatencyRewardServer:
    """A local scoring service with a fixed cost per sample: ``POST {"prompts", "responses"}`` ->
    ``{"scores"}``, each sample answered ``latency_s`` after it got one of ``max_in_flight`` slots
    (shared by all requests), scored by ``score(prompt, response)``. A batch of B samples takes
    ceil(B / max_in_flight) x latency_s. Use as a context manager; ``url`` is where to POST."""

    def __init__(
        self, score: Callable[[str, str], float] = positive_word_count, latency_s: float = 0.1,
        max_in_flight: int = 8, host: str = "127.0.0.1",
    ) -> None:
        self.score, self.latency_s = score, latency_s
        self.slots = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="reward-slot")
        self.samples = 0  # scored so far
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 -- http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                futures = [server.slots.submit(server._score_one, p, r)
                           for p, r in zip(body["prompts"], body["responses"])]
                out = json.dumps({"scores": [f.result() for f in futures]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:  # quiet: one line per request otherwise
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="reward-server")

    def _score_one(self, prompt: str, response: str) -> float:
        time.sleep(self.latency_s)
        self.samples += 1  # under the GIL; read only for reporting
        return self.score(prompt, response)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/score"

    def __enter__(self) -> LatencyRewardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.slots.shutdown(wait=False, cancel_futures=True)


def cache_root(cache_dir: str = "") -> pathlib.Path:
    """Where the benchmark models live: ``cache_dir``, else the embedded models' cache."""
    return pathlib.Path(cache_dir) if cache_dir else tiny_model.cache_root()
