"""Chat-template families: the Jinja template a model trains with and the Go template Ollama runs.

The families live in `modelfiles/<family>.toml` (one file each, readable on their own; installed as
`ollama_ft.resources.modelfiles`). A model trained with one family's Jinja template gets the same
family's Go TEMPLATE and stop tokens in its Modelfile, which is what keeps a fine-tune from "never
stopping" once it is in Ollama.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache

from ollama_ft.errors import UserInputError
from ollama_ft.resources import bundled

FAMILIES = ("chatml", "llama31", "llama3", "mistral", "gemma", "phi3", "alpaca")


@dataclass(frozen=True)
class ChatFamily:
    name: str
    jinja: str          # for the tokenizer (`tokenizer.chat_template`)
    go_template: str    # for Ollama's TEMPLATE
    stop: tuple[str, ...]
    marker: str         # a string that identifies this family inside someone else's template


@cache
def load_family(name: str) -> ChatFamily:
    if name not in FAMILIES:
        raise UserInputError(f"unknown chat template {name!r}", f"choose one of: {', '.join(FAMILIES)}")
    data = tomllib.loads(bundled("modelfiles", f"{name}.toml").read_text(encoding="utf-8"))
    return ChatFamily(name=data["family"], jinja=data["jinja"], go_template=data["template"],
                      stop=tuple(data["stop"]), marker=data["marker"])


def detect_family(jinja_template: str | None) -> str | None:
    """Which known family a tokenizer's own template belongs to, or None."""
    if not jinja_template:
        return None
    for name in FAMILIES:
        if load_family(name).marker in jinja_template:
            return name
    return None


def resolve_family(requested: str, tokenizer_template: str | None, base: str) -> ChatFamily:
    """The family a run trains and ships with: named in the recipe, or detected from the tokenizer."""
    if requested != "auto":
        return load_family(requested)
    found = detect_family(tokenizer_template)
    if found is None:
        raise UserInputError(
            f"model.chat_template = 'auto': the tokenizer of {base!r} has "
            + ("no chat template" if not tokenizer_template else "a chat template of no known family"),
            f"set model.chat_template to one of: {', '.join(FAMILIES)}")
    return load_family(found)


def render_jinja(family: ChatFamily, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Render messages with the family's Jinja template, as the tokenizer would (no BOS)."""
    import jinja2  # transformers' own dependency; imported here to keep the CLI light

    env = jinja2.Environment(keep_trailing_newline=True)
    return env.from_string(family.jinja).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token="", eos_token="")
