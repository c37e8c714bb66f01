"""B3: padding efficiency of the demo data, padded batches vs packed rows. No training.

    python -m benchmarks.padding [--max-length 256] [--batch 16] [--out DIR]

Efficiency = non-pad tokens ÷ processed tokens. Each record of data/turkish-demo.jsonl is
tokenised exactly as training does (`tokenize_example`, the tiny tokenizer, the ChatML Jinja)
and, in padded batches, truncated to `--max-length` (the demo recipe's max_seq_length).

- padded: the examples in a random order (seed 42), batches of 16, each padded to its longest
  row, as TRL's collator does with `packing = false` (the last batch may be short).
- packed: every example concatenated and cut into `max_length` rows; processed = rows ×
  max_length minus the last partial row's padding, so it is 1.0 by construction: the figure to
  read is the padded one. TRL 1.14's default packing ("bfd", padding-free) also pads nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "turkish-demo.jsonl"


def example_lengths(base: Path, data: Path = DATA) -> list[int]:
    """Token count of each example, tokenised as the backends tokenise it."""
    from transformers import AutoTokenizer

    from ollama_ft.backends.common import read_examples, tokenize_example
    from ollama_ft.chat_templates import load_family

    tokenizer = AutoTokenizer.from_pretrained(base)
    jinja = load_family("chatml").jinja
    return [len(tokenize_example(ex, tokenizer, jinja, True)["input_ids"]) for ex in read_examples(str(data))]


def padding_efficiency(lengths: list[int], *, batch_size: int = 16, max_length: int = 256, seed: int = 42) -> dict:
    """Padded vs packed efficiency of these example lengths."""
    truncated = [min(n, max_length) for n in lengths]  # padded rows are cut at max_length
    non_pad, total = sum(truncated), sum(lengths)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)  # the batch composition is what sets the padding
    batches = [[truncated[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    padded_processed = sum(len(b) * max(b) for b in batches)
    rows = math.ceil(total / max_length)  # packing splits long examples across rows, cuts nothing
    last_padding = rows * max_length - total  # only the final row is partial
    packed_processed = rows * max_length - last_padding
    return {
        "examples": len(lengths), "tokens": total, "truncated_examples": sum(n > max_length for n in lengths),
        "batch_size": batch_size,
        "max_length": max_length, "seed": seed, "longest": max(lengths), "shortest": min(lengths),
        "mean_length": total / len(lengths),
        "padded": {"batches": len(batches), "non_pad_tokens": non_pad, "processed_tokens": padded_processed,
                   "efficiency": non_pad / padded_processed},
        "packed": {"rows": rows, "non_pad_tokens": total, "processed_tokens": packed_processed,
                   "efficiency": total / packed_processed},
    }


def run(work: Path, *, batch_size: int = 16, max_length: int = 256, seed: int = 42) -> dict:
    from ollama_ft.tiny import ensure_tiny_base

    base = ensure_tiny_base("tiny:llama", work / "_bases")
    result = padding_efficiency(example_lengths(base, DATA),
                                batch_size=batch_size, max_length=max_length, seed=seed)
    result["data"] = str(DATA.relative_to(ROOT))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None, help="folder for padding.json")
    args = p.parse_args(argv)
    result = run(args.work, batch_size=args.batch, max_length=args.max_length)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "padding.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
