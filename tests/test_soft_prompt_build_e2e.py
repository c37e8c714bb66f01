"""Prompt tuning and P-tuning through the whole build on a real base, served by the real Ollama.

SmolLM2-135M-Instruct (imported from its GGUF: ChatML with a default system prompt, tied
embeddings, no BOS) trains a soft prompt with the PEFT backend; the build bakes it into the
vocabulary, converts it, gates the GGUF against PEFT, registers it with the prefix in its
TEMPLATE, and Ollama's greedy answers must be HF PEFT's on the same conversations."""

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, training_pairs

from ollama_ft.gguf_import import tokenizer_metadata
from ollama_ft.ollama_server import TESTED_OLLAMA_VERSIONS

pytestmark = pytest.mark.e2e

SMOLLM = Path.home() / ".cache" / "ollama-ft" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
N_VIRTUAL = 8
ANSWER_TOKENS = 12


def write_recipe(folder, method: str, examples: int = 48):
    data = folder / "train.jsonl"
    lines = (ROOT / "data" / "turkish-demo.jsonl").read_text(encoding="utf-8").splitlines()[:examples]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = folder / f"{method}.toml"
    recipe.write_text(f"""[model]
base = "{SMOLLM}"
max_seq_length = 256
dtype = "float32"
[data]
train = "{data}"
[train]
method = "{method}"
num_virtual_tokens = {N_VIRTUAL}
max_steps = 12
batch_size = 8
learning_rate = {3e-2 if method == "prompt_tuning" else 1e-2}
gradient_checkpointing = false
[export]
quantization = "f16"
[ollama]
name = "ollama-ft-test-{method.replace('_', '-')}"
parameters = {{ temperature = 0.0 }}
""", encoding="utf-8")
    return recipe


def peft_greedy(base_dir, adapter_dir, conversations) -> list[str]:
    """HF PEFT's greedy answers: the soft prompt in front of the base's own chat render."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    answers = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


# Each method on one of the tested Ollama releases: the current one renders on request, the floor
# is checked through its log; both serve the baked tokens.
CASES = list(zip(["prompt_tuning", "p_tuning"], reversed(TESTED_OLLAMA_VERSIONS)))


@pytest.mark.parametrize("method,version", CASES, ids=[f"{m}-ollama-{v}" for m, v in CASES])
def test_soft_prompt_build_answers_like_peft_through_ollama(method, version, ollama_servers, tmp_path, monkeypatch):
    from ollama_ft.base_model import resolve_base
    from ollama_ft.pipeline import BuildOptions, build
    from ollama_ft.recipe import load_recipe

    if not SMOLLM.is_file():
        pytest.skip(f"{SMOLLM} is missing: run scripts/fetch_models.sh")
    ollama_server = ollama_servers.get(version)
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_server.models_dir))   # register copies blobs into its store
    recipe = load_recipe(write_recipe(tmp_path, method))
    result = build(recipe, BuildOptions(runs_root=tmp_path / "runs", host=ollama_server.host, skip_eval=True))

    soft = result.merged.soft
    assert soft.tokens == [f"<|soft_prompt_{i}|>" for i in range(N_VIRTUAL)] and soft.bos_token is None
    assert result.trained.result.kind == "soft_prompt"
    # The GGUF: the source's tokenizer, plus the soft tokens as CONTROL; the gate against PEFT passed.
    meta, source = tokenizer_metadata(result.gguf_path), tokenizer_metadata(SMOLLM)
    assert meta["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"] + soft.tokens
    assert meta["tokenizer.ggml.token_type"][-N_VIRTUAL:] == [3] * N_VIRTUAL
    gate = result.metrics["convert"]["soft_prompt_gate"]
    assert gate["max_rel_logit_diff"] <= recipe.export.logits_tolerance and gate["max_soft_margin"] < 0, gate
    # Registered with the prefix first in its TEMPLATE, proven by the server's own render.
    parity = result.metrics["register"]["prompt_parity"]
    assert parity["method"] in ("render_only", "server_log") and parity["checked"] >= 3, parity
    shown = ollama_server.show(result.model_name)
    assert shown["template"].startswith(soft.prefix), shown["template"][:200]
    assert f"num_keep {N_VIRTUAL}" in " ".join(shown["parameters"].split()), shown["parameters"]

    conversations = [messages for messages, _ in training_pairs()[:3]]
    client = ollama_server.client
    # Greedy as HF's generate is greedy: Ollama's default repeat_penalty (1.1, over the last 64
    # inputs, prompt included) would otherwise steer away from words of the question.
    greedy = {"temperature": 0, "seed": 0, "num_predict": ANSWER_TOKENS, "repeat_penalty": 1.0}
    served = [client.chat(model=result.model_name, messages=messages, options=greedy).message.content
              for messages in conversations]
    base_dir = resolve_base(recipe, tmp_path / "runs", ollama_server.host).path
    expected = peft_greedy(base_dir, result.trained.output_dir, conversations)
    assert [a.strip() for a in served] == [a.strip() for a in expected], json.dumps(
        {"ollama": served, "peft": expected}, ensure_ascii=False)
