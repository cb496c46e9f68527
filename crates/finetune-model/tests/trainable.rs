//! Full-parameter training (`Qwen3Moe::make_trainable`, used by `finetune pretrain`): every
//! weight becomes a variable named as in the checkpoint, every one receives a gradient (but an
//! expert no token reached), and the gradients equal central finite differences of the loss.

use candle_core::{Device, Tensor};
use finetune_model::{init, Preset, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe/bf16")
}

fn loss(model: &Qwen3Moe, ids: &[u32]) -> Tensor {
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Qwen3Moe::loss_tensor(&model.forward(ids, &positions).unwrap(), &labels).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

fn check(dir: &Path) {
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(dir, &Device::Cpu).unwrap();
    let mut model = Qwen3Moe::load(config.clone(), &weights, &Device::Cpu).unwrap();
    let params = model.make_trainable().unwrap();
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<String> = init::tensor_shapes(&config)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, expected, "names in checkpoint order");
    let ids: Vec<u32> = (0..96u32)
        .map(|i| (i * 37 + 11) % config.vocab_size as u32)
        .collect();
    let l = loss(&model, &ids);
    let grads = l.backward().unwrap();
    // Every weight has a gradient, except an expert no token was routed to (as in
    // transformers; the trainer gives those a zero gradient). Each MoE layer reaches some.
    let mut experts_reached = std::collections::BTreeSet::new();
    for (name, var) in &params {
        let Some(g) = grads.get(var.as_tensor()) else {
            assert!(name.contains(".mlp.experts."), "{name}: no gradient");
            continue;
        };
        let norm = scalar(&g.sqr().unwrap().sum_all().unwrap());
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
        if let Some((layer, _)) = name.split_once(".mlp.experts.") {
            experts_reached.insert(layer.to_string());
        }
    }
    let moe_layers = (0..config.num_hidden_layers)
        .filter(|&i| config.is_moe_layer(i))
        .count();
    assert_eq!(experts_reached.len(), moe_layers, "{experts_reached:?}");
    // Central differences at the largest gradient entry of a few weights of each kind.
    let picks = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ];
    for (name, var) in params.iter().filter(|(n, _)| picks.contains(&n.as_str())) {
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (k, &gk) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let at = |delta: f32| -> f64 {
            let mut w: Vec<f32> = original.flatten_all().unwrap().to_vec1().unwrap();
            w[k] += delta;
            let t = Tensor::from_vec(w, original.shape(), &Device::Cpu).unwrap();
            var.set(&t).unwrap();
            scalar(&loss(&model, &ids))
        };
        // Small against the weights (embeddings are ~0.02) yet far above f32 rounding.
        let h = 2e-3f32;
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        var.set(&original).unwrap();
        assert!(
            (numeric - gk as f64).abs() <= 0.03 * (gk as f64).abs() + 1e-3,
            "{name}[{k}]: autograd {gk}, central difference {numeric}"
        );
    }
}

#[test]
fn untied_fixture_with_a_dense_layer() {
    check(&fixture());
}

#[test]
fn tied_embeddings_share_one_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Preset::Tiny.config();
    config.vocab_size = 300;
    config.tie_word_embeddings = true;
    // Every expert active: at a random init the router's probabilities are nearly equal, and a
    // top-k choice flipped by the finite difference's step would be a jump, not a slope.
    config.num_experts = 4;
    config.num_experts_per_tok = 4;
    init::write_random_checkpoint(&config, 3, dir.path()).unwrap();
    check(dir.path());
}
