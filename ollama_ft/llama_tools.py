"""llama.cpp's command-line tools for quantizing by quality: find them, or build them once.

`llama-imatrix` (importance matrix), `llama-quantize` (quantizing with one) and `llama-perplexity`
(KL divergence against the F16 model) are in no registry package, but their source is: the
llama-cpp-python sdist vendors the llama.cpp it binds (`vendor/llama.cpp/tools/…`). So they are
built from the sdist of the llama-cpp-python that is installed, with CMake, for this CPU, and
cached like the Ollama server: the tools then read the GGUFs exactly as the binding does.

    ollama-ft install-llama-tools     # prints the folder; scripts/setup.sh runs it
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from ollama_ft.errors import MissingDependencyError, OllamaFtError, StageError
from ollama_ft.ollama_server import cache_dir, cpu_level

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
INSTALL_HINT = "run `ollama-ft install-llama-tools` once (it builds llama.cpp's tools with CMake, minutes)"

# What the tools need of llama.cpp's build: static (one self-contained file per tool), no
# network code, none of the servers, examples or tests.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF")


# llama.cpp logs through a thread behind a singleton it never destroys, so a tool that finishes
# quickly can exit with its last lines (the summary llama-perplexity prints) still queued: seen in
# about one run in ten at the tiny shape. This file, linked into each tool, drains the queue at exit.
DRAIN_LOG_AT_EXIT = """// Added by ollama-ft (ollama_ft/llama_tools.py): print every queued log line before exiting.
#include "log.h"
#include <cstdlib>

namespace {
struct drain_log_at_exit {
    drain_log_at_exit() { std::atexit([] { common_log_pause(common_log_main()); }); }
} drain;
}
"""


def binding_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def tools_dir(version: str | None = None, level: str | None = None) -> Path:
    """Where the tools for this llama-cpp-python release and CPU level live."""
    return cache_dir() / f"llama.cpp-tools-{version or binding_version()}-{level or cpu_level()}" / "bin"


def find_tool(name: str) -> Path | None:
    path = tools_dir() / name
    return path if path.is_file() else None


def tool(name: str) -> Path:
    """The path of one tool, or a one-line error saying how to get it."""
    path = find_tool(name)
    if path is None:
        raise MissingDependencyError(f"llama.cpp's {name} is not built for llama-cpp-python "
                                     f"{binding_version()} on this CPU", INSTALL_HINT)
    return path


def missing_tools() -> list[str]:
    return [name for name in TOOLS if find_tool(name) is None]


def run_tool(name: str, args: list[str], log_path: Path) -> str:
    """Run a tool with its output appended to `log_path`; return that output; raise on failure."""
    command = [str(tool(name)), *args]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    output = done.stdout + done.stderr
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n{output}\n")
    if done.returncode != 0:
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
        raise StageError(f"{name} failed (exit {done.returncode}): {last.strip()}", f"see {log_path}")
    return output


def install_tools(log: Callable[[str], None] = lambda line: None) -> Path:
    """Build the tools from the installed llama-cpp-python's sdist unless the cache has them."""
    target = tools_dir()
    if not missing_tools():
        return target
    version = binding_version()
    if version is None:
        raise MissingDependencyError("building llama.cpp's tools needs llama-cpp-python installed first",
                                     "pip install llama-cpp-python")
    absent = [program for program in ("cmake", "c++") if shutil.which(program) is None]
    if absent:
        raise MissingDependencyError(f"building llama.cpp's tools needs {' and '.join(absent)}",
                                     "apt-get install -y cmake g++ (or pip install cmake)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-tools-") as tmp:
        source = _unpacked_source(version, Path(tmp), log)
        _drain_log_at_exit(source)
        build = Path(tmp) / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS], log)
        _run(["cmake", "--build", str(build), "--parallel", "--target", *TOOLS], log)
        staged = target.with_name("bin.partial")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for name in TOOLS:
            shutil.copy2(build / "bin" / name, staged / name)
        shutil.rmtree(target, ignore_errors=True)
        staged.replace(target)
    log(f"built {', '.join(TOOLS)} in {time.monotonic() - started:.0f} s: {target}")
    return target


def _unpacked_source(version: str, folder: Path, log: Callable[[str], None]) -> Path:
    """vendor/llama.cpp of the llama-cpp-python `version` sdist (pip's cache makes a refetch cheap)."""
    log(f"fetching the llama-cpp-python {version} sdist for its vendored llama.cpp")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                          "-d", str(folder), f"llama-cpp-python=={version}"],
                         capture_output=True, text=True)
    sdists = list(folder.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode != 0 or not sdists:
        raise MissingDependencyError(f"could not download the llama-cpp-python {version} sdist",
                                     (got.stderr.strip().splitlines() or ["pip gave no output"])[-1])
    prefix = sdists[0].name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(folder, members=members, filter="data")
    return folder / prefix


def _drain_log_at_exit(source: Path) -> None:
    extra = source / "tools" / "ollama_ft_drain_log.cpp"
    extra.write_text(DRAIN_LOG_AT_EXIT, encoding="utf-8")
    for name in TOOLS:
        with open(source / "tools" / name.removeprefix("llama-") / "CMakeLists.txt", "a", encoding="utf-8") as cmake:
            cmake.write(f"\ntarget_sources({name} PRIVATE {extra.as_posix()})\n")


def _run(command: list[str], log: Callable[[str], None]) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log(line.rstrip())
    if proc.wait() != 0:
        raise OllamaFtError(f"building llama.cpp's tools failed ({command[0]} {command[1]} exit {proc.returncode})",
                            "see the output above")

