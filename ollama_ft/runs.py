"""Run directories, atomic writes, stage records and the run lock.

A run lives in `runs/<recipe>/<variant>/`. Every artifact is written under a temporary name and
renamed into place, so a kill leaves either the old file or the new one, never half of one.
Each stage writes `records/<stage>.json` last: its inputs' fingerprint, its outputs and timings.
The record's existence means the stage completed; a rerun whose fingerprint matches skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ollama_ft.errors import LockedError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or folder); rename it onto `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"stage produced no output at {tmp}")
        if path.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def fingerprint(*parts: Any) -> str:
    """A stable hash of settings and input fingerprints (JSON-serialisable parts)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (Ollama's blob id uses the same digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stat(path: Path) -> tuple[int, int]:
    """What tells that a file changed without reading it: (size, mtime_ns)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in `folder`: an adapter's own size, without the tokenizer saved beside it."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def clean_partials(folder: Path) -> list[Path]:
    """Remove leftovers of killed writes (`.name.partial-PID`, `.name.XXXX.tmp`)."""
    removed = []
    if not folder.exists():
        return removed
    for p in folder.rglob(".*"):
        if ".partial-" in p.name or p.name.endswith(".tmp"):
            _remove(p)
            removed.append(p)
    return removed


@dataclass
class StageRecord:
    stage: str
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    finished_at: float = 0.0


class RunDir:
    """One variant's folder: artifacts, records, metrics and a lock."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def record_path(self, stage: str) -> Path:
        return self.root / "records" / f"{stage}.json"

    def read_record(self, stage: str) -> StageRecord | None:
        p = self.record_path(stage)
        if not p.is_file():
            return None
        try:
            return StageRecord(**json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            return None  # a damaged record counts as "not done"

    def write_record(self, record: StageRecord) -> None:
        record.finished_at = time.time()
        atomic_write_json(self.record_path(record.stage), record.__dict__)

    def drop_records(self, stages: list[str]) -> None:
        for stage in stages:
            self.record_path(stage).unlink(missing_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Refuse a second ollama-ft process in this run directory; name the holder's pid."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder is not None and _alive(holder):
                    raise LockedError(f"{self.root} is in use by another ollama-ft process (pid {holder})",
                                      "wait for it to finish, or stop it first") from None
                lock.unlink(missing_ok=True)  # stale: its holder died (killed) without cleaning up
        else:
            raise LockedError(f"cannot take the lock {lock}", "remove the file if no ollama-ft process is running")
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
