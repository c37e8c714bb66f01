"""Stage 4, quantize: F16 GGUF → Q4_K_M (or another llama.cpp type).

Without an importance matrix this goes through llama-cpp-python's binding, which needs no
other program; with one, through llama.cpp's `llama-quantize` (llama_tools.py), which also
records the matrix in the GGUF's metadata (`quantize.imatrix.*`). The output's type is read back
from its own GGUF metadata (`general.file_type`), not assumed. llama.cpp prints a line or more
per tensor; that goes to the stage's log file, not the terminal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.errors import MissingDependencyError, StageError
from ollama_ft.recipe import NEEDS_IMATRIX
from ollama_ft.runs import atomic_output


@dataclass
class QuantizeInput:
    f16_path: Path
    out_file: Path
    quant_type: str          # "q4_k_m", "q8_0", "f16", …
    threads: int = 0         # 0: llama.cpp picks
    log_path: Path | None = None   # llama.cpp's output; None: the terminal
    imatrix: Path | None = None    # an importance matrix (imatrix.py) to quantize with


@dataclass
class QuantizeOutput:
    gguf_path: Path
    size_bytes: int
    file_type: int
    file_type_name: str
    tensor_types: dict[str, int] = field(default_factory=dict)


def ftype_for(quant_type: str) -> int:
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if quant_type == "f32" else f"LLAMA_FTYPE_MOSTLY_{quant_type.upper()}"
    value = getattr(llama_cpp, name, None)
    if value is None:
        raise StageError(f"export.quantization = {quant_type!r} is not offered by this llama.cpp build")
    return int(value)


def read_gguf_types(path: Path) -> tuple[int, dict[str, int]]:
    """(general.file_type, count of tensors per ggml type) from a GGUF file's own metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field_ = reader.fields["general.file_type"]
    file_type = int(field_.parts[field_.data[0]][0])
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return file_type, dict(sorted(counts.items()))


@contextlib.contextmanager
def stderr_to(log_path: Path | None):
    """Send what C code writes to file descriptor 2 into `log_path` for the block (None: leave it)."""
    if log_path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize_gguf(inp: QuantizeInput) -> QuantizeOutput:
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("quantizing needs llama-cpp-python", "pip install llama-cpp-python") from None

    want = ftype_for(inp.quant_type)
    with atomic_output(inp.out_file) as tmp:
        if inp.quant_type == "f16":
            shutil.copyfile(inp.f16_path, tmp)  # already that type
        elif inp.imatrix is not None:
            from ollama_ft.llama_tools import run_tool

            run_tool("llama-quantize", ["--imatrix", str(inp.imatrix), str(inp.f16_path), str(tmp),
                                        inp.quant_type.upper(), *([str(inp.threads)] if inp.threads else [])],
                     inp.log_path or Path("/dev/null"))
        else:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = want
            params.nthread = inp.threads
            with stderr_to(inp.log_path):
                code = llama_cpp.llama_model_quantize(str(inp.f16_path).encode(), str(tmp).encode(), params)
            if code != 0 or not tmp.exists():
                hint = ("this type needs an importance matrix: set export.imatrix = 'auto'"
                        if inp.quant_type in NEEDS_IMATRIX else
                        f"see llama.cpp's message in {inp.log_path or 'the output above'}")
                raise StageError(f"llama.cpp could not quantize to {inp.quant_type} (code {code})", hint)
        file_type, tensor_types = read_gguf_types(tmp)
    if file_type != want:
        raise StageError(f"quantized file reports file_type {file_type}, expected {want} ({inp.quant_type})")
    return QuantizeOutput(inp.out_file, inp.out_file.stat().st_size, file_type, inp.quant_type, tensor_types)
