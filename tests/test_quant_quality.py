"""Quantizing by quality, without llama.cpp's tools: the recipe fields, the texts the matrix is
computed on and measured with, reading llama-perplexity's figures, and the choice by the floor.
(tests/test_imatrix_e2e.py runs the real tools and the real server.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ollama_ft.errors import RecipeError, StageError
from ollama_ft.imatrix import context_for
from ollama_ft.context import quality_texts
from ollama_ft.quant_quality import QualityFigures, choose, parse_kld_output
from ollama_ft.recipe import AUTO_QUANTS, NEEDS_IMATRIX, parse_recipe

RECIPE = """[model]
base = "tiny:llama"
[data]
train = "data.jsonl"
[export]
EXPORT
[ollama]
name = "tr-test"
"""

# The summary llama-perplexity (llama-cpp-python 0.3.36's llama.cpp) printed for SmolLM2-135M-Instruct
# at Q8_0 against its F16 GGUF on held-out Turkish text (benchmarks/quant_quality.py).
KLD_OUTPUT = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  14.962087 ±   0.720939
Mean PPL(base)                :  14.778987 ±   0.707588
Cor(ln(PPL(Q)), ln(PPL(base))):  99.80%
Mean ln(PPL(Q)/PPL(base))     :   0.012313 ±   0.003047
Mean PPL(Q)/PPL(base)         :   1.012389 ±   0.003084
Mean PPL(Q)-PPL(base)         :   0.183100 ±   0.047009

====== KL divergence statistics ======
Mean    KLD:   0.006209 ±   0.000149
Maximum KLD:   0.168024
99.9%   KLD:   0.114319
99.0%   KLD:   0.040253
95.0%   KLD:   0.020110
90.0%   KLD:   0.013694
Median  KLD:   0.003798
10.0%   KLD:   0.000254
 5.0%   KLD:   0.000102
 1.0%   KLD:   0.000023
 0.1%   KLD:   0.000004
Minimum KLD:  -0.000000

====== Token probability statistics ======
Mean    Δp: -0.174 ± 0.030 %
Maximum Δp: 16.606%
99.9%   Δp: 10.722%
99.0%   Δp:  5.702%
95.0%   Δp:  2.437%
90.0%   Δp:  1.218%
75.0%   Δp:  0.151%
Median  Δp: -0.005%
25.0%   Δp: -0.398%
10.0%   Δp: -1.965%
 5.0%   Δp: -3.348%
 1.0%   Δp: -6.361%
 0.1%   Δp: -11.579%
Minimum Δp: -17.452%
RMS Δp    :  1.917 ± 0.057 %
Same top p: 95.319 ± 0.331 %
"""


def recipe_with(export: str, tmp_path: Path):
    (tmp_path / "data.jsonl").write_text('{"text": "merhaba"}\n', encoding="utf-8")
    return parse_recipe(RECIPE.replace("EXPORT", export), tmp_path / "r.toml")


def problems_of(export: str, tmp_path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_with(export, tmp_path)
    return info.value.problems


def test_quantization_takes_one_type_a_list_or_auto(tmp_path):
    one = recipe_with('quantization = "Q5_K_M"', tmp_path).export
    assert one.candidates == ["q5_k_m"] and not one.chooses_by_quality and not one.needs_llama_tools
    listed = recipe_with('quantization = ["q8_0", "IQ4_XS"]', tmp_path).export
    assert listed.candidates == ["q8_0", "iq4_xs"] and listed.chooses_by_quality and listed.needs_llama_tools
    auto = recipe_with('quantization = "auto"\nmax_kld = 0.1\nmin_top1 = 0.9', tmp_path).export
    assert auto.candidates == list(AUTO_QUANTS) and (auto.max_kld, auto.min_top1) == (0.1, 0.9)
    matrix = recipe_with('imatrix = "auto"', tmp_path).export
    assert matrix.needs_llama_tools and not matrix.chooses_by_quality


@pytest.mark.parametrize("export, expected", [
    ('quantization = ["q8_0", "q5_km"]', "export.quantization = ['q8_0', 'q5_km']: 'q5_km': did you mean 'q5_k_m'?"),
    ('quantization = []', "export.quantization = []: an empty list"),
    ('quantization = ["q8_0", "Q8_0"]', "names a type twice"),
    ('quantization = "iq2_xs"', "export.quantization: iq2_xs need an importance matrix, and export.imatrix = 'none'"),
    ('quantization = ["q4_k_m", "iq1_m"]', "iq1_m need an importance matrix"),
    ('imatrix = "missing.gguf"', "export.imatrix = 'missing.gguf': no such file"),
    ('max_kld = 0', "export.max_kld = 0: Input should be greater than 0"),
    ('min_top1 = 1.5', "export.min_top1 = 1.5: Input should be less than or equal to 1"),
])
def test_bad_export_fields_name_the_field_and_the_fix(export, expected, tmp_path):
    problems = problems_of(export, tmp_path)
    assert any(expected in p for p in problems), problems


def test_a_type_that_needs_a_matrix_is_accepted_with_one(tmp_path):
    for quant in NEEDS_IMATRIX:
        assert recipe_with(f'quantization = "{quant}"\nimatrix = "auto"', tmp_path).export.quantization == quant
    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    assert recipe_with('quantization = "iq2_m"\nimatrix = "mine.gguf"', tmp_path).export.imatrix == "mine.gguf"


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Soru {i}?"}, {"role": "assistant", "content": f"Cevap {i}."}]}


def test_the_matrix_never_sees_the_text_it_is_measured_on():
    from ollama_ft.template_match import choose_template

    template = choose_template("chatml", None, "tiny:llama", "")
    examples = [_chat(i) for i in range(20)]
    calibration, held_out = quality_texts(examples, [], template)
    assert len(calibration) == 18 and "<|im_start|>user\nSoru 0?<|im_end|>" in calibration[0]
    assert held_out == "Soru 18?\nCevap 18.\n\nSoru 19?\nCevap 19."   # plain text: no template markers
    calibration, held_out = quality_texts(examples, [_chat(99)], template)
    assert len(calibration) == 20 and held_out == "Soru 99?\nCevap 99."
    assert quality_texts([{"text": "bir metin"}], [], template) == (["bir metin"], "bir metin")


def test_chunks_are_the_largest_power_of_two_the_text_holds_twice():
    assert context_for(100_000) == 512
    assert context_for(1023) == 256
    assert context_for(64) == 32
    with pytest.raises(StageError, match="is 63 tokens, fewer than the 64 llama.cpp needs"):
        context_for(63)


def test_llama_perplexitys_summary_is_read():
    figures = parse_kld_output(KLD_OUTPUT)
    assert figures == {"perplexity": 14.962087, "base_perplexity": 14.778987, "mean_kld": 0.006209,
                       "mean_kld_error": 0.000149, "kld_p99": 0.040253, "top1_agreement": pytest.approx(0.95319)}
    with pytest.raises(StageError, match="no 'Mean PPL"):
        parse_kld_output("main: build = 1 (abc)\n")


def fig(quant: str, size: int, kld: float, top1: float = 0.95) -> QualityFigures:
    return QualityFigures(quant, size, kld, kld * 5, top1, 10.0, 9.5)


def test_the_smallest_type_within_the_floor_is_shipped():
    figures = [fig("q8_0", 800, 0.001), fig("q5_k_m", 560, 0.02), fig("q4_k_m", 480, 0.04, 0.88),
               fig("q3_k_m", 390, 0.12)]
    assert choose(figures, 0.05, None).quant_type == "q4_k_m"
    assert choose(figures, 0.05, 0.9).quant_type == "q5_k_m"    # q4_k_m misses the top-1 floor
    assert choose(figures, 0.5, None).quant_type == "q3_k_m"
    with pytest.raises(StageError) as info:
        choose(figures, 0.0005, None)
    message = info.value.one_line()
    assert "no quantization meets export.max_kld = 0.0005" in message and "q8_0 KLD 0.0010 top-1 95.0%" in message
    assert "--from quantize" in message


def test_a_build_that_needs_the_tools_says_how_to_get_them_before_training(tmp_path, monkeypatch):
    from ollama_ft.cli import main

    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "r.toml").write_text(RECIPE.replace("EXPORT", 'imatrix = "auto"'), encoding="utf-8")
    (tmp_path / "data.jsonl").write_text(json.dumps(_chat(1)) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"),
                                       "--host", "127.0.0.1:9"])
    assert result.exit_code == 2
    assert ("export.imatrix = 'auto' needs llama.cpp's llama-imatrix, llama-quantize, llama-perplexity, not built yet "
            "(run `ollama-ft install-llama-tools` once") in result.stderr
    assert "cannot reach the Ollama server" in result.stderr      # reported together, before training
    assert not (tmp_path / "runs").exists()


def test_evaluating_candidates_needs_candidates_and_a_suite(tmp_path):
    (tmp_path / "suite.toml").write_text("", encoding="utf-8")
    problems = problems_of('quantization = "q4_k_m"\n[eval]\nsuite = "suite.toml"\ncandidates = true', tmp_path)
    assert any("eval.candidates = true evaluates the quantization candidates: it needs export.quantization = "
               '"auto" or a list, and eval.suite' in p for p in problems), problems
    recipe = recipe_with('quantization = ["q8_0", "q4_k_m"]\n[eval]\nsuite = "suite.toml"\ncandidates = true', tmp_path)
    assert recipe.eval.candidates


def test_the_quality_table_names_the_shipped_type_and_adds_pass_rates(tmp_path):
    from dataclasses import asdict

    from ollama_ft.quant_quality import add_pass_rates, floor_text, render_markdown

    figures = [fig("q8_0", 800 * 2**20, 0.001), fig("q4_k_m", 480 * 2**20, 0.04)]
    table = render_markdown(figures, "q4_k_m", floor_text(0.05, None), "auto")
    rows = [line for line in table.splitlines() if line.startswith("| q")]
    assert rows == ["| q4_k_m ✓ | 480.0 | 0.04000 ± 0.00000 | 0.2000 | 95.00% | 10.000 |",
                    "| q8_0 | 800.0 | 0.00100 ± 0.00000 | 0.0050 | 95.00% | 10.000 |"]
    assert "Floor: mean KLD ≤ 0.05. Shipped: **q4_k_m**" in table
    quality = {"candidates": [asdict(f) for f in figures], "chosen": "q4_k_m", "max_kld": 0.05, "min_top1": 0.9,
               "imatrix": "auto", "report_md": str(tmp_path / "quant-quality.md")}
    text = add_pass_rates(quality, {"q4_k_m": 0.5, "q8_0": 0.625}).read_text(encoding="utf-8")
    assert "| q4_k_m ✓ | 480.0 | 0.04000 ± 0.00000 | 0.2000 | 95.00% | 10.000 | 50.0% |" in text
    assert "| q8_0 | 800.0 | 0.00100 ± 0.00000 | 0.0050 | 95.00% | 10.000 | 62.5% |" in text
    assert "Floor: mean KLD ≤ 0.05, top-1 ≥ 90%" in text
