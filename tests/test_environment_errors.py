"""Environment problems found before work is lost: an Ollama too old for the API we use, not
enough disk for the next stage, examples that no longer fit once tokenised, and recipe text that
a Modelfile cannot hold."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ollama_ft.errors import OllamaError, OllamaFtError, RecipeError
from ollama_ft.recipe import parse_recipe


def _version_server(version: str):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"version": version}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_too_old_ollama_is_refused_before_upload():
    from ollama_ft.register import check_server_version

    server = _version_server("0.3.14")
    try:
        with pytest.raises(OllamaError, match=r"version 0.3.14, too old .* \(upgrade to 0.5.5 or newer"):
            check_server_version(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    server = _version_server("0.11.4")
    try:
        assert check_server_version(f"http://127.0.0.1:{server.server_port}") == "0.11.4"
    finally:
        server.shutdown()


def test_not_enough_disk_is_said_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from ollama_ft.stages import ensure_disk

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 9 * 2**30, 2**30))
    with pytest.raises(OllamaFtError, match=r"convert: needs about 4.0 GiB in .*, only 1.0 GiB free"):
        ensure_disk(tmp_path, 4 * 2**30, "convert")
    ensure_disk(tmp_path, 2**20, "convert")  # small enough: no error


def test_examples_too_long_for_max_length_are_counted_and_refused(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    from ollama_ft.backends.common import DatasetTooLong, build_dataset
    from ollama_ft.chat_templates import load_family

    tok = AutoTokenizer.from_pretrained(tiny_base)
    long_prompt = "Türkiye'nin şehirlerini anlat. " * 20
    rows = [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Tamam."}]}] * 3
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DatasetTooLong, match="all 3 examples exceed model.max_seq_length = 32"):
        build_dataset(str(path), tok, load_family("chatml").jinja, True, 32)
    ds, truncated, dropped = build_dataset(str(path), tok, load_family("chatml").jinja, True, 4096)
    assert len(ds) == 3 and truncated == dropped == 0


@pytest.mark.parametrize("field, value, message", [
    ("system", 'Kibar ol """ FROM x', 'ollama.system: contains """'),
    ("system", "zil \x07", "ollama.system: contains control character"),
    ("template", '{{ .Prompt }}"', 'ollama.template: ends with "'),
])
def test_recipe_text_a_modelfile_cannot_hold_is_refused(tmp_path, field, value, message):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    text = (f'[model]\nbase = "tiny:llama"\n[data]\ntrain = "d.jsonl"\n[ollama]\nname = "t"\n'
            f"{field} = {json.dumps(value)}\n")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, tmp_path / "r.toml")
    assert any(message in p for p in info.value.problems), info.value.problems


def test_unknown_ollama_parameter_gets_a_suggestion(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    text = '[model]\nbase = "tiny:llama"\n[data]\ntrain = "d.jsonl"\n[ollama]\nname = "t"\nparameters = { temprature = 0.5 }\n'
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, tmp_path / "r.toml")
    assert "ollama.parameters.temprature: not an Ollama parameter; did you mean 'temperature'?" in info.value.problems
