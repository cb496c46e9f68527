#!/usr/bin/env bash
# torchrun-style-example.sh: start `finetune train` as one process per GPU on this node, with
# the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), for
# NODES nodes. Run it on every node with its NODE_RANK; node 0's address is MASTER_ADDR.
#
#   NODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 scripts/torchrun-style-example.sh \
#       --data finetune-out/data --run-dir /shared/run --recipe recipes/qwen3-coder-480b-fp8-8xh200.toml
#
# The same with torchrun itself (it runs non-Python programs with --no-python):
#   torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr node0 --master-port 29500 \
#       --no-python dist/cuda/finetune train --gpus 1 --data … --run-dir …
#
# Each process runs one rank (--gpus 1) on GPU LOCAL_RANK; the layout (--tp, --ep, recipe
# train.tp/train.ep) spans all NODES × GPUS_PER_NODE ranks. Process 0 hands the NCCL ids to the
# others over TCP at MASTER_ADDR:(MASTER_PORT + 1) (or FINETUNE_RENDEZVOUS_PORT). The run
# directory and the data must be at the same path on every node (a shared file system): rank 0
# writes metrics, checkpoints and the adapter; every process reads the data and, on --resume,
# the checkpoint. Needs a `--features cuda` build (scripts/device-run.sh build).
set -euo pipefail
FINETUNE=${FINETUNE:-dist/cuda/finetune}
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-29500}
export WORLD_SIZE=$((NODES * GPUS_PER_NODE))
[ "$GPUS_PER_NODE" -ge 1 ] || { echo "no GPU found (set GPUS_PER_NODE)" >&2; exit 2; }

pids=()
for ((local = 0; local < GPUS_PER_NODE; local++)); do
  RANK=$((NODE_RANK * GPUS_PER_NODE + local)) LOCAL_RANK=$local \
    "$FINETUNE" train --gpus 1 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
