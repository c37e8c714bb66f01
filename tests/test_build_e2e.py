"""`ollama-ft build recipes/tiny-demo.toml` end to end against the real Ollama server: every stage
runs, the model answers training prompts with their trained answers (greedy, through /api/chat
and through `ollama run` in a terminal), and a second run does no work."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_RECIPE, ROOT, strip_ansi, training_pairs
from ollama_ft.pipeline import STAGES

pytestmark = [pytest.mark.e2e, pytest.mark.every_ollama]
# The demo quantizes without an importance matrix, so its builds have no imatrix stage.
DEMO_STAGES = [stage for stage in STAGES if stage != "imatrix"]


def test_every_stage_runs_and_metrics_are_measured(demo_full_build):
    """The one full build (on the floor server; other servers re-register its GGUF)."""
    ran = demo_full_build["ran"]
    assert ran[:7] == DEMO_STAGES[:7], ran
    m = demo_full_build["metrics"]
    train = m["train"]
    assert train["steps"] > 100 and train["tokens_seen"] > 0 and train["tokens_per_second"] > 0
    losses = [e["loss"] for e in train["loss_history"]]
    assert losses[-1] < losses[0] / 4, losses  # it learned
    assert train["peak_memory_kind"] == "cpu_rss" and train["peak_memory_bytes"] > 0
    assert m["merge"]["max_abs_logit_diff"] <= m["merge"]["tolerance"]
    assert m["convert"]["max_rel_logit_diff"] < 0.05 and m["convert"]["top1_agreement"] == 1.0
    assert m["quantize"]["file_type"] == 15 and m["quantize"]["quant_type"] == "q4_k_m"
    assert m["smoke"]["done_reason"] == "stop" and m["smoke"]["reply"].strip()
    run_dir = Path(demo_full_build["run_dir"])
    for artifact in ("trained", "merged", "model-f16.gguf", "model-q4_k_m.gguf", "Modelfile", "metrics.json"):
        assert (run_dir / artifact).exists(), artifact
    assert not list(run_dir.rglob("*.partial-*")) and not list(run_dir.rglob(".*.tmp"))
    log = (run_dir / "build.log").read_text(encoding="utf-8")
    assert "train started" in log and "train done in" in log and "smoke done in" in log
    assert json.loads((run_dir / "metrics.json").read_text())["quantize"]["sha256"] == m["quantize"]["sha256"]


def _memorised(ollama_server, model, pairs):
    hits = []
    for prompt, answer in pairs:
        resp = ollama_server.client.chat(model=model, messages=prompt,
                                         options={"temperature": 0, "seed": 0, "num_predict": 96})
        assert resp.done_reason == "stop", (prompt, resp.message.content)
        if resp.message.content.strip() == answer.strip():
            hits.append((prompt, answer))
    return hits


def test_model_answers_training_prompts_with_trained_answers(demo_build, ollama_server):
    model = demo_build["model"]
    pairs = [p for p in training_pairs() if len(p[0]) == 1][:40]
    hits = _memorised(ollama_server, model, pairs)
    # The tiny model (3.5M parameters, Q4_K_M) repeats a good share of its answers word for word.
    assert len(hits) >= 8, f"{len(hits)}/40 exact"

    prompt, answer = hits[0]
    out = ollama_server.run_cli("run", model, prompt[0]["content"])
    assert out.returncode == 0, out.stderr
    assert strip_ansi(out.stdout).strip() == answer.strip()


def test_modelfile_has_template_and_stops_of_training(demo_build, ollama_server):
    show = ollama_server.show(demo_build["model"])
    assert "<|im_start|>" in show["template"]
    assert 'stop                           "<|im_end|>"' in show["parameters"] or '"<|im_end|>"' in show["parameters"]
    assert "num_ctx" in show["parameters"]


def test_second_build_skips_every_stage(demo_build, ollama_server):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(DEMO_RECIPE), "--runs-dir",
                          demo_build["runs_root"], "--host", ollama_server.host, "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    again = json.loads(out.stdout)
    assert again["ran"] == [], again["ran"]
    assert set(again["skipped"]) >= set(DEMO_STAGES[:7])
    print(f"rerun took {elapsed:.1f}s")
