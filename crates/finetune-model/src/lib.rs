//! Qwen3-MoE (the Qwen3-Coder family) in candle, with LoRA adapters.
//!
//! Reads a Hugging Face `config.json`, loads weights from safetensors in their stored
//! precision (f32, bf16, or FP8 E4M3 with 128×128 block scales, dequantized per use), runs the
//! forward pass (embedding, RMSNorm, RoPE, causal GQA attention over packed sequences, top-k
//! routed SwiGLU experts, lm_head) with LoRA on the chosen projections, and offers presets.
//!
//! Today it holds the configuration ([`config::Qwen3MoeConfig`], read from `config.json` and
//! checked), the presets ([`Preset`], with [`Preset::config`]), weight loading in stored
//! precision incl. FP8 block-128 ([`weights`]) and the reference forward pass in plain candle
//! ops ([`model`], with a KV-cache forward for generation) and LoRA adapters ([`lora`]),
//! checked against transformers. Fused kernels, bf16 compute and `finetune score` are the
//! model issue's remaining work.

pub mod config;
pub mod dropout;
pub mod fp8;
pub mod init;
pub mod lora;
pub mod model;
pub mod peft;
pub mod shard;
pub mod weights;

pub use config::{ConfigError, Qwen3MoeConfig};
pub use lora::{lora_scale, Lora};
pub use model::{KvCache, Qwen3Moe, SequenceContext};
pub use shard::{BaseShard, Cut};
pub use weights::{BaseWeight, Weights, WeightsError};

use std::fmt;
use std::str::FromStr;

/// Built-in model shapes: `tiny` is the embedded default base (runs on 2 CPU cores); the two
/// Qwen3-Coder presets carry the true shapes, for planning and random-init benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Qwen3Coder30bA3b,
    Qwen3Coder480bA35b,
}

impl Preset {
    pub const ALL: [Preset; 3] = [
        Preset::Tiny,
        Preset::Qwen3Coder30bA3b,
        Preset::Qwen3Coder480bA35b,
    ];

    /// The name used on the command line and in recipes.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Qwen3Coder30bA3b => "qwen3-coder-30b-a3b",
            Preset::Qwen3Coder480bA35b => "qwen3-coder-480b-a35b",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Returned when a string is not a preset name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown preset `{0}` (expected one of: tiny, qwen3-coder-30b-a3b, qwen3-coder-480b-a35b)")]
pub struct UnknownPreset(pub String);

impl FromStr for Preset {
    type Err = UnknownPreset;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPreset(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_names_round_trip() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        let err = "qwen3".parse::<Preset>().unwrap_err();
        assert!(err.to_string().contains("qwen3-coder-30b-a3b"), "{err}");
    }
}
