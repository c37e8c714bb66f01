"""Built-in tiny base models, so the whole pipeline runs offline on a 2-core machine.

`tiny:llama` is a Llama-architecture model of about 4M parameters, random-initialised from a fixed
seed, with a SentencePiece tokenizer trained on the bundled Turkish text. The ChatML markers are
single tokens, the chat template sits in `tokenizer_config.json`, and bos/eos/pad/unk are set.
`tiny:llama-1b` has Llama-3.2-1B's shape (random weights) for GPU benchmarks.

The same arguments always give byte-identical files (tested), so a build can be cached by a hash
of its inputs:

    python -m ollama_ft.tiny llama OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ollama_ft.resources import bundled

DEFAULT_CORPUS = bundled("data", "turkish-demo.jsonl")
TINY_BUILD_VERSION = 2  # bump when the recipe below changes, so cached bases are rebuilt

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    rope_theta: float
    dtype: str


SHAPES = {
    # Rows of 256 keep llama.cpp's k-quants (Q4_K, Q6_K) in play instead of their fallbacks.
    "llama": TinyShape(2000, 256, 768, 4, 4, 2, False, 10000.0, "float32"),
    # Llama-3.2-1B: 16 layers, 2048 hidden, 8192 MLP, 32 heads / 8 KV heads, tied embeddings.
    "llama-1b": TinyShape(128256, 2048, 8192, 16, 32, 8, True, 500000.0, "bfloat16"),
}


def corpus_lines(corpus: Path) -> list[str]:
    """Every text field of every record in a JSONL file, one line per paragraph."""
    lines: list[str] = []
    for raw in corpus.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        record = json.loads(raw)
        texts = [m["content"] for m in record.get("messages", [])]
        texts += [record[k] for k in ("instruction", "input", "output", "text") if record.get(k)]
        for text in texts:
            lines.extend(part for part in text.split("\n") if part.strip())
    return lines


def base_key(shape: str, seed: int, corpus: Path) -> str:
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    spec = json.dumps({"shape": shape, "seed": seed, "corpus": digest, "v": TINY_BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def _train_tokenizer(lines: list[str], vocab_size: int, out: Path) -> None:
    import io

    import sentencepiece as spm

    # The chat roles appear in every rendered conversation; give them pieces of their own.
    lines = lines + ["system", "user", "assistant"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # An iterator and an in-memory writer keep temp-file paths out of the saved model proto.
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        # Identity normalisation and no dummy prefix: llama.cpp and transformers then split text the
        # same way, and newlines survive (as byte tokens) instead of being folded into spaces.
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        # One thread and no sampling keep the model file byte-identical across builds.
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())


def _write_tokenizer_config(out: Path, max_len: int) -> None:
    from ollama_ft.chat_templates import load_family

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False, "legacy": False, "add_prefix_space": False,
        "model_max_length": max_len,
        "chat_template": load_family("chatml").jinja,
        "additional_special_tokens": SPECIAL_TOKENS,
        # Marked special here so llama.cpp's converter types them CONTROL in the GGUF, and
        # llama.cpp/Ollama then read "<|im_start|>" in a prompt as one token, as training did.
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False}
            for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *SPECIAL_TOKENS])
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")},
        indent=2) + "\n", encoding="utf-8")


def _write_model(out: Path, shape: TinyShape, seed: int, vocab_size: int, max_len: int) -> int:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=max_len,
        rope_theta=shape.rope_theta, tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=1, eos_token_id=5, pad_token_id=3, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=5, pad_token_id=3)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def build_tiny_base(shape_name: str, out_dir: Path, *, seed: int = 0, corpus: Path = DEFAULT_CORPUS) -> Path:
    """Build a tiny base into `out_dir` (atomically: a temp folder renamed into place)."""
    shape = SHAPES[shape_name]
    out_dir = Path(out_dir)
    if (out_dir / "tiny.json").is_file():
        return out_dir  # the manifest is written last: its presence means the build completed
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        max_len = 4096 if shape_name == "llama-1b" else 2048
        _train_tokenizer(corpus_lines(corpus), shape.vocab_size, tmp)
        _write_tokenizer_config(tmp, max_len)
        # The model's eos is <|im_end|> (id 5 after unk/bos/eos/pad and byte-free user symbols).
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))
        assert sp.piece_to_id("<|im_end|>") == 5, "special token ids moved; update _write_model"
        # The tiny base's embedding matches its tokenizer; the 1B shape keeps Llama-3's 128,256 rows.
        vocab = shape.vocab_size if shape.vocab_size > 2000 else sp.get_piece_size()
        params = _write_model(tmp, shape, seed, vocab, max_len)
        manifest = {"shape": shape_name, "seed": seed, "parameters": params,
                    "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(), **asdict(shape),
                    "tokenizer_pieces": sp.get_piece_size(), "build_version": TINY_BUILD_VERSION}
        (tmp / "tiny.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an unfinished earlier build (no manifest)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_tiny_base(base: str, cache_root: Path, *, seed: int = 0, corpus: Path = DEFAULT_CORPUS) -> Path:
    """Path of the built tiny base named like `tiny:llama`, building it on first use."""
    shape_name = base.split(":", 1)[1]
    folder = Path(cache_root) / f"tiny-{shape_name}-{base_key(shape_name, seed, corpus)}"
    return build_tiny_base(shape_name, folder, seed=seed, corpus=corpus)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: python -m ollama_ft.tiny {{{'|'.join(SHAPES)}}} OUT_DIR")
    print(build_tiny_base(sys.argv[1], Path(sys.argv[2])))
