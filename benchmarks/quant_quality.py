"""B9: what each quantization costs on held-out Turkish text, with no importance matrix, with a
Turkish one computed from the recipe's data (as `export.imatrix = "auto"` does), and with an
English one, on a real pretrained model.

    python -m benchmarks.quant_quality [--gguf PATH] [--out DIR] [--chunks N]

The model is a real GGUF from the cache (scripts/fetch_models.sh; default SmolLM2-135M-Instruct),
imported as a Hugging Face folder and converted to F16 the way a build does; that F16 GGUF is the
reference. The published files are already quantized (SmolLM2 Q4_1, gemma-3-270m Q4_K_M), so the
reference holds their rounded weights: a type whose grid contains the source's (gemma's Q4_K_M
from Q4_K_M) can look nearly lossless. Say which model a table is from.

Data, all from data/turkish-demo.jsonl: the Turkish matrix is computed on the first 240 chats
rendered with the model's own chat template (the demo recipe trains on those); the held-out text
is the message text of the other 180, which no matrix saw. The English matrix is computed on
Python's own documentation (`pydoc_data.topics`), cut to the Turkish calibration's token count.
Figures are llama.cpp's `llama-perplexity --kl-divergence` against the F16 model's log-probabilities.
Goals (issue 20): the Turkish matrix lowers mean KLD at Q4_K_M by at least 20% against no matrix,
and beats the English matrix on this Turkish text.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "turkish-demo.jsonl"
TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m")
TRAINED = 240          # recipes/gemma-demo.toml's max_examples: what the demo trains and calibrates on


def english_text(tokens: int, gguf: Path) -> str:
    """Python's documentation topics, cut to about `tokens` tokens of this model."""
    import pydoc_data.topics

    from ollama_ft.imatrix import count_tokens

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    chars = len(text)
    have = count_tokens(gguf, text)
    return text[: int(chars * min(1.0, tokens / have))]


def main(argv: list[str] | None = None) -> int:
    from ollama_ft.convert import run_converter
    from ollama_ft.gguf_import import import_gguf
    from ollama_ft.imatrix import ImatrixInput, compute_imatrix, count_tokens
    from ollama_ft.ollama_server import cache_dir
    from ollama_ft.context import base_tokenizer_config, quality_texts, special_token
    from ollama_ft.quant_quality import measure, reference
    from ollama_ft.quantize import QuantizeInput, quantize_gguf
    from ollama_ft.template_match import choose_template

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant_quality")
    parser.add_argument("--gguf", type=Path, default=cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "quant-quality")
    parser.add_argument("--chunks", type=int, default=16, help="held-out chunks of 512 tokens to score")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "tools.log"
    started = time.time()

    hf = import_gguf(args.gguf, out / "hf").hf_path
    f16 = out / "model-f16.gguf"
    if not f16.exists():
        run_converter(hf, f16, out / "convert.log")
    config = base_tokenizer_config(str(hf))
    template = choose_template("auto", config.get("chat_template"), str(args.gguf), special_token(config, "eos_token"))

    chats = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    calibration, held_out = quality_texts(chats[:TRAINED], chats[TRAINED:], template)
    turkish_tokens = count_tokens(f16, "\n".join(calibration))
    matrices = {"none": None}
    for label, texts in (("turkish", calibration), ("english", [english_text(turkish_tokens, f16)])):
        matrices[label] = compute_imatrix(ImatrixInput(f16, texts, out / f"imatrix-{label}.gguf",
                                                       out / f"imatrix-{label}.log"))

    ref = reference(f16, held_out, out / "f16-logprobs.kld", log, chunks=args.chunks)
    rows = []
    for label, matrix in matrices.items():
        for quant in TYPES:
            q = quantize_gguf(QuantizeInput(f16, out / f"model-{quant}.gguf", quant, log_path=log,
                                            imatrix=matrix.path if matrix else None))
            figures = measure(quant, q.gguf_path, ref, log)
            rows.append({"imatrix": label, **asdict(figures)})
            q.gguf_path.unlink()
            print(f"{label:8} {quant:7} KLD {figures.mean_kld:.5f}  top-1 {figures.top1_agreement:.2%}  "
                  f"PPL {figures.perplexity:.3f}  {figures.size_bytes / 2**20:.1f} MiB", flush=True)
    (out / "f16-logprobs.kld").unlink(missing_ok=True)

    kld = {(r["imatrix"], r["quant_type"]): r["mean_kld"] for r in rows}
    result = {
        "model": args.gguf.name, "f16_perplexity": rows[0]["base_perplexity"], "context": ref.context, "chunks": args.chunks,
        "scored_tokens": args.chunks * (ref.context - 1 - ref.context // 2),
        "matrices": {k: ({"tokens": m.tokens, "chunks": m.chunks, "context": m.context} if m else None)
                     for k, m in matrices.items()},
        "rows": rows,
        "q4_k_m_kld_reduction_turkish_vs_none": 1 - kld["turkish", "q4_k_m"] / kld["none", "q4_k_m"],
        "q4_k_m_turkish_beats_english": kld["turkish", "q4_k_m"] < kld["english", "q4_k_m"],
        "machine": platform.processor() or platform.machine(), "seconds": round(time.time() - started),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "quant_quality.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "quant_quality.md").write_text(render(result), encoding="utf-8")
    print(render(result))
    return 0


def render(result: dict) -> str:
    lines = [f"# B9: quantization quality on held-out Turkish text, {result['model']}", "",
             f"F16 perplexity {result['f16_perplexity']:.3f}; {result['scored_tokens']} scored tokens "
             f"({result['chunks']} chunks of {result['context']}). Matrices: "
             + ", ".join(f"{k} ({v['tokens']} tokens)" for k, v in result["matrices"].items() if v) + ".", "",
             "| type | size (MiB) | matrix | mean KLD | KLD p99 | top-1 agreement | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for quant in TYPES:
        for r in (r for r in result["rows"] if r["quant_type"] == quant):
            lines.append(f"| {quant} | {r['size_bytes'] / 2**20:.1f} | {r['imatrix']} | "
                         f"{r['mean_kld']:.5f} ± {r.get('mean_kld_error', 0):.5f} | "
                         f"{r['kld_p99']:.4f} | {r['top1_agreement']:.2%} | {r['perplexity']:.3f} |")
    lines += ["", f"Q4_K_M: the Turkish matrix lowers mean KLD by {result['q4_k_m_kld_reduction_turkish_vs_none']:.1%} "
              f"against no matrix (goal ≥ 20%); beats the English matrix: {result['q4_k_m_turkish_beats_english']}.",
              "", "Command: `python -m benchmarks.quant_quality --gguf " + result["model"] + "`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
