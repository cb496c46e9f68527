//! Helpers shared by the integration tests that compare two computation paths on whole models
//! (moe_manual, attention_manual, moe_bf16): loading a checkpoint, deterministic values, r = 4
//! adapters with A and B both non-zero, and the difference measures.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use finetune_model::{Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::Path;

/// The checkpoint in `dir` (its `config.json` and weights), on the CPU.
pub fn load(dir: &Path) -> Qwen3Moe {
    load_from(&dir.join("config.json"), dir)
}

/// A checkpoint whose configuration file lies apart from its weights, on the CPU.
pub fn load_from(config: &Path, weights: &Path) -> Qwen3Moe {
    let config = Qwen3MoeConfig::from_file(config).unwrap();
    let weights = Weights::open(weights, &Device::Cpu).unwrap();
    Qwen3Moe::load(config, &weights, &Device::Cpu).unwrap()
}

/// Deterministic values in about [−1, 1) (a hash of the index).
pub fn values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D);
            z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 29;
            ((z % 20_000) as f32 / 10_000.0) - 1.0
        })
        .collect()
}

/// r = 4 adapters on every target with A and B both non-zero (a fresh PEFT B = 0 would leave
/// every dA zero), expert adapters stacked as `Lora` keeps them.
pub fn adapters(model: &Qwen3Moe) -> Lora {
    adapters_where(model, |_| true)
}

/// [`adapters`] on the targets `keep` accepts only (each target's values as in [`adapters`]).
pub fn adapters_where(model: &Qwen3Moe, keep: impl Fn(&str) -> bool) -> Lora {
    let r = 4;
    let tensors = model
        .lora_targets()
        .into_iter()
        .enumerate()
        .filter(|(_, (name, _, _))| keep(name))
        .map(|(i, (name, out, inp))| {
            let t = |shape: (usize, usize), salt: u64, scale: f32| {
                let v = values(shape.0 * shape.1, salt)
                    .iter()
                    .map(|v| v * scale)
                    .collect();
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
            };
            let a = t((r, inp), 2 * i as u64 + 1, 1.0 / (inp as f32).sqrt());
            let b = t((out, r), 2 * i as u64 + 2, 0.05);
            (name, a, b)
        });
    Lora::from_tensors(r, 2.0, tensors).unwrap()
}

/// max |t|, in f32 whatever t's dtype.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// max |a − b| / max |b|, the difference taken in f32.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    max_abs(&d) / max_abs(b).max(f32::MIN_POSITIVE)
}
