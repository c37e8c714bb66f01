"""The Turkish eval suite through the real Ollama server: the fine-tuned demo model passes more
held-in cases than its untrained base (exported the same way), and `ollama-ft eval` works on any
model in the server, writing reports that parse."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.every_ollama]


def test_build_reports_a_held_in_gain_over_the_base(demo_build):
    ev = demo_build["metrics"]["eval"]
    assert ev["baseline"]["model"].endswith(":base")
    assert ev["held_in_pass_rate"] > ev["baseline"]["held_in_pass_rate"], ev
    assert ev["delta"]["(held-in)"]["after"] == ev["held_in_pass_rate"]
    report = json.loads(Path(ev["report_json"]).read_text(encoding="utf-8"))
    # compare (another test) may rebuild this run folder under the tag NAME:peft and rewrite it.
    assert report["model"].split(":")[0] == demo_build["model"] and len(report["cases"]) >= 80
    md = Path(ev["report_md"]).read_text(encoding="utf-8")
    assert "(held-in)" in md and "baseline" in md


def test_eval_command_on_any_model_with_baseline(demo_build, ollama_server, tmp_path):
    model = demo_build["model"]
    base = demo_build["metrics"]["eval"]["baseline"]["model"]
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "eval", model, "--baseline", base, "--host",
                          ollama_server.host, "--out", str(tmp_path), "--json", "--concurrency", "4"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["model"] == model and data["baseline"]["model"] == base
    assert data["held_in_pass_rate"] > data["baseline"]["held_in_pass_rate"]
    for case in data["cases"][:5]:
        assert case["latency_s"] > 0 and case["eval_count"] >= 0
    assert (tmp_path / "eval-report.md").is_file()
    assert json.loads((tmp_path / "eval-report.json").read_text())["model"] == model


def test_eval_of_a_missing_model_is_one_clear_line(ollama_server):
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "eval", "no-such-model", "--host", ollama_server.host],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert "no-such-model" in out.stderr and "ollama list" in out.stderr and "Traceback" not in out.stderr


# ChatML with a thinking block, as thinking models' templates write it: a server from 0.12.5 on
# sees `.Thinking` in the messages, takes <think>…</think> as the tags and thinks by default.
THINKING_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ if and $.IsThinkSet $.Think }}<think>
{{ end }}"""


def test_eval_grades_the_answer_and_keeps_thinking_apart(demo_build, ollama_server):
    from ollama_ft.chat_templates import load_family
    from ollama_ft.eval_suite import Suite
    from ollama_ft.evaluate import evaluate_model
    from ollama_ft.modelfile import ModelfileSpec
    from ollama_ft.ollama_server import server_features
    from ollama_ft.register import RegisterInput, register_model

    gguf = Path(demo_build["metrics"]["quantize"]["gguf_path"])
    spec = ModelfileSpec(gguf, THINKING_TEMPLATE, list(load_family("chatml").stop), parameters={"num_ctx": 256})
    register_model(RegisterInput("demo-thinking", ollama_server.host, spec, force=True))
    suite = Suite.model_validate({"name": "think", "case": [
        {"id": "capital", "category": "factual", "held_in": True, "prompt": "Türkiye'nin başkenti neresidir?",
         "checks": [{"type": "contains", "value": "Ankara"}]}]})
    case = evaluate_model(ollama_server.host, "demo-thinking", suite).cases[0]
    if server_features(ollama_server.version)["thinking_field"]:
        # The prompt ends in <think>: what the model says goes to thinking until it closes the tag,
        # which the tiny model never learned to do, so there is no answer to pass.
        assert case.thinking and case.thinking.strip() and not case.passed
        assert case.thinking not in (case.reply or "")
    else:
        assert case.thinking is None and case.reply and case.reply.strip()
        assert case.passed == ("ankara" in case.reply.lower())
