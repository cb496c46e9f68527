//! The forward pass against Hugging Face transformers (datasets/fixtures/tiny-qwen3-moe, made
//! by scripts/make_fixtures.py): logits of two packed documents from the bf16 checkpoint and
//! from the FP8 block-128 checkpoint, and the loss.

use candle_core::{Device, Tensor};
use finetune_model::{Qwen3Moe, Qwen3MoeConfig, Weights, WeightsError};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn load(dir: &Path) -> Result<Qwen3Moe, WeightsError> {
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(dir, &Device::Cpu)?;
    Qwen3Moe::load(config, &weights, &Device::Cpu)
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// The reference's r=4 adapters (A, B and scale) on `targets`.
fn reference_lora(
    r: &std::collections::HashMap<String, Tensor>,
    targets: &[(String, usize, usize)],
) -> finetune_model::Lora {
    let scale = r["lora_scale"].to_vec1::<f32>().unwrap()[0] as f64;
    finetune_model::Lora::from_tensors(
        4,
        scale,
        targets.iter().map(|(name, _, _)| {
            (
                name.clone(),
                r[&format!("lora.{name}.A")].clone(),
                r[&format!("lora.{name}.B")].clone(),
            )
        }),
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

#[test]
fn bf16_logits_and_loss_match_transformers() {
    let r = reference();
    let model = load(&fixtures().join("bf16")).unwrap();
    let logits = model
        .forward(&ids(&r["input_ids"]), &ids(&r["position_ids"]))
        .unwrap();
    let diff = max_abs_diff(&logits, &r["logits"]);
    eprintln!("bf16 checkpoint, f32 compute: logits max abs diff {diff:e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");
    let labels = r["labels"].to_vec1::<i64>().unwrap();
    let loss = Qwen3Moe::loss(&logits, &labels).unwrap();
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    eprintln!("loss {loss} vs {want}: diff {:e}", (loss - want).abs());
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");
}

#[test]
fn fp8_block_logits_match_transformers_on_dequantized_weights() {
    let r = reference();
    let model = load(&fixtures().join("fp8")).unwrap();
    let logits = model
        .forward(&ids(&r["input_ids"]), &ids(&r["position_ids"]))
        .unwrap();
    let diff = max_abs_diff(&logits, &r["logits_fp8"]);
    eprintln!("fp8 checkpoint, f32 compute: logits max abs diff {diff:e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");
    // And FP8 really changed something (the blocks are not a no-op).
    assert!(max_abs_diff(&logits, &r["logits"]) > 1e-3);
}

#[test]
fn documents_do_not_see_each_other() {
    // The second document's logits are the same whether or not the first precedes it.
    let r = reference();
    let model = load(&fixtures().join("bf16")).unwrap();
    let input = ids(&r["input_ids"]);
    let pos = ids(&r["position_ids"]);
    let start = pos.iter().rposition(|&p| p == 0).unwrap();
    let packed = model.forward(&input, &pos).unwrap();
    let alone = model.forward(&input[start..], &pos[start..]).unwrap();
    let packed_tail = packed.narrow(0, start, input.len() - start).unwrap();
    assert!(max_abs_diff(&packed_tail, &alone) < 1e-5);
}

#[test]
fn missing_misshaped_and_unexpected_tensors_are_named() {
    let src = fixtures().join("bf16");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let config = std::fs::read(src.join("config.json")).unwrap();
    let case = |edit: &dyn Fn(&mut std::collections::HashMap<String, Tensor>)| -> String {
        let dir = tempfile::tempdir().unwrap();
        let mut t = all.clone();
        edit(&mut t);
        candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        match load(dir.path()) {
            Ok(_) => "loaded".into(),
            Err(e) => e.to_string(),
        }
    };
    let name = "model.layers.1.mlp.experts.2.up_proj.weight";
    let err = case(&|t| {
        t.remove(name);
    });
    assert_eq!(
        err,
        format!("missing tensor `{name}` (expected shape [136, 160])")
    );
    let err = case(&|t| {
        let w = t[name].narrow(0, 0, 100).unwrap();
        t.insert(name.into(), w);
    });
    assert_eq!(
        err,
        format!("tensor `{name}` has shape [100, 160], expected [136, 160]")
    );
    let err = case(&|t| {
        t.insert(
            "model.layers.9.extra.weight".into(),
            t["model.norm.weight"].clone(),
        );
    });
    assert!(
        err.contains("unexpected tensors") && err.contains("model.layers.9.extra.weight"),
        "{err}"
    );
}

/// LoRA r=4 on every target with the reference's A and non-zero B: logits, loss and the
/// gradient of every A and B against transformers' autograd.
#[test]
fn lora_logits_loss_and_gradients_match_transformers() {
    let r = reference();
    let model = load(&fixtures().join("bf16")).unwrap();
    let targets = model.lora_targets();
    // q/k/v/o in 3 layers, 4 experts × 3 in 2 MoE layers, 3 dense projections.
    assert_eq!(targets.len(), 3 * 4 + 2 * 4 * 3 + 3);
    let lora = reference_lora(&r, &targets);
    let logits = model
        .forward_with(&ids(&r["input_ids"]), &ids(&r["position_ids"]), Some(&lora))
        .unwrap();
    let diff = max_abs_diff(&logits, &r["logits_lora"]);
    eprintln!("LoRA logits max abs diff {diff:e}");
    assert!(diff <= 1e-4, "LoRA logits differ by {diff}");
    let labels = r["labels"].to_vec1::<i64>().unwrap();
    let loss = Qwen3Moe::loss_tensor(&logits, &labels).unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    let want = r["loss_lora"].to_vec1::<f32>().unwrap()[0];
    eprintln!("LoRA loss {got} vs {want}");
    assert!((got - want).abs() <= 1e-5, "loss {got} vs {want}");

    let grads = loss.backward().unwrap();
    let mut worst = (0f32, String::new());
    for (name, _, _) in &targets {
        // Per module: an expert's slice of its stack's gradient.
        let (ga, gb) = lora
            .module_grads(&grads, name)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        for (which, g) in [("A", &ga), ("B", &gb)] {
            let want = &r[&format!("grad.{name}.{which}")];
            let scale = want
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                scale > 0.0,
                "{name}.{which}: the reference gradient is zero"
            );
            let rel = max_abs_diff(g, want) / scale;
            if rel > worst.0 {
                worst = (rel, format!("{name}.{which}"));
            }
            let nonzero = g
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(nonzero > 0.0, "{name}.{which}: zero gradient");
        }
    }
    eprintln!(
        "worst LoRA gradient relative error {:e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-4,
        "gradient of {} off by {} relative",
        worst.1,
        worst.0
    );
}

#[test]
fn yarn_rope_scaling_matches_transformers() {
    let r = reference();
    let dir = fixtures();
    let config = Qwen3MoeConfig::from_file(&dir.join("yarn-config.json")).unwrap();
    assert_eq!(config.rope_scaling.as_ref().unwrap().rope_type, "yarn");
    let weights = Weights::open(&dir.join("bf16"), &Device::Cpu).unwrap();
    let model = Qwen3Moe::load(config, &weights, &Device::Cpu).unwrap();
    let logits = model
        .forward(&ids(&r["input_ids"]), &ids(&r["position_ids"]))
        .unwrap();
    let diff = max_abs_diff(&logits, &r["logits_yarn"]);
    eprintln!("YaRN logits max abs diff {diff:e}");
    assert!(diff <= 1e-4, "YaRN logits differ by {diff}");
    assert!(
        max_abs_diff(&logits, &r["logits"]) > 1e-3,
        "YaRN changed nothing"
    );
}

#[test]
fn cached_generation_equals_the_full_forward() {
    // Prompt, then one token at a time: the logits equal those of the whole sequence at once.
    let r = reference();
    let model = load(&fixtures().join("bf16")).unwrap();
    let input = ids(&r["input_ids"]);
    let doc: Vec<u32> = input[..20].to_vec();
    let positions: Vec<u32> = (0..doc.len() as u32).collect();
    let full = model.forward(&doc, &positions).unwrap();
    let mut cache = model.new_cache();
    let mut parts = vec![model.forward_cached(&doc[..12], &mut cache, None).unwrap()];
    for &token in &doc[12..] {
        parts.push(model.forward_cached(&[token], &mut cache, None).unwrap());
    }
    assert_eq!(cache.len(), doc.len());
    let cached = Tensor::cat(&parts, 0).unwrap();
    let diff = max_abs_diff(&cached, &full);
    assert!(diff < 1e-5, "cached logits differ by {diff}");
}

/// Ten steps of clipping + AdamW on every LoRA tensor reproduce PyTorch's losses (f32).
#[test]
fn ten_lora_training_steps_follow_pytorch() {
    use candle_core::Var;
    use finetune_train::{clip_grad_norm, AdamW, AdamWConfig};
    let r = reference();
    let model = load(&fixtures().join("bf16")).unwrap();
    let targets = model.lora_targets();
    let lora = reference_lora(&r, &targets);
    let vars: Vec<Var> = lora.vars().cloned().collect();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    let (input, pos) = (ids(&r["input_ids"]), ids(&r["position_ids"]));
    let labels = r["labels"].to_vec1::<i64>().unwrap();
    let want = r["train_losses"].to_vec1::<f64>().unwrap();
    for (step, want) in want.iter().enumerate() {
        let logits = model.forward_with(&input, &pos, Some(&lora)).unwrap();
        let loss = Qwen3Moe::loss_tensor(&logits, &labels).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - want).abs() <= 1e-4,
            "step {step}: loss {got} vs {want}"
        );
        let grads = loss.backward().unwrap();
        // An expert that no token reaches this step gets a zero gradient, as in transformers 5,
        // where every expert's adapted weight is one fused tensor (its moments keep moving).
        let mut g: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| {
                Some(
                    grads
                        .get(v)
                        .cloned()
                        .unwrap_or_else(|| v.zeros_like().unwrap()),
                )
            })
            .collect();
        clip_grad_norm(&mut g, 1.0).unwrap();
        opt.step(&g, 1e-2).unwrap();
        eprintln!("step {step}: loss {got:.6} (PyTorch {want:.6})");
    }
}

/// bf16 compute is a GPU feature (candle's CPU matmul has no bf16): asking for it on the CPU is
/// refused with the reason, and f32 stays the default.
#[test]
fn bf16_compute_is_refused_on_the_cpu() {
    let mut model = load(&fixtures().join("bf16")).unwrap();
    assert_eq!(model.compute_dtype(), candle_core::DType::F32);
    let err = model
        .set_compute_dtype(candle_core::DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a GPU"), "{err}");
    assert_eq!(model.compute_dtype(), candle_core::DType::F32);
}

/// The batched MoE path (stacked experts, one padded `[E, C, hidden]` GEMM per projection) and
/// the grouped one (rows sorted by expert, one GEMM per expert, no padding) compute what the
/// per-expert reference computes: logits, loss and every LoRA gradient, on
/// the bf16 and the FP8 checkpoints (moe_intermediate_size 136: FP8 blocks straddle experts
/// there, so the stacked dequantization takes its per-expert route) — also with LoRA dropout:
/// its masks are keyed by token, module and feature, so the three paths, which visit the rows
/// in different orders (and the batched one with padding), draw the same ones.
#[test]
fn batched_moe_equals_the_per_expert_reference() {
    let r = reference();
    for (kind, dropout) in [("bf16", 0.0), ("fp8", 0.0), ("bf16", 0.2)] {
        let mut model = load(&fixtures().join(kind)).unwrap();
        let targets = model.lora_targets();
        let run = |model: &Qwen3Moe| {
            let mut lora = reference_lora(&r, &targets);
            lora.set_dropout(dropout, 5);
            let logits = model
                .forward_with(&ids(&r["input_ids"]), &ids(&r["position_ids"]), Some(&lora))
                .unwrap();
            let labels = r["labels"].to_vec1::<i64>().unwrap();
            let loss = Qwen3Moe::loss_tensor(&logits, &labels).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = targets
                .iter()
                .flat_map(|(name, _, _)| {
                    let (a, b) = lora.module_grads(&grads, name).unwrap();
                    [a, b]
                })
                .collect();
            (logits, loss.to_scalar::<f32>().unwrap(), g)
        };
        model.set_moe_path(finetune_model::model::MoePath::PerExpert);
        let (logits_ref, loss_ref, grads_ref) = run(&model);
        if dropout > 0.0 {
            // The masks change the result (the comparison below is of dropped-out runs).
            let mut plain = reference_lora(&r, &targets);
            plain.set_dropout(0.0, 5);
            let logits = model
                .forward_with(
                    &ids(&r["input_ids"]),
                    &ids(&r["position_ids"]),
                    Some(&plain),
                )
                .unwrap();
            let d = max_abs_diff(&logits, &logits_ref);
            assert!(d > 1e-3, "dropout {dropout} changed the logits by {d} only");
        }
        for path in [
            finetune_model::model::MoePath::Batched,
            finetune_model::model::MoePath::Grouped,
        ] {
            model.set_moe_path(path);
            let (logits, loss, grads) = run(&model);
            let diff = max_abs_diff(&logits, &logits_ref);
            assert!(
                diff <= 1e-5,
                "{kind} dropout {dropout} {path:?}: logits differ by {diff}"
            );
            assert!(
                (loss - loss_ref).abs() <= 1e-6,
                "{kind} {path:?}: loss {loss} vs {loss_ref}"
            );
            for (i, (g, want)) in grads.iter().zip(&grads_ref).enumerate() {
                let scale = max_abs_diff(want, &want.zeros_like().unwrap());
                let d = max_abs_diff(g, want);
                assert!(
                    d <= 1e-5 * scale.max(1e-12) + 1e-9,
                    "{kind} dropout {dropout} {path:?}: gradient {i} differs by {d} (scale {scale})"
                );
            }
        }
    }
}
