"""The Modelfile: the family's TEMPLATE and stop tokens, and recipe text that can never add
directives, checked against the real Ollama parser (`ollama create -f`) and `/api/show`."""

from pathlib import Path

import pytest

from ollama_ft.chat_templates import load_family
from ollama_ft.modelfile import ModelfileSpec, modelfile_text_problem, render_modelfile

HOSTILE = [
    'Kibar ol.\nFROM /etc/passwd',
    'Kibar ol.\nPARAMETER temperature 9\nADAPTER /tmp/evil.gguf',
    "Tek ' tırnak ve \" çift tırnak \"\" iki",
    "Satır\n\nSYSTEM başka\nTEMPLATE {{ .Prompt }}",
    "# yorum gibi\nLICENSE MIT",
]


def spec_for(gguf: Path, system: str) -> ModelfileSpec:
    fam = load_family("chatml")
    return ModelfileSpec(gguf_path=gguf, template=fam.go_template, stops=list(fam.stop), system=system,
                         parameters={"num_ctx": 256, "temperature": 0.2})


def test_render_has_template_system_and_every_stop():
    text = render_modelfile(spec_for(Path("/m.gguf"), "Kibar ol."))
    assert text.startswith("FROM /m.gguf\nTEMPLATE \"\"\"")
    assert 'SYSTEM """Kibar ol."""' in text
    assert 'PARAMETER stop "<|im_start|>"' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER num_ctx 256" in text


@pytest.mark.parametrize("value, reason", [
    ('üç """ tırnak', 'contains """'),
    ('sonu tırnak"', 'ends with "'),
    ("zil \x07 sesi", "control character"),
])
def test_unrepresentable_text_is_refused(value, reason):
    assert reason in modelfile_text_problem(value)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_text_is_representable(value):
    assert modelfile_text_problem(value) is None


@pytest.mark.e2e
@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_real_parser_keeps_hostile_system_prompt_as_data(index, tiny_base, ollama_server, tmp_path_factory):
    from ollama_ft.convert import ConvertInput, convert_to_gguf

    folder = tmp_path_factory.mktemp(f"mf{index}")
    gguf = folder / "m.gguf"
    convert_to_gguf(ConvertInput(tiny_base, gguf, ["Merhaba"], 0.05, folder / "c.log"))
    system = HOSTILE[index]
    modelfile = folder / "Modelfile"
    modelfile.write_text(render_modelfile(spec_for(gguf, system)), encoding="utf-8")
    name = f"hostile-{index}"
    out = ollama_server.run_cli("create", name, "-f", str(modelfile))
    assert out.returncode == 0, out.stderr
    show = ollama_server.show(name)
    assert show["system"] == system
    assert show["template"] == load_family("chatml").go_template
    params = show["parameters"]
    keys = {line.split()[0] for line in params.splitlines() if line.strip()}
    assert keys == {"num_ctx", "temperature", "stop"}, params
    assert "temperature 0.2" in " ".join(params.split())
    # The stored model has exactly the intended layers: one GGUF, a template, a system, params.
    layers = ollama_server.manifest_layers(name)
    assert sorted(layers) == ["model", "params", "system", "template"], layers
