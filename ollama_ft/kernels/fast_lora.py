"""Hand-written LoRA backward for the PEFT backend: `patch_peft_lora(model)` after `get_peft_model`.

PEFT computes a LoRA linear as `base(x) + B(A(dropout(x))) * s` through autograd, which records
a graph over the frozen base weight and launches separate kernels for each piece. Here one
autograd Function computes

    y  = x @ W^T (+ bias) + s * (x @ A^T) @ B^T
    dx = dy @ W + s * (dy @ B) @ A     dA = s * (dy @ B)^T @ x     dB = s * dy^T @ (x @ A^T)

saving only x and s * x @ A^T, with the products fused through addmm. A 4-bit bitsandbytes base
weight is dequantized on the fly in forward and backward, never kept dense. The parameters stay
where PEFT put them, so `save_pretrained` writes the same adapter. Layers this does not cover
(dropout, DoRA and other variants, several active adapters, merged, LoRA bias) keep PEFT's forward.

This is ollama-ft's own code on PEFT's modules; tests/test_fast_lora.py checks it against PEFT.
"""

from __future__ import annotations

import sys
import types

import torch
from peft.tuners.lora import layer as lora_layer


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast the matmuls run in its dtype, as PEFT's layers would; otherwise in x's.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as an (out, in) matrix of `dtype`; packed 4-bit data is dequantized here."""
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight, quant_state)
    return weight.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x @ W^T (+ bias) + scaling * (x @ A^T) @ B^T with W frozen; A is (r, in), B (out, r).

    For a bitsandbytes 4-bit base, `weight` is the packed data and `quant_state` its QuantState.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, quant_state=None):
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w = _dense_weight(weight, quant_state, dtype)
        # Scaling is folded into xa once, so forward's addmm and dB both reuse it.
        xa = torch.mm(x2, lora_a.to(dtype).t()).mul_(scaling)
        if bias is None:
            y = torch.mm(x2, w.t())
        else:
            y = torch.addmm(bias.to(dtype), x2, w.t())
        y.addmm_(xa, lora_b.to(dtype).t())
        # W is only referenced (never saved as an activation): it is frozen, and a 4-bit one
        # is dequantized again in backward rather than held dense between the two passes.
        ctx.save_for_backward(x2, xa, lora_a, lora_b)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.dtype = weight, quant_state, scaling, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)
        dx = dbias = da = db = None
        if need_x or need_a:
            dyb = torch.mm(dy2, lora_b.to(ctx.dtype)).mul_(ctx.scaling)  # s * dy @ B, (N, r)
        if need_x:
            dx = torch.mm(dy2, _dense_weight(ctx.weight, ctx.quant_state, ctx.dtype))
            dx.addmm_(dyb, lora_a.to(ctx.dtype))
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        if need_bias:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        if need_a:
            da = torch.mm(dyb.t(), x2).to(lora_a.dtype)
        if need_b:
            db = torch.mm(dy2.t(), xa).to(lora_b.dtype)
        return dx, None, dbias, da, db, None, None


def _bnb_linear4bit():
    # Never imported here: a layer can only be a bnb Linear4bit if bitsandbytes is already loaded.
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), "Linear4bit", None)


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import bnb as lora_bnb  # defines Linear4bit only when bitsandbytes works

    found = getattr(lora_bnb, "Linear4bit", None)
    return (lora_layer.Linear,) if found is None else (lora_layer.Linear, found)


def _fast_adapter(module) -> tuple[str, bool] | None:
    """(adapter, base is 4-bit) if this layer can run through LoraLinearFunction, else None; checked when patching."""
    adapters = module.active_adapters
    if len(adapters) != 1 or module.disable_adapters or module.merged:
        return None
    name = adapters[0]
    if (name not in module.lora_A or name in module.lora_variant or module.use_dora.get(name)
            or name in module.lora_magnitude_vector or module.lora_bias.get(name)
            or getattr(module, "fan_in_fan_out", False)
            or not isinstance(module.lora_dropout[name], torch.nn.Identity)):
        return None
    base = module.base_layer  # a nested wrapper is neither nn.Linear nor Linear4bit, so it stays with PEFT
    four_bit = _bnb_linear4bit()
    plain = type(base) is torch.nn.Linear and type(base.weight) in (torch.nn.Parameter, torch.Tensor)
    if not (plain or (four_bit is not None and isinstance(base, four_bit))):
        return None
    # accelerate's hooks (offload, device placement) live on the base layer, which the fast path bypasses.
    return None if "_hf_hook" in base.__dict__ or "_hf_hook" in module.__dict__ else (name, not plain)


def _fast_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Per call, only what training code changes: adapters switched, disabled or merged, the base unfrozen,
    # hooks added to it. Without autocast PEFT runs LoRA in A's dtype, so mixed dtypes go to PEFT too.
    (name, four_bit), base = self._fast_lora, self.base_layer
    weight, quant_state = base.weight, None
    if four_bit:  # bitsandbytes keeps the state on the weight; without it (or off CUDA) leave it to bnb
        weight, quant_state = weight.data, getattr(weight, "quant_state", None)
    if (args or kwargs or self.active_adapters != [name] or self.disable_adapters or self.merged
            or base.weight.requires_grad or base._forward_hooks or base._forward_pre_hooks
            or (four_bit and (quant_state is None or not x.is_cuda))
            or (not torch.is_autocast_enabled(x.device.type) and self.lora_A[name].weight.dtype != x.dtype)):
        return type(self).forward(self, x, *args, **kwargs)
    return LoraLinearFunction.apply(x, weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                    self.scaling[name], quant_state)


def patch_peft_lora(model: torch.nn.Module) -> int:
    """Route every qualifying PEFT LoRA linear through LoraLinearFunction; returns how many.

    Qualifies: one active adapter, dropout 0, plain LoRA (no DoRA or other variant, no LoRA bias),
    not merged, base an nn.Linear or a bitsandbytes Linear4bit with a frozen weight. Each call
    checks again that this adapter alone is active, unmerged and enabled, else it runs PEFT's
    forward. Only the instance's `forward` is replaced (parameter names are untouched, so
    `save_pretrained` is unchanged); patching twice is a no-op.
    """
    classes = _lora_linear_classes()
    patched = 0
    for module in model.modules():
        if not isinstance(module, classes):
            continue
        current = module.__dict__.get("forward")
        if getattr(current, "__func__", None) is _fast_lora_forward:
            patched += 1
        elif current is None and (fast := _fast_adapter(module)) is not None:
            module._fast_lora = fast
            module.forward = types.MethodType(_fast_lora_forward, module)
            patched += 1
    return patched
