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
    # no chat template: the reward model reads prompt + response
    assert data.chosen_ids == [[3, 1, 3, 4, 1]] and data.rejected_ids == [[3, 1, 3, 3, 3, 1]]
    assert data.skipped == 2


def test_builtin_preferences_have_a_smaller_held_out_split():
    cfg = DataConfig(num_builtin_pairs=64)
    train = load_preferences("builtin:reviews", cfg, WordTokenizer(), max_len=64, seed=0)
    test = load_preferences("builtin:reviews", cfg, WordTokenizer(), max_len=64, seed=0, split="test")
    assert (len(train), len(test)) == (64, 8)


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
