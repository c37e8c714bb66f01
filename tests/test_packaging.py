"""What pyproject.toml ships: every package of ollama_ft, and the data folders read at run time
(modelfiles/, evals/, data/) as ollama_ft.resources.*, found the same way from an editable
install and from a checkout on sys.path. tests/test_wheel.py installs the built wheel itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from ollama_ft.resources import bundled

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_package_under_ollama_ft_is_listed():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ollama_ft").rglob("__init__.py")}
    listed = set(SETUPTOOLS["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    mapped = {name: ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()}
    assert listed - on_disk == set(mapped)
    for name, folder in mapped.items():
        assert (folder / "__init__.py").is_file(), f"{folder} needs an __init__.py to be the package {name}"


def test_the_product_never_imports_the_benchmarks():
    # benchmarks/ is not in the wheel: its code (the profiler, say) reaches the trainer only
    # through OLLAMA_FT_TRAINER_CALLBACKS, in a checkout.
    importing = [str(p.relative_to(ROOT)) for p in (ROOT / "ollama_ft").rglob("*.py")
                 if re.search(r"^\s*(from|import) benchmarks\b", p.read_text(encoding="utf-8"), re.MULTILINE)]
    assert importing == []


def test_each_data_folder_ships_the_files_it_holds():
    globs = SETUPTOOLS["package-data"]
    for name, folder in SETUPTOOLS["package-dir"].items():
        kept = {p for pattern in globs[name] for p in (ROOT / folder).glob(pattern)}
        left_out = {p.name for p in (ROOT / folder).iterdir()} - {p.name for p in kept} - {"__init__.py", "README.md"}
        assert left_out == set(), f"{folder}: not shipped in the wheel: {sorted(left_out)}"
        assert kept, folder


def test_bundled_reads_the_checkouts_files():
    assert bundled("modelfiles", "chatml.toml") == ROOT / "modelfiles" / "chatml.toml"
    assert bundled("evals", "turkish-core.toml").read_bytes() == (ROOT / "evals" / "turkish-core.toml").read_bytes()
    assert bundled("data", "turkish-demo.jsonl").is_file()


def test_a_checkout_on_sys_path_without_installing():
    # As the GPU machine runs it (PYTHONPATH=$PWD): -S keeps site-packages, and so any install, out.
    code = ("from ollama_ft.chat_templates import load_family; from ollama_ft.tiny import DEFAULT_CORPUS; "
            "print(load_family('chatml').stop, DEFAULT_CORPUS)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"('<|im_start|>', '<|im_end|>') {ROOT / 'data' / 'turkish-demo.jsonl'}"
