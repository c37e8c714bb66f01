"""What `ollama-ft` shows on the terminal: stage progress, the summary of a build, and the tables of
doctor, estimate, eval and compare, drawn with rich from the data the library returns.

    from ollama_ft.console import estimate_table, stderr_console
    stderr_console().print(estimate_table(estimate_memory(recipe)))

Only ollama_ft/cli.py imports this module, and only inside a command, so `ollama-ft --help` never
loads rich; no other module imports rich (tests/test_presentation.py checks it). Files written
into a run folder (eval-report.md, compare.md) are the library's, built from the same rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ollama_ft.formatting import format_bytes

if TYPE_CHECKING:
    from ollama_ft.doctor import Check
    from ollama_ft.estimate import Estimate
    from ollama_ft.evaluate import EvalReport
    from ollama_ft.pipeline import BuildResult


def stderr_console() -> Console:
    # stderr: stdout stays free for the paths and JSON that scripts read.
    return Console(stderr=True)


class RichReporter:
    """Shows each stage as it runs, with a progress bar for training and eval."""

    def __init__(self, console: Console, prefix: str = ""):
        self.console = console
        self.prefix = prefix
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                            transient=True)
        self.tasks: dict[str, int] = {}
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.bar.start()
            self.started = True

    def _stop(self) -> None:
        if self.started:  # stopping a bar that never started would print an empty line
            self.bar.stop()
            self.started = False

    def stage(self, name: str, status: str, detail: str = "") -> None:
        label = f"{self.prefix}{name}"
        if status == "start":
            self.console.print(f"[bold]▶ {label}[/]")
        elif status == "skip":
            self.console.print(f"[dim]· {label}: up to date, skipped[/]")
        elif status == "warn":
            self.console.print(f"[yellow]warning ({label}):[/] {detail}")
        elif status == "done":
            if name in self.tasks:
                self.bar.remove_task(self.tasks.pop(name))
                if not self.tasks:
                    self._stop()
            self.console.print(f"[green]✔ {label}[/] {detail}")

    def progress(self, name: str, done: int, total: int, detail: str = "") -> None:
        if name not in self.tasks:
            self._start()
            self.tasks[name] = self.bar.add_task(f"{self.prefix}{name}", total=total, detail=detail)
        self.bar.update(self.tasks[name], completed=done, total=total, detail=detail)

    def close(self) -> None:
        self._stop()


def print_build_summary(console: Console, result: BuildResult, backend: str) -> None:
    """What a finished build made, where it is, and the command to chat with it."""
    trained, quantized = result.trained.result, result.quantized
    console.print()
    console.print(f"[bold]Built[/] {result.model_name} in {result.run_dir}  "
                  f"(ran {len(result.ran)} stage(s), skipped {len(result.skipped)})")
    console.print(f"  train: {trained.steps} steps, final loss {trained.final_loss or 0:.4f}, "
                  f"{trained.tokens_per_second:.0f} tokens/s, backend {backend}")
    console.print(f"  gguf:  {quantized.gguf_path} ({format_bytes(quantized.size_bytes)}, {quantized.quant_type})")
    shipped = quantized.shipped_figures
    if shipped:
        console.print(f"  quant: {quantized.quant_type} is the smallest of {quantized.candidate_count} within "
                      f"the floor (mean KLD {shipped['mean_kld']:.4f}, top-1 {shipped['top1_agreement']:.1%})"
                      f"  → {quantized.report_md}")
    console.print(f"  modelfile: {result.modelfile.path}")
    if result.evaluated:
        console.print(f"  eval: pass rate {result.evaluated.pass_rate:.0%}  → {result.evaluated.report_md}")
    console.print(f"\n  Chat with it:  [bold cyan]ollama run {result.model_name}[/]"
                  + (f"   (OLLAMA_HOST={result.host})" if not result.host.endswith(":11434") else ""))


def compare_table(report: dict[str, Any]) -> Table:
    """The figures of `ollama_ft.report.figure_rows`, one column per variant."""
    from ollama_ft.report import figure_rows

    table = Table(title="ollama-ft compare")
    table.add_column("figure")
    for v in report["variants"]:
        table.add_column(v, justify="right")
    for row in figure_rows(report):
        table.add_row(*row)
    return table


def eval_table(report: EvalReport, baseline: EvalReport | None = None) -> Table:
    """Pass rates per category (and the change from `baseline`, if given), as in eval-report.md."""
    from ollama_ft.evaluate import summary_columns, summary_rows

    table = Table(title=f"{report.model} on {report.suite}")
    for col in summary_columns(baseline):
        table.add_column(col, justify="left" if col == "category" else "right")
    rows = summary_rows(report, baseline)
    for i, row in enumerate(rows):
        # A line above the last three rows: (held-in), (held-out) and (overall) sum up the categories.
        table.add_row(*row, end_section=i == len(rows) - 4)
    return table


def doctor_table(checks: list[Check]) -> Table:
    marks = {"ok": ("✔ ok", "green"), "warning": ("! warning", "yellow"), "missing": ("✘ missing", "red")}
    table = Table(title="ollama-ft doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column)
    for c in checks:
        label, style = marks[c.status]
        # Text, not markup: details hold paths and versions with brackets and colons.
        table.add_row(Text(c.name), Text(label, style=style), Text(c.detail), Text(c.fix, style="dim"))
    return table


def estimate_table(est: Estimate) -> Table:
    """Memory rows, total, RAM after training, disk rows; the warning (if any) and notes as its caption."""
    # Text, not markup: a base such as "tiny:llama" would otherwise become an emoji.
    table = Table(title=Text(f"Estimate for {est.base}: {est.parameters / 1e6:,.1f}M parameters, "
                             f"{est.trainable_parameters / 1e6:,.2f}M trainable"))
    table.add_column("what")
    table.add_column("size", justify="right")
    for name, value in est.breakdown.items():
        table.add_row(name, format_bytes(value))
    fit = {None: "", True: " [green](fits)[/]", False: " [red](does not fit)[/]"}[est.fits]
    table.add_row("[bold]training memory[/]", f"[bold]{format_bytes(est.total_bytes)}[/]{fit}", end_section=True)
    for name, value in est.host_breakdown.items():
        table.add_row(f"RAM: {name}", format_bytes(value))
    table.add_row("[bold]RAM after training (peak)[/]", f"[bold]{format_bytes(est.host_bytes)}[/]", end_section=True)
    for name, value in est.disk_breakdown.items():
        table.add_row(f"disk: {name}", format_bytes(value))
    table.add_row("[bold]disk[/]", f"[bold]{format_bytes(est.disk_bytes)}[/]")
    caption = Text()
    if est.warning:
        caption.append(est.warning + "\n", style="red")
    caption.append("\n".join(est.notes))
    table.caption = caption if caption.plain.strip() else None
    return table
