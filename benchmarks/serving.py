"""B6: registering in Ollama ÷ plain disk I/O, and `ollama-ft --help` wall time;
B7: Ollama's generation tokens/s ÷ llama-cpp-python's on the same GGUF.

    python -m benchmarks.serving [--gguf MODEL.gguf] [--out DIR]

Without `--gguf` it uses the Q4_K_M of the tiny base (built as in B5). A private `ollama serve`
(OllamaServer, the pinned binary) with an empty models folder is started, so the blob is new.
- B6: `register_model` under a fresh name, as the build calls it (the GGUF's sha256 and stat
  known from the quantize stage), ÷ (two reads + one fsynced write of the GGUF), measured in the
  same run, both ways it can move the blob: uploaded (the upload reads the file, the server
  hashes and writes it; `upload_ratio`), then, the first model and so its blob deleted, copied
  into the server's blob folder, as it does for a server on this machine (`ratio`). The sha256
  the quantize stage pays is timed apart (`digest_seconds`); sha256 runs at ~150 MB/s on a CPU
  without SHA extensions.
  `ollama-ft --help`: the console script in a subprocess, median of 5.
- B7: the same raw prompt, greedy, `num_predict` 128 and 2 threads on both sides. Ollama's figure
  is eval_count ÷ eval_duration; llama-cpp-python is timed over exactly as many decode steps
  (argmax of the logits, then one `eval`), the prompt evaluated beforehand and not timed. Both
  apply a repeat penalty (1.2 over the last 64 tokens; 1.1, Ollama's default, until session 5):
  without one the random tiny model repeats one token 30 times and Ollama aborts the request, with
  no timings.
  Median of up to 3 runs each, after a short warm-up that loads the model. Ollama's runs stop
  once they have taken 60 s, and a request is given up after 150 s: on a busy 2-core machine its
  2-thread runner fell to 1.5 tokens/s (benchmarks/README.md). A request given up bounds
  Ollama's rate from above (tokens asked ÷ 150 s), reported as `ratio_upper_bound`.
  Both sides' ggml CPU features are recorded: the pinned Ollama is built by `go install` (cgo).
  `same_text` is a sanity check, not a goal: scalar and AVX2 kernels round differently, so a
  random model's near-ties can flip after a few tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Türkiye'nin başkenti Ankara'dır. İstanbul Boğazı, Asya ile Avrupa'yı ayırır ve"
NUM_PREDICT, THREADS, NUM_CTX, REPEATS, OLLAMA_BUDGET_S, OLLAMA_TIMEOUT_S = 128, 2, 512, 3, 60.0, 150.0
# Set explicitly on both sides. 1.1 (Ollama's default) was not enough for the random tiny model with
# the repacking build: its greedy reply repeated one token past Ollama's limit (30 pieces) on every
# prompt tried. The penalty's value changes which tokens come out, not what a decode step costs.
REPEAT_PENALTY, REPEAT_LAST_N = 1.2, 64


def help_seconds(runs: int = 5) -> float:
    script = Path(sys.executable).with_name("ollama-ft")
    command = [str(script), "--help"] if script.exists() else [sys.executable, "-m", "ollama_ft.cli", "--help"]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def register_seconds(gguf: Path, server) -> dict:
    """`register_model` twice on the same GGUF: uploading it, then (the blob deleted) copying it."""
    from ollama_ft.chat_templates import load_family
    from ollama_ft.modelfile import ModelfileSpec
    from ollama_ft.ollama_server import client_for
    from ollama_ft.register import RegisterInput, register_model
    from ollama_ft.runs import file_digest, file_stat

    family = load_family("chatml")
    spec = ModelfileSpec(gguf_path=gguf, template=family.go_template, stops=list(family.stop),
                         parameters={"num_ctx": NUM_CTX})
    stat = file_stat(gguf)
    start = time.perf_counter()
    digest = file_digest(gguf)   # the quantize stage's, in a build
    digest_seconds = time.perf_counter() - start
    blob = Path(server.models_dir) / "blobs" / f"sha256-{digest}"
    seconds, names = {}, []
    saved = {key: os.environ.get(key) for key in ("OLLAMA_FT_BLOB_UPLOAD", "OLLAMA_MODELS")}
    try:
        for transfer, env in (("uploaded", {"OLLAMA_FT_BLOB_UPLOAD": "1"}),
                              ("copied", {"OLLAMA_MODELS": str(server.models_dir)})):
            for key in saved:
                os.environ.pop(key, None)
            os.environ.update(env)
            if names:   # deleting the only model that uses the blob deletes the blob
                client_for(server.host).delete(names[-1])
                if blob.exists():
                    raise RuntimeError(f"Ollama kept {blob.name} after its model was deleted")
            names.append(f"bench-{uuid.uuid4().hex[:8]}")  # fresh: register refuses to replace without force
            start = time.perf_counter()
            out = register_model(RegisterInput(names[-1], server.host, spec, expected_digest=digest, hashed_stat=stat))
            seconds[transfer] = time.perf_counter() - start
            if out.blob_transfer != transfer:
                raise RuntimeError(f"register {out.blob_transfer} the blob; this measurement needed it {transfer}")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return {"seconds": seconds, "digest_seconds": digest_seconds, "name": names[-1]}


def ollama_generate(host: str, name: str, num_predict: int = NUM_PREDICT) -> dict:
    import ollama

    # num_thread and num_ctx as in the measured runs, or the warm-up would load another runner
    options = {"temperature": 0, "top_k": 1, "repeat_penalty": REPEAT_PENALTY, "repeat_last_n": REPEAT_LAST_N,
               "seed": 42, "num_predict": num_predict, "num_thread": THREADS, "num_ctx": NUM_CTX}
    # raw: the prompt goes to the model as is, no template, as llama-cpp-python gets it below
    client = ollama.Client(host=host, timeout=OLLAMA_TIMEOUT_S)
    resp = client.generate(model=name, prompt=PROMPT, raw=True, options=options, stream=False)
    if not resp.done:  # e.g. its "token repeat limit": the answer then carries no timings
        raise RuntimeError(f"Ollama stopped generating early after {len(resp.response)} characters (its token "
                           f"repeat limit, if the reply ends in one token repeated): {resp.response[-60:]!r}")
    return {"eval_count": resp.eval_count, "eval_seconds": resp.eval_duration / 1e9,
            "prompt_eval_count": resp.prompt_eval_count, "text": resp.response,
            "tokens_per_second": resp.eval_count / (resp.eval_duration / 1e9)}


def llama_cpp_generate(llm, count: int) -> dict:
    import llama_cpp
    import numpy as np

    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)  # add_bos follows the GGUF's own setting
    llm.reset()
    llm.eval(prompt)
    n_vocab = llm.n_vocab()
    out: list[int] = []
    start = time.perf_counter()
    for _ in range(count):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
        seen = np.unique((prompt + out)[-REPEAT_LAST_N:])  # llama.cpp's repeat penalty, as Ollama applies it
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / REPEAT_PENALTY, logits[seen] * REPEAT_PENALTY)
        out.append(int(logits.argmax()))  # greedy, as temperature 0 in Ollama
        llm.eval(out[-1:])
    seconds = time.perf_counter() - start
    return {"eval_count": count, "eval_seconds": seconds, "prompt_tokens": len(prompt),
            "text": llm.detokenize(out).decode("utf-8", errors="replace"), "tokens_per_second": count / seconds}


def run(work: Path, gguf: Path | None = None) -> dict:
    import httpx
    import llama_cpp
    from llama_cpp import Llama

    from benchmarks.stage_io import export_ggufs, io_seconds
    from ollama_ft.ollama_server import OllamaServer, server_version
    from ollama_ft.tiny import ensure_tiny_base

    if gguf is None:
        _, gguf = export_ggufs(ensure_tiny_base("tiny:llama", work / "_bases"), work / "stage-io-llama")
    folder = Path(tempfile.mkdtemp(prefix="serving-", dir=work))
    try:
        io = io_seconds([gguf, gguf], gguf.stat().st_size, folder)
        with OllamaServer(folder / "models", log_path=folder / "serve.log") as server:
            version = server_version(server.host)
            registered = register_seconds(gguf, server)
            name = registered["name"]
            ollama_runs: list[dict] = []
            asked = 4
            try:
                ollama_generate(server.host, name, num_predict=asked)  # warm-up: loads the model into a runner
                asked = NUM_PREDICT
                while len(ollama_runs) < REPEATS and sum(r["eval_seconds"] for r in ollama_runs) < OLLAMA_BUDGET_S:
                    ollama_runs.append(ollama_generate(server.host, name))
                bound = None
            except httpx.TimeoutException:
                bound = asked / OLLAMA_TIMEOUT_S  # fewer tokens than asked came in the time allowed
        log = (folder / "serve.log").read_text(encoding="utf-8", errors="replace")
        ollama_cpu = next(iter(re.findall(r"msg=system (.*)", log)), "?")
        count = ollama_runs[0]["eval_count"] if ollama_runs else NUM_PREDICT  # the same number on both sides
        llm = Llama(model_path=str(gguf), n_ctx=NUM_CTX, n_threads=THREADS, n_threads_batch=THREADS,
                    seed=42, verbose=False)
        llama_cpp_generate(llm, count)
        cpp_runs = [llama_cpp_generate(llm, count) for _ in range(REPEATS)]
        llm.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ollama_tps = statistics.median(r["tokens_per_second"] for r in ollama_runs) if ollama_runs else None
    cpp_tps = statistics.median(r["tokens_per_second"] for r in cpp_runs)
    return {
        "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "ollama_version": version,
        "register": {"seconds": registered["seconds"]["copied"], "io_seconds": io,
                     "ratio": registered["seconds"]["copied"] / io,
                     "upload_seconds": registered["seconds"]["uploaded"],
                     "upload_ratio": registered["seconds"]["uploaded"] / io,
                     "digest_seconds": registered["digest_seconds"]},
        "help_seconds": help_seconds(),
        "generation": {"tokens": count, "threads": THREADS, "prompt": PROMPT, "ollama_ggml": ollama_cpu,
                       "llama_cpp_ggml": llama_cpp.llama_print_system_info().decode().strip(),
                       "ollama_prompt_tokens": ollama_runs[0]["prompt_eval_count"] if ollama_runs else None,
                       "llama_cpp_prompt_tokens": cpp_runs[0]["prompt_tokens"],
                       "ollama_tokens_per_second": ollama_tps, "llama_cpp_tokens_per_second": cpp_tps,
                       "ratio": ollama_tps / cpp_tps if ollama_tps else None,
                       "ollama_tokens_per_second_upper_bound": bound if not ollama_runs else None,
                       "ratio_upper_bound": bound / cpp_tps if bound and not ollama_runs else None,
                       "same_text": bool(ollama_runs) and ollama_runs[0]["text"] == cpp_runs[0]["text"],
                       "ollama_runs": ollama_runs, "llama_cpp_runs": cpp_runs},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="a GGUF to serve (default: the tiny base's Q4_K_M)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None, help="folder for serving.json")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.work, args.gguf)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
