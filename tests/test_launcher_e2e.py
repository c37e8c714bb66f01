"""Multi-process training through `accelerate launch`, and TensorBoard logging.

Two CPU processes (DDP over gloo) with gradient_accumulation 1 see the same examples per
optimizer step as one process with gradient_accumulation 2, so they must train the same adapter;
the export stages run once, in ollama-ft's own process, and the model lands in Ollama. The
one-process build also asks for TensorBoard, whose event files must hold the logged losses.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "turkish-demo.jsonl"

RECIPE = """
[model]
base = "tiny:llama"
max_seq_length = 256
dtype = "float32"
[data]
train = "{data}"
validation_split = 0.0
[train]
method = "{method}"
rank = 8
alpha = 16
max_steps = 20
batch_size = 4
gradient_accumulation = {accum}
learning_rate = 3e-3
warmup_ratio = 0.0
gradient_checkpointing = false
logging_steps = 1
save_steps = 1000
report_to = "{report_to}"
[ollama]
name = "{name}"
"""

pytestmark = pytest.mark.e2e


def build(tmp: Path, host: str, name: str, *, accum: int, processes: int, method: str = "lora",
          report_to: str = "none") -> dict:
    recipe = tmp / f"{name}.toml"
    recipe.write_text(RECIPE.format(data=DATA, method=method, accum=accum, report_to=report_to, name=name),
                      encoding="utf-8")
    launch = ["--launcher", "accelerate", "--num-processes", str(processes)] if processes > 1 else []
    result = subprocess.run(
        [sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir", str(tmp / "runs"), "--cpu",
         "--host", host, "--no-eval", "--json", *launch],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_and_two(ollama_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    one = build(tmp, ollama_server.host, "launch-one", accum=2, processes=1, report_to="tensorboard")
    two = build(tmp, ollama_server.host, "launch-two", accum=1, processes=2)
    return one, two


def test_two_processes_train_the_same_adapter_as_one(one_and_two):
    import torch

    one, two = one_and_two
    t1, t2 = one["metrics"]["train"], two["metrics"]["train"]
    assert t2["launcher"] == {"kind": "accelerate", "num_processes": 2, "config_file": None}
    assert (t1["parallelism"], t1["processes"]) == ("single", 1)
    assert (t2["parallelism"], t2["processes"]) == ("ddp", 2)
    # metrics.json keeps the memory estimate beside the measured peak.
    for t in (t1, t2):
        assert t["memory_estimate"]["total_bytes"] > 0 and t["memory_estimate"]["device"] == "cpu"
        assert t["peak_memory_vs_estimate"] == pytest.approx(t["peak_memory_bytes"] / t["memory_estimate"]["total_bytes"])
    assert t1["steps"] == t2["steps"] == 20
    # Both processes' tokens are counted: the same examples were seen in total.
    assert t1["tokens_seen"] == t2["tokens_seen"] > 0

    trained1, trained2 = Path(t1["output_dir"]), Path(t2["output_dir"])
    assert sorted(p.name for p in trained1.iterdir()) == sorted(p.name for p in trained2.iterdir())
    a, b = tensors(trained1), tensors(trained2)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].shape == b[key].shape, key
        # Same data per optimizer step; only the order of float additions differs.
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), (key, (a[key] - b[key]).abs().max())
    for x, y in zip(t1["loss_history"], t2["loss_history"]):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-3)


def test_export_stages_run_once_and_the_model_is_in_ollama(one_and_two, ollama_server):
    _, two = one_and_two
    run_dir = Path(two["run_dir"])
    assert two["ran"][:8] == ["train", "merge", "convert", "quantize", "tokenizer", "modelfile", "register", "smoke"]
    ggufs = sorted(p.name for p in run_dir.rglob("*.gguf"))
    assert len([g for g in ggufs if "q4_k_m" in g.lower()]) == 1, ggufs
    log = (run_dir / "build.log").read_text(encoding="utf-8")
    for stage in ("train", "merge", "convert", "quantize", "register"):
        assert log.count(f" {stage} done in ") == 1, (stage, log)
    assert not list(run_dir.glob(".*partial*")), "a process left a half-written folder"
    reply = ollama_server.client.chat(model="launch-two", messages=[{"role": "user", "content": "Merhaba"}],
                                      options={"num_predict": 8})
    assert reply.message.content is not None


def test_tensorboard_events_hold_the_logged_losses(one_and_two):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    one, _ = one_and_two
    folder = Path(one["run_dir"]) / "tensorboard"
    assert folder.is_dir(), list(Path(one["run_dir"]).iterdir())
    events = [p for p in folder.rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    history = {h["step"]: h["loss"] for h in one["metrics"]["train"]["loss_history"]}
    assert logged.keys() == history.keys()
    for step, loss in history.items():
        assert logged[step] == pytest.approx(loss, rel=1e-5)


def test_full_fine_tuning_on_two_processes_matches_one(tmp_path):
    """Full fine-tuning across processes asks for FSDP; on CPU accelerate runs it as DDP over gloo,
    and the full weights written by the main process equal one process's."""
    import torch
    from safetensors.torch import load_file

    from ollama_ft.backends import TrainJob
    from ollama_ft.recipe import ModelSection, TrainSection
    from ollama_ft.chat_templates import load_family
    from ollama_ft.tiny import ensure_tiny_base
    from ollama_ft.train import Launcher, TrainInput, train

    base = ensure_tiny_base("tiny:llama", tmp_path / "bases")
    examples = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:64]]
    results = {}
    for processes, accum in ((1, 2), (2, 1)):
        work = tmp_path / f"p{processes}"
        job = TrainJob(
            backend="peft", base_path=str(base), examples_path=str(work / "examples.jsonl"), validation_path=None,
            chat_jinja=load_family("chatml").jinja, output_dir=str(work / "trained"),
            checkpoint_dir=str(work / "checkpoints"),
            model=ModelSection(base=str(base), max_seq_length=256, dtype="float32").model_dump(),
            train=TrainSection(method="full", rank=8, alpha=16, max_steps=3, learning_rate=1e-3,
                               gradient_accumulation=accum, gradient_checkpointing=False, assistant_only_loss=True,
                               logging_steps=1, save_steps=1000).model_dump(),
            assistant_only_loss=True, log_path=str(work / "train.log"), device="cpu")
        launcher = Launcher("accelerate", processes) if processes > 1 else Launcher()
        results[processes] = train(TrainInput(job, examples, None, work, launcher))
    one, two = results[1], results[2]
    assert (two.parallelism, two.processes, two.kind) == ("ddp", 2, "full")
    assert one.tokens_seen == two.tokens_seen
    a = load_file(str(Path(one.output_dir) / "model.safetensors"))
    b = load_file(str(Path(two.output_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-4), (key, (a[key] - b[key]).abs().max())
