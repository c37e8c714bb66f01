"""Speed switches of the PEFT backend, and which ones are on by default on each kind of device.

Each switch is measured on its own against the plain configuration, side by side in one run
(`python -m benchmarks.train_throughput --switches padding_free,fused_lora`), and its default
on a device follows that measurement: a switch that did not help there is off there. A recipe
can name its own list in `train.speedups`; `"auto"` takes the defaults below.

- padding_free: each batch becomes one row of concatenated examples with position_ids, so no
  pad token is computed (TRL's `padding_free`; SDPA keeps the examples apart through the
  position_ids). Numerically the padded run's loss: the same tokens are averaged.
- fused_lora: LoRA layers whose backward is written by hand (`fast_lora.py`): no autograd graph
  over the frozen weight, and the A/B products added in one matmul.
"""

from __future__ import annotations

SWITCHES = ("padding_free", "fused_lora", "no_fp32_upcast", "fused_ce", "fused_rmsnorm", "fused_rope",
            "fused_swiglu")

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
    },
    "cuda": {
        # H100, 1B shape, ~1,750-token chats (issue 7): the flattened batch loses SDPA's fast path.
        "padding_free": (False, "H100 1B shape: TRL padding_free with SDPA at 0.28× Unsloth, padded 0.72×"),
        "fused_lora": (False, "not yet measured on a GPU; off until it is"),
        "no_fp32_upcast": (False, "not yet measured on a GPU; off until it is"),
        "fused_ce": (False, "not yet measured on a GPU; off until it is"),
        "fused_rmsnorm": (False, "not yet measured on a GPU; off until it is"),
        "fused_rope": (False, "not yet measured on a GPU; off until it is"),
        "fused_swiglu": (False, "not yet measured on a GPU; off until it is"),
    },
}


def resolve_speedups(requested, device: str) -> list[str]:
    """The switches to apply: the device's measured defaults for "auto", else exactly the list given."""
    if requested == "auto":
        table = DEFAULTS.get(device, DEFAULTS["cuda"])
        return [name for name in SWITCHES if table[name][0]]
    return [name for name in SWITCHES if name in requested]
