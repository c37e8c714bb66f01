"""Peak RAM of the export stages' model work: the merge stage's save and the convert stage's logit check.

    python -m benchmarks.export_memory [--shape llama-1b] [--out DIR]

B5 measures the converter and the quantizer; around them a build holds whole models in RAM twice:
the merge stage writes the merged model (cast to float16, then saved), and the convert stage loads
the merged folder again to check the GGUF's logits against it. On a GPU machine these run on the
CPU, in host RAM, which is often not much larger than the model. Each step runs in a child
process after torch and transformers are imported; the child reports its peak RSS (VmHWM) and
its peak anonymous RSS (sampled), each minus its value right after the imports, divided by the
merged model's bytes (2 per parameter):
- save: the base loaded in its own dtype, `cast_for_export`, `write_merged` (the merge stage
  without the adapter and its logit check);
- check: `ollama_ft.convert.compare_logits` on the saved folder and its F16 GGUF, as the convert
  stage runs it; `check-float32` the same with the reference model held in float32, as it was
  before session 6.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.stage_io import ROOT, status_bytes

TEXTS = ["<|im_start|>user\nTürkiye'nin başkenti neresidir?<|im_end|>\n<|im_start|>assistant\n",
         "İstanbul Boğazı, Asya ile Avrupa'yı ayırır ve iki denizi birbirine bağlar."]


class AnonPeak:
    """Highest RssAnon of this process, sampled every 5 ms on a thread.

    VmHWM counts file-backed pages too: the safetensors and GGUF files a step maps stay resident
    while there is room, but the kernel can drop them under pressure. Anonymous memory (the
    weights a step copies or casts) is what runs a machine out of RAM."""

    def __init__(self):
        import threading

        self.peak, self._stop = status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_bytes("RssAnon"))


def child(step: str, src: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ollama_ft.convert as convert

    rss_after_imports, anon_after_imports = status_bytes("VmRSS"), status_bytes("RssAnon")
    anon = AnonPeak()
    start = time.perf_counter()
    if step == "save":
        from ollama_ft.chat_templates import load_family
        from ollama_ft.merge import cast_for_export, write_merged

        model = AutoModelForCausalLM.from_pretrained(src)
        write_merged(cast_for_export(model), AutoTokenizer.from_pretrained(src), Path(src),
                     load_family("chatml").jinja, Path(out))
        result = {}
    else:
        if step == "check-float32":  # the reference as it was loaded before: every weight in float32
            convert.compute_in_float32 = lambda model: model.to(torch.float32)
        diff, agree = convert.compare_logits(Path(src), Path(out), TEXTS)
        result = {"max_rel_logit_diff": diff, "top1_agreement": agree}
    seconds = time.perf_counter() - start
    print(json.dumps({**result, "seconds": seconds, "rss_after_imports": rss_after_imports,
                      "peak_rss": status_bytes("VmHWM"), "anon_after_imports": anon_after_imports,
                      "peak_anon": anon.stop()}))


def run_step(step: str, src: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", "--child", step, str(src), str(out)],
                          cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed: {proc.stderr.strip().splitlines()[-1:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "rss_above_imports": row["peak_rss"] - row["rss_after_imports"],
            "anon_above_imports": row["peak_anon"] - row["anon_after_imports"]}


def run(work: Path, shape: str) -> dict:
    from benchmarks.stage_io import run_stage
    from ollama_ft.tiny import ensure_tiny_base

    base = ensure_tiny_base(f"tiny:{shape}", work / "_bases")
    folder = work / f"export-memory-{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    merged, f16 = folder / "merged", folder / "model-f16.gguf"
    save = run_step("save", base, merged)
    f16.unlink(missing_ok=True)
    run_stage("convert", merged, f16, folder / "stages.log")
    model_bytes = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    steps = {"save": save, "check": run_step("check", merged, f16), "check-float32": run_step("check-float32", merged, f16)}
    for row in steps.values():
        row["rss_ratio"] = row["rss_above_imports"] / model_bytes
        row["anon_ratio"] = row["anon_above_imports"] / model_bytes
    return {"shape": shape, "base": str(base), "merged_bytes": model_bytes, **steps}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama", choices=["llama", "llama-1b"])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None, help="folder for export_memory.json")
    args = p.parse_args(argv)
    text = json.dumps(run(args.work, args.shape), indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "export_memory.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
