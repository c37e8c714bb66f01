"""Training data checks: every bad record is reported with its file and line (or skipped and
counted), before any model loads."""

import json

import pytest

from ollama_ft.data import load_data
from ollama_ft.errors import DataError
from ollama_ft.recipe import parse_recipe

GOOD = {"messages": [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "Selam!"}]}


def recipe_for(tmp_path, lines, extra=""):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join((l if isinstance(l, bytes) else (json.dumps(l, ensure_ascii=False)
                                                                if not isinstance(l, str) else l).encode()) + b"\n"
                              for l in lines))
    text = f'[model]\nbase = "tiny:llama"\n[data]\ntrain = "d.jsonl"\n{extra}\n[ollama]\nname = "t"\n'
    return parse_recipe(text, tmp_path / "r.toml")


@pytest.mark.parametrize("bad, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    (b"\xff\xfe bozuk", "d.jsonl:2: not valid UTF-8"),
    ({"messages": []}, "d.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
     "d.jsonl:2: messages[0].content is empty"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     "d.jsonl:2: roles out of order: turn 1 is 'assistant', expected 'user'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "d.jsonl:2: the last turn must be the assistant's answer"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "d.jsonl:2: messages[0].role = 'bot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "d.jsonl:2: messages[0].content must be a string"),
    ([1, 2], "d.jsonl:2: a record must be an object, got list"),
])
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    recipe = recipe_for(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_data(recipe)
    assert message in str(info.value), str(info.value)
    assert info.value.exit_code == 2


def test_skip_mode_counts_bad_records(tmp_path):
    recipe = recipe_for(tmp_path, [GOOD, "{oops", {"messages": [{"role": "user", "content": "x"}]}, GOOD],
                        extra='on_bad_record = "skip"')
    data = load_data(recipe)
    assert len(data.train) == 2 and data.skipped == 2 and sum(data.skipped_reasons.values()) == 2


def test_empty_dataset_is_refused(tmp_path):
    recipe = recipe_for(tmp_path, ["", "   "])
    with pytest.raises(DataError, match="no usable examples"):
        load_data(recipe)


def test_unknown_format_says_which_fields(tmp_path):
    recipe = recipe_for(tmp_path, [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match="records need 'messages', 'instruction'\\+'output', or 'text'"):
        load_data(recipe)


def test_alpaca_and_text_formats_load(tmp_path):
    recipe = recipe_for(tmp_path, [{"instruction": "Çevir", "input": "hello", "output": "merhaba"}])
    data = load_data(recipe)
    assert data.format == "alpaca"
    assert data.train[0].messages == [{"role": "user", "content": "Çevir\n\nhello"},
                                      {"role": "assistant", "content": "merhaba"}]
    recipe = recipe_for(tmp_path, [{"text": "Ankara başkenttir."}])
    assert load_data(recipe).train[0].text == "Ankara başkenttir."


def test_system_prompt_is_added_and_split_is_seeded(tmp_path):
    recipe = recipe_for(tmp_path, [GOOD] * 20, extra='system_prompt = "Kibar ol."\nvalidation_split = 0.25')
    data = load_data(recipe)
    assert len(data.validation) == 5 and len(data.train) == 15
    assert data.train[0].messages[0] == {"role": "system", "content": "Kibar ol."}


def test_bundled_formats_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name, fmt in (("turkish-demo.jsonl", "messages"), ("turkish-demo-alpaca.jsonl", "alpaca"),
                      ("turkish-demo-text.jsonl", "text")):
        text = f'[model]\nbase = "tiny:llama"\n[data]\ntrain = "{root / "data" / name}"\n[ollama]\nname = "t"\n'
        data = load_data(parse_recipe(text, root / "r.toml"))
        assert data.format == fmt and len(data.train) >= 10


def test_hub_dataset_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    text = '[model]\nbase = "tiny:llama"\n[data]\ntrain = "someone/turkish-chats"\n[ollama]\nname = "t"\n'
    recipe = parse_recipe(text, tmp_path / "r.toml")
    with pytest.raises(DataError, match="cannot load hub dataset 'someone/turkish-chats'"):
        load_data(recipe)


def test_hub_dataset_records_go_through_the_same_checks(tmp_path, monkeypatch):
    import ollama_ft.data as data_module

    rows = [GOOD, {"messages": [{"role": "user", "content": "x"}]}]
    monkeypatch.setattr(data_module, "_hub_records", lambda dataset_id, split="train": enumerate(rows, start=1))
    text = '[model]\nbase = "tiny:llama"\n[data]\ntrain = "someone/chats"\non_bad_record = "skip"\n[ollama]\nname = "t"\n'
    data = load_data(parse_recipe(text, tmp_path / "r.toml"))
    assert len(data.train) == 1 and data.skipped == 1
