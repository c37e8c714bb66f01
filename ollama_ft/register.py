"""Stage 6, register: upload the GGUF as a blob and create the model in Ollama.

Uploads the GGUF as a blob, then creates the model with the official `ollama` client (template,
system and parameters). An existing model with the same name is never replaced without `force`;
with it, Ollama keeps the old model until the new manifest is written.

The upload is ours rather than the client's `create_blob`, which hashes the whole file before
sending it and sends it even when the server has it: sha256 runs at ~150 MB/s on a CPU without
SHA extensions, so for an 800 MB GGUF that was half of the stage (benchmarks/serving.py, B6).
The quantize stage has already hashed the file, the server hashes what it receives and refuses
a mismatch, and a blob the server holds (a rerun with --force, compare's NAME:variant) is not sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ollama_ft.errors import OllamaError
from ollama_ft.modelfile import ModelfileSpec, parameter_lines
from ollama_ft.ollama_server import client_for, ollama_call
from ollama_ft.runs import file_digest


@dataclass
class RegisterInput:
    name: str
    host: str
    spec: ModelfileSpec
    force: bool = False
    expected_digest: str | None = None   # sha256 of the GGUF, known from the quantize stage


@dataclass
class RegisterOutput:
    name: str
    host: str
    blob_digest: str
    replaced: bool


def model_exists(client, name: str) -> bool:
    import ollama

    try:
        client.show(name)
        return True
    except ollama.ResponseError as exc:
        if exc.status_code == 404:
            return False
        raise


# Creating a model from an uploaded GGUF blob with `files` arrived in Ollama 0.5.5.
MIN_OLLAMA = (0, 5, 5)


def check_server_version(host: str) -> str:
    from ollama_ft.ollama_server import server_version

    version = server_version(host)
    if version is None:
        raise OllamaError(f"cannot reach the Ollama server at {host}",
                          "start it with `ollama serve` (or `ollama-ft install-ollama`), or set ollama.host / --host")
    parts = tuple(int(p) for p in version.split("-")[0].split(".")[:3] if p.isdigit())
    if parts and parts != (0, 0, 0) and parts < MIN_OLLAMA:
        raise OllamaError(f"the Ollama server at {host} is version {version}, too old for creating models from "
                          f"GGUF blobs", f"upgrade to {'.'.join(map(str, MIN_OLLAMA))} or newer "
                          "(`ollama-ft install-ollama` builds 0.11.4)")
    return version


def push_blob(host: str, path: Path, digest: str) -> bool:
    """Send `path` as the blob `digest` unless the server has it; True when it was sent."""
    import httpx

    with httpx.Client(base_url=host, timeout=httpx.Timeout(30.0, read=None, write=None)) as http:
        if http.head(f"/api/blobs/{digest}").status_code == 200:
            return False
        with open(path, "rb") as body:
            response = http.post(f"/api/blobs/{digest}", content=body)
    if response.status_code >= 400:
        raise OllamaError(f"Ollama at {host} refused the GGUF blob {path.name} ({response.status_code}: "
                          f"{response.text.strip()[:200]})", "the file changed since it was quantized: "
                          "rerun with --from quantize")
    return True


def register_model(inp: RegisterInput) -> RegisterOutput:
    check_server_version(inp.host)
    client = client_for(inp.host)
    exists = ollama_call(inp.host, lambda: model_exists(client, inp.name))
    if exists and not inp.force:
        raise OllamaError(f"a model named {inp.name!r} already exists in Ollama at {inp.host}",
                          "pass --force to replace it, or set ollama.name to another name")
    digest = "sha256:" + (inp.expected_digest or file_digest(Path(inp.spec.gguf_path)))
    ollama_call(inp.host, lambda: push_blob(inp.host, Path(inp.spec.gguf_path), digest))
    params: dict[str, object] = {}
    for key, value in parameter_lines(inp.spec):
        if key == "stop":
            params.setdefault("stop", []).append(value)  # type: ignore[union-attr]
        else:
            params[key] = value
    ollama_call(inp.host, lambda: client.create(
        model=inp.name, files={Path(inp.spec.gguf_path).name: digest}, template=inp.spec.template,
        system=inp.spec.system or None, parameters=params, stream=False))
    return RegisterOutput(inp.name, inp.host, digest, replaced=exists)
