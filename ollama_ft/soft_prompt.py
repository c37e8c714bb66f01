"""Bake a prompt-tuning or P-tuning soft prompt into the vocabulary, so the model can go to Ollama.

At inference PEFT puts the adapter's N virtual-token vectors in front of the input embeddings,
before everything the tokenizer produced, BOS included (`PeftModelForCausalLM.forward`: the
prompts are concatenated before `inputs_embeds`, the attention mask gets N ones in front, no
position ids are passed, so the virtual tokens take positions 0..N-1 and the text N onwards).
For P-tuning the prompt encoder's output does not depend on the input, and PEFT saves that output
(`prompt_embeddings`), not the encoder. So the same forward is a plain model whose vocabulary has
N more tokens, `<|soft_prompt_0|>`…, whose input-embedding rows are those vectors, fed the
token ids `[soft tokens] + ids`: that is what `bake_soft_prompt` writes, and `check_bake` proves.

The new tokens must never be generated. Their output rows (untied from the input rows first, as
SmolLM2 and gemma tie them) are the mean of the real tokens' output rows, so each new token's
logit is the mean of the real logits: never above the best real token's (equal only if every
logit is equal), and its probability is at most 1/V of the real tokens' mass at any temperature.
Nothing in llama.cpp or Ollama masks a token from sampling by its type; see
benchmarks/results/2026-11-26-soft-prompt-bake/README.md for what else guards it.

    vectors = soft_prompt_vectors(adapter_dir)           # N x hidden
    baked = bake_soft_prompt(BakeInput(base_dir, adapter_dir, out_dir))
    gate = check_bake(CheckInput(base_dir, adapter_dir, baked.out_dir, texts))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ollama_ft.errors import StageError, UserInputError
from ollama_ft.runs import atomic_output

TOKEN_FORMAT = "<|soft_prompt_{}|>"
# PEFT's names for the two methods whose soft prompt is a sequence of input vectors.
BAKEABLE = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning"}
OUTPUT_ROWS = "mean of the real tokens' output rows (logit = mean real logit, never above the best)"


@dataclass(frozen=True)
class SoftPrompt:
    method: str               # prompt_tuning | p_tuning
    vectors: object           # torch.Tensor, N x hidden, float32: what PEFT puts before the input embeddings


@dataclass(frozen=True)
class BakeInput:
    base_dir: Path            # the HF folder the adapter was trained on
    adapter_dir: Path         # a saved PEFT prompt_tuning / p_tuning adapter
    out_dir: Path
    token_format: str = TOKEN_FORMAT
    dtype: str = "float32"    # saved weights; "float16" is the F16 GGUF's type (merge.cast_for_export)
    chat_jinja: str | None = None   # the training template, for the GGUF's tokenizer.chat_template


@dataclass(frozen=True)
class SoftTokens:
    """What the stages after the bake need: the tokens the TEMPLATE writes first, and their ids."""
    tokens: list[str]
    token_ids: list[int]
    bos_token: str | None     # written by the TEMPLATE after the tokens; the GGUF then adds no BOS itself

    @property
    def prefix(self) -> str:
        """The text Ollama's TEMPLATE starts with, so the runner's first inputs are PEFT's."""
        return "".join(self.tokens) + (self.bos_token or "")

    @property
    def num_keep(self) -> int:
        """Inputs Ollama must keep when it shifts a full context (PARAMETER num_keep)."""
        return len(self.tokens) + (1 if self.bos_token else 0)


@dataclass(frozen=True)
class BakeOutput:
    out_dir: Path
    method: str
    soft: SoftTokens
    vocab_size: int           # the baked config's
    untied: bool              # the base tied input and output embeddings, the baked model does not
    generation_guard: str = OUTPUT_ROWS


@dataclass(frozen=True)
class CheckInput:
    base_dir: Path
    adapter_dir: Path
    baked_dir: Path
    texts: list[str]
    tolerance: float = 1e-3   # relative to the largest |logit|: float32 on both sides agrees to rounding


@dataclass(frozen=True)
class BakeCheck:
    max_abs_logit_diff: float     # PEFT(ids) vs baked([soft] + ids), every real position, the real vocabulary
    tolerance: float              # absolute, from CheckInput.tolerance x the largest |logit|
    max_soft_margin: float        # max over positions of (best new-token logit - best real logit); < 0 is safe
    positions: int

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.max_soft_margin < 0


def read_soft_prompt(adapter_dir: Path) -> SoftPrompt:
    """The adapter's soft prompt as PEFT uses it at inference, with the method's name."""
    import torch

    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{adapter_dir}: no readable adapter_config.json ({exc})",
                             "point at the folder PEFT's save_pretrained wrote") from None
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in BAKEABLE:
        raise UserInputError(f"{adapter_dir}: a {peft_type or 'non-PEFT'} adapter has no soft prompt to bake",
                             "only prompt_tuning and p_tuning prompts are input vectors; prefix_tuning "
                             "trains per-layer keys and values, which no token embedding can carry")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise UserInputError(f"{adapter_dir}: an encoder-decoder soft prompt cannot be baked")
    weights = _adapter_weights(adapter_dir)
    if "prompt_embeddings" not in weights:
        raise UserInputError(f"{adapter_dir}: the adapter holds no prompt_embeddings",
                             "save it with PEFT's save_pretrained")
    # P-tuning: PEFT saved the encoder's output (get_prompt_embedding_to_save), which is what it
    # feeds the model at inference (get_prompt in inference mode): the encoder ran once already.
    vectors = weights["prompt_embeddings"].to(torch.float32)
    n = int(config["num_virtual_tokens"])
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise UserInputError(f"{adapter_dir}: prompt_embeddings has shape {tuple(vectors.shape)}, "
                             f"expected ({n}, hidden)")
    return SoftPrompt(BAKEABLE[peft_type], vectors)


def soft_prompt_vectors(adapter_dir: Path):
    """The N x hidden float32 tensor PEFT puts before the input embeddings."""
    return read_soft_prompt(adapter_dir).vectors


def _adapter_weights(adapter_dir: Path) -> dict:
    import torch

    if (adapter_dir / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(adapter_dir / "adapter_model.safetensors")
    if (adapter_dir / "adapter_model.bin").is_file():
        return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise UserInputError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def embedding_scale(model) -> float:
    """What the input-embedding module multiplies looked-up rows by (gemma: sqrt(hidden), else 1).

    PEFT concatenates its vectors after that module, unscaled, so a baked row is vector / scale."""
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    return 1.0 if scale is None else float(scale)


def bake_soft_prompt(inp: BakeInput) -> BakeOutput:
    return _bake_and_save(inp)[0]


def _bake_and_save(inp: BakeInput) -> tuple[BakeOutput, object]:
    """bake_soft_prompt, also returning the baked model it saved (in inp.dtype)."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    soft = read_soft_prompt(inp.adapter_dir)
    n, hidden = soft.vectors.shape
    tokenizer = AutoTokenizer.from_pretrained(inp.base_dir)
    if inp.chat_jinja is not None:
        tokenizer.chat_template = inp.chat_jinja
    model = AutoModelForCausalLM.from_pretrained(inp.base_dir, dtype=torch.float32)
    if hidden != model.get_input_embeddings().weight.shape[1]:
        raise UserInputError(f"{inp.adapter_dir}: soft prompt width {hidden} does not fit {inp.base_dir} "
                             f"(hidden {model.get_input_embeddings().weight.shape[1]})",
                             "bake onto the base the adapter was trained on")
    tokens = [inp.token_format.format(i) for i in range(n)]
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise UserInputError(f"{inp.base_dir}: the vocabulary already has {clash[0]}", "choose another token_format")

    input_rows = model.get_input_embeddings().weight.detach().clone()
    output_rows = model.get_output_embeddings().weight.detach().clone()
    untied = bool(getattr(model.config, "tie_word_embeddings", False)) or \
        output_rows.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    real = len(tokenizer)     # rows past the tokenizer (padding rows) are not tokens
    # special + unnormalized: parsed whole from template text, never split, CONTROL in the GGUF.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    vocab = max(input_rows.shape[0], max(ids) + 1)

    new_in = torch.cat([input_rows, input_rows.new_zeros(vocab - input_rows.shape[0], hidden)])
    new_out = torch.cat([output_rows, output_rows.new_zeros(vocab - output_rows.shape[0], hidden)])
    new_in[ids] = soft.vectors / embedding_scale(model)
    new_out[ids] = output_rows[:real].mean(dim=0)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.get_input_embeddings().weight = torch.nn.Parameter(new_in)
    model.get_output_embeddings().weight = torch.nn.Parameter(new_out)  # its own tensor: untied
    model.config.vocab_size = vocab
    if inp.dtype == "float16":
        from ollama_ft.merge import cast_for_export

        model = cast_for_export(model)   # refuses a soft row beyond float16's range
    else:
        model = model.to(getattr(torch, inp.dtype))

    baked = BakeOutput(Path(inp.out_dir), soft.method, SoftTokens(tokens, ids, _leading_bos(tokenizer)), vocab, untied)
    with atomic_output(baked.out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _keep_sentencepiece(Path(inp.base_dir), tmp, tokens, ids, inp.chat_jinja)
        (tmp / "soft_prompt.json").write_text(json.dumps(
            {"method": baked.method, "tokens": tokens, "token_ids": ids, "untied": untied,
             "bos_token": baked.soft.bos_token, "generation_guard": baked.generation_guard}, indent=2) + "\n",
            encoding="utf-8")
    return baked, model


def _leading_bos(tokenizer) -> str | None:
    """The token the tokenizer puts first on its own (BOS), or None (SmolLM2's ChatML adds none)."""
    ids = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return tokenizer.convert_ids_to_tokens(ids[0]) if len(ids) > len(plain) and ids[1:] == plain else None


def _keep_sentencepiece(base: Path, out: Path, tokens: list[str], ids: list[int], chat_jinja: str | None) -> None:
    """A SentencePiece base keeps its own tokenizer files, with the new tokens declared in them.

    As merge.keep_base_tokenizer does, and for its reason (llama.cpp's converter reads
    tokenizer.model and add_bos_token); the converter takes added tokens from
    tokenizer_config.json's added_tokens_decoder, `special` ones as CONTROL."""
    if not (base / "tokenizer.model").is_file() or not (base / "tokenizer_config.json").is_file():
        return
    import shutil

    for name in ("tokenizer.model", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = config.setdefault("added_tokens_decoder", {})
    for token, id_ in zip(tokens, ids):
        decoder[str(id_)] = {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
    if chat_jinja is not None:
        config["chat_template"] = chat_jinja
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    if "chat_template" in config:
        (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "tokenizer.json").unlink(missing_ok=True)


def peft_logits(base_dir: Path, adapter_dir: Path, rows: list[list[int]]):
    """The PEFT model's logits on each row of token ids (its soft prompt in front), real positions only."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    n = model.active_peft_config.num_virtual_tokens
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
                .logits[0, n:].float() for ids in rows]


def check_bake(inp: CheckInput, baked_model=None) -> BakeCheck:
    """The logit gate: PEFT with its soft prompt on `ids` vs the baked folder on `[soft] + ids`
    (`baked_model`: that folder's model, already in memory, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    baked_info = json.loads((Path(inp.baked_dir) / "soft_prompt.json").read_text(encoding="utf-8"))
    soft_ids = baked_info["token_ids"]
    tokenizer = AutoTokenizer.from_pretrained(inp.base_dir)
    rows = [tokenizer(text, add_special_tokens=True).input_ids[:256] for text in inp.texts]
    expected = peft_logits(inp.base_dir, inp.adapter_dir, rows)

    baked_tok = AutoTokenizer.from_pretrained(inp.baked_dir)
    model = baked_model if baked_model is not None else \
        AutoModelForCausalLM.from_pretrained(inp.baked_dir, dtype=torch.float32)
    model.eval()
    worst, margin, scale, positions = 0.0, float("-inf"), 0.0, 0
    with torch.no_grad():
        for text, ids, ref in zip(inp.texts, rows, expected):
            # The baked tokenizer must read the prefix text as exactly the soft ids (the TEMPLATE's route).
            baked_ids = baked_tok("".join(baked_info["tokens"]) + text, add_special_tokens=False).input_ids
            if baked_ids[: len(soft_ids)] != soft_ids:
                raise StageError(f"baked tokenizer splits the soft-prompt tokens: {baked_ids[:len(soft_ids)]} "
                                 f"!= {soft_ids}")
            got = model(input_ids=torch.tensor([soft_ids + ids])).logits[0, len(soft_ids):].float()
            real = ref.shape[-1]
            worst = max(worst, float((got[:, :real] - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
            margin = max(margin, float((got[:, soft_ids].max(-1).values - got[:, :real].max(-1).values).max()))
            positions += len(ids)
    return BakeCheck(worst, inp.tolerance * (scale or 1.0), margin, positions)


# Stops an answer at a sampled soft token, which the output rows already make at most as likely
# as an average token: defence in depth, as Ollama matches stop strings on generated text.
STOP_TEXT = TOKEN_FORMAT.split("{")[0]


def bake_for_export(base_dir: Path, adapter_dir: Path, out_dir: Path, texts: list[str],
                    chat_jinja: str | None) -> tuple[SoftTokens, BakeCheck]:
    """The merge stage for a soft prompt: bake in float32, prove it equals PEFT, save it in float16.

    The gate runs on the float32 bake, where both sides agree to rounding; the float16 copy the
    converter reads is what merge.cast_for_export writes for LoRA (the F16 GGUF's own rounding)."""
    import shutil

    from ollama_ft.merge import cast_for_export

    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.float32")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        baked, model = _bake_and_save(BakeInput(Path(base_dir), Path(adapter_dir), staging, chat_jinja=chat_jinja))
        check = check_bake(CheckInput(Path(base_dir), Path(adapter_dir), staging, texts), baked_model=model)
        if not check.passed:
            why = (f"the baked model's logits differ from PEFT's by {check.max_abs_logit_diff:.4g} "
                   f"(allowed {check.tolerance:.4g})" if check.max_abs_logit_diff > check.tolerance else
                   f"a soft-prompt token's logit came within {-check.max_soft_margin:.4g} of the best real token's")
            raise StageError(f"merge: soft-prompt bake check failed: {why}",
                             "the adapter does not fit this base; retrain, or check model.base")
        with atomic_output(out_dir) as tmp:
            tmp.mkdir(parents=True)
            for item in staging.iterdir():
                if item.is_file() and not item.name.startswith("model"):
                    shutil.copyfile(item, tmp / item.name)
            cast_for_export(model).save_pretrained(tmp, safe_serialization=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return baked.soft, check


@dataclass(frozen=True)
class GgufGate:
    gguf_path: Path
    texts: int
    id_mismatches: int            # texts where llama.cpp's ids for prefix (+ BOS text) + text != soft ids + HF ids
    max_abs_logit_diff: float     # PEFT vs llama.cpp, next-token logits after each text, the real vocabulary
    max_rel_logit_diff: float     # the same over the largest |PEFT logit| (convert.py's measure)
    top1_agreement: float
    max_soft_margin: float        # best new-token logit - best real logit in llama.cpp's logits; < 0 is safe


def gguf_gate(base_dir: Path, adapter_dir: Path, gguf_path: Path, texts: list[str], tokens: list[str],
              bos_token: str | None = None, dequantize: bool = False) -> GgufGate:
    """The issue's gate: PEFT on each text vs the GGUF on the text as Ollama's template hands it over.

    llama.cpp tokenizes `prefix + bos_token + text` as Ollama's runner does (the GGUF's add_bos,
    special tokens parsed), so a GGUF that puts BOS before the soft tokens fails on ids. With
    `dequantize`, a float32 copy of a quantized file is evaluated (the binding has crashed on
    quantized real models here): weights' rounding is measured, not llama.cpp's quantized matmuls."""
    import tempfile

    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from ollama_ft.gguf_import import _llama_cpp_logits, _stderr_silenced, write_float32_gguf

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    hf_rows = [tokenizer(text, add_special_tokens=True).input_ids[:256] for text in texts]
    with _stderr_silenced():
        vocab = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    soft_ids = [vocab.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in tokens]
    prefix = "".join(tokens) + (bos_token or "")
    cpp_rows = [vocab.tokenize((prefix + text).encode("utf-8"), add_bos=True, special=True) for text in texts]
    vocab.close()
    if any(len(ids) != 1 for ids in soft_ids):
        raise StageError(f"{gguf_path.name}: llama.cpp does not read the soft-prompt tokens as single tokens "
                         f"({soft_ids[:2]}…)")
    soft = [ids[0] for ids in soft_ids]
    expected = [row[-1].numpy() for row in peft_logits(base_dir, adapter_dir, hf_rows)]
    mismatches = sum(cpp != soft + hf for cpp, hf in zip(cpp_rows, hf_rows))
    with tempfile.TemporaryDirectory(prefix=".soft-gate-", dir=gguf_path.parent) as tmp:
        evaluated = gguf_path
        if dequantize:
            evaluated = Path(tmp) / "f32.gguf"
            write_float32_gguf(gguf_path, evaluated)
        got = _llama_cpp_logits(evaluated, [soft + hf for hf in hf_rows], Path(tmp))
    worst = rel = margin = float("-inf")
    agree = 0
    for ref, row in zip(expected, got):
        real = row[: ref.shape[0]]
        diff = float(np.abs(real - ref).max())
        worst, rel = max(worst, diff), max(rel, diff / (float(np.abs(ref).max()) or 1.0))
        agree += int(real.argmax() == ref.argmax())
        margin = max(margin, float(row[soft].max() - real.max()))
    return GgufGate(gguf_path, len(texts), mismatches, worst, rel, agree / max(1, len(texts)), margin)


def export_gate(base_dir: Path, adapter_dir: Path, soft: SoftTokens, texts: list[str],
                tolerance: float) -> Callable[[Path], dict]:
    """The convert stage's extra check for a baked model: `gguf_gate` must pass on the written file."""
    def check(gguf_path: Path) -> dict:
        gate = gguf_gate(base_dir, adapter_dir, gguf_path, texts, soft.tokens, soft.bos_token)
        if gate.id_mismatches:
            raise StageError(f"soft-prompt gate: llama.cpp reads the template's soft-prompt prefix differently "
                             f"from training on {gate.id_mismatches} of {gate.texts} texts",
                             "the GGUF's tokens or add_bos_token are wrong; nothing was registered")
        if gate.max_rel_logit_diff > tolerance:
            raise StageError(f"soft-prompt gate: the GGUF's logits with the soft prompt differ from PEFT's by "
                             f"{gate.max_rel_logit_diff:.3g} of their range (allowed {tolerance})",
                             "raise export.logits_tolerance only if the F16 check without the prompt passes too")
        if gate.max_soft_margin >= 0:
            raise StageError("soft-prompt gate: a soft-prompt token would be the GGUF's most likely next token",
                             "retrain; the output rows are meant to keep these tokens below every best real one")
        return {"texts": gate.texts, "max_rel_logit_diff": gate.max_rel_logit_diff,
                "top1_agreement": gate.top1_agreement, "max_soft_margin": gate.max_soft_margin}
    return check
