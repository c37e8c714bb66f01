"""The Ollama server: find or build the pinned binary, start a private server, talk to one.

Ollama is in no Python or Debian registry, so the pinned release is built from its Go module:

    python -m ollama_ft.ollama_server install      # prints the binary's path

v0.11.4 is the last release whose Go module builds with plain cgo on CPU. A plain cgo build
compiles ggml's CPU kernels for baseline x86-64 (no AVX2/FMA), which generates about 12× slower
than llama.cpp on the same GGUF (benchmarks/serving.py, B7), so the build targets the x86-64
micro-architecture level this CPU supports (v3: AVX2+FMA+F16C, v4: AVX-512). It also turns on
ggml's weight repacking (GGML_USE_CPU_AARCH64, x86 too despite the name: Q4_0/Q4_K weights laid
out for AVX2 matrix kernels), which llama.cpp's own CMake build enables by default and the cgo
build leaves out; at the 1B shape it moved B7 from 0.83-0.89 to 0.91-0.96 in four paired runs.
The binary is cached under $OLLAMA_FT_CACHE (default ~/.cache/ollama-ft), one per level, and never
rebuilt while it reports the pinned version. An `ollama` on PATH is used instead when present.
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

from ollama_ft.errors import MissingDependencyError, OllamaError

OLLAMA_VERSION = "0.11.4"
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


def pinned_binary(level: str | None = None) -> Path:
    return cache_dir() / f"ollama-{OLLAMA_VERSION}-{level or cpu_level()}-repack" / "bin" / "ollama"


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


def find_ollama_binary() -> Path | None:
    """An `ollama` on PATH, else the cached pinned build, else None."""
    on_path = shutil.which("ollama")
    if on_path:
        return Path(on_path)
    binary = pinned_binary()
    return binary if binary.is_file() else None


def install_ollama(log: Callable[[str], None] = lambda line: None) -> Path:
    """Build the pinned Ollama with `go install` (minutes on 2 cores) unless the cache has it."""
    binary = pinned_binary()
    if binary.is_file() and binary_version(binary) == OLLAMA_VERSION:
        return binary
    go = shutil.which("go")
    if go is None:
        raise MissingDependencyError("building Ollama needs the Go toolchain (go 1.24+)",
                                     "install Go, or put an existing `ollama` on PATH")
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOBIN=str(binary.parent), CGO_ENABLED="1", GOFLAGS="-mod=mod",
               CGO_CPPFLAGS="-DGGML_USE_CPU_AARCH64")  # ggml's weight repacking; see the module docstring
    level = cpu_level()
    if level != "generic":
        # ggml picks its SIMD kernels from the compiler's target macros (__AVX2__, __FMA__, …).
        env["CGO_CFLAGS"] = env["CGO_CXXFLAGS"] = f"-O3 -march={level}"
    command = [go, "install", "-ldflags", f"-X {OLLAMA_MODULE}/version.Version={OLLAMA_VERSION}",
               f"{OLLAMA_MODULE}@v{OLLAMA_VERSION}"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log(line.rstrip())
    if proc.wait() != 0 or not binary.is_file():
        raise OllamaError(f"building Ollama {OLLAMA_VERSION} failed (go install exit {proc.returncode})",
                          "see the output above; a C compiler (gcc) is needed for cgo")
    return binary


def server_version(host: str, timeout: float = 3.0) -> str | None:
    try:
        with urllib.request.urlopen(f"{host}/api/version", timeout=timeout) as resp:
            import json

            return json.loads(resp.read())["version"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


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

    def __enter__(self) -> "OllamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        print(install_ollama(lambda line: print(line, file=sys.stderr)))
    else:
        sys.exit("usage: python -m ollama_ft.ollama_server install")
