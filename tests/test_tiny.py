"""The built-in tiny base: deterministic bytes, ChatML markers as single tokens, sane shape."""

import filecmp
import json

from ollama_ft.tiny import build_tiny_base


def test_two_builds_are_byte_identical(tmp_path, tiny_base):
    again = build_tiny_base("llama", tmp_path / "again")
    names = sorted(p.name for p in tiny_base.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.safetensors", "tokenizer.model", "tokenizer_config.json", "config.json", "tiny.json"} <= set(names)
    match, mismatch, errors = filecmp.cmpfiles(tiny_base, again, names, shallow=False)
    assert mismatch == [] and errors == [], mismatch


def test_tokenizer_has_single_chatml_tokens_and_special_ids(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    manifest = json.loads((tiny_base / "tiny.json").read_text())
    assert len(tok) == manifest["tokenizer_pieces"] > 500
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert tok.unk_token == "<unk>"
    # Turkish letters survive a round trip (byte fallback covers anything unseen).
    text = "İstanbul'da ığdır, ŞÜÖÇĞ; 42 ₺"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert "<|im_start|>" in tok.chat_template


def test_shape_is_a_few_million_parameters(tiny_base):
    manifest = json.loads((tiny_base / "tiny.json").read_text())
    assert 1_000_000 < manifest["parameters"] < 10_000_000
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
