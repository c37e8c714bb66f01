"""The prompt-parity gate against the real servers: each released template's Go twin, registered
as a model's TEMPLATE, makes Ollama send exactly the training render; a different TEMPLATE stops
the build before the model's name exists, showing both renders."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, write_tiny_recipe
from ollama_ft.errors import StageError
from ollama_ft.modelfile import ModelfileSpec
from ollama_ft.prompt_gate import GATE_PREFIX, PromptGateInput, check_prompt_parity, drop_gate_model
from ollama_ft.template_match import match_base_template
from test_template_match import QWEN25, released

pytestmark = [pytest.mark.e2e, pytest.mark.every_ollama]

RELEASED = [
    ("llama3-instruct", "Cutting Knowledge Date", "<|eot_id|>"),
    ("gemma3-instruct", "first_user_prefix", "<eos>"),
    ("mistral-instruct", "eos_token}}", "</s>"),
    ("phi-3", "{% else %}{{ eos_token }}", "<|endoftext|>"),
    ("chatml", "You are a helpful assistant.", "<|im_end|>"),
]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_base, tmp_path_factory):
    from ollama_ft.convert import run_converter

    folder = tmp_path_factory.mktemp("parity")
    run_converter(tiny_base, folder / "tiny.gguf", folder / "convert.log")
    return folder / "tiny.gguf"


def gate(server, gguf, jinja: str, eos: str, go_template: str, stops, system: str | None = None):
    from ollama_ft.register import push_blob
    from ollama_ft.runs import file_digest

    digest = "sha256:" + file_digest(gguf)
    push_blob(server.host, gguf, digest)
    spec = ModelfileSpec(gguf, go_template, list(stops), system, {"num_ctx": 512})
    return check_prompt_parity(PromptGateInput(server.host, spec, digest, jinja, eos))


@pytest.mark.parametrize("name, marker, eos", RELEASED + [("qwen2.5", "", "<|im_end|>")])
def test_released_templates_render_alike_in_ollama(name, marker, eos, tiny_gguf, ollama_server):
    jinja = QWEN25 if name == "qwen2.5" else released(name, marker)
    matched = match_base_template(jinja, eos)
    out = gate(ollama_server, tiny_gguf, jinja, eos, matched.go_template, matched.stop)
    try:
        # Mistral's template refuses system turns: it is checked on the conversation without one.
        assert out.method in ("render_only", "server_log") and out.checked == (1 if name == "mistral-instruct" else 3)
    finally:
        drop_gate_model(ollama_server.host, out.model)


def test_a_modelfile_system_prompt_is_rendered_as_training_renders_it(tiny_gguf, ollama_server):
    matched = match_base_template(QWEN25, "<|im_end|>")
    out = gate(ollama_server, tiny_gguf, QWEN25, "<|im_end|>", matched.go_template, matched.stop,
               system="Kısa ve kibar yanıt ver.")
    drop_gate_model(ollama_server.host, out.model)
    assert out.checked == 3


def test_a_different_template_fails_with_both_renders(tiny_gguf, ollama_server):
    matched = match_base_template(QWEN25, "<|im_end|>")
    without_default = matched.go_template.split("{{ end }}", 1)[1]   # the default system prompt dropped
    with pytest.raises(StageError) as err:
        gate(ollama_server, tiny_gguf, QWEN25, "<|im_end|>", without_default, matched.stop)
    message = err.value.message
    assert message.startswith("prompt parity: Ollama renders a conversation differently from training")
    training, ollama = message.rsplit("; Ollama: ", 1)
    assert training.rsplit("training: ", 1)[1][1:].startswith("<|im_start|>system\\nYou are Qwen")
    assert ollama[1:].startswith("<|im_start|>user")
    names = [m.model for m in ollama_server.client.list().models]
    assert not any(n.startswith(GATE_PREFIX) for n in names), names


def test_build_with_a_wrong_template_stops_before_register(ollama_server, runs_root, tmp_path):
    # A ChatML TEMPLATE that forgets the system turn, on a model that trained with ChatML's system turns.
    template = ('{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                "{{ end }}{{ end }}<|im_start|>assistant\n")
    recipe = write_tiny_recipe(tmp_path, "parity-wrong", model={"chat_template": "chatml"},
                               ollama={"template": template})
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir", str(runs_root),
                          "--host", ollama_server.host, "--no-eval"], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "prompt parity:" in last and "nothing was registered" in last, last
    training, ollama = last.split(" (nothing was registered")[0].rsplit("; Ollama: ", 1)
    assert training.rsplit("training: ", 1)[1][1:].startswith("<|im_start|>system\\n")
    assert ollama[1:].startswith("<|im_start|>user")
    from ollama_ft.register import model_exists

    assert not model_exists(ollama_server.client, "parity-wrong")
