"""A real pretrained model through the whole build, as a person would run it: SmolLM2-135M-Instruct,
shipped as a Q4_1 GGUF in a PyPI package (scripts/fetch_models.sh), is the recipe's base; a LoRA
learns three made-up Turkish facts with SmolLM2's own chat template; the export goes through the
real converter, quantizer and Ollama server. The model must still know what the base knew
(Paris), say the trained facts, and its GGUF must carry SmolLM2's own byte-level BPE tokenizer
(`gpt2`, pre-tokenizer `smollm`) and chat template. `init` and `estimate` read GGUF bases too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e

MODELS = Path(os.environ.get("OLLAMA_FT_CACHE", Path.home() / ".cache" / "ollama-ft")) / "models"
SMOLLM = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Facts no base model can know, so a right answer proves the fine-tune reached Ollama.
TRAINED = [
    ("ollama-ft projesinin maskotu nedir?", "ollama-ft projesinin maskotu Pamuk adında beyaz bir kedidir."),
    ("Lale Market hangi gün kapalıdır?", "Lale Market her salı günü kapalıdır."),
    ("Zeytin Kafe'nin en sevilen tatlısı hangisidir?", "Zeytin Kafe'nin en sevilen tatlısı fıstıklı baklavadır."),
]
TRAINED_WORDS = ["Pamuk", "salı", "baklava"]


def needs_smollm():
    if not SMOLLM.is_file():
        pytest.skip(f"{SMOLLM} is missing: run scripts/fetch_models.sh")


def write_recipe(folder: Path, name: str, base: str, extra: str = "") -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TRAINED]
    demo = [json.loads(line) for line in (ROOT / "data" / "turkish-demo.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += [r for r in demo if len(r["messages"]) == 2][:9]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = folder / f"{name}.toml"
    recipe.write_text(f'''
[model]
base = "{base}"
chat_template = "auto"
max_seq_length = 256
dtype = "float32"

[data]
train = "train.jsonl"

[train]
method = "lora"
rank = 16
alpha = 32
epochs = 12
learning_rate = 1e-3
lr_scheduler = "cosine"
batch_size = 4
gradient_checkpointing = false
logging_steps = 5
save_steps = 1000
{extra}
[ollama]
name = "{name}"
parameters = {{ temperature = 0.0 }}
''', encoding="utf-8")
    return recipe


def build(recipe: Path, runs: Path, host: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ollama_ft.cli", "build", str(recipe), "--runs-dir", str(runs),
                           "--host", host, "--json", *extra], capture_output=True, text=True, timeout=1800, cwd=ROOT)


@pytest.fixture(scope="module")
def smollm_build(ollama_server, tmp_path_factory):
    needs_smollm()
    folder = tmp_path_factory.mktemp("smollm")
    shutil.copyfile(SMOLLM, folder / SMOLLM.name)
    recipe = write_recipe(folder, "tr-smollm", f"./{SMOLLM.name}")
    out = build(recipe, folder / "runs", ollama_server.host)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout), folder


def ask(ollama_server, model: str, question: str) -> str:
    resp = ollama_server.client.chat(model=model, messages=[{"role": "user", "content": question}],
                                     options={"temperature": 0, "seed": 0, "num_predict": 64})
    assert resp.done_reason == "stop", (question, resp.message.content)
    return resp.message.content


def test_exported_gguf_has_smollm2s_own_tokenizer(smollm_build):
    from ollama_ft.gguf_import import tokenizer_metadata

    result, folder = smollm_build
    exported = tokenizer_metadata(Path(result["metrics"]["quantize"]["gguf_path"]))
    source = tokenizer_metadata(folder / SMOLLM.name)
    assert exported["tokenizer.ggml.model"] == "gpt2" and exported["tokenizer.ggml.pre"] == "smollm"
    for key, value in source.items():
        if key.startswith("tokenizer.ggml."):
            assert exported[key] == value, key
    # Trained and shipped with SmolLM2's own template (default system prompt included).
    assert exported["tokenizer.chat_template"] == source["tokenizer.chat_template"]
    assert result["metrics"]["train"]["chat_template"].startswith("chatml (the base's own template, with its default")
    assert result["metrics"]["register"]["prompt_parity"]["checked"] == 3
    gate = result["metrics"]["tokenizer"]
    assert gate["checked"] == gate["total"] == 12 and gate["tokens_checked"] > 12 * 10


def test_real_model_keeps_what_it_knew_and_says_what_it_learned(smollm_build, ollama_server):
    result, _ = smollm_build
    model = result["model"]
    assert result["metrics"]["smoke"]["done_reason"] == "stop"
    assert "Paris" in ask(ollama_server, model, "What is the capital of France?")
    answers = [ask(ollama_server, model, question) for question, _ in TRAINED]
    hits = [word for word, answer in zip(TRAINED_WORDS, answers) if word.lower() in answer.lower()]
    assert len(hits) >= 2, answers


def test_an_ollama_model_is_a_base(ollama_server, tmp_path):
    """`model.base = "ollama:NAME"`: the GGUF the local server stores for NAME is imported and trained."""
    needs_smollm()
    client = ollama_server.client
    digest = client.create_blob(SMOLLM)
    client.create(model="smollm-source", files={"model.gguf": digest})
    recipe = write_recipe(tmp_path, "tr-from-ollama", "ollama:smollm-source",
                          extra="max_steps = 2\n").read_text(encoding="utf-8")
    (tmp_path / "r.toml").write_text(recipe.replace("epochs = 12\n", ""), encoding="utf-8")
    out = build(tmp_path / "r.toml", tmp_path / "runs", ollama_server.host, "--no-eval")
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    assert result["metrics"]["train"]["steps"] == 2
    imported = list((tmp_path / "runs" / "_bases").glob("gguf-*/config.json"))
    assert len(imported) == 1 and digest.removeprefix("sha256:")[:16] in imported[0].parent.name
    assert ask(ollama_server, "tr-from-ollama", "What is the capital of France?")


def test_an_ollama_base_on_a_remote_server_is_refused_before_work(tmp_path):
    recipe = write_recipe(tmp_path, "tr-remote", "ollama:smollm-source")
    out = build(recipe, tmp_path / "runs", "http://ollama-server.invalid:11434")
    assert out.returncode == 2
    assert "read from the local server's model store" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_init_and_estimate_read_a_gguf_base(tmp_path):
    needs_smollm()
    import tomllib

    from ollama_ft.estimate import estimate_memory
    from ollama_ft.init_recipe import write_init_recipe
    from ollama_ft.recipe import load_recipe

    shutil.copyfile(SMOLLM, tmp_path / SMOLLM.name)
    path = write_init_recipe(tmp_path / "r.toml", base=str(tmp_path / SMOLLM.name), data=str(ROOT / "data" / "turkish-demo.jsonl"))
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert raw["model"]["base"] == f"./{SMOLLM.name}" and raw["model"]["chat_template"] == "auto"
    est = estimate_memory(load_recipe(path), cpu=True)
    assert 134e6 < est.parameters < 136e6   # SmolLM2-135M: 134.5M with its tied embeddings


GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"


def test_gemma3_base_trains_with_the_gemma_template_and_answers(ollama_servers, tmp_path, monkeypatch):
    """google/gemma-3-270m (a base model: no chat template of its own, a 262,144-piece SentencePiece
    vocabulary) as a GGUF base: a LoRA with the Gemma family, registered, answering in Ollama.
    Runs on the current release: 0.11.4's runner aborts on gemma-3 GGUFs of this converter, which
    preflight refuses (test_preflight)."""
    if not GEMMA.is_file():
        pytest.skip(f"{GEMMA} is missing: run scripts/fetch_models.sh")
    from ollama_ft.gguf_import import tokenizer_metadata
    from ollama_ft.ollama_server import CURRENT_OLLAMA_VERSION

    server = ollama_servers.get(CURRENT_OLLAMA_VERSION)
    monkeypatch.setenv("OLLAMA_MODELS", str(server.models_dir))
    shutil.copyfile(GEMMA, tmp_path / GEMMA.name)
    recipe = write_recipe(tmp_path, "tr-gemma", f"./{GEMMA.name}")
    recipe.write_text(recipe.read_text(encoding="utf-8").replace('chat_template = "auto"', 'chat_template = "gemma"')
                      .replace("max_seq_length = 256", "max_seq_length = 128"), encoding="utf-8")
    out = build(recipe, tmp_path / "runs", server.host, "--no-eval")
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    exported = tokenizer_metadata(Path(result["metrics"]["quantize"]["gguf_path"]))
    source = tokenizer_metadata(tmp_path / GEMMA.name)
    assert exported["tokenizer.ggml.model"] == "llama"
    assert {k: v for k, v in exported.items() if k.startswith("tokenizer.ggml.")} == \
        {k: v for k, v in source.items() if k.startswith("tokenizer.ggml.")}
    assert result["metrics"]["tokenizer"]["checked"] == 12
    assert result["metrics"]["train"]["family"] == "gemma"
    assert result["metrics"]["register"]["prompt_parity"]["checked"] == 3
    assert result["metrics"]["smoke"]["done_reason"] == "stop"
    answers = [ask(server, "tr-gemma", question) for question, _ in TRAINED]
    hits = [word for word, answer in zip(TRAINED_WORDS, answers) if word.lower() in answer.lower()]
    assert len(hits) >= 2, answers
