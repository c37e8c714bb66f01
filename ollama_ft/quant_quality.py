"""What each quantization costs, measured: KL divergence, top-token agreement and perplexity
against the F16 GGUF on held-out text, with llama.cpp's `llama-perplexity`.

The F16 model's log-probabilities are computed once (`--kl-divergence-base`), then each candidate
is run over the same tokens (`--kl-divergence`). `choose` ships the smallest candidate that
meets the recipe's floor. The held-out text is plain message text: llama-perplexity does not parse
special tokens, so a rendered template would be scored as literal `<start_of_turn>` pieces.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ollama_ft.errors import StageError
from ollama_ft.formatting import markdown_table
from ollama_ft.llama_tools import run_tool

if TYPE_CHECKING:
    from ollama_ft.quantize import QuantizeOutput

MAX_CHUNKS = 8       # the F16 log-probabilities file holds vocabulary × scored tokens × 2 bytes


@dataclass(frozen=True)
class Reference:
    logits_file: Path
    context: int


@dataclass(frozen=True)
class QualityFigures:
    quant_type: str
    size_bytes: int
    mean_kld: float
    kld_p99: float
    top1_agreement: float    # share of tokens whose most likely next token is the F16 model's
    perplexity: float
    base_perplexity: float
    mean_kld_error: float = 0.0  # llama-perplexity's ± (one standard error of the mean)

    def meets(self, max_kld: float, min_top1: float | None) -> bool:
        return self.mean_kld <= max_kld and (min_top1 is None or self.top1_agreement >= min_top1)


def _figure(output: str, label: str, group: int = 1) -> float:
    """The number after `label:` on its own line (group 2: the number after its ±)."""
    match = re.search(rf"^{label}\s*:\s*([-+0-9.eE]+)(?:\s*±\s*([-+0-9.eE]+))?", output, re.MULTILINE)
    if match is None or match.group(group) is None:
        raise StageError(f"llama-perplexity printed no {label.replace(chr(92), '')!r} line")
    return float(match.group(group))


def parse_kld_output(output: str) -> dict[str, float]:
    """The figures of a `llama-perplexity --kl-divergence` run, from its summary lines."""
    return {"perplexity": _figure(output, r"Mean PPL\(Q\)"),
            "base_perplexity": _figure(output, r"Mean PPL\(base\)"),
            "mean_kld": _figure(output, r"Mean\s+KLD"),
            "mean_kld_error": _figure(output, r"Mean\s+KLD", group=2),
            "kld_p99": _figure(output, r"99\.0%\s+KLD"),
            "top1_agreement": _figure(output, r"Same top p") / 100}


def reference(f16_path: Path, text: str, out_file: Path, log_path: Path, chunks: int = MAX_CHUNKS) -> Reference:
    """The F16 model's log-probabilities over `text`, for every candidate to be compared against."""
    from ollama_ft.imatrix import context_for, count_tokens

    text_file = out_file.with_name("held-out.txt")
    text_file.write_text(text, encoding="utf-8")
    context = context_for(count_tokens(f16_path, text), "the held-out text",
                          "add a data.validation file, or list one quantization type")
    run_tool("llama-perplexity", ["-m", str(f16_path), "-f", str(text_file), "-c", str(context),
                                  "--chunks", str(chunks), "--kl-divergence-base", str(out_file)], log_path)
    if not out_file.exists():
        raise StageError("llama-perplexity wrote no F16 reference", f"see {log_path}")
    return Reference(out_file, context)


def measure(quant_type: str, gguf_path: Path, ref: Reference, log_path: Path) -> QualityFigures:
    output = run_tool("llama-perplexity", ["-m", str(gguf_path), "-c", str(ref.context),
                                           "--kl-divergence-base", str(ref.logits_file), "--kl-divergence"],
                      log_path)
    return QualityFigures(quant_type, gguf_path.stat().st_size, **parse_kld_output(output))


def choose(figures: list[QualityFigures], max_kld: float, min_top1: float | None) -> QualityFigures:
    """The smallest candidate that meets the floor; an error listing every figure when none does."""
    meeting = [f for f in figures if f.meets(max_kld, min_top1)]
    if meeting:
        return min(meeting, key=lambda f: f.size_bytes)
    measured = ", ".join(f"{f.quant_type} KLD {f.mean_kld:.4f} top-1 {f.top1_agreement:.1%}" for f in figures)
    floor = f"export.max_kld = {max_kld}" + (f" and export.min_top1 = {min_top1}" if min_top1 is not None else "")
    raise StageError(f"no quantization meets {floor}: {measured}",
                     "add a larger type such as q8_0 to export.quantization or loosen the floor, then rerun "
                     "with --from quantize (training is kept)")


def render_markdown(figures: list[QualityFigures], chosen: str, floor: str, imatrix: str,
                    pass_rates: dict[str, float] | None = None) -> str:
    """The size-vs-quality table; with `pass_rates` (eval.candidates) each type's eval pass rate too."""
    rates = pass_rates or {}
    head = ["type", "size (MiB)", "mean KLD", "KLD p99", "top-1 agreement", "perplexity"]
    rows = []
    for f in sorted(figures, key=lambda f: f.size_bytes):
        row = [f"{f.quant_type}{' ✓' if f.quant_type == chosen else ''}", f"{f.size_bytes / 2**20:.1f}",
               f"{f.mean_kld:.5f} ± {f.mean_kld_error:.5f}", f"{f.kld_p99:.4f}", f"{f.top1_agreement:.2%}",
               f"{f.perplexity:.3f}"]
        if rates:
            row.append(f"{rates[f.quant_type]:.1%}" if f.quant_type in rates else "–")
        rows.append(row)
    lines = ["# Quantization by quality\n", f"Importance matrix: {imatrix}. Floor: {floor}. "
             f"Shipped: **{chosen}**. Reference: F16 perplexity {figures[0].base_perplexity:.3f}.\n",
             *markdown_table(head + (["eval pass rate"] if rates else []), rows)]
    return "\n".join(lines) + "\n"


def floor_text(max_kld: float, min_top1: float | None) -> str:
    return f"mean KLD ≤ {max_kld:g}" + (f", top-1 ≥ {min_top1:.0%}" if min_top1 is not None else "")


def add_pass_rates(quality: dict, pass_rates: dict[str, float]) -> Path:
    """Rewrite a build's quant-quality.md (its `quantize.quality` record) with the eval pass rates."""
    figures = [QualityFigures(**record) for record in quality["candidates"]]
    md = Path(quality["report_md"])
    md.write_text(render_markdown(figures, quality["chosen"], floor_text(quality["max_kld"], quality["min_top1"]),
                                  quality.get("imatrix", "none"), pass_rates), encoding="utf-8")
    return md


def write_plot(figures: list[QualityFigures], chosen: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for f in figures:
        ax.scatter(f.size_bytes / 2**20, f.mean_kld, color="tab:red" if f.quant_type == chosen else "tab:blue")
        ax.annotate(f.quant_type, (f.size_bytes / 2**20, f.mean_kld), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("GGUF size (MiB)")
    ax.set_ylabel("mean KL divergence vs F16")
    ax.set_yscale("log")
    ax.set_title("size vs quality (red: shipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def as_records(figures: list[QualityFigures]) -> list[dict]:
    return [asdict(f) for f in figures]


@dataclass(frozen=True)
class ChoiceInput:
    f16_path: Path
    candidates: list[str]
    held_out_text: str
    folder: Path                 # candidates, the table and the plot are written here
    max_kld: float
    min_top1: float | None
    imatrix: Path | None = None
    imatrix_label: str = "none"
    keep_candidates: bool = False   # eval.candidates: every candidate is registered and evaluated later


@dataclass(frozen=True)
class ChoiceOutput:
    chosen: "QuantizeOutput"
    figures: list[QualityFigures]
    report_md: Path
    plot: Path
    kept: dict[str, Path]        # candidate type -> GGUF, when keep_candidates


def quantize_by_quality(inp: ChoiceInput) -> ChoiceOutput:
    """Make every candidate, measure each against the F16 model, keep the smallest that meets the floor."""
    from ollama_ft.quantize import QuantizeInput, quantize_gguf

    log = inp.folder / "quantize.log"
    logits = inp.folder / "f16-logprobs.kld"
    made, figures = {}, []
    try:
        ref = reference(inp.f16_path, inp.held_out_text, logits, log)
        for quant_type in inp.candidates:
            made[quant_type] = quantize_gguf(QuantizeInput(inp.f16_path, inp.folder / f"model-{quant_type}.gguf",
                                                           quant_type, log_path=log, imatrix=inp.imatrix))
            figures.append(measure(quant_type, made[quant_type].gguf_path, ref, log))
        best = choose(figures, inp.max_kld, inp.min_top1)
    finally:
        logits.unlink(missing_ok=True)
    for quant_type, out in made.items():
        if quant_type != best.quant_type and not inp.keep_candidates:
            out.gguf_path.unlink(missing_ok=True)   # measured and recorded; only the shipped one is kept
    md = inp.folder / "quant-quality.md"
    md.write_text(render_markdown(figures, best.quant_type, floor_text(inp.max_kld, inp.min_top1), inp.imatrix_label),
                  encoding="utf-8")
    plot = write_plot(figures, best.quant_type, inp.folder / "quant-quality.png")
    return ChoiceOutput(made[best.quant_type], figures, md, plot,
                        {q: out.gguf_path for q, out in made.items() if inp.keep_candidates})
