"""B1–B4: training throughput of each backend on one recipe, measured side by side in one run.

    python -m benchmarks.train_throughput --shape llama --steps 12            # CPU, tiny (CI-sized)
    python -m benchmarks.train_throughput --shape llama-1b --steps 40 --seq 1750 \
        --variants peft,unsloth,peft-qlora,unsloth-qlora --optim adamw_8bit    # GPU, 1B shape
    python -m benchmarks.train_throughput --variants peft,peft+padding_free,peft+fused_lora \
        --data data/turkish-demo.jsonl --batch 16 --accum 1                 # switches, varied lengths

Each variant trains through the same code path as `ollama-ft build` (ollama_ft.train → a worker
subprocess per backend) on the same tokenised examples and seed. Reported per variant: non-pad
tokens/s after `--warmup` steps, peak memory, final loss; B1 = PEFT ÷ Unsloth, B2 = MFU on the
4N (and 6N with checkpointing) basis against the device's bf16 dense peak, B4 = ollama-ft's
Unsloth backend ÷ a bare Unsloth script (benchmarks/bare_unsloth.py) with identical settings.

A variant `peft+SWITCH[+SWITCH]` turns on the PEFT backend's speed switches (ollama_ft/backends/
speedups.py); plain variants run with none, whatever the device's defaults. Each switched variant
is reported against its plain one: tokens/s and memory ratios, and the largest relative
difference between their per-step loss curves (same data order). B3 here is measured on the
batches training computed: non-pad ÷ computed positions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}   # dense bf16, SXM; the 4N/6N MFU basis
PROFILE_ENVIRONMENT = ("OLLAMA_FT_TRAINER_CALLBACKS", "PYTHONPATH", "OLLAMA_FT_PROFILE", "OLLAMA_FT_PROFILE_START",
                       "OLLAMA_FT_PROFILE_STEPS")


def device_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def prepare(shape: str, seq: int, count: int, work: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from benchmarks.long_chats import long_chats
    from ollama_ft.chat_templates import load_family
    from ollama_ft.tiny import ensure_tiny_base

    base = ensure_tiny_base(f"tiny:{shape}", work / "_bases")
    tok = AutoTokenizer.from_pretrained(base)
    data = work / f"long-{seq}.jsonl"
    if not data.exists():
        rows = long_chats(tok, load_family("chatml").jinja, count=count, target_tokens=seq)
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return base, data


def run_variant(variant: str, base: Path, data: Path, args, work: Path) -> dict:
    from ollama_ft.backends import TrainJob
    from ollama_ft.recipe import ModelSection, TrainSection
    from ollama_ft.chat_templates import load_family
    from ollama_ft.train import TrainInput, train

    name, *switches = variant.split("+")     # "peft+padding_free": the PEFT backend with one switch on
    backend, _, mode = name.partition("-")
    qlora = mode == "qlora"
    folder = work / variant
    shutil.rmtree(folder, ignore_errors=True)  # a leftover checkpoint would be resumed, not measured
    examples = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    job = TrainJob(
        backend=backend, base_path=str(base), examples_path=str(folder / "examples.jsonl"), validation_path=None,
        chat_jinja=load_family("chatml").jinja, output_dir=str(folder / "trained"),
        checkpoint_dir=str(folder / "checkpoints"),
        model=ModelSection(base=str(base), max_seq_length=args.seq + 64, dtype=args.dtype,
                           load_in_4bit=qlora).model_dump(),
        train=TrainSection(method="qlora" if qlora else "lora", max_steps=args.steps, optimizer=args.optim,
                           batch_size=args.batch, gradient_accumulation=args.accum,
                           gradient_checkpointing=not args.no_checkpointing, assistant_only_loss=True,
                           logging_steps=1, save_steps=10_000, speedups=switches).model_dump(),
        assistant_only_loss=True, log_path=str(folder / "train.log"))
    profiled = variant in args.profile.split(",")
    saved = {name: os.environ.get(name) for name in PROFILE_ENVIRONMENT}
    if profiled:   # the worker loads benchmarks/profiling.py's callback, which reads the rest
        # The last two warm-up steps: the profiler's overhead stays out of the timed steps.
        os.environ.update(OLLAMA_FT_TRAINER_CALLBACKS="benchmarks.profiling:profiler_from_environment",
                          PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                          OLLAMA_FT_PROFILE=str(folder / "profile"),
                          OLLAMA_FT_PROFILE_START=str(max(1, args.warmup - 2)), OLLAMA_FT_PROFILE_STEPS="2")
    start = time.perf_counter()
    try:
        result = train(TrainInput(job, examples, None, folder))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    wall = time.perf_counter() - start
    steady = result.steady_tokens_per_second(args.warmup)
    row = {"variant": variant, "backend": backend, "qlora": qlora, "steps": result.steps,
           "tokens_per_second": steady, "tokens_per_second_all_steps": result.tokens_per_second,
           "peak_memory_gib": result.peak_memory_bytes / 2**30, "peak_memory_kind": result.peak_memory_kind,
           "final_loss": result.final_loss, "trainable_parameters": result.trainable_parameters,
           "total_parameters": result.total_parameters, "wall_seconds_incl_load": wall,
           "speedups": result.speedups, "padding_efficiency": result.padding_efficiency,
           "loss_curve": [h["loss"] for h in result.loss_history],
           "device": result.device_name, "versions": result.versions}
    if profiled and (folder / "profile" / "profile.json").exists():
        summary = json.loads((folder / "profile" / "profile.json").read_text())
        row["profile"] = {k: summary[k] for k in ("wall_seconds", "busy_fraction", "categories")}
        row["profile"]["top"] = summary["top"][:25]
    peak = device_peak(result.device_name)
    if peak:
        n = result.total_parameters
        row["mfu_4n"] = steady * 4 * n / peak
        row["mfu_6n"] = steady * 6 * n / peak
    return row


def run_bare_unsloth(base: Path, data: Path, args, work: Path) -> dict | None:
    out = work / "bare-unsloth.json"
    cmd = [sys.executable, "-m", "benchmarks.bare_unsloth", str(base), str(data), str(out), str(args.steps),
           str(args.seq + 64), str(args.batch), str(args.accum), args.optim, str(args.warmup)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.read_text())


def table(rows: list[dict], ratios: dict) -> str:
    lines = ["| variant | non-pad tokens/s (steady) | peak memory GiB | final loss | MFU 4N | MFU 6N |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mfu4 = f"{r['mfu_4n']:.1%}" if "mfu_4n" in r else "–"
        mfu6 = f"{r['mfu_6n']:.1%}" if "mfu_6n" in r else "–"
        lines.append(f"| {r['variant']} | {r['tokens_per_second']:,.0f} | {r['peak_memory_gib']:.2f} "
                     f"({r['peak_memory_kind']}) | {r['final_loss']:.4f} | {mfu4} | {mfu6} |")
    lines.append("")
    for r in rows:
        if "profile" in r:   # where the profiled steps' device time went
            prof = r["profile"]
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in prof["categories"].items())
            lines.append(f"- profile {r['variant']}: {prof['wall_seconds']:.2f} s wall for 2 steps, "
                         f"busy {prof['busy_fraction']:.0%}: {parts}")
    for k, v in ratios.items():
        lines.append(f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}")
    return "\n".join(lines)


def ratios_of(rows: list[dict]) -> dict:
    ok = {r["variant"]: r for r in rows if "error" not in r}
    ratios: dict = {}
    for mode in ("", "-qlora"):
        if f"peft{mode}" in ok and f"unsloth{mode}" in ok:
            ratios[f"B1 peft{mode} / unsloth{mode} tokens/s"] = ok[f"peft{mode}"]["tokens_per_second"] / ok[f"unsloth{mode}"]["tokens_per_second"]
            ratios[f"B1 peft{mode} / unsloth{mode} peak memory"] = ok[f"peft{mode}"]["peak_memory_gib"] / ok[f"unsloth{mode}"]["peak_memory_gib"]
    for variant, row in ok.items():
        # Each switch against the same variant without it, and whether the loss curve still agrees.
        plain = ok.get(variant.split("+")[0])
        if "+" in variant and plain and "loss_curve" in row:
            ratios[f"switch {variant} / {plain['variant']} tokens/s"] = row["tokens_per_second"] / plain["tokens_per_second"]
            ratios[f"switch {variant} / {plain['variant']} peak memory"] = row["peak_memory_gib"] / plain["peak_memory_gib"]
            ratios[f"switch {variant} max relative loss difference"] = max(
                (abs(a - b) / abs(b) for a, b in zip(row["loss_curve"], plain["loss_curve"])), default=0.0)
        if "padding_efficiency" in row:
            ratios[f"B3 {variant} non-pad / computed tokens"] = row["padding_efficiency"]
    if "bare-unsloth" in ok and "unsloth" in ok:
        ratios["B4 ollama-ft unsloth / bare unsloth tokens/s"] = ok["unsloth"]["tokens_per_second"] / ok["bare-unsloth"]["tokens_per_second"]
    return ratios


def write_report(rows: list[dict], args, final: bool) -> str:
    meta = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "python": platform.python_version(),
            "shape": args.shape, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "batch": args.batch, "accum": args.accum, "optim": args.optim, "seed": 42,
            "data": str(args.data or "generated long chats"), "complete": final,
            "gradient_checkpointing": not args.no_checkpointing, "command": " ".join(sys.argv)}
    ratios = ratios_of(rows)
    report = {"meta": meta, "rows": rows, "ratios": ratios}
    device = next((r["device"] for r in rows if "device" in r), "?")
    md = f"# Training throughput ({meta['date']}, {device})\n\n" + table(
        [r for r in rows if "error" not in r], ratios) + "\n\n```\n" + json.dumps(meta, indent=1) + "\n```\n"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_throughput.json").write_text(json.dumps(report, indent=2))
        (args.out / "train_throughput.md").write_text(md)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama", choices=["llama", "llama-1b"])
    p.add_argument("--variants", default="peft,unsloth")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--data", type=Path, default=None,
                   help="train on this JSONL (e.g. data/turkish-demo.jsonl) instead of generated ~--seq-token chats")
    p.add_argument("--bare-unsloth", action="store_true", help="also run B4's bare Unsloth script")
    p.add_argument("--profile", default="", help="comma-separated variants to profile for 2 steps after warm-up")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None, help="folder for train_throughput.{json,md}")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    count = args.steps * args.batch * args.accum + 8
    base, data = prepare(args.shape, args.seq, count, args.work)
    if args.data:   # real examples of varied length instead of the generated long chats
        data = args.data.resolve()
    rows: list[dict] = []
    for variant in args.variants.split(","):
        print(f"== {variant}", file=sys.stderr, flush=True)
        try:
            rows.append(run_variant(variant, base, data, args, args.work))
        except Exception as exc:  # one variant failing (e.g. 4-bit on CPU) must not hide the others
            print(f"{variant} failed: {exc}", file=sys.stderr)
            rows.append({"variant": variant, "error": str(exc)})
        # Written after every variant: a run stopped at a device time limit keeps what it measured.
        write_report(rows, args, final=False)
    if args.bare_unsloth and any(r.get("variant") == "unsloth" and "error" not in r for r in rows):
        bare = run_bare_unsloth(base, data, args, args.work)
        if bare:
            rows.append(bare)
    print(write_report(rows, args, final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
