"""B5: convert and quantize wall time ÷ plain disk I/O of the same bytes, and peak RSS ÷ model bytes.

    python -m benchmarks.stage_io [--shape llama] [--out DIR]          # CPU, tiny base
    python -m benchmarks.stage_io --shape llama-1b --out DIR           # GPU machine, 1B shape

Each stage runs in a child process, as in a build, started by a small launcher process that
reaps it with `os.wait4` and reports its `ru_maxrss`. The launcher is there because Linux carries
the high-water RSS of the process that execs over into the new program: a child started straight
from a parent that had loaded torch would report torch's memory as its own.
The child times its imports and its work apart, so every ratio is reported twice:
- incl.: the child's whole wall time (interpreter start + imports + work + exit) and its peak RSS
  over its whole life (ru_maxrss; exit can add: torch's teardown raised it ~110 MB here);
- excl.: the work alone, and the peak RSS at the end of the work (VmHWM) minus the RSS held right
  after the imports (VmRSS): an upper bound on what the work itself added.
convert = llama.cpp's converter as `ollama_ft.convert.run_converter` runs it (in the build's own
process) to F16, fed what the merge stage writes: the tiny base passed through
`ollama_ft.merge.cast_for_export` (float16) and saved. That cast moved out of the converter into
the merge stage, so its time is measured too (`prepare.cast_seconds`) and added in
`time_ratio_excl_with_cast`. In a build torch and transformers are loaded before convert starts,
so the child loads them first (`preload_seconds`) and `time_ratio_in_build` counts what the stage
adds: the converter's own imports, its work and the cast. `convert_to_gguf`'s logit check
afterwards is a verification step and not part of B5.
quantize = `ollama_ft.quantize.quantize_gguf` to Q4_K_M.
The I/O reference, measured in the same run on the same folder: read the stage's input and write
an fsynced file (convert: as many bytes as the safetensors; quantize: the Q4_K_M file's size).
Inputs just written sit in the page cache for the stage and the reference alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 8 << 20


def io_seconds(reads: list[Path], write_bytes: int, folder: Path, repeats: int = 3) -> float:
    """Median time to read `reads` and write `write_bytes` to a new file, fsynced."""
    buf = bytearray(os.urandom(CHUNK))  # random, so no layer below can shortcut zeros
    probe = folder / ".io-probe"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in reads:
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        with open(probe, "wb", buffering=0) as fh:
            left = write_bytes
            while left > 0:
                left -= fh.write(memoryview(buf)[: min(left, CHUNK)])
            os.fsync(fh.fileno())
        times.append(time.perf_counter() - start)
        probe.unlink()
    return statistics.median(times)


def status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process, from /proc/self/status (kB there)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(stage: str, src: str, out: str) -> None:
    """Runs inside the child: import what the stage needs, then do the work; print timings."""
    if stage == "prepare":
        prepare(Path(src), Path(out))
        return
    t0 = time.perf_counter()
    if stage == "convert":
        import torch  # noqa: F401  (a build's merge stage has loaded these before convert runs)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    t1 = time.perf_counter()
    if stage == "convert":
        import conversion  # noqa: F401  (the converter's model classes and gguf)

        from ollama_ft.convert import run_converter
    else:
        import gguf  # noqa: F401  (read_gguf_types reads the result back with it)
        import llama_cpp  # noqa: F401

        from ollama_ft.quantize import QuantizeInput, quantize_gguf
    t2 = time.perf_counter()
    rss_after_imports = status_bytes("VmRSS")
    if stage == "convert":
        run_converter(Path(src), Path(out), Path(out).with_suffix(".log"))
    else:
        quantize_gguf(QuantizeInput(Path(src), Path(out), "q4_k_m"))
    t3 = time.perf_counter()
    print(json.dumps({"preload_seconds": t1 - t0, "import_seconds": t2 - t0, "stage_import_seconds": t2 - t1,
                      "work_seconds": t3 - t2, "rss_after_imports": rss_after_imports,
                      "work_peak_rss_bytes": status_bytes("VmHWM")}))


def prepare(base: Path, out: Path) -> None:
    """The convert stage's input as a build's merge stage leaves it: weights cast to float16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.chat_templates import load_family
    from ollama_ft.merge import cast_for_export, write_merged

    model = AutoModelForCausalLM.from_pretrained(base)
    base_dtype = str(model.dtype).removeprefix("torch.")
    for param in model.parameters():  # fault the weights in, so the cast is timed and not the disk
        param.detach().sum()
    start = time.perf_counter()
    model = cast_for_export(model)
    cast_seconds = time.perf_counter() - start
    write_merged(model, AutoTokenizer.from_pretrained(base), base, load_family("chatml").jinja, out)
    print(json.dumps({"cast_seconds": cast_seconds, "base_dtype": base_dtype,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def launch(stage: str, src: str, out: str) -> None:
    """Runs inside the launcher: start the child from this small process, time it, reap it."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.stage_io", "--child", stage, src, out],
                            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; stops Popen from waiting again
    if proc.returncode != 0:
        sys.exit(f"{stage} child failed (exit {proc.returncode})")
    row = json.loads(stdout.decode().strip().splitlines()[-1])
    print(json.dumps({"wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, **row}))  # KiB on Linux


def run_stage(stage: str, src: Path, out: Path, log: Path) -> dict:
    out.unlink(missing_ok=True)  # measure the work, not a cached result
    with open(log, "ab") as log_fh:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.stage_io", "--launch", stage, str(src), str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=log_fh, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed (exit {proc.returncode}); log: {log}")
    row = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return {**row, "start_and_exit_seconds": row["wall_seconds"] - row["import_seconds"] - row["work_seconds"],
            "work_rss_above_imports_bytes": row["work_peak_rss_bytes"] - row["rss_after_imports"]}


def summarise(row: dict, io: float, model_bytes: int) -> dict:
    return {**row, "io_seconds": io, "model_bytes": model_bytes,
            "time_ratio_incl": row["wall_seconds"] / io, "time_ratio_excl": row["work_seconds"] / io,
            "rss_ratio_incl": row["peak_rss_bytes"] / model_bytes,
            "rss_ratio_excl": row["work_rss_above_imports_bytes"] / model_bytes}


def run(work: Path, shape: str = "llama") -> dict:
    from ollama_ft.tiny import ensure_tiny_base

    base = ensure_tiny_base(f"tiny:{shape}", work / "_bases")
    folder = work / f"stage-io-{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "stages.log"
    merged = folder / "merged"
    with open(log, "ab") as log_fh:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.stage_io", "--child", "prepare", str(base),
                               str(merged)], cwd=ROOT, stdout=subprocess.PIPE, stderr=log_fh,
                              stdin=subprocess.DEVNULL, check=True)
    prepared = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    f16, q4 = folder / "model-f16.gguf", folder / "model-q4_k_m.gguf"
    weights = sorted(merged.glob("*.safetensors"))
    weight_bytes = sum(p.stat().st_size for p in weights)

    convert = run_stage("convert", merged, f16, log)
    convert = summarise(convert, io_seconds(weights, weight_bytes, folder), weight_bytes)
    convert["time_ratio_excl_with_cast"] = (convert["work_seconds"] + prepared["cast_seconds"]) / convert["io_seconds"]
    convert["time_ratio_in_build"] = (convert["stage_import_seconds"] + convert["work_seconds"]
                                      + prepared["cast_seconds"]) / convert["io_seconds"]
    quantize = run_stage("quantize", f16, q4, log)
    quantize = summarise(quantize, io_seconds([f16], q4.stat().st_size, folder), f16.stat().st_size)
    return {"shape": shape, "base": str(base), "merged": str(merged), "prepare": prepared,
            "f16_gguf": str(f16), "q4_gguf": str(q4),
            "f16_bytes": f16.stat().st_size, "q4_bytes": q4.stat().st_size, "convert": convert, "quantize": quantize}


def export_ggufs(model_dir: Path, folder: Path) -> tuple[Path, Path]:
    """F16 and Q4_K_M GGUFs of a model folder (kept when already there), for B6–B8."""
    folder.mkdir(parents=True, exist_ok=True)
    f16, q4 = folder / "model-f16.gguf", folder / "model-q4_k_m.gguf"
    if not f16.exists():
        run_stage("convert", model_dir, f16, folder / "stages.log")
    if not q4.exists():
        run_stage("quantize", f16, q4, folder / "stages.log")
    return f16, q4


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--child"], ["--launch"]):
        (child if argv[0] == "--child" else launch)(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama", choices=["llama", "llama-1b"])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None, help="folder for stage_io.json")
    args = p.parse_args(argv)
    result = run(args.work, args.shape)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stage_io.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
