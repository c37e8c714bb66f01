"""The PEFT backend's speed switches: per-device defaults, explicit lists, and what is dropped where it cannot apply."""

import pytest

from ollama_ft.backends.speedups import DEFAULTS, SWITCHES, resolve_speedups
from test_fused_ce import train_tiny


def test_every_switch_has_a_measured_default_on_every_device():
    for device, table in DEFAULTS.items():
        assert set(table) == set(SWITCHES), device
        assert all(reason for _, reason in table.values()), device


def test_auto_takes_the_device_defaults():
    assert resolve_speedups("auto", "cpu") == [name for name in SWITCHES if DEFAULTS["cpu"][name][0]]
    assert resolve_speedups("auto", "cuda") == [name for name in SWITCHES if DEFAULTS["cuda"][name][0]]
    assert resolve_speedups("auto", "mps") == resolve_speedups("auto", "cuda")   # an unmeasured device: the GPU row


def test_an_explicit_list_is_taken_as_given_in_a_fixed_order():
    assert resolve_speedups([], "cpu") == []
    assert resolve_speedups(["fused_ce", "padding_free"], "cuda") == ["padding_free", "fused_ce"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_switches_that_cannot_apply_are_not_reported(tiny_base, tmp_path):
    # no_fp32_upcast only changes 4-bit loading; the Triton kernels need CUDA (or the interpreter).
    result = train_tiny(tiny_base, tmp_path / "run", ["no_fp32_upcast", "fused_rmsnorm", "padding_free"])
    assert result.speedups == ["padding_free"]
