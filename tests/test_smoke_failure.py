"""When Ollama's runner cannot run a registered GGUF, the smoke stage says why, from the log of
a server ollama-ft started, beside the checks the build passed (not only "answered 500")."""

from __future__ import annotations

import pytest

from ollama_ft.errors import StageError
from ollama_ft.modelfile import ModelfileSpec
from ollama_ft.register import RegisterInput, register_model
from ollama_ft.smoke import SmokeInput, smoke_test

pytestmark = pytest.mark.e2e


def test_a_runner_that_cannot_load_the_model_is_explained(tiny_base, ollama_server, tmp_path):
    from ollama_ft.convert import run_converter

    gguf = tmp_path / "tiny.gguf"
    run_converter(tiny_base, gguf, tmp_path / "convert.log")
    truncated = tmp_path / "truncated.gguf"   # header and metadata intact, tensor data cut short
    truncated.write_bytes(gguf.read_bytes()[: int(gguf.stat().st_size * 0.6)])
    register_model(RegisterInput("smoke-truncated", ollama_server.host,
                                 ModelfileSpec(truncated, "{{ .Prompt }}", [], None, {}), force=True))
    with pytest.raises(StageError) as err:
        smoke_test(SmokeInput("smoke-truncated", ollama_server.host, [{"role": "user", "content": "Merhaba"}],
                              evidence="tokenizer ids equal on 3/3 examples"))
    message = err.value.one_line()
    assert message.startswith("smoke test: Ollama could not run smoke-truncated: ")
    assert "server log: " in message and "not within the file bounds" in message
    assert "the build's checks passed (tokenizer ids equal on 3/3 examples)" in message
