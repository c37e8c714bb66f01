"""The PEFT backend's speed switches: per-device defaults, explicit lists, and what is dropped where it cannot apply."""

import pytest

from ollama_ft.backends.common import batch_examples
from ollama_ft.backends.speedups import DEFAULTS, SWITCHES, resolve_speedups, trainer_settings
from test_fused_ce import train_tiny


def test_every_switch_has_a_measured_default_on_every_device():
    assert set(DEFAULTS) == {"cpu", "cuda", "cuda-4bit"}
    for device, table in DEFAULTS.items():
        assert set(table) == set(SWITCHES), device
        assert all(reason for _, reason in table.values()), device


def test_auto_takes_the_measured_defaults_of_device_and_weight_format():
    # The lists the measurements in ollama_ft/backends/speedups.py chose; a changed default must
    # change this test together with its measurement.
    assert resolve_speedups("auto", "cpu") == ["padding_free", "fused_ce"]
    assert resolve_speedups("auto", "cuda") == ["fused_lora", "fused_ce", "fused_rmsnorm", "fused_rope", "fused_swiglu"]
    assert resolve_speedups("auto", "cuda", four_bit=True) == [
        "fused_lora", "no_fp32_upcast", "fused_ce", "fused_rmsnorm", "fused_rope", "fused_swiglu"]
    # An unmeasured device gets nothing: the CUDA row's Triton kernels would not run there.
    assert resolve_speedups("auto", "mps") == []


def test_an_explicit_list_is_taken_as_given_in_a_fixed_order():
    assert resolve_speedups([], "cpu") == []
    assert resolve_speedups(["fused_ce", "padding_free"], "cuda") == ["padding_free", "fused_ce"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_switches_that_cannot_apply_are_not_reported(tiny_base, tmp_path):
    from ollama_ft.kernels import fused_kernels

    # no_fp32_upcast only changes 4-bit loading; the Triton kernels need CUDA (or the interpreter,
    # under which tests/test_fused_kernels.py runs them).
    assert not fused_kernels.available("cpu")
    result = train_tiny(tiny_base, tmp_path / "run", ["no_fp32_upcast", "fused_rmsnorm", "fused_rope", "fused_swiglu",
                                                      "padding_free"])
    assert result.speedups == ["padding_free"]


def test_trainer_switches_become_sft_settings():
    every = ["padding_free", "fused_adamw", "group_by_length", "dataloader_workers", "torch_compile",
             "activation_offloading"]
    settings, kept = trainer_settings(every, {"optimizer": "adamw_torch", "gradient_checkpointing": True}, "cuda")
    assert kept == every
    assert settings == {"padding_free": True, "max_length": None, "optim": "adamw_torch_fused",
                        "train_sampling_strategy": "group_by_length", "dataloader_num_workers": 2,
                        "dataloader_persistent_workers": True, "torch_compile": True, "activation_offloading": True}


def test_trainer_switches_that_cannot_apply_are_dropped():
    asked = ["fused_adamw", "activation_offloading"]
    # No fused form of the 8-bit optimizer; nothing to offload to the host on CPU, or without checkpointing.
    assert trainer_settings(asked, {"optimizer": "adamw_8bit", "gradient_checkpointing": True}, "cpu") == ({}, [])
    assert trainer_settings(asked, {"optimizer": "adamw_8bit", "gradient_checkpointing": False}, "cuda") == ({}, [])


def test_batch_examples_reads_the_same_examples_from_padded_and_padding_free_batches():
    import torch

    padded = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    flat = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert batch_examples(padded) == batch_examples(flat) == [[5, 6, 7], [8, 9]]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_trainer_switches_reach_the_trainer(tiny_base, tmp_path, monkeypatch):
    import torch

    fused = []
    real_init = torch.optim.AdamW.__init__

    def recording_init(self, *args, **kwargs):
        fused.append(bool(kwargs.get("fused")))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", recording_init)
    # 64 examples: the sampler groups megabatches of batch × min(examples ÷ (4 × batch), 50) by length.
    plain = train_tiny(tiny_base, tmp_path / "plain", [], examples=64)
    switched = train_tiny(tiny_base, tmp_path / "switched", ["fused_adamw", "group_by_length", "dataloader_workers"],
                          examples=64)
    assert fused == [False, True]
    assert switched.speedups == ["fused_adamw", "group_by_length", "dataloader_workers"]
    # Batches of similar length: another order. Collated in worker processes, still counted here.
    assert switched.data_order_sha256 != plain.data_order_sha256 != ""
    assert 0.5 < switched.padding_efficiency < 1.0 and 0.5 < plain.padding_efficiency < 1.0
    assert switched.padding_efficiency > plain.padding_efficiency
    assert all(h["loss"] == h["loss"] for h in switched.loss_history)
    stop_dataloader_workers()


def stop_dataloader_workers() -> None:
    """Stop the persistent workers a finished Trainer left behind. Left to the garbage collector,
    their shutdown waits 5 s per worker (they miss the stop sent from inside a collection), in
    whichever later test happens to collect."""
    import gc

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for loader in [o for o in gc.get_objects() if type(o) is _MultiProcessingDataLoaderIter]:
        loader._shutdown_workers()
