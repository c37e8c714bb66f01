"""Stage 2, merge: fold the trained adapter into a 16-bit copy of the base and save it.

A soft prompt (prompt_tuning, p_tuning) has nothing to fold into the weights: it is baked into
the vocabulary as extra tokens instead (soft_prompt.py), checked against PEFT the same way.

QLoRA adapters are merged into a base loaded in 16/32-bit, never into 4-bit weights (merging into
quantized weights loses quality). The merged model's logits are checked against the adapter
model's on sample inputs; a mismatch stops the build. The merged weights are saved in float16, the
type the convert stage writes into the GGUF (see `cast_for_export`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ollama_ft.errors import StageError
from ollama_ft.runs import atomic_output

if TYPE_CHECKING:
    from ollama_ft.soft_prompt import SoftTokens


@dataclass
class MergeInput:
    base_path: Path
    trained_path: Path
    kind: str                 # "adapter" | "full" | "soft_prompt"
    chat_jinja: str
    sample_texts: list[str]   # rendered prompts used for the logits check
    out_dir: Path
    trust_remote_code: bool = False


@dataclass
class MergeOutput:
    merged_path: Path
    max_abs_logit_diff: float
    tolerance: float
    dtype: str                # what the merge was computed in
    saved_dtype: str = "float16"
    soft_tokens: SoftTokens | None = None   # a soft prompt baked in as extra tokens


def keep_base_tokenizer(base: Path, out: Path, chat_jinja: str) -> None:
    """Ship the base's own SentencePiece files, not transformers' re-derived tokenizer.json.

    llama.cpp's converter reads `tokenizer.model` and `add_bos_token` from tokenizer_config.json;
    without them the GGUF splits text differently from training and adds a BOS it never saw.
    """
    if not (base / "tokenizer.model").is_file() or not (base / "tokenizer_config.json").is_file():
        return  # a tokenizer.json-only base (Qwen, Llama 3): the saved files are its own
    for name in ("tokenizer.model", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = chat_jinja
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    for derived in ("tokenizer.json", "chat_template.jinja"):
        (out / derived).unlink(missing_ok=True)


def cast_for_export(model):
    """The merged model in float16, refused if a weight lies beyond float16's range.

    The converter writes F16 GGUFs. Weights saved in bf16 or fp32 it casts tensor by tensor in
    numpy; weights already in float16 it copies as they are. torch's cast is about 5x faster than
    numpy's, and the GGUF's tensor bytes come out identical either way (both round to nearest
    even), so the cast happens here (1B shape, 2 cores: the converter's work 6-10 s instead of
    21-34 s, for a 4-5 s cast here). A weight beyond float16's range would become inf in the
    GGUF, so it stops the build instead. (Casting bf16 in its own memory was tried: slower, since
    the loaded weights are a copy-on-write mapping of the file and every page written is copied.)
    """
    import torch

    limit = torch.finfo(torch.float16).max
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point and param.numel():
            low, high = torch.aminmax(param.detach())
            reach = max(-float(low), float(high))
            if reach > limit:
                raise StageError(f"merge: weight {name} reaches {reach:.4g}, beyond float16's range ({limit:.0f}), "
                                 "so an F16 GGUF cannot hold it",
                                 "ollama-ft exports through F16 only; a bf16 export, which this model needs, "
                                 "is not supported yet")
    return model.to(torch.float16)


def write_merged(model, tokenizer, base_path: Path, chat_jinja: str, out_dir: Path) -> None:
    """Weights and tokenizer into `out_dir`, all or nothing, as the convert stage reads them."""
    with atomic_output(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        keep_base_tokenizer(base_path, tmp, chat_jinja)


def _logits(model, tokenizer, texts):
    import torch

    outs = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[:, :256]
            outs.append(model(ids).logits.float())
    return outs


def merge_adapter(inp: MergeInput) -> MergeOutput:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # a weight-loading bar per load would break the build's stage lines

    if inp.kind == "soft_prompt":
        from ollama_ft.soft_prompt import bake_for_export

        soft, check = bake_for_export(inp.base_path, inp.trained_path, inp.out_dir, inp.sample_texts, inp.chat_jinja)
        return MergeOutput(inp.out_dir, check.max_abs_logit_diff, check.tolerance, "float32", soft_tokens=soft)
    tokenizer = AutoTokenizer.from_pretrained(inp.trained_path, trust_remote_code=inp.trust_remote_code)
    tokenizer.chat_template = inp.chat_jinja
    if inp.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(inp.trained_path, trust_remote_code=inp.trust_remote_code)
        dtype = model.dtype
        write_merged(cast_for_export(model), tokenizer, inp.base_path, inp.chat_jinja, inp.out_dir)
        return MergeOutput(inp.out_dir, 0.0, 0.0, str(dtype).removeprefix("torch."))

    from peft import PeftModel

    # Always a 16/32-bit base, whatever the training loaded: never merge into 4-bit weights.
    base = AutoModelForCausalLM.from_pretrained(inp.base_path, trust_remote_code=inp.trust_remote_code)
    if base.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        base = base.to(torch.bfloat16)
    dtype = base.dtype
    try:
        model = PeftModel.from_pretrained(base, str(inp.trained_path))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"merge: the adapter in {inp.trained_path} does not fit the base {inp.base_path} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                         "retrain, or check model.base is the model the adapter was trained on") from None
    model.eval()
    before = _logits(model, tokenizer, inp.sample_texts)
    merged = model.merge_and_unload()
    after = _logits(merged, tokenizer, inp.sample_texts)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    scale = max(float(a.abs().max()) for a in before) or 1.0
    # fp32 merges agree to rounding; bf16 merges round each weight once more.
    tolerance = (1e-3 if dtype == torch.float32 else 3e-2) * scale
    if diff > tolerance:
        raise StageError(f"merge check failed: merged logits differ from the adapter model's by {diff:.4g} "
                         f"(allowed {tolerance:.4g})", "the adapter does not fit this base; retrain or check model.base")
    write_merged(cast_for_export(merged), tokenizer, inp.base_path, inp.chat_jinja, inp.out_dir)
    return MergeOutput(inp.out_dir, diff, tolerance, str(dtype).removeprefix("torch."))
