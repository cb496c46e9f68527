//! The embedded default base (`model.base = "tiny"`): the pretrained tiny Qwen3-MoE of
//! `datasets/tiny-base/` (made by `finetune pretrain`, `scripts/rebuild-tiny-base.sh`), inside
//! the binary, so a run needs no file outside it.
//!
//! The weights travel as FP8 E4M3 with power-of-two block scales (2.9 MB instead of 5.7 MB of
//! bf16; deflated with the tokenizer by build.rs, 2.4 MB in all: the CUDA binary must stay
//! within 60 MiB) and are expanded to the bf16 checkpoint `datasets/tiny-base/model.safetensors`,
//! byte for byte (`finetune_model::fp8`). Its
//! tokenizer is fixed: it was trained on the pretraining corpus. `tiny-random` is the earlier
//! randomly initialised base with a BPE trained on each run's pairs (tests, fixtures).

use crate::run_dir::write_atomic;
use anyhow::{Context, Result};
use std::path::Path;

/// `model.base` of the randomly initialised tiny base.
pub const TINY_RANDOM: &str = "tiny-random";

/// `config.json` of the embedded base.
pub const CONFIG: &[u8] = include_bytes!("../../../datasets/tiny-base/config.json");
/// Its weights, `datasets/tiny-base/model.fp8.safetensors` (FP8 E4M3 + power-of-two block
/// scales, `finetune_model::fp8`), raw-deflated by build.rs.
const WEIGHTS_FP8_DEFLATED: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/model.fp8.safetensors.deflate"));
/// Its tokenizer (byte-level BPE trained on the pretraining corpus), raw-deflated by build.rs.
const TOKENIZER_DEFLATED: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokenizer.json.deflate"));

fn inflate(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(bytes)
        .read_to_end(&mut out)
        .context("inflating the embedded tiny base")?;
    Ok(out)
}

/// Writes the embedded base into `dir` as a Hugging Face checkpoint: `config.json`,
/// `model.safetensors` (bf16), `tokenizer.json`, each atomically.
pub fn write_into(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights = finetune_model::fp8::expand_to_bf16(&inflate(WEIGHTS_FP8_DEFLATED)?)
        .context("expanding the embedded tiny base")?;
    write_atomic(&dir.join("model.safetensors"), &weights)?;
    write_atomic(&dir.join("tokenizer.json"), &inflate(TOKENIZER_DEFLATED)?)?;
    write_atomic(&dir.join("config.json"), CONFIG)?;
    Ok(())
}

/// Mean next-token loss (nats) of `text` under the model in `dir` (config.json, weights,
/// tokenizer.json), in windows of `seq_len` tokens, and the tokens predicted.
pub fn text_loss(dir: &Path, text: &str, seq_len: usize) -> Result<(f64, usize)> {
    use finetune_model::{Qwen3Moe, Qwen3MoeConfig, Weights};
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = finetune_data::load_tokenizer(&dir.join("tokenizer.json"), config.vocab_size)?;
    let device = candle_core::Device::Cpu;
    let weights = Weights::open(dir, &device)?;
    let model = Qwen3Moe::load(config, &weights, &device)?;
    let ids = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec();
    let (mut sum, mut n) = (0f64, 0usize);
    for window in ids.chunks(seq_len.max(2)).filter(|w| w.len() >= 2) {
        let positions: Vec<u32> = (0..window.len() as u32).collect();
        let logits = model.forward(window, &positions)?;
        sum -= Qwen3Moe::token_logprobs(&logits, window)?
            .iter()
            .sum::<f64>();
        n += window.len() - 1;
    }
    anyhow::ensure!(n > 0, "no tokens to score");
    Ok((sum / n as f64, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../datasets/tiny-base")
            .join(path)
    }

    #[test]
    fn embedded_weights_expand_to_the_committed_bf16_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        write_into(dir.path()).unwrap();
        for file in ["model.safetensors", "config.json", "tokenizer.json"] {
            assert!(
                std::fs::read(dir.path().join(file)).unwrap()
                    == std::fs::read(committed(file)).unwrap(),
                "{file} differs from datasets/tiny-base/{file}"
            );
        }
    }

    /// The acceptance test of the pretrained base: on code it never saw (a file written for
    /// this repository), its loss is far below the same model's at its random init.
    #[test]
    fn the_embedded_base_predicts_unseen_code_far_better_than_random_init() {
        let dir = tempfile::tempdir().unwrap();
        let (pretrained, random) = (dir.path().join("pretrained"), dir.path().join("random"));
        write_into(&pretrained).unwrap();
        let config =
            finetune_model::Qwen3MoeConfig::from_file(&pretrained.join("config.json")).unwrap();
        finetune_model::init::write_random_checkpoint(&config, 0, &random).unwrap();
        std::fs::copy(
            pretrained.join("tokenizer.json"),
            random.join("tokenizer.json"),
        )
        .unwrap();
        let text = std::fs::read_to_string(committed("sample/interval_set.rs")).unwrap();
        let (trained, n) = text_loss(&pretrained, &text, 1024).unwrap();
        let (init, _) = text_loss(&random, &text, 1024).unwrap();
        let uniform = (config.vocab_size as f64).ln();
        eprintln!(
            "{n} tokens: pretrained {trained:.3}, random init {init:.3}, uniform {uniform:.3}"
        );
        assert!(
            (init - uniform).abs() < 0.2,
            "random init {init} vs uniform {uniform}"
        );
        assert!(
            trained < init - MARGIN,
            "pretrained {trained} vs random init {init}"
        );
    }

    /// How much lower (nats per token) the pretrained base's loss must be.
    const MARGIN: f64 = 3.0;
}
