"""B8: perplexity of the Q4_K_M GGUF ÷ the F16 GGUF on held-out Turkish text (llama-cpp-python).

    python -m benchmarks.quality [--steps 100] [--out DIR]     # short full fine-tune of tiny:llama
    python -m benchmarks.quality --steps 0                      # the untrained (random) tiny base
    python -m benchmarks.quality --model MERGED_DIR             # any merged HF model folder

A random-initialised model predicts tokens almost uniformly, so both files would score about the
vocabulary size and the ratio would say little; by default the tiny base is first fully
fine-tuned for `--steps` steps on data/turkish-demo.jsonl (through `ollama_ft.train`, as a build
does, but with the loss on every token: this measures the language, not the answers). Both GGUFs
then score the same token ids (the model's own tokenizer): the messages of the held-out cases of
evals/turkish-core.toml (held_in = false, so not in the training data), one per line, cut into
windows of `--window` tokens; every token but a window's first is predicted from the logits of
its prefix (`logits_all=True`). Reported: each perplexity, their ratio, the scored token count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "evals" / "turkish-core.toml"
DATA = ROOT / "data" / "turkish-demo.jsonl"


def held_out_text(suite_path: Path = SUITE) -> str:
    from ollama_ft.eval_suite import load_suite

    lines: list[str] = []
    for case in load_suite(suite_path).cases:
        if not case.held_in:  # held-in prompts are copied from the training data
            lines += [m.content for m in case.messages if m.content.strip()]
    return "\n".join(dict.fromkeys(lines))  # a system prompt shared by cases counts once


def fine_tune(base: Path, steps: int, folder: Path) -> Path:
    """A short full fine-tune of `base` on the demo data: recipes/tiny-demo.toml's settings, loss on all tokens."""
    from ollama_ft.backends import TrainJob
    from ollama_ft.recipe import ModelSection, TrainSection
    from ollama_ft.chat_templates import load_family
    from ollama_ft.train import TrainInput, train

    shutil.rmtree(folder, ignore_errors=True)  # a leftover checkpoint would be resumed
    examples = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    job = TrainJob(
        backend="peft", base_path=str(base), examples_path=str(folder / "examples.jsonl"), validation_path=None,
        chat_jinja=load_family("chatml").jinja, output_dir=str(folder / "trained"),
        checkpoint_dir=str(folder / "checkpoints"),
        model=ModelSection(base=str(base), max_seq_length=256, dtype="float32").model_dump(),
        train=TrainSection(method="full", max_steps=steps, learning_rate=3e-3, lr_scheduler="cosine",
                           warmup_ratio=0.03, batch_size=16, gradient_checkpointing=False,
                           assistant_only_loss=False, logging_steps=10, save_steps=10_000).model_dump(),
        assistant_only_loss=False, log_path=str(folder / "train.log"))
    # One thread: B8 needs a trained model, not a fast one, and two torch threads on two shared
    # cores slowed training 10-30x whenever another process was busy (seen on the 2-core CI machine).
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"   # the worker inherits it
    try:
        result = train(TrainInput(job, examples, None, folder))
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return Path(result.output_dir)


def perplexity(gguf: Path, tokens: list[int], window: int) -> tuple[float, int]:
    """exp(mean NLL) over every token of each window but its first, and the count scored."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=window, n_batch=window, logits_all=True, n_threads=2,
                seed=42, verbose=False)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
        nll += float((log_z - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    llm.close()
    return math.exp(nll / count), count


def run(work: Path, steps: int = 100, model: Path | None = None, window: int = 256) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.stage_io import export_ggufs
    from ollama_ft.tiny import ensure_tiny_base

    folder = work / "quality"
    if model is None:
        base = ensure_tiny_base("tiny:llama", work / "_bases")
        model = fine_tune(base, steps, folder / "train") if steps > 0 else base
        described = f"tiny:llama, full fine-tune {steps} steps" if steps > 0 else "tiny:llama, untrained"
    else:
        described = str(model)
    shutil.rmtree(folder / "gguf", ignore_errors=True)  # the model may have changed since last run
    f16, q4 = export_ggufs(model, folder / "gguf")
    text = held_out_text()
    # The model's own tokenizer, as in training: llama.cpp splits this SentencePiece BPE differently.
    tokens = AutoTokenizer.from_pretrained(model)(text, add_special_tokens=True, verbose=False).input_ids
    ppl_f16, scored = perplexity(f16, tokens, window)
    ppl_q4, _ = perplexity(q4, tokens, window)
    return {"model": described, "held_out_characters": len(text), "tokens": len(tokens),
            "scored_tokens": scored, "window": window, "f16_perplexity": ppl_f16, "q4_k_m_perplexity": ppl_q4,
            "ratio": ppl_q4 / ppl_f16, "f16_bytes": f16.stat().st_size, "q4_bytes": q4.stat().st_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="full fine-tune steps first; 0: the untrained base")
    p.add_argument("--model", type=Path, default=None, help="score this merged model folder instead")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None, help="folder for quality.json")
    args = p.parse_args(argv)
    result = run(args.work, args.steps, args.model, args.window)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
