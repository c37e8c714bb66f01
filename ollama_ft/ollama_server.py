"""The Ollama server: find or build the tested binaries, start a private server, talk to one.

Ollama is in no Python or Debian registry, so the tested releases are built from its Go module:

    python -m ollama_ft.ollama_server install                   # the 0.11.4 floor; prints its path
    python -m ollama_ft.ollama_server install --version 0.24.0  # the current release
    python -m ollama_ft.ollama_server install --all             # both (scripts/setup.sh)

v0.11.4 (the floor) is the last release whose Go module builds as it is with plain cgo on CPU.
v0.24.0 (CURRENT_OLLAMA_VERSION) is the newest that builds here: from 0.11.5 the module zips drop
llama.cpp's vendored headers (Go leaves nested vendor/ folders out), and the same `go install`
works once they are on the include path: nlohmann/json (Debian nlohmann-json3-dev), stb_image
(Debian libstb-dev) and miniaudio.h (the PyPI sdist miniaudio==1.71); it took 4-5 minutes on
2 cores. 0.25 never left its release candidate; from 0.30 GGUFs run on a `llama-server` that
Ollama builds with CMake from llama.cpp b10488 plus its own patch, and no registry package carries
that llama.cpp (the copy in llama-cpp-python 0.3.36 rejects one hunk of the patch).

A plain cgo build compiles ggml's CPU kernels for baseline x86-64 (no AVX2/FMA), which generates
about 12× slower than llama.cpp on the same GGUF (benchmarks/serving.py, B7), so the build targets
the x86-64 micro-architecture level this CPU supports (v3: AVX2+FMA+F16C, v4: AVX-512). It also
turns on ggml's weight repacking (GGML_USE_CPU_AARCH64, named GGML_USE_CPU_REPACK in 0.24's ggml;
x86 too despite the name: Q4_0/Q4_K weights laid out for AVX2 matrix kernels), which llama.cpp's
own CMake build enables by default and the cgo build leaves out; at the 1B shape it moved B7 from
0.83-0.89 to 0.91-0.96 in four paired runs. Each binary is cached under $OLLAMA_FT_CACHE (default
~/.cache/ollama-ft), one per version and level, and never rebuilt while it reports its version.
An `ollama` on PATH is used instead of the floor when present.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from ollama_ft.errors import MissingDependencyError, OllamaError, OllamaFtError

OLLAMA_VERSION = "0.11.4"            # the floor: what `ollama-ft` starts and tests by default
CURRENT_OLLAMA_VERSION = "0.24.0"    # the newest release that builds here; see the module docstring
TESTED_OLLAMA_VERSIONS = (OLLAMA_VERSION, CURRENT_OLLAMA_VERSION)
OLLAMA_MODULE = "github.com/ollama/ollama"
DEFAULT_HOST = "http://127.0.0.1:11434"
T = TypeVar("T")


def cache_dir() -> Path:
    return Path(os.environ.get("OLLAMA_FT_CACHE", Path.home() / ".cache" / "ollama-ft"))


X86_64_V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def cpu_level(cpuinfo: str | None = None) -> str:
    """The newest x86-64 level (gcc's -march name) this CPU runs, or "generic" elsewhere."""
    if cpuinfo is None:
        if platform.machine() not in ("x86_64", "AMD64"):
            return "generic"
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "generic"
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    if X86_64_V4 <= flags:
        return "x86-64-v4"
    if X86_64_V3 <= flags:
        return "x86-64-v3"
    return "generic"


def pinned_binary(level: str | None = None, version: str = OLLAMA_VERSION) -> Path:
    return cache_dir() / f"ollama-{version}-{level or cpu_level()}-repack" / "bin" / "ollama"


def normalise_host(host: str | None) -> str:
    host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    if "://" not in host:
        host = "http://" + host
    scheme, rest = host.split("://", 1)
    if ":" not in rest.split("/")[0]:
        rest = rest.rstrip("/") + ":11434"
    return f"{scheme}://{rest.rstrip('/')}"


def binary_version(binary: Path | str) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "version is" in line:
            return line.rsplit(" ", 1)[-1].strip()
    return None


def find_ollama_binary(version: str | None = None) -> Path | None:
    """An `ollama` on PATH, else the cached pinned build, else None; with `version`, only that
    release's cached build (the tests run each tested version, whatever is on PATH)."""
    if version is None:
        on_path = shutil.which("ollama")
        if on_path:
            return Path(on_path)
    binary = pinned_binary(version=version or OLLAMA_VERSION)
    return binary if binary.is_file() else None


MISSING_HEADERS = {  # what the module zips after 0.11.4 lack -> the Debian package that has it
    "/usr/include/nlohmann/json.hpp": "nlohmann-json3-dev",
    "/usr/include/stb/stb_image.h": "libstb-dev",
}
MINIAUDIO_SDIST = "miniaudio==1.71"  # PyPI's pyminiaudio sdist carries miniaudio.h 0.11.25 (Ollama vendors 0.11.24)


def miniaudio_include_dir(log: Callable[[str], None] = lambda line: None) -> Path:
    """A folder holding miniaudio/miniaudio.h, taken from the miniaudio sdist on PyPI (cached)."""
    import tarfile
    import tempfile

    folder = cache_dir() / "ollama-headers"
    header = folder / "miniaudio" / "miniaudio.h"
    if header.is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching miniaudio.h from the {MINIAUDIO_SDIST} sdist")
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              "-d", tmp, MINIAUDIO_SDIST], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("miniaudio-*.tar.gz"))
        if got.returncode != 0 or not sdists:
            raise MissingDependencyError(f"could not download the {MINIAUDIO_SDIST} sdist for miniaudio.h",
                                         (got.stderr.strip().splitlines() or ["pip gave no output"])[-1])
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/miniaudio/miniaudio.h")), None)
            if member is None:
                raise MissingDependencyError(f"{sdists[0].name} has no miniaudio/miniaudio.h")
            data = tar.extractfile(member).read()
    header.parent.mkdir(parents=True, exist_ok=True)
    partial = header.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(header)
    return folder


def build_environment(version: str, level: str, gobin: Path, miniaudio_dir: Path | None) -> dict[str, str]:
    """The environment `go install` builds Ollama `version` with, for the CPU's x86-64 `level`."""
    # ggml's weight repacking (see the module docstring); ggml renamed the macro in 2025, and the
    # unused name is harmless, so both releases get both.
    cppflags = ["-DGGML_USE_CPU_AARCH64", "-DGGML_USE_CPU_REPACK"]
    if miniaudio_dir is not None:   # releases after the floor: headers their module zip lacks
        cppflags += [f"-I{miniaudio_dir}", "-I/usr/include/stb"]
    env = dict(os.environ, GOBIN=str(gobin), CGO_ENABLED="1", GOFLAGS="-mod=mod", CGO_CPPFLAGS=" ".join(cppflags))
    if level != "generic":
        # ggml picks its SIMD kernels from the compiler's target macros (__AVX2__, __FMA__, …).
        env["CGO_CFLAGS"] = f"-O3 -march={level}"
        env["CGO_CXXFLAGS"] = " ".join([f"-O3 -march={level}", *cppflags[2:]])
    elif miniaudio_dir is not None:
        env["CGO_CXXFLAGS"] = " ".join(cppflags[2:])
    return env


def install_ollama(log: Callable[[str], None] = lambda line: None, version: str = OLLAMA_VERSION) -> Path:
    """Build Ollama `version` with `go install` (minutes on 2 cores) unless the cache has it."""
    binary = pinned_binary(version=version)
    if binary.is_file() and binary_version(binary) == version:
        return binary
    go = shutil.which("go")
    if go is None:
        raise MissingDependencyError("building Ollama needs the Go toolchain (go 1.24+; 1.26+ for v0.2x)",
                                     "install Go, or put an existing `ollama` on PATH")
    binary.parent.mkdir(parents=True, exist_ok=True)
    if version != OLLAMA_VERSION:
        missing = sorted({package for path, package in MISSING_HEADERS.items() if not Path(path).is_file()})
        if missing:
            raise MissingDependencyError(f"building Ollama {version} needs headers its Go module lacks",
                                         f"apt-get install -y {' '.join(missing)}")
    env = build_environment(version, cpu_level(), binary.parent,
                            miniaudio_include_dir(log) if version != OLLAMA_VERSION else None)
    command = [go, "install", "-ldflags", f"-X {OLLAMA_MODULE}/version.Version={version}",
               f"{OLLAMA_MODULE}@v{version}"]
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log(line.rstrip())
    if proc.wait() != 0 or not binary.is_file():
        raise OllamaError(f"building Ollama {version} failed (go install exit {proc.returncode})",
                          "see the output above; a C compiler (gcc) is needed for cgo")
    log(f"built Ollama {version} in {time.monotonic() - started:.0f} s: {binary}")
    return binary


def server_version(host: str, timeout: float = 3.0) -> str | None:
    try:
        with urllib.request.urlopen(f"{host}/api/version", timeout=timeout) as resp:
            import json

            return json.loads(resp.read())["version"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


# Where a server that ollama-ft started writes its log, so a failure can be explained from it.
def _log_marker(host: str) -> Path:
    return cache_dir() / "servers" / (host.split("://", 1)[-1].replace(":", "-").replace("/", "_") + ".log-path")


# Lines of a runner's death in Ollama's log: a C++ exception, a Go panic, a fatal signal, a load error.
RUNNER_FAILURE_MARKERS = ("terminate called", "what():", "panic:", "SIGSEGV", "SIGABRT", "error loading model",
                          "llama_model_load: error", "GGML_ASSERT", "fatal error")


def started_server_log(host: str) -> Path | None:
    """The log of the server at `host` if ollama-ft started it (OllamaServer) and it still runs."""
    try:
        path = Path(_log_marker(host).read_text(encoding="utf-8").strip())
    except OSError:
        return None
    return path if path.is_file() else None


def runner_failure(host: str) -> str | None:
    """The last lines of the server's log that say why a runner died, if ollama-ft started that server."""
    log_path = started_server_log(host)
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-400:] if log_path else []
    except OSError:
        return None
    found = [line.strip() for line in lines if any(m in line for m in RUNNER_FAILURE_MARKERS)]
    return " / ".join(dict.fromkeys(found[-3:]))[-600:] or None


# Behaviour that changed after the 0.11.4 floor and touches ollama-ft, by the release that brought it.
BEHAVIOUR_SINCE = {
    "render_only": ("0.11.5", "/api/chat answers _debug_render_only with the rendered prompt"),
    "thinking_field": ("0.12.5", "thinking models think unless told not to; message.thinking holds it"),
    "jinja_preferred": ("0.30.0", "a GGUF chat template that does more than the TEMPLATE is rendered with Jinja"),
    "blob_rewrite": ("0.31.0", "imported GGUFs are rewritten, so the stored digest differs from the upload"),
}


def version_tuple(version: str) -> tuple[int, ...]:
    """"0.24.0" -> (0, 24, 0); a pre-release suffix is dropped; a build without a version is 0.0.0."""
    numbers = version.removeprefix("v").split("-", 1)[0].split(".")
    return tuple(int(n) if n.isdigit() else 0 for n in numbers[:3])


def server_features(version: str | None) -> dict[str, bool]:
    """Which of BEHAVIOUR_SINCE apply to a server of `version` (none when it is unknown)."""
    have = version_tuple(version) if version else (0,)
    return {name: have >= version_tuple(since) for name, (since, _) in BEHAVIOUR_SINCE.items()}


def logged_prompts(log_path: Path) -> list[str]:
    """Every prompt a server started with OLLAMA_DEBUG=2 sent to its runner (logged at TRACE level)."""
    import json
    import re

    text = log_path.read_text(encoding="utf-8", errors="replace")
    found = re.findall(r'msg="completion request" prompt=("(?:[^"\\]|\\.)*")', text)
    return [json.loads(re.sub(r"\\x([0-9a-fA-F]{2})", r"\\u00\1", q)) for q in found]


def client_for(host: str):
    import ollama

    return ollama.Client(host=host, timeout=600)


def ollama_call(host: str, fn: Callable[[], T]) -> T:
    """Run a client call; turn connection failures and server errors into one-line OllamaErrors."""
    import httpx
    import ollama

    try:
        return fn()
    except (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError) as exc:
        raise OllamaError(f"cannot reach the Ollama server at {host} ({type(exc).__name__})",
                          "start it with `ollama serve` (or `make ollama` to build the pinned one), "
                          "or set ollama.host / OLLAMA_HOST") from None
    except ollama.ResponseError as exc:
        raise OllamaError(f"Ollama at {host} answered {exc.status_code}: {exc.error}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OllamaServer:
    """A private `ollama serve` on a free loopback port with its own models folder.

    Used by the test-suite and `ollama-ft serve`; stopping it also ends its model runners.
    """

    def __init__(self, models_dir: Path, binary: Path | None = None, log_path: Path | None = None,
                 debug_level: int = 0):
        self.binary = binary or find_ollama_binary() or install_ollama()
        self.models_dir = Path(models_dir)
        self.log_path = log_path or (self.models_dir.parent / "ollama-serve.log")
        self.debug_level = debug_level
        self.port = free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "OllamaServer":
        self.models_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OLLAMA_HOST=f"127.0.0.1:{self.port}", OLLAMA_MODELS=str(self.models_dir),
                   OLLAMA_NOPRUNE="1", OLLAMA_KEEP_ALIVE="5m")
        if self.debug_level:
            env["OLLAMA_DEBUG"] = str(self.debug_level)
        self._log = open(self.log_path, "ab")
        # Own process group: stopping the server also stops the runners it spawned.
        self.proc = subprocess.Popen([str(self.binary), "serve"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OllamaError(f"ollama serve exited with code {self.proc.returncode}", f"log: {self.log_path}")
            if server_version(self.host, timeout=1):
                _log_marker(self.host).parent.mkdir(parents=True, exist_ok=True)
                _log_marker(self.host).write_text(str(self.log_path.resolve()), encoding="utf-8")
                return self
            time.sleep(0.2)
        self.stop()
        raise OllamaError(f"ollama serve did not answer on {self.host} within {timeout:.0f}s", f"log: {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        _log_marker(self.host).unlink(missing_ok=True)

    def __enter__(self) -> "OllamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """`install` (the floor), `install --version X`, `install --all` (every tested release)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ollama_ft.ollama_server")
    parser.add_argument("command", choices=["install"])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", default=OLLAMA_VERSION, help=f"release to build (default {OLLAMA_VERSION})")
    which.add_argument("--all", action="store_true", help=f"build {' and '.join(TESTED_OLLAMA_VERSIONS)}")
    args = parser.parse_args(argv)
    for version in TESTED_OLLAMA_VERSIONS if args.all else [args.version.removeprefix("v")]:
        try:
            print(install_ollama(lambda line: print(line, file=sys.stderr), version=version))
        except OllamaFtError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
