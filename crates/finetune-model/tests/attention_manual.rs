//! `AttentionPath::Manual` (each layer's attention half as one node with a hand-written
//! backward, finetune_kernels::attention_block) against the autograd chain: the loss, the
//! gradient of the embeddings (which flows through every layer) and of every LoRA variable, on
//! a random checkpoint of the `tiny` preset, on the YaRN fixture (bf16 weights, GQA, a dense
//! layer) and on the FP8 block-128 fixture; packed documents of several lengths (one of a
//! single token); adapters on every target, on some attention projections only, and none;
//! with each MoE path (grouped-manual included). In bf16 within the tests' bf16 bound. With
//! LoRA dropout or a KV cache the layer runs the chain (checked through the phase timings).

use candle_core::{DType, Device, Tensor, Var};
use finetune_model::model::{AttentionPath, MoePath};
use finetune_model::{Lora, Qwen3Moe};
use std::path::{Path, PathBuf};

mod common;
use common::{adapters, adapters_where, load, load_from, max_abs, rel_diff, values};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe")
}

/// A random checkpoint of the `tiny` preset (the directory kept alive by the caller).
fn tiny() -> (tempfile::TempDir, Qwen3Moe) {
    let dir = tempfile::tempdir().unwrap();
    let config = finetune_model::Preset::Tiny.config();
    finetune_model::init::write_random_checkpoint(&config, 7, dir.path()).unwrap();
    let model = load(dir.path());
    (dir, model)
}

/// The adapter sets compared: every target; q and v of the attention only (k and o without
/// an adapter; no experts); none.
fn adapter_sets(model: &Qwen3Moe) -> Vec<(&'static str, Option<Lora>)> {
    vec![
        ("all targets", Some(adapters(model))),
        (
            "q and v only",
            Some(adapters_where(model, |n| {
                n.ends_with("self_attn.q_proj") || n.ends_with("self_attn.v_proj")
            })),
        ),
        ("none", None),
    ]
}

/// Packed documents of 6, 1, 9 and 4 tokens (position ids restart at each).
fn packed(vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let ids = (0..20u32).map(|i| (i * 331 + 17) % vocab as u32).collect();
    let pos = [6u32, 1, 9, 4].iter().flat_map(|&n| 0..n).collect();
    (ids, pos)
}

struct Run {
    loss: f32,
    /// Gradient of the embeddings `[T, hidden]`.
    dx: Tensor,
    /// Gradient of each of `Lora::vars`.
    lora: Vec<Tensor>,
    /// Whether a layer ran the manual node (its phase was timed).
    manual: bool,
}

fn run(model: &Qwen3Moe, ids: &[u32], pos: &[u32], lora: Option<&Lora>) -> Run {
    let labels: Vec<i64> = ids.iter().rev().map(|&i| i64::from(i)).collect();
    let ctx = model.sequence_context(pos, 0).unwrap();
    let x0 = Var::from_tensor(&model.embed_tokens(ids).unwrap()).unwrap();
    model.set_phase_timing(true);
    let mut x = x0.as_tensor().clone();
    for layer in 0..model.num_layers() {
        x = model.layer_forward(layer, &x, &ctx, lora, None).unwrap();
    }
    let manual = model.phase_times().iter().any(|(k, _)| *k == "attn.block");
    model.set_phase_timing(false);
    // The head's loss plus a fixed projection of the last hidden states (every token, the
    // one-token document's included, gets a gradient).
    let (t, h) = x.dims2().unwrap();
    let probe = Tensor::from_vec(values(t * h, 99), (t, h), &Device::Cpu)
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    let loss = (model.head_loss_sum(&x, &labels).unwrap()
        + (&x * probe)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let lora = lora.map_or_else(Vec::new, |l| {
        l.vars()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .expect("a LoRA variable got no gradient")
                    .clone()
            })
            .collect()
    });
    Run {
        loss: loss.to_scalar::<f32>().unwrap(),
        dx: grads.get(x0.as_tensor()).unwrap().clone(),
        lora,
        manual,
    }
}

/// The manual path against the chain on `model` for every adapter set and `moe` path, within
/// `tol` (relative: loss, embeddings' gradient, each LoRA variable's gradient).
fn compare(what: &str, model: &mut Qwen3Moe, moe: &[MoePath], tol: f32) {
    let (ids, pos) = packed(model.config.vocab_size);
    for (set, lora) in adapter_sets(model) {
        for &path in moe {
            model.set_moe_path(path);
            model.set_attention_path(AttentionPath::Chain);
            let want = run(model, &ids, &pos, lora.as_ref());
            model.set_attention_path(AttentionPath::Manual);
            let got = run(model, &ids, &pos, lora.as_ref());
            let case = format!("{what}, adapters {set}, {path:?}");
            assert!(got.manual && !want.manual, "{case}: paths not as chosen");
            assert!(
                (got.loss - want.loss).abs() <= tol * want.loss.abs().max(1.0),
                "{case}: loss {} vs {}",
                got.loss,
                want.loss
            );
            let d = rel_diff(&got.dx, &want.dx);
            assert!(d <= tol, "{case}: embeddings' gradient differs by {d}");
            assert!(max_abs(&want.dx) > 0.0, "{case}: zero embeddings' gradient");
            assert_eq!(got.lora.len(), want.lora.len());
            let names: Vec<String> = lora
                .iter()
                .flat_map(|l| l.var_modules().map(|m| m[0].clone()))
                .collect();
            let mut worst = d;
            for (i, (g, w)) in got.lora.iter().zip(&want.lora).enumerate() {
                let d = rel_diff(g, w);
                worst = worst.max(d);
                assert!(d <= tol, "{case}: gradient of {} differs by {d}", names[i]);
                assert!(max_abs(w) > 0.0, "{case}: zero gradient for {}", names[i]);
            }
            eprintln!(
                "{case}: loss {} vs {}, worst gradient difference {worst:e} over {} variables",
                got.loss,
                want.loss,
                got.lora.len()
            );
        }
    }
}

const MOE_PATHS: [MoePath; 3] = [MoePath::PerExpert, MoePath::Grouped, MoePath::GroupedManual];

#[test]
fn manual_equals_the_chain_on_the_tiny_preset() {
    let (_dir, mut model) = tiny();
    compare("tiny preset", &mut model, &MOE_PATHS, 1e-5);
}

#[test]
fn manual_equals_the_chain_on_the_yarn_fixture() {
    let dir = fixtures();
    let mut model = load_from(&dir.join("yarn-config.json"), &dir.join("bf16"));
    assert_eq!(
        model.config.rope_scaling.as_ref().unwrap().rope_type,
        "yarn"
    );
    compare("YaRN fixture", &mut model, &MOE_PATHS, 1e-5);
}

#[test]
fn manual_equals_the_chain_on_the_fp8_fixture() {
    let dir = fixtures().join("fp8");
    let mut model = load(&dir);
    compare("FP8 fixture", &mut model, &[MoePath::GroupedManual], 1e-5);
}

/// bf16 compute (on the CPU, for the bf16 code paths): the manual node stays within the bf16
/// bound of the tests (5e-2 relative, `BF16_TOLERANCE` in finetune-train) of the bf16 chain.
#[test]
fn bf16_manual_stays_within_rounding_of_the_bf16_chain() {
    let (_dir, mut model) = tiny();
    model.set_compute_dtype(DType::BF16).unwrap();
    // (The grouped paths gather rows in f32 only on the CPU.)
    compare("tiny preset, bf16", &mut model, &[MoePath::PerExpert], 5e-2);
}

/// With LoRA dropout active the layers run the chain (the same masks, so the same numbers);
/// cached generation runs the chain too and gives the chain's logits.
#[test]
fn dropout_and_the_kv_cache_run_the_chain() {
    let (_dir, mut model) = tiny();
    let (ids, pos) = packed(model.config.vocab_size);
    let mut lora = adapters(&model);
    lora.set_dropout(0.25, 3);
    lora.set_training(true);
    model.set_attention_path(AttentionPath::Chain);
    let want = run(&model, &ids, &pos, Some(&lora));
    model.set_attention_path(AttentionPath::Manual);
    let got = run(&model, &ids, &pos, Some(&lora));
    assert!(!got.manual, "the manual node ran with dropout active");
    assert_eq!(got.loss, want.loss);
    for (g, w) in got.lora.iter().zip(&want.lora) {
        assert_eq!(rel_diff(g, w), 0.0);
    }
    // Generation: a prompt, then one token, through the cache; the same logits either way.
    let logits = |model: &Qwen3Moe| {
        let mut cache = model.new_cache();
        let a = model.forward_cached(&ids[..5], &mut cache, None).unwrap();
        let b = model.forward_cached(&ids[5..6], &mut cache, None).unwrap();
        Tensor::cat(&[a, b], 0).unwrap()
    };
    model.set_attention_path(AttentionPath::Chain);
    let want = logits(&model);
    model.set_attention_path(AttentionPath::Manual);
    model.set_phase_timing(true);
    let got = logits(&model);
    assert!(!model.phase_times().iter().any(|(k, _)| *k == "attn.block"));
    model.set_phase_timing(false);
    assert_eq!(rel_diff(&got, &want), 0.0);
}
