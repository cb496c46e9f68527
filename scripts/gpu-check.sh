#!/usr/bin/env bash
# gpu-check.sh: the GPU checks of issue #9 in one call on the GPU machine: the CUDA kernel and
# model parity test executables, `finetune doctor`, `finetune bench kernels`, the GPU-vs-CPU loss curve of `finetune train` on the embedded
# tiny base, then scripts/bench-gpu.sh. Results under $OUT.
#
#   here:  scripts/device-run.sh build && scripts/device-run.sh build-tests finetune-kernels finetune-model
#          finetune mine --repo . --out dist/lossdata
#          scripts/device-run.sh pack dist/pack/finetune.tar.xz dist/cuda dist/cuda-tests/finetune_kernels-* dist/cuda-tests/cuda_parity-*
#   there: bash scripts/gpu-check.sh          (run tool: carry ["dist/pack", "dist/lossdata"])
#   env:   SKIP_TESTS=1 (no test executables packed), LOSS_STEPS (15), RUNS and BENCH_TIMEOUT
#          (bench-gpu.sh runs and its time limit), PART=checks (tests, doctor, bench kernels,
#          loss curve: ~5 min) or PART=bench (bench-gpu.sh only: ~8 min) to fit the run tool's
#          10-minute calls (default: both, for a machine without that limit).
set -x
mkdir -p "$OUT"
bash scripts/device-run.sh unpack dist/pack/finetune.tar.xz
nvidia-smi > "$OUT/smi.txt"
PART=${PART:-all}
if [ "$PART" != bench ]; then
if [ -z "${SKIP_TESTS:-}" ]; then
for t in dist/cuda-tests/finetune_kernels-*; do
  timeout 150 bash scripts/device-run.sh exec "$t" --nocapture --test-threads 1 > "$OUT/kernels-tests.log" 2>&1
  echo "kernels rc $?" >> "$OUT/rc.txt"
done
for t in dist/cuda-tests/cuda_parity-*; do
  timeout 120 bash scripts/device-run.sh exec "$t" --nocapture --test-threads 1 > "$OUT/model-cuda-parity.log" 2>&1
  echo "cuda_parity rc $?" >> "$OUT/rc.txt"
  # Again with the opt-in GPU paths on (tensor-core attention, fused LoRA linear, the grouped
  # cuBLAS call, and every model loaded with the grouped MoE path's and the attention half's
  # hand-written backwards as its defaults).
  FINETUNE_ATTENTION_TENSOR_CORES=1 FINETUNE_LORA_LINEAR_GPU=1 FINETUNE_GROUPED_GEMM_CUBLAS=1 FINETUNE_MOE_PATH=grouped-manual FINETUNE_ATTENTION_BLOCK=manual timeout 120 bash scripts/device-run.sh exec "$t" \
    --nocapture --test-threads 1 > "$OUT/model-cuda-parity-opt-in.log" 2>&1
  echo "cuda_parity opt-in rc $?" >> "$OUT/rc.txt"
done
grep -E "test result|FAILED|panicked|attention cuda|grouped-linear cuda|grouped cuBLAS call|lora-linear cuda|moe-experts cuda|attention-block cuda|fp8-linear cuda|fp8-grouped-linear cuda" "$OUT"/*.log | head -80
fi
# Every device and NCCL self-check, including the parallel step over NCCL with the gradient
# all-reduce on a second stream overlapping the backward (world = the GPUs lent).
timeout 300 bash scripts/device-run.sh exec dist/cuda/finetune doctor > "$OUT/doctor.txt" 2>&1
echo "doctor rc $?" >> "$OUT/rc.txt"
grep -E "FAIL|nccl" "$OUT/doctor.txt" | head -40
# Per-kernel TFLOPS / GB/s against cuBLAS and a copy of the same size (30B-A3B layer shapes),
# with the FP8 GEMM rows (fp8_linear, fp8_grouped_linear) and their % of the FP8 peak.
timeout 180 bash scripts/device-run.sh exec dist/cuda/finetune bench kernels --json "$OUT/kernels.jsonl" \
  > "$OUT/bench-kernels.txt" 2>&1
echo "bench-kernels rc $?" >> "$OUT/rc.txt"
cat "$OUT/bench-kernels.txt"
# Loss curve: `finetune train` on the embedded tiny base, GPU (bf16 compute) vs CPU (f32), same
# data, seed and flags, LoRA dropout off as in the earlier measurements (the masks are
# counter-based, the same on both paths, so dropout on would compare too).
FT=dist/cuda/finetune
for dev in gpu cpu; do
  if [ $dev = cpu ]; then export CUDA_VISIBLE_DEVICES=; fi
  /usr/bin/time -v timeout 240 bash scripts/device-run.sh exec $FT train --data dist/lossdata --run-dir /tmp/loss-$dev \
    --max-steps ${LOSS_STEPS:-20} --seq-len 1024 --rank 16 --lora-dropout 0 --eval-every 0 --save-every 1000 -q > "$OUT/loss-$dev.log" 2>&1
  echo "loss-$dev rc $?" >> "$OUT/rc.txt"
  unset CUDA_VISIBLE_DEVICES
  cp /tmp/loss-$dev/metrics.jsonl "$OUT/loss-$dev.jsonl"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {d: [r for r in map(json.loads, open(f"{out}/loss-{d}.jsonl")) if "tokens_per_sec" in r] for d in ("gpu", "cpu")}
g, c = [r["loss"] for r in rows["gpu"]], [r["loss"] for r in rows["cpu"]]
print("step  gpu-bf16  cpu-f32  diff")
for i, (a, b) in enumerate(zip(g, c)):
    print(f"{i + 1:4d}  {a:.5f}  {b:.5f}  {a - b:+.5f}")
print("max |diff|", max(abs(a - b) for a, b in zip(g, c)), "steps", len(g), len(c))
PY
fi
if [ "$PART" != checks ]; then
RUNS=${RUNS:-ours-bf16 ours-bf16-manual-moe ours-bf16-tc-attention ours-bf16-fused-lora ours-bf16-cublas-grouped ours-fp8 ours-fp8-gemm} timeout ${BENCH_TIMEOUT:-480} bash scripts/bench-gpu.sh dist/pack/finetune.tar.xz 2 4096 3
fi
cat "$OUT/rc.txt"
