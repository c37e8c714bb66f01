"""Stage 7, smoke: one short greedy chat through Ollama must stop on its own and say something.

A model that runs to the token budget has lost its stop tokens or template; that is the most
common way a fine-tune breaks in Ollama, so it fails the build here instead of in a user's chat.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_ft.errors import OllamaError, StageError
from ollama_ft.ollama_server import client_for, ollama_call, runner_failure


@dataclass
class SmokeInput:
    name: str
    host: str
    messages: list[dict]
    max_tokens: int = 128
    evidence: str = ""       # the build's checks that passed, shown if the runner dies anyway


@dataclass
class SmokeOutput:
    reply: str
    done_reason: str
    eval_count: int
    tokens_per_second: float
    load_seconds: float


def smoke_test(inp: SmokeInput) -> SmokeOutput:
    client = client_for(inp.host)
    try:
        resp = ollama_call(inp.host, lambda: client.chat(
            model=inp.name, messages=inp.messages,
            options={"temperature": 0, "seed": 0, "num_predict": inp.max_tokens}))
    except OllamaError as exc:
        if " 500: " not in exc.message:
            raise
        # The runner died loading or running the model: say why where the server's log tells it.
        reason = runner_failure(inp.host)
        raise StageError(f"smoke test: Ollama could not run {inp.name}: {exc.message.split(': ', 1)[-1]}"
                         + (f"; server log: {reason}" if reason else ""),
                         (f"the build's checks passed ({inp.evidence}), so " if inp.evidence else "")
                         + "the GGUF holds something this Ollama's runner cannot load; "
                         "see the server's log (OLLAMA_DEBUG=1 ollama serve)") from None
    reply = resp.message.content or ""
    eval_ns = resp.eval_duration or 0
    out = SmokeOutput(reply=reply, done_reason=resp.done_reason or "", eval_count=resp.eval_count or 0,
                      tokens_per_second=(resp.eval_count or 0) / (eval_ns / 1e9) if eval_ns else 0.0,
                      load_seconds=(resp.load_duration or 0) / 1e9)
    if out.done_reason != "stop":
        raise StageError(f"smoke test: {inp.name} did not stop within {inp.max_tokens} tokens "
                         f"(done_reason={out.done_reason!r})",
                         "the chat template or stop tokens do not match training; check model.chat_template")
    if not reply.strip():
        raise StageError(f"smoke test: {inp.name} answered with empty text", "train longer or check the data")
    return out
