#!/usr/bin/env bash
# The main job on the built-in demo: set up, start a private Ollama server if none is running,
# build recipes/tiny-demo.toml, and ask the model one of its training questions.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export OLLAMA_HOST=${OLLAMA_HOST:-127.0.0.1:11434}
OLLAMA_BIN=$(python -c 'from ollama_ft.ollama_server import find_ollama_binary; print(find_ollama_binary())')
if ! curl -fsS "http://$OLLAMA_HOST/api/version" >/dev/null 2>&1; then
  echo "==> starting ollama serve on $OLLAMA_HOST (log: runs/ollama-serve.log)"
  mkdir -p runs
  nohup "$OLLAMA_BIN" serve >runs/ollama-serve.log 2>&1 &
  for _ in $(seq 50); do curl -fsS "http://$OLLAMA_HOST/api/version" >/dev/null 2>&1 && break; sleep 0.2; done
fi
ollama-ft build recipes/tiny-demo.toml
echo
echo "==> ollama run tr-tiny-demo \"Türkiye'nin başkenti neresidir?\""
"$OLLAMA_BIN" run tr-tiny-demo "Türkiye'nin başkenti neresidir?" </dev/tty 2>/dev/null || \
  "$OLLAMA_BIN" run tr-tiny-demo "Türkiye'nin başkenti neresidir?"
