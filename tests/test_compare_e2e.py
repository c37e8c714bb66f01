"""`ollama-ft compare recipes/tiny-demo.toml --backends unsloth,peft` against the real Ollama:
both variants are built and registered under their own tags, and every figure in the report is
the one measured in that variant's run folder (none copied from a constant). `--reuse` keeps the
peft training that `demo_build` made (one demo training less for CI), and the report must say
that peft's figures come from that earlier build while unsloth's were measured now."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_RECIPE, ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def compare_report(demo_build, ollama_server, runs_root):
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "compare", str(DEMO_RECIPE), "--backends",
                          "unsloth,peft", "--reuse", "--runs-dir", str(runs_root), "--host", ollama_server.host, "--json"],
                         capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_report_figures_come_from_each_run_folder(compare_report):
    assert list(compare_report["variants"]) == ["unsloth", "peft"]
    for variant, row in compare_report["variants"].items():
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        t = metrics["train"]
        assert row["model"] == f"tr-tiny-demo:{variant}" == metrics["build"]["model"]
        assert row["tokens_per_second"] == t["tokens_per_second"] > 0
        assert row["train_seconds"] == t["train_seconds"] > 0
        assert row["final_loss"] == t["final_loss"]
        assert row["peak_memory_gib"] == t["peak_memory_bytes"] / 2**30 > 0
        assert row["trainable_parameters"] == t["trainable_parameters"] > 0
        assert row["gguf_mib"] == metrics["quantize"]["size_bytes"] / 2**20
        assert row["quantize_seconds"] == metrics["quantize"]["seconds"]
        assert row["eval_pass_rate"] == metrics["eval"]["pass_rate"]
        assert row["ollama_tokens_per_second"] > 0 and row["ollama_load_seconds"] > 0
        assert row["loss_history"] == t["loss_history"] and len(row["loss_history"]) > 10
    unsloth = json.loads((Path(compare_report["variants"]["unsloth"]["run_dir"]) / "metrics.json").read_text())
    assert "unsloth" in unsloth["train"]["versions"]


def test_same_seed_same_data_order_and_loss_distance_reported(compare_report):
    rows = compare_report["variants"]
    assert rows["unsloth"]["data_order_sha256"] == rows["peft"]["data_order_sha256"] != ""
    verdicts = "\n".join(compare_report["verdicts"])
    assert "data order: identical" in verdicts
    gap = abs(rows["unsloth"]["final_loss"] - rows["peft"]["final_loss"])
    assert f"final loss apart by {gap:.4f}" in verdicts
    assert "noise not measured" in verdicts  # one run each: the report must say so


def test_report_files_and_plots_written(compare_report):
    out = Path(compare_report["out_dir"])
    for name in ("compare.md", "compare.json", "loss.png", "throughput.png", "memory.png", "stages.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "| train tokens/s (non-pad) |" in md and "unsloth" in md and "torch" in md
    assert json.loads((out / "compare.json").read_text())["variants"].keys() == {"unsloth", "peft"}


def test_a_reused_training_is_labelled_and_a_fresh_one_is_not(compare_report):
    rows = compare_report["variants"]
    assert rows["unsloth"]["training_reused_from"] is None
    assert rows["peft"]["training_reused_from"]   # demo_build trained it before this compare
    assert any(v.startswith("peft: training figures reused from a build finished") for v in compare_report["verdicts"])
    md = (Path(compare_report["out_dir"]) / "compare.md").read_text(encoding="utf-8")
    assert "| training measured | this run | reused (" in md


def test_without_reuse_every_variant_trains_again():
    from ollama_ft.compare import _variant_options
    from ollama_ft.pipeline import BuildOptions

    assert _variant_options(BuildOptions(), "peft").from_stage == "train"
    assert _variant_options(BuildOptions(), "peft", reuse=True).from_stage is None
    assert _variant_options(BuildOptions(force=True), "peft").from_stage is None      # force redoes all anyway
    assert _variant_options(BuildOptions(from_stage="eval"), "peft").from_stage == "eval"


def test_the_reuse_label_comes_from_the_train_record(tmp_path):
    import time
    from types import SimpleNamespace

    from ollama_ft.report import trained_when
    from ollama_ft.runs import RunDir, StageRecord

    RunDir(tmp_path).write_record(StageRecord("train", "fp"))
    trained = SimpleNamespace(finished_at=RunDir(tmp_path).read_record("train").finished_at)
    assert trained_when(SimpleNamespace(ran=["train", "merge"], trained=trained)) is None
    assert trained_when(SimpleNamespace(ran=[], trained=trained)) == time.strftime("%Y-%m-%d %H:%M")
