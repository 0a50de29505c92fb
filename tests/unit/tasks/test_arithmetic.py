import re

import pytest

from rlhf_dist.tasks.arithmetic import (
    MAX_OPERAND,
    WRONG_FRACTION,
    exact_match_reward,
    make_corpus,
    make_problems,
    parse_answer,
)

# The reward parses the leading run of ASCII digits after leading whitespace and compares it,
# as a string, with metadata["answer"] ("19" in every case below).
REWARD_CASES = [
    ("19", 1.0),
    (" 19", 1.0),  # the policy writes a space after "=" first
    (" 19</s>", 1.0),  # a decoded end-of-sequence token stops the number
    ("19\n7 + 1 = 8", 1.0),  # a newline stops it
    ("19 + 2", 1.0),  # text after the number is ignored
    ("19.5", 1.0),  # "." is a non-digit: the number is 19
    ("\n 19", 1.0),  # all leading whitespace is stripped, newlines included
    ("", 0.0),  # no number
    ("   ", 0.0),
    ("</s>", 0.0),
    ("019", 0.0),  # kept as written: "019" != "19", the corpus never pads
    ("190", 0.0),  # the whole run of digits counts, not a prefix of it
    ("1 9", 0.0),  # "1", then a space ends the number
    ("18", 0.0),
    ("x 19", 0.0),  # the answer must come first
    ("+19", 0.0),  # a sign is not a digit
    ("\u0661\u0669", 0.0),  # Arabic-Indic "19": ASCII digits only
]


@pytest.mark.parametrize(("response", "expected"), REWARD_CASES)
def test_exact_match_reward_hand_written(response: str, expected: float) -> None:
    assert exact_match_reward("12 + 7 =", response, {"answer": "19"}) == expected


def test_negative_response_never_matches() -> None:
    # "-3" does not start with a digit, so it has no answer: 0 even against "3".
    assert parse_answer("-3") is None
    assert exact_match_reward("2 - 5 =", "-3", {"answer": "3"}) == 0.0


def test_parse_answer() -> None:
    assert parse_answer(" 19</s>") == "19"
    assert parse_answer("019") == "019"
    assert parse_answer(" 0") == "0"
    assert parse_answer("x") is None


def test_reward_ignores_the_prompt() -> None:
    # The prompt "1 + 1 =" says 2, but only metadata["answer"] counts.
    assert exact_match_reward("1 + 1 =", " 5", {"answer": "5"}) == 1.0


def test_reward_rejects_a_non_string_answer() -> None:
    with pytest.raises(TypeError, match=r"metadata\['answer'\]=19"):
        exact_match_reward("12 + 7 =", " 19", {"answer": 19})  # type: ignore[dict-item]


_PROMPT_RE = re.compile(r"(\d+) ([+-]) (\d+) =")


def _solve(prompt: str) -> int:
    a, op, b = _PROMPT_RE.fullmatch(prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def _whole_split(split: str) -> set[str]:
    return {row["prompt"] for row in make_problems(4000, 0, split)}


def test_splits_are_disjoint_and_cover_the_problem_space() -> None:
    train, test = _whole_split("train"), _whole_split("test")
    assert not train & test
    # 50 * 50 sums + (50 * 51 / 2 = 1275) differences a - b with a >= b = 3775 problems.
    assert len(train | test) == 3775
    # Pins the sha256 split (about TEST_PERCENT=20% of 3775): if this moves, held-out
    # accuracies from before the change are no longer comparable.
    assert len(test) == 722


def test_problems_are_correct_small_and_non_negative() -> None:
    for split in ("train", "test"):
        for row in make_problems(300, 1, split):
            a, _, b = _PROMPT_RE.fullmatch(row["prompt"]).groups()
            assert 0 <= int(a) <= MAX_OPERAND and 0 <= int(b) <= MAX_OPERAND
            assert row["answer"] == str(_solve(row["prompt"]))
            assert int(row["answer"]) >= 0


def test_problems_are_deterministic_and_distinct_until_the_split_is_used_up() -> None:
    assert make_problems(50, 3, "test") == make_problems(50, 3, "test")
    assert make_problems(50, 3, "test") != make_problems(50, 4, "test")
    rows = make_problems(722 + 10, 0, "test")
    assert len({row["prompt"] for row in rows[:722]}) == 722
    assert {row["prompt"] for row in rows[722:]} <= {row["prompt"] for row in rows[:722]}


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"split='dev'"):
        make_problems(1, 0, "dev")


def test_corpus_is_deterministic_and_train_only() -> None:
    assert make_corpus(200, seed=3) == make_corpus(200, seed=3)
    assert make_corpus(200, seed=3) != make_corpus(200, seed=4)
    test = _whole_split("test")
    for line in make_corpus(2000, seed=0):
        prompt, answer = line.rsplit(" ", 1)
        assert prompt not in test
        assert re.fullmatch(r"(0|[1-9]\d*)", answer)  # canonical, non-negative


@pytest.mark.parametrize(("fraction", "num_wrong"), [(WRONG_FRACTION, 250), (0.4, 400), (0.0, 0), (1.0, 1000)])
def test_corpus_wrong_fraction_is_exact(fraction: float, num_wrong: int) -> None:
    # round(1000 * fraction) lines are wrong, each off by 1, 2 or 3.
    lines = make_corpus(1000, seed=0, wrong_fraction=fraction)
    errors = [int(line.rsplit(" ", 1)[1]) - _solve(line.rsplit(" ", 1)[0]) for line in lines]
    assert sum(e != 0 for e in errors) == num_wrong
    assert all(abs(e) <= 3 for e in errors)
    if num_wrong:
        assert {abs(e) for e in errors} - {0} == {1, 2, 3}


def test_corpus_rejects_a_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"wrong_fraction=1.5"):
        make_corpus(10, 0, wrong_fraction=1.5)
