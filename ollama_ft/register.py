"""Stage 6, register: put the GGUF in Ollama's blob store and create the model in Ollama.

The model is created with the official `ollama` client (template, system and parameters). An
existing model with the same name is never replaced without `force`; with it, Ollama keeps the
old model until the new manifest is written.

The blob transfer is ours rather than the client's `create_blob`, which hashes the whole file
before sending it and sends it even when the server has it: sha256 runs at ~150 MB/s on a CPU
without SHA extensions, so for an 800 MB GGUF that was half of the stage (benchmarks/serving.py,
B6). The quantize stage has already hashed the file, and a blob the server holds (a rerun with
--force, compare's NAME:variant) is not sent. Otherwise, in order:

1. Local copy. When the server listens on this machine and its blob folder is one we can write
   ($OLLAMA_MODELS/blobs, else ~/.ollama/models/blobs), the GGUF is copied there under its
   digest, the way Ollama names blobs, and the server is asked whether it now has that blob; if
   it does not (the folder belongs to another server), the copy is removed. A copy is one read
   and one write; the upload is a read, an HTTP stream and the server's own sha256 of every byte.
   It is tried only when the file's size and mtime are still those the quantize stage hashed, so
   a file changed since then can never enter the store under a digest it does not have.
2. Upload. The server hashes what it receives and refuses a mismatch.

Set OLLAMA_FT_BLOB_UPLOAD=1 to always upload.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ollama_ft.errors import OllamaError
from ollama_ft.modelfile import ModelfileSpec, parameter_lines
from ollama_ft.ollama_server import client_for, ollama_call, version_tuple
from ollama_ft.runs import file_digest, file_stat


@dataclass
class RegisterInput:
    name: str
    host: str
    spec: ModelfileSpec
    force: bool = False
    expected_digest: str | None = None   # sha256 of the GGUF, known from the quantize stage
    hashed_stat: tuple[int, int] | None = None   # (size, mtime_ns) of the GGUF when it was hashed
    # Called with the blob's digest once the server has it, before the name is created (the
    # prompt-parity gate); what it returns lands in RegisterOutput.gate.
    before_create: Callable[[str], object] | None = None


@dataclass
class RegisterOutput:
    name: str
    host: str
    blob_digest: str
    replaced: bool
    blob_transfer: str   # "present" (the server had it), "copied" (local blob store) or "uploaded"
    gate: object = None


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

# Architectures that older servers cannot run as this converter writes them: the oldest release
# seen to run them, and what the older one does.
ARCHITECTURE_FLOORS = {
    "gemma3": ((0, 24, 0), "Ollama 0.11.4's runner aborts on the gemma3 GGUFs this converter writes "
                           "(GGML_ASSERT on a tensor view); 0.24.0 runs them"),
}


def older_than(version: str, floor: tuple[int, ...]) -> bool:
    """A released version below `floor`; a source build without a version (0.0.0) is given the benefit."""
    parts = version_tuple(version)
    return any(parts) and parts < floor


def check_server_runs(host: str, version: str, architecture: str | None) -> None:
    """Refuse, before training, a server release known to crash on this architecture's export."""
    floor = ARCHITECTURE_FLOORS.get(architecture or "")
    if floor and older_than(version, floor[0]):
        wanted = ".".join(map(str, floor[0]))
        raise OllamaError(f"the Ollama server at {host} is version {version}, which cannot run {architecture} "
                          f"models: {floor[1]}", f"upgrade Ollama to {wanted} or newer "
                          f"(`ollama-ft install-ollama --version {wanted}`), or point --host at such a server")


def check_server_version(host: str) -> str:
    from ollama_ft.ollama_server import server_version

    version = server_version(host)
    if version is None:
        raise OllamaError(f"cannot reach the Ollama server at {host}",
                          "start it with `ollama serve` (or `ollama-ft install-ollama`), or set ollama.host / --host")
    if older_than(version, MIN_OLLAMA):
        raise OllamaError(f"the Ollama server at {host} is version {version}, too old for creating models from "
                          f"GGUF blobs", f"upgrade to {'.'.join(map(str, MIN_OLLAMA))} or newer "
                          "(`ollama-ft install-ollama` builds 0.11.4)")
    return version


def is_loopback(host: str) -> bool:
    name = urlsplit(host if "://" in host else f"http://{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def local_blob_dirs(host: str) -> list[Path]:
    """Blob folders the server at `host` may use, where we could write: none for a remote server."""
    if os.environ.get("OLLAMA_FT_BLOB_UPLOAD") == "1" or not is_loopback(host):
        return []
    models = os.environ.get("OLLAMA_MODELS")
    candidates = [Path(models).expanduser()] if models else [Path.home() / ".ollama" / "models"]
    return [c / "blobs" for c in candidates if (c / "blobs").is_dir() and os.access(c / "blobs", os.W_OK)]


def _has_blob(http, digest: str) -> bool:
    return http.head(f"/api/blobs/{digest}").status_code == 200


def copy_into_store(path: Path, digest: str, blobs: Path, http) -> bool:
    """Copy `path` into the blob folder `blobs` as `digest`; True once the server reports it has it."""
    target = blobs / digest.replace(":", "-")
    if target.exists():
        return False   # there already, yet the server lacks it: not this server's folder
    partial = blobs / f".{target.name}.partial-{os.getpid()}"
    try:
        shutil.copyfile(path, partial)
        os.chmod(partial, 0o644)   # as Ollama leaves its blobs
        os.replace(partial, target)
    except OSError:
        partial.unlink(missing_ok=True)
        return False
    if _has_blob(http, digest):
        return True
    target.unlink(missing_ok=True)
    return False


def push_blob(host: str, path: Path, digest: str, copy_locally: bool = False) -> str:
    """Make the blob `digest` (the contents of `path`) the server's: "present", "copied" or "uploaded".

    `copy_locally` only when `digest` is known to be the file's as it is now: nobody checks a copy.
    """
    import httpx

    with httpx.Client(base_url=host, timeout=httpx.Timeout(30.0, read=None, write=None)) as http:
        if _has_blob(http, digest):   # this also makes the server create its blob folder
            return "present"
        for blobs in local_blob_dirs(host) if copy_locally else []:
            if copy_into_store(path, digest, blobs, http):
                return "copied"
        with open(path, "rb") as body:
            response = http.post(f"/api/blobs/{digest}", content=body)
    if response.status_code >= 400:
        raise OllamaError(f"Ollama at {host} refused the GGUF blob {path.name} ({response.status_code}: "
                          f"{response.text.strip()[:200]})", "the file changed since it was quantized: "
                          "rerun with --from quantize")
    return "uploaded"


def register_model(inp: RegisterInput) -> RegisterOutput:
    check_server_version(inp.host)
    client = client_for(inp.host)
    exists = ollama_call(inp.host, lambda: model_exists(client, inp.name))
    if exists and not inp.force:
        raise OllamaError(f"a model named {inp.name!r} already exists in Ollama at {inp.host}",
                          "pass --force to replace it, or set ollama.name to another name")
    gguf = Path(inp.spec.gguf_path)
    if inp.expected_digest:
        digest = "sha256:" + inp.expected_digest
        unchanged = inp.hashed_stat is not None and file_stat(gguf) == tuple(inp.hashed_stat)
    else:
        digest, unchanged = "sha256:" + file_digest(gguf), True
    transfer = ollama_call(inp.host, lambda: push_blob(inp.host, gguf, digest, copy_locally=unchanged))
    gate = inp.before_create(digest) if inp.before_create else None
    create_model(inp.host, inp.name, inp.spec, digest)
    return RegisterOutput(inp.name, inp.host, digest, replaced=exists, blob_transfer=transfer, gate=gate)


def create_model(host: str, name: str, spec: ModelfileSpec, digest: str) -> None:
    """Create (or replace) `name` from the blob `digest` with the Modelfile's template, system and parameters."""
    params: dict[str, object] = {}
    for key, value in parameter_lines(spec):
        if key == "stop":
            params.setdefault("stop", []).append(value)  # type: ignore[union-attr]
        else:
            params[key] = value
    client = client_for(host)
    ollama_call(host, lambda: client.create(
        model=name, files={Path(spec.gguf_path).name: digest}, template=spec.template,
        system=spec.system or None, parameters=params, stream=False))
