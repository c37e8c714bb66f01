"""The prompt-parity gate, run by the register stage before the model's name is created: the
server must turn conversations into exactly the prompt training rendered.

The Modelfile's Go TEMPLATE and the training Jinja template are two programs that must agree on
every conversation; a mismatch is the most common way a fine-tune breaks in Ollama ("gibberish",
"never stops"). Here the real server renders probe conversations (no system prompt, a system
prompt, several turns) for the model as it will be registered — under a temporary name, with
the same TEMPLATE, SYSTEM and parameters — and each render must equal the training render
character for character. Servers from 0.11.5 render on request (`_debug_render_only`); an older
server is asked through its TRACE log, which ollama-ft can read only for a server it started
itself. Elsewhere the gate says it could not check, and the build goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_ft.errors import StageError
from ollama_ft.modelfile import ModelfileSpec

GATE_PREFIX = "ollama-ft-parity-"


@dataclass
class PromptGateInput:
    host: str
    spec: ModelfileSpec          # what register will create
    digest: str                  # "sha256:…" of the GGUF, already in the server's blob store
    jinja: str                   # the training template
    eos_token: str = ""
    conversations: tuple = ()    # default: template_match.PROBES that end with a question
    prefix: str = ""             # a baked soft prompt's tokens (soft_prompt.SoftTokens.prefix) before it all


@dataclass
class PromptGateOutput:
    method: str                  # "render_only" | "server_log" | "unverified"
    checked: int
    model: str | None            # the temporary model; drop it once the real one exists
    note: str = ""


def expected_prompt(inp: PromptGateInput, messages: list[dict]) -> str:
    """The training render of what the server will see: a Modelfile SYSTEM fills in a missing system turn."""
    from ollama_ft.template_match import render

    if inp.spec.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": inp.spec.system}, *messages]
    return inp.prefix + render(inp.jinja, messages, add_generation_prompt=True, eos_token=inp.eos_token)


def first_difference(a: str, b: str) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, at - 40)
    return f"at character {at}: training {a[lo:at + 40]!r} | Ollama {b[lo:at + 40]!r}"


def check_prompt_parity(inp: PromptGateInput) -> PromptGateOutput:
    from ollama_ft.ollama_server import client_for, logged_prompts, ollama_call, server_features, server_version, \
        started_server_log
    from ollama_ft.prompt_render import render_prompt
    from ollama_ft.register import create_model
    from ollama_ft.template_match import PROBES

    conversations = [list(c) for c in (inp.conversations or [p for p in PROBES if p[-1]["role"] == "user"])]
    version = server_version(inp.host)
    log = started_server_log(inp.host)
    if server_features(version)["render_only"]:
        method = "render_only"
    elif log is not None:
        method = "server_log"
    else:
        return PromptGateOutput("unverified", 0, None, f"Ollama {version} cannot render a prompt on request and its "
                                "log is not ollama-ft's to read; upgrade to 0.11.5 or newer to have it checked")
    import jinja2

    expected = []
    for messages in conversations:
        try:
            expected.append((messages, expected_prompt(inp, messages)))
        except jinja2.exceptions.TemplateError:
            continue   # a template that refuses this shape (e.g. Mistral's, a system turn) never trains on it
    name = GATE_PREFIX + inp.digest.removeprefix("sha256:")[:12]
    create_model(inp.host, name, inp.spec, inp.digest)
    client = client_for(inp.host)
    try:
        for messages, want in expected:
            if method == "render_only":
                got = render_prompt(inp.host, name, messages)
            else:
                ollama_call(inp.host, lambda: client.chat(model=name, messages=messages,
                                                          options={"num_predict": 1, "temperature": 0}))
                got = (logged_prompts(log) or [None])[-1]
            if got != want:
                raise StageError(f"prompt parity: Ollama renders a conversation differently from training "
                                 f"({len(messages)} messages, {first_difference(want, got or '')}); "
                                 f"training: {want!r}; Ollama: {got!r}",
                                 "nothing was registered; the Modelfile TEMPLATE (ollama.template, or the chat "
                                 "template family) must render what training rendered")
    except BaseException:
        drop_gate_model(inp.host, name)
        raise
    return PromptGateOutput(method, len(expected), name)


def drop_gate_model(host: str, name: str | None) -> None:
    """Delete the temporary model (its blob stays while the registered model uses it)."""
    if not name:
        return
    import ollama

    from ollama_ft.ollama_server import client_for

    try:
        client_for(host).delete(name)
    except (ollama.ResponseError, ConnectionError, OSError):
        pass   # already gone, or the server went away: nothing is left to undo
