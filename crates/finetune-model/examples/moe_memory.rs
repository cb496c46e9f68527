//! What one MoE decoder layer keeps for its backward, and its time, per MoE path, on the CPU:
//! a random checkpoint with a preset's true layer shapes (default Qwen3-Coder-30B-A3B: hidden
//! 2048, 128 experts of 768, top-8), one layer, a small vocabulary (the head is not part of the
//! measurement), LoRA r = 16 on attention and experts with non-zero B.
//!
//! Bytes are counted by a global allocator that tracks the heap bytes live (every CPU tensor's
//! storage is one heap allocation): "kept" = live after the forward (the layer output and loss
//! alive, so the graph and everything it holds) minus live before it; "peak" = the most live
//! at any moment of forward + backward, minus live before. Times are wall-clock seconds on this
//! machine's CPU (the CPU kernels are references, not tuned: compare paths, not devices).
//!
//!   cargo run --release -p finetune-model --example moe_memory -- [TOKENS] [PRESET] [PATHS]
//!   (defaults: 256, qwen3-coder-30b-a3b, grouped,grouped-manual; the checkpoint is written
//!   once into $MOE_MEMORY_DIR or a temporary directory)

use candle_core::{Device, Tensor, Var};
use finetune_model::model::MoePath;
use finetune_model::{Lora, Preset, Qwen3Moe, Weights};
use std::sync::atomic::Ordering;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{mib, LIVE, PEAK};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokens: usize = args.first().map_or(Ok(256), |a| a.parse())?;
    let preset = args.get(1).map_or("qwen3-coder-30b-a3b", String::as_str);
    let paths = args.get(2).map_or("grouped,grouped-manual", String::as_str);
    let mut config = preset
        .parse::<Preset>()
        .map_err(|e| format!("preset {preset}: {e}"))?
        .config();
    config.num_hidden_layers = 1;
    config.vocab_size = 4096;
    let tmp = tempfile::tempdir()?;
    let dir = std::env::var("MOE_MEMORY_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "writing a random 1-layer {preset} checkpoint into {}",
            dir.display()
        );
        finetune_model::init::write_random_checkpoint(&config, 1, &dir)?;
    }
    let weights = Weights::open(&dir, &Device::Cpu)?;
    let mut model = Qwen3Moe::load(config.clone(), &weights, &Device::Cpu)?;
    let r = 16;
    let targets = model.lora_targets();
    let lora = Lora::from_tensors(
        r,
        2.0,
        targets.iter().map(|(name, out, inp)| {
            let a = (Tensor::rand(-1f32, 1f32, (r, *inp), &Device::Cpu).unwrap()
                / (*inp as f64).sqrt())
            .unwrap();
            let b = (Tensor::rand(-1f32, 1f32, (*out, r), &Device::Cpu).unwrap() * 0.01).unwrap();
            (name.clone(), a, b)
        }),
    )?;
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|t| t.wrapping_mul(2_654_435_761) % config.vocab_size as u32)
        .collect();
    let pos: Vec<u32> = (0..tokens as u32).collect();
    let ctx = model.sequence_context(&pos, 0)?;
    let x = Var::from_tensor(&model.embed_tokens(&ids)?)?;
    let upstream = Tensor::rand(-1f32, 1f32, (tokens, config.hidden_size), &Device::Cpu)?;
    for name in paths.split(',') {
        let path = MoePath::from_name(name).ok_or_else(|| format!("unknown MoE path {name}"))?;
        model.set_moe_path(path);
        for attempt in 0..2 {
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let y = model.layer_forward(0, x.as_tensor(), &ctx, Some(&lora), None)?;
            let loss = (&y * &upstream)?.sum_all()?;
            let forward = started.elapsed().as_secs_f64();
            let kept = LIVE.load(Ordering::Relaxed) - before;
            let started = std::time::Instant::now();
            let grads = loss.backward()?;
            let backward = started.elapsed().as_secs_f64();
            let peak = PEAK.load(Ordering::Relaxed) - before;
            let dx = grads
                .get(x.as_tensor())
                .ok_or("no gradient reached x")?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?
                .sqrt();
            drop((grads, loss, y));
            // The first attempt warms caches and thread pools; report the second.
            if attempt == 1 {
                println!(
                    "{{\"path\": \"{name}\", \"preset\": \"{preset}\", \"tokens\": {tokens}, \"slots\": {}, \"kept_mib\": {:.1}, \"peak_mib\": {:.1}, \"forward_secs\": {forward:.3}, \"backward_secs\": {backward:.3}, \"dx_norm\": {dx:.6}}}",
                    tokens * config.num_experts_per_tok,
                    mib(kept),
                    mib(peak)
                );
            }
        }
    }
    Ok(())
}
