"""Stage 2, merge: fold the trained adapter into a 16-bit copy of the base and save it.

QLoRA adapters are merged into a base loaded in 16/32-bit, never into 4-bit weights (merging into
quantized weights loses quality). The merged model's logits are checked against the adapter
model's on sample inputs; a mismatch stops the build.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.errors import StageError
from ollama_ft.runs import atomic_output


@dataclass
class MergeInput:
    base_path: Path
    trained_path: Path
    kind: str                 # "adapter" | "full"
    chat_jinja: str
    sample_texts: list[str]   # rendered prompts used for the logits check
    out_dir: Path
    trust_remote_code: bool = False


@dataclass
class MergeOutput:
    merged_path: Path
    max_abs_logit_diff: float
    tolerance: float
    dtype: str


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

    tokenizer = AutoTokenizer.from_pretrained(inp.trained_path, trust_remote_code=inp.trust_remote_code)
    tokenizer.chat_template = inp.chat_jinja
    if inp.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(inp.trained_path, trust_remote_code=inp.trust_remote_code)
        with atomic_output(inp.out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            keep_base_tokenizer(inp.base_path, tmp, inp.chat_jinja)
        return MergeOutput(inp.out_dir, 0.0, 0.0, str(model.dtype).removeprefix("torch."))

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
    with atomic_output(inp.out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        keep_base_tokenizer(inp.base_path, tmp, inp.chat_jinja)
    return MergeOutput(inp.out_dir, diff, tolerance, str(dtype).removeprefix("torch."))
