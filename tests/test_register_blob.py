"""The register stage's blob upload against the real Ollama server: a known digest is not
recomputed, a blob the server holds is not sent again, and a digest that does not match the
file is refused by the server with a one-line error."""

import hashlib

import pytest

from ollama_ft.errors import OllamaError
from ollama_ft.register import push_blob


def test_push_blob_sends_once_and_the_server_checks_the_digest(ollama_server, tmp_path):
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"GGUF" + hashlib.sha256(str(tmp_path).encode()).digest() * 4096)
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert push_blob(ollama_server.host, blob, digest) is True
    assert push_blob(ollama_server.host, blob, digest) is False     # already there: nothing sent

    wrong = "sha256:" + "0" * 64
    with pytest.raises(OllamaError, match=r"refused the GGUF blob model\.gguf \(400"):
        push_blob(ollama_server.host, blob, wrong)
