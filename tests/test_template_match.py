"""A base's own chat template is matched to a Go template that renders the same prompts.

The templates here are released models' own, as Ollama's Go module carries them
(`template/index.json`, in the module cache since setup builds Ollama from it) and as SmolLM2's
GGUF carries its own; each must match the family whose Go twin renders it exactly, with the
base's default system prompt where it has one. A template no family renders is refused before
training, naming the recipe field that picks a family instead."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ollama_ft.errors import UserInputError
from ollama_ft.template_match import PROBES, candidate_render, choose_template, match_base_template, render


def ollama_module_templates() -> list[dict]:
    from ollama_ft.ollama_server import OLLAMA_MODULE, OLLAMA_VERSION

    try:
        cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        cache = str(Path.home() / "go" / "pkg" / "mod")
    index = Path(cache) / f"{OLLAMA_MODULE}@v{OLLAMA_VERSION}" / "template" / "index.json"
    if not index.is_file():
        pytest.skip(f"{index} is missing: scripts/setup.sh builds Ollama from its Go module")
    return json.loads(index.read_text(encoding="utf-8"))


def released(name: str, marker: str) -> str:
    """The released template named `name` in Ollama's index that contains `marker`."""
    found = [t["template"] for t in ollama_module_templates() if t["name"] == name and marker in t["template"]]
    assert found, (name, marker)
    return found[0]


# Qwen2.5-Instruct's template without its tools branch (a conversation without tools never reaches it).
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("name, marker, eos, family, default_system", [
    ("llama3-instruct", "{% set loop_messages = messages %}", "<|eot_id|>", "llama3", None),
    ("llama3-instruct", "Cutting Knowledge Date", "<|eot_id|>", "llama31", None),
    ("gemma3-instruct", "first_user_prefix", "<eos>", "gemma", None),
    ("mistral-instruct", "eos_token}}", "</s>", "mistral", None),
    ("phi-3", "{% else %}{{ eos_token }}", "<|endoftext|>", "phi3", None),
    ("chatml", "You are a helpful assistant.", "<|im_end|>", "chatml", "You are a helpful assistant."),
])
def test_released_templates_match_their_family(name, marker, eos, family, default_system):
    matched = match_base_template(released(name, marker), eos)
    assert matched is not None and matched.family == family and matched.source == "base"
    assert matched.default_system == default_system
    # What training renders is the base's own template, not the family's twin.
    assert matched.jinja == released(name, marker)


def test_qwen25_keeps_its_default_system_prompt():
    matched = match_base_template(QWEN25, "<|im_end|>")
    assert matched.family == "chatml"
    assert matched.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert "You are Qwen" in matched.go_template and matched.go_template.startswith("{{- if or (not .Messages)")


def test_every_probe_renders_the_same_through_the_twin():
    matched = match_base_template(QWEN25, "<|im_end|>")
    from ollama_ft.chat_templates import load_family

    for probe in PROBES:
        generation = probe[-1]["role"] == "user"
        assert render(QWEN25, probe, add_generation_prompt=generation) == \
            candidate_render(load_family("chatml"), matched.default_system, list(probe), generation, "")


def test_a_template_no_family_renders_is_refused_naming_the_field():
    dbrx = released("chatml", "You are DBRX")   # no newline after its last turn: no family renders that
    with pytest.raises(UserInputError) as err:
        choose_template("auto", dbrx, "databricks/dbrx-instruct", "<|im_end|>")
    assert err.value.message.startswith("model.chat_template = 'auto': no Go template ollama-ft knows renders")
    assert "set model.chat_template" in err.value.hint


def test_a_base_without_a_template_needs_a_family():
    with pytest.raises(UserInputError, match="has no chat template"):
        choose_template("auto", None, "./gemma-3-270m.gguf")
    assert choose_template("gemma", None, "./gemma-3-270m.gguf").family == "gemma"


def test_smollm2_s_own_template_ships_with_its_default_system_prompt():
    from ollama_ft.gguf_import import tokenizer_metadata

    gguf = Path(os.environ.get("OLLAMA_FT_CACHE", Path.home() / ".cache" / "ollama-ft")) / "models" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is missing: run scripts/fetch_models.sh")
    matched = match_base_template(tokenizer_metadata(gguf)["tokenizer.chat_template"], "<|im_end|>")
    assert matched.family == "chatml"
    assert matched.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_an_example_the_template_refuses_is_named_before_training():
    from ollama_ft.template_match import check_examples_render

    mistral = match_base_template(released("mistral-instruct", "eos_token}}"), "</s>")
    fine = {"messages": [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "Selam"}]}
    with_system = {"messages": [{"role": "system", "content": "Kısa yanıt ver."}, *fine["messages"]]}
    check_examples_render(mistral, [fine], ["d.jsonl:1"])
    with pytest.raises(UserInputError) as err:
        check_examples_render(mistral, [fine, with_system], ["d.jsonl:1", "d.jsonl:2"])
    assert err.value.message.startswith("d.jsonl:2: the chat template (mistral (the base's own template)) refuses")
