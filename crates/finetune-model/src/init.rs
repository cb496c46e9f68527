//! A randomly initialised checkpoint of any configuration, written as a Hugging Face model
//! directory (`config.json` + `model.safetensors`), so that the embedded `tiny` base and the
//! random-weight benchmarks load through the same path as a downloaded model.
//!
//! Initialisation follows transformers' `Qwen3MoePreTrainedModel._init_weights`: every linear
//! and embedding weight from N(0, 0.02²), every RMSNorm weight 1. Normal draws come from a
//! ChaCha8 stream seeded by `seed` (Box–Muller), so the same seed gives the same file.

use crate::config::Qwen3MoeConfig;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

const INIT_STD: f32 = 0.02;

/// `config.json` of `config` with the fields transformers needs to load it.
pub fn config_json(c: &Qwen3MoeConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim(),
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false,
        "use_sliding_window": false,
        "decoder_sparse_step": c.decoder_sparse_step,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_experts": c.num_experts,
        "norm_topk_prob": c.norm_topk_prob,
        "mlp_only_layers": c.mlp_only_layers,
        "initializer_range": INIT_STD,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 2,
    })
}

/// Every tensor of `config` with its shape, in checkpoint order.
pub fn tensor_shapes(c: &Qwen3MoeConfig) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (c.hidden_size, c.head_dim());
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
        push(format!("{p}.input_layernorm.weight"), vec![h]);
        push(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        push(format!("{p}.self_attn.q_proj.weight"), vec![nh * d, h]);
        push(format!("{p}.self_attn.k_proj.weight"), vec![nkv * d, h]);
        push(format!("{p}.self_attn.v_proj.weight"), vec![nkv * d, h]);
        push(format!("{p}.self_attn.o_proj.weight"), vec![h, nh * d]);
        push(format!("{p}.self_attn.q_norm.weight"), vec![d]);
        push(format!("{p}.self_attn.k_norm.weight"), vec![d]);
        let mut mlp = |prefix: String, width: usize| {
            push(format!("{prefix}.gate_proj.weight"), vec![width, h]);
            push(format!("{prefix}.up_proj.weight"), vec![width, h]);
            push(format!("{prefix}.down_proj.weight"), vec![h, width]);
        };
        if c.is_moe_layer(i) {
            for e in 0..c.num_experts {
                mlp(format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
            }
        } else {
            mlp(format!("{p}.mlp"), c.intermediate_size);
        }
        if c.is_moe_layer(i) {
            out.push((format!("{p}.mlp.gate.weight"), vec![c.num_experts, h]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

/// Writes a random bf16 checkpoint of `config` into `dir` (created), each file atomically.
pub fn write_random_checkpoint(
    config: &Qwen3MoeConfig,
    seed: u64,
    dir: &Path,
) -> std::io::Result<()> {
    let io = |e: candle_core::Error| std::io::Error::other(e.to_string());
    std::fs::create_dir_all(dir)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in tensor_shapes(config) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| {
                    // Box–Muller: two uniforms → one standard normal.
                    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                    let u2: f32 = rng.random();
                    INIT_STD * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .map_err(io)?;
        tensors.insert(name, t);
    }
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(io)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    let tmp = dir.join(".config.json.tmp");
    let text = serde_json::to_string_pretty(&config_json(config)).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, dir.join("config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Preset, Qwen3Moe, Weights};

    #[test]
    fn random_tiny_checkpoint_loads_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let config = Preset::Tiny.config();
        write_random_checkpoint(&config, 7, &a).unwrap();
        write_random_checkpoint(&config, 7, &b).unwrap();
        let bytes = std::fs::read(a.join("model.safetensors")).unwrap();
        assert_eq!(bytes, std::fs::read(b.join("model.safetensors")).unwrap());
        let reread = Qwen3MoeConfig::from_file(&a.join("config.json")).unwrap();
        assert_eq!(reread, config);
        let weights = Weights::open(&a, &Device::Cpu).unwrap();
        let model = Qwen3Moe::load(reread, &weights, &Device::Cpu).unwrap();
        // Near-uniform predictions from a fresh init: loss ≈ ln(vocab).
        let ids: Vec<u32> = (0..16).map(|i| i * 97 % 8192).collect();
        let pos: Vec<u32> = (0..16).collect();
        let logits = model.forward(&ids, &pos).unwrap();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let loss = Qwen3Moe::loss(&logits, &labels).unwrap();
        assert!((loss - (8192f32).ln()).abs() < 0.1, "loss {loss}");
        // The init's spread is N(0, 0.02²).
        let w = weights
            .tensor("model.embed_tokens.weight", &[8192, 128])
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let std = w
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 0.02).abs() < 0.001, "std {std}");
    }
}
