"""Every precondition of a build is checked before any folder is made or model loads, and all
problems are reported at once, on one line: a stopped Ollama server, a model name that belongs to
someone else, an Ollama parameter of the wrong type, along with the data and option checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ollama_ft.cli import main

RECIPE = """[model]
base = "tiny:llama"
[data]
train = "d.jsonl"
[ollama]
name = "NAME"
"""
GOOD = {"messages": [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "Selam!"}]}


def run_build(tmp_path: Path, host: str, recipe: str = RECIPE, rows=(GOOD,), name: str = "preflight-t"):
    (tmp_path / "r.toml").write_text(recipe.replace("NAME", name), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows),
                                      encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"),
                                       "--host", host])
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()
    return result


def test_a_stopped_server_is_found_before_training(tmp_path):
    result = run_build(tmp_path, "127.0.0.1:9")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the Ollama server at http://127.0.0.1:9")


def test_a_parameter_of_the_wrong_type_is_a_recipe_error(tmp_path):
    recipe = RECIPE + 'parameters = { num_ctx = "big", temperature = 0.2, penalize_newline = 1 }\n'
    result = run_build(tmp_path, "127.0.0.1:9", recipe)
    assert result.exit_code == 2
    assert "ollama.parameters.num_ctx = 'big': must be a whole number" in result.stderr
    assert "ollama.parameters.penalize_newline = 1: must be true or false" in result.stderr
    assert "temperature" not in result.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    result = run_build(tmp_path, "127.0.0.1:9", rows=(GOOD, "{broken\n"))
    assert result.exit_code == 2   # wrong input outranks the stopped server
    err = result.stderr
    assert err.startswith("error: 2 problems stop this build: (1) ")
    assert "d.jsonl:2: not valid JSON" in err and "(2) cannot reach the Ollama server" in err


@pytest.mark.e2e
def test_a_name_that_belongs_to_another_model_is_found_before_training(tmp_path, tiny_base, ollama_server):
    from ollama_ft.convert import run_converter
    from ollama_ft.modelfile import ModelfileSpec
    from ollama_ft.register import RegisterInput, register_model

    gguf = tmp_path / "someone-else.gguf"
    run_converter(tiny_base, gguf, tmp_path / "convert.log")
    register_model(RegisterInput("preflight-taken", ollama_server.host,
                                 ModelfileSpec(gguf, "{{ .Prompt }}", [], None, {}), force=True))
    result = run_build(tmp_path, ollama_server.host, name="preflight-taken")
    assert result.exit_code == 1
    assert "a model named 'preflight-taken' already exists in Ollama" in result.stderr
    assert "pass --force to replace it" in result.stderr


@pytest.mark.e2e
def test_a_server_that_cannot_run_the_bases_architecture_is_found_before_training(tmp_path, ollama_server):
    import os

    gemma = Path(os.environ.get("OLLAMA_FT_CACHE", Path.home() / ".cache" / "ollama-ft")) / "models" / \
        "gemma-3-270m-q4_k_m.gguf"
    if not gemma.is_file():
        pytest.skip(f"{gemma} is missing: run scripts/fetch_models.sh")
    assert ollama_server.version == "0.11.4"   # the floor fixture; 0.24.0 runs gemma3 (test_real_weights_e2e)
    result = run_build(tmp_path, ollama_server.host, RECIPE.replace('"tiny:llama"', json.dumps(str(gemma))))
    assert result.exit_code == 1
    assert "is version 0.11.4, which cannot run gemma3 models" in result.stderr
    assert "upgrade Ollama to 0.24.0 or newer (`ollama-ft install-ollama --version 0.24.0`)" in result.stderr
