"""The fused LM head + cross-entropy (ollama_ft/kernels/fused_ce.py) agrees with PyTorch and TRL.

The Function's loss and gradients are checked against `F.cross_entropy` in float64 and float32,
its metrics against TRL's chunked loss, and a patched tiny Llama against the unpatched one; then
the PEFT backend trains the tiny base a few steps with and without the switch. CPU, seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from ollama_ft.kernels import fused_ce  # noqa: E402
from ollama_ft.kernels.fused_ce import fused_linear_cross_entropy, patch_fused_cross_entropy  # noqa: E402

# Importing transformers in this process trips torch.jit's own deprecation notice.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

F = torch.nn.functional
DATA = Path(__file__).resolve().parent.parent / "data" / "turkish-demo.jsonl"
VOCAB, HIDDEN = 37, 16


def inputs(dtype=torch.float64, train_weight=True, seed=0, shape=(3, 9)):
    """Hidden states, an LM head weight and labels with a masked prompt in each row (18 labelled positions)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator, dtype=dtype) / 2).requires_grad_(train_weight)
    labels = torch.randint(0, VOCAB, shape, generator=generator)
    for row, prompt in enumerate((3, 5, 1)):
        labels[row, :prompt] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels, num_items_in_batch=None):
    """F.cross_entropy over full logits, summed and divided as SFTTrainer divides; and its gradients."""
    logits = (hidden[:, :-1] @ weight.t()).flatten(0, 1)
    targets = labels[:, 1:].flatten()
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    loss = F.cross_entropy(logits, targets, reduction="sum") / divisor
    return loss, grads(loss, hidden, weight)


def grads(loss, hidden, weight):
    wanted = [hidden] + ([weight] if weight.requires_grad else [])
    return torch.autograd.grad(loss, wanted)


@pytest.mark.parametrize("train_weight", [True, False], ids=["full", "frozen_head"])
@pytest.mark.parametrize("num_items_in_batch", [None, 40], ids=["local_mean", "num_items"])
@pytest.mark.parametrize("chunk_size", [4, 18, 1000])  # 18 labelled rows: uneven, exact, one chunk
def test_loss_and_gradients_match_cross_entropy_float64(chunk_size, num_items_in_batch, train_weight):
    hidden, weight, labels = inputs(train_weight=train_weight)
    loss, correct, entropy, valid = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch, chunk_size)
    want_loss, want_grads = reference(hidden, weight, labels, num_items_in_batch)
    assert valid.item() == 18
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(loss, hidden, weight), want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not correct.requires_grad and not entropy.requires_grad


def test_float32_and_a_tensor_divisor():
    hidden, weight, labels = inputs(dtype=torch.float32)
    num_items = torch.tensor(23)   # the Trainer passes a tensor
    loss, *_ = fused_linear_cross_entropy(hidden, weight, labels, num_items, chunk_size=5)
    want_loss, want_grads = reference(hidden, weight, labels, num_items)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(loss, hidden, weight), want_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_frozen_head_gets_no_gradient():
    hidden, weight, labels = inputs(train_weight=False)
    fused_linear_cross_entropy(hidden, weight, labels)[0].backward()
    assert weight.grad is None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("train_weight", [True, False], ids=["full", "frozen_head"])
def test_no_labelled_token_gives_zero_loss_and_zero_gradients(train_weight):
    hidden, weight, _ = inputs(train_weight=train_weight)
    labels = torch.full(hidden.shape[:2], -100)
    loss, correct, entropy, valid = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert (loss.item(), correct.item(), entropy.item(), valid.item()) == (0.0, 0, 0.0, 0)
    assert hidden.grad is not None and not hidden.grad.any()
    assert weight.grad is None if not train_weight else not weight.grad.any()


@pytest.mark.parametrize("num_items_in_batch", [None, 40], ids=["local_mean", "num_items"])
def test_loss_and_metrics_equal_trl_chunked_loss(num_items_in_batch):
    from trl.trainer.sft_trainer import _chunked_cross_entropy_loss

    hidden, weight, labels = inputs(dtype=torch.float32, shape=(4, 40), seed=3)   # TRL sums in float32
    # A head that mostly predicts the label, so the correct count is neither zero nor all.
    with torch.no_grad():
        hidden[:, :-1] += 3 * weight[labels[:, 1:].clamp(min=0)]
    got = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch, chunk_size=7)
    want = _chunked_cross_entropy_loss(hidden, weight, 256, labels=labels, num_items_in_batch=num_items_in_batch)
    loss, correct, entropy, valid = got
    torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-7)
    assert correct.item() == want[1].item() and valid.item() == want[3].item()
    torch.testing.assert_close(entropy, want[2], rtol=1e-5, atol=1e-5)
    assert 0 < correct.item() < valid.item()


def test_bf16_under_autocast_is_close_to_float32():
    hidden, weight, labels = inputs(dtype=torch.float32, shape=(4, 30))
    want = fused_linear_cross_entropy(hidden, weight, labels)[0]
    low_hidden = hidden.detach().bfloat16().requires_grad_()
    low_weight = weight.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, correct, entropy, _ = fused_linear_cross_entropy(low_hidden, low_weight, labels, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and low_hidden.grad.dtype == low_weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
    _, want_grads = reference(hidden, weight, labels)
    for got, ref in zip((low_hidden.grad, low_weight.grad), want_grads, strict=True):
        assert F.cosine_similarity(got.flatten().float(), ref.flatten(), dim=0) > 0.99


def tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, **config))


def test_patched_model_computes_the_model_loss_and_keeps_generation(monkeypatch):
    plain = tiny_llama()
    fused = copy.deepcopy(plain)
    assert patch_fused_cross_entropy(fused)
    calls = []
    real_apply = fused_ce.LinearCrossEntropyFunction.apply
    monkeypatch.setattr(fused_ce.LinearCrossEntropyFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    want = plain(input_ids=ids, labels=labels)
    got = fused(input_ids=ids, labels=labels, num_items_in_batch=None)
    assert calls == [1] and got.logits is None and got.num_valid_tokens.item() == 2 * 6
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():   # without labels: the model's own forward, logits and all
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert calls == [1]


def with_head_bias(model):
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    return model


def lora_on_head():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))


@pytest.mark.parametrize("make", [
    lambda: tiny_llama(final_logit_softcapping=30.0),
    lambda: tiny_llama(logit_scale=0.5),
    lambda: tiny_llama(output_router_logits=True),
    lambda: with_head_bias(tiny_llama()),
    lora_on_head,
], ids=["softcapping", "logit_scale", "router_logits", "head_bias", "lora_on_head"])
def test_heads_it_does_not_cover_are_left_alone(make):
    model = make()
    assert patch_fused_cross_entropy(model) is False
    assert not any("forward" in m.__dict__ for m in model.modules())


def train_tiny(base: Path, work: Path, speedups: list[str], examples: int = 12, max_seq_length: int = 256,
               **train):
    """The PEFT backend's LoRA training of `base` on the first demo examples, on CPU; `train` overrides settings."""
    from ollama_ft.backends import TrainJob
    from ollama_ft.recipe import ModelSection, TrainSection
    from ollama_ft.backends.peft_trl import PeftBackend
    from ollama_ft.chat_templates import load_family

    work.mkdir(parents=True)
    path = work / "examples.jsonl"
    path.write_text("".join(DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:examples]), encoding="utf-8")
    job = TrainJob(
        backend="peft", base_path=str(base), examples_path=str(path), validation_path=None,
        chat_jinja=load_family("chatml").jinja, output_dir=str(work / "trained"),
        checkpoint_dir=str(work / "checkpoints"),
        model=ModelSection(base=str(base), max_seq_length=max_seq_length, dtype="float32").model_dump(),
        train=TrainSection(**{"rank": 8, "alpha": 16, "max_steps": 3, "learning_rate": 1e-2,
                              "gradient_checkpointing": False, "assistant_only_loss": True, "logging_steps": 1,
                              "save_steps": 1000, "speedups": speedups, **train}).model_dump(),
        assistant_only_loss=True, log_path=str(work / "train.log"), device="cpu")
    return PeftBackend().train(job, lambda event: None)


def test_lora_training_follows_the_same_loss_curve(tiny_base, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    plain = train_tiny(tiny_base, tmp_path / "plain", [])
    calls = []
    real_apply = fused_ce.LinearCrossEntropyFunction.apply
    monkeypatch.setattr(fused_ce.LinearCrossEntropyFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    fused = train_tiny(tiny_base, tmp_path / "fused", ["fused_ce"])
    assert plain.speedups == [] and fused.speedups == ["fused_ce"] and len(calls) == 3
    curves = [[h["loss"] for h in result.loss_history] for result in (plain, fused)]
    assert len(curves[0]) == 3 and curves[0][-1] < curves[0][0]
    for want, got in zip(*curves, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want), curves   # float32 sums in another order only
    adapters = [load_file(Path(r.output_dir) / "adapter_model.safetensors") for r in (plain, fused)]
    assert adapters[0].keys() == adapters[1].keys()
    # Adam divides tiny gradients by their own size, so single elements may differ by more than the whole.
    for name, want in adapters[0].items():
        assert (adapters[1][name] - want).norm() <= 1e-3 * want.norm(), name
