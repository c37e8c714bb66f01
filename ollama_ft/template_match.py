"""The chat template a run trains with and the Go TEMPLATE Ollama runs, proven to render alike.

A base that has its own chat template trains with it, default system prompt and all. Ollama runs
Go templates, so the Modelfile needs one that renders every conversation into the same prompt.
ollama-ft knows a few families' Go templates (modelfiles/*.toml), each with a Jinja twin that
renders exactly what the Go template renders (tests/test_templates.py checks each pair through the
real server). A family may also carry the base's default system prompt, rendered when a
conversation has none. The base's template is rendered on probe conversations (no system, a
system prompt, several turns; ending in a question and in an answer), and so is each candidate's
twin; the first candidate that agrees on every probe the base accepts ships. When none agrees the
build stops before training and names `model.chat_template`, which picks a family instead.

    chosen = choose_template(recipe.model.chat_template, base_jinja, recipe.model.base, eos_token="<|im_end|>")
    chosen.jinja        # what training renders
    chosen.go_template  # the Modelfile's TEMPLATE
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ollama_ft.chat_templates import FAMILIES, ChatFamily, load_family
from ollama_ft.errors import UserInputError

SYSTEM = "Sen yardımsever bir asistansın."
PROBES: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": "Merhaba! Türkiye'nin başkenti neresi?"},),
    ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "Merhaba!"}),
    ({"role": "user", "content": "Merhaba!"}, {"role": "assistant", "content": "Merhaba, nasıl yardımcı olabilirim?"}),
    ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "Bir şehir söyle."},
     {"role": "assistant", "content": "Ankara."}, {"role": "user", "content": "Bir tane daha."}),
    ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "İki artı iki kaçtır?"},
     {"role": "assistant", "content": "Dört."}),
)
DEFAULT_SYSTEM_BLOCK = {
    "chatml": "<|im_start|>system\n{system}<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    "phi3": "<|system|>\n{system}<|end|>\n",
}


@dataclass(frozen=True)
class ChatTemplate:
    """What a run trains with and ships."""
    name: str                  # "chatml", or e.g. "chatml (the base's own, with its default system prompt)"
    jinja: str                 # rendered by training: the base's own template, or the family's
    go_template: str           # the Modelfile's TEMPLATE
    stop: tuple[str, ...]
    family: str
    default_system: str | None = None
    source: str = "recipe"     # "base": the base's own template; "recipe": a family the recipe named
    eos_token: str = ""        # what the template's `eos_token` renders as


@cache
def _environment():
    """Jinja set up as transformers sets it up for chat templates, so renders agree with training's."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        import json

        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    # A fixed date: a template that prints today's date would change the prompt from day to day.
    env.globals["strftime_now"] = lambda fmt: "26 Jul 2024"
    return env


def render(jinja: str, messages: list[dict] | tuple[dict, ...], *, add_generation_prompt: bool,
           eos_token: str = "") -> str:
    """`jinja` rendered as training renders it. BOS is left to the tokenizer (the GGUF's add_bos), so
    `bos_token` renders empty in both worlds."""
    return _environment().from_string(jinja).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                     bos_token="", eos_token=eos_token)


def go_template_with_default_system(family: ChatFamily, system: str) -> str:
    """The family's Go template, rendering `system` first when a conversation has no system message."""
    block = DEFAULT_SYSTEM_BLOCK[family.name].format(system=system)
    return ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + block + "{{ end }}"
            + family.go_template)


def candidate_render(family: ChatFamily, system: str | None, messages, add_generation_prompt: bool,
                     eos_token: str) -> str:
    """What the candidate's Go template renders, computed through its Jinja twin."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return render(family.jinja, messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token)


def base_renders(jinja: str, eos_token: str) -> list[tuple[tuple[dict, ...], bool, str]]:
    """(probe, add_generation_prompt, render) for every probe the base's template accepts."""
    import jinja2

    out = []
    for probe in PROBES:
        generation = probe[-1]["role"] == "user"
        try:
            out.append((probe, generation, render(jinja, probe, add_generation_prompt=generation, eos_token=eos_token)))
        except jinja2.exceptions.TemplateError:
            continue   # e.g. a template that refuses system messages: the data must not have them
    return out


def default_system_of(renders, family: ChatFamily) -> str | None:
    """The system prompt the base renders for a conversation without one, if it renders one."""
    if family.name not in DEFAULT_SYSTEM_BLOCK:
        return None
    head, _, tail = DEFAULT_SYSTEM_BLOCK[family.name].partition("{system}")
    for probe, _, text in renders:
        if probe[0]["role"] != "system" and text.startswith(head) and tail in text[len(head):]:
            return text[len(head):].split(tail, 1)[0]
    return None


def match_base_template(jinja: str, eos_token: str = "") -> ChatTemplate | None:
    """The first family (with the base's default system prompt where it has one) whose renders
    equal the base template's on every probe it accepts; None when none does."""
    renders = base_renders(jinja, eos_token)
    if not renders:
        return None
    for name in FAMILIES:
        family = load_family(name)
        for system in dict.fromkeys([None, default_system_of(renders, family)]):
            if all(candidate_render(family, system, list(probe), generation, eos_token) == text
                   for probe, generation, text in renders):
                if system is not None and ("{{" in system or "}}" in system):
                    continue   # cannot sit inside a Go template as text
                go = go_template_with_default_system(family, system) if system is not None else family.go_template
                label = f"{name} (the base's own template" + (", with its default system prompt)" if system else ")")
                return ChatTemplate(label, jinja, go, family.stop, name, system, source="base", eos_token=eos_token)
    return None


def choose_template(requested: str, base_jinja: str | None, base: str, eos_token: str = "") -> ChatTemplate:
    """The template a run trains and ships with.

    A family named in the recipe wins. Otherwise ("auto") the base's own template, matched to a Go
    template; a base without one needs the recipe to name a family."""
    if requested != "auto":
        family = load_family(requested)
        return ChatTemplate(family.name, family.jinja, family.go_template, family.stop, family.name,
                            eos_token=eos_token)
    if not base_jinja:
        raise UserInputError(f"model.chat_template = 'auto': the tokenizer of {base!r} has no chat template",
                             f"set model.chat_template to one of: {', '.join(FAMILIES)}")
    matched = match_base_template(base_jinja, eos_token)
    if matched is None:
        raise UserInputError(f"model.chat_template = 'auto': no Go template ollama-ft knows renders {base!r}'s own "
                             "chat template the same way (its renders of the probe conversations differ from "
                             f"every family's: {', '.join(FAMILIES)})",
                             "set model.chat_template to the family closest to it; the model then trains and "
                             "ships with that family's template")
    return matched


def check_examples_render(template: ChatTemplate, examples: list[dict], sources: list[str]) -> None:
    """Every chat example renders with the training template; the first one it refuses is named.

    Some templates refuse shapes the data may have (Mistral's: a system turn): better said now
    than in the middle of training."""
    import jinja2

    for example, source in zip(examples, sources):
        if not example.get("messages"):
            continue
        try:
            render(template.jinja, example["messages"], add_generation_prompt=False, eos_token=template.eos_token)
        except jinja2.exceptions.TemplateError as exc:
            raise UserInputError(f"{source}: the chat template ({template.name}) refuses this conversation: {exc}",
                                 "change the record (e.g. fold the system prompt into the first user turn), or "
                                 "set model.chat_template to a family that takes it") from None
