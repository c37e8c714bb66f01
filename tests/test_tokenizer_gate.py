"""The tokenizer gate: llama.cpp's tokenizer of the exported GGUF must give the ids training used.

A GGUF converted from the tiny base passes; the same GGUF checked against a tokenizer with two
pieces swapped fails, naming the example and showing both id lists; and a build whose merged
folder carries a wrong tokenizer stops before register with nothing registered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_tiny_recipe
from ollama_ft.errors import StageError
from ollama_ft.tokenizer_gate import TokenizerGateInput, check_tokenizer, describe_mismatch

CHATML = (ROOT / "modelfiles" / "chatml.toml")


def examples(count: int = 30) -> tuple[list[dict], list[str]]:
    path = ROOT / "data" / "turkish-demo.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()[:count]
    return [json.loads(line) for line in lines], [f"{path.name}:{i + 1}" for i in range(len(lines))]


def test_mismatch_message_shows_both_id_lists_with_pieces():
    text = describe_mismatch("train.jsonl:7", [1, 2, 3, 4], [1, 2, 9, 4], lambda i: f"p{i}")
    assert text.startswith("train.jsonl:7: ") and "at token 2" in text
    assert "training: 1:'p1' 2:'p2' 3:'p3' 4:'p4'" in text and "GGUF: 1:'p1' 2:'p2' 9:'p9' 4:'p4'" in text


@pytest.fixture(scope="module")
def tiny_gguf(tiny_base, tmp_path_factory) -> Path:
    from ollama_ft.convert import run_converter

    folder = tmp_path_factory.mktemp("gate")
    out = folder / "tiny.gguf"
    run_converter(tiny_base, out, folder / "convert.log")
    return out


def gate_input(gguf: Path, tokenizer: Path, limit: int = 1000) -> TokenizerGateInput:
    from ollama_ft.chat_templates import load_family

    rows, sources = examples()
    return TokenizerGateInput(gguf, tokenizer, load_family("chatml").jinja, rows, sources, 256, sample_limit=limit)


def test_the_base_s_own_gguf_passes_on_every_example(tiny_base, tiny_gguf):
    out = check_tokenizer(gate_input(tiny_gguf, tiny_base))
    assert (out.checked, out.total, out.sampled) == (30, 30, False) and out.tokens_checked > 300


def test_large_data_is_checked_on_a_sample(tiny_base, tiny_gguf):
    out = check_tokenizer(gate_input(tiny_gguf, tiny_base, limit=7))
    assert (out.checked, out.total, out.sampled) == (7, 30, True)


def swap_two_pieces(folder: Path) -> tuple[str, str]:
    """Swap two pieces of a SentencePiece tokenizer.model that the demo's first example uses."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    used = [p for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL and len(p.piece) > 2]
    first, second = used[10], used[11]
    first.piece, second.piece = second.piece, first.piece
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return first.piece, second.piece


def test_a_swapped_vocabulary_fails_naming_the_example(tiny_base, tiny_gguf, tmp_path):
    import shutil

    wrong = tmp_path / "tokenizer"
    shutil.copytree(tiny_base, wrong)
    (wrong / "tokenizer.json").unlink(missing_ok=True)   # the fast tokenizer is rebuilt from tokenizer.model
    swap_two_pieces(wrong)
    with pytest.raises(StageError) as err:
        check_tokenizer(gate_input(tiny_gguf, wrong))
    message = err.value.one_line()
    assert message.startswith("tokenizer gate: turkish-demo.jsonl:") and "training:" in message and "GGUF:" in message


@pytest.mark.e2e
def test_build_with_a_wrong_tokenizer_stops_before_register(ollama_server, runs_root, tmp_path):
    recipe = write_tiny_recipe(tmp_path, "gate-wrong", examples=24, train={"max_steps": 3})

    def build(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir",
                               str(runs_root), "--host", ollama_server.host, *extra],
                              capture_output=True, text=True, timeout=900, cwd=ROOT)

    # Three steps teach the random tiny model nothing (its smoke test may fail on an empty answer);
    # what matters here is that the export with the base's own tokenizer passes the gate.
    first = build("--no-eval")
    assert "✔ tokenizer" in first.stderr and "✔ register" in first.stderr, first.stderr[-3000:]
    ollama_server.client.delete("gate-wrong")
    merged = runs_root / "gate-wrong" / "peft" / "merged"
    swap_two_pieces(merged)
    second = build("--from", "convert", "--no-eval")
    assert second.returncode != 0
    last = second.stderr.strip().splitlines()[-1]
    assert "tokenizer gate:" in last and "train.jsonl:" in last and "nothing was registered" in last, last
    from ollama_ft.register import model_exists

    assert not model_exists(ollama_server.client, "gate-wrong")
    assert not (runs_root / "gate-wrong" / "peft" / "records" / "register.json").exists()
