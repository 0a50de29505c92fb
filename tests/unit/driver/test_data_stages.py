"""SFT and preference data: JSONL and datasets directories, bad rows, length limits, chat templates."""

import json

import pytest

from rlhf_dist.config import DataConfig
from rlhf_dist.driver.data import DataError, load_preferences, load_prompts, load_sft, read_rows
from rlhf_dist.models.chat import conversation_text
from tests.unit.driver.test_data import WordTokenizer, write_rows


def jsonl(path, rows):
    return write_rows(path, [json.dumps(r).encode() for r in rows])


def test_load_sft_counts_and_skips_bad_rows(tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "a bb", "response": "ccc"},
        {"prompt": "a", "response": ""},  # empty response
        {"prompt": "a"},  # missing key
        {"prompt": "a b", "response": "c d e f"},  # 2 + 4 + EOS = 7 tokens > 6
        {"prompt": "a b", "response": "c d e"},  # 6 tokens: at the limit
    ])
    cfg = DataConfig(sft=str(path))
    data = load_sft(cfg.sft, cfg, WordTokenizer(), max_len=6, seed=0)
    assert data.prompt_ids == [[1, 2], [1, 1]]
    assert data.response_ids == [[3, 99], [1, 1, 1, 99]]  # the response ends with EOS
    assert data.skipped == 3 and len(data) == 2


def test_load_sft_error_mode_names_the_line(tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": " "}])
    cfg = DataConfig(sft=str(path), on_bad_row="error")
    with pytest.raises(DataError, match=r"sft.jsonl:2: bad row \(ValueError: 'response' is empty"):
        load_sft(cfg.sft, cfg, WordTokenizer(), max_len=16, seed=0)


def test_load_sft_over_long_in_error_mode(tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", [{"prompt": "a b c", "response": "d e f"}])
    cfg = DataConfig(sft=str(path), on_bad_row="error")
    with pytest.raises(DataError, match=r"data.sft: row of 7 tokens exceeds the limit 4"):
        load_sft(cfg.sft, cfg, WordTokenizer(), max_len=4, seed=0)


def test_load_preferences(tmp_path):
    path = jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "the x was", "chosen": " good .", "rejected": " bad bad ."},
        {"prompt": "p", "chosen": " same", "rejected": " same"},  # nothing to learn: skipped
        {"prompt": "p", "chosen": " a"},  # missing rejected
    ])
    cfg = DataConfig(preferences=str(path))
    data = load_preferences(cfg.preferences, cfg, WordTokenizer(), max_len=16, seed=0)
    # no chat template: the reward model reads prompt + response; a pair is a ranking of two
    assert data.response_ids == [[[3, 1, 3, 4, 1], [3, 1, 3, 3, 3, 1]]] and data.ranks == [[0, 1]]
    assert data.skipped == 2 and data.comparisons() == 1


def test_load_rankings_beside_pairs(tmp_path):
    path = jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "p", "responses": [" a", " bb", " ccc"]},  # best first: ranks 0, 1, 2
        {"prompt": "p", "responses": [" a", " bb", " ccc", " dddd"], "ranks": [0, 1, 1, 2]},  # a tie
        {"prompt": "p", "responses": [" a", " bb"], "ranks": [3, 1]},  # ranks in any order: " bb" is better
        {"prompt": "p", "chosen": " a", "rejected": " bb"},
        {"prompt": "p", "responses": [" a", " bb", " a"], "ranks": [0, 1, 0]},  # one text twice, at one rank
        {"prompt": "p", "responses": [" a b c d e f", " bb"]},  # 7 tokens > 6: skipped
    ])
    cfg = DataConfig(preferences=str(path))
    data = load_preferences(cfg.preferences, cfg, WordTokenizer(), max_len=6, seed=0)
    assert data.response_ids[0] == [[1, 1], [1, 2], [1, 3]] and data.ranks[:4] == [[0, 1, 2], [0, 1, 1, 2], [3, 1], [0, 1]]
    # comparisons: 3 + (4 pairs - 1 tie = 5) + 1 + 1 + 2 (" a" over " bb" twice)
    assert len(data) == 5 and data.skipped == 1 and data.comparisons() == 12
    batch = data.batch([1, 2], pad_id=0)  # K = 4 slots; the ranking of two has two empty ones
    assert batch.input_ids.shape == (2, 4, 2) and batch.ranks.tolist() == [[0, 1, 1, 2], [3, 1, -1, -1]]


BAD_RANKINGS = [
    ({"prompt": "p", "responses": [" a"]}, "ValueError: 'responses' must be a list of at least 2 texts, got [' a']"),
    ({"prompt": "p", "responses": " a b"}, "ValueError: 'responses' must be a list of at least 2 texts, got ' a b'"),
    ({"prompt": "p", "responses": [" a", 5]}, "ValueError: 'responses'[1] is empty or not a string"),
    ({"prompt": "p", "responses": [" a", " "]}, "ValueError: 'responses'[1] is empty or not a string"),
    ({"prompt": "p", "responses": [" a", " b"], "ranks": [0, 1, 2]},
     "ValueError: 'ranks' must be a list of one rank per response (2), got [0, 1, 2]"),
    ({"prompt": "p", "responses": [" a", " b"], "ranks": [0, 0.5]},
     "TypeError: 'ranks' must be integers >= 0 (lower is better), got [0, 0.5]"),
    ({"prompt": "p", "responses": [" a", " b"], "ranks": [1, -1]},
     "TypeError: 'ranks' must be integers >= 0 (lower is better), got [1, -1]"),
    ({"prompt": "p", "responses": [" a", " b", " c"], "ranks": [2, 2, 2]},
     "ValueError: all 3 responses are tied (ranks [2, 2, 2]): no comparison"),
    ({"prompt": "p", "responses": [" a", " b", " a"]}, "ValueError: the same response at ranks 0 and 2: ' a'"),
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "ValueError: chosen and rejected are the same text"),
    ({"prompt": "p", "chosen": " a"}, "KeyError: 'rejected'"),
]


@pytest.mark.parametrize(("row", "message"), BAD_RANKINGS, ids=[m.split(":")[0] + str(i) for i, (_, m) in
                                                               enumerate(BAD_RANKINGS)])
def test_a_bad_ranking_is_one_line_naming_file_and_row(tmp_path, row, message):
    path = jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "responses": [" a", " b"]}, row])
    cfg = DataConfig(preferences=str(path), on_bad_row="error")
    with pytest.raises(DataError) as excinfo:
        load_preferences(cfg.preferences, cfg, WordTokenizer(), max_len=16, seed=0)
    assert str(excinfo.value) == f"{path}:2: bad row ({message})"
    skipped = load_preferences(cfg.preferences, DataConfig(), WordTokenizer(), max_len=16, seed=0)
    assert (len(skipped), skipped.skipped) == (1, 1)  # data.on_bad_row=skip: counted


def test_rankings_from_a_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["p", "q"], "responses": [[" a", " bb", " ccc"], [" a", " a"]],
            "ranks": [[1, 0, 1], [0, 0]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(preferences=str(tmp_path / "ds"))
    data = load_preferences(cfg.preferences, cfg, WordTokenizer(), max_len=16, seed=0)
    assert data.ranks == [[1, 0, 1]] and data.skipped == 1  # row 2: all tied
    with pytest.raises(DataError, match=r"ds:2: bad row \(ValueError: all 2 responses are tied"):
        load_preferences(cfg.preferences, DataConfig(preferences=cfg.preferences, on_bad_row="error"),
                         WordTokenizer(), max_len=16, seed=0)


def test_builtin_preferences_have_a_smaller_held_out_split():
    cfg = DataConfig(num_builtin_pairs=64)
    train = load_preferences("builtin:reviews", cfg, WordTokenizer(), max_len=64, seed=0)
    test = load_preferences("builtin:reviews", cfg, WordTokenizer(), max_len=64, seed=0, split="test")
    assert (len(train), len(test)) == (64, 8) and train.comparisons() == 64


def test_builtin_rankings_of_data_ranking_k():
    cfg = DataConfig(num_builtin_pairs=64, ranking_k=4)
    data = load_preferences("builtin:reviews", cfg, WordTokenizer(), max_len=64, seed=0)
    assert len(data) == 64 and all(len(r) == 4 for r in data.response_ids)
    assert 64 < data.comparisons() <= 64 * 6  # up to C(4, 2) per prompt, fewer where the annotator ties


def test_datasets_directory_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["a bb", "c", ""], "response": ["x", "y z", "w"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(sft=str(tmp_path / "ds"))
    data = load_sft(cfg.sft, cfg, WordTokenizer(), max_len=16, seed=0)
    assert data.prompt_ids == [[1, 2], [1]] and data.skipped == 1  # the empty prompt
    # a DatasetDict is read from its train split
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["q"]})}).save_to_disk(str(tmp_path / "dd"))
    assert read_rows(tmp_path / "dd", "skip") == ([{"prompt": "q"}], 0)


def test_a_directory_that_is_not_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="not a JSONL file or a datasets directory"):
        read_rows(tmp_path, "skip", key="data.sft")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_is_applied_when_the_tokenizer_has_one(tiny_policy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    plain = load_prompts("builtin:reviews", DataConfig(num_builtin_prompts=2), tokenizer, 64, seed=0)
    tokenizer.chat_template = CHAT_TEMPLATE
    templated = load_prompts("builtin:reviews", DataConfig(num_builtin_prompts=2), tokenizer, 64, seed=0)
    text = plain.texts[0]
    assert tokenizer.decode(templated.token_ids[0]) == f"<|user|> {text} <|assistant|>"
    assert tokenizer.decode(plain.token_ids[0], skip_special_tokens=True) == text
    assert conversation_text(tokenizer, "p", " r", True) == "<|user|> p <|assistant|>  r "
    assert conversation_text(tokenizer, "p", " r", False) == "p r"
    off = load_prompts("builtin:reviews", DataConfig(num_builtin_prompts=2, chat_template=False), tokenizer, 64, 0)
    assert off.token_ids == plain.token_ids  # data.chat_template=false turns it off
