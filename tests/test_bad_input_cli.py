"""Bad input through the real CLI: one `error:` line naming the field or file and the fix, exit
code 2, and nothing written (no run folder, no Ollama call). Each row is a distinct mistake a user
makes; the README's troubleshooting table lists the common ones."""

import json

import pytest
from click.testing import CliRunner

from ollama_ft.cli import main

RECIPE = """[model]
base = "tiny:llama"
[data]
train = "d.jsonl"
[ollama]
name = "t"
"""
GOOD = {"messages": [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "Selam!"}]}


CASES = {
    "unknown key": ((("[model]", "[model]\nmax_seq_lenght = 5"),), None, "model.max_seq_lenght: unknown key; did you mean 'max_seq_length'?"),
    "unknown section": ((("[ollama]", "[trian]\n[ollama]"),), None, "trian: unknown key; did you mean 'train'?"),
    "rank zero": ((("[ollama]", "[train]\nrank = 0\n[ollama]"),), None, "train.rank = 0"),
    "negative lr": ((("[ollama]", "[train]\nlearning_rate = -0.1\n[ollama]"),), None, "train.learning_rate = -0.1"),
    "quant typo": ((("[ollama]", "[export]\nquantization = 'q4km'\n[ollama]"),), None, "did you mean 'q4_k_m'?"),
    "bad name": ((('name = "t"', 'name = "my model"'),), None, "ollama.name = 'my model'"),
    "4bit full": ((("[model]", "[model]\nload_in_4bit = true"), ("[ollama]", "[train]\nmethod = 'full'\n[ollama]")),
                  None, "4-bit weights cannot be trained directly"),
    "prefix tuning": ((("[ollama]", "[train]\nmethod = 'prefix_tuning'\n[ollama]"),), None,
                      "train.method = 'prefix_tuning': its prompt is a key/value prefix in every layer"),
    "soft prompt packed": ((("[ollama]", "[train]\nmethod = 'p_tuning'\npacking = true\n[ollama]"),), None,
                           "train.packing = true with train.method = 'p_tuning'"),
    "missing data file": ((('train = "d.jsonl"', 'train = "nope.jsonl"'),), None, "data.train = 'nope.jsonl': no such file"),
    "wrong type": ((("[ollama]", "[train]\nbatch_size = 'four'\n[ollama]"),), None, "train.batch_size = 'four'"),
    "bad toml": ((("[model]", "[model\n"),), None, "not valid TOML"),
    "missing section": ((("[ollama]\nname = \"t\"", ""),), None, "ollama: required, but missing"),
    "bad tiny": ((('base = "tiny:llama"', 'base = "tiny:mistral"'),), None, "unknown tiny base"),
    "4bit on cpu": ((("[model]", "[model]\nload_in_4bit = true"), ("[ollama]", "[train]\nmethod = 'qlora'\n[ollama]")),
                    None, "4-bit loading (QLoRA) needs a CUDA GPU"),
    "json line": (None, [GOOD, "{broken"], "d.jsonl:2: not valid JSON"),
    "utf8": (None, [GOOD, b"\xc3\x28"], "d.jsonl:2: not valid UTF-8"),
    "empty content": (None, [{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}],
                      "d.jsonl:1: messages[0].content is empty"),
    "roles order": (None, [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
                    "roles out of order"),
    "no answer": (None, [{"messages": [{"role": "system", "content": "s"}]}], "only a system message"),
    "empty file": (None, [], "no usable examples"),
    "unknown format": (None, [{"prompt": "a", "completion": "b"}], "cannot tell the data format"),
    "alpaca empty output": ((("[data]", "[data]\nformat = 'alpaca'"),), [{"instruction": "a", "output": ""}],
                            "'output' is empty"),
    "text not string": ((("[data]", "[data]\nformat = 'text'"),), [{"text": ["a"]}], "'text' must be a string"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, monkeypatch):
    edits, lines, expected = CASES[name]
    text = RECIPE
    for old, new in edits or ():
        text = text.replace(old, new, 1)
    (tmp_path / "r.toml").write_text(text, encoding="utf-8")
    rows = [GOOD] * 3 if lines is None else lines
    (tmp_path / "d.jsonl").write_bytes(b"".join(
        (r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()) + b"\n"
        for r in rows))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"),
                                       "--host", "127.0.0.1:9"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()


def test_unknown_stage_for_from(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    (tmp_path / "r.toml").write_text(RECIPE, encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.toml"), "--from", "quantise",
                                       "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--from 'quantise' is not a stage" in result.stderr


def test_unknown_compare_variant(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    (tmp_path / "r.toml").write_text(RECIPE, encoding="utf-8")
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "r.toml"), "--backends", "unsloth,hf"])
    assert result.exit_code == 2 and "unknown variant hf" in result.stderr and "peft-qlora" in result.stderr


def test_missing_unsloth_names_the_install_command(monkeypatch):
    import importlib.util

    from ollama_ft.backends import check_backend_available
    from ollama_ft.errors import MissingDependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "unsloth" else real(n, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install 'ollama-ft\[unsloth\]'"):
        check_backend_available("unsloth")


LAUNCHER_CASES = {
    "processes without accelerate": (["--num-processes", "2"], "--num-processes and --accelerate-config need --launcher accelerate"),
    "config without accelerate": (["--accelerate-config", "RECIPE"], "need --launcher accelerate"),
    "missing accelerate config": (["--launcher", "accelerate", "--accelerate-config", "nope.yaml"],
                                  "--accelerate-config nope.yaml: no such file"),
    "unsloth on two processes": (["--backend", "unsloth", "--launcher", "accelerate", "--num-processes", "2"],
                                 "the unsloth backend trains on one GPU"),
}


@pytest.mark.parametrize("name", list(LAUNCHER_CASES))
def test_bad_launcher_options(name, tmp_path, monkeypatch):
    args, expected = LAUNCHER_CASES[name]
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE, encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args = [str(recipe) if a == "RECIPE" else a for a in args]
    result = CliRunner().invoke(main, ["build", str(recipe), "--runs-dir", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "runs").exists()


def test_tensorboard_without_the_package_names_the_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    (tmp_path / "r.toml").write_text(RECIPE.replace("[ollama]", "[train]\nreport_to = 'tensorboard'\n[ollama]"),
                                     encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "pip install 'ollama-ft[tensorboard]'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_launcher_commands():
    from ollama_ft.train import Launcher

    assert Launcher().command("m", "a")[1:] == ["-m", "m", "a"]
    two = Launcher("accelerate", 2).command("m", "a")
    assert two[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in two
    assert two[two.index("--num_processes") + 1] == "2" and two[-3:] == ["-m", "m", "a"]
    assert "--multi_gpu" not in Launcher("accelerate", 1).command("m")
    fsdp = Launcher("accelerate", 2, "/x/fsdp.yaml").command("m")
    assert fsdp[fsdp.index("--config_file") + 1] == "/x/fsdp.yaml" and "--multi_gpu" not in fsdp


def test_more_processes_than_gpus(tmp_path, monkeypatch):
    from ollama_ft import estimate

    monkeypatch.setattr(estimate, "visible_gpu_count", lambda: 2)
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    (tmp_path / "r.toml").write_text(RECIPE, encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"),
                                       "--launcher", "accelerate", "--num-processes", "4"])
    assert result.exit_code == 2, result.output
    assert "--num-processes 4 needs one GPU per process; 2 visible" in result.stderr
    assert "use --num-processes 2" in result.stderr and not (tmp_path / "runs").exists()
