#!/usr/bin/env bash
# gpu-check.sh: the GPU checks of issue #9 on the GPU machine: the CUDA kernel and model parity
# test executables (default paths and every opt-in at once), `finetune doctor`, `finetune bench
# kernels`, the GPU-vs-CPU loss curve of `finetune train` on the embedded tiny base, and
# scripts/bench-gpu.sh against transformers + PEFT, including per-kernel GPU time tables under
# tools/kernel-profile (bench-gpu/<run>-kprof.kernels.tsv, top 25 per step in
# bench-gpu/summary.md). Results under $OUT; every step's exit status in $OUT/rc.txt.
#
#   here:  scripts/device-run.sh build && scripts/device-run.sh build-tests finetune-kernels finetune-model
#          finetune mine --repo . --out dist/lossdata
#          scripts/device-run.sh pack dist/pack/finetune.tar.xz dist/cuda dist/cuda-tests/finetune_kernels-* dist/cuda-tests/cuda_parity-*
#   there: PART=session bash scripts/gpu-check.sh   (run tool: carry ["dist/pack", "dist/lossdata"],
#          timeout_s 600)
#
# PART picks what runs:
#   session  (for a lent session: ~15 device-minutes in all, machine start included, so ONE
#            call) everything below by priority within SESSION_S seconds (default 540): the
#            tests (both variants), bench kernels, bench-gpu.sh with SESSION_RUNS (default: ours
#            with the defaults and with every opt-in, PEFT and both under the kernel profiler,
#            FP8 with every opt-in, every opt-in with recompute), the loss curve, doctor. Each
#            step starts only if its time limit fits in what is left, so the call returns with
#            whatever finished rather than being cut off.
#   checks   tests, doctor, bench kernels, loss curve (~5 min)
#   bench    bench-gpu.sh only (RUNS, BENCH_TIMEOUT; ~8 min)
#   all      (default) checks then bench, for a machine without a time limit
# env: SKIP_TESTS=1 (no test executables packed), LOSS_STEPS (15).
set -x
mkdir -p "$OUT"
bash scripts/device-run.sh unpack dist/pack/finetune.tar.xz
nvidia-smi > "$OUT/smi.txt"
PART=${PART:-all}
FT=dist/cuda/finetune
# The opt-in GPU paths at once, for the opt-in parity run (OPT_IN_ENV, as bench-gpu.sh's runs).
source scripts/opt-ins.sh

# Time left in a session (a large number outside one); fits N: whether a step limited to N
# seconds still fits (else it is skipped and the skip logged in rc.txt).
END=$(( SECONDS + ${SESSION_S:-540} ))
left() { if [ "$PART" = session ]; then echo $(( END - SECONDS )); else echo 100000; fi; }
fits() {
  if [ "$(left)" -ge "$1" ]; then return 0; fi
  echo "skipped $2: $(left) s left, needs $1" >> "$OUT/rc.txt"; return 1
}

run_tests() {
  [ -z "${SKIP_TESTS:-}" ] || return 0
  for t in dist/cuda-tests/finetune_kernels-*; do
    fits 150 kernel-tests || return 0
    timeout 150 bash scripts/device-run.sh exec "$t" --nocapture --test-threads 1 > "$OUT/kernels-tests.log" 2>&1
    echo "kernels rc $?" >> "$OUT/rc.txt"
  done
  for t in dist/cuda-tests/cuda_parity-*; do
    fits 120 cuda-parity || return 0
    timeout 120 bash scripts/device-run.sh exec "$t" --nocapture --test-threads 1 > "$OUT/model-cuda-parity.log" 2>&1
    echo "cuda_parity rc $?" >> "$OUT/rc.txt"
    fits 120 cuda-parity-opt-in || return 0
    env "${OPT_IN_ENV[@]}" timeout 120 bash scripts/device-run.sh exec "$t" \
      --nocapture --test-threads 1 > "$OUT/model-cuda-parity-opt-in.log" 2>&1
    echo "cuda_parity opt-in rc $?" >> "$OUT/rc.txt"
  done
  grep -E "test result|FAILED|panicked|attention cuda|grouped-linear cuda|grouped cuBLAS call|lora-linear cuda|moe-experts cuda|attention-block cuda|fp8-linear cuda|fp8-grouped-linear cuda|moe-top-k cuda" "$OUT"/*.log | head -80
}

# Every device and NCCL self-check, including the parallel step over NCCL with the gradient
# all-reduce on a second stream overlapping the backward (world = the GPUs lent).
run_doctor() {
  fits 120 doctor || return 0
  timeout 120 bash scripts/device-run.sh exec $FT doctor > "$OUT/doctor.txt" 2>&1
  echo "doctor rc $?" >> "$OUT/rc.txt"
  grep -E "FAIL|nccl" "$OUT/doctor.txt" | head -40
}

# Per-kernel TFLOPS / GB/s against cuBLAS and a copy of the same size (30B-A3B layer shapes),
# with the FP8 GEMM rows (fp8_linear, fp8_grouped_linear) and their % of the FP8 peak.
run_bench_kernels() {
  fits 120 bench-kernels || return 0
  timeout 120 bash scripts/device-run.sh exec $FT bench kernels --json "$OUT/kernels.jsonl" \
    > "$OUT/bench-kernels.txt" 2>&1
  echo "bench-kernels rc $?" >> "$OUT/rc.txt"
  cat "$OUT/bench-kernels.txt"
}

# Loss curve: `finetune train` on the embedded tiny base, GPU (bf16 compute) vs CPU (f32), same
# data, seed and flags, LoRA dropout off as in the earlier measurements (the masks are
# counter-based, the same on both paths, so dropout on would compare too).
run_loss() {
  fits 150 loss-curve || return 0
  for dev in gpu cpu; do
    if [ $dev = cpu ]; then export CUDA_VISIBLE_DEVICES=; fi
    /usr/bin/time -v timeout 70 bash scripts/device-run.sh exec $FT train --data dist/lossdata --run-dir /tmp/loss-$dev \
      --max-steps ${LOSS_STEPS:-15} --seq-len 1024 --rank 16 --lora-dropout 0 --eval-every 0 --save-every 1000 -q > "$OUT/loss-$dev.log" 2>&1
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
}

# bench-gpu.sh within LIMIT seconds: runs that would start in the last 90 s are skipped, so
# that the limit cuts neither a run nor the summary.
run_bench() {  # LIMIT RUNS
  local limit=$1 runs=$2
  [ "$limit" -le "$(left)" ] || limit=$(left)
  if [ "$limit" -lt 150 ]; then echo "skipped bench-gpu: a limit of $limit s, needs 150" >> "$OUT/rc.txt"; return 0; fi
  RUNS=$runs BENCH_DEADLINE_S=$((limit - 90)) timeout "$limit" bash scripts/bench-gpu.sh dist/pack/finetune.tar.xz 2 4096 3
  echo "bench-gpu rc $?" >> "$OUT/rc.txt"
}

case $PART in
  session)
    run_tests
    run_bench_kernels
    # The bench gets what the loss curve and doctor (~150 + ~60 s) do not need.
    run_bench $(( $(left) - 200 )) "${SESSION_RUNS:-ours-bf16 ours-bf16-opt-ins peft-bf16-kprof ours-bf16-opt-ins-kprof ours-fp8-opt-ins ours-bf16-opt-ins-recompute ours-bf16-kprof}"
    run_loss
    run_doctor ;;
  checks) run_tests; run_doctor; run_bench_kernels; run_loss ;;
  bench) run_bench "${BENCH_TIMEOUT:-480}" "${RUNS:-ours-bf16 ours-bf16-opt-ins peft-bf16-kprof ours-bf16-kprof ours-bf16-opt-ins-kprof ours-bf16-manual-moe ours-bf16-tc-attention ours-bf16-fused-lora ours-bf16-cublas-grouped ours-fp8 ours-fp8-gemm}" ;;
  all) run_tests; run_doctor; run_bench_kernels; run_loss
       run_bench "${BENCH_TIMEOUT:-1800}" "${RUNS:-}" ;;
  *) echo "unknown PART=$PART (session, checks, bench, all)" >&2; exit 2 ;;
esac
cat "$OUT/rc.txt"
