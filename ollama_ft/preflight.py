"""Everything that would stop a build, found before any folder is made or any model loads.

A build that trains for an hour and then learns that Ollama is down, or that the model's name
belongs to someone else, has wasted the hour. Each check here runs whatever the others found,
and all problems are reported at once, one line: the options, the data, the base, the device,
llama.cpp's tools when the export needs them, and the Ollama server (reachable, new enough, the name free or this run's own).

    ready = preflight(recipe, options, host, name)
    ready.data, ready.launcher
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ollama_ft.errors import OllamaFtError, PreflightError, UserInputError
from ollama_ft.recipe import PROMPT_METHODS, Recipe


@dataclass(frozen=True)
class Ready:
    data: Any            # ollama_ft.data.LoadedData
    launcher: Any        # ollama_ft.train.Launcher


def ollama_problems(host: str, name: str, owned: bool, force: bool,
                    architecture: str | None = None) -> list[OllamaFtError]:
    """The server is reachable and new enough (for this architecture too), and `name` is free,
    ours, or to be replaced (--force)."""
    from ollama_ft.errors import OllamaError
    from ollama_ft.ollama_server import client_for, ollama_call
    from ollama_ft.register import check_server_runs, check_server_version, model_exists

    try:
        check_server_runs(host, check_server_version(host), architecture)
        exists = ollama_call(host, lambda: model_exists(client_for(host), name))
    except OllamaError as exc:
        return [exc]
    if exists and not (owned or force):
        return [OllamaError(f"a model named {name!r} already exists in Ollama at {host}",
                            "pass --force to replace it, or set ollama.name to another name")]
    return []


def preflight(recipe: Recipe, options, host: str, name: str, run_root: Path) -> Ready:
    """Run every check; raise one PreflightError naming all that failed, else return what they loaded."""
    from ollama_ft.base_model import base_architecture, base_problems
    from ollama_ft.pipeline import STAGES

    problems: list[OllamaFtError] = []
    found: dict[str, Any] = {}

    def check(fn: Callable[[], Any], key: str | None = None) -> None:
        try:
            value = fn()
        except PreflightError as exc:
            problems.extend(exc.problems)
        except OllamaFtError as exc:
            problems.append(exc)
        else:
            if key:
                found[key] = value

    def backend() -> None:
        from ollama_ft.backends import check_backend_available

        check_backend_available(options.backend)
        if options.backend == "unsloth" and recipe.train.method in PROMPT_METHODS:
            raise UserInputError(f"train.method = {recipe.train.method!r} with the unsloth backend: Unsloth's "
                                 "get_peft_model makes LoRA adapters only", "use --backend peft for soft prompts")

    def from_stage() -> None:
        if options.from_stage and options.from_stage not in STAGES:
            raise UserInputError(f"--from {options.from_stage!r} is not a stage", f"choose one of: {', '.join(STAGES)}")

    def data():
        from ollama_ft.data import load_data

        return load_data(recipe)   # every record checked

    def base() -> None:
        found_problems = base_problems(recipe, host)
        if found_problems:
            raise UserInputError("; ".join(found_problems))

    def device() -> None:
        if recipe.model.load_in_4bit:
            require_cuda("4-bit loading (QLoRA)", options.device)

    def llama_tools() -> None:
        from ollama_ft.errors import MissingDependencyError
        from ollama_ft.llama_tools import INSTALL_HINT, missing_tools

        missing = missing_tools()
        if missing:
            export = recipe.export
            why = (f"export.imatrix = {export.imatrix!r}" if export.imatrix != "none" else
                   f"export.quantization = {export.quantization!r}")
            raise MissingDependencyError(f"{why} needs llama.cpp's {', '.join(missing)}, not built yet", INSTALL_HINT)

    def ollama() -> None:
        from ollama_ft.runs import RunDir
        from ollama_ft.stages import registered_here

        owned = registered_here(RunDir(run_root)) == (name, host)
        errors = ollama_problems(host, name, owned, options.force, base_architecture(recipe))
        if errors:
            raise PreflightError(errors)

    check(backend)
    check(lambda: training_launcher(options), "launcher")
    if recipe.train.report_to == "tensorboard":
        check(require_tensorboard)
    check(from_stage)
    check(data, "data")
    check(base)
    check(device)
    if recipe.export.needs_llama_tools:
        check(llama_tools)
    check(ollama)
    if problems:
        raise PreflightError(problems)
    return Ready(found["data"], found["launcher"])


def require_cuda(what: str, device: str) -> None:
    """bitsandbytes' 4-bit kernels need a CUDA GPU; say so before training instead of failing in it."""
    import importlib.util

    cuda = False
    if device != "cpu" and importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise UserInputError(f"{what} needs a CUDA GPU, and none is available here",
                             "set model.load_in_4bit = false and train.method = 'lora' to train on this machine")


def require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        from ollama_ft.errors import MissingDependencyError

        raise MissingDependencyError("train.report_to = 'tensorboard' needs the tensorboard package",
                                     "pip install 'ollama-ft[tensorboard]', or set train.report_to = 'none'")


def training_launcher(options):
    """The train stage's Launcher, after checking the launcher options fit together."""
    from ollama_ft.train import Launcher

    if options.launcher not in ("python", "accelerate"):
        raise UserInputError(f"--launcher {options.launcher!r} is not a launcher", "choose one of: python, accelerate")
    if options.num_processes < 1:
        raise UserInputError(f"--num-processes {options.num_processes} must be at least 1", "use --num-processes 2 for two GPUs")
    if options.launcher == "python" and (options.num_processes > 1 or options.accelerate_config):
        raise UserInputError("--num-processes and --accelerate-config need --launcher accelerate",
                             "add --launcher accelerate")
    if options.launcher == "accelerate" and options.backend == "unsloth" and options.num_processes > 1:
        raise UserInputError("the unsloth backend trains on one GPU; multi-process training is the peft backend's",
                             "use --backend peft with --num-processes, or drop --num-processes")
    if options.num_processes > 1 and options.device != "cpu":
        from ollama_ft.estimate import visible_gpu_count

        gpus = visible_gpu_count()
        if 0 < gpus < options.num_processes:   # no GPU at all: the processes train on the CPU
            raise UserInputError(f"--num-processes {options.num_processes} needs one GPU per process; "
                                 f"{gpus} visible", f"use --num-processes {gpus}")
    config = options.accelerate_config
    if config is not None and not Path(config).is_file():
        raise UserInputError(f"--accelerate-config {config}: no such file", "write one with `accelerate config`")
    return Launcher(options.launcher, options.num_processes, str(Path(config).resolve()) if config else None)
