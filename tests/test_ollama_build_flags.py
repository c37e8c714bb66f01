"""The pinned Ollama is built for this CPU's x86-64 level, so ggml's CPU kernels use AVX2/FMA,
with ggml's weight repacking on.

A plain cgo build leaves ggml on baseline x86-64 (benchmarks/serving.py measured it at 0.08× of
llama-cpp-python's tokens/s); the level picks the -march that turns on ggml's SIMD paths."""

import re

import pytest

from ollama_ft.ollama_server import cpu_level, pinned_binary

V3 = "flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi1 bmi2 movbe abm popcnt"


@pytest.mark.parametrize("flags, level", [
    ("flags\t\t: fpu sse sse2 sse4_2 popcnt", "generic"),
    (V3, "x86-64-v3"),
    (V3 + " avx512f avx512bw avx512cd avx512dq avx512vl", "x86-64-v4"),
    (V3.replace(" fma", ""), "generic"),     # AVX2 without FMA is not v3
    ("processor\t: 0", "generic"),
])
def test_cpu_level_from_cpuinfo(flags, level):
    assert cpu_level(f"processor\t: 0\n{flags}\n") == level


def test_each_level_builds_with_its_own_march_into_its_own_folder(tmp_path):
    from ollama_ft.ollama_server import build_environment

    v3 = build_environment("0.11.4", "x86-64-v3", pinned_binary("x86-64-v3").parent, None)
    generic = build_environment("0.11.4", "generic", pinned_binary("generic").parent, None)
    assert v3["CGO_CFLAGS"] == "-O3 -march=x86-64-v3" and "-march" not in generic.get("CGO_CFLAGS", "")
    assert v3["GOBIN"] != generic["GOBIN"]   # a v3 binary is never served on a CPU without AVX2
    assert "-DGGML_USE_CPU_REPACK" in v3["CGO_CPPFLAGS"] and "-DGGML_USE_CPU_REPACK" in generic["CGO_CPPFLAGS"]
    current = build_environment("0.24.0", "x86-64-v4", tmp_path, tmp_path / "miniaudio")
    assert f"-I{tmp_path / 'miniaudio'}" in current["CGO_CPPFLAGS"]
    assert current["CGO_CXXFLAGS"] == f"-O3 -march=x86-64-v4 -I{tmp_path / 'miniaudio'} -I/usr/include/stb"


def test_the_built_ollama_runs_ggml_with_this_cpus_simd(ollama_server, demo_build):
    """The runner that serves a model reports the CPU features its ggml was compiled with."""
    level = cpu_level()
    if level == "generic":
        pytest.skip("this CPU has no AVX2/FMA")
    if ollama_server.binary != pinned_binary():
        pytest.skip(f"an `ollama` on PATH ({ollama_server.binary}) is used, not the pinned build")
    ollama_server.client.generate(model=demo_build["model"], prompt="Merhaba", options={"num_predict": 1})
    log = ollama_server.log_path.read_text(encoding="utf-8", errors="replace")
    systems = re.findall(r"msg=system (.*)", log)
    assert systems, "the runner never reported its ggml system info"
    assert "CPU.0.AVX2=1" in systems[-1] and "CPU.0.FMA=1" in systems[-1], systems[-1][:400]
    assert "CPU.0.AARCH64_REPACK=1" in systems[-1], systems[-1][:400]  # Q4_K weights repacked for AVX2


def test_each_tested_release_has_its_own_cached_binary():
    from ollama_ft.ollama_server import CURRENT_OLLAMA_VERSION, OLLAMA_VERSION

    floor, current = pinned_binary(version=OLLAMA_VERSION), pinned_binary(version=CURRENT_OLLAMA_VERSION)
    assert floor == pinned_binary() and floor != current and f"ollama-{CURRENT_OLLAMA_VERSION}-" in str(current)
