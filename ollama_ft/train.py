"""Stage 1, train: run one backend in its own subprocess and collect its measured result.

The parent never imports torch for this stage; it writes the job, starts
`python -m ollama_ft.backends.worker`, turns the worker's progress events into progress
callbacks, and maps the worker's exit code to an error a user can act on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ollama_ft.backends import TrainJob, TrainResult
from ollama_ft.backends.worker import EVENT_PREFIX
from ollama_ft.errors import DataError, OllamaFtError, StageError
from ollama_ft.runs import atomic_write_json, atomic_write_text


class TrainingInterrupted(OllamaFtError):
    """Ctrl-C during training; a checkpoint was saved and a rerun resumes from it."""

    exit_code = 130


@dataclass
class TrainInput:
    job: TrainJob
    examples: list[dict]
    validation: list[dict] | None
    work_dir: Path
    launcher: list[str] | None = None   # e.g. ["accelerate", "launch", "--num_processes", "2"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when ollama-ft dies, so a killed build leaves no orphan training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train(inp: TrainInput, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    work = inp.work_dir
    work.mkdir(parents=True, exist_ok=True)
    _write_jsonl(Path(inp.job.examples_path), inp.examples)
    if inp.validation:
        _write_jsonl(Path(inp.job.validation_path), inp.validation)
    job_path, result_path = work / "job.json", work / "result.json"
    atomic_write_json(job_path, inp.job.to_json())
    Path(result_path).unlink(missing_ok=True)

    command = [*(inp.launcher or [sys.executable, "-m"]), "ollama_ft.backends.worker", str(job_path), str(result_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if inp.job.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    error: dict = {}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=_die_with_parent)
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
