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


# --- files as people write them: a BOM, CRLF line endings, OpenAI-style content parts ----------

BOM = "\ufeff".encode()
TURNS = [{"role": "user", "content": "Türkiye'nin başkenti neresidir?"},
         {"role": "assistant", "content": "Ankara."}]


def recipe_with_file(tmp_path, name, raw: bytes, extra=""):
    (tmp_path / name).write_bytes(raw)
    text = f'[model]\nbase = "tiny:llama"\n[data]\ntrain = "{name}"\n{extra}\n[ollama]\nname = "t"\n'
    return parse_recipe(text, tmp_path / "r.toml")


def test_jsonl_with_bom_and_crlf_reads_as_written(tmp_path):
    lines = [json.dumps({"messages": TURNS}, ensure_ascii=False), json.dumps(GOOD, ensure_ascii=False)]
    recipe = recipe_with_file(tmp_path, "d.jsonl", BOM + "\r\n".join(lines).encode() + b"\r\n")
    data = load_data(recipe)
    # Neither the mark nor a "\r" reaches the text the model trains on.
    assert [e.messages for e in data.train] == [TURNS, GOOD["messages"]]
    assert [e.source for e in data.train] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:2"]


def test_bom_and_crlf_keep_line_numbers_in_errors(tmp_path):
    lines = [json.dumps(GOOD), '{"messages": [{"role": "user", "content": "x"}]}']
    recipe = recipe_with_file(tmp_path, "d.jsonl", BOM + "\r\n".join(lines).encode() + b"\r\n")
    with pytest.raises(DataError) as info:
        load_data(recipe)
    assert str(info.value).startswith(f"{tmp_path / 'd.jsonl'}:2: the last turn must be the assistant's answer")


def test_a_bom_only_counts_at_the_start(tmp_path):
    # U+FEFF inside a file is a character, not a mark: the line stays invalid JSON.
    recipe = recipe_with_file(tmp_path, "d.jsonl", json.dumps(GOOD).encode() + b"\n" + BOM + json.dumps(GOOD).encode())
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        load_data(recipe)


def test_json_file_with_bom_and_crlf(tmp_path):
    raw = BOM + json.dumps([{"messages": TURNS}, GOOD], ensure_ascii=False, indent=1).replace("\n", "\r\n").encode()
    data = load_data(recipe_with_file(tmp_path, "d.json", raw))
    assert [e.messages for e in data.train] == [TURNS, GOOD["messages"]]


def test_csv_with_bom_crlf_and_a_multiline_cell(tmp_path):
    # As Excel's "CSV UTF-8" saves it: a BOM before the header, CRLF rows, "\r\n" inside a quoted cell.
    raw = BOM + ('instruction,input,output\r\n'
                 'Başkenti yaz,Türkiye,Ankara\r\n'
                 '"İki satır:\r\nbir, iki",,"Bir\r\nİki"\r\n').encode()
    data = load_data(recipe_with_file(tmp_path, "d.csv", raw))
    assert data.format == "alpaca"  # the header's first name is "instruction", not "\ufeffinstruction"
    assert [e.messages for e in data.train] == [
        [{"role": "user", "content": "Başkenti yaz\n\nTürkiye"}, {"role": "assistant", "content": "Ankara"}],
        [{"role": "user", "content": "İki satır:\nbir, iki"}, {"role": "assistant", "content": "Bir\nİki"}],
    ]
    assert [e.source for e in data.train] == [f"{tmp_path / 'd.csv'}:2", f"{tmp_path / 'd.csv'}:3"]


def parts(*texts, extra=()):
    return [{"type": "text", "text": t} for t in texts] + list(extra)


def test_openai_content_parts_are_joined_with_a_newline(tmp_path):
    record = {"messages": [{"role": "system", "content": parts("Kısa cevap ver.")},
                           {"role": "user", "content": parts("Türkiye'nin başkenti", "neresidir?")},
                           {"role": "assistant", "content": parts("Ankara.")}]}
    data = load_data(recipe_for(tmp_path, [record, GOOD]))
    assert data.train[0].messages == [{"role": "system", "content": "Kısa cevap ver."},
                                      {"role": "user", "content": "Türkiye'nin başkenti\nneresidir?"},
                                      {"role": "assistant", "content": "Ankara."}]
    assert data.train[1].messages == GOOD["messages"]  # plain strings beside parts in one file


def test_a_non_text_part_is_one_line_naming_the_record_and_the_type(tmp_path):
    image = {"type": "image_url", "image_url": {"url": "https://example.org/ankara.png"}}
    record = {"messages": [{"role": "user", "content": parts("Bu hangi şehir?", extra=[image])},
                           {"role": "assistant", "content": "Ankara."}]}
    recipe = recipe_for(tmp_path, [GOOD, record])
    with pytest.raises(DataError) as info:
        load_data(recipe)
    assert str(info.value) == (
        f"{tmp_path / 'd.jsonl'}:2: messages[0].content[1] has type 'image_url', not 'text' "
        '(ollama-ft trains text-only models: keep only {"type": "text"} parts in the record, '
        'or set data.on_bad_record = "skip" to leave such records out)')
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_non_text_parts_are_skipped_and_counted_in_skip_mode(tmp_path):
    audio = {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}
    record = {"messages": [{"role": "user", "content": parts(extra=[audio])}, {"role": "assistant", "content": "x"}]}
    data = load_data(recipe_for(tmp_path, [GOOD, record, GOOD], extra='on_bad_record = "skip"'))
    assert len(data.train) == 2 and data.skipped == 1
    assert data.skipped_reasons == {"messages[0].content[0] has type 'input_audio', not 'text'": 1}


@pytest.mark.parametrize("content, message", [
    ([], "messages[0].content is an empty list of parts"),
    ([{"type": "text", "text": "  "}], "messages[0].content[0].text is empty"),
    ([{"type": "text"}], "messages[0].content[0].text must be a string, got NoneType"),
    (["Merhaba"], 'messages[0].content[0] must be an object such as {"type": "text", "text": ...}, got str'),
    ([{"text": "Merhaba"}], "messages[0].content[0] has type None, not 'text'"),
])
def test_malformed_parts_name_the_part(tmp_path, content, message):
    record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError) as info:
        load_data(recipe_for(tmp_path, [record]))
    assert str(info.value).startswith(f"{tmp_path / 'd.jsonl'}:1: {message}"), str(info.value)
