"""Finding and building llama.cpp's tools, without building them (CI's set-up builds them for real,
and tests/test_imatrix_e2e.py runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_ft import llama_tools
from ollama_ft.errors import MissingDependencyError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tools_are_looked_up_per_binding_release_and_cpu_level(empty_cache):
    folder = llama_tools.tools_dir(version="0.3.36", level="x86-64-v3")
    assert folder == empty_cache / "llama.cpp-tools-0.3.36-x86-64-v3" / "bin"
    assert llama_tools.missing_tools() == list(llama_tools.TOOLS)
    with pytest.raises(MissingDependencyError, match="llama-quantize is not built .* install-llama-tools"):
        llama_tools.tool("llama-quantize")
    here = llama_tools.tools_dir()
    here.mkdir(parents=True)
    (here / "llama-quantize").write_bytes(b"")
    assert llama_tools.tool("llama-quantize") == here / "llama-quantize"
    assert llama_tools.missing_tools() == ["llama-imatrix", "llama-perplexity"]


def test_building_without_cmake_says_what_to_install(empty_cache, monkeypatch):
    monkeypatch.setattr(llama_tools.shutil, "which", lambda program: None)
    with pytest.raises(MissingDependencyError) as info:
        llama_tools.install_tools()
    assert info.value.one_line() == ("building llama.cpp's tools needs cmake and c++ "
                                     "(apt-get install -y cmake g++ (or pip install cmake))")
    assert not empty_cache.exists() or not any(empty_cache.rglob("llama-*"))


def test_each_tool_is_linked_with_the_log_drain(tmp_path):
    for name in llama_tools.TOOLS:
        folder = tmp_path / "tools" / name.removeprefix("llama-")
        folder.mkdir(parents=True)
        (folder / "CMakeLists.txt").write_text(f"set(TARGET {name})\n", encoding="utf-8")
    llama_tools._drain_log_at_exit(tmp_path)
    drain = tmp_path / "tools" / "ollama_ft_drain_log.cpp"
    assert "common_log_pause(common_log_main())" in drain.read_text(encoding="utf-8")
    for name in llama_tools.TOOLS:
        cmake = (tmp_path / "tools" / name.removeprefix("llama-") / "CMakeLists.txt").read_text(encoding="utf-8")
        assert cmake.endswith(f"target_sources({name} PRIVATE {drain.as_posix()})\n")
