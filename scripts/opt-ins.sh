# opt-ins.sh: every opt-in GPU path at once, as environment assignments (sourced by
# scripts/bench-gpu.sh for its *-opt-ins runs and by scripts/gpu-check.sh for the opt-in parity
# tests). FINETUNE_MOE_PATH and FINETUNE_ATTENTION_BLOCK make every model a process loads use
# the grouped MoE path's and the attention half's hand-written backward. When an opt-in becomes
# a default, it leaves this list.
OPT_IN_ENV=(FINETUNE_ATTENTION_TENSOR_CORES=1 FINETUNE_LORA_LINEAR_GPU=1 FINETUNE_GROUPED_GEMM_CUBLAS=1
  FINETUNE_ROUTE_ON_DEVICE=1 FINETUNE_MOE_PATH=grouped-manual FINETUNE_ATTENTION_BLOCK=manual)
