"""Importance matrices and quantization by quality, with llama.cpp's real tools and a real Ollama
server. Training is the demo's (copied run folder): these builds start at the imatrix stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ollama_ft.errors import StageError
from ollama_ft.quantize import QuantizeInput, quantize_gguf
from ollama_ft.recipe import NEEDS_IMATRIX, QUANT_TYPES

EXPORT_END = "\n[ollama]"


@pytest.fixture(scope="module")
def demo_copy(demo_full_build, runs_root, tmp_path_factory) -> Path:
    """A copy of the demo's run folder: trained, merged and converted; nothing quantized with a matrix."""
    copy = tmp_path_factory.mktemp("imatrix-runs")
    shutil.copytree(runs_root / "_bases", copy / "_bases", symlinks=True)
    run_dir = Path(demo_full_build["run_dir"])
    shutil.copytree(run_dir, copy / run_dir.relative_to(runs_root), symlinks=True)
    return copy


def build_with_export(runs: Path, server, export: str, tmp_path: Path, name: str, evaluate: str | None = None) -> dict:
    """`ollama-ft build` of the demo recipe with another [export] section and Ollama name; no eval
    unless `evaluate` gives an [eval] section."""
    text = (ROOT / "recipes" / "tiny-demo.toml").read_text(encoding="utf-8")
    start, end = text.index("[export]"), text.index(EXPORT_END)
    text = text[:start] + export + text[end:]
    if evaluate:
        text = text[:text.index("[eval]")] + evaluate
    assert 'name = "tr-tiny-demo"' in text
    text = text.replace('name = "tr-tiny-demo"', f'name = "{name}"')   # never the demo's own model
    text = text.replace('"../data/', f'"{ROOT}/data/').replace('"../evals/', f'"{ROOT}/evals/')
    recipe = tmp_path / "tiny-demo.toml"     # same stem, so the demo's run folder and its training
    recipe.write_text(text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir", str(runs),
                             "--host", server.host, *([] if evaluate else ["--no-eval"])],
                            capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env=dict(os.environ, OLLAMA_MODELS=str(server.models_dir), COLUMNS="200"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next(runs.glob("tiny-demo/*/metrics.json")).parent
    return {"output": result.stderr, "run_dir": run_dir,
            "metrics": json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))}


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith(("quantize.", "general.file_type"))}


def test_each_type_that_needs_a_matrix_is_refused_without_one_and_made_with_one(demo_full_build, llama_tools,
                                                                                tmp_path):
    from ollama_ft.imatrix import ImatrixInput, compute_imatrix
    from ollama_ft.context import quality_texts
    from ollama_ft.template_match import choose_template

    f16 = Path(demo_full_build["run_dir"]) / "model-f16.gguf"
    made = []
    for quant in QUANT_TYPES:
        if quant in ("f32", "f16", "bf16"):
            continue
        inp = QuantizeInput(f16, tmp_path / f"{quant}.gguf", quant, log_path=tmp_path / "quantize.log")
        if quant in NEEDS_IMATRIX:
            with pytest.raises(StageError, match="needs an importance matrix: set export.imatrix = 'auto'"):
                quantize_gguf(inp)
        else:
            made.append(quantize_gguf(inp).file_type_name)
        (tmp_path / f"{quant}.gguf").unlink(missing_ok=True)
    assert len(made) == len(QUANT_TYPES) - 3 - len(NEEDS_IMATRIX)

    examples = [json.loads(line) for line in (ROOT / "data" / "turkish-demo.jsonl").read_text().splitlines()]
    calibration, _ = quality_texts(examples, [], choose_template("chatml", None, "tiny:llama", ""))
    matrix = compute_imatrix(ImatrixInput(f16, calibration, tmp_path / "imatrix.gguf", tmp_path / "imatrix.log"))
    assert matrix.context == 512 and matrix.chunks >= 2
    for quant in NEEDS_IMATRIX:
        out = quantize_gguf(QuantizeInput(f16, tmp_path / f"{quant}.gguf", quant, log_path=tmp_path / "quantize.log",
                                          imatrix=matrix.path))
        assert out.file_type_name == quant
        assert gguf_fields(out.gguf_path)["quantize.imatrix.entries_count"] > 0
        out.gguf_path.unlink()


def test_an_iq4_xs_model_quantized_with_the_recipes_own_matrix_runs_in_ollama(demo_copy, ollama_servers,
                                                                             llama_tools, tmp_path):
    from ollama_ft.ollama_server import OLLAMA_VERSION

    server = ollama_servers.get(OLLAMA_VERSION)
    built = build_with_export(demo_copy, server, '[export]\nquantization = "iq4_xs"\nimatrix = "auto"\n', tmp_path,
                              "tr-tiny-imatrix")
    metrics = built["metrics"]
    assert metrics["register"]["name"] == "tr-tiny-imatrix"
    assert metrics["train"]["skipped"] and metrics["convert"]["skipped"]      # the demo's training, reused
    assert not metrics["imatrix"]["skipped"] and metrics["imatrix"]["tokens"] > 2 * metrics["imatrix"]["context"]
    gguf = Path(metrics["quantize"]["gguf_path"])
    fields = gguf_fields(gguf)
    assert metrics["quantize"]["quant_type"] == "iq4_xs" and fields["general.file_type"] == 30   # LLAMA_FTYPE_MOSTLY_IQ4_XS
    assert fields["quantize.imatrix.file"].endswith("imatrix.gguf")
    assert fields["quantize.imatrix.dataset"].endswith("imatrix-calibration.txt")
    assert fields["quantize.imatrix.chunks_count"] == metrics["imatrix"]["chunks"]
    assert fields["quantize.imatrix.entries_count"] > 0
    # Registered and answering: the build's smoke stage asked it through Ollama, and so does this.
    assert metrics["smoke"]["reply"].strip()
    reply = server.client.chat(model="tr-tiny-imatrix", messages=[{"role": "user", "content": "Merhaba!"}],
                               options={"num_predict": 8})
    assert reply.message.content.strip()


def test_auto_ships_the_smallest_type_within_the_floor_and_reports_every_figure(demo_copy, ollama_servers,
                                                                               llama_tools, tmp_path):
    from ollama_ft.ollama_server import OLLAMA_VERSION
    from ollama_ft.recipe import AUTO_QUANTS

    server = ollama_servers.get(OLLAMA_VERSION)
    # A floor every candidate meets ships the smallest.
    first = build_with_export(demo_copy, server, '[export]\nquantization = "auto"\nimatrix = "auto"\nmax_kld = 50\n',
                              tmp_path, "tr-tiny-auto")
    quality = first["metrics"]["quantize"]["quality"]
    figures = {c["quant_type"]: c for c in quality["candidates"]}
    assert list(figures) == list(AUTO_QUANTS)
    for c in figures.values():
        assert c["mean_kld"] >= 0 and 0 <= c["top1_agreement"] <= 1 and c["size_bytes"] > 0
    assert figures["q8_0"]["mean_kld"] < figures["q3_k_m"]["mean_kld"]
    smallest = min(figures.values(), key=lambda c: c["size_bytes"])["quant_type"]
    assert quality["chosen"] == first["metrics"]["quantize"]["quant_type"] == smallest
    shipped = [p.name for p in first["run_dir"].glob("model-*.gguf")]
    assert sorted(shipped) == sorted(["model-f16.gguf", f"model-{smallest}.gguf"])   # the other candidates deleted
    table = Path(quality["report_md"]).read_text(encoding="utf-8")
    assert f"| {smallest} ✓ |" in table and all(f"| {q}" in table for q in AUTO_QUANTS)
    assert Path(quality["plot"]).stat().st_size > 0
    assert f"quant: {smallest} is the smallest of 6 within the floor" in first["output"]

    # A floor just under that type's KLD ships the smallest type within it; the matrix is not
    # recomputed. With eval.candidates every candidate is registered under its own tag and evaluated.
    tighter = figures[smallest]["mean_kld"] * 0.999
    evaluate = f'[eval]\nsuite = "{ROOT}/evals/turkish-core.toml"\nsample = 3\ncandidates = true\n'
    second = build_with_export(demo_copy, server,
                               f'[export]\nquantization = "auto"\nimatrix = "auto"\nmax_kld = {tighter}\n',
                               tmp_path, "tr-tiny-auto", evaluate)
    assert second["metrics"]["imatrix"]["skipped"] and not second["metrics"]["quantize"]["skipped"]
    again = {c["quant_type"]: c for c in second["metrics"]["quantize"]["quality"]["candidates"]}
    within = [c for c in again.values() if c["mean_kld"] <= tighter]
    assert second["metrics"]["quantize"]["quant_type"] == min(within, key=lambda c: c["size_bytes"])["quant_type"]
    assert second["metrics"]["quantize"]["quant_type"] != smallest
    shipped = second["metrics"]["quantize"]["quant_type"]
    evaluated = second["metrics"]["eval"]["candidates"]
    assert sorted(evaluated) == sorted(q for q in AUTO_QUANTS if q != shipped)
    for quant, result in evaluated.items():
        assert result["model"] == f"tr-tiny-auto:{quant}" and 0 <= result["pass_rate"] <= 1
        assert server.show(f"tr-tiny-auto:{quant}")["details"]["quantization_level"]
    table = Path(second["metrics"]["quantize"]["quality"]["report_md"]).read_text(encoding="utf-8")
    assert "eval pass rate |" in table
    assert f"{second['metrics']['eval']['pass_rate']:.1%} |" in table.split(f"| {shipped} ✓ |")[1].splitlines()[0]
