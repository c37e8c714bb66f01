"""Merge: a LoRA adapter folded into a 16/32-bit copy of the base gives the adapter model's logits;
the merged folder holds plain weights (no adapter modules, no quantization config)."""

import json

import pytest

from ollama_ft.chat_templates import load_family
from ollama_ft.errors import StageError
from ollama_ft.merge import MergeInput, merge_adapter

SAMPLES = ["<|im_start|>user\nMerhaba<|im_end|>\n<|im_start|>assistant\nSelam<|im_end|>\n", "Türkiye'nin başkenti"]


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    # Random A and B (not PEFT's zero-init B), so the adapter really changes the logits.
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return folder


def test_merged_logits_equal_adapter_logits(tiny_base, adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge_adapter(MergeInput(tiny_base, adapter, "adapter", load_family("chatml").jinja, SAMPLES,
                                   tmp_path / "merged"))
    assert out.max_abs_logit_diff <= out.tolerance and out.dtype == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out.merged_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    changed = max(float((a - b).detach().abs().max()) for a, b in zip(merged.parameters(), base.parameters()))
    assert changed > 1e-3  # the adapter was folded in, not dropped
    config = json.loads((out.merged_path / "config.json").read_text())
    assert "quantization_config" not in config
    # Saved in the GGUF's float type, whatever the merge ran in.
    assert out.saved_dtype == "float16" and config["dtype"] == "float16"
    from safetensors import safe_open
    with safe_open(out.merged_path / "model.safetensors", "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_adapter_for_another_base_is_refused(adapter, tmp_path):
    from ollama_ft.tiny import SHAPES, build_tiny_base

    # Same architecture, different weights: the adapter loads but the logits check must still pass
    # only for the base it was trained on; a different shape cannot even load.
    other = tmp_path / "other"
    (other).mkdir()
    import dataclasses

    from ollama_ft import tiny

    tiny.SHAPES["wide"] = dataclasses.replace(SHAPES["llama"], hidden_size=128, intermediate_size=384)
    try:
        build_tiny_base("wide", other / "base")
    finally:
        del tiny.SHAPES["wide"]
    with pytest.raises((StageError, RuntimeError, ValueError)):
        merge_adapter(MergeInput(other / "base", adapter, "adapter", load_family("chatml").jinja, SAMPLES,
                                 tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_gguf_tokenizes_like_training(tiny_base, adapter, tmp_path):
    """The merged folder keeps the base's SentencePiece files, so llama.cpp (and Ollama) split text
    exactly as training did, read the chat markers as single tokens, and add no BOS."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from ollama_ft.convert import ConvertInput, convert_to_gguf

    out = merge_adapter(MergeInput(tiny_base, adapter, "adapter", load_family("chatml").jinja, SAMPLES,
                                   tmp_path / "merged"))
    assert (out.merged_path / "tokenizer.model").read_bytes() == (tiny_base / "tokenizer.model").read_bytes()
    gguf = convert_to_gguf(ConvertInput(out.merged_path, tmp_path / "m.gguf", SAMPLES, 0.05, tmp_path / "c.log"))
    llm = Llama(model_path=str(gguf.gguf_path), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    for text in ["<|im_start|>user\nTürkiye'nin başkenti neresidir?<|im_end|>\n<|im_start|>assistant\n",
                 "İstanbul Boğazı, Asya ile Avrupa'yı ayırır."]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids
    assert llm.metadata.get("tokenizer.ggml.add_bos_token") == "false"
    llm.close()


def _gguf_tensors(path):
    import numpy as np
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("source_dtype", ["float32", "bfloat16"])
def test_float16_save_gives_the_converter_s_own_gguf_bytes(tiny_base, source_dtype, tmp_path):
    """Casting before the save moves the work out of the converter without changing its output:
    the F16 GGUF of the cast copy holds exactly the tensors the converter makes from the original."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.merge import cast_for_export, keep_base_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=getattr(torch, source_dtype))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    folders = {}
    for label, weights in (("as-is", model), ("cast", cast_for_export(model))):
        folder = folders[label] = tmp_path / label
        weights.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        keep_base_tokenizer(tiny_base, folder, load_family("chatml").jinja)
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=getattr(torch, source_dtype))
    ggufs = {label: convert_to_gguf(ConvertInput(folder, tmp_path / f"{label}.gguf", SAMPLES, 0.05,
                                                 tmp_path / f"{label}.log")).gguf_path
             for label, folder in folders.items()}
    original, cast = _gguf_tensors(ggufs["as-is"]), _gguf_tensors(ggufs["cast"])
    assert original.keys() == cast.keys() and len(original) > 10
    assert {kind for kind, _ in cast.values()} >= {"F16"}
    differing = [name for name in original if original[name] != cast[name]]
    assert not differing, differing


def test_weight_beyond_float16_range_stops_the_merge(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_ft.merge import cast_for_export

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = -7e4
    with pytest.raises(StageError, match=r"model\.layers\.0\.mlp\.down_proj\.weight reaches 7e\+04, beyond float16"):
        cast_for_export(model)
    assert model.dtype == torch.float32  # refused before anything was cast
