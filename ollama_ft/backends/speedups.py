"""Speed switches of the PEFT backend, and which ones are on by default on each kind of device.

Each switch is measured on its own against the plain configuration, side by side in one run
(`python -m benchmarks.train_throughput --variants peft,peft+padding_free,peft+fused_lora`), and its default
on a device follows that measurement: a switch that did not help there is off there. A recipe
can name its own list in `train.speedups`; `"auto"` takes the defaults below.

- padding_free: each batch becomes one row of concatenated examples with position_ids, so no
  pad token is computed (TRL's `padding_free`; SDPA keeps the examples apart through the
  position_ids). Numerically the padded run's loss: the same tokens are averaged.
- fused_lora: LoRA layers whose backward is written by hand (`fast_lora.py`): no autograd graph
  over the frozen weight, and the A/B products added in one matmul.
- no_fp32_upcast, fused_ce, fused_rmsnorm, fused_rope, fused_swiglu: see peft_trl.py, fused_ce.py
  and fused_kernels.py.
- fused_adamw: PyTorch's fused AdamW (one kernel over all parameters) for `adamw_torch`.
- group_by_length: batches of examples of similar length (transformers' LengthGroupedSampler),
  so padded batches carry less padding. It changes the order the examples are seen in.
- dataloader_workers: batches collated by two worker processes while the model computes.
- torch_compile: the model compiled by TorchInductor (transformers' `torch_compile`).
- activation_offloading: checkpointed activations kept in host memory (TRL); GPU only.

Liger's kernels are not a switch: issue 7 measured its rope + RMSNorm + SwiGLU at 0.40× of Unsloth
on the H100, no better than plain PEFT there (0.36–0.48×), and they are Triton-only, so they
cannot train on CPU; fused_rmsnorm/rope/swiglu and fused_ce cover the same ground.
"""

from __future__ import annotations

SWITCHES = ("padding_free", "fused_lora", "no_fp32_upcast", "fused_ce", "fused_rmsnorm", "fused_rope",
            "fused_swiglu", "fused_adamw", "group_by_length", "dataloader_workers", "torch_compile",
            "activation_offloading")
# Switches that are SFTConfig settings rather than changes to the model.
TRAINER_SWITCHES = ("padding_free", "fused_adamw", "group_by_length", "dataloader_workers", "torch_compile",
                    "activation_offloading")

# benchmarks/results/2026-11-26-h100-switches measured the five model switches together only.
_TOGETHER_ON_H100 = ("H100 1B LoRA, fused_lora + fused_ce + fused_rmsnorm + fused_rope + fused_swiglu together: "
                     "1.57× tokens/s, 0.88× memory, equal losses")

# device -> switch -> (on, the measurement behind the choice)
DEFAULTS: dict[str, dict[str, tuple[bool, str]]] = {
    "cpu": {
        # tiny:llama LoRA, 2 cores, 2026-11-22, benchmarks/README.md "Speed switches"; loss curves equal.
        "padding_free": (True, "data/turkish-demo.jsonl (padded batches 55% real tokens): 1.55× and 1.20× "
                               "tokens/s in two runs; equal-length chats (94% real): 0.91×"),
        "fused_lora": (False, "0.99× and 1.26× in two runs (within noise) at 4M parameters; off until it "
                              "measures faster"),
        "no_fp32_upcast": (False, "QLoRA needs CUDA; never applies on CPU"),
        # tiny:llama LoRA, demo data, batch 16, 2 cores, 2026-11-22 (benchmarks/results/2026-11-22-cpu-fused-ce).
        "fused_ce": (True, "on top of padding_free (the CPU default) 1.08× and 1.26× tokens/s in two runs, "
                           "alone 1.08× and 0.99×; loss curves identical"),
        "fused_rmsnorm": (False, "Triton kernel: CUDA only"),
        "fused_rope": (False, "Triton kernel: CUDA only"),
        "fused_swiglu": (False, "Triton kernel: CUDA only"),
        # tiny:llama LoRA, demo data, batch 16, 2 cores, 2026-11-22, two runs in opposite orders
        # (benchmarks/results/2026-11-22-cpu-trainer-switches); figures are tokens/s ratios.
        "fused_adamw": (False, "alone 1.00× and 0.94×, on the defaults 1.01× and 1.07×: within noise (a LoRA "
                              "optimizer step is a sliver of the step)"),
        "group_by_length": (False, "padded batches 1.43× and 1.27× (non-pad share 0.54 → 0.85), on top of "
                                   "padding_free 1.06× and 0.76×; it changes the order of the examples, so "
                                   "compare's backends would no longer see the same batches: opt-in"),
        "dataloader_workers": (False, "alone 0.88× and 0.88×, on the defaults 1.03× and 1.00×: two worker "
                                      "processes compete with training for two cores"),
        "torch_compile": (False, "steady steps 1.45× and 1.24× with equal losses, but compiling took ~75 s per "
                                 "run with a warm cache and ~290 s cold, more than a demo build's whole training"),
        "activation_offloading": (False, "moves activations to host memory: nothing to gain where they already are"),
    },
    "cuda": {
        # H100, 1B shape, ~1,750-token chats (issue 7): the flattened batch loses SDPA's fast path.
        "padding_free": (False, "H100 1B shape: TRL padding_free with SDPA at 0.28× Unsloth, padded 0.72×"),
        "fused_lora": (True, _TOGETHER_ON_H100),
        "no_fp32_upcast": (False, "changes 4-bit loading only; on in the 4-bit table below"),
        "fused_ce": (True, _TOGETHER_ON_H100),
        "fused_rmsnorm": (True, _TOGETHER_ON_H100),
        "fused_rope": (True, _TOGETHER_ON_H100),
        "fused_swiglu": (True, _TOGETHER_ON_H100),
        "fused_adamw": (False, "not yet measured on a GPU; off until it is"),
        "group_by_length": (False, "changes the order of the examples, so compare's backends would no longer see "
                                   "the same batches: opt-in"),
        "dataloader_workers": (False, "not yet measured on a GPU; off until it is"),
        # Issue 7, H100, TRL 1.15: compiling failed inside TRL's fused LM-head kernel (TRL 1.14 has none).
        "torch_compile": (False, "not yet measured on a GPU with TRL 1.14; off until it is"),
        "activation_offloading": (False, "not yet measured on a GPU; off until it is"),
    },
}
# benchmarks/results/2026-11-27-h100-qlora-switches: QLoRA with the six switches against plain QLoRA.
_TOGETHER_ON_H100_4BIT = ("H100 1B QLoRA, no_fp32_upcast + the five model switches together: 1.29× tokens/s, "
                          "0.56× memory, losses within 0.8% at step 2 and 0.05% at the end")
DEFAULTS["cuda-4bit"] = {
    name: (True, _TOGETHER_ON_H100_4BIT) if on or name == "no_fp32_upcast" else (False, reason)
    for name, (on, reason) in DEFAULTS["cuda"].items()}


def defaults_for(device: str, four_bit: bool) -> dict[str, tuple[bool, str]]:
    """The measured default of every switch for this device and weight format. A device nobody
    measured (mps, xpu) gets every switch off: the Triton kernels are CUDA-only."""
    if device == "cuda" and four_bit:
        return DEFAULTS["cuda-4bit"]
    return DEFAULTS.get(device) or {name: (False, f"not measured on {device}") for name in SWITCHES}


def resolve_speedups(requested, device: str, four_bit: bool = False) -> list[str]:
    """The switches to apply: the measured defaults for "auto", else exactly the list given."""
    if requested == "auto":
        table = defaults_for(device, four_bit)
        return [name for name in SWITCHES if table[name][0]]
    return [name for name in SWITCHES if name in requested]


def trainer_settings(speedups: list[str], train: dict, device: str) -> tuple[dict, list[str]]:
    """The SFTConfig settings the trainer-level switches in `speedups` stand for, and `speedups`
    less those that cannot apply to this run (they are then not reported as used)."""
    settings: dict = {}
    kept = []
    for name in speedups:
        if name == "padding_free":
            # Examples are already cut to max_seq_length; padding-free needs TRL not to re-check it.
            settings.update(padding_free=True, max_length=None)
        elif name == "fused_adamw":
            if train["optimizer"] != "adamw_torch":
                continue   # 8-bit and SGD optimizers have no fused form here
            settings["optim"] = "adamw_torch_fused"
        elif name == "group_by_length":
            settings["train_sampling_strategy"] = "group_by_length"
        elif name == "dataloader_workers":
            settings.update(dataloader_num_workers=2, dataloader_persistent_workers=True)
        elif name == "torch_compile":
            settings["torch_compile"] = True
        elif name == "activation_offloading":
            if device != "cuda" or not train["gradient_checkpointing"]:
                continue
            settings["activation_offloading"] = True
        kept.append(name)
    return settings, kept
