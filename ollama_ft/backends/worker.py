"""Subprocess entry point that trains one job with one backend.

    python -m ollama_ft.backends.worker JOB.json RESULT.json

Progress goes to stdout as lines starting with `@@ollama-ft ` followed by JSON; everything
libraries print goes to the job's log file. Exit codes: 0 done, 2 bad data, 130 stopped by
Ctrl-C after saving a checkpoint, 1 anything else (the traceback is in the log file).

Under `accelerate launch` every process runs this; only the main one (RANK 0) reports progress
and writes the result, and every one reports its own errors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from dataclasses import asdict

EVENT_PREFIX = "@@ollama-ft "


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a killed build leaves no orphan training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    if "LOCAL_RANK" in os.environ:
        die_with_parent()  # our parent is accelerate's torchrun, which ollama-ft's death kills
    main_process = _is_main_process()
    with open(job_path, encoding="utf-8") as fh:
        raw = json.load(fh)
    from ollama_ft.backends import TrainJob, load_backend

    job = TrainJob(**raw)
    # Libraries write to fd 1 and 2 freely; keep the event channel clean by moving them to the log.
    log = open(job.log_path, "a", encoding="utf-8", buffering=1)
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log

    def emit(event: dict) -> None:
        if main_process or event.get("event") == "error":
            events.write(EVENT_PREFIX + json.dumps(event) + "\n")

    from ollama_ft.backends.common import DatasetTooLong, Interrupted

    try:
        result = load_backend(job.backend).train(job, emit)
    except DatasetTooLong as exc:
        emit({"event": "error", "kind": "data", "message": str(exc)})
        return 2
    except Interrupted as exc:
        emit({"event": "interrupted", "checkpoint": str(exc)})
        return 130
    except Exception as exc:  # reported to the parent as one line; the traceback stays in the log
        traceback.print_exc()
        emit({"event": "error", "kind": "failure", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    if not main_process:
        return 0
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(asdict(result), fh, indent=2)
    os.replace(tmp, result_path)
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
