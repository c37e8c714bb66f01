"""Soft prompts baked into the vocabulary (issue 22): the baked model fed `[soft tokens] + ids`
gives PEFT's logits on `ids`, for prompt tuning and P-tuning; the new tokens' logits can never beat
the best real token's; a tied, BOS-adding, embedding-scaled base (gemma's traits) bakes too; and on
SmolLM2 the converted GGUF, fed what Ollama's runner would tokenize, gives PEFT's logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.soft_prompt_bake import SMOLLM, demo_chats, render, train_soft_prompt
from ollama_ft.errors import UserInputError
from ollama_ft.soft_prompt import (BakeInput, CheckInput, bake_soft_prompt, check_bake, gguf_gate, read_soft_prompt,
                                   soft_prompt_vectors)

METHODS = ("prompt_tuning", "p_tuning")
TEXTS = ["<|im_start|>user\nTürkiye'nin başkenti neresidir?<|im_end|>\n<|im_start|>assistant\n", "Merhaba dünya"]


def trained(base: Path, method: str, folder: Path, steps: int = 3) -> Path:
    return train_soft_prompt(base, method, folder / f"{method}-adapter", TEXTS, steps=steps)


@pytest.fixture(scope="module")
def gemma_like_base(tiny_base, tmp_path_factory) -> Path:
    """A tiny random gemma3 model with the tiny base's tokenizer, set to add BOS: tied embeddings,
    an input-embedding scale of sqrt(hidden), and a BOS that PEFT's soft prompt goes before."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("gemma-like")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                              bos_token_id=1, eos_token_id=5, pad_token_id=3, sliding_window=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.model", "special_tokens_map.json"):
        shutil.copyfile(tiny_base / name, folder / name)
    tok_config = json.loads((tiny_base / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config | {"add_bos_token": True}))
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_baked_model_gives_peft_logits(tiny_base, method, tmp_path, one_torch_thread):
    import torch
    from transformers import AutoModelForCausalLM

    adapter = trained(tiny_base, method, tmp_path)
    vectors = soft_prompt_vectors(adapter)
    assert tuple(vectors.shape) == (8, 256) and read_soft_prompt(adapter).method == method
    baked = bake_soft_prompt(BakeInput(tiny_base, adapter, tmp_path / "baked"))
    assert baked.soft.tokens == [f"<|soft_prompt_{i}|>" for i in range(8)] and baked.soft.token_ids == list(range(2000, 2008))
    assert baked.vocab_size == 2008 and baked.soft.bos_token is None and not baked.untied
    gate = check_bake(CheckInput(tiny_base, adapter, baked.out_dir, TEXTS))
    assert gate.passed and gate.max_abs_logit_diff <= 1e-5 and gate.positions > 10, gate
    model = AutoModelForCausalLM.from_pretrained(baked.out_dir)
    assert torch.equal(model.get_input_embeddings().weight[2000:], vectors)   # the learned vectors, as they are
    # The soft prompt really changes the model: without it the logits differ.
    assert gate.max_abs_logit_diff < 1e-3 < _plain_vs_peft(tiny_base, adapter)


def _plain_vs_peft(base: Path, adapter: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.soft_prompt import peft_logits

    ids = AutoTokenizer.from_pretrained(base)(TEXTS[0]).input_ids
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base)(torch.tensor([ids])).logits[0]
    return float((plain - peft_logits(base, adapter, [ids])[0]).abs().max())


def test_new_tokens_can_never_beat_the_best_real_token(tiny_base, tmp_path, one_torch_thread):
    """Their output rows are the real rows' mean, so their logit is the real logits' mean, for any
    hidden state (also ones no prompt produces); checked on random and adversarial hidden states."""
    import torch
    from transformers import AutoModelForCausalLM

    baked = bake_soft_prompt(BakeInput(tiny_base, trained(tiny_base, "prompt_tuning", tmp_path, 1), tmp_path / "b"))
    out = AutoModelForCausalLM.from_pretrained(baked.out_dir).get_output_embeddings().weight.detach()
    real, soft = out[:2000], out[baked.soft.token_ids]
    assert torch.allclose(soft, real.mean(0).expand_as(soft), atol=1e-6)
    torch.manual_seed(0)
    hidden = torch.cat([torch.randn(4096, 256) * scale for scale in (0.1, 1.0, 30.0)])
    hidden = torch.cat([hidden, soft[:1] * 50, -real * 10])   # aligned with the soft row, against real rows
    assert bool(((hidden @ soft.T).max(-1).values < (hidden @ real.T).max(-1).values).all())


def test_tied_bos_adding_scaled_base_is_untied_and_soft_tokens_go_before_bos(gemma_like_base, tmp_path,
                                                                          one_torch_thread):
    import torch
    from transformers import AutoModelForCausalLM

    for method in METHODS:
        adapter = trained(gemma_like_base, method, tmp_path)
        baked = bake_soft_prompt(BakeInput(gemma_like_base, adapter, tmp_path / f"{method}-baked"))
        assert baked.untied and baked.soft.bos_token == "<s>"
        gate = check_bake(CheckInput(gemma_like_base, adapter, baked.out_dir, TEXTS))
        assert gate.passed, gate
        model = AutoModelForCausalLM.from_pretrained(baked.out_dir)
        base = AutoModelForCausalLM.from_pretrained(gemma_like_base)
        assert not model.config.tie_word_embeddings
        assert torch.equal(model.get_output_embeddings().weight[:2000], base.get_input_embeddings().weight)
        scale = 64 ** 0.5   # gemma multiplies looked-up rows by sqrt(hidden); PEFT's vectors skip that
        rows = model.get_input_embeddings().weight[baked.soft.token_ids].detach()
        assert torch.allclose(rows * scale, soft_prompt_vectors(adapter), rtol=1e-3, atol=1e-4)


def test_the_gate_fails_a_wrong_bake(tiny_base, tmp_path, one_torch_thread):
    """Soft rows in the wrong order, or the soft prompt after BOS: the logit gate must say so."""
    from safetensors.torch import load_file, save_file

    adapter = trained(tiny_base, "prompt_tuning", tmp_path)
    baked = bake_soft_prompt(BakeInput(tiny_base, adapter, tmp_path / "baked"))
    weights = load_file(baked.out_dir / "model.safetensors")
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key][baked.soft.token_ids] = weights[key][baked.soft.token_ids].flip(0).clone()
    save_file(weights, baked.out_dir / "model.safetensors", metadata={"format": "pt"})
    gate = check_bake(CheckInput(tiny_base, adapter, baked.out_dir, TEXTS))
    assert not gate.passed and gate.max_abs_logit_diff > 10 * gate.tolerance


def test_prefix_tuning_and_lora_are_refused(tiny_base, tmp_path):
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, config in (("prefix", PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)),
                         ("lora", LoraConfig(r=2, target_modules=["q_proj"]))):
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config).save_pretrained(tmp_path / name)
        with pytest.raises(UserInputError, match="no soft prompt to bake"):
            bake_soft_prompt(BakeInput(tiny_base, tmp_path / name, tmp_path / f"{name}-baked"))
    assert not list(tmp_path.glob("*-baked"))


@pytest.mark.e2e
def test_smollm2_soft_prompt_reaches_the_gguf(tmp_path):
    """SmolLM2-135M-Instruct (ChatML, tied embeddings, no BOS): both methods baked, converted with
    the project's converter; llama.cpp reads the prefix text as the soft ids, marks them CONTROL,
    and its next-token logits on the held-out prompts are PEFT's. (HF-vs-HF is the unit tests' job.)"""
    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.gguf_import import import_gguf, tokenizer_metadata

    if not SMOLLM.is_file():
        pytest.skip(f"{SMOLLM} is missing: run scripts/fetch_models.sh")
    base = import_gguf(SMOLLM, tmp_path / "smollm-hf").hf_path
    held_out = render(base, demo_chats(2, skip=40), prompt_only=True)
    source = tokenizer_metadata(SMOLLM)
    adapters, ggufs = {}, {}
    for method in METHODS:
        adapter = adapters[method] = train_soft_prompt(base, method, tmp_path / f"{method}-adapter",
                                                       render(base, demo_chats(2)), steps=2)
        baked = bake_soft_prompt(BakeInput(base, adapter, tmp_path / f"{method}-baked"))
        assert baked.untied and baked.soft.bos_token is None and baked.soft.token_ids == list(range(49152, 49160))
        gguf = ggufs[method] = convert_to_gguf(ConvertInput(baked.out_dir, tmp_path / f"{method}.gguf", held_out[:1],
                                                            1e-2, tmp_path / "convert.log")).gguf_path
        meta = tokenizer_metadata(gguf)
        assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
        assert meta["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"] + baked.soft.tokens
        assert meta["tokenizer.ggml.token_type"][-8:] == [3] * 8   # CONTROL: parsed from the template text
        assert meta["tokenizer.ggml.merges"] == source["tokenizer.ggml.merges"]
        gate = gguf_gate(base, adapter, gguf, held_out, baked.soft.tokens)
        assert gate.id_mismatches == 0 and gate.top1_agreement == 1.0, gate
        assert gate.max_rel_logit_diff <= 1e-2 and gate.max_soft_margin < 0, gate
    # The gate can fail: the P-tuning GGUF is not the prompt-tuning adapter's model.
    wrong = gguf_gate(base, adapters["prompt_tuning"], ggufs["p_tuning"], held_out, baked.soft.tokens)
    assert wrong.max_rel_logit_diff > 1e-2, wrong


@pytest.fixture(scope="module")
def bos_base(tiny_base, tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that adds BOS, as Llama's and gemma's do."""
    folder = tmp_path_factory.mktemp("bos-base") / "base"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    (folder / "tokenizer.json").unlink(missing_ok=True)   # rebuilt from tokenizer.model with the setting
    return folder


def test_a_bos_adding_base_exports_with_the_template_writing_bos_after_the_soft_tokens(bos_base, tmp_path,
                                                                                     one_torch_thread):
    """The merge stage's float16 bake and the convert stage's GGUF for a base whose tokenizer adds
    BOS: the GGUF must add none itself (the TEMPLATE writes it after the soft tokens), and the
    soft-prompt gate must pass; the converter's own add_bos_token (true) fails it on ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.errors import StageError
    from ollama_ft.gguf_import import tokenizer_metadata
    from ollama_ft.soft_prompt import bake_for_export, export_gate

    adapter = trained(bos_base, "prompt_tuning", tmp_path)
    soft, check = bake_for_export(bos_base, adapter, tmp_path / "merged", TEXTS, chat_jinja="{{ 'x' }}")
    assert check.passed and soft.bos_token == "<s>" and soft.num_keep == 9
    assert soft.prefix == "".join(f"<|soft_prompt_{i}|>" for i in range(8)) + "<s>"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.float16
    assert not list(tmp_path.glob(".merged*"))   # the float32 staging copy is gone
    gate = export_gate(bos_base, adapter, soft, TEXTS, 0.05)
    out = convert_to_gguf(ConvertInput(tmp_path / "merged", tmp_path / "baked.gguf", TEXTS, 0.05,
                                       tmp_path / "convert.log", added_tokens=8, add_bos=False, extra_gate=gate))
    assert tokenizer_metadata(out.gguf_path)["tokenizer.ggml.add_bos_token"] is False
    assert tokenizer_metadata(out.gguf_path)["tokenizer.ggml.token_type"][-8:] == [3] * 8
    assert out.extra_gate["max_rel_logit_diff"] <= 0.05 and out.extra_gate["max_soft_margin"] < 0, out.extra_gate
    with pytest.raises(StageError, match="reads the template's soft-prompt prefix differently"):
        convert_to_gguf(ConvertInput(tmp_path / "merged", tmp_path / "bos-first.gguf", TEXTS, 0.05,
                                     tmp_path / "convert.log", extra_gate=gate))
    assert not (tmp_path / "bos-first.gguf").exists()   # a failed gate leaves no file
