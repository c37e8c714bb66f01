"""Training backends behind one small Protocol.

A backend turns a `TrainJob` into a trained adapter (or full weights) on disk. Everything after
training (merge, convert, quantize, register, eval) is shared, which is what makes `compare` fair.
Each backend runs in its own subprocess (`python -m ollama_ft.backends.worker JOB.json`) so that
Unsloth's patches of transformers/peft/trl never leak into another backend's run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ollama_ft.errors import MissingDependencyError, UserInputError

BACKENDS = ("peft", "unsloth")


@dataclass
class TrainJob:
    """Everything a backend needs, as plain JSON-able values (it crosses a process boundary)."""
    backend: str
    base_path: str
    examples_path: str           # JSONL of {"messages": [...]} or {"text": ...}
    validation_path: str | None
    chat_jinja: str
    output_dir: str              # trained adapter or full weights go here (atomically)
    checkpoint_dir: str
    model: dict[str, Any]        # recipe [model]
    train: dict[str, Any]        # recipe [train]
    assistant_only_loss: bool
    log_path: str
    device: str = "auto"         # "auto" | "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    kind: str                    # "adapter" | "full" | "soft_prompt" (prompt_tuning, p_tuning)
    output_dir: str
    train_seconds: float
    steps: int
    tokens_seen: int             # non-padding tokens processed
    tokens_per_second: float
    peak_memory_bytes: int
    peak_memory_kind: str        # "cuda_allocated" | "cpu_rss"
    trainable_parameters: int
    total_parameters: int
    loss_history: list[dict[str, float]] = field(default_factory=list)
    eval_loss: float | None = None
    final_loss: float | None = None
    examples: int = 0
    dropped_examples: int = 0
    truncated_examples: int = 0
    device_name: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    resumed_from: str | None = None
    step_timeline: list[list[float]] = field(default_factory=list)   # [step, seconds, tokens_seen]
    data_order_sha256: str = ""  # hash of the first batches' tokens, in training order
    padding_efficiency: float = 1.0   # non-pad ÷ computed positions in this process's batches (B3)
    speedups: list[str] = field(default_factory=list)   # the PEFT backend's switches that were on
    parallelism: str = "single"  # "single" | "ddp" | "fsdp" | "deepspeed", over `processes` processes
    processes: int = 1

    def steady_tokens_per_second(self, warmup_steps: int = 5) -> float:
        """Tokens/s after the first `warmup_steps` optimizer steps (compilation, allocator warm-up)."""
        if len(self.step_timeline) <= warmup_steps + 1:
            return self.tokens_per_second
        _, t0, n0 = self.step_timeline[warmup_steps]
        _, t1, n1 = self.step_timeline[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class TrainerBackend(Protocol):
    name: str

    def train(self, job: TrainJob, emit) -> TrainResult:
        """Train in this process; `emit(event: dict)` reports progress to the parent."""


def check_backend_available(name: str) -> None:
    """Fail early, with the install command, when a backend's packages are missing."""
    if name not in BACKENDS:
        raise UserInputError(f"unknown backend {name!r}", f"choose one of: {', '.join(BACKENDS)}")
    if name == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise MissingDependencyError("the unsloth backend needs Unsloth, which is not installed",
                                     "pip install 'ollama-ft[unsloth]'")
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("peft") is None:
        raise MissingDependencyError("training needs peft and trl", "pip install ollama-ft")


def load_backend(name: str) -> TrainerBackend:
    if name == "peft":
        from ollama_ft.backends.peft_trl import PeftBackend
        return PeftBackend()
    if name == "unsloth":
        from ollama_ft.backends.unsloth_trl import UnslothBackend
        return UnslothBackend()
    raise UserInputError(f"unknown backend {name!r}", f"choose one of: {', '.join(BACKENDS)}")
