"""Nothing lost, nothing clobbered: SIGKILL at every stage followed by a rerun redoes only the
unfinished stage and leaves no partial file; a second build on the same run folder is refused by
a lock naming the holder; an Ollama model of the same name is never replaced without --force."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from ollama_ft.pipeline import STAGES

pytestmark = [pytest.mark.e2e, pytest.mark.every_ollama]

QUICK = """
[model]
base = "tiny:llama"
max_seq_length = 128
dtype = "float32"
[data]
train = "{data}"
max_examples = 48
[train]
method = "full"
max_steps = 60
learning_rate = 3e-3
batch_size = 16
gradient_checkpointing = false
save_steps = 10
logging_steps = 10
[ollama]
name = "{name}"
"""


def write_recipe(folder: Path, name: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(QUICK.format(data=ROOT / "data" / "turkish-demo.jsonl", name=name), encoding="utf-8")
    return path


def start_build(recipe: Path, runs: Path, host: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir", str(runs),
                             "--host", host, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 600) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return seen
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout}s: {''.join(seen)[-2000:]}"
    raise AssertionError(f"process ended before {marker!r}: {''.join(seen)[-3000:]}")


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_at_every_stage_then_rerun(tmp_path, ollama_server):
    recipe = write_recipe(tmp_path, "kill-test")
    runs = tmp_path / "runs"
    run_dir = runs / "kill-test" / "peft"
    stages = [stage for stage in STAGES if stage != "imatrix"]   # no importance matrix in this recipe
    for index, stage in enumerate(("train", "merge", "convert", "quantize", "register")):
        proc = start_build(recipe, runs, ollama_server.host)
        seen = "".join(wait_for_line(proc, f"▶ {stage}"))
        # Stages finished before the last kill are skipped; the killed one is redone (or was done).
        for earlier in stages[:max(0, index - 1)]:
            assert f"· {earlier}: up to date, skipped" in seen, (stage, seen)
        if index:
            killed = stages[index - 1]
            assert f"✔ {killed}" in seen or f"· {killed}: up to date" in seen, (stage, seen)
        if stage == "train":  # kill mid-training, after a checkpoint was written
            deadline = time.monotonic() + 300
            while not list((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        kill(proc)
        assert not (run_dir / "records" / f"{stage}.json").exists() or stage in ("quantize", "register")
    proc = start_build(recipe, runs, ollama_server.host, "--json")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert set(result["skipped"]) >= {"train", "merge", "convert"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"], "training should have resumed from its checkpoint"
    assert metrics["train"]["steps"] == 60
    leftovers = [p for p in run_dir.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []
    assert not (run_dir / ".lock").exists()
    from ollama_ft.quantize import read_gguf_types

    assert read_gguf_types(run_dir / "model-q4_k_m.gguf")[0] == 15
    assert ollama_server.client.show("kill-test").modelfile


def test_second_build_is_refused_by_the_lock(tmp_path, ollama_server):
    recipe = write_recipe(tmp_path, "lock-test")
    first = start_build(recipe, tmp_path / "runs", ollama_server.host)
    try:
        wait_for_line(first, "▶ train")
        second = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir",
                                 str(tmp_path / "runs"), "--host", ollama_server.host],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by another ollama-ft process (pid {first.pid})" in second.stderr
    finally:
        kill(first)


def test_existing_model_is_not_replaced_without_force(tmp_path, ollama_server, tiny_base):
    from ollama_ft.chat_templates import load_family
    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.modelfile import ModelfileSpec
    from ollama_ft.register import RegisterInput, register_model

    gguf = convert_to_gguf(ConvertInput(tiny_base, tmp_path / "other.gguf", ["Merhaba"], 0.05, tmp_path / "c.log"))
    fam = load_family("chatml")
    spec = ModelfileSpec(gguf.gguf_path, fam.go_template, list(fam.stop), system="başkasının modeli")
    register_model(RegisterInput("taken-name", ollama_server.host, spec))

    recipe = write_recipe(tmp_path, "taken-name")
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir",
                          str(tmp_path / "runs"), "--host", ollama_server.host], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 1
    assert "a model named 'taken-name' already exists" in out.stderr and "--force" in out.stderr
    assert ollama_server.show("taken-name")["system"] == "başkasının modeli"  # untouched

    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir",
                          str(tmp_path / "runs"), "--host", ollama_server.host, "--force", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["metrics"]["register"]["replaced"] is True
    assert ollama_server.show("taken-name").get("system", "") != "başkasının modeli"


def test_unreachable_ollama_is_one_line_with_the_fix(tmp_path):
    from ollama_ft.ollama_server import free_port

    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "eval", "any-model", "--host",
                          f"127.0.0.1:{free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    port = out.args[-1].rsplit(":", 1)[-1]
    assert out.stderr.startswith("error: no answer from the Ollama server at http://127.0.0.1:" + port), out.stderr
    assert "ollama serve" in out.stderr and "--host" in out.stderr
    assert out.stderr.count("\n") == 1


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(tmp_path, ollama_server):
    recipe = write_recipe(tmp_path, "sigint-test")
    runs = tmp_path / "runs"
    run_dir = runs / "sigint-test" / "peft"
    proc = start_build(recipe, runs, ollama_server.host)
    wait_for_line(proc, "▶ train")
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)   # what Ctrl-C in a terminal sends: the whole group
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "training stopped by Ctrl-C after saving a checkpoint" in err
    assert list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert not (run_dir / "records" / "train.json").exists() and not (run_dir / ".lock").exists()
    out = subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir", str(runs),
                          "--host", ollama_server.host, "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    train = json.loads(out.stdout)["metrics"]["train"]
    assert train["resumed_from"] and train["steps"] == 60
