#!/usr/bin/env bash
# Issue 21's measurement, prepared for one call on a lent H100 (bare: Python 3.12 and torch there).
# It unpacks the bundle made by scripts/gpu_bundle.sh, then measures, highest priority first:
#   A. adamw_8bit: plain PEFT, each model switch, their combination, Unsloth; the same in 4-bit;
#      torch.profiler's device time by category for plain PEFT and Unsloth;
#   B. adamw_torch: the trainer-level switches against plain PEFT.
# Every part writes its table and JSON after each variant, so a part cut by its time limit keeps
# what it measured. Results land in $OUT (the device tool's output folder) or runs/gpu-out.
#
#   bash benchmarks/gpu_switches.sh                                     # on the GPU machine
#   BUNDLE= PY=.venv/bin/python SHAPE=llama SEQ=200 STEPS=4 WARMUP=2 bash benchmarks/gpu_switches.sh   # CPU rehearsal
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-out}
SHAPE=${SHAPE:-llama-1b} SEQ=${SEQ:-1750} STEPS=${STEPS:-16} WARMUP=${WARMUP:-4}
PART_A_S=${PART_A_S:-400} PART_B_S=${PART_B_S:-120}
PY=${PY:-python3}
mkdir -p "$OUT"
BUNDLE=${BUNDLE-.gpu/site.tar.gz}   # BUNDLE= for a rehearsal in a local venv
if [ -n "$BUNDLE" ] && [ -f "$BUNDLE" ]; then
  mkdir -p /tmp/site && tar xzf "$BUNDLE" -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "triton", "unsloth", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__, str(exc)[:200])
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

fused="fused_rmsnorm+fused_rope+fused_swiglu"
all_model="fused_lora+fused_ce+$fused"
common=(--shape "$SHAPE" --steps "$STEPS" --warmup "$WARMUP" --seq "$SEQ" --work /tmp/ollama-ft-bench)

VARIANTS_A=${VARIANTS_A:-peft,unsloth,peft+$all_model,peft-qlora,unsloth-qlora,peft-qlora+no_fp32_upcast+$all_model,peft+fused_lora,peft+fused_ce,peft+$fused,peft-qlora+no_fp32_upcast}
timeout "$PART_A_S" "$PY" -m benchmarks.train_throughput "${common[@]}" --optim adamw_8bit \
  --variants "$VARIANTS_A" --profile "${PROFILE:-peft,unsloth}" --out "$OUT/model" > "$OUT/model.log" 2>&1
echo "part A exit $?"

[ "$PART_B_S" -gt 0 ] && timeout "$PART_B_S" "$PY" -m benchmarks.train_throughput "${common[@]}" --optim adamw_torch \
  --variants "peft,peft+fused_adamw,peft+activation_offloading,peft+torch_compile" \
  --out "$OUT/trainer" > "$OUT/trainer.log" 2>&1
echo "part B exit $?"

for f in "$OUT"/model/train_throughput.md "$OUT"/trainer/train_throughput.md; do
  [ -f "$f" ] && sed -n '/^|/p;/^- /p' "$f"
done
grep -h "failed:\|Error" "$OUT"/model.log "$OUT"/trainer.log | tail -20
