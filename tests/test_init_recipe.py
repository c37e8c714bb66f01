"""`ollama-ft init` (ollama_ft/init_recipe.py): the written recipe loads, names and paths are right."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from ollama_ft.errors import UserInputError
from ollama_ft.init_recipe import sanitise_ollama_name, write_init_recipe
from ollama_ft.recipe import OLLAMA_NAME_RE, load_recipe

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_defaults_load_and_every_field_is_commented(tmp_path: Path) -> None:
    path = write_init_recipe(tmp_path / "demo.toml")
    recipe = load_recipe(path)  # checks the files it names exist, too
    assert recipe.model.base == "tiny:llama" and recipe.model.chat_template == "auto"
    assert recipe.ollama.name == "demo"
    assert recipe.train.method == "full"  # a random tiny base learns nothing from adapters alone
    assert all(recipe.resolve(t).is_file() for t in recipe.data.train)
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith("#"):
            assert " # " in line, f"no comment on: {line}"
    # Every section of the recipe model appears.
    sections = set(tomllib.loads(path.read_text(encoding="utf-8")))
    assert sections == {"model", "data", "train", "export", "ollama", "eval"}


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("# my own notes\n", encoding="utf-8")
    with pytest.raises(UserInputError) as info:
        write_init_recipe(path)
    assert str(path) in info.value.message and info.value.hint == "choose another path or delete it"
    assert path.read_text(encoding="utf-8") == "# my own notes\n"


def test_name_from_stem_is_sanitised(tmp_path: Path) -> None:
    path = write_init_recipe(tmp_path / "Türkçe Asistan v2 (deneme)!.toml")
    name = load_recipe(path).ollama.name
    assert OLLAMA_NAME_RE.match(name)
    assert name == "turkce-asistan-v2-deneme"
    assert sanitise_ollama_name("!!!") == "my-model"
    assert len(sanitise_ollama_name("x" * 200)) == 80


def test_invalid_explicit_name_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a valid Ollama model name") as info:
        write_init_recipe(tmp_path / "r.toml", name="My Model!")
    assert "'my-model'" in info.value.hint
    assert not (tmp_path / "r.toml").exists()
    named = write_init_recipe(tmp_path / "r.toml", name="me/tr-assistant:v1")
    assert load_recipe(named).ollama.name == "me/tr-assistant:v1"


def test_local_base_keeps_its_own_llama3_template_and_paths_are_relative(tmp_path: Path) -> None:
    base = tmp_path / "models" / "llama-3-8b"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}", encoding="utf-8")
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}), encoding="utf-8")
    data = tmp_path / "data" / "chats.jsonl"
    data.parent.mkdir()
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
                    encoding="utf-8")
    path = write_init_recipe(tmp_path / "recipes" / "llama.toml", base=str(base), data=str(data))
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert raw["model"]["base"] == "../models/llama-3-8b"
    assert raw["data"]["train"] == "../data/chats.jsonl"
    recipe = load_recipe(path)
    assert recipe.model.chat_template == "auto"   # a Go template renders it exactly: it ships as it is
    assert recipe.train.method == "lora" and recipe.model.dtype == "auto"
    assert recipe.resolve(recipe.model.base).resolve() == base.resolve()


def test_chat_template_jinja_file_and_unknown_template(tmp_path: Path) -> None:
    base = tmp_path / "gemma"
    base.mkdir()
    (base / "chat_template.jinja").write_text("{{ '<start_of_turn>user' }}", encoding="utf-8")
    # A template no Go template reproduces: the family it resembles, which then replaces it.
    assert load_recipe(write_init_recipe(tmp_path / "g.toml", base=str(base))).model.chat_template == "gemma"
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}), encoding="utf-8")
    assert load_recipe(write_init_recipe(tmp_path / "o.toml", base=str(other))).model.chat_template == "auto"


def test_paths_from_the_working_directory_are_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not created yet: still local paths (by suffix), relative to where the user typed them.
    monkeypatch.chdir(tmp_path)
    path = write_init_recipe("recipes/new.toml", data="data/later.jsonl")
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert raw["data"]["train"] == "../data/later.jsonl"
    hub = write_init_recipe("recipes/hub.toml", base="Qwen/Qwen2.5-0.5B-Instruct", data="org/some-dataset")
    raw = tomllib.loads(hub.read_text(encoding="utf-8"))
    assert raw["model"]["base"] == "Qwen/Qwen2.5-0.5B-Instruct" and raw["data"]["train"] == "org/some-dataset"
    assert raw["train"]["method"] == "lora"
