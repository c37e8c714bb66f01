#!/usr/bin/env bash
# The README demo as on a brand-new machine: a fresh clone of BRANCH (default: the current one)
# and an empty HOME, so no pip, Go, Ollama, model or llama.cpp cache helps. Prints demo.sh's
# "set-up …, build …, all …" line at the end.
#   PYTHON=/path/to/python3.11 scripts/fresh_demo.sh [BRANCH]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
branch=${1:-$(git -C "$repo" rev-parse --abbrev-ref HEAD)}
work=$(mktemp -d /tmp/fresh-demo.XXXX)
mkdir -p "$work/home/.config/go"
[ -f "$(go env GOENV)" ] && cp "$(go env GOENV)" "$work/home/.config/go/env"   # GOFLAGS, GOTOOLCHAIN
git clone -q -b "$branch" "$repo" "$work/ollama-ft"
cd "$work/ollama-ft"
export HOME="$work/home"
unset OLLAMA_HOST OLLAMA_MODELS
bash scripts/demo.sh
echo "(clean-HOME run in $work; remove it when done)"
