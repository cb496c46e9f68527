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
#      (ours-fp8-gemm, FINETUNE_FP8_GEMM=1: activations quantized to FP8 per 128 columns).
#      RUNS="ours-bf16 ours-fp8 …" picks a subset.
#   4. transformers + PEFT, r = 16 on q/k/v/o + the fused experts (target_parameters), bf16.
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

log "make-base: $LAYERS layers"
$PY scripts/bench_gpu_train.py make-base "$WORK/base" "$LAYERS" | tee "$OUT_DIR/base.json"
timeout 60 $PY scripts/bench_gpu_train.py gemm "$SEQ" 2048 768 128 | tee "$OUT_DIR/gemm.json"

run_ours() {  # NAME MODEL FLAGS...
  local name=$1 model=$2; shift 2
  peak_mem "$name" timeout 240 bash scripts/device-run.sh exec "$FT" bench train --model "$model" \
    --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --rank 16 --profile --json "$OUT_DIR/$name.json" "$@" \
    > "$OUT_DIR/$name.stdout" 2> "$OUT_DIR/$name.log"
  tail -3 "$OUT_DIR/$name.log" >&2
}
peak_mem peft-bf16 timeout 240 $PY scripts/bench_gpu_train.py peft "$WORK/base/bf16" "$SEQ" "$STEPS" "$WARMUP" 16 \
  > "$OUT_DIR/peft-bf16.json" 2> "$OUT_DIR/peft-bf16.log"
tail -3 "$OUT_DIR/peft-bf16.log" >&2
# RUNS picks our runs (default: all, in this order).
export RUNS=${RUNS:-ours-bf16 ours-bf16-plain-attention ours-bf16-padded-moe ours-fp8 ours-bf16-tf32 ours-bf16-per-expert ours-bf16-recompute ours-bf16-tc-attention ours-bf16-fused-lora ours-bf16-cublas-grouped ours-bf16-manual-moe ours-fp8-manual-moe ours-fp8-gemm}
for run in $RUNS; do
  case $run in
    ours-bf16) run_ours ours-bf16 "$WORK/base/bf16" --bf16 ;;
    ours-bf16-plain-attention) run_ours "$run" "$WORK/base/bf16" --bf16 --attention plain ;;
    ours-bf16-padded-moe) run_ours "$run" "$WORK/base/bf16" --bf16 --moe batched ;;
    ours-fp8) run_ours ours-fp8 "$WORK/base/fp8" --bf16 ;;
    ours-bf16-tf32) run_ours ours-bf16-tf32 "$WORK/base/bf16" --tf32 ;;
    ours-bf16-per-expert) run_ours ours-bf16-per-expert "$WORK/base/bf16" --bf16 --moe per-expert ;;
    ours-bf16-recompute) run_ours ours-bf16-recompute "$WORK/base/bf16" --bf16 --recompute ;;
    ours-bf16-tc-attention) run_ours "$run" "$WORK/base/bf16" --bf16 --attention tensor-core ;;
    ours-bf16-fused-lora) FINETUNE_LORA_LINEAR_GPU=1 run_ours "$run" "$WORK/base/bf16" --bf16 ;;
    ours-bf16-cublas-grouped) FINETUNE_GROUPED_GEMM_CUBLAS=1 run_ours "$run" "$WORK/base/bf16" --bf16 ;;
    ours-bf16-manual-moe) run_ours "$run" "$WORK/base/bf16" --bf16 --moe grouped-manual ;;
    ours-fp8-manual-moe) run_ours "$run" "$WORK/base/fp8" --bf16 --moe grouped-manual ;;
    ours-bf16-manual-attention) run_ours "$run" "$WORK/base/bf16" --bf16 --attention-block manual ;;
    ours-bf16-manual-both) run_ours "$run" "$WORK/base/bf16" --bf16 --moe grouped-manual --attention-block manual ;;
    ours-fp8-gemm) FINETUNE_FP8_GEMM=1 run_ours "$run" "$WORK/base/fp8" --bf16 ;;
    *) log "unknown run $run"; exit 2 ;;
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
rows = [(n, load(n)) for n in ["peft-bf16", "ours-bf16", "ours-bf16-plain-attention", "ours-bf16-padded-moe", "ours-fp8", "ours-bf16-tf32",
                                "ours-bf16-per-expert", "ours-bf16-recompute", "ours-bf16-tc-attention",
                                "ours-bf16-fused-lora", "ours-bf16-cublas-grouped", "ours-bf16-manual-moe",
                                "ours-fp8-manual-moe", "ours-bf16-manual-attention", "ours-bf16-manual-both",
                                "ours-fp8-gemm"]]
rows = [(n, r) for n, r in rows if n == "peft-bf16" or n in os.environ["RUNS"].split()]
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
    print(f"| {name} | {tps:.0f} | {x} | {100 * mfu:.1f}% | {mem:.0f} | {xm} | {r['losses'][0]:.4f} |")
for name, r in rows:
    if r and r.get("profile"):
        p = r["profile"]
        print(f"\n{name}: forward + loss {p['forward_and_loss_secs']:.3f} s, backward {p['backward_secs']:.3f} s, "
              f"rest of the step {p['rest_of_step_secs']:.3f} s (median step {r['median_step_secs']:.3f} s); "
              f"GPU MiB before / after forward / after backward: {p.get('gpu_mib_before')} / "
              f"{p.get('gpu_mib_after_forward')} / {p.get('gpu_mib_after_backward')}")
        phases = p.get("forward_phases") or {}
        if phases:
            print("  forward phases (each synchronized): " + ", ".join(
                f"{k} {v:.4f}" + ("" if k.endswith("_rows") else " s") for k, v in phases.items()))
PYEOF
