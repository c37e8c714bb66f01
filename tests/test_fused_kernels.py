"""The Triton kernels of the PEFT backend (ollama_ft/kernels/fused_kernels.py) agree with transformers.

The kernels run on CPU through Triton's interpreter, which has to be on before Triton is
imported; so the checks below run in a separate `python tests/test_fused_kernels.py WORK CHECK...`
with TRITON_INTERPRET=1 (one process for all of them: importing transformers and PEFT is most of
the time), and each test asserts on its check's outcome. That process takes half a minute, so it
is this module's `early_process` (tests/conftest.py): it starts when collection ends and runs
beside the other tests. Without the interpreter the backend drops the three switches on CPU:
tests/test_speedups.py checks that in-process. Shapes are small and odd (the interpreter runs each
program in Python): non-power-of-two widths exercise the masks, odd row counts the weight-gradient
reduction.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
SWITCHES = ["fused_rmsnorm", "fused_rope", "fused_swiglu"]
DTYPES = (torch.float32, torch.bfloat16)
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")


# patched_lora runs before backend: the backend then finds the rotary function already replaced,
# which it must count as applied.
CHECKS = ["rmsnorm", "rotary", "swiglu", "other_families", "patched_lora", "backend"]


def early_process(folder: Path) -> dict:
    """The checks' process under Triton's interpreter; it prints name -> {"error": traceback or
    None, "value": returned} as its last line."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {"args": [sys.executable, __file__, str(folder), *CHECKS], "env": env, "cwd": ROOT}


if not HAVE_TRITON:
    early_process = None   # noqa: F811 -- the tests skip, so nothing to start


def outcome(results: dict[str, dict], name: str):
    """The check's return value; its traceback as the failure when it raised."""
    if results[name]["error"]:
        pytest.fail(f"check_{name}:\n{results[name]['error']}", pytrace=False)
    return results[name]["value"]


@pytest.fixture(scope="module")
def interpreted(early_result) -> dict[str, dict]:
    done = early_result
    assert done.returncode == 0, f"the checks' process failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.splitlines()[-1])   # the trainer prints its logs before


@needs_triton
@pytest.mark.parametrize("kernel", ["rmsnorm", "rotary", "swiglu"])
def test_kernel_matches_transformers(interpreted, kernel):
    outcome(interpreted, kernel)


@needs_triton
def test_patched_lora_model_matches_unpatched(interpreted):
    outcome(interpreted, "patched_lora")


@needs_triton
def test_only_modules_computing_the_llama_formula_are_patched(interpreted):
    outcome(interpreted, "other_families")


@needs_triton
def test_backend_keeps_the_switches_where_the_kernels_run(interpreted):
    assert outcome(interpreted, "backend") == {"available": True, "speedups": SWITCHES}


# ---- The checks, run in a separate process by the tests above ------------------------------

def assert_agrees(actual, expected, name: str, bf16: bool) -> None:
    """Float32: equal to rounding. With bf16 anywhere: a few ulps of the tensor's scale, because
    transformers rounds to bf16 between its ops while the kernels compute in float32 and round once
    (and the interpreter rounds float32 to bf16 toward zero, where GPUs round to nearest even)."""
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    if bf16:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale,
                                   msg=lambda m: f"{name}: {m}")
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def outputs_and_grads(function, inputs: list) -> list:
    """function(*inputs), then the gradients of the inputs that require them for a fixed random dy."""
    out = function(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    generator = torch.Generator().manual_seed(1)
    dys = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in outs]
    return outs + list(torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], dys))


def check_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ollama_ft.kernels.fused_kernels import RMSNormFunction

    # (input, weight) dtypes: as loaded, and a float32 weight on bf16 activations (output float32).
    for x_dtype, w_dtype in [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)]:
        for weight_grad in (True, False):   # full fine-tuning trains the norm; LoRA freezes it
            generator = torch.Generator().manual_seed(0)
            norm = LlamaRMSNorm(100, eps=1e-5).to(w_dtype)
            norm.weight.data = (1 + 0.3 * torch.randn(100, generator=generator)).to(w_dtype)
            norm.weight.requires_grad_(weight_grad)
            x = (3 * torch.randn(3, 7, 100, generator=generator)).to(x_dtype).requires_grad_()
            expected = outputs_and_grads(lambda x, w: norm(x), [x, norm.weight])
            actual = outputs_and_grads(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), [x, norm.weight])
            assert len(actual) == len(expected) == 2 + weight_grad
            for name, a, e in zip(["y", "dx", "dw"], actual, expected):
                assert_agrees(a, e, f"rmsnorm {x_dtype} {w_dtype} {name}", bf16=x_dtype == torch.bfloat16)


def check_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ollama_ft.kernels.fused_kernels import RotaryFunction

    def fused(q, k, cos, sin):
        return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)

    for dtype in DTYPES:
        for cos_batch in (1, 2):   # positions shared by the batch (transformers' default) or per row
            generator = torch.Generator().manual_seed(0)
            # q as the attention makes it, a transposed view of (B, S, H, D); 5 and 3 heads, D = 12.
            q = torch.randn(2, 7, 5, 12, generator=generator).to(dtype).transpose(1, 2).requires_grad_()
            k = torch.randn(2, 3, 7, 12, generator=generator).to(dtype).requires_grad_()
            # Random cos and sin, not RoPE's (equal halves), check the formula and its exact transpose.
            cos, sin = (torch.randn(cos_batch, 7, 12, generator=generator).to(dtype) for _ in range(2))
            expected = outputs_and_grads(apply_rotary_pos_emb, [q, k, cos, sin])
            actual = outputs_and_grads(fused, [q, k, cos, sin])
            for name, a, e in zip(["q", "k", "dq", "dk"], actual, expected):
                assert_agrees(a, e, f"rotary {dtype} cos batch {cos_batch} {name}", bf16=dtype == torch.bfloat16)
            assert actual[0].stride() == expected[0].stride()   # the layout SDPA would have seen


def check_swiglu():
    from ollama_ft.kernels.fused_kernels import SwiGLUFunction

    for dtype in DTYPES:
        generator = torch.Generator().manual_seed(0)
        gate, up = ((2 * torch.randn(3, 7, 101, generator=generator)).to(dtype).requires_grad_() for _ in range(2))
        expected = outputs_and_grads(lambda g, u: torch.nn.functional.silu(g) * u, [gate, up])
        actual = outputs_and_grads(SwiGLUFunction.apply, [gate, up])
        for name, a, e in zip(["h", "dgate", "dup"], actual, expected):
            assert_agrees(a, e, f"swiglu {dtype} {name}", bf16=dtype == torch.bfloat16)


def count_kernel_calls() -> Counter:
    from ollama_ft.kernels import fused_kernels

    calls: Counter = Counter()
    for function in (fused_kernels.RMSNormFunction, fused_kernels.RotaryFunction, fused_kernels.SwiGLUFunction):
        real = function.apply
        function.apply = lambda *args, real=real, name=function.__name__: calls.update([name]) or real(*args)
    return calls


def lora_logits_and_grads(model, ids):
    """Logits and the gradients of every trainable parameter (LoRA and the norms) and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), {**grads, "inputs_embeds": embeds.grad}


def check_patched_lora(base_path: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ollama_ft.kernels.fused_kernels import patch_model

    ids = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(2))
    models, expected = {}, {}
    # Both references before any patching: the rotary patch changes the modeling module for all models.
    for dtype in DTYPES:
        torch.manual_seed(0)   # the same LoRA A in both dtypes: float32 is the truth bf16 is measured against
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype),
                               LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:   # PEFT starts B at zero; non-zero, LoRA changes the output and its grads
                param.data = 0.05 * torch.randn(param.shape, generator=generator).to(param.dtype)
            if "norm" in name:     # as full fine-tuning does, so the weight gradient is checked too
                param.requires_grad_(True)
        models[dtype], expected[dtype] = model, lora_logits_and_grads(model, ids)

    calls = count_kernel_calls()
    patched = {}
    for dtype, model in models.items():
        assert patch_model(model, SWITCHES) == SWITCHES
        assert patch_model(model, SWITCHES) == SWITCHES   # twice is a no-op
        patched[dtype] = lora_logits_and_grads(model, ids)
        assert patched[dtype][1].keys() == expected[dtype][1].keys()
    # Per model: 9 norms, 4 layers x (q, k), 4 MLPs; each forward once.
    assert calls == {"RMSNormFunction": 18, "RotaryFunction": 16, "SwiGLUFunction": 8}, calls
    assert sum("lora_" in name for name in expected[torch.float32][1]) == 4 * 7 * 2

    logits, grads = patched[torch.float32]
    want_logits, want_grads = expected[torch.float32]
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # bf16 through four layers drifts from float32 either way; patched, each tensor must stay about
    # as close to float32 as transformers' own bf16 run. The bound is 2.5x, not ~1x, because the
    # interpreter rounds float32 to bf16 toward zero (GPUs round to nearest even).
    def error(tensor, name):
        truth = want_logits if name == "logits" else want_grads[name]
        return ((tensor.float() - truth).norm() / truth.norm()).item()

    (bf16_logits, bf16_grads), (ref_logits, ref_grads) = patched[torch.bfloat16], expected[torch.bfloat16]
    for name, actual, reference in [("logits", bf16_logits, ref_logits),
                                    *((n, bf16_grads[n], ref_grads[n]) for n in want_grads)]:
        assert error(actual, name) <= 2.5 * error(reference, name) + 1e-3, (name, error(actual, name),
                                                                            error(reference, name))


def check_other_families():
    """Gemma's RMSNorm weighs by 1 + w and its MLP uses GELU: only its rotary (Llama's) is patched.
    Cohere's rotary interleaves the halves: only its SwiGLU MLP is patched. Logits stay the same."""
    from transformers import CohereConfig, CohereForCausalLM, GemmaConfig, GemmaForCausalLM

    from ollama_ft.kernels.fused_kernels import patch_model

    shape = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, vocab_size=64)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    for model_class, config, switches in [(GemmaForCausalLM, GemmaConfig(**shape), ["fused_rope"]),
                                          (CohereForCausalLM, CohereConfig(**shape), ["fused_swiglu"])]:
        torch.manual_seed(0)
        model = model_class(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(std=0.3)
            expected = model(ids).logits
            assert patch_model(model, SWITCHES) == switches, model_class
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)


def check_backend(base_path: str, work: str) -> dict:
    """One optimizer step of the PEFT backend asking for the three switches: what it kept. One
    example (26 tokens): the interpreter's time grows with the positions, and patched_lora has
    already compared the patched model's logits and gradients with transformers'."""
    from ollama_ft.kernels import fused_kernels
    from test_fused_ce import train_tiny

    result = train_tiny(Path(base_path), Path(work) / "backend", list(SWITCHES), examples=1, max_seq_length=64,
                        rank=4, alpha=8, max_steps=1, learning_rate=1e-3, batch_size=1)
    return {"available": fused_kernels.available("cpu"), "speedups": result.speedups}


def main(work: str, *names: str) -> None:
    from ollama_ft.tiny import ensure_tiny_base

    torch.set_num_threads(1)   # the machines running the suite are small and shared
    # Its own tiny base: the session's is built later, by the first test that needs it.
    base_path = str(ensure_tiny_base("tiny:llama", Path(work) / "_bases"))
    checks = {"rmsnorm": check_rmsnorm, "rotary": check_rotary, "swiglu": check_swiglu,
              "other_families": check_other_families, "patched_lora": lambda: check_patched_lora(base_path),
              "backend": lambda: check_backend(base_path, work)}
    results = {}
    for name in names:
        try:
            results[name] = {"error": None, "value": checks[name]()}
        except Exception:
            results[name] = {"error": traceback.format_exc(), "value": None}
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
