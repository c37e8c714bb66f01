"""Shared fixtures: a real Ollama server on a free loopback port, the tiny base, and one full
build of the demo recipe that several end-to-end tests inspect.

End-to-end tests never mock Ollama's HTTP API: they talk to `ollama serve` built from the pinned
Go module (see ollama_ft/ollama_server.py), with its models in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO_RECIPE = ROOT / "recipes" / "tiny-demo.toml"


@pytest.fixture
def one_torch_thread():
    """Numerical tests on one thread: the machines running the suite are small and shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ollama_binary() -> Path:
    from ollama_ft.ollama_server import find_ollama_binary, install_ollama

    # .ci/run installs it first; building here is the fallback for a direct `pytest` run.
    return find_ollama_binary() or install_ollama(lambda line: print(line, file=sys.stderr))


class ServerHandle:
    def __init__(self, server):
        self.server = server
        self.host = server.host
        self.log_path = server.log_path
        self.binary = server.binary
        self.models_dir = server.models_dir

    @property
    def client(self):
        from ollama_ft.ollama_server import client_for

        return client_for(self.host)

    def show(self, name: str) -> dict:
        """Raw /api/show JSON (the official client's ShowResponse drops `system`)."""
        import httpx

        resp = httpx.post(f"{self.host}/api/show", json={"model": name}, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def manifest_layers(self, name: str, tag: str = "latest") -> list[str]:
        """The layer kinds Ollama stored for a model (model, template, system, params, adapter…)."""
        path = self.server.models_dir / "manifests" / "registry.ollama.ai" / "library" / name / tag
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return [layer["mediaType"].rsplit(".", 1)[-1] for layer in manifest["layers"]]

    def prompts_logged(self) -> list[str]:
        """Every prompt the server sent to its runner (OLLAMA_DEBUG=2 logs them at TRACE level)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        found = re.findall(r'msg="completion request" prompt=("(?:[^"\\]|\\.)*")', text)
        return [json.loads(re.sub(r"\\x([0-9a-fA-F]{2})", r"\\u00\1", q)) for q in found]

    def run_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ollama ARGS` against this server, with stdin a terminal as when a person types it
        (with a pipe on stdin, `ollama run` prepends the piped text and a space to the prompt)."""
        import pty

        primary, secondary = pty.openpty()
        try:
            env = dict(os.environ, OLLAMA_HOST=self.host.removeprefix("http://"), TERM="dumb", NO_COLOR="1")
            return subprocess.run([str(self.binary), *args], stdin=secondary, capture_output=True, text=True,
                                  env=env, timeout=timeout)
        finally:
            os.close(primary)
            os.close(secondary)


@pytest.fixture(scope="session")
def ollama_server(ollama_binary, tmp_path_factory):
    from ollama_ft.ollama_server import OllamaServer

    folder = tmp_path_factory.mktemp("ollama")
    server = OllamaServer(folder / "models", binary=ollama_binary, log_path=folder / "serve.log", debug_level=2)
    server.start()
    # As for a user whose shell sets the server's OLLAMA_MODELS: builds copy blobs into its store
    # (ollama_ft/register.py) instead of uploading them, in this process and in the CLI's.
    previous = os.environ.get("OLLAMA_MODELS")
    os.environ["OLLAMA_MODELS"] = str(server.models_dir)
    try:
        yield ServerHandle(server)
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("OLLAMA_MODELS", None)
        else:
            os.environ["OLLAMA_MODELS"] = previous


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_base(runs_root) -> Path:
    from ollama_ft.tiny import ensure_tiny_base

    return ensure_tiny_base("tiny:llama", runs_root / "_bases")


@pytest.fixture(scope="session")
def demo_build(ollama_server, runs_root):
    """`ollama-ft build recipes/tiny-demo.toml` once, through the CLI, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "ollama_ft.cli", "build", str(DEMO_RECIPE), "--runs-dir", str(runs_root),
         "--host", ollama_server.host, "--json"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def training_pairs(path: Path | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, trained answer) for each single-answer example of the demo data."""
    path = path or ROOT / "data" / "turkish-demo.jsonl"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"]:
            pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs


def have(program: str) -> bool:
    return shutil.which(program) is not None
