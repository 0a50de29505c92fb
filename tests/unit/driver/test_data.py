"""rlhf_dist.driver.data: JSONL rows, prompt loading with a length limit, and the step-keyed sampler."""

import pytest

from rlhf_dist.config import DataConfig
from rlhf_dist.driver.data import DataError, PromptSampler, load_prompts, read_rows
from rlhf_dist.tasks.reviews.corpus import make_prompts


class WordTokenizer:
    """One token per whitespace word; the id is the word's length, so ids are easy to write out.
    No special tokens are added; the end-of-sequence id is 99."""

    eos_token_id = 99

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(word) for word in text.split()]}


# One bad row of each kind, and the exception the reader reports for it.
BAD_ROWS = [
    (b'{"text": "no prompt key"}', "KeyError"),
    (b'{"prompt": ""}', "ValueError"),
    (b'{"prompt": "   "}', "ValueError"),
    (b'{"prompt": 5}', "ValueError"),
    (b'["prompt"]', "TypeError"),
    (b'{"prompt": "unterminated', "JSONDecodeError"),
    (b'{"prompt": "caf\xff"}', "UnicodeDecodeError"),
]


def write_rows(path, rows):
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_read_rows_skips_bad_rows(tmp_path):
    rows = [b'{"prompt": "good one"}', b"", *[raw for raw, _ in BAD_ROWS], b"   ", b'{"prompt": "good two", "x": 1}']
    path = write_rows(tmp_path / "p.jsonl", rows)
    kept, skipped = read_rows(path, "skip")
    assert kept == [{"prompt": "good one"}, {"prompt": "good two", "x": 1}]
    # the 7 bad rows count; the empty and the whitespace-only line are ignored
    assert skipped == 7


@pytest.mark.parametrize(("bad", "exc_name"), BAD_ROWS, ids=[name for _, name in BAD_ROWS])
def test_read_rows_error_names_file_and_line(tmp_path, bad, exc_name):
    # line 1 good, line 2 blank (not a row, but still a line), line 3 the bad row, line 4 another bad one
    path = write_rows(tmp_path / "p.jsonl", [b'{"prompt": "good"}', b"", bad, b'{"prompt": ""}'])
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "error")
    assert str(excinfo.value).startswith(f"{path}:3: bad row ({exc_name}")


def test_read_rows_clean_file_in_error_mode(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [b'{"prompt": "a"}', b'{"prompt": "b c"}'])
    assert read_rows(path, "error") == ([{"prompt": "a"}, {"prompt": "b c"}], 0)


def test_read_rows_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="file not found") as excinfo:
        read_rows(path, "skip")
    assert str(excinfo.value).startswith(f"data.prompts={str(path)!r}")


def prompt_file(tmp_path):
    # max_prompt_len=3 below: "a bb" (2 tokens) and "a bb ccc" (3, at the limit) fit; "a b c d" (4) does not
    return write_rows(
        tmp_path / "p.jsonl",
        [b'{"prompt": "a bb"}', b'{"prompt": "a b c d"}', b'{"prompt": ""}', b'{"prompt": "a bb ccc", "answer": "7"}'],
    )


def test_load_prompts_skips_over_long_prompts(tmp_path):
    cfg = DataConfig(prompts=str(prompt_file(tmp_path)), on_bad_row="skip")
    prompts = load_prompts(cfg.prompts, cfg, WordTokenizer(), max_prompt_len=3, seed=0)
    assert prompts.texts == ["a bb", "a bb ccc"]
    assert prompts.metadata == [{}, {"answer": "7"}]  # a row's other keys travel with its prompt
    assert prompts.token_ids == [[1, 2], [1, 2, 3]]
    # 1 empty row + 1 over-long prompt
    assert prompts.skipped == 2
    assert len(prompts) == 2


def test_load_prompts_rejects_over_long_prompt(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [b'{"prompt": "a bb"}', b'{"prompt": "a b c d"}'])
    cfg = DataConfig(prompts=str(path), on_bad_row="error")
    with pytest.raises(DataError, match=r"prompt of 4 tokens exceeds model\.max_prompt_len=3"):
        load_prompts(cfg.prompts, cfg, WordTokenizer(), max_prompt_len=3, seed=0)


def test_load_prompts_error_mode_stops_at_bad_row(tmp_path):
    cfg = DataConfig(prompts=str(prompt_file(tmp_path)), on_bad_row="error")
    # the over-long row 2 is only checked after reading; the empty row 3 fails first
    with pytest.raises(DataError, match=r":3: bad row"):
        load_prompts(cfg.prompts, cfg, WordTokenizer(), max_prompt_len=3, seed=0)


@pytest.mark.parametrize(
    "rows",
    [
        [b'{"prompt": ""}', b"not json"],  # every row malformed
        [b'{"prompt": "a b c d"}', b'{"prompt": "e f g h i"}'],  # every prompt too long
    ],
    ids=["malformed", "too-long"],
)
def test_load_prompts_with_nothing_usable(tmp_path, rows):
    cfg = DataConfig(prompts=str(write_rows(tmp_path / "p.jsonl", rows)), on_bad_row="skip")
    with pytest.raises(DataError, match=r"no usable prompts \(2 rows skipped\)"):
        load_prompts(cfg.prompts, cfg, WordTokenizer(), max_prompt_len=3, seed=0)


def test_load_prompts_builtin():
    cfg = DataConfig(prompts="builtin:reviews", num_builtin_prompts=10)
    prompts = load_prompts(cfg.prompts, cfg, WordTokenizer(), max_prompt_len=64, seed=3)
    assert len(prompts) == 10 and prompts.skipped == 0
    assert prompts.texts == make_prompts(10, 3)
    assert prompts.metadata == [{}] * 10
    assert prompts.token_ids == [WordTokenizer()(t)["input_ids"] for t in prompts.texts]


def test_sampler_is_deterministic_per_seed():
    a, b, other = PromptSampler(10, 5, seed=1), PromptSampler(10, 5, seed=1), PromptSampler(10, 5, seed=2)
    steps = range(6)
    assert [a.indices(s) for s in steps] == [b.indices(s) for s in steps]
    assert [a.indices(s) for s in steps] != [other.indices(s) for s in steps]


def test_sampler_depends_only_on_step_not_on_call_order():
    # a resumed run asks for step 7 first; it must see what a run that went through 0..6 saw
    fresh = PromptSampler(10, 4, seed=0).indices(7)
    walked = PromptSampler(10, 4, seed=0)
    for step in (0, 1, 2, 3, 9, 4, 5, 6):
        walked.indices(step)
    assert walked.indices(7) == fresh


def test_sampler_covers_every_prompt_once_per_epoch():
    sampler = PromptSampler(10, 5, seed=0)
    epoch0 = sampler.indices(0) + sampler.indices(1)
    epoch1 = sampler.indices(2) + sampler.indices(3)
    assert sorted(epoch0) == list(range(10))
    assert sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # a fresh permutation each epoch


def test_sampler_crosses_epoch_boundary():
    # n=10, batch 4: step 0 -> positions 0-3, step 1 -> 4-7, step 2 -> 8-11
    # (8, 9 from epoch 0; 10, 11 are positions 0, 1 of epoch 1), step 3 -> 12-15, step 4 -> 16-19
    sampler = PromptSampler(10, 4, seed=5)
    steps = [sampler.indices(s) for s in range(5)]
    assert all(len(batch) == 4 for batch in steps)
    epoch0 = steps[0] + steps[1] + steps[2][:2]
    epoch1 = steps[2][2:] + steps[3] + steps[4]
    assert sorted(epoch0) == list(range(10))
    assert sorted(epoch1) == list(range(10))
