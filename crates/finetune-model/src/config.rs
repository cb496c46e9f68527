//! `Qwen3MoeConfig`: the Hugging Face `config.json` of a Qwen3-MoE model (the Qwen3-Coder
//! family), with every field those checkpoints use, checked for values this implementation
//! does not support, and the built-in presets.
//!
//! Keys that do not change the computation (`architectures`, `torch_dtype`, token ids,
//! `transformers_version`, `initializer_range`, …) are accepted and ignored; a value that would
//! change it and that we do not implement (another `model_type`, `hidden_act`, attention bias,
//! sliding window, a RoPE scaling other than YaRN or linear, a quantization other than FP8
//! E4M3 with 128×128 blocks) is an error naming the key and the value.

use crate::Preset;
use serde::Deserialize;
use std::path::Path;

/// Errors reading or checking a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{key}` = {value}: {message}")]
    Unsupported {
        path: String,
        key: &'static str,
        value: String,
        message: String,
    },
}

/// RoPE scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// `"yarn"` or `"linear"` (older configs write the key as `type`).
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    #[serde(default)]
    pub attention_factor: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// `quantization_config` of an FP8 checkpoint (Qwen3-Coder-*-FP8).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default = "default_fmt")]
    pub fmt: String,
    #[serde(default)]
    pub activation_scheme: Option<String>,
    pub weight_block_size: Vec<usize>,
    /// Modules kept in the checkpoint's unquantized dtype (names or name prefixes).
    #[serde(default)]
    pub modules_to_not_convert: Vec<String>,
}

fn default_fmt() -> String {
    "e4m3".into()
}

/// A Qwen3-MoE configuration, field names as in Hugging Face transformers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen3MoeConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Dense MLP width, used by layers in `mlp_only_layers` or off the sparse step.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head dimension; Qwen3 sets it explicitly (it need not be hidden / heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// RoPE base. transformers ≥ 5 writes it (and the scaling) inside `rope_parameters`;
    /// [`Qwen3MoeConfig::from_json`] moves it here.
    #[serde(default)]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Every `decoder_sparse_step`-th layer is sparse (MoE), counting from 1.
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    pub moe_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    /// transformers ≥ 5 writes it as `num_local_experts`.
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    /// Layers with a dense MLP instead of experts.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
}

fn default_model_type() -> String {
    "qwen3_moe".into()
}
fn default_act() -> String {
    "silu".into()
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl Qwen3MoeConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&path.display().to_string(), &text)
    }

    /// Parses and checks config JSON; `name` is used in messages.
    pub fn from_json(name: &str, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        if let Some(params) = config.rope_parameters.take() {
            let bad = |message: String| ConfigError::Parse {
                path: name.to_string(),
                message: format!("rope_parameters: {message}"),
            };
            if config.rope_theta == 0.0 {
                config.rope_theta = params["rope_theta"]
                    .as_f64()
                    .ok_or_else(|| bad("no numeric `rope_theta`".into()))?;
            }
            let kind = params["rope_type"].as_str().unwrap_or("default");
            if kind != "default" && config.rope_scaling.is_none() {
                config.rope_scaling =
                    Some(serde_json::from_value(params.clone()).map_err(|e| bad(e.to_string()))?);
            }
        }
        if config.rope_theta == 0.0 {
            return Err(ConfigError::Parse {
                path: name.to_string(),
                message: "missing field `rope_theta` (or `rope_parameters.rope_theta`)".into(),
            });
        }
        config.check(name)?;
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them, f32 as transformers computes them) and
    /// the factor cos/sin are multiplied by. Default: θ^(−2i/d). Linear: divided by `factor`.
    /// YaRN (arXiv 2309.00071, as in transformers' `_compute_yarn_parameters`): frequencies
    /// between the correction dimensions of `beta_fast` and `beta_slow` rotations blend
    /// extrapolation (θ^(−2i/d)) and interpolation (θ^(−2i/d) / factor) along a linear ramp,
    /// and cos/sin are scaled by `attention_factor` (default 0.1·ln(factor) + 1).
    pub fn rope_frequencies(&self) -> (Vec<f32>, f32) {
        let d = self.head_dim();
        let base = self.rope_theta;
        let pos_freqs: Vec<f32> = (0..d / 2)
            .map(|i| (base as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let extrapolation: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        let Some(rs) = &self.rope_scaling else {
            return (extrapolation, 1.0);
        };
        match rs.rope_type.as_str() {
            "linear" => (
                extrapolation.iter().map(|f| f / rs.factor as f32).collect(),
                1.0,
            ),
            "yarn" => {
                let factor = rs.factor;
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention =
                    rs.attention_factor
                        .unwrap_or_else(|| match (rs.mscale, rs.mscale_all_dim) {
                            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                                mscale(factor, m) / mscale(factor, all)
                            }
                            _ => mscale(factor, 1.0),
                        });
                let beta_fast = rs.beta_fast.unwrap_or(32.0);
                let beta_slow = rs.beta_slow.unwrap_or(1.0);
                let original = rs
                    .original_max_position_embeddings
                    .unwrap_or(self.max_position_embeddings) as f64;
                let correction_dim = |rotations: f64| {
                    d as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if rs.truncate.unwrap_or(true) {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(d as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv_freq = (0..d / 2)
                    .map(|i| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let interpolation = 1.0 / (factor as f32 * pos_freqs[i]);
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation[i] * extrapolation_factor
                    })
                    .collect();
                (inv_freq, attention as f32)
            }
            _ => (extrapolation, 1.0),
        }
    }

    /// Whether layer `i` (0-based) has experts, as transformers decides it.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && (i + 1) % self.decoder_sparse_step == 0
    }

    /// Parameters of the whole model and of what one token uses (top-k experts only).
    pub fn parameter_counts(&self) -> (u64, u64) {
        let (h, d) = (self.hidden_size as u64, self.head_dim() as u64);
        let (q, kv) = (
            self.num_attention_heads as u64 * d,
            self.num_key_value_heads as u64 * d,
        );
        // q, k, v, o projections, q/k norms, two RMSNorms per layer.
        let attention = h * q + 2 * h * kv + q * h + 2 * d + 2 * h;
        let expert = 3 * h * self.moe_intermediate_size as u64;
        let dense = 3 * h * self.intermediate_size as u64;
        let router = h * self.num_experts as u64;
        let (mut total, mut active) = (0u64, 0u64);
        for i in 0..self.num_hidden_layers {
            total += attention;
            active += attention;
            if self.is_moe_layer(i) {
                total += router + self.num_experts as u64 * expert;
                active += router + self.num_experts_per_tok as u64 * expert;
            } else {
                total += dense;
                active += dense;
            }
        }
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        total += embed + head + h;
        active += embed + head + h;
        (total, active)
    }

    fn check(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |key: &'static str, value: String, message: &str| {
            Err(ConfigError::Unsupported {
                path: path.to_string(),
                key,
                value,
                message: message.to_string(),
            })
        };
        if self.model_type != "qwen3_moe" {
            return bad(
                "model_type",
                format!("{:?}", self.model_type),
                "only \"qwen3_moe\" (the Qwen3-Coder family) is implemented",
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("{:?}", self.hidden_act),
                "only \"silu\" (SwiGLU) is implemented",
            );
        }
        if self.attention_bias {
            return bad(
                "attention_bias",
                "true".into(),
                "attention biases are not implemented",
            );
        }
        if self.use_sliding_window {
            return bad(
                "use_sliding_window",
                "true".into(),
                "sliding-window attention is not implemented",
            );
        }
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("decoder_sparse_step", self.decoder_sparse_step),
        ] {
            if v == 0 {
                return bad(key, "0".into(), "must be at least 1");
            }
        }
        if self.head_dim == Some(0) || self.head_dim() % 2 != 0 {
            return bad(
                "head_dim",
                self.head_dim().to_string(),
                "must be a positive even number (RoPE rotates pairs)",
            );
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                self.num_key_value_heads.to_string(),
                &format!(
                    "must divide num_attention_heads ({}) for grouped-query attention",
                    self.num_attention_heads
                ),
            );
        }
        if self.num_experts > 0
            && (self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts)
        {
            return bad(
                "num_experts_per_tok",
                self.num_experts_per_tok.to_string(),
                &format!("must be between 1 and num_experts ({})", self.num_experts),
            );
        }
        if self.num_experts > 0 && self.moe_intermediate_size == 0 {
            return bad("moe_intermediate_size", "0".into(), "must be at least 1");
        }
        if let Some(&l) = self
            .mlp_only_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return bad(
                "mlp_only_layers",
                l.to_string(),
                &format!(
                    "no such layer (num_hidden_layers = {})",
                    self.num_hidden_layers
                ),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return bad(
                "rms_norm_eps/rope_theta",
                format!("{}/{}", self.rms_norm_eps, self.rope_theta),
                "must be positive",
            );
        }
        if let Some(rs) = &self.rope_scaling {
            if !["yarn", "linear", "default"].contains(&rs.rope_type.as_str()) {
                return bad(
                    "rope_scaling.rope_type",
                    format!("{:?}", rs.rope_type),
                    "only \"yarn\", \"linear\" and \"default\" are implemented",
                );
            }
            if rs.factor.is_nan() || rs.factor < 1.0 {
                return bad("rope_scaling.factor", rs.factor.to_string(), "must be >= 1");
            }
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" || q.fmt != "e4m3" {
                return bad(
                    "quantization_config.quant_method",
                    format!("{:?} ({})", q.quant_method, q.fmt),
                    "only FP8 E4M3 with block scales (the Qwen3-Coder-*-FP8 layout) is implemented",
                );
            }
            if q.weight_block_size != [128, 128] {
                return bad(
                    "quantization_config.weight_block_size",
                    format!("{:?}", q.weight_block_size),
                    "only 128x128 blocks are implemented",
                );
            }
        }
        Ok(())
    }
}

impl Preset {
    /// The preset's configuration: `tiny` is ours; the Qwen3-Coder presets carry the shapes of
    /// the published checkpoints (weights are random when built from a preset).
    pub fn config(self) -> Qwen3MoeConfig {
        let base = Qwen3MoeConfig {
            model_type: default_model_type(),
            vocab_size: 151_936,
            hidden_size: 0,
            intermediate_size: 0,
            num_hidden_layers: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            head_dim: Some(128),
            hidden_act: default_act(),
            max_position_embeddings: 262_144,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000_000.0,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            attention_bias: false,
            use_sliding_window: false,
            decoder_sparse_step: 1,
            moe_intermediate_size: 0,
            num_experts_per_tok: 8,
            num_experts: 0,
            norm_topk_prob: true,
            mlp_only_layers: Vec::new(),
            quantization_config: None,
        };
        match self {
            // A few MB: 4 layers, 8 experts of which 2 active, a 8k-token vocabulary.
            Preset::Tiny => Qwen3MoeConfig {
                vocab_size: 8192,
                hidden_size: 128,
                intermediate_size: 256,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: Some(32),
                max_position_embeddings: 4096,
                rope_theta: 1_000_000.0,
                moe_intermediate_size: 128,
                num_experts_per_tok: 2,
                num_experts: 8,
                ..base
            },
            Preset::Qwen3Coder30bA3b => Qwen3MoeConfig {
                hidden_size: 2048,
                intermediate_size: 6144,
                num_hidden_layers: 48,
                num_attention_heads: 32,
                num_key_value_heads: 4,
                moe_intermediate_size: 768,
                num_experts: 128,
                ..base
            },
            Preset::Qwen3Coder480bA35b => Qwen3MoeConfig {
                hidden_size: 6144,
                intermediate_size: 8192,
                num_hidden_layers: 62,
                num_attention_heads: 96,
                num_key_value_heads: 8,
                moe_intermediate_size: 2560,
                num_experts: 160,
                ..base
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter counts the model names promise: 30B total / 3B active ("A3B"),
    /// 480B total / 35B active ("A35B"), within 2%.
    #[test]
    fn preset_shapes_give_the_advertised_parameter_counts() {
        for (preset, total, active) in [
            (Preset::Qwen3Coder30bA3b, 30.5e9, 3.3e9),
            (Preset::Qwen3Coder480bA35b, 480e9, 35e9),
        ] {
            let (t, a) = preset.config().parameter_counts();
            assert!((t as f64 / total - 1.0).abs() < 0.02, "{preset}: total {t}");
            assert!(
                (a as f64 / active - 1.0).abs() < 0.02,
                "{preset}: active {a}"
            );
        }
        let (t, _) = Preset::Tiny.config().parameter_counts();
        // "a few MB" in bf16.
        assert!(t * 2 < 10 << 20, "tiny has {t} parameters");
    }

    #[test]
    fn presets_pass_their_own_checks() {
        for p in Preset::ALL {
            p.config().check("preset").unwrap();
        }
    }

    const FP8_CONFIG: &str = r#"{
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 6144, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 262144, "max_window_layers": 62, "mlp_only_layers": [],
        "moe_intermediate_size": 2560, "norm_topk_prob": true, "num_attention_heads": 96,
        "num_experts": 160, "num_experts_per_tok": 8, "num_hidden_layers": 62,
        "num_key_value_heads": 8, "output_router_logits": false, "rms_norm_eps": 1e-06,
        "rope_scaling": null, "rope_theta": 10000000, "router_aux_loss_coef": 0.0,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
        "use_sliding_window": false, "vocab_size": 151936,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]}
    }"#;

    #[test]
    fn reads_an_fp8_checkpoint_config() {
        let c = Qwen3MoeConfig::from_json("config.json", FP8_CONFIG).unwrap();
        assert_eq!(c, {
            let mut p = Preset::Qwen3Coder480bA35b.config();
            p.quantization_config = c.quantization_config.clone();
            p
        });
        let q = c.quantization_config.unwrap();
        assert_eq!(
            q.modules_to_not_convert,
            ["lm_head", "model.layers.0.mlp.gate"]
        );
    }

    #[test]
    fn yarn_rope_scaling_is_read() {
        let text = FP8_CONFIG.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 65536}",
        );
        let c = Qwen3MoeConfig::from_json("config.json", &text).unwrap();
        let rs = c.rope_scaling.unwrap();
        assert_eq!((rs.rope_type.as_str(), rs.factor), ("yarn", 4.0));
        assert_eq!(rs.original_max_position_embeddings, Some(65536));
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let text = FP8_CONFIG.replace(
            "\"rope_scaling\": null, \"rope_theta\": 10000000,",
            "\"rope_parameters\": {\"rope_theta\": 5000.0, \"rope_type\": \"yarn\", \"factor\": 2.0},",
        );
        assert_ne!(text, FP8_CONFIG);
        let c = Qwen3MoeConfig::from_json("config.json", &text).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 2.0);
        let none = FP8_CONFIG.replace("\"rope_theta\": 10000000,", "");
        let err = Qwen3MoeConfig::from_json("config.json", &none).unwrap_err();
        assert!(err.to_string().contains("rope_theta"), "{err}");
    }

    #[test]
    fn unsupported_values_name_key_and_value() {
        for (from, to, key) in [
            (
                "\"model_type\": \"qwen3_moe\"",
                "\"model_type\": \"llama\"",
                "model_type",
            ),
            (
                "\"hidden_act\": \"silu\"",
                "\"hidden_act\": \"gelu\"",
                "hidden_act",
            ),
            (
                "\"attention_bias\": false",
                "\"attention_bias\": true",
                "attention_bias",
            ),
            (
                "\"use_sliding_window\": false",
                "\"use_sliding_window\": true",
                "use_sliding_window",
            ),
            (
                "\"num_key_value_heads\": 8",
                "\"num_key_value_heads\": 7",
                "num_key_value_heads",
            ),
            (
                "\"num_experts_per_tok\": 8",
                "\"num_experts_per_tok\": 200",
                "num_experts_per_tok",
            ),
            (
                "\"mlp_only_layers\": []",
                "\"mlp_only_layers\": [62]",
                "mlp_only_layers",
            ),
            (
                "[128, 128]",
                "[64, 64]",
                "quantization_config.weight_block_size",
            ),
            (
                "\"rope_scaling\": null",
                "\"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}",
                "rope_scaling.rope_type",
            ),
        ] {
            let text = FP8_CONFIG.replace(from, to);
            assert_ne!(text, FP8_CONFIG, "{from}");
            let err = Qwen3MoeConfig::from_json("m/config.json", &text)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("m/config.json: `{key}` = ")),
                "{err}"
            );
        }
        let err = Qwen3MoeConfig::from_json("m/config.json", "{\"hidden_size\": 8}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn sparse_step_and_mlp_only_layers_choose_moe_layers() {
        let mut c = Preset::Tiny.config();
        c.decoder_sparse_step = 2;
        c.mlp_only_layers = vec![3];
        let moe: Vec<bool> = (0..4).map(|i| c.is_moe_layer(i)).collect();
        assert_eq!(moe, [false, true, false, false]);
    }
}
