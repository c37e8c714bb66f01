"""B3 (benchmarks/padding.py) runs on the demo data and reports a sane, complete result."""

from __future__ import annotations

import pytest

from benchmarks.padding import padding_efficiency, run


def test_padding_benchmark_on_demo_data(tiny_base, runs_root):
    result = run(runs_root)  # the tiny base is already built there by the fixture
    assert result["examples"] == 420 and result["data"] == "data/turkish-demo.jsonl"
    assert (result["batch_size"], result["max_length"], result["seed"]) == (16, 256, 42)
    for mode in ("padded", "packed"):
        block = result[mode]
        assert set(block) >= {"processed_tokens", "non_pad_tokens", "efficiency"}
        assert 0 < block["efficiency"] <= 1
        assert block["processed_tokens"] >= block["non_pad_tokens"] > 0
    assert result["padded"]["batches"] == -(-420 // 16)
    assert result["packed"]["efficiency"] >= result["padded"]["efficiency"]


def test_padding_arithmetic():
    # Batches of 2 after the seeded shuffle; lengths 10 and 2 in one batch waste 8 tokens.
    result = padding_efficiency([10, 2], batch_size=2, max_length=8, seed=42)
    assert result["padded"]["processed_tokens"] == 16  # 10 is cut to 8, so 2 × 8
    assert result["padded"]["efficiency"] == pytest.approx(10 / 16)
    assert result["packed"] == {"rows": 2, "non_pad_tokens": 12, "processed_tokens": 12, "efficiency": 1.0}
