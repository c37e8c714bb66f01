"""The hand-written LoRA backward (ollama_ft/kernels/fast_lora.py) agrees with PEFT's autograd.

A tiny random Llama is wrapped with PEFT, copied, and one copy patched; logits, gradients, a few
optimizer steps and the saved adapter must match the unpatched copy. CPU, fp32, a few seconds;
the bf16-autocast and 4-bit checks need CUDA and are skipped without it.
"""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from ollama_ft.kernels.fast_lora import LoraLinearFunction, patch_peft_lora  # noqa: E402

LAYERS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))


def lora_model(base=None, **lora_kwargs):
    """The tiny Llama with LoRA on every linear layer and a non-zero B, so LoRA changes the output."""
    from peft import LoraConfig, get_peft_model

    settings = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear") | lora_kwargs
    model = get_peft_model(base if base is not None else tiny_llama(), LoraConfig(**settings))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def batch(seed=2, size=(2, 12)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, size, generator=generator)


def loss_and_grads(model, ids):
    """Loss, logits and the gradients of every LoRA parameter and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    grads["inputs_embeds"] = embeds.grad.clone()
    return out.loss.detach(), out.logits.detach(), grads


def count_calls(monkeypatch):
    calls = []
    real_apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    return calls


def assert_same_grads(fast, slow, rtol=1e-4, atol=1e-6):
    assert fast.keys() == slow.keys() and len(fast) == 2 * 2 * LAYERS_PER_BLOCK + 1
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=rtol, atol=atol, msg=name)


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_(grad)

    x, w, a, b = rand(2, 3, 5), rand(4, 5, grad=False), rand(2, 5), rand(4, 2)
    assert torch.autograd.gradcheck(LoraLinearFunction.apply, (x, w, rand(4), a, b, 1.5))
    assert torch.autograd.gradcheck(LoraLinearFunction.apply, (x, w, None, a, b, 0.5))
    # Only A and B trainable, as for the first layer whose input needs no gradient.
    assert torch.autograd.gradcheck(LoraLinearFunction.apply, (rand(3, 5, grad=False), w, None, a, b, 2.0))


def test_packed_4bit_weight_is_dequantized_in_both_passes():
    # bitsandbytes also quantizes on CPU, so the Function's 4-bit plumbing is checked without a GPU.
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    packed, state = functional.quantize_4bit(torch.randn(32, 64), quant_type="nf4", blocksize=64)
    dense = functional.dequantize_4bit(packed, state)
    x, a, b = (torch.randn(*shape, requires_grad=True) for shape in [(2, 5, 64), (4, 64), (32, 4)])
    results = []
    for weight, quant_state in [(packed, state), (dense, None)]:
        y = LoraLinearFunction.apply(x, weight, None, a, b, 2.0, quant_state)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, a, b))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forward_and_gradients_match_peft(monkeypatch):
    slow = lora_model()
    fast = copy.deepcopy(slow)
    assert patch_peft_lora(fast) == 2 * LAYERS_PER_BLOCK
    calls = count_calls(monkeypatch)
    ids = batch()
    loss_fast, logits_fast, grads_fast = loss_and_grads(fast, ids)
    assert len(calls) == 2 * LAYERS_PER_BLOCK  # every LoRA layer went through the fast path
    loss_slow, logits_slow, grads_slow = loss_and_grads(slow, ids)
    assert len(calls) == 2 * LAYERS_PER_BLOCK
    torch.testing.assert_close(logits_fast, logits_slow, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads_fast, grads_slow)
    assert all(g.abs().sum() > 0 for g in grads_fast.values())


def test_gradient_checkpointing_non_reentrant(monkeypatch):
    slow = lora_model()
    fast = copy.deepcopy(slow)
    patch_peft_lora(fast)
    for model in (slow, fast):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    calls = count_calls(monkeypatch)
    ids = batch()
    loss_fast, logits_fast, grads_fast = loss_and_grads(fast, ids)
    assert len(calls) == 2 * 2 * LAYERS_PER_BLOCK  # forward, then the recomputation in backward
    loss_slow, logits_slow, grads_slow = loss_and_grads(slow, ids)
    torch.testing.assert_close(logits_fast, logits_slow, rtol=0, atol=1e-5)
    assert_same_grads(grads_fast, grads_slow)


def test_training_steps_follow_the_same_loss_curve():
    def curve(model):
        torch.manual_seed(3)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(5):
            ids = batch(seed=10 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    slow = lora_model()
    fast = copy.deepcopy(slow)
    patch_peft_lora(fast)
    fast_losses, slow_losses = curve(fast), curve(slow)
    assert fast_losses[-1] < fast_losses[0]
    for f, s in zip(fast_losses, slow_losses):
        assert abs(f - s) <= 1e-4 * abs(s), (fast_losses, slow_losses)


@pytest.mark.parametrize("lora_kwargs", [{"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}],
                         ids=["dropout", "dora", "lora_bias"])
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_layers_it_does_not_cover_keep_peft_forward(lora_kwargs):
    model = lora_model(**lora_kwargs)
    assert patch_peft_lora(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_disabled_adapter_falls_back_to_peft(monkeypatch):
    slow = lora_model()
    fast = copy.deepcopy(slow)
    patch_peft_lora(fast)
    calls = count_calls(monkeypatch)
    ids = batch()
    with fast.disable_adapter(), slow.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, slow(input_ids=ids).logits, rtol=0, atol=0)
    assert calls == []


def test_saved_adapter_is_the_same(tmp_path):
    from safetensors.torch import load_file

    slow = lora_model()
    fast = copy.deepcopy(slow)
    patch_peft_lora(fast)
    slow.save_pretrained(tmp_path / "slow")
    fast.save_pretrained(tmp_path / "fast")
    slow_tensors = load_file(tmp_path / "slow" / "adapter_model.safetensors")
    fast_tensors = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert sorted(fast_tensors) == sorted(slow_tensors) and len(slow_tensors) == 2 * 2 * LAYERS_PER_BLOCK
    for name, tensor in slow_tensors.items():
        assert torch.equal(fast_tensors[name], tensor), name

    def config(folder):
        settings = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        return settings | {"target_modules": sorted(settings["target_modules"])}  # PEFT saves a set

    assert config("fast") == config("slow")


def assert_close_under_bf16_autocast(fast, slow, monkeypatch):
    """bf16 rounds differently along the two paths, so values agree loosely and gradients by direction."""
    calls = count_calls(monkeypatch)
    ids = batch().cuda()
    results = []
    for model in (fast, slow):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, ids))
    assert len(calls) == 2 * LAYERS_PER_BLOCK
    (loss_fast, logits_fast, grads_fast), (loss_slow, logits_slow, grads_slow) = results
    torch.testing.assert_close(logits_fast.float(), logits_slow.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-2, atol=1e-2)
    for name in grads_slow:
        assert grads_fast[name].dtype == grads_slow[name].dtype, name  # fp32 params get fp32 grads
        cosine = torch.nn.functional.cosine_similarity(grads_fast[name].flatten().float(),
                                                       grads_slow[name].flatten().float(), dim=0)
        assert cosine > 0.99, (name, cosine.item())


@needs_cuda
def test_bf16_autocast_on_cuda(monkeypatch):
    slow = lora_model().cuda()
    fast = copy.deepcopy(slow)
    assert patch_peft_lora(fast) == 2 * LAYERS_PER_BLOCK
    assert_close_under_bf16_autocast(fast, slow, monkeypatch)


@needs_cuda
def test_4bit_base_on_cuda(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)

    def load():  # twice rather than deepcopy: the same seeds give the same quantized base and LoRA
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map={"": 0})
        torch.manual_seed(0)
        return lora_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False))

    slow, fast = load(), load()
    assert patch_peft_lora(fast) == 2 * LAYERS_PER_BLOCK
    assert_close_under_bf16_autocast(fast, slow, monkeypatch)
