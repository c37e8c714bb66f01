"""Prompt parity through the server's own renderer: the current Ollama renders a conversation for a
registered model (`_debug_render_only`, ollama_ft/prompt_render.py) exactly as training's Jinja
template does, a TEMPLATE one character off renders differently, and the 0.11.4 floor, which
lacks the endpoint, is answered with None instead of a reply."""

import pytest

from ollama_ft.chat_templates import FAMILIES, load_family, render_jinja
from ollama_ft.errors import OllamaError
from ollama_ft.modelfile import ModelfileSpec
from ollama_ft.ollama_server import CURRENT_OLLAMA_VERSION, OLLAMA_VERSION
from ollama_ft.prompt_render import render_prompt
from ollama_ft.register import RegisterInput, register_model

pytestmark = pytest.mark.e2e

CONVERSATION = [
    {"role": "system", "content": "Sen kibar bir asistansın."},
    {"role": "user", "content": "Merhaba! Türkiye'nin başkenti neresi?"},
    {"role": "assistant", "content": "Ankara."},
    {"role": "user", "content": "Peki en kalabalık şehri?"},
]


@pytest.fixture(scope="module")
def base_gguf(tiny_base, tmp_path_factory):
    from ollama_ft.convert import ConvertInput, convert_to_gguf

    folder = tmp_path_factory.mktemp("render")
    return convert_to_gguf(ConvertInput(tiny_base, folder / "base.gguf", ["Merhaba"], 0.05, folder / "convert.log")).gguf_path


@pytest.fixture(scope="module")
def current(ollama_servers):
    return ollama_servers.get(CURRENT_OLLAMA_VERSION)


def register(server, name: str, gguf, template: str, stops: list[str]) -> str:
    register_model(RegisterInput(name, server.host, ModelfileSpec(gguf, template, stops, parameters={"num_ctx": 512}),
                                 force=True))
    return name


@pytest.mark.parametrize("family", FAMILIES)
def test_current_server_renders_the_training_prompt(family, base_gguf, current):
    fam = load_family(family)
    name = register(current, f"render-{family}", base_gguf, fam.go_template, list(fam.stop))
    assert render_prompt(current.host, name, CONVERSATION) == render_jinja(fam, CONVERSATION)


def test_a_template_one_character_off_renders_differently(base_gguf, current):
    chatml = load_family("chatml")
    off = chatml.go_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant", 1)
    assert off != chatml.go_template
    name = register(current, "render-off", base_gguf, off, list(chatml.stop))
    rendered = render_prompt(current.host, name, CONVERSATION)
    training = render_jinja(chatml, CONVERSATION)
    assert rendered is not None and rendered != training
    assert rendered == training.removesuffix("\n")   # the one newline, and nothing else


def test_the_floor_has_no_render_only_and_gets_none(base_gguf, ollama_servers):
    floor = ollama_servers.get(OLLAMA_VERSION)
    chatml = load_family("chatml")
    name = register(floor, "render-floor", base_gguf, chatml.go_template, list(chatml.stop))
    assert render_prompt(floor.host, name, CONVERSATION) is None


def test_a_missing_model_is_one_clear_error(current):
    with pytest.raises(OllamaError, match=r"could not render a prompt for 'no-such-model' \(404"):
        render_prompt(current.host, "no-such-model", CONVERSATION)
