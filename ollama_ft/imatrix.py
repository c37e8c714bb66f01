"""Stage 4a, imatrix: an importance matrix from the recipe's own examples, for the quantizer.

llama.cpp's quantizer keeps more precision where a weight's inputs are large; the importance
matrix says where that is, measured by running the F16 model over calibration text. Generic
matrices are computed on English web text. Here the text is the recipe's training examples
rendered with the training template, so the calibration is in the language, the format and the
special tokens the model will serve (`--parse-special`: `<start_of_turn>` is one token, as in
training and in Ollama).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.errors import StageError
from ollama_ft.llama_tools import run_tool
from ollama_ft.runs import atomic_output

MAX_CONTEXT = 512    # llama-imatrix's default chunk; shorter calibration sets get shorter chunks
MIN_CONTEXT = 32


@dataclass(frozen=True)
class ImatrixInput:
    f16_path: Path
    texts: list[str]          # calibration: rendered examples, in order
    out_file: Path            # imatrix.gguf
    log_path: Path
    threads: int = 0          # 0: the tool's default


@dataclass(frozen=True)
class ImatrixOutput:
    path: Path
    dataset: str              # what the matrix was computed on, as the GGUF records it
    context: int
    chunks: int
    tokens: int
    sha256: str


def count_tokens(gguf_path: Path, text: str) -> int:
    """Tokens in `text` by the GGUF's own tokenizer, special tokens parsed (vocabulary only, no weights)."""
    import llama_cpp

    from ollama_ft.quantize import stderr_to

    with stderr_to(Path("/dev/null")):
        model = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return len(model.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    finally:
        model.close()


def context_for(tokens: int, what: str = "the calibration text (the training examples)",
                hint: str = "add examples, or set export.imatrix = 'none'") -> int:
    """The largest power-of-two chunk (at most MAX_CONTEXT) of which the text holds two, as the tools require."""
    context = MAX_CONTEXT
    while context > MIN_CONTEXT and tokens < 2 * context:
        context //= 2
    if tokens < 2 * context:
        raise StageError(f"{what} is {tokens} tokens, fewer than the {2 * MIN_CONTEXT} llama.cpp needs", hint)
    return context


def compute_imatrix(inp: ImatrixInput) -> ImatrixOutput:
    text = "\n".join(inp.texts)
    calibration = inp.out_file.with_name(f"{inp.out_file.stem}-calibration.txt")
    calibration.write_text(text, encoding="utf-8")
    tokens = count_tokens(inp.f16_path, text)
    context = context_for(tokens)
    with atomic_output(inp.out_file) as tmp:
        args = ["-m", str(inp.f16_path), "-f", str(calibration), "-o", str(tmp), "-c", str(context),
                "--parse-special", "--output-format", "gguf"]
        if inp.threads:
            args += ["-t", str(inp.threads)]
        run_tool("llama-imatrix", args, inp.log_path)
        if not tmp.exists():
            raise StageError("llama-imatrix finished without writing its matrix", f"see {inp.log_path}")
    return ImatrixOutput(inp.out_file, calibration.name, context, tokens // context, tokens,
                         hashlib.sha256(inp.out_file.read_bytes()).hexdigest())
