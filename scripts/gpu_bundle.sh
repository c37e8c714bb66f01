#!/usr/bin/env bash
# Packs what a borrowed GPU machine lacks (Python 3.12, torch/transformers/peft there already)
# into .gpu/site.tar.gz: cp312 wheels installed with --no-deps into one folder. On the machine:
#   mkdir -p /tmp/site && tar xzf .gpu/site.tar.gz -C /tmp/site
#   PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 python3 -m benchmarks.train_throughput ...
# Dev tool only: the product and CI never use it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHL=.whl/cp312
SITE=.gpu/site
pin() { grep -i "^$1==" constraints.txt | head -1; }
# pydantic accepts one pydantic-core version only; take the one installed beside it here.
pydantic_core_version() { "$PY" -c 'import importlib.metadata as m; print(m.version("pydantic-core"))'; }
mkdir -p "$WHL" .gpu
rm -rf "$SITE"
pkgs=(
  "$(pin unsloth)" "$(pin unsloth-zoo)" "$(pin trl)" "$(pin datasets)" "$(pin bitsandbytes)"
  "$(pin tyro)" "$(pin cut-cross-entropy)" "$(pin msgspec)" "$(pin json5)" "$(pin nest-asyncio)"
  "$(pin structlog)" "$(pin pydantic)" "pydantic-core==$(pydantic_core_version)" annotated-types typing-inspection
  dill multiprocess "fsspec==2026.2.0" xxhash docstring-parser typeguard shtab
)
target=(--no-deps --only-binary=:all: --python-version 3.12 --platform any --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_34_x86_64)
"$PY" -m pip download --quiet "${target[@]}" -d "$WHL" "${pkgs[@]}"
"$PY" -m pip install --quiet "${target[@]}" --no-compile --target "$SITE" "$WHL"/*.whl
rm -rf "$SITE"/studio "$SITE"/unsloth_cli "$SITE"/bin
find "$SITE/bitsandbytes" -name 'libbitsandbytes_cuda*.so' ! -name '*cuda130*' -delete
tar czf .gpu/site.tar.gz -C "$SITE" .
du -h .gpu/site.tar.gz
