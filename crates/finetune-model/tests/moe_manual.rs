//! `MoePath::GroupedManual` (the routed experts as one node with a hand-written backward,
//! finetune_kernels::moe_experts) against the autograd grouped path: the loss, the gradient of
//! the embeddings (which flows through every layer's experts, routing weights and router) and
//! of every LoRA variable (the six expert stacks of each MoE layer included), on a random
//! checkpoint of the `tiny` preset and on the FP8 block-128 fixture, with and without adapters,
//! on sequences short enough that some experts get no token.

use candle_core::{Device, Tensor, Var};
use finetune_model::model::MoePath;
use finetune_model::{Lora, Qwen3Moe};
use std::path::Path;

mod common;
use common::{adapters, load, max_abs, rel_diff, values};

struct Run {
    loss: f32,
    /// Gradient of the embeddings `[T, hidden]` (every layer, router included, lies between).
    dx: Tensor,
    /// Gradient of each of `Lora::vars`.
    lora: Vec<Tensor>,
}

fn run(model: &Qwen3Moe, ids: &[u32], lora: Option<&Lora>) -> Run {
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let labels: Vec<i64> = ids.iter().rev().map(|&i| i64::from(i)).collect();
    let ctx = model.sequence_context(&pos, 0).unwrap();
    let x0 = Var::from_tensor(&model.embed_tokens(ids).unwrap()).unwrap();
    let mut x = x0.as_tensor().clone();
    for layer in 0..model.num_layers() {
        x = model.layer_forward(layer, &x, &ctx, lora, None).unwrap();
    }
    // The head's loss, plus a fixed projection of the last hidden states so that a one-token
    // sequence (no next-token target) still has a gradient.
    let (t, h) = x.dims2().unwrap();
    let probe = Tensor::from_vec(values(t * h, 99), (t, h), &Device::Cpu).unwrap();
    let loss = (model.head_loss_sum(&x, &labels).unwrap()
        + (&x * probe).unwrap().sum_all().unwrap())
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
    }
}

/// Tokens per expert of MoE layer `layer` for the hidden states `x` entering it: the routing
/// both paths use (recomputed here through the public pieces of the layer).
fn empty_experts(model: &Qwen3Moe, layer: usize, x: &Tensor, ctx_ids: &[u32]) -> usize {
    let pos: Vec<u32> = (0..ctx_ids.len() as u32).collect();
    let ctx = model.sequence_context(&pos, 0).unwrap();
    let heads = 0..model.config.num_attention_heads;
    let attn = model.attention_heads(layer, x, &ctx, None, heads).unwrap();
    let h = (x + attn).unwrap();
    let n = model.post_attention_norm(layer, &h).unwrap();
    let (_, routed) = model.route(layer, &n).unwrap();
    routed.iter().filter(|t| t.is_empty()).count()
}

fn compare(what: &str, model: &mut Qwen3Moe, ids: &[u32]) {
    let lora = adapters(model);
    for with_lora in [false, true] {
        let l = with_lora.then_some(&lora);
        model.set_moe_path(MoePath::Grouped);
        let want = run(model, ids, l);
        model.set_moe_path(MoePath::GroupedManual);
        let got = run(model, ids, l);
        let case = format!("{what}, {} tokens, adapters {with_lora}", ids.len());
        assert!(
            (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0),
            "{case}: loss {} vs {}",
            got.loss,
            want.loss
        );
        let d = rel_diff(&got.dx, &want.dx);
        assert!(
            d <= 1e-5,
            "{case}: embeddings' gradient differs by {d} (relative)"
        );
        assert!(max_abs(&want.dx) > 0.0, "{case}: zero embeddings' gradient");
        assert_eq!(got.lora.len(), want.lora.len());
        let names: Vec<String> = lora.var_modules().map(|m| m[0].clone()).collect();
        let mut stacks = 0;
        for (i, (g, w)) in got.lora.iter().zip(&want.lora).enumerate() {
            let d = rel_diff(g, w);
            assert!(d <= 1e-5, "{case}: gradient of {} differs by {d}", names[i]);
            assert!(max_abs(w) > 0.0, "{case}: zero gradient for {}", names[i]);
            stacks += usize::from(g.rank() == 3);
        }
        if with_lora {
            // Six stacks per MoE layer, each compared above.
            let moe_layers = (0..model.num_layers())
                .filter(|&i| model.layer_is_moe(i))
                .count();
            assert_eq!(stacks, 6 * moe_layers, "{case}");
        }
        eprintln!(
            "{case}: loss {} vs {}, embeddings' gradient {d:e}",
            got.loss, want.loss
        );
    }
}

/// How many experts of the first MoE layer get no token of `ids`.
fn idle_experts(model: &Qwen3Moe, ids: &[u32]) -> usize {
    let first = (0..model.num_layers())
        .find(|&i| model.layer_is_moe(i))
        .unwrap();
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let ctx = model.sequence_context(&pos, 0).unwrap();
    let mut x = model.embed_tokens(ids).unwrap();
    for layer in 0..first {
        x = model.layer_forward(layer, &x, &ctx, None, None).unwrap();
    }
    empty_experts(model, first, &x, ids)
}

#[test]
fn grouped_manual_equals_grouped_on_the_tiny_preset() {
    let dir = tempfile::tempdir().unwrap();
    let config = finetune_model::Preset::Tiny.config();
    finetune_model::init::write_random_checkpoint(&config, 5, dir.path()).unwrap();
    let mut model = load(dir.path());
    // 3 tokens × top-2 = 6 slots over 8 experts: at least two experts idle in every layer.
    for ids in [
        vec![17u32, 4000, 123],
        (0..24).map(|i| i * 331 % 8192).collect(),
    ] {
        if ids.len() == 3 {
            assert!(
                idle_experts(&model, &ids) >= 2,
                "3 tokens used 7 of 8 experts?"
            );
        }
        compare("tiny preset", &mut model, &ids);
    }
}

#[test]
fn grouped_manual_equals_grouped_on_the_fp8_fixture() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe/fp8");
    let mut model = load(&dir);
    // 4 experts, top-2: the first 3-token sequence (of a fixed list) that leaves an expert of
    // the first MoE layer idle. (Shorter ones make attention degenerate: with one or two keys
    // the q/k gradients are cancellations whose rounding exceeds 1e-5 of their size.)
    let short = (0..64u32)
        .map(|s| vec![s, (s * 101 + 7) % 256, (s * 13 + 200) % 256])
        .find(|ids| idle_experts(&model, ids) > 0)
        .expect("some 3-token sequence leaves an expert idle");
    for ids in [short, (0..19).map(|i| i * 53 % 256).collect()] {
        compare("FP8 fixture", &mut model, &ids);
    }
}
