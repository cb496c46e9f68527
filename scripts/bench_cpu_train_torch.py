#!/usr/bin/env python3
"""PyTorch + transformers + PEFT side of scripts/bench-cpu-train.sh: LoRA training steps of the
base in BASE_DIR (an HF checkpoint, e.g. a run's base/) on CPU, printing tokens/s per step.

LoRA as a user of PEFT 0.21 would set it up on transformers 5 (fused experts): r, alpha on
q/k/v/o (target_modules) and the experts' gate_up_proj/down_proj (target_parameters); AdamW,
one sequence of SEQ tokens per step (the same random ids every step), f32.

Usage: bench_cpu_train_torch.py BASE_DIR SEQ STEPS R THREADS
"""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeForCausalLM

base, seq, steps, r, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = Qwen3MoeForCausalLM.from_pretrained(base, dtype=torch.float32)
cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
model = get_peft_model(model, cfg)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, model.config.vocab_size, (1, seq))
for step in range(steps):
    t0 = time.perf_counter()
    opt.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    dt = time.perf_counter() - t0
    print(f"step {step + 1} loss {out.loss.item():.4f} tokens/s {seq / dt:.1f}", flush=True)
