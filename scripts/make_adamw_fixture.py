#!/usr/bin/env python3
"""Reference optimizer trajectory for finetune-train, made with PyTorch and transformers'
schedules. Writes datasets/fixtures/adamw/reference.safetensors:

  p0.<k>, grad.<step>.<k>     two parameters and the gradients fed at each of 12 steps
  param.<schedule>.<step>.<k> parameters after each step: global-norm clipping to 1.0
                              (torch.nn.utils.clip_grad_norm_), then torch.optim.AdamW
                              (betas 0.9/0.999, eps 1e-8, weight decay 0.1) with the learning
                              rate of transformers' get_{cosine,linear,constant}_schedule_with_warmup
                              (peak 0.05, warmup 3, 12 steps)
  lr.<schedule>               the learning rate used at each step
  norm.<schedule>             the gradient norm before clipping at each step

Run: ~/.venv-ref/bin/python scripts/make_adamw_fixture.py   (requirements-fixtures.txt)
"""
import os

import torch
from safetensors.torch import save_file
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

OUT = os.path.join(os.path.dirname(__file__), "..", "datasets", "fixtures", "adamw")
STEPS, WARMUP, PEAK = 12, 3, 0.05

g = torch.Generator().manual_seed(3)
p0 = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(4, generator=g)}
grads = [{k: torch.randn(v.shape, generator=g) * (0.2 if s % 3 else 2.0) for k, v in p0.items()}
         for s in range(STEPS)]
out = {f"p0.{k}": v for k, v in p0.items()}
for s, gs in enumerate(grads):
    for k, v in gs.items():
        out[f"grad.{s}.{k}"] = v

for name, make in [("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup),
                   ("constant", lambda o, w, t: get_constant_schedule_with_warmup(o, w))]:
    params = {k: torch.nn.Parameter(v.clone()) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=PEAK, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    sched = make(opt, WARMUP, STEPS)
    lrs, norms = [], []
    for s in range(STEPS):
        for k, p in params.items():
            p.grad = grads[s][k].clone()
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0).item())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        for k, p in params.items():
            out[f"param.{name}.{s}.{k}"] = p.detach().clone()
    out[f"lr.{name}"] = torch.tensor(lrs, dtype=torch.float64)
    out[f"norm.{name}"] = torch.tensor(norms, dtype=torch.float64)

os.makedirs(OUT, exist_ok=True)
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "reference.safetensors"))
print(f"wrote {OUT}: cosine lrs {[round(x, 5) for x in out['lr.cosine'].tolist()]}")
