"""`ollama-ft doctor` (ollama_ft/doctor.py) against this machine: a missing and a real Ollama, a 4-bit recipe."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from ollama_ft.console import doctor_table
from ollama_ft.doctor import Check, blocking_checks, doctor_exit_code, run_doctor
from ollama_ft.ollama_server import OLLAMA_VERSION, TESTED_OLLAMA_VERSIONS, OllamaServer, find_ollama_binary, free_port
from ollama_ft.recipe import parse_recipe

RECIPE = """
[model]
base = "tiny:llama"
load_in_4bit = {four_bit}
[data]
train = "train.jsonl"
[train]
method = "{method}"
[ollama]
name = "doctor-test"
"""


def _recipe(tmp_path: Path, *, four_bit: bool):
    text = RECIPE.format(four_bit=str(four_bit).lower(), method="qlora" if four_bit else "lora")
    return parse_recipe(text, tmp_path / "r.toml", check_files=False)


def _rows(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_missing_ollama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the interpreter's folder and the system's: none of them holds an `ollama`.
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    if shutil.which("ollama", path=path):
        pytest.skip("an `ollama` is installed system-wide")
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "empty-cache"))
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    checks = run_doctor(host=closed, runs_dir=tmp_path / "runs")
    rows = _rows(checks)
    assert rows["Ollama binary"].status == "missing"
    assert "ollama-ft install-ollama" in rows["Ollama binary"].fix
    server = rows["Ollama server"]
    assert server.status == "missing" and closed in server.detail
    assert "ollama serve" in server.fix and "ollama-ft install-ollama" in server.fix
    # Unreachable Ollama stops a build, not a plain `doctor` of the install.
    ollama_rows = [rows["Ollama binary"], server]
    assert doctor_exit_code(ollama_rows, None) == 0
    assert doctor_exit_code(ollama_rows, _recipe(tmp_path, four_bit=False)) == 1
    assert doctor_table(checks).row_count == len(checks)


@pytest.mark.e2e   # starts a real `ollama serve`
def test_present_ollama(tmp_path: Path) -> None:
    if find_ollama_binary() is None:
        pytest.skip("no Ollama binary: run `ollama-ft install-ollama`")
    with OllamaServer(models_dir=tmp_path / "models") as server:
        rows = _rows(run_doctor(host=server.host, runs_dir=tmp_path))
    binary = rows["Ollama binary"]
    assert binary.status in ("ok", "warning") and str(server.binary) in binary.detail
    if server.binary == find_ollama_binary() and OLLAMA_VERSION in binary.detail:
        assert binary.status == "ok"
    assert rows["Ollama server"].status == "ok"
    assert server.host in rows["Ollama server"].detail and rows["Ollama server"].detail[0].isdigit()


@pytest.mark.e2e
@pytest.mark.parametrize("version", TESTED_OLLAMA_VERSIONS)
def test_doctor_names_the_servers_version_and_what_changed_since_the_floor(version, ollama_servers, tmp_path):
    server = ollama_servers.get(version)
    row = _rows(run_doctor(host=server.host, runs_dir=tmp_path))["Ollama behaviour"]
    assert row.status == "ok" and row.detail.startswith(f"v{version}: ")
    newer = version != OLLAMA_VERSION   # the floor predates every change listed; the current one has the first two
    assert ("render-only prompts: yes" in row.detail) == newer and ("thinking returned apart: yes" in row.detail) == newer
    assert "Jinja preferred over TEMPLATE: no (needs 0.30.0)" in row.detail


def test_four_bit_recipe_fails_on_a_cpu_machine(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    qlora, lora = _recipe(tmp_path, four_bit=True), _recipe(tmp_path, four_bit=False)
    checks = run_doctor(qlora, host=f"http://127.0.0.1:{free_port()}", runs_dir=tmp_path)
    rows = _rows(checks)
    assert rows["bitsandbytes 4-bit"].status == "missing" and rows["CUDA GPU"].status == "missing"
    assert doctor_exit_code(checks, qlora) != 0
    blocking = {c.name for c in blocking_checks(checks, qlora)}
    assert {"bitsandbytes 4-bit", "CUDA GPU"} <= blocking
    # The same machine without 4-bit: the GPU rows are warnings and block nothing.
    checks = run_doctor(lora, host=f"http://127.0.0.1:{free_port()}", runs_dir=tmp_path)
    rows = _rows(checks)
    assert rows["bitsandbytes 4-bit"].status == "warning" and rows["Unsloth"].status != "missing"
    assert not {"bitsandbytes 4-bit", "CUDA GPU", "Unsloth"} & {c.name for c in blocking_checks(checks, lora)}
    # A recipe brings its memory and disk estimate into the resource rows.
    assert "training needs" in rows["RAM"].detail and "the build writes" in rows["disk"].detail


def test_missing_tensorboard_blocks_only_a_recipe_that_logs_to_it(tmp_path: Path, monkeypatch) -> None:
    import importlib.metadata

    from ollama_ft import doctor

    real = importlib.metadata.version

    def version(name):
        if name == "tensorboard":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    row = _rows(doctor._package_checks())["tensorboard"]
    assert row.status == "missing" and row.fix == "pip install -c constraints.txt tensorboard"
    plain = _recipe(tmp_path, four_bit=False)
    logging = parse_recipe(RECIPE.format(four_bit="false", method="lora").replace(
        "[ollama]", "report_to = \"tensorboard\"\n[ollama]"), tmp_path / "r.toml", check_files=False)
    assert doctor_exit_code([row], plain) == 0
    assert doctor_exit_code([row], logging) == 1


def test_missing_llama_tools_block_only_a_recipe_that_needs_them(tmp_path: Path, monkeypatch) -> None:
    from ollama_ft import doctor

    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "empty-cache"))
    row = _rows(doctor._llama_cpp_checks())["llama.cpp tools"]
    assert row.status == "missing" and "llama-imatrix, llama-quantize, llama-perplexity not built" in row.detail
    assert "ollama-ft install-llama-tools" in row.fix
    plain = _recipe(tmp_path, four_bit=False)
    matrix = parse_recipe(RECIPE.format(four_bit="false", method="lora").replace(
        "[ollama]", "[export]\nimatrix = \"auto\"\n[ollama]"), tmp_path / "r.toml", check_files=False)
    assert doctor_exit_code([row], plain) == 0
    assert doctor_exit_code([row], matrix) == 1
