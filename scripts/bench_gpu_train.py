#!/usr/bin/env python3
"""GPU side of scripts/bench-gpu.sh: the random Qwen3-Coder-shaped checkpoints both sides load,
the HF transformers + PEFT baseline, and cuBLAS GEMM references.

  bench_gpu_train.py make-base OUT LAYERS [PRESET]
      OUT/bf16 and OUT/fp8: a random Qwen3-MoE checkpoint with the true layer shapes of PRESET
      (qwen3-coder-30b-a3b, the default) and LAYERS decoder layers. Weights N(0, 0.02²) as
      transformers' init (norms 1), per-expert tensor names as the published checkpoints; the
      fp8 copy quantizes every attention and expert projection to E4M3 with one f32 scale per
      128×128 block (weight_scale_inv = amax / 448, as Qwen3-Coder-*-FP8), keeping embeddings,
      norms, routers (mlp.gate) and lm_head in bf16 (modules_to_not_convert).
  bench_gpu_train.py peft BASE SEQ STEPS WARMUP R
      LoRA training steps as a PEFT 0.21 user on transformers 5 sets them up: bf16 model,
      r and alpha = 2r on q/k/v/o (target_modules) and the fused experts' gate_up_proj/down_proj
      (target_parameters; PEFT's default autocast_adapter_dtype keeps the adapters in f32,
      reported as adapter_dtype), torch.optim.AdamW, clip 1.0, one sequence of SEQ random ids
      per step (the same ids as `finetune bench train`), labels = ids. Prints one JSON line: step times, median tokens/s, peak memory.
  bench_gpu_train.py gemm T H I E
      cuBLAS bf16 GEMM and torch._scaled_mm FP8 (E4M3, per-tensor scale) TFLOPS for the shapes
      of one MoE layer: T tokens × top-k routed to E experts of [I, H] (gate/up) and [H, I] (down),
      plus a dense [T, H] × [H, 4096] reference. One JSON line.
"""
import json
import os
import sys
import time

import torch

PRESETS = {
    "qwen3-coder-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
                                num_key_value_heads=4, moe_intermediate_size=768, num_experts=128),
    "qwen3-coder-480b-a35b": dict(hidden_size=6144, intermediate_size=8192, num_attention_heads=96,
                                  num_key_value_heads=8, moe_intermediate_size=2560, num_experts=160),
    # Small shapes for a CPU smoke test of this script (BENCH_DEVICE=cpu).
    "smoke": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  moe_intermediate_size=128, num_experts=8, vocab_size=1024),
}
BLOCK = 128
# BENCH_DEVICE=cpu runs make-base/peft on the CPU (a smoke test of this script without a GPU).
DEV = os.environ.get("BENCH_DEVICE", "cuda")


def config(preset, layers):
    c = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=128,
             num_hidden_layers=layers, num_experts_per_tok=8, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=10000000.0,
             max_position_embeddings=262144, vocab_size=151936, tie_word_embeddings=False,
             hidden_act="silu", attention_bias=False, attention_dropout=0.0,
             use_sliding_window=False, initializer_range=0.02, output_router_logits=False,
             router_aux_loss_coef=0.0, torch_dtype="bfloat16", use_cache=False)
    c.update(PRESETS[preset])
    return c


def quantize_block_fp8(w):
    """E4M3 q and f32 scale_inv [ceil(out/128), ceil(in/128)] with w ≈ q · scale_inv per block."""
    out_f, in_f = w.shape
    ro, ci = -(-out_f // BLOCK), -(-in_f // BLOCK)
    padded = torch.zeros(ro * BLOCK, ci * BLOCK, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(ro, BLOCK, ci, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(ro * BLOCK, ci * BLOCK)[:out_f, :in_f].contiguous(), scale.contiguous()


def make_base(out, layers, preset="qwen3-coder-30b-a3b"):
    from safetensors.torch import save_file
    c = config(preset, layers)
    g = torch.Generator(device=DEV).manual_seed(0)
    h, d = c["hidden_size"], c["head_dim"]
    nh, nkv, mi, ne = c["num_attention_heads"], c["num_key_value_heads"], c["moe_intermediate_size"], c["num_experts"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=DEV) * 0.02).to(torch.bfloat16)

    bf16, fp8, not_converted = {}, {}, ["lm_head"]
    bf16["model.embed_tokens.weight"] = rnd(c["vocab_size"], h)
    bf16["lm_head.weight"] = rnd(c["vocab_size"], h)
    bf16["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=DEV)
    projections = []
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            bf16[f"{p}.{name}.weight"] = torch.ones(h, dtype=torch.bfloat16, device=DEV)
        for name in ("q_norm", "k_norm"):
            bf16[f"{p}.self_attn.{name}.weight"] = torch.ones(d, dtype=torch.bfloat16, device=DEV)
        projections += [(f"{p}.self_attn.q_proj", nh * d, h), (f"{p}.self_attn.k_proj", nkv * d, h),
                        (f"{p}.self_attn.v_proj", nkv * d, h), (f"{p}.self_attn.o_proj", h, nh * d)]
        bf16[f"{p}.mlp.gate.weight"] = rnd(ne, h)
        not_converted.append(f"{p}.mlp.gate")
        for e in range(ne):
            projections += [(f"{p}.mlp.experts.{e}.gate_proj", mi, h), (f"{p}.mlp.experts.{e}.up_proj", mi, h),
                            (f"{p}.mlp.experts.{e}.down_proj", h, mi)]
    fp8.update(bf16)
    for name, o, i in projections:
        w = rnd(o, i)
        bf16[f"{name}.weight"] = w
        q, s = quantize_block_fp8(w)
        fp8[f"{name}.weight"], fp8[f"{name}.weight_scale_inv"] = q, s
    for kind, tensors in (("bf16", bf16), ("fp8", fp8)):
        d_ = os.path.join(out, kind)
        os.makedirs(d_, exist_ok=True)
        save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(d_, "model.safetensors"))
        cfg = dict(c)
        if kind == "fp8":
            cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                              weight_block_size=[BLOCK, BLOCK],
                                              modules_to_not_convert=not_converted)
        with open(os.path.join(d_, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    n = sum(v.numel() for v in bf16.values())
    print(json.dumps(dict(out=out, layers=layers, preset=preset, parameters=n)))


class MemorySampler:
    """Peak device memory in use (cudaMemGetInfo: total − free, the whole process and context),
    sampled every 5 ms on a thread: the same measure the Rust side gets from nvidia-smi-like
    sampling in bench-gpu.sh, next to torch's own max_memory_allocated."""

    def __init__(self):
        import threading
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop and DEV == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.stop = True
        self.thread.join()


def bench_ids(seq, vocab):
    """Token t = (t · 2654435761 mod 2³²) mod vocab: the ids `finetune bench train` uses too."""
    return torch.tensor([[(t * 2654435761) % 2**32 % vocab for t in range(seq)]], device=DEV)


def peft_bench(base, seq, steps, warmup, r):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(0)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        model = Qwen3MoeForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=DEV)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, cfg)
        load = time.perf_counter() - t0
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = bench_ids(seq, model.config.vocab_size)
        times, losses = [], []
        sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
        for step in range(warmup + steps):
            sync()
            if step == warmup and DEV == "cuda":
                # The measured steps as the profiler range (tools/kernel-profile counts only
                # what runs inside it when it runs; otherwise a no-op).
                torch.cuda.profiler.start()
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sync()
            dt = time.perf_counter() - t
            losses.append(out.loss.item())
            print(f"peft: step {step + 1}/{warmup + steps} loss {losses[-1]:.4f} {dt:.3f} s {seq / dt:.0f} tokens/s"
                  + ("  (warm-up)" if step < warmup else ""), file=sys.stderr, flush=True)
            if step >= warmup:
                times.append(dt)
        if DEV == "cuda" and steps > 0:
            torch.cuda.profiler.stop()
    median = sorted(times)[len(times) // 2]
    inner = model.base_model.model.model
    print(json.dumps(dict(
        side="transformers+peft", model=base, torch=torch.__version__,
        experts_implementation=getattr(inner.config, "_experts_implementation", None),
        attn_implementation=getattr(inner.config, "_attn_implementation", None),
        adapter_dtype=str(params[0].dtype), lora_params=sum(p.numel() for p in params),
        seq=seq, rank=r, step_secs=times, median_step_secs=median, tokens_per_sec=seq / median,
        losses=losses, load_secs=load, peak_mem_in_use_bytes=mem.peak,
        torch_max_allocated_bytes=torch.cuda.max_memory_allocated() if DEV == "cuda" else None)))


def timed(fn, flops, reps=20):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return flops * reps / (time.perf_counter() - t) / 1e12


def gemm(t, h, i, e, topk=8):
    rows = t * topk // e  # tokens per expert when routing is balanced
    res = dict(tokens=t, hidden=h, moe_intermediate=i, experts=e, rows_per_expert=rows)
    x = torch.randn(rows, h, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(i, h, device=DEV, dtype=torch.bfloat16)
    res["bf16_expert_gate_tflops"] = timed(lambda: x @ w.t(), 2 * rows * h * i)
    xd = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    wd = torch.randn(4096, h, device=DEV, dtype=torch.bfloat16)
    res["bf16_dense_tflops"] = timed(lambda: xd @ wd.t(), 2 * t * h * 4096)
    one = torch.tensor(1.0, device=DEV)
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    xd8, wd8 = xd.to(torch.float8_e4m3fn), wd.to(torch.float8_e4m3fn)
    try:
        res["fp8_expert_gate_tflops"] = timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                        out_dtype=torch.bfloat16), 2 * rows * h * i)
        res["fp8_dense_tflops"] = timed(lambda: torch._scaled_mm(xd8, wd8.t(), scale_a=one, scale_b=one,
                                                                  out_dtype=torch.bfloat16), 2 * t * h * 4096)
    except Exception as err:  # noqa: BLE001 - reported, not hidden
        res["fp8_error"] = str(err)
    res["device"] = torch.cuda.get_device_name()
    print(json.dumps(res))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make-base":
        make_base(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    elif cmd == "peft":
        peft_bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif cmd == "gemm":
        gemm(*map(int, sys.argv[2:6]))
    else:
        sys.exit(__doc__)
