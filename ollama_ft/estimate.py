"""Estimate, before any heavy work, how much memory training a recipe needs and how much disk the build writes.

    from ollama_ft.estimate import estimate_memory
    est = estimate_memory(load_recipe("recipes/tiny-demo.toml"), device_bytes=16 * 2**30)

The shape comes from the base's `config.json` (or `tiny.SHAPES`), never from loading weights, so
this runs in milliseconds without torch. The model is a Llama-style decoder: embedding, per layer
q/k/v/o attention (grouped-query) and a gated MLP (gate/up/down) with two RMSNorms, a final norm,
and an LM head unless tied (biases and mixture-of-experts are not modelled). The figures are the
usual accounting (ZeRO paper for optimizer state, Korthikanti et al. 2022 for activations) adapted
to that shape and to what peft and bitsandbytes keep. `tests/test_estimate.py` checks them against a
real CPU run; on an H100 (Llama-3.2-1B shape, 4 × 1024 tokens, 3 steps) peak CUDA memory was
1.0–1.4x the estimate for lora/qlora and 0.6–1.0x for full (see the note on full fine-tuning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.errors import UserInputError
from ollama_ft.formatting import format_bytes
from ollama_ft.recipe import P_TUNING_ENCODER_WIDTH, PROMPT_METHODS, TINY_PREFIX, Recipe

# llama.cpp bits per weight, whole-model averages as `llama-quantize` reports them for 7B Llamas.
BITS_PER_WEIGHT = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.55, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0,
    "q2_k": 3.0, "q2_k_s": 2.9, "q3_k_s": 3.5, "q3_k_m": 3.9, "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.85,
    "q5_k_s": 5.5, "q5_k_m": 5.7, "q6_k": 6.6, "iq2_xxs": 2.06, "iq2_xs": 2.31, "iq2_s": 2.5, "iq2_m": 2.7,
    "iq3_xxs": 3.06, "iq3_xs": 3.3, "iq3_s": 3.44, "iq3_m": 3.66, "iq1_s": 1.56, "iq1_m": 1.75,
    "iq4_nl": 4.5, "iq4_xs": 4.25, "tq1_0": 1.69, "tq2_0": 2.06,
}
NF4_BYTES = 0.5625          # 4 bits + an fp32 absmax per 64 weights, itself double-quantized: ~4.5 bits
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
FIT_HEADROOM = 0.9          # leave 10% of the device to the allocator, the runtime and fragmentation


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool
    stored_bytes: int = 2    # bytes per weight in the checkpoint: 4 for float32, 2 for bf16/fp16

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_dims().values())

    def parameters(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied else 2)  # + LM head unless tied
        per_layer = self.layer_linear_params() + 2 * self.hidden_size  # + input and post-attention RMSNorm
        return embeddings + self.num_layers * per_layer + self.hidden_size  # + final norm


@dataclass
class Estimate:
    base: str
    parameters: int
    trainable_parameters: int
    breakdown: dict[str, int]             # memory while training, bytes
    disk_breakdown: dict[str, int]        # files the build writes, bytes
    total_bytes: int
    disk_bytes: int
    host_breakdown: dict[str, int] = field(default_factory=dict)   # RAM of the export stages, bytes
    host_bytes: int = 0
    device_bytes: int | None = None
    fits: bool | None = None
    warning: str | None = None
    notes: list[str] = field(default_factory=list)


def shape_from_config(config: dict) -> ModelShape:
    """A Llama-style shape from a Hugging Face `config.json` (multimodal ones: their `text_config`)."""
    cfg = config.get("text_config") or config
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                          intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                          num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                          head_dim=int(cfg.get("head_dim") or hidden // heads),
                          tied=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                          stored_bytes=4 if _config_dtype(config) == "float32" else 2)
    except KeyError as exc:
        raise UserInputError(f"config.json has no {exc.args[0]!r}: not a Llama-style decoder this estimate knows",
                             "estimate a Llama, Qwen, Mistral or Gemma style model") from None


def _config_dtype(config: dict) -> str | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", 4.x "torch_dtype"
            if isinstance(cfg.get(key), str):
                return cfg[key]
    return None


def base_shape(recipe: Recipe) -> ModelShape:
    """The base's shape: built-in tiny, a local folder's config.json, or the Hugging Face cache."""
    base = recipe.model.base
    if base.startswith(TINY_PREFIX):
        from ollama_ft.tiny import SHAPES

        name = base[len(TINY_PREFIX):]
        if name not in SHAPES:
            raise UserInputError(f"model.base = {base!r}: unknown tiny base",
                                 "choose one of: " + ", ".join(TINY_PREFIX + s for s in SHAPES))
        s = SHAPES[name]
        return ModelShape(s.vocab_size, s.hidden_size, s.intermediate_size, s.num_hidden_layers,
                          s.num_attention_heads, s.num_key_value_heads, s.hidden_size // s.num_attention_heads,
                          s.tie_word_embeddings, 4 if s.dtype == "float32" else 2)
    from ollama_ft.base_model import base_kind

    if base_kind(base) in ("gguf", "ollama"):
        return shape_from_gguf(gguf_of(recipe))
    if base.startswith((".", "/", "~")):  # the pipeline's rule for a local folder (else a hub id)
        config_path = recipe.resolve(base) / "config.json"
        if not config_path.is_file():
            raise UserInputError(f"model.base = {base!r}: {config_path} is missing", "point it at a model folder")
    else:
        config_path = _cached_hub_config(base)
        if config_path is None:
            raise UserInputError(f"model.base = {base!r}: its config.json is not in the Hugging Face cache",
                                 "download the model and pass its local folder, or run a build once first")
    return shape_from_config(json.loads(config_path.read_text(encoding="utf-8")))


def gguf_of(recipe: Recipe) -> Path:
    """The GGUF file a `.gguf` or `ollama:` base names."""
    from ollama_ft.base_model import OLLAMA_PREFIX, base_kind, ollama_models_dir

    base = recipe.model.base
    if base_kind(base) == "ollama":
        from ollama_ft.gguf_import import ollama_model_gguf

        return ollama_model_gguf(base[len(OLLAMA_PREFIX):], ollama_models_dir())
    path = recipe.resolve(base)
    if not path.is_file():
        raise UserInputError(f"model.base = {base!r}: no such GGUF file ({path})", "point it at a .gguf file")
    return path


def shape_from_gguf(path: Path) -> ModelShape:
    """The shape from a GGUF's metadata (its tensors are not read). The import saves float32."""
    from ollama_ft.gguf_import import read_gguf

    gguf = read_gguf(path)
    arch = gguf.value("general.architecture")
    try:
        hidden, heads = int(gguf.value(f"{arch}.embedding_length")), int(gguf.value(f"{arch}.attention.head_count"))
        return ModelShape(vocab_size=len(gguf.value("tokenizer.ggml.tokens")), hidden_size=hidden,
                          intermediate_size=int(gguf.value(f"{arch}.feed_forward_length")),
                          num_layers=int(gguf.value(f"{arch}.block_count")), num_heads=heads,
                          num_kv_heads=int(gguf.value(f"{arch}.attention.head_count_kv", heads)),
                          head_dim=int(gguf.value(f"{arch}.attention.key_length", hidden // heads)),
                          tied=not any(t.name == "output.weight" for t in gguf.tensors), stored_bytes=4)
    except (TypeError, KeyError):
        raise UserInputError(f"{path}: its metadata lacks the sizes of a Llama-style decoder ({arch})",
                             "estimate a Llama, Qwen, Mistral or Gemma style model") from None


def _cached_hub_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except (ImportError, ValueError):  # no huggingface_hub, or not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None  # else None or a "known missing" marker


def _targets(recipe: Recipe) -> list[str]:
    wanted = recipe.train.target_modules
    return list(LLAMA_LINEARS) if wanted == "all-linear" else [t for t in wanted if t in LLAMA_LINEARS]


def estimate_memory(recipe: Recipe, *, device_bytes: int | None = None, cpu: bool = False,
                    num_processes: int = 1) -> Estimate:
    """Memory to train `recipe` (weights, gradients, optimizer, activations) and disk the build writes.

    `cpu=True` resolves dtype "auto" as training does on a CPU (float32) instead of bfloat16.
    With `num_processes` > 1 (`--launcher accelerate`) the figures are per device: DDP keeps a
    full copy per process, FSDP (full fine-tuning) shards weights, gradients and optimizer state."""
    shape, t, m = base_shape(recipe), recipe.train, recipe.model
    params, h, layers = shape.parameters(), shape.hidden_size, shape.num_layers
    notes: list[str] = []
    wide = m.dtype == "float32" or (m.dtype == "auto" and cpu)
    if m.dtype == "auto" and not cpu:
        notes.append("dtype 'auto' estimated as bfloat16 (a GPU); on a CPU it trains in float32, ~2x the memory")
    wbytes = 4 if wide else 2
    # Adam keeps m and v (fp32, or 1 byte each with bitsandbytes' 8-bit Adam); plain SGD keeps nothing.
    moments = 0 if t.optimizer == "sgd" else (2 if t.optimizer in EIGHT_BIT_OPTIMIZERS else 8)

    if t.method == "full":
        trainable = params
        weights, grads = wbytes * params, wbytes * params
        # The pipeline loads the base in the training dtype and trains it as is: in bf16, torch's
        # AdamW keeps m and v in bf16 too, 2+2+4 = 8 bytes/param (measured on an H100: 13.1 GiB vs
        # 13.1 estimated for the 1B shape). fp32 training is the classic 16 bytes/param (4+4+8), the
        # same as mixed precision with an fp32 master copy (2+2+12).
        optimizer = (moments if wide else moments // 2) * params
        if not wide:
            notes.append("full fine-tuning in 16-bit without an fp32 master copy: 8 bytes/parameter; "
                         "mixed precision with a master copy would need 16")
    elif t.method in PROMPT_METHODS:
        # Only the soft prompt trains: N vectors, or for P-tuning the encoder MLP that makes them.
        width = P_TUNING_ENCODER_WIDTH
        trainable = t.num_virtual_tokens * h + (0 if t.method == "prompt_tuning" else
                                                 h * width + width * width + width * h + 2 * width + h)
        weights, grads, optimizer = wbytes * params + 4 * trainable, 4 * trainable, moments * trainable
    else:
        dims, targets = shape.linear_dims(), _targets(recipe)
        if not targets:
            notes.append("no target module matches a Llama linear layer; adapters estimated as empty")
        per_layer = sum(t.rank * (dims[n][0] + dims[n][1]) + (dims[n][1] if t.method == "dora" else 0)
                        for n in targets)  # DoRA adds a magnitude vector per output feature
        trainable = per_layer * layers
        frozen_linear = layers * shape.layer_linear_params()
        # prepare_model_for_kbit_training (peft backend) upcasts what stays unquantized to fp32.
        rest = params - frozen_linear  # embeddings, LM head, norms
        weights = int(NF4_BYTES * frozen_linear) + 4 * rest if m.load_in_4bit else wbytes * params
        # Adapters train in fp32 whatever the base's dtype: weight + grad (+ m + v) per parameter.
        weights += 4 * trainable
        grads = 4 * trainable
        optimizer = moments * trainable

    if num_processes > 1 and t.method == "full":
        weights, grads, optimizer = (-(-x // num_processes) for x in (weights, grads, optimizer))
        notes.append(f"per device: FSDP shards weights, gradients and optimizer state over {num_processes} processes")
    elif num_processes > 1:
        notes.append(f"per device: each of the {num_processes} DDP processes holds the whole model")

    # A soft prompt's vectors go through every layer in front of each sequence.
    tokens = t.batch_size * (m.max_seq_length + (t.num_virtual_tokens if t.method in PROMPT_METHODS else 0))
    # Bytes kept for backward per token per layer, 16-bit: attention 8h + 6·kv (norm output, q/k/v,
    # rotated q/k, attention output; SDPA keeps no seq² matrix), gated MLP 2h + 8·I (input, gate, up,
    # silu(gate), product) and 4h for the two RMSNorms. That is ~41h for tiny:llama, ~48h for
    # Llama-3.2-1B, the analogue of Korthikanti et al.'s 34h for a GPT block. Double it for fp32.
    kv, dims = shape.num_kv_heads * shape.head_dim, shape.linear_dims()
    act_bytes, extra = wbytes, 0
    if m.load_in_4bit:
        # The fp32 norms and embeddings make the residual stream fp32, and each 4-bit layer keeps a
        # 16-bit copy of its input for backward.
        act_bytes, extra = 4, 2 * sum(a for a, _ in dims.values())
    elif t.method not in ("full", *PROMPT_METHODS) and not wide:
        # peft casts each adapted layer's 16-bit input to the adapters' fp32 and keeps that copy.
        extra = 4 * sum(dims[n][0] for n in _targets(recipe))
    per_token_layer = (act_bytes // 2) * (14 * h + 8 * shape.intermediate_size + 6 * kv) + extra
    if t.gradient_checkpointing:
        # Only each layer's input (h values) is kept; one layer at a time is recomputed during backward.
        activations = tokens * (layers * act_bytes * h + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    # The loss upcasts logits to fp32, and cross-entropy keeps a log-softmax of the same size.
    logits = 2 * tokens * shape.vocab_size * 4
    breakdown = {"weights": weights, "gradients": grads, "optimizer": optimizer,
                 "activations": activations, "logits": logits}
    total = sum(breakdown.values())

    disk = _disk(recipe, params, trainable, wbytes, optimizer)
    host = export_ram(shape, recipe, trainable, wbytes)
    est = Estimate(base=recipe.model.base, parameters=params, trainable_parameters=trainable, breakdown=breakdown,
                   disk_breakdown=disk, total_bytes=total, disk_bytes=sum(disk.values()), device_bytes=device_bytes,
                   host_breakdown=host, host_bytes=max(host.values()), notes=notes)
    if device_bytes is not None:
        est.fits = total <= FIT_HEADROOM * device_bytes
        if not est.fits:
            est.warning = (f"training needs about {format_bytes(total)} but the device has "
                           f"{format_bytes(device_bytes)}; " + memory_advice(recipe, breakdown))
    return est


def export_ram(shape: ModelShape, recipe: Recipe, trainable: int, wbytes: int) -> dict[str, int]:
    """RAM of the two export steps that hold a whole model, on the CPU, after training has ended.

    merge: the base as stored (the trained model for full fine-tuning, saved in its training dtype)
    plus float32 adapters; it is cast to float16 in place. GGUF check: the merged model in float16
    plus its largest matrix widened to float32 for its turn (ollama_ft/convert.py). Measured at the
    1B shape (benchmarks/export_memory.py): peak anonymous RSS 1.02x and 1.46x the merged bytes,
    against 1.0x and 1.42x from these formulas.
    """
    params, h = shape.parameters(), shape.hidden_size
    full = recipe.train.method == "full"
    merge = wbytes * params if full else shape.stored_bytes * params + 4 * trainable
    widest = max(shape.vocab_size * h, shape.intermediate_size * h)
    return {"merge": merge, "GGUF check": 2 * params + 4 * widest}


def _disk(recipe: Recipe, params: int, trainable: int, wbytes: int, optimizer: int) -> dict[str, int]:
    """Bytes of each output the build keeps (checkpoints are deleted once training ends, but count at peak)."""
    t = recipe.train
    saved = wbytes * params if t.method == "full" else 4 * trainable
    # The merge saves float16 whatever the base's dtype (ollama_ft/merge.py, cast_for_export).
    disk = {"checkpoints (2 kept)": 2 * (saved + optimizer), "trained": saved,
            "merged": 2 * params, "F16 GGUF": 2 * params}
    # Every candidate stays on disk until one is chosen (the others are deleted then).
    for quant in recipe.export.candidates:
        if quant != "f16":
            disk[f"{quant.upper()} GGUF"] = int(params * BITS_PER_WEIGHT[quant] / 8)
    return disk


def memory_advice(recipe: Recipe, b: dict[str, int]) -> str:
    """The three changes that free the most memory for this recipe, biggest saving first."""
    t, tips = recipe.train, []
    if not t.gradient_checkpointing:
        tips.append((0.8 * b["activations"], "set train.gradient_checkpointing = true"))
    if t.batch_size > 1:
        tips.append(((b["activations"] + b["logits"]) / 2, "halve train.batch_size (and double gradient_accumulation)"))
    if t.method == "full":
        tips.append((b["gradients"] + b["optimizer"], "use train.method = 'lora'"))
        if t.optimizer == "adamw_torch":
            tips.append((0.4 * b["optimizer"], "use train.optimizer = 'adamw_8bit'"))
    elif not recipe.model.load_in_4bit:
        tips.append((0.6 * b["weights"], "use train.method = 'qlora' with model.load_in_4bit = true"))
    tips.append(((b["activations"] + b["logits"]) / 2, "halve model.max_seq_length"))
    ranked = [text for _, text in sorted(tips, key=lambda tip: -tip[0])]
    return "; ".join(ranked[:3])


def training_device_bytes(force_cpu: bool = False) -> tuple[int | None, bool]:
    """(memory of the device training would use, whether that is the CPU).

    Asks nvidia-smi rather than torch: torch would open a CUDA context in this process, which
    holds GPU memory for as long as the build runs beside the training worker."""
    import shutil
    import subprocess

    if not force_cpu and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)
            mib = [int(line) for line in out.stdout.split() if line.strip().isdigit()]
            if out.returncode == 0 and mib:
                return mib[0] * 2**20, False
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    return available_ram_bytes(), True


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping; None off Linux."""
    try:
        with open("/proc/meminfo") as fh:
            return 1024 * next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return None


def visible_gpu_count() -> int:
    """CUDA GPUs this process may use, from nvidia-smi and CUDA_VISIBLE_DEVICES (0 without either)."""
    import os
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count
