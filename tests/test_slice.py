"""The thin slice through the real tools: tiny base → llama.cpp converter (F16 GGUF) →
llama.cpp quantizer (Q4_K_M) → llama-cpp-python generates → the real Ollama registers
(blob upload + create through the official client) and generates."""

import pytest

from ollama_ft.chat_templates import load_family
from ollama_ft.convert import ConvertInput, convert_to_gguf
from ollama_ft.modelfile import ModelfileSpec
from ollama_ft.quantize import QuantizeInput, quantize_gguf, read_gguf_types
from ollama_ft.register import RegisterInput, register_model

pytestmark = [pytest.mark.e2e, pytest.mark.every_ollama]


def test_tiny_base_through_converter_quantizer_and_ollama(tiny_base, tmp_path, ollama_server):
    prompts = ["<|im_start|>user\nMerhaba<|im_end|>\n<|im_start|>assistant\n", "Türkiye'nin başkenti"]
    f16 = convert_to_gguf(ConvertInput(tiny_base, tmp_path / "f16.gguf", prompts, 0.05, tmp_path / "convert.log"))
    assert f16.max_rel_logit_diff < 0.05 and f16.top1_agreement == 1.0
    assert read_gguf_types(f16.gguf_path)[0] == 1  # MOSTLY_F16

    q = quantize_gguf(QuantizeInput(f16.gguf_path, tmp_path / "q4.gguf", "q4_k_m"))
    assert q.file_type == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M, read back from the file's metadata
    assert q.tensor_types.get("Q4_K", 0) > 0 and q.tensor_types.get("Q6_K", 0) > 0
    assert q.size_bytes < f16.size_bytes / 2

    from llama_cpp import Llama

    llm = Llama(model_path=str(q.gguf_path), n_ctx=256, verbose=False, seed=0)
    out = llm.create_completion("Türkiye", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] > 0
    llm.close()

    fam = load_family("chatml")
    spec = ModelfileSpec(gguf_path=q.gguf_path, template=fam.go_template, stops=list(fam.stop),
                         parameters={"num_ctx": 256})
    reg = register_model(RegisterInput("slice-tiny", ollama_server.host, spec))
    assert reg.blob_digest.startswith("sha256:") and not reg.replaced
    resp = ollama_server.client.generate(model="slice-tiny", prompt="Merhaba", options={"num_predict": 8, "temperature": 0})
    assert resp.eval_count and resp.eval_count > 0
    details = ollama_server.show("slice-tiny")["details"]
    assert details["quantization_level"] == "Q4_K_M" and details["family"] == "llama"
