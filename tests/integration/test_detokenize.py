"""The engines' response text, decoded once per response (``models.detokenize``), equals vLLM's own
incremental detokenizer's, on every tokenizer family, including the cases where the two could part:
characters cut at the end, bytes that make no character, special tokens, SentencePiece's leading
space after a prompt. One process (``detokenize_check.py``, vLLM in process, no Ray), one engine per
family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_response_text_equals_vllm_detokenizer(tiny_policy: str, tmp_path) -> None:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.detokenize_check", str(tmp_path), tiny_policy],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("DETOKENIZE ")]
    assert [r["family"] for r in results] == ["byte_level_bpe", "sentencepiece_llama2", "sentencepiece_gemma"]
    for r in results:
        assert r["differ"] == 0, r
        # the check saw each case it is for (a random model samples them; clean text on every other request)
        assert r["clean"] >= 32 and r["cut_at_end"] >= 8 and r["replacement_inside"] >= 8 and r["with_special"] >= 3, r
    # SentencePiece: a response's text depends on its prompt (leading space), so decoding it alone differs
    assert all(r["differ_decoded_alone"] >= 8 for r in results[1:]), results
