"""The wheel as a user installs it: `pip wheel .`, installed into a fresh virtual environment
outside the checkout, then `--help`, `init`, a tiny `build` and `eval` run from a folder outside
the checkout against the real Ollama server.

To keep CI fast the fresh environment sees the test environment's site-packages (torch and the
rest) through a .pth file, and the wheel goes in with --no-deps; ollama_ft itself can only come
from the wheel (asserted). 188 s on a shared 2-core machine (wheel and venv 15 s, build 101 s, eval of
the 104 cases 47 s); the timings are printed at the end of the module (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


class Installed:
    def __init__(self, work: Path, site: Path):
        self.site = site  # the fresh environment's site-packages, where the wheel went
        self.bin = work / "venv" / "bin"
        self.user = work / "user"  # the folder a user runs ollama-ft from
        self.user.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.timings: dict[str, float] = {}

    def run(self, step: str, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        out = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.user, capture_output=True, text=True,
                             timeout=timeout, env={**self.env, **env})
        self.timings[step] = round(time.perf_counter() - start, 1)
        assert out.returncode == 0, f"{step}: {out.stderr[-3000:]}"
        return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    start = time.perf_counter()
    # Build from a copy, so the checkout gets no build/ or egg-info; these are all the build reads.
    src = work / "src"
    for name in ("ollama_ft", "modelfiles", "evals", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (work / "dist").glob("ollama_ft-*.whl")

    venv.create(work / "venv", with_pip=False)
    python = work / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Appended after the fresh site-packages: the heavy dependencies, but not the checkout's
    # editable ollama_ft (a .pth line adds a folder; the .pth files inside it are not run).
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    handle = Installed(work, site)
    handle.timings["wheel + venv"] = round(time.perf_counter() - start, 1)
    yield handle
    print(f"\nwheel test timings (s): {handle.timings}")


def test_the_wheel_holds_the_data_and_the_package_comes_from_it(installed):
    code = ("import ollama_ft, sys; from ollama_ft.chat_templates import load_family; "
            "from ollama_ft.resources import bundled; "
            "print(ollama_ft.__file__); print(load_family('chatml').stop); print(bundled('evals', 'turkish-core.toml'))")
    out = installed.run("import", "python", "-c", code).stdout.splitlines()
    package = installed.site / "ollama_ft"
    assert out == [str(package / "__init__.py"), "('<|im_start|>', '<|im_end|>')",
                   str(package / "resources" / "evals" / "turkish-core.toml")]
    for folder, pattern in (("modelfiles", "*.toml"), ("evals", "*.toml"), ("data", "*.jsonl")):
        shipped = sorted(p.name for p in (package / "resources" / folder).glob(pattern))
        assert shipped == sorted(p.name for p in (ROOT / folder).glob(pattern)), folder


def test_help_init_build_and_eval_from_the_installed_wheel(installed, ollama_server, tiny_base, runs_root):
    assert "build" in installed.run("--help", "ollama-ft", "--help").stdout

    name = f"wheel-{uuid.uuid4().hex[:8]}"
    installed.run("init", "ollama-ft", "init", "recipe.toml", "--name", name)
    recipe = installed.user / "recipe.toml"
    text = recipe.read_text(encoding="utf-8")
    data = re.search(r'^train = "(.+?)"', text, re.M).group(1)
    # The default recipe trains on the demo chats the wheel carries.
    assert (installed.user / data).resolve() == installed.site / "ollama_ft" / "resources" / "data" / "turkish-demo.jsonl"
    assert re.search(r'^base = "tiny:llama"', text, re.M)
    assert "\n# max_steps = 100 " in text
    recipe.write_text(text.replace("\n# max_steps = 100 ", "\nmax_steps = 3      "), encoding="utf-8")

    # The tiny base is the session's (same shape, seed and corpus bytes), so only training runs.
    built = installed.run("build", "ollama-ft", "build", "recipe.toml", "--no-eval", "--json",
                          "--runs-dir", str(runs_root), "--host", ollama_server.host)
    result = json.loads(built.stdout)
    assert result["model"].split(":")[0] == name
    assert result["metrics"]["train"]["steps"] == 3  # the recipe as edited here
    assert ollama_server.show(name)["template"]  # registered, with the chat template from the wheel

    out = installed.user / "eval"
    report = json.loads(installed.run("eval", "ollama-ft", "eval", name, "--json", "--out", str(out),
                                      OLLAMA_HOST=ollama_server.host).stdout)
    assert report["suite"] == "turkish-core" and report["model"].split(":")[0] == name
    assert len(report["cases"]) == 104  # the bundled suite, whole
    assert (out / "eval-report.json").is_file()
