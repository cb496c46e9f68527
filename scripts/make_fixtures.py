#!/usr/bin/env python3
"""Reference fixtures for finetune-model, made with Hugging Face transformers (the independent
reference). Writes datasets/fixtures/tiny-qwen3-moe/:

  bf16/       config.json + model.safetensors: a tiny Qwen3MoeForCausalLM, seed 0, stored in
              bf16 (3 layers, the last one dense through mlp_only_layers; dimensions that are
              not multiples of 128 so that FP8 blocks are partial)
  fp8/        the same weights with every decoder linear quantized to FP8 E4M3 with one scale per
              128x128 block (`weight_scale_inv`, the Qwen3-Coder-*-FP8 layout); router gates,
              norms, embeddings and lm_head stay bf16 (modules_to_not_convert)
  yarn-config.json
              the bf16 model's config with YaRN RoPE scaling (factor 4, original 64 positions)
  reference.safetensors
              input_ids / position_ids / labels of two packed documents, and, computed in f32:
              logits (bf16 weights), logits_fp8 (dequantized FP8 weights), loss (mean over labels
              != -100, shifted as in transformers); LoRA r=4 on every target (q/k/v/o, and
              gate/up/down of every expert and of the dense MLP) with random A and non-zero B:
              `lora.<module>.A|B`, logits_lora, loss_lora and the gradients `grad.<module>.A|B`;
              logits_yarn (bf16 weights under yarn-config.json); train_losses: the loss before
              each of 10 steps of clip_grad_norm_(1.0) + AdamW(lr 1e-2) on all A and B

LoRA reference: the adapted weight W + (alpha/r)·B·A is built from leaf tensors A, B and passed
to transformers' own module code with torch.func.functional_call, so the gradients are those of
y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ through transformers' forward (PEFT's LoRA layer computes the same
function; transformers >= 5 fuses experts into 3D parameters that PEFT adapts through
`target_parameters`, which this avoids depending on).

Packed documents are the reference's job too: each document is run on its own (positions from
0, attention inside the document) and the logits concatenated, which is exactly what per-document
masking with restarting position ids must give.

Run:  python3 -m venv ~/.venv-ref && ~/.venv-ref/bin/pip install -r scripts/requirements-fixtures.txt
      ~/.venv-ref/bin/python scripts/make_fixtures.py
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "datasets", "fixtures", "tiny-qwen3-moe")
BLOCK = 128
E4M3_MAX = 448.0

CONFIG = dict(
    vocab_size=300,
    hidden_size=160,
    intermediate_size=272,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=40,
    hidden_act="silu",
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    use_sliding_window=False,
    decoder_sparse_step=1,
    moe_intermediate_size=136,
    num_experts_per_tok=2,
    num_experts=4,
    norm_topk_prob=True,
    mlp_only_layers=[2],
    router_aux_loss_coef=0.0,
)

NOT_CONVERTED = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight")


def quantize_block_fp8(w):
    """W [out, in] -> (q float8_e4m3fn [out, in], scale_inv f32 [ceil(out/128), ceil(in/128)])
    with W ~= q * scale_inv[i // 128, j // 128]."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // BLOCK), -(-in_f // BLOCK)
    scale = torch.empty(rows, cols, dtype=torch.float32)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            blk = w[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK].float()
            s = max(blk.abs().max().item() / E4M3_MAX, 1e-12)
            scale[r, c] = s
            q[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q, scale):
    full = scale.repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.float() * full


def per_expert_state_dict(model):
    """The checkpoint layout on disk: one tensor per expert projection, as the published
    Qwen3-Coder checkpoints store them (transformers >= 5 fuses experts at load time)."""
    sd = {}
    for name, t in model.state_dict().items():
        if ".mlp.experts." in name and name.endswith(("gate_up_proj", "down_proj")) and t.dim() == 3:
            prefix = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = t[e].chunk(2, dim=0)
                    sd[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                    sd[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
                else:
                    sd[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            sd[name] = t.contiguous()
    return sd


def main():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**CONFIG)
    model = Qwen3MoeForCausalLM(config).eval()
    # Round weights to bf16 once: the f32 reference then uses exactly the stored values.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        # Non-trivial norm weights, so that a norm that is skipped or misplaced shows.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1.0 + 0.1 * torch.randn_like(p)).to(torch.bfloat16).float())

    sd = per_expert_state_dict(model)
    os.makedirs(os.path.join(OUT, "bf16"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "fp8"), exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()},
              os.path.join(OUT, "bf16", "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", torch_dtype="bfloat16")
    with open(os.path.join(OUT, "bf16", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)

    fp8 = {}
    deq = {}
    for k, v in sd.items():
        if k.startswith("model.layers.") and k.endswith("_proj.weight") and not any(n in k for n in NOT_CONVERTED):
            q, s = quantize_block_fp8(v)
            fp8[k] = q
            fp8[k.replace(".weight", ".weight_scale_inv")] = s
            deq[k] = dequantize(q, s)
        else:
            fp8[k] = v.to(torch.bfloat16)
            deq[k] = v
    save_file(fp8, os.path.join(OUT, "fp8", "model.safetensors"), metadata={"format": "pt"})
    cfg8 = dict(cfg)
    cfg8["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                       weight_block_size=[BLOCK, BLOCK],
                                       modules_to_not_convert=["lm_head", "mlp.gate"])
    with open(os.path.join(OUT, "fp8", "config.json"), "w") as f:
        json.dump(cfg8, f, indent=2, sort_keys=True)

    # Two packed documents; the first token of each document has no label, as in packing.
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, CONFIG["vocab_size"], (n,), generator=g) for n in (37, 29)]
    input_ids = torch.cat(docs)
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])
    labels = input_ids.clone()
    labels[len(docs[0])] = -100  # the next document's first token is not predicted from the last
    labels[3] = -100             # a masked prompt token

    def packed_logits(m):
        with torch.no_grad():
            return torch.cat([m(d[None]).logits[0] for d in docs]).float()

    logits = packed_logits(model)
    # Loss as transformers computes it: predict token t+1 from t, ignore -100, mean.
    shift_logits, shift_labels = logits[:-1], labels[1:]
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

    model_fp8 = Qwen3MoeForCausalLM(config).eval()
    fused = {}
    with torch.no_grad():
        for name, t in model_fp8.state_dict().items():
            if ".mlp.experts." in name and t.dim() == 3:
                prefix = name.rsplit(".", 1)[0]
                if name.endswith("gate_up_proj"):
                    fused[name] = torch.stack([torch.cat([deq[f"{prefix}.{e}.gate_proj.weight"],
                                                          deq[f"{prefix}.{e}.up_proj.weight"]])
                                               for e in range(t.shape[0])])
                else:
                    fused[name] = torch.stack([deq[f"{prefix}.{e}.down_proj.weight"] for e in range(t.shape[0])])
            else:
                fused[name] = deq[name]
        model_fp8.load_state_dict(fused)
    logits_fp8 = packed_logits(model_fp8)

    # The per-expert layout written above is what transformers itself loads.
    reloaded = Qwen3MoeForCausalLM.from_pretrained(os.path.join(OUT, "bf16"), dtype=torch.float32).eval()
    diff = (packed_logits(reloaded) - logits).abs().max().item()
    assert diff == 0.0, f"transformers reads the written checkpoint differently: {diff}"

    # LoRA on every target with non-zero B, so every A and B gets a gradient.
    r, alpha = 4, 8.0
    scale = alpha / r
    gl = torch.Generator().manual_seed(2)
    targets = []
    for k, v in sd.items():
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                       "gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            targets.append((k[: -len(".weight")], v.shape))
    lora = {}
    for name, (out_f, in_f) in targets:
        bound = 1.0 / in_f ** 0.5
        a = (torch.rand(r, in_f, generator=gl) * 2 - 1) * bound
        b = torch.randn(out_f, r, generator=gl) * 0.05
        lora[name] = (a.requires_grad_(), b.requires_grad_())

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

    lora_logits = []
    for d in docs:
        out = torch.func.functional_call(model, adapted_params(), (d[None],))
        lora_logits.append(out.logits[0].float())
    lora_logits = torch.cat(lora_logits)
    loss_lora = torch.nn.functional.cross_entropy(lora_logits[:-1], labels[1:], ignore_index=-100)
    loss_lora.backward()
    lora_tensors = {}
    for name, (a, b) in lora.items():
        assert a.grad is not None and a.grad.abs().max() > 0, f"no gradient for {name}.A"
        assert b.grad is not None and b.grad.abs().max() > 0, f"no gradient for {name}.B"
        lora_tensors[f"lora.{name}.A"] = a.detach().clone().contiguous()
        lora_tensors[f"lora.{name}.B"] = b.detach().clone().contiguous()
        lora_tensors[f"grad.{name}.A"] = a.grad.contiguous()
        lora_tensors[f"grad.{name}.B"] = b.grad.contiguous()

    # Ten training steps on the packed batch: clip_grad_norm_(1.0) + AdamW (lr 1e-2, wd 0)
    # on every A and B, starting from the adapters above; the loss before each step.
    params = [t for ab in lora.values() for t in ab]
    for t in params:
        t.grad = None
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    train_losses = []
    for _ in range(10):
        opt.zero_grad()
        logits_s = torch.cat([torch.func.functional_call(model, adapted_params(), (d[None],)).logits[0].float()
                              for d in docs])
        loss_s = torch.nn.functional.cross_entropy(logits_s[:-1], labels[1:], ignore_index=-100)
        loss_s.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_losses.append(loss_s.item())

    # YaRN: the same weights under a YaRN-scaled RoPE (config written next to the fixtures).
    yarn_cfg = dict(CONFIG)
    yarn_cfg["rope_scaling"] = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                    rope_theta=CONFIG["rope_theta"])
    config_yarn = Qwen3MoeConfig(**yarn_cfg)
    model_yarn = Qwen3MoeForCausalLM(config_yarn).eval()
    model_yarn.load_state_dict(model.state_dict())
    logits_yarn = packed_logits(model_yarn)
    cfgy = config_yarn.to_dict()
    cfgy.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", torch_dtype="bfloat16")
    with open(os.path.join(OUT, "yarn-config.json"), "w") as f:
        json.dump(cfgy, f, indent=2, sort_keys=True)

    save_file({
        **lora_tensors,
        "logits_yarn": logits_yarn.contiguous(),
        "train_losses": torch.tensor(train_losses, dtype=torch.float64),
        "lora_scale": torch.tensor([scale]),
        "logits_lora": lora_logits.detach().contiguous(),
        "loss_lora": loss_lora.detach().reshape(1).float(),
        "input_ids": input_ids.to(torch.int64),
        "position_ids": position_ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": logits.contiguous(),
        "logits_fp8": logits_fp8.contiguous(),
        "loss": loss.reshape(1).float(),
    }, os.path.join(OUT, "reference.safetensors"))
    import transformers
    print(f"wrote {OUT} (torch {torch.__version__}, transformers {transformers.__version__}); "
          f"loss {loss.item():.6f}; fp8 vs bf16 logits max diff {(logits - logits_fp8).abs().max().item():.4f}")


if __name__ == "__main__":
    sys.exit(main())
