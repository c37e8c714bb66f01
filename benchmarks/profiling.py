"""Where a training step's time goes: torch.profiler over a few optimizer steps, for benchmarks.

benchmarks/train_throughput.py --profile names `benchmarks.profiling:profiler_from_environment`
in the training worker's OLLAMA_FT_TRAINER_CALLBACKS (ollama_ft/backends/common.py) and sets
OLLAMA_FT_PROFILE to a folder; the worker then profiles steps [OLLAMA_FT_PROFILE_START,
+OLLAMA_FT_PROFILE_STEPS) and writes

    profile.txt   the operators and kernels with the most self time on the device (CPU if none)
    profile.json  wall seconds of the profiled steps, device-busy seconds, and time per category

Categories group kernels by what they compute (matmul, attention, norm, softmax/CE, optimizer,
copy/cast, other elementwise), so two backends can be compared line by line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

CATEGORIES = (  # first match wins; names are lower-cased CUDA kernel or aten op names
    ("attention", ("flash", "fmha", "attention", "sdpa", "_efficient_attention", "cudnn_sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "matmul", "splitk")),
    ("optimizer", ("optimizer", "adam", "8bit", "kOptimizer")),
    ("dequantize", ("dequant", "kdequantize")),
    ("norm", ("rms", "norm")),
    ("softmax/CE", ("softmax", "nll", "cross_entropy", "logsumexp", "argmax", "max_")),
    ("copy/cast", ("copy", "cast", "to_copy", "fill", "cat", "index", "gather", "scatter")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(n.lower() in lowered for n in needles):
            return label
    return "other elementwise"


def make_profiler_callback(out_dir: str, start_step: int, steps: int, device: str):
    import torch
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.profiler = None
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start_step and self.profiler is None:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.profiler is None or state.global_step != start_step + steps:
                return
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.profiler.stop()
            write_profile(self.profiler, Path(out_dir), wall, steps, device)
            self.profiler = None

    return StepProfiler()


def write_profile(profiler, out: Path, wall: float, steps: int, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    events = profiler.key_averages()
    on_device = device == "cuda"
    sort = "self_device_time_total" if on_device else "self_cpu_time_total"
    (out / "profile.txt").write_text(events.table(sort_by=sort, row_limit=60, max_name_column_width=90))
    per_category: dict[str, float] = {}
    busy = 0.0
    rows = []
    for e in events:
        if on_device:
            # Kernels only (device type CUDA): operators' device time is the sum of their kernels'.
            seconds = e.self_device_time_total / 1e6 if str(e.device_type).endswith("CUDA") else 0.0
        else:
            seconds = e.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        busy += seconds
        per_category[category(e.key)] = per_category.get(category(e.key), 0.0) + seconds
        rows.append({"name": e.key, "seconds": seconds, "calls": e.count})
    rows.sort(key=lambda r: -r["seconds"])
    summary = {"steps": steps, "wall_seconds": wall, "busy_seconds": busy,
               "busy_fraction": busy / wall if wall else 0.0,
               "categories": dict(sorted(per_category.items(), key=lambda kv: -kv[1])),
               "top": rows[:80]}
    (out / "profile.json").write_text(json.dumps(summary, indent=1))


def profiler_from_environment(device: str):
    """The callback when OLLAMA_FT_PROFILE is set, else None."""
    folder = os.environ.get("OLLAMA_FT_PROFILE")
    if not folder:
        return None
    return make_profiler_callback(folder, int(os.environ.get("OLLAMA_FT_PROFILE_START", "5")),
                                  int(os.environ.get("OLLAMA_FT_PROFILE_STEPS", "2")), device)
