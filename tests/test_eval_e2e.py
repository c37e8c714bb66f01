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
