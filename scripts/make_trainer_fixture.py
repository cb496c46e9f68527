#!/usr/bin/env python3
"""Reference trajectory of the LoRA trainer (finetune-train), made with PyTorch and
transformers on the tiny fixture model (datasets/fixtures/tiny-qwen3-moe/bf16, loaded in f32).
Writes datasets/fixtures/trainer/reference.safetensors:

  seq.<k>.ids / .pos / .labels   four packed sequences of 2-3 documents each (random tokens, a
                                 masked prompt then target tokens per document, position ids
                                 restarting at 0, the first label of each document -100)
  init.<module>.A / .B           the starting adapter: PEFT's init (A kaiming-uniform(a=sqrt 5) =
                                 U(-1/sqrt(in), 1/sqrt(in)), B = 0), r = 4, lora_alpha = 8,
                                 on q/k/v/o and every gate/up/down (experts and dense MLP)
  losses / lrs / norms           per optimizer step (10): the loss, the learning rate and the
                                 gradient norm before clipping
  final.<module>.A / .B          the adapter after 10 steps

One optimizer step reads all four sequences (micro_batch 2 x grad_accum 2); the loss is
the sum of token cross-entropies over every target token of the step divided by their number
(each sequence's summed loss / N is backpropagated and the gradients accumulate, as transformers'
Trainer does with num_items_in_batch). Then clip_grad_norm_(1.0), torch.optim.AdamW(betas 0.9 /
0.999, eps 1e-8, weight_decay 0.01) at the learning rate of get_cosine_schedule_with_warmup
(peak 2e-2, warmup 2, 10 steps).

LoRA: y = x W^T + (alpha/r) (x A^T) B^T, passed to transformers' own modules as the adapted
weight W + (alpha/r) B A with torch.func.functional_call (the same construction as
make_fixtures.py; transformers 5 fuses experts into 3D tensors, so an expert no token reaches
gets a zero gradient, and its AdamW moments still move). Packed documents are run one at a time
(positions from 0, attention within the document) and their logits concatenated.

Run: ~/.venv-ref/bin/python scripts/make_trainer_fixture.py   (requirements-fixtures.txt)
"""
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen3MoeForCausalLM, get_cosine_schedule_with_warmup

HERE = os.path.dirname(__file__)
MODEL = os.path.join(HERE, "..", "datasets", "fixtures", "tiny-qwen3-moe", "bf16")
OUT = os.path.join(HERE, "..", "datasets", "fixtures", "trainer")
R, ALPHA, STEPS, WARMUP, PEAK, WD = 4, 8.0, 10, 2, 2e-2, 0.01

torch.manual_seed(0)
model = Qwen3MoeForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
for p in model.parameters():
    p.requires_grad_(False)
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(5)

# Four packed sequences: documents of (prompt, target) lengths.
layout = [[(9, 7), (6, 5)], [(12, 4), (3, 6), (5, 3)], [(7, 9), (8, 2)], [(4, 4), (10, 6), (2, 3)]]
seqs = []
for docs in layout:
    ids, pos, labels, parts = [], [], [], []
    for prompt, target in docs:
        d = torch.randint(0, vocab, (prompt + target,), generator=g)
        lab = d.clone()
        lab[:prompt] = -100
        parts.append(d)
        ids.append(d)
        pos.append(torch.arange(len(d)))
        labels.append(lab)
    seqs.append((torch.cat(ids), torch.cat(pos), torch.cat(labels), parts))

sd = {}
for pname, t in model.named_parameters():
    if ".mlp.experts." in pname and t.dim() == 3:
        prefix = pname.rsplit(".", 1)[0]
        for e in range(t.shape[0]):
            if pname.endswith("gate_up_proj"):
                half = t.shape[1] // 2
                sd[f"{prefix}.{e}.gate_proj"] = (half, t.shape[2])
                sd[f"{prefix}.{e}.up_proj"] = (half, t.shape[2])
            else:
                sd[f"{prefix}.{e}.down_proj"] = tuple(t.shape[1:])
    elif pname.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                         "gate_proj.weight", "up_proj.weight", "down_proj.weight")):
        sd[pname[: -len(".weight")]] = tuple(t.shape)

gl = torch.Generator().manual_seed(6)
lora = {}
for name in sorted(sd):
    out_f, in_f = sd[name]
    bound = 1.0 / in_f ** 0.5
    a = ((torch.rand(R, in_f, generator=gl) * 2 - 1) * bound).requires_grad_()
    b = torch.zeros(out_f, R).requires_grad_()
    lora[name] = (a, b)
scale = ALPHA / R
out = {}
for name, (a, b) in lora.items():
    out[f"init.{name}.A"] = a.detach().clone()
    out[f"init.{name}.B"] = b.detach().clone()


def delta(name):
    a, b = lora[name]
    return scale * (b @ a)


def adapted_params():
    params = {}
    for pname, t in model.named_parameters():
        if ".mlp.experts." in pname and t.dim() == 3:
            prefix = pname.rsplit(".", 1)[0]
            n = t.shape[0]
            if pname.endswith("gate_up_proj"):
                params[pname] = t + torch.stack([
                    torch.cat([delta(f"{prefix}.{e}.gate_proj"), delta(f"{prefix}.{e}.up_proj")])
                    for e in range(n)])
            else:
                params[pname] = t + torch.stack([delta(f"{prefix}.{e}.down_proj") for e in range(n)])
        elif pname.endswith(".weight") and pname[: -len(".weight")] in lora:
            params[pname] = t + delta(pname[: -len(".weight")])
    return params


params = [t for ab in lora.values() for t in ab]
opt = torch.optim.AdamW(params, lr=PEAK, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
sched = get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
losses, lrs, norms = [], [], []
for step in range(STEPS):
    opt.zero_grad()
    n_total = sum(int((lab[1:] >= 0).sum()) for _, _, lab, _ in seqs)
    total = 0.0
    for ids, pos, lab, parts in seqs:
        logits = torch.cat([torch.func.functional_call(model, adapted_params(), (d[None],)).logits[0]
                            for d in parts]).float()
        loss_sum = torch.nn.functional.cross_entropy(logits[:-1], lab[1:], ignore_index=-100,
                                                     reduction="sum")
        (loss_sum / n_total).backward()
        total += loss_sum.item()
    lrs.append(sched.get_last_lr()[0])
    norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
    opt.step()
    sched.step()
    losses.append(total / n_total)

for name, (a, b) in lora.items():
    out[f"final.{name}.A"] = a.detach().clone()
    out[f"final.{name}.B"] = b.detach().clone()
for k, (ids, pos, lab, _) in enumerate(seqs):
    out[f"seq.{k}.ids"] = ids.to(torch.int64)
    out[f"seq.{k}.pos"] = pos.to(torch.int64)
    out[f"seq.{k}.labels"] = lab.to(torch.int64)
out["losses"] = torch.tensor(losses, dtype=torch.float64)
out["lrs"] = torch.tensor(lrs, dtype=torch.float64)
out["norms"] = torch.tensor(norms, dtype=torch.float64)
os.makedirs(OUT, exist_ok=True)
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "reference.safetensors"))
print("losses", " ".join(f"{x:.6f}" for x in losses))
print("norms", " ".join(f"{x:.4f}" for x in norms))
