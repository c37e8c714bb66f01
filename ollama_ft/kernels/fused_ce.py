"""Fused LM head and cross-entropy for the PEFT backend: `patch_fused_cross_entropy(model)` after SFTTrainer.

TRL's default loss (`loss_type="chunked_nll"`) already skips the LM head on ignored positions and
computes the loss 256 tokens at a time, but it runs each chunk under activation checkpointing: the
chunk's (tokens × vocabulary) matmul and float32 softmax are computed again in backward, together
with its accuracy and entropy. Here one autograd Function does the work once, in forward:

    logits = h @ W^T     loss = logsumexp(logits) - logits[label]
    g = (softmax(logits) - onehot(label)) / divisor     dh = g @ W     dW = g^T @ h

chunk by chunk, the softmax turned into g in its own buffer and dropped before the next chunk.
Only dh (tokens × hidden) and, when the head trains (full fine-tuning), dW are kept; backward
scales them by the incoming gradient. The loss, accuracy and entropy are SFTTrainer's.

Heads this does not cover (a bias, a PEFT adapter on the head, soft-capped or scaled logits, MoE
router losses) keep TRL's loss. tests/test_fused_ce.py checks the result against PyTorch and TRL.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# A chunk's float32 logits take chunk × vocabulary × 4 bytes. 256 MiB of them (about 512 tokens at
# Llama 3's 128k vocabulary) keeps each LM-head matmul large enough to run at full speed while the
# loss adds well under a GiB; a small vocabulary gets the whole batch in one chunk.
_CHUNK_LOGITS = 2**26


def default_chunk_size(vocab_size: int) -> int:
    return max(1, _CHUNK_LOGITS // vocab_size)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast the LM head runs in its dtype, as nn.Linear would; otherwise in x's.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(sum of cross-entropies of hidden @ weight^T against labels / divisor, argmax-correct count, entropy sum).

    hidden is (N, H), only rows that carry a label; weight is (V, H); labels (N,). The count and the
    entropy sum (nats) are metrics and take no gradient.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, labels, divisor, chunk_size):
        dtype = _compute_dtype(hidden)
        # Softmax in at least float32, as transformers' own loss upcasts; float64 input stays float64.
        wide = torch.promote_types(dtype, torch.float32)
        device = hidden.device
        loss = torch.zeros((), dtype=wide, device=device)
        entropy = torch.zeros((), dtype=wide, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        # Every dtype below is chosen explicitly, so autocast must not re-cast any op.
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty(h.shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
            # A low-precision dW summed over many chunks would be rounded once per chunk; one matmul rounds once.
            grad_w = torch.zeros(w.shape, dtype=wide, device=device) if ctx.needs_input_grad[1] else None
            for start in range(0, h.shape[0], chunk_size):
                h_c, y = h[start:start + chunk_size], labels[start:start + chunk_size]
                logits = torch.mm(h_c, w.t()).to(wide)
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                correct += (logits.argmax(dim=-1) == y).sum()
                log_p = logits.sub_(lse[:, None])   # the logits are not read again: log-softmax in their buffer
                p = log_p.exp()
                entropy -= torch.dot(p.flatten(), log_p.flatten())
                del logits, log_p
                # d loss / d logits = (softmax - onehot) / divisor, built in the softmax's buffer.
                p[torch.arange(y.shape[0], device=device), y] -= 1
                g = p.div_(divisor).to(dtype)
                del p
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[start:start + chunk_size])
                if grad_w is not None and wide == dtype:
                    grad_w.addmm_(g.t(), h_c)
                elif grad_w is not None:
                    grad_w += torch.mm(g.t(), h_c)
        ctx.save_for_backward(None if grad_h is None else grad_h.to(hidden.dtype),
                              None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(correct, entropy)
        return loss / divisor, correct, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss, _grad_correct, _grad_entropy):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss,
                None, None, None)


def fused_linear_cross_entropy(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               num_items_in_batch=None, chunk_size: int | None = None):
    """Next-token loss of (B, S, H) hidden states through an LM head weight (V, H) against (B, S) labels.

    Returns (loss, num_correct, entropy_sum, num_valid). The loss is the summed cross-entropy of the
    positions whose next label is not -100, divided by num_items_in_batch (the Trainer's count over
    the whole accumulated step) or else by their own count, as SFTTrainer's loss is.
    """
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    num_valid = keep.sum()
    hidden, targets = hidden[keep], targets[keep]   # one host sync, for the number of rows
    if num_items_in_batch is None:
        divisor = num_valid.clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        divisor = num_items_in_batch.to(hidden.device)
    else:
        divisor = num_items_in_batch
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    loss, correct, entropy = LinearCrossEntropyFunction.apply(hidden, weight, targets, divisor, chunk_size)
    return loss, correct, entropy, num_valid


@dataclass
class FusedCrossEntropyOutput(CausalLMOutputWithPast):
    """What SFTTrainer.compute_loss reads from a chunked_nll forward: the loss and the metrics' sums."""

    num_correct_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_valid_tokens: torch.Tensor | None = None


def _unsupported(causal_lm) -> bool:
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    # Not exactly nn.Linear: a PEFT adapter or a quantized layer computes more than weight @ h.
    return (type(head) is not torch.nn.Linear or head.bias is not None
            or getattr(config, "final_logit_softcapping", None) is not None
            or scale not in (None, 1, 1.0) or getattr(config, "output_router_logits", False)
            or causal_lm.base_model is causal_lm
            # accelerate's device hooks live on the forward this replaces.
            or "_hf_hook" in causal_lm.__dict__)


def patch_fused_cross_entropy(model: torch.nn.Module) -> bool:
    """Compute the causal LM's training loss with LinearCrossEntropyFunction; False if it cannot apply.

    `model` is a transformers causal LM or a PeftModel around one (its inner model is patched, as TRL
    does, so PEFT's forward still runs first). Only calls with labels change: the backbone runs to
    its last hidden state and the loss comes from the fused head, with logits None. Without labels
    (generation) the class's forward runs. Nothing is touched when it returns False.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _unsupported(causal_lm):
        return False
    class_forward = type(causal_lm).forward

    def fused_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return class_forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        weight = self.get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):   # FSDP2 DTensor: gather the head once, not once per chunk
            weight = weight.full_tensor()
        loss, correct, entropy, valid = fused_linear_cross_entropy(outputs.last_hidden_state, weight, labels,
                                                                   num_items_in_batch)
        return FusedCrossEntropyOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                       num_correct_tokens=correct, entropy_sum=entropy, num_valid_tokens=valid)

    # generate() checks its keyword arguments against the signature of forward; keep the model's.
    fused_forward.__signature__ = inspect.signature(class_forward)
    causal_lm.forward = types.MethodType(fused_forward, causal_lm)
    return True
