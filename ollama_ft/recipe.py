"""The recipe: one TOML file that says what to fine-tune, on what, and how to ship it.

`load_recipe(path)` parses and validates the whole file before any heavy work starts. Every
problem is collected and reported at once, each with its field path, the bad value and what is
allowed; unknown keys are rejected with the nearest valid name. Relative paths resolve against
the recipe's folder. Each field is documented where it is declared; `recipes/tiny-demo.toml` is a
commented example of all of them.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ollama_ft.backends.speedups import SWITCHES
from ollama_ft.errors import RecipeError

# Names of llama.cpp quantization types (`llama-quantize --help`), lower-case as users write them.
# quantize.py maps each to llama.cpp's LLAMA_FTYPE_MOSTLY_* value; a test checks they all exist.
QUANT_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
    "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
    "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq1_s", "iq1_m",
    "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
)
# Types whose tensors llama.cpp refuses to make without an importance matrix (llama-quant.cpp's
# tensor_requires_imatrix; a test quantizes each type without one to keep this list honest).
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")
# What `quantization = "auto"` measures: the common sizes from near-lossless to 3.5 bits per weight.
AUTO_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m")
CHAT_TEMPLATES = ("auto", "chatml", "llama3", "llama31", "mistral", "gemma", "phi3", "alpaca")
ADAPTER_METHODS = ("lora", "qlora", "dora")
# Soft prompts: N learned input vectors before the text. The first two are baked into the vocabulary
# for export (soft_prompt.py); prefix_tuning's per-layer keys and values have no GGUF form.
PROMPT_METHODS = ("prompt_tuning", "p_tuning")
TRAIN_METHODS = (*ADAPTER_METHODS, "full", *PROMPT_METHODS, "prefix_tuning")
P_TUNING_ENCODER_WIDTH = 128   # P-tuning's encoder MLP width: the one PEFT's own P-tuning examples use
TINY_PREFIX = "tiny:"
TINY_SHAPES = ("llama", "llama-1b")

# Ollama's own rule (types/model/name.go): each part starts with a letter, digit or "_",
# then letters, digits, "_", "-", "."; at most 80 characters; optional ":tag" of the same kind.
_OLLAMA_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}"
OLLAMA_NAME_RE = re.compile(rf"^(?:{_OLLAMA_PART}/)?{_OLLAMA_PART}(?::[A-Za-z0-9_][A-Za-z0-9_.\-]{{0,79}})?$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(_Section):
    base: str = Field(description="Hub id (`Qwen/Qwen2.5-0.5B-Instruct`), a local folder, a local GGUF "
                      "file (`./SmolLM2-135M-Instruct.Q4_1.gguf`), a model of the local Ollama server "
                      "(`ollama:qwen2.5:0.5b`), or a built-in tiny base: `tiny:llama` (a few million "
                      "parameters, CPU-friendly) or `tiny:llama-1b` (Llama-3.2-1B's shape, random weights; "
                      "for GPU benchmarks). GGUF and Ollama bases are imported once as a Hugging Face folder.")
    chat_template: Literal[CHAT_TEMPLATES] = Field("auto", description="`auto` trains with the base's own "
                      "chat template (default system prompt included) and ships a Go TEMPLATE proven to render "
                      "the same; a base without one needs a family: chatml, llama3, llama31, mistral, gemma, "
                      "phi3, alpaca (the family's template then replaces the base's).")
    max_seq_length: int = Field(1024, ge=16, le=262144, description="Longest training example in tokens; "
                      "also the Ollama `num_ctx` unless [ollama.parameters] sets it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights' dtype "
                      "while training; `auto` = bfloat16 on a GPU that supports it, else float32.")
    load_in_4bit: bool = Field(False, description="Load the frozen base in 4-bit NF4 (QLoRA). Needs a CUDA GPU.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub model. Off unless you trust it.")


class DataSection(_Section):
    train: list[str] = Field(description="Training file(s): .jsonl, .json, .csv, .parquet, or a hub dataset id.")
    format: Literal["auto", "messages", "alpaca", "text"] = Field("auto", description="`messages` (chat turns), "
                      "`alpaca` (instruction/input/output) or `text`; `auto` detects it from the first record.")
    validation: str | None = Field(None, description="Optional validation file (same formats).")
    validation_split: float = Field(0.0, ge=0.0, lt=0.5, description="Hold out this fraction of the training "
                      "records for validation when no validation file is given.")
    system_prompt: str | None = Field(None, description="System prompt added to records that have none.")
    on_bad_record: Literal["error", "skip"] = Field("error", description="`error` stops at the first bad record "
                      "(file and line named); `skip` drops bad records and reports how many.")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N records (quick trials).")

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainSection(_Section):
    method: Literal[TRAIN_METHODS] = Field("lora", description="lora | qlora (4-bit base) | dora | full | "
                      "prompt_tuning | p_tuning (a soft prompt of num_virtual_tokens vectors, baked into the "
                      "vocabulary for export).")
    rank: int = Field(16, ge=1, le=4096, description="LoRA rank r: adapter capacity (8–64 typical).")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters: "
                      "`all-linear` or a list such as [\"q_proj\", \"v_proj\"].")
    num_virtual_tokens: int = Field(20, ge=1, description="Soft-prompt length for prompt_tuning and p_tuning: the "
                      "template puts this many extra tokens before every conversation.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field("adamw_torch",
                      description="adamw_8bit saves optimizer memory on a GPU (bitsandbytes).")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    gradient_accumulation: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    seed: int = Field(42, ge=0, description="Seeds weights' init, data order and dropout; same seed, same order.")
    packing: bool = Field(False, description="Pack several examples per sequence (no padding).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations: less memory, ~30% slower.")
    assistant_only_loss: bool | None = Field(None, description="Loss only on the assistant's turns; "
                      "default: on for chat data, off for plain text.")
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps; an interrupted run resumes there.")
    report_to: Literal["none", "tensorboard"] = Field("none", description="Also log metrics to TensorBoard.")
    speedups: Literal["auto"] | list[Literal[SWITCHES]] = Field(
        "auto", description="PEFT backend's speed switches: \"auto\" (what measured faster on this kind of "
        "device, see ollama_ft/backends/speedups.py), [] for none, or a list.")


class ExportSection(_Section):
    quantization: str | list[str] = Field("q4_k_m", description="llama.cpp quant type: q4_k_m (default), "
                      "q5_k_m, q8_0, iq4_xs, f16, … any type llama.cpp's quantizer offers. A list, or \"auto\" "
                      f"({', '.join(AUTO_QUANTS)}), makes each, measures it against the F16 model on held-out text "
                      "and ships the smallest that meets max_kld (and min_top1).")
    imatrix: str = Field("none", description="Importance matrix for the quantizer: \"auto\" computes one from "
                      "the training examples rendered with the training template (calibrated on the language "
                      "and format the model serves), \"none\", or the path of an imatrix file (.gguf or .dat). "
                      "Needs llama.cpp's tools: `ollama-ft install-llama-tools`.")
    max_kld: float = Field(0.05, gt=0, description="Quality floor when several types are measured: the largest "
                      "mean KL divergence from the F16 model's next-token distribution on held-out text.")
    min_top1: float | None = Field(None, gt=0, le=1, description="Also a floor: the least share of tokens whose "
                      "most likely next token is the F16 model's (e.g. 0.9).")
    keep_f16: bool = Field(True, description="Keep the F16 GGUF after quantizing (it is needed for requantizing).")
    logits_tolerance: float = Field(0.05, gt=0, description="Largest allowed max-abs difference between the "
                      "F16 GGUF's next-token logits and the merged model's, relative to the logits' range.")

    @field_validator("quantization")
    @classmethod
    def _known_quant(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value.lower() == "auto":
            return "auto"
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError('an empty list; name at least one type, or "auto"')
        for name in names:
            if name.lower() not in QUANT_TYPES:
                near = difflib.get_close_matches(name.lower(), QUANT_TYPES, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                which = f"{name!r}: " if isinstance(value, list) else ""
                raise ValueError(f"{which}{hint}llama.cpp offers: {', '.join(QUANT_TYPES)}, or \"auto\"")
        low = [name.lower() for name in names]
        if len(set(low)) != len(low):
            raise ValueError("names a type twice")
        return low[0] if isinstance(value, str) else low

    @property
    def candidates(self) -> list[str]:
        """The types the quantize stage makes: one, or several to choose from by measured quality."""
        if self.quantization == "auto":
            return list(AUTO_QUANTS)
        return [self.quantization] if isinstance(self.quantization, str) else list(self.quantization)

    @property
    def chooses_by_quality(self) -> bool:
        return not isinstance(self.quantization, str) or self.quantization == "auto"

    @property
    def needs_llama_tools(self) -> bool:
        return self.imatrix != "none" or self.chooses_by_quality


class OllamaSection(_Section):
    name: str = Field(description="Model name in Ollama, e.g. `tr-assistant` or `me/tr-assistant:v1`.")
    host: str | None = Field(None, description="Ollama server; default $OLLAMA_HOST or http://127.0.0.1:11434.")
    system: str | None = Field(None, description="SYSTEM prompt baked into the model (default: data.system_prompt).")
    parameters: dict[str, int | float | str | bool | list[str]] = Field(default_factory=dict,
                      description="Ollama PARAMETERs (temperature, top_p, num_ctx, …); stop tokens are added "
                      "from the chat template.")
    template: str | None = Field(None, description="Go TEMPLATE override; default: generated from the chat template.")

    @field_validator("name")
    @classmethod
    def _ollama_name(cls, value: str) -> str:
        if not OLLAMA_NAME_RE.match(value):
            raise ValueError("Ollama names are [namespace/]model[:tag], each part starting with a letter, digit "
                             "or '_', then letters, digits, '_', '-', '.', at most 80 characters")
        return value


class EvalSection(_Section):
    suite: str | None = Field(None, description="Eval suite (TOML) run through Ollama after registering.")
    baseline: bool = Field(False, description="Also evaluate the untrained base (exported the same way, "
                      "tag `:base`) and report the per-category delta.")
    concurrency: int = Field(2, ge=1, le=64)
    sample: int | None = Field(None, ge=1, description="Evaluate a seeded sample of this many cases, each "
                      "category keeping its share (a quicker run on a slow machine); unset: every case.")
    candidates: bool = Field(False, description="With export.quantization a list or \"auto\": also register "
                      "every measured candidate as NAME:TYPE (e.g. tr-model:q5_k_m) and run the suite on each, "
                      "so the quality table has pass rates beside the KL divergences.")


class Recipe(_Section):
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    ollama: OllamaSection
    eval: EvalSection = EvalSection()
    # Set by load_recipe, not by the file.
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        problems = []
        if self.model.load_in_4bit and self.train.method == "full":
            problems.append("model.load_in_4bit = true with train.method = 'full': 4-bit weights cannot be "
                            "trained directly; use method = 'qlora' or set load_in_4bit = false")
        if self.train.method == "qlora" and not self.model.load_in_4bit:
            # QLoRA means a 4-bit base; say so rather than silently training 16-bit LoRA.
            problems.append("train.method = 'qlora' needs model.load_in_4bit = true (or use method = 'lora')")
        if self.train.method == "prefix_tuning":
            problems.append("train.method = 'prefix_tuning': its prompt is a key/value prefix in every layer, which "
                            "no GGUF or Ollama runner can carry; use prompt_tuning or p_tuning (exported as extra "
                            "tokens), or lora")
        if self.train.method in PROMPT_METHODS and self.model.load_in_4bit:
            problems.append(f"model.load_in_4bit = true with train.method = {self.train.method!r}: a soft prompt "
                            "trains only its own vectors, and the export bakes them into a 16-bit base; set "
                            "load_in_4bit = false")
        if self.train.method in PROMPT_METHODS and self.train.packing:
            problems.append(f"train.packing = true with train.method = {self.train.method!r}: a packed sequence "
                            "holds several examples but gets one soft prompt; set packing = false")
        needing = [q for q in self.export.candidates if q in NEEDS_IMATRIX]
        if needing and self.export.imatrix == "none":
            problems.append(f"export.quantization: {', '.join(needing)} need an importance matrix, and "
                            "export.imatrix = 'none'; set export.imatrix = 'auto' (or a file), or choose "
                            "q4_k_m / iq4_xs")
        if self.eval.candidates and not (self.export.chooses_by_quality and self.eval.suite):
            problems.append("eval.candidates = true evaluates the quantization candidates: it needs "
                            "export.quantization = \"auto\" or a list, and eval.suite")
        from ollama_ft.modelfile import OLLAMA_PARAMETERS, modelfile_text_problem, parameter_type_problem

        texts = [("ollama.system", self.ollama.system), ("ollama.template", self.ollama.template),
                 ("data.system_prompt", self.data.system_prompt)]
        texts += [(f"ollama.parameters.{k}", v) for k, v in self.ollama.parameters.items() if isinstance(v, str)]
        texts += [(f"ollama.parameters.stop[{i}]", v) for i, v in
                  enumerate(self.ollama.parameters.get("stop", []) if isinstance(self.ollama.parameters.get("stop"), list) else [])]
        for field, text in texts:
            problem = modelfile_text_problem(text) if text else None
            if problem:
                problems.append(f"{field}: {problem}")
        for key, value in self.ollama.parameters.items():
            if key not in OLLAMA_PARAMETERS:
                near = difflib.get_close_matches(key, sorted(OLLAMA_PARAMETERS), n=1)
                problems.append(f"ollama.parameters.{key}: not an Ollama parameter"
                                + (f"; did you mean {near[0]!r}?" if near else ""))
            if key == "stop":
                continue
            if isinstance(value, list):
                problems.append(f"ollama.parameters.{key}: only 'stop' takes a list")
            elif parameter_type_problem(key, value):
                problems.append(f"ollama.parameters.{key} = {value!r}: {parameter_type_problem(key, value)}")
        if problems:
            raise ValueError(" | ".join(problems))
        return self

    # Paths ---------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe's folder."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.folder / p)

    @property
    def is_tiny(self) -> bool:
        return self.model.base.startswith(TINY_PREFIX)

    @property
    def stem(self) -> str:
        return self.path.stem if self.path else "recipe"


def _nearest(key: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; allowed: {', '.join(allowed)}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        current = field.annotation
    return [n for n in current.model_fields if n != "path"]


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key{_nearest(str(loc[-1]), _allowed_keys(Recipe, loc[:-1]))}"
    if kind == "missing":
        return f"{where}: required, but missing"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{…}"
    if len(shown) > 60:
        shown = shown[:57] + "…"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where} = {shown}: {msg}"


def check_recipe_files(recipe: Recipe) -> list[str]:
    """Files the recipe names that are missing or unreadable (hub ids are left to load time)."""
    problems = []
    candidates = [("data.train", t) for t in recipe.data.train]
    if recipe.data.validation:
        candidates.append(("data.validation", recipe.data.validation))
    if recipe.eval.suite:
        candidates.append(("eval.suite", recipe.eval.suite))
    if recipe.export.imatrix not in ("auto", "none"):
        path = recipe.resolve(recipe.export.imatrix)
        if not path.is_file():
            problems.append(f"export.imatrix = {recipe.export.imatrix!r}: no such file ({path}); give an imatrix "
                            "file relative to the recipe's folder, or \"auto\" / \"none\"")
    for field, value in candidates:
        path = recipe.resolve(value)
        looks_local = path.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet", ".toml"} or value.startswith((".", "/", "~"))
        if not looks_local:
            continue  # a hub dataset id such as "org/name"
        if not path.is_file():
            problems.append(f"{field} = {value!r}: no such file ({path}); paths are relative to the recipe's folder")
        elif not os.access(path, os.R_OK):
            problems.append(f"{field} = {value!r}: file is not readable ({path})")
    base = recipe.model.base
    if base.startswith(TINY_PREFIX):
        if base[len(TINY_PREFIX):] not in TINY_SHAPES:
            problems.append(f"model.base = {base!r}: unknown tiny base; choose one of "
                            + ", ".join(TINY_PREFIX + s for s in TINY_SHAPES))
    elif base.lower().endswith(".gguf"):
        path = recipe.resolve(base)
        if not path.is_file():
            problems.append(f"model.base = {base!r}: no such GGUF file ({path}); paths are relative to the "
                            "recipe's folder")
        else:
            with open(path, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    problems.append(f"model.base = {base!r}: {path} is not a GGUF file (no GGUF header)")
    elif base.startswith((".", "/", "~")) and not recipe.resolve(base).is_dir():
        problems.append(f"model.base = {base!r}: no such folder ({recipe.resolve(base)})")
    return problems


def parse_recipe(text: str, path: Path | str = "recipe.toml", *, check_files: bool = True) -> Recipe:
    """Validate recipe TOML text; raise RecipeError listing every problem found."""
    path = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(str(path), [f"not valid TOML: {exc}"]) from None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if err["type"] == "value_error" and not err["loc"]:
                problems.extend(p.strip() for p in err["msg"].removeprefix("Value error, ").split(" | "))
            else:
                problems.append(_format_error(err))
        raise RecipeError(str(path), problems) from None
    recipe.path = path.resolve()
    if check_files:
        problems = check_recipe_files(recipe)
        if problems:
            raise RecipeError(str(path), problems)
    return recipe


def load_recipe(path: str | os.PathLike, *, check_files: bool = True) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), ["no such file; pass the path of a .toml recipe (see recipes/)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [f"cannot read: {exc}"]) from None
    return parse_recipe(text, path, check_files=check_files)
