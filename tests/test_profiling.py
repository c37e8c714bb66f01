"""The benchmark profiler (benchmarks/profiling.py): profiles exactly the asked steps and sorts
kernels into categories; the training worker loads it, or any callback, only when
OLLAMA_FT_TRAINER_CALLBACKS names it."""

import json
from types import SimpleNamespace

import pytest

from benchmarks.profiling import category, make_profiler_callback, profiler_from_environment
from ollama_ft.backends.common import callbacks_from_environment


@pytest.mark.parametrize("name, expected", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("aten::mm", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("kOptimizer32bit2State<__nv_bfloat16, 0>", "optimizer"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", "dequantize"),
    ("_rmsnorm_forward_kernel", "norm"),
    ("aten::_log_softmax", "softmax/CE"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copy/cast"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "other elementwise"),
])
def test_kernel_categories(name, expected):
    assert category(name) == expected


# Importing transformers' TrainerCallback trips torch.jit's own deprecation notice.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_profiles_only_the_asked_steps(tmp_path):
    import torch

    callback = make_profiler_callback(str(tmp_path), start_step=2, steps=2, device="cpu")
    a = torch.randn(256, 256)

    def step(number, work):
        state = SimpleNamespace(global_step=number)
        callback.on_step_begin(None, state, None)
        for _ in range(work):
            torch.mm(a, a)
        state.global_step = number + 1   # the Trainer counts the step done before on_step_end
        callback.on_step_end(None, state, None)

    step(0, 1)
    step(1, 1)
    assert not (tmp_path / "profile.json").exists()      # steps before the window: nothing recorded
    step(2, 3)
    assert not (tmp_path / "profile.json").exists()      # window still open
    step(3, 3)
    summary = json.loads((tmp_path / "profile.json").read_text())
    mm = next(row for row in summary["top"] if row["name"] == "aten::mm")
    assert mm["calls"] == 6                               # steps 2 and 3 only
    assert summary["steps"] == 2 and 0 < summary["busy_seconds"]
    assert summary["categories"]["matmul"] >= mm["seconds"]
    assert "aten::mm" in (tmp_path / "profile.txt").read_text()
    step(4, 1)
    assert json.loads((tmp_path / "profile.json").read_text())["top"] == summary["top"]   # not re-profiled


def test_off_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("OLLAMA_FT_PROFILE", raising=False)
    assert profiler_from_environment("cpu") is None
    monkeypatch.setenv("OLLAMA_FT_PROFILE", str(tmp_path))
    assert profiler_from_environment("cpu") is not None


def test_the_worker_adds_the_callbacks_the_environment_names(monkeypatch, tmp_path):
    monkeypatch.delenv("OLLAMA_FT_TRAINER_CALLBACKS", raising=False)
    assert callbacks_from_environment("cpu") == []
    monkeypatch.setenv("OLLAMA_FT_PROFILE", str(tmp_path))
    monkeypatch.setenv("OLLAMA_FT_TRAINER_CALLBACKS", " benchmarks.profiling:profiler_from_environment, ")
    [profiler] = callbacks_from_environment("cpu")
    assert hasattr(profiler, "on_step_begin")
    monkeypatch.delenv("OLLAMA_FT_PROFILE")   # the function returns None: nothing is added
    assert callbacks_from_environment("cpu") == []
    monkeypatch.setenv("OLLAMA_FT_TRAINER_CALLBACKS", "benchmarks.profiling")
    with pytest.raises(ValueError, match="'benchmarks.profiling' is not module:function"):
        callbacks_from_environment("cpu")
