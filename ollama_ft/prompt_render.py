"""Ask an Ollama server how it renders a conversation for a registered model, without running it.

    from ollama_ft.prompt_render import render_prompt
    text = render_prompt("http://127.0.0.1:11434", "tiny-tr", [{"role": "user", "content": "Merhaba"}])
    # the exact prompt the server would send its runner, or None on a server older than 0.11.5

Since 0.11.5 `/api/chat` takes `"_debug_render_only": true` and answers, instead of generating,
`{"model": …, "_debug_info": {"rendered_template": PROMPT, "image_count": N}}` (server/routes.go,
api.DebugInfo). The server still loads the model (its scheduler runs before rendering, and
truncation to num_ctx tokenizes), but samples nothing. This is the prompt-parity check for servers
whose TRACE log ollama-ft cannot read; 0.11.4 ignores the field, so it is not asked at all.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from ollama_ft.errors import OllamaError
from ollama_ft.ollama_server import server_features, server_version

RENDER_ONLY_SINCE = "0.11.5"


def render_prompt(host: str, model: str, messages: list[dict], *, timeout: float = 300.0) -> str | None:
    """The prompt `model` on the server at `host` gets for `messages` (with the generation prompt
    the template adds after the last user turn); None when the server predates render-only."""
    version = server_version(host)
    if version is None:
        raise OllamaError(f"cannot reach the Ollama server at {host}", "start it with `ollama serve` or check --host")
    if not server_features(version)["render_only"]:
        return None
    # num_predict 1: a build that reports a wrong version and ignores the field samples one token, not a reply.
    body = {"model": model, "messages": messages, "stream": False, "_debug_render_only": True,
            "options": {"num_predict": 1}}
    request = urllib.request.Request(f"{host}/api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise OllamaError(f"Ollama {version} at {host} could not render a prompt for {model!r} "
                          f"({exc.code}: {detail})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise OllamaError(f"no render from the Ollama server at {host}: {exc}") from None
    info = answer.get("_debug_info")
    if not isinstance(info, dict) or "rendered_template" not in info:
        return None   # a server that reports a render-capable version yet ignores the field
    return info["rendered_template"]
