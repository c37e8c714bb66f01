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
    import torch
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
