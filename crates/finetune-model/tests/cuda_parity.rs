//! The forward and LoRA backward on a CUDA GPU against Hugging Face transformers, as
//! tests/parity.rs does on the CPU: logits of the bf16 and FP8 block-128 fixtures, the loss,
//! and the gradient of every LoRA A and B (datasets/fixtures/tiny-qwen3-moe). The model runs in
//! f32 on the GPU, weights kept in their stored precision there. Each test prints its max abs
//! diffs and skips, saying so, where no GPU is visible.
//!
//! Runs on a GPU machine from a test executable built with `--features cuda`
//! (scripts/device-run.sh build-tests finetune-model), with the repository root as the current
//! directory when the build path is not there.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use finetune_model::model::MoePath;
use finetune_model::{Qwen3Moe, Qwen3MoeConfig, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FIXTURE: &str = "datasets/fixtures/tiny-qwen3-moe";

/// The fixtures under the source tree this was built from, else under the current directory.
fn fixtures() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(FIXTURE);
    if built.is_dir() {
        built
    } else {
        PathBuf::from(".").join(FIXTURE)
    }
}

/// The first GPU, or `None` (with a message) where there is none.
fn gpu(test: &str) -> Option<Device> {
    match finetune_kernels::device::cuda_devices() {
        Ok(gpus) if !gpus.is_empty() => match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("{test}: skipped: cannot open cuda:0: {e}");
                None
            }
        },
        other => {
            eprintln!("{test}: skipped: no CUDA device ({other:?})");
            None
        }
    }
}

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(dir: &Path, device: &Device) -> Qwen3Moe {
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(dir, device).unwrap();
    Qwen3Moe::load(config, &weights, device).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn host(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    host(t)
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// max |a − b|, `a` on any device, `b` on the CPU.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(host(a) - b).unwrap())
}

/// The base weights are on the GPU in their stored dtype.
#[test]
fn cuda_weights_stay_in_stored_precision_on_the_gpu() {
    let Some(dev) = gpu("cuda_weights_stay_in_stored_precision_on_the_gpu") else {
        return;
    };
    for (fixture, want) in [("bf16", DType::BF16), ("fp8", DType::U8)] {
        let dir = fixtures().join(fixture);
        let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
        let (out, inp) = (
            config.num_attention_heads * config.head_dim(),
            config.hidden_size,
        );
        let q_proj = "model.layers.0.self_attn.q_proj";
        let w = Weights::open(&dir, &dev)
            .unwrap()
            .base_weight(q_proj, out, inp)
            .unwrap();
        let t = match &w {
            finetune_model::BaseWeight::Dense(t) => t,
            finetune_model::BaseWeight::Fp8 { q, .. } => q,
        };
        assert!(t.device().is_cuda(), "{fixture}: weight not on the GPU");
        assert_eq!(t.dtype(), want, "{fixture}");
        // Dequantized on the GPU equals dequantized on the CPU.
        let wc = Weights::open(&dir, &Device::Cpu)
            .unwrap()
            .base_weight(q_proj, out, inp)
            .unwrap();
        let diff = max_abs_diff(
            &w.dequantize(DType::F32).unwrap(),
            &wc.dequantize(DType::F32).unwrap(),
        );
        eprintln!("{fixture}: q_proj dequantized on GPU vs CPU: max abs diff {diff:e}");
        assert_eq!(diff, 0.0, "{fixture}");
    }
}

#[test]
fn cuda_bf16_logits_and_loss_match_transformers() {
    let Some(dev) = gpu("cuda_bf16_logits_and_loss_match_transformers") else {
        return;
    };
    let r = reference();
    let model = load(&fixtures().join("bf16"), &dev);
    let logits = model
        .forward(&ids(&r["input_ids"]), &ids(&r["position_ids"]))
        .unwrap();
    assert!(logits.device().is_cuda());
    let diff = max_abs_diff(&logits, &r["logits"]);
    eprintln!("cuda bf16 checkpoint, f32 compute: logits max abs diff {diff:e}");
    let labels = r["labels"].to_vec1::<i64>().unwrap();
    let loss = Qwen3Moe::loss(&logits, &labels).unwrap();
    let loss_t = Qwen3Moe::loss_tensor(&logits, &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    eprintln!(
        "cuda loss {loss} (loss_tensor {loss_t}) vs {want}: diff {:e} ({:e})",
        (loss - want).abs(),
        (loss_t - want).abs()
    );
    assert!(diff <= 1e-4, "logits differ by {diff}");
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");
    assert!(
        (loss_t - want).abs() <= 1e-5,
        "loss_tensor {loss_t} vs {want}"
    );
}

#[test]
fn cuda_fp8_block_logits_match_transformers_on_dequantized_weights() {
    let Some(dev) = gpu("cuda_fp8_block_logits_match_transformers_on_dequantized_weights") else {
        return;
    };
    let r = reference();
    let model = load(&fixtures().join("fp8"), &dev);
    let logits = model
        .forward(&ids(&r["input_ids"]), &ids(&r["position_ids"]))
        .unwrap();
    let diff = max_abs_diff(&logits, &r["logits_fp8"]);
    eprintln!("cuda fp8 checkpoint, f32 compute: logits max abs diff {diff:e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");
    // And FP8 really changed something (the blocks are not a no-op).
    assert!(max_abs_diff(&logits, &r["logits"]) > 1e-3);
}

/// LoRA r=4 on every target with the reference's A and non-zero B, on the GPU: logits, loss
/// and the gradient of every A and B against transformers' autograd.
#[test]
fn cuda_lora_logits_loss_and_gradients_match_transformers() {
    let Some(dev) = gpu("cuda_lora_logits_loss_and_gradients_match_transformers") else {
        return;
    };
    let r = reference();
    let mut model = load(&fixtures().join("bf16"), &dev);
    let targets = model.lora_targets();
    assert_eq!(targets.len(), 3 * 4 + 2 * 4 * 3 + 3);
    let scale = r["lora_scale"].to_vec1::<f32>().unwrap()[0] as f64;
    let on_gpu = |name: &str| r[name].to_device(&dev).unwrap();
    let lora = finetune_model::Lora::from_tensors(
        4,
        scale,
        targets.iter().map(|(name, _, _)| {
            (
                name.clone(),
                on_gpu(&format!("lora.{name}.A")),
                on_gpu(&format!("lora.{name}.B")),
            )
        }),
    )
    .unwrap();
    // The GPU default (grouped: the stacked adapters used as they are), the same as one node
    // with a hand-written backward (grouped-manual) and the per-expert reference (each expert
    // on slices of the stacks, `Lora::expert_slices`' CUDA copy).
    for path in [MoePath::Grouped, MoePath::GroupedManual, MoePath::PerExpert] {
        model.set_moe_path(path);
        eprintln!("{path:?}:");
        let logits = model
            .forward_with(&ids(&r["input_ids"]), &ids(&r["position_ids"]), Some(&lora))
            .unwrap();
        let diff = max_abs_diff(&logits, &r["logits_lora"]);
        eprintln!("cuda LoRA logits max abs diff {diff:e}");
        let labels = r["labels"].to_vec1::<i64>().unwrap();
        let loss = Qwen3Moe::loss_tensor(&logits, &labels).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        let want = r["loss_lora"].to_vec1::<f32>().unwrap()[0];
        eprintln!(
            "cuda LoRA loss {got} vs {want}: diff {:e}",
            (got - want).abs()
        );

        let grads = loss.backward().unwrap();
        let (mut worst_rel, mut worst_abs) = ((0f32, String::new()), 0f32);
        for (name, _, _) in &targets {
            // Per module: an expert's slice of its stack's gradient.
            let (ga, gb) = lora
                .module_grads(&grads, name)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            for (which, g) in [("A", &ga), ("B", &gb)] {
                assert!(
                    g.device().is_cuda(),
                    "{name}.{which}: gradient not on the GPU"
                );
                let want = &r[&format!("grad.{name}.{which}")];
                let scale = max_abs(want);
                assert!(
                    scale > 0.0,
                    "{name}.{which}: the reference gradient is zero"
                );
                let abs = max_abs_diff(g, want);
                worst_abs = worst_abs.max(abs);
                if abs / scale > worst_rel.0 {
                    worst_rel = (abs / scale, format!("{name}.{which}"));
                }
                assert!(max_abs(g) > 0.0, "{name}.{which}: zero gradient");
            }
        }
        eprintln!(
            "cuda LoRA gradients ({} tensors): max abs diff {worst_abs:e}, worst relative error {:e} \
             ({})",
            targets.len() * 2,
            worst_rel.0,
            worst_rel.1
        );
        assert!(diff <= 1e-4, "LoRA logits differ by {diff}");
        assert!((got - want).abs() <= 1e-5, "loss {got} vs {want}");
        assert!(
            worst_rel.0 <= 1e-4,
            "gradient of {} off by {} relative",
            worst_rel.1,
            worst_rel.0
        );
    }
}

/// bf16 compute (`set_compute_dtype(BF16)`, transformers' bf16 path with f32 LoRA) against
/// the f32 reference: the loss within 1e-2, logits within 10% of the largest logit, and the
/// gradient of all LoRA tensors together pointing the same way (cosine ≥ 0.99). Not per tensor:
/// bf16 router logits flip near-tied top-k choices (seen on an H200: one expert's B gradient
/// 39% off while the loss agreed to 3e-4), as they would in transformers' own bf16 run.
#[test]
fn cuda_bf16_compute_stays_within_bf16_tolerance_of_the_f32_reference() {
    let Some(dev) = gpu("cuda_bf16_compute_stays_within_bf16_tolerance_of_the_f32_reference")
    else {
        return;
    };
    let r = reference();
    let mut model = load(&fixtures().join("bf16"), &dev);
    model.set_compute_dtype(DType::BF16).unwrap();
    let targets = model.lora_targets();
    let scale = r["lora_scale"].to_vec1::<f32>().unwrap()[0] as f64;
    let on_gpu = |name: &str| r[name].to_device(&dev).unwrap();
    let lora = finetune_model::Lora::from_tensors(
        4,
        scale,
        targets.iter().map(|(name, _, _)| {
            (
                name.clone(),
                on_gpu(&format!("lora.{name}.A")),
                on_gpu(&format!("lora.{name}.B")),
            )
        }),
    )
    .unwrap();
    let logits = model
        .forward_with(&ids(&r["input_ids"]), &ids(&r["position_ids"]), Some(&lora))
        .unwrap();
    assert_eq!(
        logits.dtype(),
        DType::F32,
        "logits come back in f32 for the loss"
    );
    let diff = max_abs_diff(&logits, &r["logits_lora"]);
    let logit_scale = max_abs(&r["logits_lora"]);
    let labels = r["labels"].to_vec1::<i64>().unwrap();
    let loss = Qwen3Moe::loss_tensor(&logits, &labels).unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    let want = r["loss_lora"].to_vec1::<f32>().unwrap()[0];
    eprintln!(
        "cuda bf16 compute: logits max abs diff {diff:e} (largest logit {logit_scale:e}); loss {got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    let (mut dot, mut norm_got, mut norm_want) = (0f64, 0f64, 0f64);
    let mut worst = (0f32, String::new());
    for (name, _, _) in &targets {
        // Per module: an expert's slice of its stack's gradient.
        let (ga, gb) = lora
            .module_grads(&grads, name)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        for (which, g) in [("A", &ga), ("B", &gb)] {
            assert_eq!(
                g.dtype(),
                DType::F32,
                "{name}.{which}: LoRA gradients are f32"
            );
            let want = &r[&format!("grad.{name}.{which}")];
            let rel = max_abs_diff(g, want) / max_abs(want);
            if rel > worst.0 {
                worst = (rel, format!("{name}.{which}"));
            }
            let gv = host(g).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wv = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in gv.iter().zip(&wv) {
                dot += f64::from(*x) * f64::from(*y);
                norm_got += f64::from(*x) * f64::from(*x);
                norm_want += f64::from(*y) * f64::from(*y);
            }
        }
    }
    let cosine = dot / (norm_got.sqrt() * norm_want.sqrt());
    eprintln!(
        "cuda bf16 compute: LoRA gradient cosine {cosine:.6}; worst single tensor {:e} of its largest magnitude ({})",
        worst.0, worst.1
    );
    assert!((got - want).abs() <= 1e-2, "loss {got} vs {want}");
    assert!(diff <= 0.1 * logit_scale, "logits differ by {diff}");
    assert!(cosine >= 0.99, "LoRA gradient cosine {cosine}");
}

/// Why FP8 weights sit on the GPU as U8 bit patterns (weights.rs, `BaseWeight::Fp8`): whether
/// candle's own F8E4M3 → f32 cast works on this device. Prints what happened; asserts nothing,
/// so that a candle that fixes it does not fail here (the table path is checked above).
#[test]
fn cuda_candle_f8e4m3_cast_is_reported() {
    let Some(dev) = gpu("cuda_candle_f8e4m3_cast_is_reported") else {
        return;
    };
    let weights = Weights::open(&fixtures().join("fp8"), &Device::Cpu).unwrap();
    let config = Qwen3MoeConfig::from_file(&fixtures().join("fp8/config.json")).unwrap();
    let out = config.num_attention_heads * config.head_dim();
    let w = weights
        .base_weight("model.layers.0.self_attn.q_proj", out, config.hidden_size)
        .unwrap();
    let finetune_model::BaseWeight::Fp8 { q, .. } = w else {
        panic!("the fp8 fixture's q_proj is not FP8");
    };
    match q.to_device(&dev).and_then(|g| g.to_dtype(DType::F32)) {
        Ok(g) => eprintln!(
            "candle F8E4M3 -> f32 cast on CUDA works; max abs diff vs CPU cast {:e}",
            max_abs_diff(&g, &q.to_dtype(DType::F32).unwrap())
        ),
        Err(e) => eprintln!("candle F8E4M3 -> f32 cast on CUDA fails: {e}"),
    }
}
