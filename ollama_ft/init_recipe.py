"""`ollama-ft init`: write a commented starter recipe, every field with its trade-off beside it.

    from ollama_ft.init_recipe import write_init_recipe
    write_init_recipe("my-model.toml", base="./models/qwen", data="data/train.jsonl")

The text is validated with the same parser `load_recipe` uses before it is written, and an
existing file is never overwritten. Paths are written relative to the recipe's folder, because
that is how recipes resolve them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import unicodedata
from pathlib import Path

from ollama_ft.chat_templates import detect_family
from ollama_ft.errors import UserInputError
from ollama_ft.recipe import OLLAMA_NAME_RE, TINY_PREFIX, parse_recipe

DEFAULT_BASE = "tiny:llama"
PLACEHOLDER_DATA = "train.jsonl"
LOCAL_PREFIXES = (".", "/", "~")
DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def _toml_string(value: str) -> str:
    # JSON's string escapes are a subset of TOML basic strings' ones.
    return json.dumps(value, ensure_ascii=False)


def _relative(target: Path, folder: Path) -> str:
    """`target` as the recipe writes it: relative to its folder, starting with "." so it reads as local."""
    target, folder = target.resolve(), folder.resolve()
    if os.path.commonpath([target, folder]) == target.anchor:
        return target.as_posix()  # nothing shared but the root: "../../.." would only obscure it
    rel = Path(os.path.relpath(target, folder)).as_posix()
    return rel if rel.startswith(".") else f"./{rel}"


def sanitise_ollama_name(text: str) -> str:
    """A valid Ollama model name made from any text: ASCII, lower-case, other characters become '-'."""
    # Fold accents first, so "Türkçe Asistan" becomes "turkce-asistan", not "t-rk-e-asistan".
    ascii_text = unicodedata.normalize("NFKD", text.replace("ı", "i").replace("İ", "I"))
    ascii_text = ascii_text.encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9_.\-]+", "-", ascii_text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-.")[:80].rstrip("-.")
    return name or "my-model"


def local_chat_template(folder: Path) -> str | None:
    """The Jinja chat template a local model folder ships, if any."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "…"}, …]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def template_setting(base_jinja: str | None) -> str:
    """"auto" when the base's own template can ship as is, else the family it resembles (or "auto",
    which the build then explains)."""
    from ollama_ft.template_match import match_base_template

    if base_jinja and match_base_template(base_jinja) is not None:
        return "auto"
    return detect_family(base_jinja) or "auto"


def gguf_chat_template(path: Path) -> str | None:
    """`tokenizer.chat_template` from a GGUF's metadata, or None."""
    from ollama_ft.gguf_import import read_gguf

    return read_gguf(path).value("tokenizer.chat_template")


def write_init_recipe(path: str | os.PathLike, *, base: str | None = None, data: str | None = None,
                      name: str | None = None) -> Path:
    """Write a commented recipe to `path` (which must not exist yet) and return its path."""
    path = Path(path)
    if path.exists():
        raise UserInputError(f"{path} already exists", "choose another path or delete it")
    folder = path.parent
    base = base or DEFAULT_BASE
    tiny = base.startswith(TINY_PREFIX)

    chat_template = "auto"
    base_folder = Path(os.path.expanduser(base))
    if base.lower().endswith(".gguf") and base_folder.is_file():
        chat_template = template_setting(gguf_chat_template(base_folder))
        base = _relative(base_folder, folder)
    elif not tiny and (base_folder.is_dir() or base.startswith(LOCAL_PREFIXES)):
        chat_template = template_setting(local_chat_template(base_folder))
        base = _relative(base_folder, folder)

    if data is None:
        from ollama_ft.tiny import DEFAULT_CORPUS  # the bundled Turkish chats, so a tiny recipe runs as is

        data_value = _relative(DEFAULT_CORPUS, folder) if DEFAULT_CORPUS.is_file() else PLACEHOLDER_DATA
    else:
        # The recipe loader's rule: a data file suffix or a path prefix means local, else a hub dataset id.
        local = Path(data).exists() or data.startswith(LOCAL_PREFIXES) or Path(data).suffix.lower() in DATA_SUFFIXES
        data_value = _relative(Path(os.path.expanduser(data)), folder) if local else data

    if name is None:
        name = sanitise_ollama_name(path.stem)
    elif not OLLAMA_NAME_RE.match(name):
        raise UserInputError(f"{name!r} is not a valid Ollama model name",
                             f"use letters, digits, '_', '-', '.', e.g. {sanitise_ollama_name(name)!r}")

    text = _render(filename=path.name, base=base, chat_template=chat_template, data=data_value, name=name, tiny=tiny)
    # Validate the text before writing, so a bug here never leaves a broken recipe behind.
    parse_recipe(text, path, check_files=False)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as out:  # "x": fail rather than overwrite, even in a race
            out.write(text)
    except FileExistsError:
        raise UserInputError(f"{path} already exists", "choose another path or delete it") from None
    return path


def _line(key: str, value: str, comment: str) -> str:
    """`key = value   # comment`, comments aligned like the shipped recipes; a "#" key is commented out."""
    setting = f"# {key[1:]} = {value}" if key.startswith("#") else f"{key} = {value}"
    first, *more = comment.split("\n")
    line = f"{setting:<29}# {first}" if len(setting) < 29 else f"{setting}  # {first}"
    return "\n".join([line, *(f"{'':29}# {extra}" for extra in more)])


def _render(*, filename: str, base: str, chat_template: str, data: str, name: str, tiny: bool) -> str:
    q = _toml_string
    # A random tiny base learns nothing from a few LoRA steps: it trains every weight, in float32.
    method, dtype, lr, epochs, batch, seq, ckpt = (("full", "float32", "3e-3", "30", "16", "256", "false") if tiny
                                                   else ("lora", "auto", "2e-4", "3", "4", "1024", "true"))
    sections = {
        "model": [
            ("base", q(base), "hub id, local folder (\"./…\"), a .gguf file, ollama:NAME, or tiny:llama"),
            ("chat_template", q(chat_template), "auto reads the tokenizer's own template; or name a family:\n"
                                                "chatml, llama3, mistral, gemma, alpaca"),
            ("max_seq_length", seq, "longer examples are cut; memory grows with it; also Ollama's num_ctx"),
            ("dtype", q(dtype), "auto: bfloat16 on a capable GPU, float32 on CPU (twice the memory)"),
            ("load_in_4bit", "false", "true (with method = \"qlora\") quarters the base's memory; needs a CUDA GPU"),
            ("trust_remote_code", "false", "runs Python shipped with a hub model: only for models you trust"),
        ],
        "data": [
            ("train", q(data), ".jsonl/.json/.csv/.parquet or a hub dataset id; a list for several"),
            ("format", q("auto"), "messages / alpaca / text, detected from the first record"),
            ("#validation", q("valid.jsonl"), "a held-out file; or use validation_split"),
            ("validation_split", "0.0", "e.g. 0.05 to watch for overfitting, at the cost of 5% of the data"),
            ("#system_prompt", q("…"), "added to records that have none; also the model's SYSTEM"),
            ("on_bad_record", q("error"), "\"skip\" drops bad records and counts them instead of stopping"),
            ("#max_examples", "100", "use only the first N records for a quick trial"),
        ],
        "train": [
            ("method", q(method), "lora: small adapters, little memory; qlora: lora on a 4-bit base;\n"
                                  "dora: a little better, slower; full: every weight, ~16 bytes/parameter"
                                  + ("\n(tiny bases are random: adapters alone learn nothing)" if tiny else "")),
            ("rank", "16", "LoRA capacity, 8–64: higher learns more, costs memory and time"),
            ("alpha", "32", "the update is scaled by alpha/rank; 2 is a common, stable ratio"),
            ("dropout", "0.0", "0.05–0.1 fights overfitting on small data sets"),
            ("target_modules", q("all-linear"),
             "or e.g. [\"q_proj\", \"v_proj\"]: fewer adapters, less memory and capacity"),
            ("epochs", epochs, "passes over the data: more fits the examples closer, and overfits sooner"),
            ("#max_steps", "100", "stop after N optimizer steps instead of epochs"),
            ("learning_rate", lr, "LoRA: ~2e-4; full fine-tuning of a real model: ~1e-5"),
            ("lr_scheduler", q("cosine"), "linear, cosine, constant or constant_with_warmup"),
            ("warmup_ratio", "0.03", "a short warm-up keeps the first steps from wrecking the base"),
            ("weight_decay", "0.0", "a little (0.01) regularises full fine-tuning; adapters rarely need it"),
            ("optimizer", q("adamw_torch"), "adamw_8bit / paged_adamw_8bit save optimizer memory (CUDA only)"),
            ("batch_size", batch, "examples per step: activation memory grows with it"),
            ("gradient_accumulation", "1", "a bigger effective batch without more memory, at more time per update"),
            ("seed", "42", "same seed: same data order, same initial weights"),
            ("packing", "false", "packs short examples together: faster, but examples share a sequence"),
            ("gradient_checkpointing", ckpt, "recompute activations: much less memory, ~30% slower"),
            ("#assistant_only_loss", "true", "default: on for chat data (learn the answers, not the questions)"),
            ("logging_steps", "10", "how often loss is reported"),
            ("save_steps", "200", "checkpoint interval: an interrupted run resumes from the last one"),
            ("report_to", q("none"), "\"tensorboard\" also logs metrics for TensorBoard"),
            ("speedups", q("auto"), "PEFT backend: what measured faster on this device, [] for none, or a list of "
             "ollama_ft/backends/speedups.py's switches"),
        ],
        "export": [
            ("quantization", q("q4_k_m"), "q4_k_m: small, good; q5_k_m / q6_k: closer to F16, bigger; q8_0: ~lossless"),
            ("keep_f16", "true", "keep the F16 GGUF to requantize later without converting again"),
            ("logits_tolerance", "0.05", "how far the F16 GGUF's logits may drift from the merged model's"),
        ],
        "ollama": [
            ("name", q(name), "[namespace/]model[:tag], as `ollama run` takes it"),
            ("#host", q("http://127.0.0.1:11434"), "default: $OLLAMA_HOST, else the local server"),
            ("#system", q("…"), "SYSTEM prompt (default: data.system_prompt)"),
            ("parameters", "{ temperature = 0.7 }", "0 for repeatable answers; num_ctx defaults to max_seq_length"),
        ],
        "eval": [
            ("#suite", q("evals/my-suite.toml"), "questions and checks, run through Ollama after registering"),
            ("baseline", "false", "true also evaluates the untrained base, for a before/after delta"),
            ("concurrency", "2", "parallel requests to Ollama: faster, until the server queues them"),
        ],
    }
    head = [f"# Written by `ollama-ft init`. Build it with:   ollama-ft build {shlex.quote(filename)}",
            "# Paths are relative to this file. Every field is documented in ollama_ft/recipe.py."]
    body = [f"\n[{section}]\n" + "\n".join(_line(*row) for row in rows) for section, rows in sections.items()]
    return "\n".join(head) + "\n" + "\n".join(body) + "\n"
