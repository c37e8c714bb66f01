#!/usr/bin/env bash
# The test command (README): set up, then run the whole suite against a real Ollama server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q --timeout=1800 "$@"
