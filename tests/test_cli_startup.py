"""The CLI starts instantly: importing it must not import torch or transformers."""

import json
import subprocess
import sys
import time

from ollama_ft import __version__


def test_cli_import_does_not_import_torch():
    code = "import sys, ollama_ft.cli; print(sorted(m for m in ('torch', 'transformers', 'unsloth', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_and_version_work_and_are_quick():
    start = time.perf_counter()
    help_out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert help_out.returncode == 0
    for command in ("build", "compare", "eval"):
        assert command in help_out.stdout
    version = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"ollama-ft, version {__version__}"
    # Generous bound for a loaded 2-core CI machine; the benchmark measures the real figure.
    assert elapsed < 5, elapsed


def test_library_error_is_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbase = 'tiny:llama'\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert "data: required, but missing" in out.stderr and "ollama: required, but missing" in out.stderr
    assert "Traceback" not in out.stderr


# peft imports torchao, and importing torchao makes torch print two deprecation warnings that a
# user cannot act on; the CLI's commands keep them out of the terminal. Importing torchao takes
# seconds (peft twice that), so this runs as the module's early process (tests/conftest.py),
# beside the other tests; logging's `warning` is wrapped to see what torch tried to print.
TORCHAO_NOISE = """\
import json, logging
from click.testing import CliRunner
from ollama_ft.cli import main
assert CliRunner().invoke(main, ['doctor', '--help']).exit_code == 0
tried, warning = [], logging.Logger.warning
def counting(self, msg, *args, **kwargs):
    tried.append(str(msg))
    return warning(self, msg, *args, **kwargs)
logging.Logger.warning = counting
try:
    import torchao
except ImportError:   # installed with Unsloth; without it there is nothing to hide
    pass
print(json.dumps(tried))
"""


def early_process(folder):
    return {"args": [sys.executable, "-c", TORCHAO_NOISE], "cwd": folder}


def test_commands_hide_torchs_deprecation_noise_about_torchao(early_result):
    import pytest

    assert early_result.returncode == 0, early_result.stderr
    if not any("register_constant" in message for message in json.loads(early_result.stdout.splitlines()[-1])):
        pytest.skip("this torch/torchao pair prints no such warning")
    assert "register_constant" not in early_result.stderr
