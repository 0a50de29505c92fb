"""The calculator task: problems and splits, the corpus, the environment's steps, the reward, and
the tool tags as atomic tokens that survive decoding."""

from __future__ import annotations

import pytest

from rlhf_dist.models.tiny import _train_tokenizer
from rlhf_dist.tasks import calculator as C


def test_problems_are_deterministic_and_the_splits_disjoint():
    train, test = C.make_problems(500, 0, "train"), C.make_problems(200, 0, "test")
    assert train == C.make_problems(500, 0, "train")
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    a, _, b, _ = train[0]["prompt"].split()
    assert train[0]["answer"] == str(int(a) * int(b)) and 10 <= int(a) <= 99 and 10 <= int(b) <= 99
    assert len({r["prompt"] for r in test}) == 200  # distinct until the split is exhausted


def test_corpus_calls_the_tool_on_its_share_of_lines_over_train_problems_only():
    lines = C.make_corpus(1000, 0, tool_fraction=0.3)
    tool = [line for line in lines if C.TOOL_OPEN in line]
    assert len(lines) == 1000 and len(tool) == 300
    test = {r["prompt"] for r in C.make_problems(10_000, 0, "test")}
    assert not any(line.split(" = ")[0] + " =" in test for line in lines)
    a, b = tool[0].split(" = ")[0].split(" * ")
    product = int(a) * int(b)
    assert tool[0] == f"{a} * {b} = <calc>{a} * {b}</calc><result>{product}</result> {product}"
    with pytest.raises(ValueError, match="tool_fraction=1.5"):
        C.make_corpus(10, 0, tool_fraction=1.5)


def test_environment_runs_the_tool_then_scores_the_final_answer():
    env = C.CalculatorEnv("37 * 41 =", {"answer": "1517"}, max_calls=2)
    assert env.reset() == ("", {})
    assert env.step(" <calc>37 * 41</calc>") == ("<result>1517</result>", 0.0, False, False, {"tool_call": True})
    assert env.step(" <calc>37 ** 41</calc>") == ("<result>error</result>", 0.0, False, False, {"tool_call": True})
    assert env.step(" <calc>1 + 1</calc>") == ("", 0.0, False, True, {"tool_call": False})  # past max_calls
    assert env.step(" 1517") == ("", 1.0, True, False, {})
    assert C.CalculatorEnv("p", {"answer": "1517"}).step(" 1518</s>")[:3] == ("", 0.0, True)
    assert C.evaluate(" 12 - 30 ") == "-18" and C.evaluate("__import__('os')") == "error"


def test_answer_reward_reads_the_number_after_the_last_result():
    meta = {"answer": "1517"}
    assert C.answer_reward("p", " <calc>37 * 41</calc><result>1517</result> 1517", meta) == 1.0
    assert C.answer_reward("p", " 1517", meta) == 1.0
    assert C.answer_reward("p", " <calc>37 * 41</calc><result>1517</result> 1518", meta) == 0.0


def test_tool_tags_are_atomic_tokens_kept_by_decoding():
    lines = C.make_corpus(300, 0, tool_fraction=0.5)
    tokenizer = _train_tokenizer(lines, split_digits=True, tool_tokens=C.TOOL_TOKENS)
    line = next(line for line in lines if C.TOOL_OPEN in line)
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == line
    tag_ids = [tokenizer.convert_tokens_to_ids(t) for t in C.TOOL_TOKENS]
    assert all(i in ids for i in tag_ids)
    # An observation tokenised alone (as the engine appends it) is the same tokens as inside the line.
    result = line[line.index(C.RESULT_OPEN): line.index(C.RESULT_CLOSE) + len(C.RESULT_CLOSE)]
    alone = tokenizer(result, add_special_tokens=False)["input_ids"]
    start = ids.index(tokenizer.convert_tokens_to_ids(C.RESULT_OPEN))
    assert ids[start: start + len(alone)] == alone
