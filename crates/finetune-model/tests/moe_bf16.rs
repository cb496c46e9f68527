//! bf16 compute on the CPU through every MoE path: the batched, grouped and grouped-manual
//! paths (finetune-kernels' `moe_permute`, `grouped_linear`, `swiglu` and `moe_experts` CPU
//! references) against the per-expert path in bf16 — the loss, the gradient of the embeddings
//! (it flows through every layer's experts, routing weights and router) and every LoRA
//! variable's gradient — on a random checkpoint of the `tiny` preset and on the FP8 block-128
//! fixture, with and without adapters.
//!
//! Tolerance: the paths round at different places in bf16 (the per-expert path rounds each
//! expert's output before the weighted index_add, the grouped ones round whole stacks of rows,
//! the manual node keeps g and u in bf16 and sums its adapters' dx in f32 first), so they agree
//! to bf16 precision, not exactly. Compared as ‖a − b‖ / ‖b‖ against 5e-2, the workspace's
//! bf16 tolerance (finetune-train's `BF16_TOLERANCE`: bf16 keeps 8 significant bits; a wrong
//! gradient is off by O(1)). Each run is also checked to differ from the f32 compute (bf16
//! really computed).

use candle_core::{DType, Device, Tensor, Var};
use finetune_model::model::MoePath;
use finetune_model::{Lora, Qwen3Moe};
use std::path::Path;

mod common;
use common::{adapters, load, values};

/// finetune-train's `parallel::check::BF16_TOLERANCE` (finetune-model cannot depend on it).
const BF16_TOLERANCE: f32 = 5e-2;

struct Run {
    loss: f32,
    /// Gradient of the embeddings `[T, hidden]`, f32.
    dx: Tensor,
    /// Gradient of each of `Lora::vars`, f32.
    lora: Vec<Tensor>,
}

/// Forward through every layer in the model's compute dtype, the head's loss plus a fixed
/// projection of the last hidden states, and its backward.
fn run(model: &Qwen3Moe, ids: &[u32], lora: Option<&Lora>) -> Run {
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let labels: Vec<i64> = ids.iter().rev().map(|&i| i64::from(i)).collect();
    let ctx = model.sequence_context(&pos, 0).unwrap();
    let x0 = Var::from_tensor(&model.embed_tokens(ids).unwrap()).unwrap();
    assert_eq!(x0.dtype(), model.compute_dtype());
    let mut x = x0.as_tensor().clone();
    for layer in 0..model.num_layers() {
        x = model.layer_forward(layer, &x, &ctx, lora, None).unwrap();
    }
    let (t, h) = x.dims2().unwrap();
    let probe = Tensor::from_vec(values(t * h, 99), (t, h), &Device::Cpu)
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    let loss = (model
        .head_loss_sum(&x, &labels)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        + (&x * probe)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let lora = lora.map_or_else(Vec::new, |l| {
        l.vars()
            .map(|v| {
                f32_of(
                    grads
                        .get(v.as_tensor())
                        .expect("a LoRA variable got no gradient"),
                )
            })
            .collect()
    });
    Run {
        loss: loss.to_scalar::<f32>().unwrap(),
        dx: f32_of(grads.get(x0.as_tensor()).unwrap()),
        lora,
    }
}

/// ‖a − b‖ / ‖b‖ (Frobenius).
fn rel_norm(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    norm(&(a - b).unwrap()) / norm(b).max(f32::MIN_POSITIVE)
}

/// Every non-reference path in bf16 against the per-expert path in bf16 (and each against the
/// f32 per-expert run, to show bf16 was really computed).
fn compare(what: &str, model: &mut Qwen3Moe, ids: &[u32]) {
    let lora = adapters(model);
    for with_lora in [false, true] {
        let l = with_lora.then_some(&lora);
        model.set_compute_dtype(DType::F32).unwrap();
        model.set_moe_path(MoePath::PerExpert);
        let f32_run = run(model, ids, l);
        model.set_compute_dtype(DType::BF16).unwrap();
        let want = run(model, ids, l);
        let case = format!("{what}, {} tokens, adapters {with_lora}", ids.len());
        let bf16_vs_f32 = rel_norm(&want.dx, &f32_run.dx);
        assert!(
            bf16_vs_f32 > 1e-4,
            "{case}: bf16 per-expert equals f32 ({bf16_vs_f32})"
        );
        for path in [MoePath::Batched, MoePath::Grouped, MoePath::GroupedManual] {
            model.set_moe_path(path);
            let got = run(model, ids, l);
            let case = format!("{case}, {path:?}");
            let dl = ((got.loss - want.loss) / want.loss.abs().max(1.0)).abs();
            assert!(
                dl <= BF16_TOLERANCE,
                "{case}: loss {} vs {}",
                got.loss,
                want.loss
            );
            let d = rel_norm(&got.dx, &want.dx);
            assert!(
                d <= BF16_TOLERANCE,
                "{case}: embeddings' gradient differs by {d}"
            );
            assert!(rel_norm(&got.dx, &f32_run.dx) > 0.0, "{case}: f32?");
            let names: Vec<String> = lora.var_modules().map(|m| m[0].clone()).collect();
            assert_eq!(got.lora.len(), want.lora.len());
            let mut worst = 0f32;
            for (i, (g, w)) in got.lora.iter().zip(&want.lora).enumerate() {
                let d = rel_norm(g, w);
                assert!(
                    d <= BF16_TOLERANCE,
                    "{case}: gradient of {} differs by {d}",
                    names[i]
                );
                worst = worst.max(d);
            }
            eprintln!(
                "{case}: loss {} vs {}, embeddings' gradient {d:.2e}, worst LoRA gradient {worst:.2e} (bf16 per-expert vs f32: {bf16_vs_f32:.2e})",
                got.loss, want.loss
            );
        }
    }
}

#[test]
fn bf16_moe_paths_equal_the_per_expert_path_on_the_tiny_preset() {
    let dir = tempfile::tempdir().unwrap();
    let config = finetune_model::Preset::Tiny.config();
    finetune_model::init::write_random_checkpoint(&config, 5, dir.path()).unwrap();
    let mut model = load(dir.path());
    // 3 tokens × top-2 over 8 experts (idle experts in every layer), and 24 tokens.
    for ids in [
        vec![17u32, 4000, 123],
        (0..24).map(|i| i * 331 % 8192).collect(),
    ] {
        compare("tiny preset", &mut model, &ids);
    }
}

#[test]
fn bf16_moe_paths_equal_the_per_expert_path_on_the_fp8_fixture() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe/fp8");
    let mut model = load(&dir);
    let ids: Vec<u32> = (0..19).map(|i| i * 53 % 256).collect();
    compare("FP8 fixture", &mut model, &ids);
}
