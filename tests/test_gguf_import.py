"""GGUF import: a GGUF base becomes a Hugging Face folder whose tokenizer splits text exactly as
llama.cpp does and whose logits are llama.cpp's; the folder converts back to the same tokenizer;
a fine-tune's GGUF gets the source's tokenizer metadata back; Ollama's store is found by name.

The end-to-end tests use real weights cached by scripts/fetch_models.sh under
$OLLAMA_FT_CACHE/models (default ~/.cache/ollama-ft/models) and skip when they are absent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ollama_ft.errors import UserInputError
from ollama_ft.gguf_import import (
    MANIFEST_NAME,
    check_import,
    import_gguf,
    ollama_model_gguf,
    tokenizer_metadata,
    write_source_tokenizer,
)

CACHE = Path(os.environ.get("OLLAMA_FT_CACHE") or Path.home() / ".cache" / "ollama-ft") / "models"
SMOLLM2 = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = CACHE / "gemma-3-270m-q4_k_m.gguf"

TURKISH = "Türkiye'nin başkenti Ankara'dır. Çok güzel, ığüşöç 1234."
TEXTS = [
    TURKISH,
    "İstanbul'da 17 Ağustos 1999'da saat 03:02'de deprem oldu; 3.14159 ≈ π, 1000000 TL.",
    "  two leading spaces\n\ttab, newline\n\n\nand  double   spaces  ",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL 🦙🦙 ✅ 我想在apple工作",
    "def f(x):\n    return x ** 2  # kare\n",
]
TOLERANCE = 1e-2


def cached(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path.name} is not cached in {path.parent}: run scripts/fetch_models.sh or set OLLAMA_FT_CACHE")
    return path


@pytest.fixture(scope="module", autouse=True)
def two_torch_threads():
    """The machines running the suite have two cores, shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    source = cached(SMOLLM2)
    started = time.perf_counter()
    base = import_gguf(source, tmp_path_factory.mktemp("smollm2") / "hf")
    print(f"SmolLM2 import: {time.perf_counter() - started:.1f} s")
    return base


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    source = cached(GEMMA3)
    started = time.perf_counter()
    base = import_gguf(source, tmp_path_factory.mktemp("gemma3") / "hf")
    print(f"gemma-3 import: {time.perf_counter() - started:.1f} s")
    return base


# ---------------------------------------------------------------- SmolLM2 (llama, byte-level BPE)

@pytest.mark.e2e
def test_smollm2_import_matches_llama_cpp_ids_and_logits(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Merhaba! Bugün hava nasıl?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>" in chat and "<|im_end|>" in chat
    started = time.perf_counter()
    check = check_import(smollm2.source_gguf, smollm2.hf_path, TEXTS + [chat])
    print(f"SmolLM2 check: {time.perf_counter() - started:.1f} s, max rel diff {check.max_rel_logit_diff:.2e}")

    assert check.id_mismatches == []
    assert check.max_rel_logit_diff <= TOLERANCE
    assert check.top1_agreement == 1.0
    assert check.passed(TOLERANCE)
    # The chat's markers are single tokens, as llama.cpp parses them.
    ids = tokenizer(chat).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == chat.count("<|im_start|>")


@pytest.mark.e2e
def test_smollm2_special_tokens_and_chat_template_are_the_gguf_s(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    meta = tokenizer_metadata(smollm2.source_gguf)
    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
        meta["tokenizer.ggml.padding_token_id"])
    assert (smollm2.tokenizer.bos_id, smollm2.tokenizer.eos_id, smollm2.tokenizer.pad_id) == (1, 2, 2)
    assert smollm2.tokenizer.model == "gpt2" and smollm2.tokenizer.pre == "smollm"
    assert smollm2.tokenizer.add_bos is False and tokenizer("Merhaba").input_ids[0] != 1
    assert len(tokenizer) == len(meta["tokenizer.ggml.tokens"]) == 49152
    assert smollm2.chat_template == meta["tokenizer.chat_template"] == tokenizer.chat_template
    config = AutoConfig.from_pretrained(smollm2.hf_path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings is True
    assert config.eos_token_id == 2


@pytest.mark.e2e
def test_importing_again_returns_early_and_writes_nothing(smollm2):
    files = {p: p.stat().st_mtime_ns for p in smollm2.hf_path.iterdir()}
    assert (smollm2.hf_path / MANIFEST_NAME) in files
    started = time.perf_counter()
    again = import_gguf(smollm2.source_gguf, smollm2.hf_path)
    assert time.perf_counter() - started < 1.0
    assert again.reused and again.tokenizer == smollm2.tokenizer and again.chat_template == smollm2.chat_template
    assert {p: p.stat().st_mtime_ns for p in smollm2.hf_path.iterdir()} == files


@pytest.mark.e2e
def test_smollm2_import_converts_back_with_the_smollm_pre_tokenizer(smollm2, tmp_path):
    """llama.cpp's converter recognises the pre-tokenizer by hashing token ids, so only a faithful
    tokenizer.json comes back as `gpt2` / `smollm`; then the source's tokenizer metadata goes back in."""
    from ollama_ft.convert import run_converter

    exported = tmp_path / "exported-f16.gguf"
    run_converter(smollm2.hf_path, exported, tmp_path / "convert.log")
    source, converted = tokenizer_metadata(smollm2.source_gguf), tokenizer_metadata(exported)
    assert converted["tokenizer.ggml.model"] == "gpt2"
    assert converted["tokenizer.ggml.pre"] == "smollm"
    assert converted["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"]
    assert converted["tokenizer.ggml.merges"] == source["tokenizer.ggml.merges"]
    assert converted["tokenizer.ggml.eos_token_id"] == source["tokenizer.ggml.eos_token_id"]

    tensors_before = _tensor_bytes(exported)
    write_source_tokenizer(smollm2.source_gguf, exported)
    after = tokenizer_metadata(exported)
    assert {k: v for k, v in after.items() if k.startswith("tokenizer.ggml.")} == \
        {k: v for k, v in source.items() if k.startswith("tokenizer.ggml.")}
    assert after["tokenizer.chat_template"] == converted["tokenizer.chat_template"]  # the caller's to set
    assert _tensor_bytes(exported) == tensors_before
    assert not list(tmp_path.glob(".*partial*"))


def _tensor_bytes(path: Path) -> dict[str, tuple]:
    import hashlib

    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, tuple(t.shape.tolist()), hashlib.sha256(t.data.tobytes()).hexdigest())
            for t in reader.tensors}


# ---------------------------------------------------------------- gemma-3 (SentencePiece)

@pytest.mark.e2e
def test_gemma3_import_matches_llama_cpp_ids_and_logits(gemma3):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma3.hf_path)
    assert config.model_type == "gemma3_text" and config.head_dim == 256 and config.sliding_window == 512
    assert config.layer_types.count("full_attention") == 3  # every 6th of 18 layers is global
    assert gemma3.tokenizer.model == "llama" and gemma3.chat_template is None
    started = time.perf_counter()
    check = check_import(gemma3.source_gguf, gemma3.hf_path, [TURKISH, "Merhaba dünya!\n", "Bir, iki, üç: 123"])
    print(f"gemma-3 check: {time.perf_counter() - started:.1f} s, max rel diff {check.max_rel_logit_diff:.2e}")
    assert check.id_mismatches == []
    assert check.max_rel_logit_diff <= TOLERANCE
    assert check.top1_agreement == 1.0


@pytest.mark.e2e
def test_gemma3_import_continues_turkish_sensibly(gemma3):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3.hf_path)
    ids = tokenizer("Türkiye'nin başkenti", return_tensors="pt").input_ids
    assert ids[0, 0].item() == gemma3.tokenizer.bos_id  # gemma adds <bos>, as its GGUF says
    assert ids.shape[1] < 10  # words, not single characters
    model = AutoModelForCausalLM.from_pretrained(gemma3.hf_path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Ankara" in continuation, continuation


# ---------------------------------------------------------------- SentencePiece with and without a prefix space

TRICKY_SPM_TEXTS = [
    TURKISH,
    "  two leading spaces\n\nand a blank line",
    "<|im_start|>user\nMerhaba<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|> space after a special token",
    "x<|im_end|>",
    " 🦙 中文 ✅",
]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_base, tmp_path_factory) -> Path:
    """The tiny Llama (SentencePiece BPE with byte fallback, ChatML markers) as an F16 GGUF."""
    from ollama_ft.convert import run_converter

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f16.gguf"
    run_converter(tiny_base, out, out.with_suffix(".log"))
    return out


def _with_metadata(source: Path, dest: Path, changes: dict[str, bool]) -> Path:
    """A copy of `source` with some boolean metadata keys set, tensors unchanged."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in changes:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in changes.items():
        writer.add_bool(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return dest


@pytest.mark.e2e
def test_sentencepiece_without_prefix_space_matches_llama_cpp(tiny_base, tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    assert tokenizer_metadata(tiny_gguf)["tokenizer.ggml.add_space_prefix"] is False
    base = import_gguf(tiny_gguf, tmp_path / "hf")
    assert json.loads((base.hf_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "GemmaTokenizer"
    check = check_import(tiny_gguf, base.hf_path, TRICKY_SPM_TEXTS)
    assert check.id_mismatches == [] and check.max_rel_logit_diff <= TOLERANCE and check.top1_agreement == 1.0
    original, imported = AutoTokenizer.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(base.hf_path)
    for text in TRICKY_SPM_TEXTS:
        assert imported(text).input_ids == original(text).input_ids


@pytest.mark.e2e
def test_sentencepiece_with_prefix_space_matches_llama_cpp(tiny_gguf, tmp_path):
    """llama.cpp puts a space before every text run that follows a special token or starts the
    input, even one that starts with a space; Llama-2-style GGUFs (Mistral, TinyLlama) tokenize so."""
    from ollama_ft.convert import run_converter

    source = _with_metadata(tiny_gguf, tmp_path / "prefix.gguf",
                            {"tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_bos_token": True})
    base = import_gguf(source, tmp_path / "hf")
    check = check_import(source, base.hf_path, TRICKY_SPM_TEXTS)
    assert check.id_mismatches == [] and check.max_rel_logit_diff <= TOLERANCE and check.top1_agreement == 1.0

    back = tmp_path / "back.gguf"
    run_converter(base.hf_path, back, tmp_path / "convert.log")
    before, after = tokenizer_metadata(source), tokenizer_metadata(back)
    for key in ("model", "tokens", "scores", "token_type", "add_space_prefix", "add_bos_token", "bos_token_id",
                "eos_token_id"):
        assert after[f"tokenizer.ggml.{key}"] == before[f"tokenizer.ggml.{key}"], key


# ---------------------------------------------------------------- unit: transforms and refusals

def test_rotary_unpermute_inverts_the_converter_s_permute():
    import numpy as np
    import torch

    conversion_llama = pytest.importorskip("conversion.llama")
    from ollama_ft.gguf_import import _unpermute_rotary

    weight = torch.arange(12 * 64 * 5, dtype=torch.float32).reshape(12 * 64, 5)
    for n_head, n_kv in ((12, 12), (12, 3)):
        rows = weight[: n_kv * 64] if n_kv != n_head else weight
        permuted = conversion_llama.LlamaModel.permute(rows, n_head, n_kv).numpy()
        assert np.array_equal(_unpermute_rotary(permuted, n_kv), rows.numpy())


def _tiny_gguf(path: Path, arch: str, model: str = "gpt2", pre: str = "smollm") -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_read_gguf_reads_what_gguf_s_own_reader_reads(tmp_path):
    """The import's fast header reader against gguf.GGUFReader: every value type, quantized,
    float and integer tensors, a non-default alignment."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf.quants import quantize

    from ollama_ft.gguf_import import read_gguf

    path = tmp_path / "all-types.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.data_alignment = 64
    writer.add_uint32("general.alignment", 64)
    writer.add_string("general.name", "Türkçe ığüşöç 🦙")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_uint64("test.u64", 2**40)
    writer.add_int32("test.i32", -7)
    writer.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "▁c", "\n\n", ""] * 3)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 3.25])
    writer.add_array("test.bools", [True, False])
    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("q8.weight", quantize(rng.standard_normal((4, 64)).astype(np.float32), q8), raw_dtype=q8)
    writer.add_tensor("f16.weight", rng.standard_normal((3, 5)).astype(np.float16))
    writer.add_tensor("f32.weight", rng.standard_normal(7).astype(np.float32))
    writer.add_tensor("i32.weight", np.arange(6, dtype=np.int32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        assert (ours.fields[key].value, ours.fields[key].type, ours.fields[key].sub_type) == \
            (field.contents(), field.types[0], sub_type), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.tensor_type, mine.dims, mine.n_elements) == \
            (reference.tensor_type, tuple(reference.shape.tolist()), reference.n_elements)
        assert mine.data.dtype == reference.data.dtype and np.array_equal(mine.data, reference.data)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    pytest.importorskip("gguf")
    source = _tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    with pytest.raises(UserInputError) as caught:
        import_gguf(source, tmp_path / "out")
    assert "'qwen2'" in str(caught.value) and "llama, gemma3" in str(caught.value)
    assert "Hugging Face" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_unknown_bpe_pre_tokenizer_is_refused_by_name(tmp_path):
    pytest.importorskip("gguf")
    source = _tiny_gguf(tmp_path / "tiny.gguf", "llama", pre="deepseek-llm")
    with pytest.raises(UserInputError) as caught:
        import_gguf(source, tmp_path / "out")
    assert "'deepseek-llm'" in str(caught.value) and "smollm" in str(caught.value)
    assert "Hugging Face folder" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_missing_or_non_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(UserInputError, match="not a GGUF"):
        import_gguf(tmp_path / "text.gguf", tmp_path / "out")


# ---------------------------------------------------------------- unit: Ollama's store

def _ollama_store(root: Path, location: tuple[str, ...], tag: str, blob_hex: str, with_blob: bool = True) -> Path:
    manifest = root.joinpath("manifests", *location, tag)
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "c" * 64},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "a" * 64, "size": 10},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{blob_hex}", "size": 4},
        ]}))
    blob = root / "blobs" / f"sha256-{blob_hex}"
    if with_blob:
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(b"GGUF")
    return blob


def test_ollama_model_gguf_finds_the_model_layer_s_blob(tmp_path, monkeypatch):
    library = _ollama_store(tmp_path, ("registry.ollama.ai", "library", "gemma3"), "270m", "1" * 64)
    latest = _ollama_store(tmp_path, ("registry.ollama.ai", "library", "smollm2"), "latest", "2" * 64)
    spaced = _ollama_store(tmp_path, ("registry.ollama.ai", "someone", "tiny"), "q4", "3" * 64)
    hosted = _ollama_store(tmp_path, ("hf.co", "org", "model"), "latest", "4" * 64)

    assert ollama_model_gguf("gemma3:270m", tmp_path) == library
    assert ollama_model_gguf("ollama:gemma3:270m", tmp_path) == library
    assert ollama_model_gguf("smollm2", tmp_path) == latest
    assert ollama_model_gguf("someone/tiny:q4", tmp_path) == spaced
    assert ollama_model_gguf("hf.co/org/model", tmp_path) == hosted
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    assert ollama_model_gguf("gemma3:270m") == library


def test_ollama_model_gguf_names_the_model_and_the_fix_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    with pytest.raises(UserInputError) as caught:
        ollama_model_gguf("gemma3:270m")
    message = str(caught.value)
    assert "gemma3:270m" in message and "ollama pull gemma3:270m" in message and "OLLAMA_MODELS" in message

    _ollama_store(tmp_path, ("registry.ollama.ai", "library", "smollm2"), "latest", "5" * 64, with_blob=False)
    with pytest.raises(UserInputError, match="smollm2:latest.*missing"):
        ollama_model_gguf("smollm2")
    with pytest.raises(UserInputError, match="not an Ollama model name"):
        ollama_model_gguf("a/b/c/d:tag")
