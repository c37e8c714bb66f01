"""The base a recipe names, resolved to a folder the trainers load, before any training starts.

`model.base` may be:

- `tiny:llama` / `tiny:llama-1b`: a built-in tiny base, built once under `RUNS/_bases`;
- a local Hugging Face folder (`./models/qwen`);
- a local GGUF file (`./SmolLM2-135M-Instruct.Q4_1.gguf`): imported once into `RUNS/_bases`
  as a faithful Hugging Face folder (ollama_ft/gguf_import.py), and its fine-tune exported with
  the source's tokenizer metadata;
- `ollama:NAME[:TAG]`: the GGUF that the local Ollama server stores for that model, imported the
  same way (a remote server's store cannot be read, so that is an error);
- anything else: a hub id, loaded by transformers.

    base = resolve_base(recipe, Path("runs"), host)
    base.path            # what AutoModelForCausalLM.from_pretrained loads
    base.source_gguf     # the GGUF it came from, or None
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.errors import UserInputError
from ollama_ft.recipe import TINY_PREFIX, Recipe

OLLAMA_PREFIX = "ollama:"
LOCAL_PREFIXES = (".", "/", "~")


@dataclass(frozen=True)
class ResolvedBase:
    spec: str                   # model.base as the recipe writes it
    kind: str                   # tiny | folder | gguf | ollama | hub
    path: str                   # folder (or hub id) that transformers loads
    fingerprint: str            # changes when the base's weights change
    source_gguf: Path | None = None


def base_kind(base: str) -> str:
    if base.startswith(TINY_PREFIX):
        return "tiny"
    if base.startswith(OLLAMA_PREFIX):
        return "ollama"
    if base.lower().endswith(".gguf"):
        return "gguf"
    if base.startswith(LOCAL_PREFIXES):
        return "folder"
    return "hub"


def ollama_models_dir() -> Path:
    """The local server's model store, as Ollama itself finds it."""
    models = os.environ.get("OLLAMA_MODELS")
    return Path(models).expanduser() if models else Path.home() / ".ollama" / "models"


def base_problems(recipe: Recipe, host: str) -> list[str]:
    """What is wrong with an `ollama:` base, found without loading anything; [] when it can be used.

    (Files and folders are checked with the rest of the recipe, in recipe.check_recipe_files.)"""
    base = recipe.model.base
    if base_kind(base) != "ollama":
        return []
    from ollama_ft.register import is_loopback

    if not base[len(OLLAMA_PREFIX):]:
        return [f"model.base = {base!r}: name the model, e.g. 'ollama:qwen2.5:0.5b'"]
    if not is_loopback(host):
        return [f"model.base = {base!r}: an ollama: base is read from the local server's model store, and "
                f"the server is {host}; copy the model's GGUF here and set model.base to its path"]
    from ollama_ft.gguf_import import ollama_model_gguf

    try:
        ollama_model_gguf(base[len(OLLAMA_PREFIX):], ollama_models_dir())
    except UserInputError as exc:
        return [f"model.base = {base!r}: {exc.one_line()}"]
    return []


def base_architecture(recipe: Recipe) -> str | None:
    """The base's architecture as llama.cpp names it (llama, gemma3, qwen2, …), read from its GGUF
    header or config.json without loading weights; None where it cannot be known before loading
    (a hub id, or a file the other checks already report as unreadable)."""
    import json

    base = recipe.model.base
    kind = base_kind(base)
    try:
        if kind == "tiny":
            return "llama"
        if kind in ("gguf", "ollama"):
            from ollama_ft.gguf_import import ollama_model_gguf, read_gguf

            path = recipe.resolve(base) if kind == "gguf" else \
                ollama_model_gguf(base[len(OLLAMA_PREFIX):], ollama_models_dir())
            return read_gguf(path).value("general.architecture")
        if kind == "folder":
            model_type = json.loads((recipe.resolve(base) / "config.json").read_text(encoding="utf-8"))["model_type"]
            return {"gemma3_text": "gemma3"}.get(model_type, model_type)
    except (OSError, ValueError, KeyError, UserInputError):
        return None
    return None


def resolve_base(recipe: Recipe, runs_root: Path, host: str) -> ResolvedBase:
    """The base as a loadable folder: built (tiny) or imported (GGUF, ollama:) when needed."""
    base = recipe.model.base
    kind = base_kind(base)
    cache = Path(runs_root) / "_bases"
    if kind == "tiny":
        from ollama_ft.tiny import DEFAULT_CORPUS, base_key, ensure_tiny_base

        path = ensure_tiny_base(base, cache)
        return ResolvedBase(base, kind, str(path), f"{base}:{base_key(base.split(':', 1)[1], 0, DEFAULT_CORPUS)}")
    if kind == "folder":
        path = recipe.resolve(base)
        return ResolvedBase(base, kind, str(path), f"local:{path}:{(path / 'config.json').stat().st_mtime_ns}")
    if kind == "hub":
        return ResolvedBase(base, kind, base, f"hub:{base}")

    problems = base_problems(recipe, host)
    if problems:
        raise UserInputError("; ".join(problems))
    from ollama_ft.gguf_import import import_gguf, ollama_model_gguf

    if kind == "ollama":
        gguf = ollama_model_gguf(base[len(OLLAMA_PREFIX):], ollama_models_dir())
        key = gguf.name.removeprefix("sha256-")[:16]           # blobs are named by their digest
    else:
        gguf = recipe.resolve(base).resolve()
        stat = gguf.stat()
        key = f"{gguf.stem[:40]}-{stat.st_size:x}-{stat.st_mtime_ns:x}"
    imported = import_gguf(gguf, cache / f"gguf-{key}")
    return ResolvedBase(base, kind, str(imported.hf_path), f"gguf:{key}", source_gguf=gguf)
