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
from ollama_ft.recipe import Recipe


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
    from ollama_ft.pipeline import STAGES, require_cuda, require_tensorboard, training_launcher

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
        if recipe.model.load_in_4bit or options.qlora:
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
        previous = _registered_here(run_root)
        owned = previous == (name, host)
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


def _registered_here(run_root: Path) -> tuple[str, str] | None:
    """(name, host) this run folder registered last, from its register record."""
    import json

    record = run_root / "records" / "register.json"
    try:
        outputs = json.loads(record.read_text(encoding="utf-8"))["outputs"]
        return outputs["name"], outputs["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
