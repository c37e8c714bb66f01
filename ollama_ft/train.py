"""Stage 1, train: run one backend in its own subprocess and collect its measured result.

The parent never imports torch for this stage; it writes the job, starts
`python -m ollama_ft.backends.worker` (or N copies of it under `accelerate launch`), turns the
worker's progress events into progress callbacks, and maps the worker's exit code to an error a
user can act on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ollama_ft.backends import TrainJob, TrainResult
from ollama_ft.backends.worker import EVENT_PREFIX, die_with_parent
from ollama_ft.errors import DataError, StageError, TrainingInterrupted
from ollama_ft.runs import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Launcher:
    """How the worker starts: one Python process, or `accelerate launch` with N processes (DDP).

    `batch_size` stays per process, as in accelerate: N processes train on N × batch_size ×
    gradient_accumulation examples per optimizer step. An `accelerate config` file chooses FSDP or
    DeepSpeed instead of DDP.
    """
    kind: str = "python"                 # "python" | "accelerate"
    num_processes: int = 1
    config_file: str | None = None

    def command(self, module: str, *args: str) -> list[str]:
        if self.kind == "python":
            return [sys.executable, "-m", module, *args]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                   "--num_processes", str(self.num_processes), "--main_process_port", str(_free_port())]
        if self.config_file:
            command += ["--config_file", self.config_file]
        else:
            # No config file: plain DDP. `--multi_gpu` is accelerate's torchrun path, which also runs
            # N CPU processes over gloo (its `--cpu` path needs MPI); the Trainer picks the precision.
            command += ["--dynamo_backend", "no", "--mixed_precision", "no"]
            if self.num_processes > 1:
                command.append("--multi_gpu")
        return [*command, "-m", module, *args]

    def describe(self) -> dict:
        return {"kind": self.kind, "num_processes": self.num_processes, "config_file": self.config_file}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TrainInput:
    job: TrainJob
    examples: list[dict]
    validation: list[dict] | None
    work_dir: Path
    launcher: Launcher = Launcher()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def train(inp: TrainInput, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    work = inp.work_dir
    work.mkdir(parents=True, exist_ok=True)
    _write_jsonl(Path(inp.job.examples_path), inp.examples)
    if inp.validation:
        _write_jsonl(Path(inp.job.validation_path), inp.validation)
    job_path, result_path = work / "job.json", work / "result.json"
    atomic_write_json(job_path, inp.job.to_json())
    Path(result_path).unlink(missing_ok=True)

    command = inp.launcher.command("ollama_ft.backends.worker", str(job_path), str(result_path))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if inp.job.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    error: dict = {}
    # What a launcher prints (accelerate's warnings, a crash before the worker's own redirect) goes
    # to the run's log, not over the progress display.
    log = open(inp.job.log_path, "a", encoding="utf-8")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                            env=env, preexec_fn=die_with_parent)
    log.close()
    try:
        for line in proc.stdout:
            if not line.startswith(EVENT_PREFIX):
                continue
            event = json.loads(line[len(EVENT_PREFIX):])
            if event.get("event") == "error":
                error = event
            if on_event:
                on_event(event)
        code = proc.wait()
    except KeyboardInterrupt:
        # The worker got the same SIGINT: let it save its checkpoint and exit.
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise TrainingInterrupted("training stopped by Ctrl-C after saving a checkpoint",
                                  "run the same command again to resume") from None
    if code == 130:
        raise TrainingInterrupted("training stopped by Ctrl-C after saving a checkpoint",
                                  "run the same command again to resume")
    if code == 2 and error.get("kind") == "data":
        raise DataError(f"data: {error['message']}")
    if code != 0 or not result_path.is_file():
        message = error.get("message", f"worker exited with code {code}")
        raise StageError(f"training failed: {message}", f"full log: {inp.job.log_path}")
    return TrainResult(**json.loads(result_path.read_text(encoding="utf-8")))
