"""The register stage's blob transfer against the real Ollama server: a known digest is not
recomputed, a blob the server holds is not sent again, a digest that does not match the file is
refused by the server with a one-line error, and on this machine the GGUF is copied into the
server's own blob store, but only when it is the server's store and the file is as it was hashed."""

import hashlib
import shutil
from pathlib import Path

import pytest

from ollama_ft.chat_templates import load_family
from ollama_ft.errors import OllamaError
from ollama_ft.modelfile import ModelfileSpec
from ollama_ft.quantize import QuantizeInput, quantize_gguf
from ollama_ft.register import RegisterInput, is_loopback, local_blob_dirs, push_blob, register_model
from ollama_ft.runs import file_digest, file_stat

pytestmark = pytest.mark.every_ollama


def blob_file(tmp_path: Path) -> tuple[Path, str]:
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"GGUF" + hashlib.sha256(str(tmp_path).encode()).digest() * 4096)
    return blob, "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()


def store_path(models_dir: Path, digest: str) -> Path:
    return Path(models_dir) / "blobs" / digest.replace(":", "-")


def test_upload_sends_once_and_the_server_checks_the_digest(ollama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_FT_BLOB_UPLOAD", "1")
    blob, digest = blob_file(tmp_path)
    assert push_blob(ollama_server.host, blob, digest, copy_locally=True) == "uploaded"
    assert push_blob(ollama_server.host, blob, digest, copy_locally=True) == "present"   # nothing sent
    assert store_path(ollama_server.models_dir, digest).read_bytes() == blob.read_bytes()

    wrong = "sha256:" + "0" * 64
    with pytest.raises(OllamaError, match=r"refused the GGUF blob model\.gguf \(400"):
        push_blob(ollama_server.host, blob, wrong)
    assert not store_path(ollama_server.models_dir, wrong).exists()


def test_local_copy_lands_in_the_servers_store(ollama_server, tmp_path):
    blob, digest = blob_file(tmp_path)
    assert local_blob_dirs(ollama_server.host) == [Path(ollama_server.models_dir) / "blobs"]
    assert push_blob(ollama_server.host, blob, digest, copy_locally=True) == "copied"
    stored = store_path(ollama_server.models_dir, digest)
    assert stored.read_bytes() == blob.read_bytes() and (stored.stat().st_mode & 0o777) == 0o644
    assert not list(stored.parent.glob(".*partial*"))


def test_a_folder_that_is_not_the_servers_store_is_left_as_it_was(ollama_server, tmp_path, monkeypatch):
    other = tmp_path / "other-models"
    (other / "blobs").mkdir(parents=True)
    monkeypatch.setenv("OLLAMA_MODELS", str(other))
    blob, digest = blob_file(tmp_path)
    assert push_blob(ollama_server.host, blob, digest, copy_locally=True) == "uploaded"
    assert list((other / "blobs").iterdir()) == []
    assert store_path(ollama_server.models_dir, digest).exists()


def test_only_a_server_on_this_machine_gets_a_local_copy(monkeypatch, tmp_path):
    (tmp_path / "blobs").mkdir()
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    assert local_blob_dirs("http://127.0.0.1:11434") == [tmp_path / "blobs"]
    assert local_blob_dirs("localhost:11434") == [tmp_path / "blobs"]
    assert local_blob_dirs("http://[::1]:11434") == [tmp_path / "blobs"]
    assert local_blob_dirs("http://10.0.0.7:11434") == [] and not is_loopback("http://gpu-box:11434")
    monkeypatch.setenv("OLLAMA_FT_BLOB_UPLOAD", "1")
    assert local_blob_dirs("http://127.0.0.1:11434") == []


def fresh_gguf(demo_build, folder: Path, quant_type: str) -> Path:
    """A GGUF the server has not seen: the demo build's F16 quantized to a type no other test uses."""
    f16 = Path(demo_build["run_dir"]) / "model-f16.gguf"
    return quantize_gguf(QuantizeInput(f16, folder / f"model-{quant_type}.gguf", quant_type)).gguf_path


def spec_for(gguf: Path) -> ModelfileSpec:
    chatml = load_family("chatml")
    return ModelfileSpec(gguf_path=gguf, template=chatml.go_template, stops=list(chatml.stop),
                         parameters={"num_ctx": 256})


@pytest.mark.e2e
def test_register_copies_a_gguf_as_it_was_hashed_and_the_model_runs(ollama_server, demo_build, tmp_path):
    fresh = fresh_gguf(demo_build, tmp_path, "q8_0")
    stat, digest = file_stat(fresh), file_digest(fresh)
    out = register_model(RegisterInput("blob-copied", ollama_server.host, spec_for(fresh),
                                       expected_digest=digest, hashed_stat=stat))
    assert out.blob_transfer == "copied" and out.blob_digest == "sha256:" + digest
    assert store_path(ollama_server.models_dir, out.blob_digest).exists()
    reply = ollama_server.client.generate(model="blob-copied", prompt="Merhaba", options={"num_predict": 2})
    assert reply.eval_count and reply.eval_count > 0


@pytest.mark.e2e
def test_a_gguf_changed_since_it_was_hashed_is_uploaded_and_refused(ollama_server, demo_build, tmp_path):
    fresh = fresh_gguf(demo_build, tmp_path, "q5_k_m")
    stat, digest = file_stat(fresh), file_digest(fresh)
    changed = tmp_path / "changed.gguf"
    shutil.copyfile(fresh, changed)
    with open(changed, "ab") as fh:
        fh.write(b"\0" * 32)
    spec = spec_for(changed)
    with pytest.raises(OllamaError, match="refused the GGUF blob changed.gguf"):
        register_model(RegisterInput("blob-changed", ollama_server.host, spec, expected_digest=digest,
                                     hashed_stat=stat))
    assert not store_path(ollama_server.models_dir, "sha256:" + digest).exists()
