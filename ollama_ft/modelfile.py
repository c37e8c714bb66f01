"""Stage 5, modelfile: the Ollama Modelfile for the quantized GGUF.

TEMPLATE comes from the chat-template family the model was trained with, and every end-of-turn
marker becomes a `PARAMETER stop`. Text from the recipe (system prompt, parameters, template
override) is quoted so it can never add a directive: anything a Modelfile cannot hold safely is
refused up front by `modelfile_text_problem`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.runs import atomic_write_text

# Ollama's runner options that a Modelfile PARAMETER may set (api/types.go, v0.11).
# Each with the value type Ollama parses it as; a wrong type is refused when Ollama creates the model.
OLLAMA_PARAMETER_TYPES: dict[str, type] = {
    **dict.fromkeys(("num_ctx", "num_batch", "num_gpu", "num_thread", "num_keep", "num_predict", "seed", "top_k",
                     "repeat_last_n", "mirostat"), int),
    **dict.fromkeys(("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "mirostat_tau", "mirostat_eta"), float),
    **dict.fromkeys(("penalize_newline", "use_mmap"), bool),
    "stop": list,
}
OLLAMA_PARAMETERS = set(OLLAMA_PARAMETER_TYPES)


def parameter_type_problem(name: str, value: object) -> str | None:
    """Why `value` is not of the type Ollama expects for PARAMETER `name`, or None."""
    want = OLLAMA_PARAMETER_TYPES.get(name)
    if want is None:
        return None
    if want is list:
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        return None if ok else "must be a string or a list of strings"
    if want is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if want is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"


def modelfile_text_problem(value: str) -> str | None:
    """Why `value` cannot sit inside a Modelfile's triple quotes, or None if it can."""
    if '"""' in value:
        return 'contains """, which would end the Modelfile string early; remove or change it'
    if value.endswith('"'):
        return 'ends with ", which merges with the closing """; add a final space or full stop'
    bad = [c for c in value if (ord(c) < 32 and c not in "\n\t") or ord(c) == 127]
    if bad:
        return f"contains control character {bad[0]!r}; remove it"
    return None


@dataclass
class ModelfileSpec:
    gguf_path: Path
    template: str
    stops: list[str]
    system: str | None = None
    parameters: dict[str, object] = field(default_factory=dict)


def parameter_lines(spec: ModelfileSpec) -> list[tuple[str, object]]:
    """(name, value) pairs in Modelfile order: the recipe's parameters, then each stop token."""
    pairs = [(k, v) for k, v in spec.parameters.items() if k != "stop"]
    stops = list(dict.fromkeys([*spec.stops, *spec.parameters.get("stop", [])]))  # type: ignore[list-item]
    return pairs + [("stop", s) for s in stops]


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    text = str(value)
    return f'"{text}"' if '"' not in text else f'"""{text}"""'


def render_modelfile(spec: ModelfileSpec) -> str:
    lines = [f"FROM {spec.gguf_path.resolve()}", f'TEMPLATE """{spec.template}"""']
    if spec.system:
        lines.append(f'SYSTEM """{spec.system}"""')
    lines += [f"PARAMETER {name} {_value(value)}" for name, value in parameter_lines(spec)]
    return "\n".join(lines) + "\n"


def write_modelfile(spec: ModelfileSpec, path: Path) -> Path:
    atomic_write_text(path, render_modelfile(spec))
    return path
