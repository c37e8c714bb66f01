"""Issue 22: a prompt-tuning / P-tuning soft prompt baked into the vocabulary, measured to the GGUF.

    python -m benchmarks.soft_prompt_bake [--base tiny|smollm] [--steps N] [--out DIR]

For each method a PEFT soft prompt (8 virtual tokens) is trained for a few CPU steps on Turkish
chats rendered with the base's own chat template, baked (ollama_ft/soft_prompt.py), converted
to F16 with the project's converter and quantized to Q8_0 and Q4_K_M (and Q4_K_M with
`token_embd` kept at Q8_0 / F16, the quantizer's --token-embedding-type). Every file is compared
with HF PEFT on held-out chats: next-token logits after `[soft tokens] + ids`. Quantized files are
evaluated as float32 copies (the binding has crashed evaluating quantized real models here), so
the figures are the weights' rounding. "soft row err" is the baked soft rows' relative L2 error
after quantization, beside the median over ordinary rows. Results go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

N_VIRTUAL = 8
SMOLLM = Path(os.environ.get("OLLAMA_FT_CACHE", Path.home() / ".cache" / "ollama-ft")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO = Path(__file__).resolve().parent.parent / "data" / "turkish-demo.jsonl"
GGML_TYPES = {"q8_0": 8, "f16": 1}   # ggml_type values for llama_model_quantize_params


def demo_chats(count: int, skip: int = 0) -> list[list[dict]]:
    rows = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["messages"] for r in rows if len(r["messages"]) == 2][skip: skip + count]


def render(base: Path, chats: list[list[dict]], prompt_only: bool = False) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if prompt_only:
        return [tokenizer.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in chats]
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]


def train_soft_prompt(base: Path, method: str, out: Path, texts: list[str], steps: int = 6,
                      n_virtual: int = N_VIRTUAL, lr: float | None = None, seed: int = 0) -> Path:
    """A PEFT prompt_tuning / p_tuning adapter trained for `steps` passes over `texts`, saved to `out`.

    Learning rates as PEFT's guides use them: 3e-2 for prompt tuning, 1e-3 for P-tuning, whose MLP
    at 3e-2 threw its vectors to norms of thousands in two steps (and the model into a state where
    float16 rounding of the vectors moved logits by 4% of their range)."""
    import torch
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = (PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual)
              if method == "prompt_tuning" else
              PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual, encoder_hidden_size=128))
    peft_model = get_peft_model(model, config)
    lr = lr or (3e-2 if method == "prompt_tuning" else 1e-3)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss.detach()), 4))
    peft_model.save_pretrained(out)
    (out / "losses.json").write_text(json.dumps(losses) + "\n", encoding="utf-8")
    return out


def quantize_keeping_embeddings(f16: Path, out: Path, quant_type: str, token_embd: str, log: Path) -> Path:
    """llama.cpp's quantizer with `token_embd` at another type (what --token-embedding-type sets)."""
    import llama_cpp

    from ollama_ft.quantize import ftype_for, stderr_to

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant_type)
    params.token_embedding_type = GGML_TYPES[token_embd]
    with stderr_to(log):
        code = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if code != 0:
        raise RuntimeError(f"quantize {quant_type} with token_embd {token_embd}: code {code}")
    return out


def soft_row_error(f16: Path, quantized: Path, soft_ids: list[int]) -> dict:
    """Relative L2 error of the soft rows of token_embd after quantization, and the ordinary rows' median."""
    import numpy as np

    from ollama_ft.gguf_import import _dequantize, read_gguf

    def rows(path):
        tensor = next(t for t in read_gguf(path).tensors if t.name == "token_embd.weight")
        return np.asarray(_dequantize(tensor), dtype=np.float32).reshape(-1, tensor.dims[0]), tensor.tensor_type.name

    ref, _ = rows(f16)
    got, kind = rows(quantized)
    err = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    ordinary = np.delete(err, soft_ids)
    return {"token_embd_type": kind, "soft_rows_max": float(err[soft_ids].max()),
            "ordinary_rows_median": float(np.median(ordinary)),
            "soft_row_norm": float(np.linalg.norm(ref[soft_ids], axis=1).mean()),
            "ordinary_row_norm": float(np.median(np.linalg.norm(ref, axis=1)))}


def baseline_floor(base: Path, out: Path, texts: list[str], log: Path) -> dict:
    """The same comparison for the base with no soft prompt: what conversion and quantization cost anyway."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.gguf_import import _llama_cpp_logits, write_float32_gguf
    from ollama_ft.quantize import QuantizeInput, quantize_gguf

    rows = [AutoTokenizer.from_pretrained(base)(t, add_special_tokens=True).input_ids for t in texts]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [model(torch.tensor([r])).logits[0, -1].numpy() for r in rows]
    f16 = convert_to_gguf(ConvertInput(base, out / "base-f16.gguf", texts[:1], 1e-2, log)).gguf_path
    floor = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        path = f16 if quant == "f16" else quantize_gguf(QuantizeInput(f16, out / f"base-{quant}.gguf", quant,
                                                                      log_path=log)).gguf_path
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            evaluated = path
            if quant != "f16":
                evaluated = Path(tmp) / "f32.gguf"
                write_float32_gguf(path, evaluated)
            got = _llama_cpp_logits(evaluated, rows, Path(tmp))
        diffs = [float(np.abs(g[: e.shape[0]] - e).max()) for g, e in zip(got, expected)]
        floor[quant] = {"max_abs_logit_diff": max(diffs),
                        "max_rel_logit_diff": max(d / float(np.abs(e).max()) for d, e in zip(diffs, expected)),
                        "top1_agreement": float(np.mean([g[: e.shape[0]].argmax() == e.argmax()
                                                         for g, e in zip(got, expected)])),
                        "size_bytes": path.stat().st_size}
    return floor


def run(base_name: str, out: Path, steps: int) -> dict:
    import torch

    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.quantize import QuantizeInput, quantize_gguf
    from ollama_ft.soft_prompt import BakeInput, CheckInput, bake_soft_prompt, check_bake, gguf_gate

    out.mkdir(parents=True, exist_ok=True)
    if base_name == "smollm":
        from ollama_ft.gguf_import import import_gguf

        base = import_gguf(SMOLLM, out / "smollm-hf").hf_path
    else:
        from ollama_ft.tiny import ensure_tiny_base

        base = ensure_tiny_base("tiny:llama", out / "bases")
    train_texts = render(base, demo_chats(4))
    held_out = render(base, demo_chats(4, skip=40), prompt_only=True)
    result = {"base": base_name, "steps": steps, "n_virtual": N_VIRTUAL, "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "methods": {}}
    log = out / "llama.log"
    result["base_without_soft_prompt"] = baseline_floor(base, out, held_out, log)
    for method in ("prompt_tuning", "p_tuning"):
        t0 = time.perf_counter()
        adapter = train_soft_prompt(base, method, out / f"{method}-adapter", train_texts, steps=steps)
        baked = bake_soft_prompt(BakeInput(base, adapter, out / f"{method}-baked"))
        hf = check_bake(CheckInput(base, adapter, baked.out_dir, held_out))
        f16 = convert_to_gguf(ConvertInput(baked.out_dir, out / f"{method}-f16.gguf", held_out[:2], 1e-2, log))
        row = {"losses": json.loads((adapter / "losses.json").read_text()), "tokens": baked.token_ids,
               "untied": baked.untied, "hf_vs_baked": vars(hf) | {"passed": hf.passed},
               "convert_rel_diff_plain_text": f16.max_rel_logit_diff, "gguf": {}}
        files = {"f16": f16.gguf_path}
        for quant in ("q8_0", "q4_k_m"):
            files[quant] = quantize_gguf(QuantizeInput(f16.gguf_path, out / f"{method}-{quant}.gguf", quant,
                                                       log_path=log)).gguf_path
        for keep in ("q8_0", "f16"):
            files[f"q4_k_m+embd_{keep}"] = quantize_keeping_embeddings(
                f16.gguf_path, out / f"{method}-q4_k_m-embd-{keep}.gguf", "q4_k_m", keep, log)
        for name, path in files.items():
            gate = gguf_gate(base, adapter, path, held_out, baked.tokens, dequantize=name != "f16")
            row["gguf"][name] = {k: v for k, v in vars(gate).items() if k != "gguf_path"} | \
                {"size_bytes": path.stat().st_size}
            if name != "f16":
                row["gguf"][name]["soft_rows"] = soft_row_error(f16.gguf_path, path, baked.token_ids)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["methods"][method] = row
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=("tiny", "smollm"), default="smollm")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/soft-prompt-bake"))
    args = parser.parse_args()
    result = run(args.base, args.out, args.steps)
    for name, gate in result["base_without_soft_prompt"].items():
        print(f"base {name:6} abs {gate['max_abs_logit_diff']:.4f} rel {gate['max_rel_logit_diff']:.4f} "
              f"top1 {gate['top1_agreement']:.2f}")
    for method, row in result["methods"].items():
        print(method, "HF vs baked", row["hf_vs_baked"]["max_abs_logit_diff"], "losses", row["losses"])
        for name, gate in row["gguf"].items():
            print(f"  {name:18} abs {gate['max_abs_logit_diff']:.4f} rel {gate['max_rel_logit_diff']:.4f} "
                  f"top1 {gate['top1_agreement']:.2f} ids-mismatch {gate['id_mismatches']} "
                  f"soft-margin {gate['max_soft_margin']:.2f} {gate.get('soft_rows', '')}")


if __name__ == "__main__":
    main()
