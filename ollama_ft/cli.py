"""The `ollama-ft` command: parse arguments, call the library, turn its errors into one line.

Nothing heavy is imported at module level (no torch, no transformers, not even rich), so
`ollama-ft --help` is instant; each command imports the library module it needs when it runs,
and ollama_ft/console.py to show the result.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ollama_ft import __version__
from ollama_ft.errors import OllamaFtError


def _fail(exc: OllamaFtError) -> None:
    click.echo(f"error: {exc.one_line()}", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Library errors → `error: …` on stderr and their exit code; Ctrl-C → 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OllamaFtError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ollama-ft")
def main() -> None:
    """Fine-tune a model on your examples, ship it to Ollama, and measure it.

    \b
    ollama-ft build recipes/tiny-demo.toml        # train → GGUF → Q4_K_M → Ollama
    ollama-ft compare recipe.toml --backends unsloth,peft
    ollama-ft eval MODEL --suite evals/turkish-core.toml
    """
    # torchao (installed for Unsloth, imported by peft) registers enums in a way torch 2.13
    # deprecates, and torch prints two warnings about it in every build: nothing a user can act on.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["peft", "unsloth"]), default="peft", show_default=True,
              help="Training backend.")
@click.option("--force", is_flag=True, help="Redo every stage, and replace an Ollama model of the same name.")
@click.option("--from", "from_stage", metavar="STAGE", help="Redo this stage and every later one.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--host", help="Ollama server (default: recipe, then $OLLAMA_HOST, then 127.0.0.1:11434).")
@click.option("--cpu", is_flag=True, help="Train on the CPU even if a GPU is present.")
@click.option("--no-eval", is_flag=True, help="Skip the recipe's eval suite.")
@click.option("--launcher", type=click.Choice(["python", "accelerate"]), default="python", show_default=True,
              help="Start training as one process, or under `accelerate launch` (multi-GPU).")
@click.option("--num-processes", type=click.IntRange(1), default=1, show_default=True,
              help="Training processes for --launcher accelerate, one per GPU (batch_size is per process).")
@click.option("--accelerate-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An `accelerate config` file (FSDP, DeepSpeed) for --launcher accelerate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the summary.")
def build(recipe: Path, backend: str, force: bool, from_stage: str | None, runs_dir: Path, host: str | None,
          cpu: bool, no_eval: bool, launcher: str, num_processes: int, accelerate_config: Path | None,
          as_json: bool) -> None:
    """Train, merge, convert, quantize and register RECIPE's model in Ollama."""
    from ollama_ft.console import RichReporter, print_build_summary, stderr_console
    from ollama_ft.pipeline import BuildOptions
    from ollama_ft.pipeline import build as run_build
    from ollama_ft.recipe import load_recipe

    loaded = load_recipe(recipe)
    console = stderr_console()
    reporter = RichReporter(console)
    try:
        result = run_build(loaded, BuildOptions(backend=backend, force=force, from_stage=from_stage,
                                                runs_root=runs_dir, host=host, device="cpu" if cpu else "auto",
                                                launcher=launcher, num_processes=num_processes,
                                                accelerate_config=accelerate_config,
                                                skip_eval=no_eval, reporter=reporter))
    finally:
        reporter.close()
    if as_json:
        _print_json({"run_dir": str(result.run_dir), "model": result.model_name, "host": result.host,
                     "ran": result.ran, "skipped": result.skipped, "metrics": result.metrics})
        return
    print_build_summary(console, result, backend)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backends", "variants", default="unsloth,peft", show_default=True,
              help="Comma-separated variants: peft, unsloth, peft-qlora, unsloth-qlora; peft-lora, "
              "peft-prompt_tuning, peft-p_tuning train that method (LoRA vs soft prompts).")
@click.option("--repeat", type=click.IntRange(1, 10), default=1, show_default=True,
              help="Train each variant N times to measure run-to-run noise.")
@click.option("--force", is_flag=True, help="Redo every stage of every variant.")
@click.option("--reuse", is_flag=True, help="Keep finished trainings instead of training every variant again "
              "now; the report names each variant whose figures come from an earlier run.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--host", help="Ollama server (default: recipe, then $OLLAMA_HOST, then 127.0.0.1:11434).")
@click.option("--cpu", is_flag=True, help="Train on the CPU even if a GPU is present.")
@click.option("--no-eval", is_flag=True, help="Skip the recipe's eval suite.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def compare(recipe: Path, variants: str, repeat: int, force: bool, reuse: bool, runs_dir: Path, host: str | None,
            cpu: bool, no_eval: bool, as_json: bool) -> None:
    """Build RECIPE with each training backend and report the measured differences."""
    from ollama_ft.compare import compare as run_compare
    from ollama_ft.compare import parse_variants
    from ollama_ft.console import RichReporter, compare_table, stderr_console
    from ollama_ft.pipeline import BuildOptions
    from ollama_ft.recipe import load_recipe

    names = parse_variants(variants)
    loaded = load_recipe(recipe)
    console = stderr_console()
    reporter = RichReporter(console)
    try:
        report = run_compare(loaded, names, BuildOptions(force=force, runs_root=runs_dir, host=host,
                                                          device="cpu" if cpu else "auto", skip_eval=no_eval,
                                                          reporter=reporter), repeat=repeat, reuse=reuse)
    finally:
        reporter.close()
    if as_json:
        _print_json(report)
    else:
        console.print(compare_table(report))
        for line in report["verdicts"]:
            console.print(f"  • {line}")
        console.print(f"report: {report['out_dir']}/compare.md (and compare.json, *.png)")
    if report.get("failed"):
        for variant, message in report["failed"].items():
            console.print(f"[red]error:[/] {variant} did not finish: {message}")
        raise SystemExit(1)


@main.command("eval")
@click.argument("model")
@click.option("--suite", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Eval suite (default: the bundled evals/turkish-core.toml).")
@click.option("--baseline", help="Another Ollama model to compare against (per-category delta).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--host", help="Ollama server (default: $OLLAMA_HOST, then 127.0.0.1:11434).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the Markdown and JSON reports (default: runs/eval/MODEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--sample", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run a seeded sample of N cases, each category keeping its share.")
def eval_command(model: str, suite: Path | None, baseline: str | None, concurrency: int, host: str | None,
                 out: Path | None, as_json: bool, sample: int | None) -> None:
    """Run an eval suite against MODEL (any model in the Ollama server)."""
    from ollama_ft.console import RichReporter, eval_table, stderr_console
    from ollama_ft.eval_suite import load_suite
    from ollama_ft.evaluate import compare_reports, evaluate_model, write_report
    from ollama_ft.ollama_server import normalise_host
    from ollama_ft.resources import bundled

    suite_path = suite or bundled("evals", "turkish-core.toml")
    loaded = load_suite(suite_path)
    if sample:
        loaded = loaded.sample(sample)
    host = normalise_host(host)
    console = stderr_console()
    reporter = RichReporter(console)
    try:
        report = evaluate_model(host, model, loaded, concurrency=concurrency,
                                progress=lambda d, t: reporter.progress(model, d, t))
        base_report = None
        if baseline:
            base_report = evaluate_model(host, baseline, loaded, concurrency=concurrency,
                                         progress=lambda d, t: reporter.progress(baseline, d, t))
    finally:
        reporter.close()
    out = out or Path("runs") / "eval" / model.replace("/", "_").replace(":", "_")
    md, js = write_report(report, out, baseline=base_report)
    if as_json:
        data = report.model_dump()
        if base_report is not None:
            data["baseline"] = base_report.model_dump()
            data["delta"] = compare_reports(report, base_report)
        _print_json(data)
        return
    console.print(eval_table(report, baseline=base_report))
    console.print(f"reports: {md}  {js}")


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", help="Ollama server to check (default: recipe, then $OLLAMA_HOST).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(recipe: Path | None, host: str | None, runs_dir: Path, as_json: bool) -> None:
    """Check what this machine has for each stage; with RECIPE, exit 1 if it lacks what RECIPE needs."""
    from dataclasses import asdict

    from ollama_ft.console import doctor_table, stderr_console
    from ollama_ft.doctor import doctor_exit_code, run_doctor
    from ollama_ft.recipe import load_recipe

    loaded = load_recipe(recipe) if recipe else None
    checks = run_doctor(loaded, host=host or (loaded.ollama.host if loaded else None), runs_dir=runs_dir)
    if as_json:
        _print_json([asdict(c) for c in checks])
    else:
        stderr_console().print(doctor_table(checks))
    sys.exit(doctor_exit_code(checks, loaded))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--device-gib", type=float, help="Memory of the training device in GiB (default: detected).")
@click.option("--num-processes", type=click.IntRange(1), default=1, show_default=True,
              help="Per-device figures for `build --launcher accelerate --num-processes N`.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(recipe: Path, device_gib: float | None, num_processes: int, as_json: bool) -> None:
    """Estimate the memory and disk RECIPE needs (weights, gradients, optimizer, activations)."""
    from dataclasses import asdict

    from ollama_ft.console import estimate_table, stderr_console
    from ollama_ft.estimate import estimate_memory, training_device_bytes
    from ollama_ft.recipe import load_recipe

    loaded = load_recipe(recipe, check_files=False)
    device_bytes, cpu = (int(device_gib * 2**30), False) if device_gib else training_device_bytes()
    est = estimate_memory(loaded, device_bytes=device_bytes, cpu=cpu, num_processes=num_processes)
    if as_json:
        _print_json(asdict(est))
        return
    console = stderr_console()
    console.print(estimate_table(est))
    if est.warning:
        console.print(f"[yellow]warning:[/] {est.warning}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default=Path("recipe.toml"))
@click.option("--base", help="Base model: hub id, local folder, or tiny:llama (default).")
@click.option("--data", help="Training data file.")
@click.option("--name", help="Model name in Ollama.")
def init(path: Path, base: str | None, data: str | None, name: str | None) -> None:
    """Write a commented recipe to PATH (never overwrites)."""
    from ollama_ft.init_recipe import write_init_recipe

    written = write_init_recipe(path, base=base, data=data, name=name)
    click.echo(f"wrote {written}; next: ollama-ft build {written}")


@main.command("install-ollama")
@click.option("--version", "version", default=None, metavar="X.Y.Z",
              help="the release to build (default: the pinned floor; tested: 0.11.4 and 0.24.0)")
def install_ollama_command(version: str | None) -> None:
    """Build Ollama from its Go module into the cache (default: the pinned v0.11.4); print its path."""
    from ollama_ft.ollama_server import OLLAMA_VERSION, install_ollama

    click.echo(install_ollama(lambda line: click.echo(line, err=True), version=version or OLLAMA_VERSION))


@main.command("install-llama-tools")
def install_llama_tools_command() -> None:
    """Build llama.cpp's llama-imatrix, llama-quantize and llama-perplexity into the cache; print the folder.

    Needed for export.imatrix and for choosing the quantization by measured quality."""
    from ollama_ft.llama_tools import install_tools

    click.echo(install_tools(lambda line: click.echo(line, err=True)))


@main.command("tiny-base")
@click.argument("shape", type=click.Choice(["llama", "llama-1b"]))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def tiny_base(shape: str, out_dir: Path) -> None:
    """Build a built-in tiny base model (deterministic) into OUT_DIR."""
    from ollama_ft.tiny import build_tiny_base

    click.echo(build_tiny_base(shape, out_dir))


if __name__ == "__main__":
    main()
