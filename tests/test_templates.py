"""Every chat-template family renders a conversation identically in the tokenizer (Jinja, as
training sees it) and in the real Ollama server (Go TEMPLATE, as users' chats see it)."""

import pytest

from ollama_ft.chat_templates import FAMILIES, detect_family, load_family, render_jinja

pytestmark = pytest.mark.every_ollama

CONVERSATION = [
    {"role": "system", "content": "Sen kibar bir asistansın."},
    {"role": "user", "content": "Merhaba! Türkiye'nin başkenti neresi?"},
    {"role": "assistant", "content": "Ankara."},
    {"role": "user", "content": "Peki en kalabalık şehri?"},
]


@pytest.mark.parametrize("family", FAMILIES)
def test_jinja_matches_transformers_rendering(family, tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    fam = load_family(family)
    ours = render_jinja(fam, CONVERSATION)
    theirs = tok.apply_chat_template(CONVERSATION, chat_template=fam.jinja, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert CONVERSATION[-1]["content"] in ours and "Ankara." in ours


@pytest.fixture(scope="module")
def base_gguf(tiny_base, tmp_path_factory):
    """The untrained tiny base as an F16 GGUF in Ollama; each family is a TEMPLATE on top of it."""
    from ollama_ft.convert import ConvertInput, convert_to_gguf

    folder = tmp_path_factory.mktemp("tpl")
    out = convert_to_gguf(ConvertInput(tiny_base, folder / "base.gguf", ["Merhaba"], 0.05, folder / "convert.log"))
    return out.gguf_path


@pytest.mark.e2e
@pytest.mark.parametrize("family", FAMILIES)
def test_ollama_renders_the_same_prompt(family, base_gguf, ollama_server):
    fam = load_family(family)
    client = ollama_server.client
    digest = client.create_blob(base_gguf)
    name = f"tpl-{family}"
    client.create(model=name, files={"base.gguf": digest}, template=fam.go_template,
                  parameters={"stop": list(fam.stop)}, stream=False)
    client.chat(model=name, messages=CONVERSATION, options={"num_predict": 1, "temperature": 0})
    rendered = ollama_server.prompts_logged()[-1]
    assert rendered == render_jinja(fam, CONVERSATION)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_detected_from_its_own_template(family):
    assert detect_family(load_family(family).jinja) == family


def test_every_end_of_turn_marker_is_a_stop_token():
    chatml, llama3 = load_family("chatml"), load_family("llama3")
    assert "<|im_end|>" in chatml.stop and "<|eot_id|>" in llama3.stop
    assert "<end_of_turn>" in load_family("gemma").stop and "</s>" in load_family("mistral").stop
