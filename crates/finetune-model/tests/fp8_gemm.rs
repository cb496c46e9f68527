//! The opt-in FP8 tensor-core GEMM in the model (`FINETUNE_FP8_GEMM=1`, here
//! `finetune_kernels::fp8_linear::set_enabled`), on the CPU where its reference runs: a tiny
//! model whose projections are FP8 block-128 gives nearly the same loss and LoRA gradients with
//! activations quantized to FP8 as without, but not the same (the path is taken), and a weight
//! the GEMM cannot take keeps today's path exactly.
//!
//! Its own test binary: the switch is process-wide.

use candle_core::{DType, Device, Tensor};
use finetune_model::{init, Lora, Preset, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::Path;

/// A random checkpoint of `config` in `dir` with every projection in FP8 block-128.
fn write_fp8_checkpoint(config: &Qwen3MoeConfig, dir: &Path) {
    init::write_random_checkpoint(config, 5, dir).unwrap();
    let path = dir.join("model.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let (proj, rest): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(n, _)| n.ends_with("_proj.weight"));
    let mut out = finetune_model::fp8::quantize(&proj).unwrap();
    out.extend(rest);
    candle_core::safetensors::save(&out, &path).unwrap();
}

/// Loss and the LoRA gradients (A and B of every adapter, flattened in order).
fn loss_and_grads(model: &Qwen3Moe, lora: &Lora, ids: &[u32]) -> (f32, Vec<f32>) {
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let logits = model.forward_with(ids, &positions, Some(lora)).unwrap();
    let loss = Qwen3Moe::loss_tensor(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    let mut g = Vec::new();
    for v in lora.vars() {
        let t = grads
            .get(v.as_tensor())
            .cloned()
            .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap());
        g.extend(
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    (loss.to_scalar::<f32>().unwrap(), g)
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[test]
fn fp8_gemm_changes_the_numerics_slightly_and_only_where_it_applies() {
    // The tiny preset's shapes are multiples of 128 (hidden 128, experts 128, q 4×32) and 16
    // (k/v 2×32): every projection qualifies.
    let mut config = Preset::Tiny.config();
    config.num_hidden_layers = 2;
    config.vocab_size = 512;
    let dir = tempfile::tempdir().unwrap();
    write_fp8_checkpoint(&config, dir.path());
    let weights = Weights::open(dir.path(), &Device::Cpu).unwrap();
    let model = Qwen3Moe::load(config.clone(), &weights, &Device::Cpu).unwrap();
    let modules: Vec<String> = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
        .map(String::from)
        .to_vec();
    let lora = Lora::init(&model.lora_targets(), &modules, 4, 2.0, 7, &Device::Cpu).unwrap();
    // Non-zero B (`[.., out, r]`), so that every adapter's A gets a gradient too.
    for v in lora.vars() {
        if v.as_tensor().dims().last() == Some(&4) {
            let t = v.as_tensor();
            v.set(&(Tensor::ones_like(t).unwrap() * 0.01).unwrap())
                .unwrap();
        }
    }
    let ids: Vec<u32> = (0..48u32).map(|i| (i * 37 + 11) % 512).collect();

    finetune_kernels::fp8_linear::set_enabled(false);
    let (l0, g0) = loss_and_grads(&model, &lora, &ids);
    finetune_kernels::fp8_linear::set_enabled(true);
    let (l1, g1) = loss_and_grads(&model, &lora, &ids);
    finetune_kernels::fp8_linear::set_enabled(false);
    eprintln!(
        "loss {l0} (dequantized weights) vs {l1} (FP8 GEMM); LoRA gradients rel diff {:e}",
        rel(&g1, &g0)
    );
    assert!(l0.is_finite() && l1.is_finite());
    // The activations' FP8 round trip (≤ 2⁻⁴ relative per element, mostly far less) moves the
    // loss a little and the gradients by a few percent at most.
    assert_ne!(l0, l1, "the FP8 path was not taken");
    assert!((l0 - l1).abs() < 1e-2 * l0.abs(), "{l0} vs {l1}");
    assert!(g0.iter().any(|v| *v != 0.0));
    let d = rel(&g1, &g0);
    assert!(d > 0.0 && d < 0.1, "LoRA gradients differ by {d}");

    // A model whose shapes the GEMM cannot take (hidden 160: not a multiple of 128) keeps
    // today's path: the same loss with the switch on.
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe/fp8");
    let config = Qwen3MoeConfig::from_file(&fixture.join("config.json")).unwrap();
    let weights = Weights::open(&fixture, &Device::Cpu).unwrap();
    let model = Qwen3Moe::load(config.clone(), &weights, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 300).collect();
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let run = || {
        model
            .forward(&ids, &positions)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let off = run();
    finetune_kernels::fp8_linear::set_enabled(true);
    let on = run();
    finetune_kernels::fp8_linear::set_enabled(false);
    assert_eq!(off, on);
}
