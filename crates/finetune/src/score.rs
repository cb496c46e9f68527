//! `finetune score`: per-token log-probabilities of token ids or texts under a model and
//! optionally a PEFT LoRA adapter — for comparing adapters and for parity checks.

use crate::cli::ScoreArgs;
use crate::run_dir::write_atomic;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use finetune_model::{Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::Path;

/// Reads a PEFT adapter directory for `model` (see [`finetune_model::peft`]).
pub fn read_peft_adapter(dir: &Path, model: &Qwen3Moe) -> Result<Lora> {
    Ok(finetune_model::peft::read_adapter(dir, &model.lora_targets())?.0)
}

pub fn command(args: &ScoreArgs) -> Result<Outcome> {
    let config = Qwen3MoeConfig::from_file(&args.model.join("config.json"))?;
    let vocab = config.vocab_size;
    let weights = Weights::open(&args.model, &Device::Cpu)?;
    let model = Qwen3Moe::load(config, &weights, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let lora = match &args.adapter {
        Some(dir) => Some(read_peft_adapter(dir, &model)?),
        None => None,
    };
    let tokenizer_path = args.model.join("tokenizer.json");
    let mut tokenizer = None;
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let mut out = String::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", args.input.display(), n + 1);
        let mut record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let ids: Vec<u32> = if let Some(ids) = record["ids"].as_array() {
            ids.iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|&i| (i as usize) < vocab)
                        .map(|i| i as u32)
                        .with_context(|| format!("{}: `ids` must be token ids below {vocab}", at()))
                })
                .collect::<Result<_>>()?
        } else if let Some(t) = record["text"].as_str() {
            if tokenizer.is_none() {
                tokenizer = Some(tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(
                    |e| {
                        anyhow::anyhow!(
                            "{}: {e} (needed for \"text\" inputs)",
                            tokenizer_path.display()
                        )
                    },
                )?);
            }
            let enc = tokenizer
                .as_ref()
                .expect("set above")
                .encode(t, false)
                .map_err(|e| anyhow::anyhow!("{}: cannot tokenize: {e}", at()))?;
            enc.get_ids().to_vec()
        } else {
            bail!("{}: expected an `ids` array or a `text` string", at());
        };
        if ids.len() < 2 {
            bail!("{}: need at least two tokens to score", at());
        }
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        let logits = model.forward_with(&ids, &positions, lora.as_ref())?;
        let lp = Qwen3Moe::token_logprobs(&logits, &ids)?;
        record["ids"] = serde_json::json!(ids);
        let mut with_first: Vec<Option<f64>> = vec![None];
        with_first.extend(lp.iter().map(|&v| Some(v)));
        record["logprobs"] = serde_json::json!(with_first);
        record["total"] = serde_json::json!(lp.iter().sum::<f64>());
        out.push_str(&serde_json::to_string(&record)?);
        out.push('\n');
    }
    write_atomic(&args.out, out.as_bytes())?;
    Ok(Outcome::Done)
}
