#!/usr/bin/env bash
# bench-gpu.sh: LoRA training speed and memory of `finetune train`'s loop vs HF transformers +
# PEFT on the same GPU, checkpoint, shapes and token ids, in one call on the GPU machine.
#
#   here:  scripts/device-run.sh build && scripts/device-run.sh pack dist/pack/finetune.tar.xz dist/cuda
#   there: bash scripts/bench-gpu.sh dist/pack/finetune.tar.xz [LAYERS] [SEQ] [STEPS]
#          (run tool: carry ["dist/pack"]; results in $OUT/bench-gpu/)
#
# What it runs (each side alone on the GPU, one after the other):
#   1. scripts/bench_gpu_train.py make-base: a random Qwen3-Coder-30B-A3B-shaped checkpoint
#      (true layer shapes: hidden 2048, 32 heads, 4 KV heads, 128 experts of 768, top-8; vocab
#      151,936) with LAYERS layers (default 2), in bf16 and in FP8 block-128.
#   2. cuBLAS references: bf16 and FP8 GEMM TFLOPS at one expert's and a dense shape.
#   3. `finetune bench train`, r = 16 on q/k/v/o and every expert's gate/up/down, SEQ tokens
#      (default 4096): bf16 base with bf16 compute, the same with the plain (materialized)
#      attention and with the padded batched MoE path instead of the grouped one, FP8 base with
#      bf16 compute, bf16 base with f32 compute on TF32 tensor cores, bf16 with the per-expert
#      MoE loop, bf16 with per-layer recompute, bf16 with the tensor-core attention kernels
#      (ours-bf16-tc-attention), with the fused LoRA linear on the GPU (ours-bf16-fused-lora,
#      FINETUNE_LORA_LINEAR_GPU=1), with the experts' GEMMs as one grouped cuBLAS call
#      (ours-bf16-cublas-grouped, FINETUNE_GROUPED_GEMM_CUBLAS=1), with the grouped MoE path's
#      hand-written backward (ours-bf16-manual-moe and ours-fp8-manual-moe, --moe grouped-manual:
#      compare with ours-bf16 and ours-fp8), with the attention half's hand-written backward
#      (ours-bf16-manual-attention, --attention-block manual; ours-bf16-manual-both with
#      --moe grouped-manual too: compare with ours-bf16-manual-moe), the FP8 base through the FP8 tensor-core GEMM
#      (ours-fp8-gemm, FINETUNE_FP8_GEMM=1: activations quantized to FP8 per 128 columns), the
#      router's top-k kernel (ours-bf16-route-device, FINETUNE_ROUTE_ON_DEVICE=1), and every
#      opt-in at once (ours-bf16-opt-ins, ours-fp8-opt-ins with the FP8 GEMM too,
#      ours-bf16-opt-ins-recompute: scripts/opt-ins.sh). run_spec lists them all.
#      RUNS="ours-bf16 ours-fp8 …" picks a subset and their order.
#   4. transformers + PEFT, r = 16 on q/k/v/o + the fused experts (target_parameters), bf16.
#   5. Per-kernel GPU time (runs peft-bf16-kprof and <run>-kprof for any of ours, in RUNS): PEFT
#      and that run again, 1 warm-up + KPROF_STEPS (default 2) steps, under the CUPTI injection
#      library dist/cuda/libkernel_profile.so (tools/kernel-profile: `device-run.sh build` puts it
#      in the pack). Each writes $OUT_DIR/<run>.kernels.tsv (whole-process totals per kernel
#      name, memcpy kind and memset); the summary prints each side's top 25 kernels per step
#      (the totals divided by warm-up + steps, model loading included) and the GPU busy/idle
#      time. Their tokens/s rows carry CUPTI's overhead: compare speed on the plain runs.
# Peak memory: nvidia-smi's memory.used sampled every 50 ms during each side's run (the
# whole process: weights, activations, allocator caches, CUDA context), the same measure for
# both; PyTorch's own max_memory_allocated is also reported. MFU counts, per token,
# 4·N_active (forward + input-gradient backward of the frozen base; LoRA FLOPs excluded) +
# 3× the causal attention forward FLOPs, over the GPU's dense bf16 peak (989 TFLOPS, H100/H200 SXM).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: bench-gpu.sh PACK.tar.xz [LAYERS] [SEQ] [STEPS]}
LAYERS=${2:-2}; SEQ=${3:-4096}; STEPS=${4:-3}; WARMUP=1
OUT_DIR=${OUT:-/tmp}/bench-gpu; mkdir -p "$OUT_DIR"
WORK=${BENCH_WORK:-/tmp/bench-gpu-work}; mkdir -p "$WORK"
log() { echo "[bench-gpu] $*" >&2; }
PY=${PYTHON:-python3}

bash scripts/device-run.sh unpack "$PACK"
FT=dist/cuda/finetune
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

# peak_mem NAME CMD...: runs CMD with nvidia-smi sampling; peak MiB into $OUT_DIR/NAME.mem
peak_mem() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT_DIR/$name.memlog" &
  local smi=$!
  "$@"; local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  sort -n "$OUT_DIR/$name.memlog" | tail -1 > "$OUT_DIR/$name.mem"
  log "$name: rc $rc, peak memory.used $(cat "$OUT_DIR/$name.mem") MiB"
  return $rc
}


run_ours() {  # NAME MODEL FLAGS...   (environment assignments from the array ENVS)
  local name=$1 model=$2; shift 2
  peak_mem "$name" env "${ENVS[@]}" timeout 240 bash scripts/device-run.sh exec "$FT" bench train --model "$model" \
    --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --rank 16 --profile --json "$OUT_DIR/$name.json" "$@" \
    > "$OUT_DIR/$name.stdout" 2> "$OUT_DIR/$name.log"
  tail -3 "$OUT_DIR/$name.log" >&2
}

# Every opt-in GPU path at once (each is also a run of its own below): OPT_IN_ENV of
# scripts/opt-ins.sh. ours-bf16-opt-ins against ours-bf16 is what turning them all on would
# give; the single runs say which one does what.
source scripts/opt-ins.sh

# run_spec RUN: sets MODEL, ENVS (array) and FLAGS (array) of one of our runs (without -kprof).
run_spec() {
  MODEL=$WORK/base/bf16; ENVS=(); FLAGS=(--bf16)
  case $1 in
    ours-bf16) ;;
    ours-bf16-plain-attention) FLAGS+=(--attention plain) ;;
    ours-bf16-padded-moe) FLAGS+=(--moe batched) ;;
    ours-fp8) MODEL=$WORK/base/fp8 ;;
    ours-bf16-tf32) FLAGS=(--tf32) ;;
    ours-bf16-per-expert) FLAGS+=(--moe per-expert) ;;
    ours-bf16-recompute) FLAGS+=(--recompute) ;;
    ours-bf16-tc-attention) FLAGS+=(--attention tensor-core) ;;
    ours-bf16-fused-lora) ENVS=(FINETUNE_LORA_LINEAR_GPU=1) ;;
    ours-bf16-cublas-grouped) ENVS=(FINETUNE_GROUPED_GEMM_CUBLAS=1) ;;
    ours-bf16-route-device) ENVS=(FINETUNE_ROUTE_ON_DEVICE=1) ;;
    ours-bf16-manual-moe) FLAGS+=(--moe grouped-manual) ;;
    ours-fp8-manual-moe) MODEL=$WORK/base/fp8; FLAGS+=(--moe grouped-manual) ;;
    ours-bf16-manual-attention) FLAGS+=(--attention-block manual) ;;
    ours-bf16-manual-both) FLAGS+=(--moe grouped-manual --attention-block manual) ;;
    ours-fp8-gemm) MODEL=$WORK/base/fp8; ENVS=(FINETUNE_FP8_GEMM=1) ;;
    ours-bf16-opt-ins) ENVS=("${OPT_IN_ENV[@]}") ;;
    ours-bf16-opt-ins-recompute) ENVS=("${OPT_IN_ENV[@]}"); FLAGS+=(--recompute) ;;
    ours-fp8-opt-ins) MODEL=$WORK/base/fp8; ENVS=("${OPT_IN_ENV[@]}" FINETUNE_FP8_GEMM=1) ;;
    *) return 1 ;;
  esac
}

# kprof NAME STDOUT CMD...: CMD under the kernel profiler (absolute path: the driver dlopens
# it), through device-run.sh exec so that libcupti.so.13 (PyTorch's nvidia/cu13/lib) is found;
# stdout to STDOUT, stderr to $OUT_DIR/NAME.log.
KPROF_LIB=$PWD/dist/cuda/libkernel_profile.so
redirect() { local o=$1 e=$2; shift 2; "$@" > "$o" 2> "$e"; }  # OUT ERR CMD...
KPROF_STEPS=${KPROF_STEPS:-2}
export KPROF_STEPS
kprof() {
  local name=$1 stdout=$2; shift 2
  if [ ! -f "$KPROF_LIB" ]; then log "$name: no $KPROF_LIB in the pack (built before tools/kernel-profile?)"; return 1; fi
  rm -f "$OUT_DIR/$name.kernels.tsv"
  CUDA_INJECTION64_PATH=$KPROF_LIB KERNEL_PROFILE_OUT=$OUT_DIR/$name.kernels.tsv KERNEL_PROFILE_LABEL=$name \
    peak_mem "$name" redirect "$stdout" "$OUT_DIR/$name.log" timeout 240 bash scripts/device-run.sh exec "$@"
  local rc=$?
  tail -3 "$OUT_DIR/$name.log" >&2
  if [ -s "$OUT_DIR/$name.kernels.tsv" ]; then
    log "$name: $(grep -c '^kernel' "$OUT_DIR/$name.kernels.tsv") kernel names in $name.kernels.tsv"
  else
    log "$name: no kernel table written (see $name.log)"
  fi
  return $rc
}
# RUNS picks our runs (default: all, in this order).
# A name ending in -kprof is that run under the kernel profiler (1 warm-up + KPROF_STEPS).
export RUNS=${RUNS:-ours-bf16 ours-bf16-opt-ins peft-bf16-kprof ours-bf16-kprof ours-bf16-opt-ins-kprof ours-fp8 ours-fp8-opt-ins ours-bf16-opt-ins-recompute ours-bf16-plain-attention ours-bf16-padded-moe ours-bf16-tf32 ours-bf16-per-expert ours-bf16-recompute ours-bf16-tc-attention ours-bf16-fused-lora ours-bf16-cublas-grouped ours-bf16-route-device ours-bf16-manual-moe ours-fp8-manual-moe ours-bf16-manual-attention ours-bf16-manual-both ours-fp8-gemm}
for run in $RUNS; do  # refuse a misspelt run before spending GPU time
  [ "$run" = peft-bf16-kprof ] || run_spec "${run%-kprof}" || { log "unknown run $run (see run_spec)"; exit 2; }
done
log "make-base: $LAYERS layers"
$PY scripts/bench_gpu_train.py make-base "$WORK/base" "$LAYERS" | tee "$OUT_DIR/base.json"
timeout 60 $PY scripts/bench_gpu_train.py gemm "$SEQ" 2048 768 128 | tee "$OUT_DIR/gemm.json"
peak_mem peft-bf16 timeout 240 $PY scripts/bench_gpu_train.py peft "$WORK/base/bf16" "$SEQ" "$STEPS" "$WARMUP" 16 \
  > "$OUT_DIR/peft-bf16.json" 2> "$OUT_DIR/peft-bf16.log"
tail -3 "$OUT_DIR/peft-bf16.log" >&2
# BENCH_DEADLINE_S (seconds since this script started; gpu-check.sh sets it under its time
# limit): runs that would start later are skipped, so that the summary is still written.
DEADLINE=${BENCH_DEADLINE_S:-0}
for run in $RUNS; do
  if [ "$DEADLINE" -gt 0 ] && [ "$SECONDS" -gt "$DEADLINE" ]; then
    log "skipping $run: past BENCH_DEADLINE_S=$DEADLINE ($SECONDS s)"; continue
  fi
  case $run in
    peft-bf16-kprof) kprof "$run" "$OUT_DIR/$run.json" $PY scripts/bench_gpu_train.py peft "$WORK/base/bf16" "$SEQ" \
        "$KPROF_STEPS" 1 16 ;;
    *-kprof)
      if ! run_spec "${run%-kprof}"; then log "unknown run $run"; exit 2; fi
      kprof "$run" "$OUT_DIR/$run.stdout" env "${ENVS[@]}" "$FT" bench train --model "$MODEL" --seq "$SEQ" \
        --steps "$KPROF_STEPS" --warmup 1 --rank 16 "${FLAGS[@]}" --json "$OUT_DIR/$run.json" ;;
    *)
      if ! run_spec "$run"; then log "unknown run $run"; exit 2; fi
      run_ours "$run" "$MODEL" "${FLAGS[@]}" ;;
  esac
done

$PY - "$OUT_DIR" "$SEQ" "$LAYERS" <<'PYEOF' | tee "$OUT_DIR/summary.md"
import json, os, sys
out, seq, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h, nh, nkv, d, mi, topk, vocab = 2048, 32, 4, 128, 768, 8, 151936
n_active = layers * (h * nh * d * 2 + 2 * h * nkv * d + h * 128 + topk * 3 * h * mi) + vocab * h
attn_fwd = layers * 2 * 2 * nh * d * seq / 2
flops_per_token = 4 * n_active + 3 * attn_fwd
gpu = open(os.path.join(out, "gpu.txt")).read().strip()
def load(name):
    try:
        text = open(os.path.join(out, name + ".json")).read().strip()
        r = json.loads(text if name.startswith("ours") else text.splitlines()[-1])
    except Exception as e:
        return None
    try:
        r["peak_mib"] = float(open(os.path.join(out, name + ".mem")).read())
    except Exception:
        r["peak_mib"] = None
    return r
rows = [(n, load(n)) for n in ["peft-bf16"] + os.environ["RUNS"].split()]
base = rows[0][1]
print(f"GPU: {gpu}; model: Qwen3-Coder-30B-A3B shapes, {layers} layers, seq {seq}, r = 16 on attention + experts\n")
print("| run | tokens/s | × PEFT | MFU | peak memory.used (MiB) | × PEFT | first loss |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, r in rows:
    if r is None:
        print(f"| {name} | failed (see {name}.log) | | | | | |"); continue
    tps = r["tokens_per_sec"]; mfu = tps * flops_per_token / 989e12
    x = f"{tps / base['tokens_per_sec']:.2f}" if base else "-"
    mem = r["peak_mib"]; xm = f"{mem / base['peak_mib']:.2f}" if base and mem and base.get("peak_mib") else "-"
    mems = f"{mem:.0f}" if mem else "-"
    print(f"| {name} | {tps:.0f} | {x} | {100 * mfu:.1f}% | {mems} | {xm} | {r['losses'][0]:.4f} |")
for name, r in rows:
    if r and r.get("profile"):
        p = r["profile"]
        print(f"\n{name}: forward + loss {p['forward_and_loss_secs']:.3f} s, backward {p['backward_secs']:.3f} s, "
              f"rest of the step {p['rest_of_step_secs']:.3f} s (median step {r['median_step_secs']:.3f} s); "
              f"GPU MiB before / after forward / after backward: {p.get('gpu_mib_before')} / "
              f"{p.get('gpu_mib_after_forward')} / {p.get('gpu_mib_after_backward')}; kept for the backward: "
              f"{p.get('graph_retained_mib', 0):.0f} MiB by the graph + {p.get('node_saved_mib', 0):.0f} MiB inside "
              f"the hand-written nodes")
        phases = p.get("forward_phases") or {}
        if phases:
            print("  forward phases (each synchronized): " + ", ".join(
                f"{k} {v:.4f}" + ("" if k.endswith("_rows") else " s") for k, v in phases.items()))

# Per-kernel tables (tools/kernel-profile): totals of the measured steps (scope=range: both
# sides mark them with cuProfilerStart/Stop) / KPROF_STEPS, or, if no range was seen, of the
# whole process / (1 warm-up + KPROF_STEPS).
measured_steps = int(os.environ.get("KPROF_STEPS", "2"))
def print_kernel_table(name, lines):
    meta = {}
    for l in lines:
        if l.startswith("#"):
            for field in l[1:].split():
                if "=" in field:
                    k, v = field.split("=", 1); meta[k] = v
    cols = None; rows = []
    for l in lines:
        if l.startswith("#"): continue
        f = l.split("\t")
        if cols is None: cols = f; continue
        rows.append(dict(zip(cols, f)))
    in_range = meta.get("scope") == "range"
    steps_run = measured_steps if in_range else 1 + measured_steps
    ms = lambda ns: int(ns) / steps_run / 1e6
    scope = (f"the measured steps' totals / {steps_run} (profiler range; {meta.get('outside_range', '?')} records outside it)"
             if in_range else f"whole process / {steps_run} (1 warm-up + {steps_run - 1} steps; model loading and setup "
             "included: no profiler range was seen)")
    print(f"\n{name}: per step = {scope}. Kernels {ms(meta.get('kernel_ns', 0)):.1f} ms, memcpy {ms(meta.get('memcpy_ns', 0)):.1f} ms, "
          f"memset {ms(meta.get('memset_ns', 0)):.1f} ms; GPU busy (union) {ms(meta.get('gpu_busy_ns', 0)):.1f} ms of a "
          f"{ms(meta.get('span_ns', 0)):.1f} ms span (idle {ms(meta.get('idle_ns', 0)):.1f} ms); {meta.get('kernels', '?')} "
          f"kernel launches ({int(meta.get('kernels', 0)) / steps_run:.0f} per step), {meta.get('distinct_kernels', '?')} "
          f"distinct; dropped records {meta.get('dropped', '?')}, without timestamps {meta.get('without_timestamps', '?')}; "
          f"CUPTI {meta.get('cupti_api_runtime', '?')}")
    print("| # | kind | name | calls/step | ms/step | mean µs | share | grid | block |")
    print("|---:|---|---|---:|---:|---:|---:|---|---|")
    for i, r in enumerate(rows[:25]):
        print(f"| {i + 1} | {r['kind']} | `{r['name']}` | {int(r['calls']) / steps_run:.1f} | {ms(r['total_ns']):.2f} | "
              f"{int(r['mean_ns']) / 1e3:.1f} | {100 * float(r['share']):.1f}% | {r['grid']} | {r['block']} |")
for name in [n for n in os.environ["RUNS"].split() if n.endswith("-kprof")]:
    path = os.path.join(out, name + ".kernels.tsv")
    try:
        lines = open(path).read().splitlines()
    except OSError:
        print(f"\n{name}: no kernel table ({name}.kernels.tsv missing, see {name}.log)"); continue
    try:
        print_kernel_table(name, lines)
    except Exception as e:  # a truncated table must not cost the rest of the summary
        print(f"\n{name}: unreadable {name}.kernels.tsv ({e!r})")
PYEOF
