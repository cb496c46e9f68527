//! What one decoder layer's attention half keeps for its backward, and its time, per attention
//! path (`chain`: autograd ops; `manual`: finetune_kernels::attention_block), on the CPU: a
//! random checkpoint with a preset's true attention shapes (default Qwen3-Coder-30B-A3B:
//! hidden 2048, 32 query heads and 4 key/value heads of 128), one layer (4 small experts: the
//! MLP is not run), LoRA r = 16 on q, k, v and o with non-zero B, packed documents of 256
//! tokens, `Qwen3Moe::attention_forward` (input norm to residual add).
//!
//! Bytes are counted by a global allocator that tracks the heap bytes live (every CPU tensor's
//! storage is one heap allocation; the node's saved activations and the attention's
//! logsumexps included): "kept" = live after the forward (the output and the loss alive, so the
//! graph and everything it holds) minus live before it; "peak" = the most live at any moment of
//! forward + backward, minus live before. In f32 the CPU chain runs each adapted projection as
//! one fused `lora_linear` op; in bf16 (a GPU's compute dtype, emulated) it runs the GPU's ops
//! (frozen GEMM, f32 LoRA path, casts), so bf16 shows what the chain keeps on a GPU. Times are
//! wall-clock seconds on this machine's CPU (compare paths, not devices).
//!
//!   cargo run --release -p finetune-model --example attention_memory -- [TOKENS] [DTYPES] [PRESET]
//!   (defaults: 512, f32,bf16, qwen3-coder-30b-a3b)

use candle_core::{DType, Device, Tensor, Var};
use finetune_model::model::AttentionPath;
use finetune_model::{Lora, Preset, Qwen3Moe, Weights};
use std::sync::atomic::Ordering;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{mib, LIVE, PEAK};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokens: usize = args.first().map_or(Ok(512), |a| a.parse())?;
    let dtypes = args.get(1).map_or("f32,bf16", String::as_str);
    let preset = args.get(2).map_or("qwen3-coder-30b-a3b", String::as_str);
    let mut config = preset
        .parse::<Preset>()
        .map_err(|e| format!("preset {preset}: {e}"))?
        .config();
    config.num_hidden_layers = 1;
    config.vocab_size = 4096;
    config.num_experts = 4;
    config.num_experts_per_tok = 2;
    let dir = tempfile::tempdir()?;
    finetune_model::init::write_random_checkpoint(&config, 1, dir.path())?;
    let weights = Weights::open(dir.path(), &Device::Cpu)?;
    let mut model = Qwen3Moe::load(config.clone(), &weights, &Device::Cpu)?;
    let r = 16;
    let lora = Lora::from_tensors(
        r,
        2.0,
        model
            .lora_targets()
            .into_iter()
            .filter(|(name, _, _)| name.contains("self_attn."))
            .map(|(name, out, inp)| {
                let a = (Tensor::rand(-1f32, 1f32, (r, inp), &Device::Cpu).unwrap()
                    / (inp as f64).sqrt())
                .unwrap();
                let b =
                    (Tensor::rand(-1f32, 1f32, (out, r), &Device::Cpu).unwrap() * 0.01).unwrap();
                (name, a, b)
            }),
    )?;
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|t| t.wrapping_mul(2_654_435_761) % config.vocab_size as u32)
        .collect();
    // Documents of 256 tokens (the last one shorter).
    let pos: Vec<u32> = (0..tokens as u32).map(|t| t % 256).collect();
    for dtype_name in dtypes.split(',') {
        let dtype = match dtype_name {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            other => return Err(format!("dtype {other}: expected f32 or bf16").into()),
        };
        model.set_compute_dtype(dtype)?;
        let ctx = model.sequence_context(&pos, 0)?;
        let x = Var::from_tensor(&model.embed_tokens(&ids)?)?;
        let upstream = Tensor::rand(-1f32, 1f32, (tokens, config.hidden_size), &Device::Cpu)?
            .to_dtype(dtype)?;
        for name in ["chain", "manual"] {
            let path = AttentionPath::from_name(name).ok_or("unknown attention path")?;
            model.set_attention_path(path);
            for attempt in 0..2 {
                let before = LIVE.load(Ordering::Relaxed);
                PEAK.store(before, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let h = model.attention_forward(0, x.as_tensor(), &ctx, Some(&lora), None)?;
                let loss = (&h * &upstream)?.to_dtype(DType::F32)?.sum_all()?;
                let forward = started.elapsed().as_secs_f64();
                let kept = LIVE.load(Ordering::Relaxed) - before;
                let started = std::time::Instant::now();
                let grads = loss.backward()?;
                let backward = started.elapsed().as_secs_f64();
                let peak = PEAK.load(Ordering::Relaxed) - before;
                let dx = grads
                    .get(x.as_tensor())
                    .ok_or("no gradient reached x")?
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    .sqrt();
                drop((grads, loss, h));
                // The first attempt warms caches and thread pools; report the second.
                if attempt == 1 {
                    println!(
                        "{{\"path\": \"{name}\", \"dtype\": \"{dtype_name}\", \"preset\": \"{preset}\", \"tokens\": {tokens}, \"kept_mib\": {:.2}, \"kept_bytes_per_token\": {}, \"peak_mib\": {:.1}, \"forward_secs\": {forward:.3}, \"backward_secs\": {backward:.3}, \"dx_norm\": {dx:.6}}}",
                        mib(kept),
                        kept / tokens,
                        mib(peak)
                    );
                }
            }
        }
    }
    Ok(())
}
