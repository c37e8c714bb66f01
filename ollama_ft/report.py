"""The comparison report: every figure read from the variants' measured metrics, side by side,
with the run-to-run noise when repeats were run, as compare.json, compare.md and PNG plots.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ollama_ft.formatting import markdown_table
from ollama_ft.runs import atomic_write_json, atomic_write_text

# (key in a row, label, format) in the order the table shows them.
COLUMNS = [
    ("train_seconds", "training wall time (s)", "{:.1f}"),
    ("tokens_per_second", "train tokens/s (non-pad)", "{:,.0f}"),
    ("peak_memory_gib", "peak memory (GiB)", "{:.2f}"),
    ("final_loss", "final train loss", "{:.4f}"),
    ("eval_loss", "validation loss", "{:.4f}"),
    ("trainable_parameters", "trainable parameters", "{:,}"),
    ("trained_size_mib", "adapter / trained weights (MiB)", "{:.2f}"),
    ("merge_seconds", "merge (s)", "{:.1f}"),
    ("convert_seconds", "convert (s)", "{:.1f}"),
    ("quantize_seconds", "quantize (s)", "{:.2f}"),
    ("gguf_mib", "GGUF size (MiB)", "{:.2f}"),
    ("quant_type", "quantization shipped", "{}"),
    ("quant_mean_kld", "mean KLD vs F16 (held-out)", "{:.5f}"),
    ("ollama_load_seconds", "Ollama load (s)", "{:.2f}"),
    ("ollama_tokens_per_second", "Ollama generation tokens/s", "{:.1f}"),
    ("eval_pass_rate", "eval pass rate", "{:.1%}"),
    ("eval_held_in_pass_rate", "eval held-in pass rate", "{:.1%}"),
    ("eval_held_out_pass_rate", "eval held-out pass rate", "{:.1%}"),
]


def trained_when(result) -> str | None:
    """None when this build trained the variant, else when the reused training finished."""
    import time

    if "train" in result.ran:
        return None
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(result.trained.finished_at))


def variant_row(result, speed: dict[str, float]) -> dict[str, Any]:
    t = result.trained.result
    row = {
        "model": result.model_name, "run_dir": str(result.run_dir), "training_reused_from": trained_when(result),
        "train_seconds": t.train_seconds, "tokens_per_second": t.tokens_per_second,
        "tokens_seen": t.tokens_seen, "steps": t.steps,
        "peak_memory_gib": t.peak_memory_bytes / 2**30, "peak_memory_kind": t.peak_memory_kind,
        "final_loss": t.final_loss, "eval_loss": t.eval_loss,
        "trainable_parameters": t.trainable_parameters, "total_parameters": t.total_parameters,
        "trained_size_mib": result.trained.trained_size_bytes / 2**20, "device": t.device_name,
        "merge_seconds": result.merged.seconds, "convert_seconds": result.converted.seconds,
        "quantize_seconds": result.quantized.seconds, "gguf_mib": result.quantized.size_bytes / 2**20,
        "ollama_load_seconds": speed["load_seconds"], "ollama_tokens_per_second": speed["generation_tokens_per_second"],
        "loss_history": t.loss_history, "data_order_sha256": t.data_order_sha256, "versions": t.versions,
        "quant_type": result.quantized.quant_type,
    }
    if result.quantized.shipped_figures:
        row["quant_mean_kld"] = result.quantized.shipped_figures["mean_kld"]
    if result.evaluated:
        row["eval_pass_rate"] = result.evaluated.pass_rate
        row["eval_held_in_pass_rate"] = result.evaluated.held_in_pass_rate
        row["eval_held_out_pass_rate"] = result.evaluated.held_out_pass_rate
        row["eval_by_category"] = result.evaluated.by_category
    return row


def _noise(runs) -> dict[str, float]:
    """Standard deviation over repeats of the figures that vary run to run."""
    if len(runs) < 2:
        return {}
    out = {}
    for key, pick in (("tokens_per_second", lambda r: r.trained.result.tokens_per_second),
                      ("train_seconds", lambda r: r.trained.result.train_seconds),
                      ("final_loss", lambda r: r.trained.result.final_loss)):
        values = [pick(r) for r in runs]
        out[key] = statistics.stdev(values)
        out[f"{key}_runs"] = values  # type: ignore[assignment]
    return out


def build_report(recipe, results: dict[str, list], speeds: dict[str, dict], env: dict) -> dict[str, Any]:
    rows = {v: variant_row(runs[0], speeds[v]) for v, runs in results.items()}
    noise = {v: _noise(runs) for v, runs in results.items()}
    verdicts = [f"{v}: training figures reused from a build finished {r['training_reused_from']}, not measured "
                "in this run (compare without --reuse measures every variant now)"
                for v, r in rows.items() if r["training_reused_from"]]
    names = list(rows)
    if len(names) >= 2:
        a, b = names[0], names[1]
        for key in ("tokens_per_second", "final_loss", "train_seconds"):
            diff = abs(rows[a][key] - rows[b][key])
            spread = max(noise[a].get(key, 0.0), noise[b].get(key, 0.0))
            if spread:
                within = diff <= 2 * spread
                verdicts.append(f"{key}: {a} {rows[a][key]:.4g} vs {b} {rows[b][key]:.4g} — "
                                + ("within run-to-run noise" if within else "larger than run-to-run noise")
                                + f" (2σ = {2 * spread:.3g})")
            else:
                verdicts.append(f"{key}: {a} {rows[a][key]:.4g} vs {b} {rows[b][key]:.4g} — noise not measured "
                                "(rerun with --repeat 2 or more)")
        same_order = rows[a]["data_order_sha256"] == rows[b]["data_order_sha256"] != ""
        verdicts.append(f"data order: {'identical' if same_order else 'DIFFERENT'} for {a} and {b} (seed {recipe.train.seed})")
        verdicts.append(f"final loss apart by {abs(rows[a]['final_loss'] - rows[b]['final_loss']):.4f} "
                        f"({abs(rows[a]['final_loss'] - rows[b]['final_loss']) / max(rows[b]['final_loss'], 1e-9):.1%})")
    return {"recipe": str(recipe.path), "seed": recipe.train.seed, "environment": env, "variants": rows,
            "noise": noise, "repeats": {v: len(r) for v, r in results.items()}, "verdicts": verdicts}


def figure_rows(report: dict[str, Any]) -> list[list[str]]:
    """[label, one cell per variant] for each figure some variant has, then where its training was measured.
    compare.md and the terminal's table show these rows."""
    names = list(report["variants"])
    rows = []
    for key, label, fmt in COLUMNS:
        cells = []
        for v in names:
            value = report["variants"][v].get(key)
            cells.append("–" if value is None else fmt.format(value))
        if any(c != "–" for c in cells):
            rows.append([label, *cells])
    rows.append(["training measured", *(
        f"reused ({report['variants'][v]['training_reused_from']})" if report["variants"][v].get("training_reused_from")
        else "this run" for v in names)])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    names = list(report["variants"])
    lines = [f"# ollama-ft compare: {', '.join(names)}", "",
             f"Recipe `{report['recipe']}`, seed {report['seed']}, repeats "
             + ", ".join(f"{v}×{n}" for v, n in report["repeats"].items()) + ".", ""]
    lines += markdown_table(["figure", *names], figure_rows(report))
    if report.get("failed"):
        lines += ["", "## Variants that did not finish", ""]
        lines += [f"- {variant}: {message}" for variant, message in report["failed"].items()]
    lines += ["", "## What differs beyond noise", ""] + [f"- {v}" for v in report["verdicts"]]
    categories = sorted({c for r in report["variants"].values() for c in (r.get("eval_by_category") or {})})
    if categories:
        lines += ["", "## Eval pass rate by category", ""]
        lines += markdown_table(["category", *names], [
            [c, *(f"{(report['variants'][v].get('eval_by_category') or {}).get(c, float('nan')):.1%}" for v in names)]
            for c in categories])
    env = report["environment"]
    lines += ["", "## Environment", "", "```", json.dumps(env, indent=1), "```", "",
              "Plots: loss.png, throughput.png, memory.png, stages.png"]
    return "\n".join(lines) + "\n"


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    names = list(rows)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for v in names:
        hist = rows[v]["loss_history"]
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=v)
    ax.set(xlabel="step", ylabel="train loss", title="Loss curves (same data, same seed)")
    ax.legend()
    paths.append(_save(fig, out_dir / "loss.png"))

    for key, label, file in (("tokens_per_second", "train tokens/s (non-pad)", "throughput.png"),
                             ("peak_memory_gib", "peak memory (GiB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(names, [rows[v][key] for v in names], color="#4c72b0")
        ax.set(ylabel=label, title=label)
        paths.append(_save(fig, out_dir / file))

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(names)
    for key, label in (("train_seconds", "train"), ("merge_seconds", "merge"), ("convert_seconds", "convert"),
                       ("quantize_seconds", "quantize")):
        values = [rows[v][key] for v in names]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, values)]
    ax.set(ylabel="seconds", title="Stage times")
    ax.legend()
    paths.append(_save(fig, out_dir / "stages.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(report: dict[str, Any], results, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out_dir)
    atomic_write_json(out_dir / "compare.json", report)
    atomic_write_text(out_dir / "compare.md", render_markdown(report))
    return {"json": out_dir / "compare.json", "md": out_dir / "compare.md", **{p.stem: p for p in plots}}
