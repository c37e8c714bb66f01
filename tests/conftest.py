"""Shared fixtures: real Ollama servers on free loopback ports, the tiny base, and one full
build of the demo recipe that several end-to-end tests inspect.

End-to-end tests never mock Ollama's HTTP API: they talk to `ollama serve` built from Ollama's Go
module (see ollama_ft/ollama_server.py), with its models in a temporary folder. `ollama_server` is
the 0.11.4 floor; in modules marked `every_ollama` each test that uses it runs once per tested
release (ids `ollama-0.11.4`, `ollama-0.24.0`). The demo is trained and exported once, on the
floor; `demo_build` on another server is that same GGUF registered and evaluated there.

A unit test module whose check needs tens of seconds in a fresh process defines `early_process`:
that process starts when collection ends and runs beside the other tests (`early_result`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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


@pytest.fixture(autouse=True)
def _unit_tests_on_one_torch_thread(request):
    """Unit tests compute on one torch thread too: on two cores shared with other work, two threads
    wait on each other, and the unit run took 1.5-2x the wall time and CPU. End-to-end tests keep
    torch's default (their training runs in its own process anyway)."""
    torch = sys.modules.get("torch")   # imported while collecting; a unit run without torch needs nothing
    if torch is None or request.node.get_closest_marker("e2e"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class EarlyProcess:
    """A check's own process, started before the tests that read it. Its output goes to files: a
    pipe read only at the end could fill and stop it."""

    def __init__(self, early_process):
        self.folder = Path(tempfile.mkdtemp(prefix="ollama-ft-early-"))
        self.out, self.err = (open(self.folder / name, "w+", encoding="utf-8") for name in ("stdout", "stderr"))
        popen = early_process(self.folder)   # keyword arguments for subprocess.Popen
        self.process = subprocess.Popen(**popen, stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout: float = 900) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.out.seek(0)
        self.err.seek(0)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.out.read(), self.err.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.folder, ignore_errors=True)


EARLY_PROCESSES = pytest.StashKey[dict]()


def pytest_collection_finish(session):
    """Start the early process of each module with a selected test, so it runs beside the others."""
    if session.config.option.collectonly:
        return
    started = session.config.stash.setdefault(EARLY_PROCESSES, {})
    for module in {item.module for item in session.items if isinstance(item, pytest.Function)}:
        if getattr(module, "early_process", None) and module.__name__ not in started:
            started[module.__name__] = EarlyProcess(module.early_process)


def pytest_sessionfinish(session):
    for early in session.config.stash.get(EARLY_PROCESSES, {}).values():
        early.stop()


@pytest.fixture(scope="module")
def early_result(request) -> subprocess.CompletedProcess:
    """What this module's early process printed and returned, once it has finished."""
    started = request.config.stash.setdefault(EARLY_PROCESSES, {})
    if request.module.__name__ not in started:   # not selected when collection ended
        started[request.module.__name__] = EarlyProcess(request.module.early_process)
    return started[request.module.__name__].result()


def pytest_configure(config):
    config.addinivalue_line("markers", "every_ollama: run each test that uses ollama_server once per tested "
                            "Ollama release (ollama_ft.ollama_server.TESTED_OLLAMA_VERSIONS)")


# Fixtures that start a real Ollama server or run the real converter and quantizer.
SLOW_FIXTURES = {"ollama_server", "ollama_servers", "demo_build", "demo_full_build", "tiny_gguf", "llama_tools"}


def pytest_collection_modifyitems(config, items):
    """Every test that needs a real server or a real export is e2e, marked or not, so
    `pytest -m "not e2e"` is the fast unit run."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


def pytest_generate_tests(metafunc):
    """In modules marked every_ollama, a test that uses the server (itself or through demo_build)
    runs against the 0.11.4 floor and against the current release: ids ollama-0.11.4, ollama-0.24.0."""
    if "ollama_server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("every_ollama"):
        from ollama_ft.ollama_server import TESTED_OLLAMA_VERSIONS

        metafunc.parametrize("ollama_server", TESTED_OLLAMA_VERSIONS, indirect=True, scope="session",
                             ids=[f"ollama-{v}" for v in TESTED_OLLAMA_VERSIONS])


def ollama_binary_for(version: str) -> Path:
    from ollama_ft.ollama_server import OLLAMA_VERSION, find_ollama_binary, install_ollama

    # .ci/run installs both first; building here is the fallback for a direct `pytest` run.
    # The floor may be an `ollama` on PATH, as for a user; the current release is always the cached build.
    found = find_ollama_binary() if version == OLLAMA_VERSION else find_ollama_binary(version)
    return found or install_ollama(lambda line: print(line, file=sys.stderr), version=version)


class ServerHandle:
    def __init__(self, server, version: str):
        self.server = server
        self.version = version
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


class OllamaServers:
    """One private `ollama serve` per tested release, each with its own models folder, started
    when a test first needs it and stopped at the end of the session."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: dict[str, ServerHandle] = {}

    def get(self, version: str) -> ServerHandle:
        from ollama_ft.ollama_server import OllamaServer

        if version not in self.started:
            folder = self.folder / f"ollama-{version}"
            server = OllamaServer(folder / "models", binary=ollama_binary_for(version),
                                  log_path=folder / "serve.log", debug_level=2)
            self.started[version] = ServerHandle(server.start(), version)
        return self.started[version]

    def stop(self) -> None:
        for handle in self.started.values():
            handle.server.stop()


@pytest.fixture(scope="session")
def ollama_servers(tmp_path_factory):
    from ollama_ft.ollama_server import OLLAMA_VERSION

    servers = OllamaServers(tmp_path_factory.mktemp("ollama"))
    floor = servers.get(OLLAMA_VERSION)
    # As for a user whose shell sets the server's OLLAMA_MODELS: builds copy blobs into its store
    # (ollama_ft/register.py) instead of uploading them, in this process and in the CLI's.
    # Tests on another server point it at that server's store (_models_of_the_tests_server).
    previous = os.environ.get("OLLAMA_MODELS")
    os.environ["OLLAMA_MODELS"] = str(floor.models_dir)
    try:
        yield servers
    finally:
        servers.stop()
        if previous is None:
            os.environ.pop("OLLAMA_MODELS", None)
        else:
            os.environ["OLLAMA_MODELS"] = previous


@pytest.fixture(scope="session")
def ollama_server(request, ollama_servers) -> ServerHandle:
    """The 0.11.4 floor, or in every_ollama modules each tested release in turn."""
    from ollama_ft.ollama_server import OLLAMA_VERSION

    return ollama_servers.get(getattr(request, "param", OLLAMA_VERSION))


@pytest.fixture(autouse=True)
def _models_of_the_tests_server(request, monkeypatch):
    if "ollama_server" in request.fixturenames:
        monkeypatch.setenv("OLLAMA_MODELS", str(request.getfixturevalue("ollama_server").models_dir))


@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """llama.cpp's imatrix, quantize and perplexity tools (.ci/run builds them first; this is the
    fallback for a direct `pytest` run)."""
    from ollama_ft.llama_tools import install_tools

    return install_tools(lambda line: print(line, file=sys.stderr))


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_base(runs_root) -> Path:
    from ollama_ft.tiny import ensure_tiny_base

    return ensure_tiny_base("tiny:llama", runs_root / "_bases")


def build_demo(runs_root: Path, server: ServerHandle) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "ollama_ft.cli", "build", str(DEMO_RECIPE), "--runs-dir", str(runs_root),
         "--host", server.host, "--json"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, env=dict(os.environ, OLLAMA_MODELS=str(server.models_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def demo_full_build(ollama_servers, runs_root):
    """`ollama-ft build recipes/tiny-demo.toml` once, through the CLI, as a user runs it, on the floor."""
    from ollama_ft.ollama_server import OLLAMA_VERSION

    return build_demo(runs_root, ollama_servers.get(OLLAMA_VERSION))


@pytest.fixture(scope="session")
def demo_build(ollama_server, demo_full_build, runs_root, tmp_path_factory):
    """The demo build as the test's server has it. On a newer release the floor's run folder is
    copied and built again there: training and export are up to date, so only register, smoke,
    baseline and eval run, with the same GGUF and Modelfile, as when a user points --host elsewhere."""
    if ollama_server.host == demo_full_build["host"]:
        return {**demo_full_build, "runs_root": str(runs_root)}
    copy = tmp_path_factory.mktemp(f"runs-{ollama_server.version}")
    run_dir = Path(demo_full_build["run_dir"]).relative_to(runs_root)
    shutil.copytree(runs_root / "_bases", copy / "_bases", symlinks=True)
    shutil.copytree(runs_root / run_dir, copy / run_dir, symlinks=True)
    return {**build_demo(copy, ollama_server), "runs_root": str(copy)}


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def write_tiny_recipe(folder: Path, name: str, *, examples: int = 16, model: dict | None = None,
                      train: dict | None = None, ollama: dict | None = None) -> Path:
    """folder/NAME.toml, a recipe that builds in seconds: the tiny base fully trained for two steps
    on the first `examples` demo chats (copied to folder/train.jsonl). The keys given in `model`,
    `train` and `ollama` are added to those tables or replace their defaults."""
    data = folder / "train.jsonl"
    demo = (ROOT / "data" / "turkish-demo.jsonl").read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(demo[:examples]) + "\n", encoding="utf-8")
    tables = {"model": {"base": "tiny:llama", "max_seq_length": 128, "dtype": "float32", **(model or {})},
              "data": {"train": str(data)},
              "train": {"method": "full", "max_steps": 2, "batch_size": 8, "gradient_checkpointing": False,
                        **(train or {})},
              "ollama": {"name": name, **(ollama or {})}}
    # JSON's strings, numbers and booleans are written the same way in TOML.
    recipe = folder / f"{name}.toml"
    recipe.write_text("".join(f"[{table}]\n" + "".join(f"{key} = {json.dumps(value, ensure_ascii=False)}\n"
                                                       for key, value in values.items())
                              for table, values in tables.items()), encoding="utf-8")
    return recipe


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
