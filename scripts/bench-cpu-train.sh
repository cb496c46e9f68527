#!/usr/bin/env bash
# bench-cpu-train.sh: tokens/s of a LoRA training step on CPU, `finetune train` vs PyTorch +
# transformers + PEFT, same base (the embedded tiny preset), same sequence length, rank and
# thread count, measured in the same run (ours, PyTorch, ours again; medians of the steps after
# the first two).
#
#   scripts/bench-cpu-train.sh [STEPS] [SEQ] [R]       (defaults 12 1024 16)
#
# Needs a release build (cargo build --release) and the reference environment
# (~/.venv-ref, scripts/requirements-fixtures.txt). Prints the machine, the commands and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-12}; SEQ=${2:-1024}; R=${3:-16}
PY=${PYTHON:-$HOME/.venv-ref/bin/python}
BIN=${BIN:-target/release/finetune}   # another build to compare: BIN=path scripts/bench-cpu-train.sh
THREADS=$(nproc)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $THREADS cores; $(date -u +%FT%TZ)"
"$BIN" mine --repo . --out "$WORK/data" -q
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ours() {
  local run="$WORK/run-$1"
  local cmd=("$BIN" train --data "$WORK/data" --run-dir "$run" --max-steps "$STEPS" --seq-len "$SEQ" --micro-batch 1 --grad-accum 1 --rank "$R" --lora-alpha $((2 * R)) --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --overlong truncate-target --eval-every 0 --save-every 1000 -q)
  echo "ours: ${cmd[*]}" >&2
  RAYON_NUM_THREADS=$THREADS "${cmd[@]}" >/dev/null
  # tokens/s of steps 3.. (the first ones warm caches); full sequences only.
  python3 -c "
import json,sys
rows=[json.loads(l) for l in open('$run/metrics.jsonl')][2:]
for r in rows:
    if r['tokens']==$SEQ: print(r['tokens_per_sec'])" | median
}
theirs() {
  local cmd=("$PY" scripts/bench_cpu_train_torch.py "$WORK/run-1/base" "$SEQ" "$STEPS" "$R" "$THREADS")
  echo "pytorch: ${cmd[*]}" >&2
  "${cmd[@]}" 2>/dev/null | awk 'NR > 2 {print $6}' | median
}
a=$(ours 1); b=$(theirs); c=$(ours 2)
python3 - "$a" "$b" "$c" <<'PY'
import sys
a, b, c = map(float, sys.argv[1:])
print(f"finetune train: {a:.0f} and {c:.0f} tokens/s (median per step); PyTorch + PEFT: {b:.0f} tokens/s")
print(f"ratio finetune / PyTorch: {(a + c) / 2 / b:.2f}x")
PY
