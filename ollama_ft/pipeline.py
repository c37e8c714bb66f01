"""The build pipeline: train → merge → convert → imatrix → quantize → tokenizer → modelfile →
register → smoke → baseline → eval.

`build()` checks everything that could stop the build (preflight), works out what every stage
reads (context.py), then calls one function per stage (stages.py); each skips itself when its
inputs did not change and returns a typed output. A kill at any point costs only the unfinished
stage.

    from ollama_ft.recipe import load_recipe
    from ollama_ft.pipeline import BuildOptions, build
    result = build(load_recipe("recipes/tiny-demo.toml"), BuildOptions(backend="peft"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ollama_ft.recipe import Recipe
from ollama_ft.runs import RunDir, clean_partials

if TYPE_CHECKING:
    from ollama_ft.stages import Converted, Evaluated, Merged, Modelfile, Quantized, Trained

STAGES = ("train", "merge", "convert", "imatrix", "quantize", "tokenizer", "modelfile", "register", "smoke", "baseline", "eval")


class Reporter(Protocol):
    def stage(self, name: str, status: str, detail: str = "") -> None: ...   # start | skip | done | warn
    def progress(self, name: str, done: int, total: int, detail: str = "") -> None: ...


class NullReporter:
    def stage(self, name: str, status: str, detail: str = "") -> None:
        pass

    def progress(self, name: str, done: int, total: int, detail: str = "") -> None:
        pass


@dataclass
class BuildOptions:
    backend: str = "peft"
    variant: str | None = None            # run folder / Ollama tag; default: the backend's name
    tag_model: bool = False               # compare: register as NAME:variant
    force: bool = False                   # redo every stage; replace an Ollama model of the same name
    from_stage: str | None = None         # redo this stage and every later one
    runs_root: Path = Path("runs")
    host: str | None = None               # overrides recipe and $OLLAMA_HOST
    device: str = "auto"                  # "cpu" forces CPU training
    launcher: str = "python"              # "accelerate": train under `accelerate launch`
    num_processes: int = 1                # processes (GPUs) for the accelerate launcher
    accelerate_config: Path | None = None # an `accelerate config` file (FSDP, DeepSpeed, …)
    skip_eval: bool = False
    reporter: Reporter = field(default_factory=NullReporter)


@dataclass
class BuildResult:
    run_dir: Path
    model_name: str
    host: str
    ran: list[str]
    skipped: list[str]
    metrics: dict[str, Any]               # what metrics.json holds: every stage's record and timing
    trained: Trained
    merged: Merged
    converted: Converted
    quantized: Quantized
    modelfile: Modelfile
    evaluated: Evaluated | None

    @property
    def gguf_path(self) -> Path:
        return self.quantized.gguf_path


def variant_name(options: BuildOptions) -> str:
    return options.variant or options.backend


def ollama_model_name(recipe: Recipe, options: BuildOptions) -> str:
    name = recipe.ollama.name
    if options.tag_model:
        name = name.split(":", 1)[0] + ":" + variant_name(options)
    return name


def build(recipe: Recipe, options: BuildOptions | None = None) -> BuildResult:
    """Run every stage for one backend; return what was done and the measured metrics."""
    from ollama_ft import stages
    from ollama_ft.context import prepare
    from ollama_ft.ollama_server import normalise_host
    from ollama_ft.preflight import preflight

    options = options or BuildOptions()
    host = normalise_host(options.host or recipe.ollama.host)
    name = ollama_model_name(recipe, options)
    run = RunDir(Path(options.runs_root) / recipe.stem / variant_name(options))
    ready = preflight(recipe, options, host, name, run.root)   # before any folder is made or model loads
    with run.lock():
        start_over(run, options)
        ctx = prepare(recipe, options, run, host, name, ready)
        runner = stages.Runner(ctx, run)
        trained = stages.train(ctx, runner)
        merged = stages.merge(ctx, runner, trained)
        f16 = stages.convert(ctx, runner, merged.merged_path, merged.size_bytes, merged.key, merged.soft)
        matrix = stages.imatrix(ctx, runner, f16)
        quantized = stages.quantize(ctx, runner, f16, matrix)
        gate = stages.tokenizer(ctx, runner, trained, quantized, merged)
        written = stages.modelfile(ctx, runner, quantized, merged)
        registered = stages.register(ctx, runner, written, quantized)
        smoked = stages.smoke(ctx, runner, registered, merged, f16, gate)
        base = stages.baseline(ctx, runner, written, quantized, matrix)
        evaluated = stages.evaluate(ctx, runner, smoked, written, quantized, base)
        runner.metrics["build"] = {"recipe": str(recipe.path), "backend": options.backend,
                                   "variant": variant_name(options), "model": name, "host": host,
                                   "ran": runner.ran, "skipped": runner.skipped}
        runner.write_metrics()
    return BuildResult(run.root, name, host, runner.ran, runner.skipped, runner.metrics,
                       trained, merged, f16, quantized, written, evaluated)


def start_over(run: RunDir, options: BuildOptions) -> None:
    """Remove half-written files of a killed build, and the records --force or --from redo."""
    clean_partials(run.root)
    redo = list(STAGES) if options.force else \
        list(STAGES[STAGES.index(options.from_stage):]) if options.from_stage else []
    run.drop_records(redo)
    if "baseline" in redo:   # its own convert, quantize and register records
        RunDir(run.path("baseline")).drop_records(["convert", "quantize", "register"])
