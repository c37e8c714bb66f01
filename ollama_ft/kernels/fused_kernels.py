"""Triton kernels for RMSNorm, rotary embeddings and SwiGLU: `patch_model(model, switches)`.

In a Llama-family decoder these three are chains of small elementwise PyTorch ops, each reading
and writing the whole activation and each leaving tensors for autograd to keep. Here each one is
a single kernel forward and a single kernel backward (`fused_rmsnorm`, `fused_rope`,
`fused_swiglu` in speedups.py), computed in float32 and rounded where transformers rounds:

    RMSNorm   y = w * cast(x * rsqrt(mean(x²) + eps))             saves x and one float per row
    rotary    y = x * cos + rotate_half(x) * sin                   backward: the transposed rotation
    SwiGLU    h = silu(g) * u                                      backward recomputes silu(g)

`patch_model` changes only what is already computed in the same way, which it checks by running
each module once on a small random input against the formula above: an RMSNorm with another
weighting (Gemma's 1 + w), a rotary function with another layout or an MLP with another
activation stay as they are. Parameters are untouched, so saving is unchanged. Kernels run on
CUDA; on CPU only under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.

This is ollama-ft's own code on transformers' modules; tests/test_fused_kernels.py checks it
against transformers' LlamaRMSNorm, apply_rotary_pos_emb and LlamaMLP.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only PyTorch builds ship without Triton; available() is then False
    triton = tl = None

    def jit(fn):
        return fn

# Triton decides at decoration time whether a kernel is interpreted, so this is read once, here.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device) -> bool:
    """Whether the kernels can run on `device`: CUDA with Triton, or CPU under Triton's interpreter."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (kind == "cpu" and _INTERPRETED))


def _runs_here(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or (_INTERPRETED and tensor.device.type == "cpu")


def _check_device(*tensors: torch.Tensor) -> None:
    if not all(_runs_here(t) and t.device == tensors[0].device for t in tensors):
        raise ValueError(f"fused kernels need CUDA tensors on one device, got {[str(t.device) for t in tensors]}")


def _warps(block: int) -> int:
    # One row per program: wider rows get more warps so each thread keeps a few elements.
    return min(32, max(4, block // 512))


# ---- RMSNorm -------------------------------------------------------------------------------

@jit
def _rmsnorm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # transformers rounds the normalized row to the input dtype before the weight multiplies it.
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _rmsnorm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program,
                             BLOCK: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    dy_ptr += first * n_cols
    x_ptr += first * n_cols
    dx_ptr += first * n_cols
    for row in range(first, last):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dn = dy * w
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        dy_ptr += n_cols
        x_ptr += n_cols
        dx_ptr += n_cols
    if WEIGHT_GRAD:  # this program's rows only; the host sums the programs' rows of partial sums
        tl.store(dw_ptr + program * n_cols + cols, dw, mask=mask)


def _backward_split(device: torch.device, rows: int) -> tuple[int, int]:
    """(rows per program, programs) for the weight-gradient reduction: a few programs per SM."""
    # The interpreter runs programs one after another; a few still exercise the reduction.
    slots = torch.cuda.get_device_properties(device).multi_processor_count * 4 if device.type == "cuda" else 4
    per_program = triton.cdiv(rows, min(rows, slots))
    return per_program, triton.cdiv(rows, per_program)


class RMSNormFunction(torch.autograd.Function):
    """LlamaRMSNorm: weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype) over the last dim."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        _check_device(x, weight)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        weight = weight.contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        _rmsnorm_forward_kernel[(rows,)](x2, weight, y, rstd, cols, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        weight_grad = ctx.needs_input_grad[1]
        per_program, programs = _backward_split(x2.device, rows)
        # Without a weight gradient the kernel never touches dw_ptr; dx stands in for it.
        partial = torch.empty((programs, cols), dtype=torch.float32, device=x2.device) if weight_grad else dx
        block = triton.next_power_of_2(cols)
        _rmsnorm_backward_kernel[(programs,)](dy2, x2, weight, rstd, dx, partial, rows, cols, per_program,
                                              BLOCK=block, WEIGHT_GRAD=weight_grad, num_warps=_warps(block))
        dw = partial.sum(0).to(weight.dtype) if weight_grad else None
        return dx.view(ctx.shape), dw, None


def _rmsnorm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_runs_here(x) and x.device == weight.device and x.numel() > 0 and weight.dim() == 1
            and x.shape[-1] == weight.numel() <= 65536)


def _rmsnorm_eps(module) -> float | None:
    eps = getattr(module, "variance_epsilon", None)   # Llama's name; others say eps
    return getattr(module, "eps", None) if eps is None else eps


def _fused_rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _rmsnorm_fits(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, _rmsnorm_eps(self))


def _rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# ---- Rotary embeddings ---------------------------------------------------------------------

@jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, seq_len, n_heads, half,
                   x_stride_b, x_stride_h, x_stride_s, y_stride_b, y_stride_h, y_stride_s, cs_stride_b,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    # One program per (batch, position) and block of heads: cos and sin are read once for them all.
    position = tl.program_id(0)
    b = (position // seq_len).to(tl.int64)
    s = (position % seq_len).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < half
    mask = (heads[:, None] < n_heads) & dim_mask[None, :]

    cs = b * cs_stride_b + s * 2 * half
    c1 = tl.load(cos_ptr + cs + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs + half + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs + half + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]

    x_row = x_ptr + b * x_stride_b + s * x_stride_s + heads[:, None] * x_stride_h + dims[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation: by -θ when sin's halves are equal, as RoPE's are
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:         # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_row = y_ptr + b * y_stride_b + s * y_stride_s + heads[:, None] * y_stride_h + dims[None, :]
    tl.store(y_row, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
            backward: bool) -> torch.Tensor:
    """The rotary kernel over x (B, H, S, D) in any layout with unit last stride; cos, sin (B or 1, S, D)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x, dtype=out_dtype)   # keeps x's layout, as the unfused elementwise ops do
    batch, heads, seq_len, dim = x.shape
    block_d = triton.next_power_of_2(dim // 2)
    block_h = min(triton.next_power_of_2(heads), max(1, 2048 // block_d))
    grid = (batch * seq_len, triton.cdiv(heads, block_h))
    # cos/sin with batch 1 (positions shared by every row) are read through a zero batch stride.
    _rotary_kernel[grid](x, cos, sin, y, seq_len, heads, dim // 2, x.stride(0), x.stride(1), x.stride(2),
                         y.stride(0), y.stride(1), y.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0,
                         BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward)
    return y


class RotaryFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin for x (B, H, S, D) and cos, sin (B or 1, S, D), broadcast over heads."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        _check_device(x, cos, sin)
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, ctx.x_dtype, backward=True), None, None


def _rotary_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and x.numel() > 0
            and x.shape[-1] % 2 == 0 and cos.shape[1:] == x.shape[2:] and cos.shape[0] in (1, x.shape[0])
            and cos.dtype == sin.dtype and not (cos.requires_grad or sin.requires_grad)
            and _runs_here(x) and x.device == cos.device == sin.device)


def _fused_rotary(original):
    """A drop-in for a modeling module's `apply_rotary_pos_emb`; falls back to `original` off its cases."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim == 1 and _rotary_fits(q, cos, sin) and _rotary_fits(k, cos, sin):
            return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.fused_original = original
    return apply_rotary_pos_emb


def _rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(1) + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.unsqueeze(1)


# ---- SwiGLU --------------------------------------------------------------------------------

@jit
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # transformers rounds silu(g) to g's dtype before multiplying by u.
    act = (g * tl.sigmoid(g)).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offsets, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = (g * sig).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offsets, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    tl.store(dg_ptr + offsets, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, elementwise; only gate and up are saved, silu is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        _check_device(gate, up)
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = h.numel()
        _swiglu_forward_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, h, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](dh.contiguous(), gate, up, dg, du, n,
                                                                  BLOCK=_SWIGLU_BLOCK)
        return dg, du


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _runs_here(x):
        return type(self).forward(self, x)
    # Called as modules, so PEFT's LoRA layers (and fast_lora's) still apply on the projections.
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


# ---- Patching ------------------------------------------------------------------------------

def _same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    # Loose enough for bf16 rounding, far tighter than a different formula (another weighting,
    # activation or rotation layout changes the result by tens of percent).
    actual, expected = actual.float(), expected.float()
    return bool((actual - expected).norm() <= 1e-2 * expected.norm())


@contextlib.contextmanager
def _probing(module: torch.nn.Module):
    """No autograd and eval mode (no dropout) for one probe, each submodule's mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _probe_input(generator: torch.Generator, *shape: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A generator of its own, so patching leaves the global RNG (the training seed) untouched.
    return torch.randn(*shape, generator=generator).to(device=like.device, dtype=dtype)


def _is_patched(module: torch.nn.Module, forward) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is forward


def _patch_rmsnorms(model: torch.nn.Module, dtype: torch.dtype, generator: torch.Generator) -> int:
    patched = 0
    for module in model.modules():
        weight, eps = getattr(module, "weight", None), _rmsnorm_eps(module)
        if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and eps is not None):
            continue
        if _is_patched(module, _fused_rmsnorm_forward):
            patched += 1
        # A forward already set on the instance is a hook's (accelerate's): that module stays as it is.
        elif "forward" not in module.__dict__ and weight.dim() == 1:
            x = _probe_input(generator, 3, weight.numel(), like=weight, dtype=dtype)
            with _probing(module):
                same = _same(type(module).forward(module, x), _rmsnorm_reference(x, weight, eps))
            if same:
                module.forward = types.MethodType(_fused_rmsnorm_forward, module)
                patched += 1
    return patched


def _has_llama_rotation(function) -> bool:
    """Whether `function` is apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) with rotate_half."""
    try:
        if list(inspect.signature(function).parameters) != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
            return False
        generator = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 3, 5, 8, generator=generator), torch.randn(2, 1, 5, 8, generator=generator)
        cos, sin = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
        q_out, k_out = function(q, k, cos, sin)
    except Exception:  # any failure on Llama-shaped inputs means it is not Llama's function
        return False
    return _same(q_out, _rotary_reference(q, cos, sin)) and _same(k_out, _rotary_reference(k, cos, sin))


def _patch_rotary(model: torch.nn.Module) -> int:
    # The function is looked up in the attention's modeling module at each call, so replacing it
    # there changes every model of that family in this process. That is fine: each training runs
    # in its own worker subprocess, and the replacement falls back to the original off CUDA.
    modeling = {type(m.self_attn).__module__ for m in model.modules()
                if isinstance(getattr(m, "self_attn", None), torch.nn.Module)}
    patched = 0
    for name in sorted(modeling):
        module = sys.modules[name]
        current = getattr(module, "apply_rotary_pos_emb", None)
        if hasattr(current, "fused_original"):
            patched += 1
        elif current is not None and _has_llama_rotation(current):
            module.apply_rotary_pos_emb = _fused_rotary(current)
            patched += 1
    return patched


def _patch_mlps(model: torch.nn.Module, dtype: torch.dtype, generator: torch.Generator) -> int:
    patched = 0
    for module in model.modules():
        if not all(isinstance(getattr(module, n, None), torch.nn.Module)
                   for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        hidden = getattr(module.gate_proj, "in_features", None)
        if _is_patched(module, _fused_mlp_forward):
            patched += 1
        elif "forward" not in module.__dict__ and hidden is not None:
            x = _probe_input(generator, 3, hidden, like=next(module.parameters()), dtype=dtype)
            with _probing(module):
                expected = module.down_proj(F.silu(module.gate_proj(x)) * module.up_proj(x))
                same = _same(type(module).forward(module, x), expected)
            if same:
                module.forward = types.MethodType(_fused_mlp_forward, module)
                patched += 1
    return patched


def patch_model(model: torch.nn.Module, switches) -> list[str]:
    """Route `model`'s RMSNorms, rotary embeddings and SwiGLU MLPs through the kernels named in `switches`.

    `model` is a Llama-family transformers model, plain or wrapped by PEFT. Returns the switches
    that changed something (or had already); patching twice is a no-op. A patched module checks
    each call that its input is where the kernels run (else it computes as before), so call this
    only where `available(device)`: CUDA, or CPU under the interpreter in tests.
    """
    embeddings = model.get_input_embeddings()
    dtype = embeddings.weight.dtype   # the activations' dtype, for the probes
    generator = torch.Generator().manual_seed(0)
    applied = []
    if "fused_rmsnorm" in switches and _patch_rmsnorms(model, dtype, generator):
        applied.append("fused_rmsnorm")
    if "fused_rope" in switches and _patch_rotary(model):
        applied.append("fused_rope")
    if "fused_swiglu" in switches and _patch_mlps(model, dtype, generator):
        applied.append("fused_swiglu")
    return applied
