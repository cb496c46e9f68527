//! `finetune score`: per-token log-probabilities of token ids or texts under a model and
//! optionally a PEFT LoRA adapter — for comparing adapters and for parity checks.

use crate::cli::ScoreArgs;
use crate::run_dir::write_atomic;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use finetune_model::{lora_scale, Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::Path;

/// Reads a PEFT adapter directory: `adapter_config.json` (r, lora_alpha, use_rslora) and
/// `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` / `lora_B.weight`.
pub fn read_peft_adapter(dir: &Path, model: &Qwen3Moe) -> Result<Lora> {
    let config_path = dir.join("adapter_config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", config_path.display()))?;
    let r = config["r"]
        .as_u64()
        .with_context(|| format!("{}: no integer `r`", config_path.display()))?
        as usize;
    let alpha = config["lora_alpha"].as_f64().unwrap_or(r as f64);
    let rslora = config["use_rslora"].as_bool().unwrap_or(false);
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    let mut adapters = Vec::new();
    let mut used = 0;
    for (name, out, inp) in model.lora_targets() {
        let key = |which: &str| format!("base_model.model.{name}.lora_{which}.weight");
        match (tensors.get(&key("A")), tensors.get(&key("B"))) {
            (Some(a), Some(b)) => {
                if a.dims() != [r, inp] || b.dims() != [out, r] {
                    bail!(
                        "{}: `{}` is {:?} and `{}` is {:?}, expected [{r}, {inp}] and [{out}, {r}]",
                        weights_path.display(),
                        key("A"),
                        a.dims(),
                        key("B"),
                        b.dims()
                    );
                }
                adapters.push((name, a.clone(), b.clone()));
                used += 2;
            }
            (None, None) => {}
            _ => bail!(
                "{}: `{name}` has only one of lora_A and lora_B",
                weights_path.display()
            ),
        }
    }
    if used != tensors.len() {
        let known: std::collections::BTreeSet<String> = adapters
            .iter()
            .flat_map(|(n, _, _)| {
                ["A", "B"].map(|w| format!("base_model.model.{n}.lora_{w}.weight"))
            })
            .collect();
        let unknown: Vec<&String> = tensors
            .keys()
            .filter(|k| !known.contains(*k))
            .take(3)
            .collect();
        bail!(
            "{}: tensors for modules this model does not have: {unknown:?}",
            weights_path.display()
        );
    }
    Ok(Lora::from_tensors(
        r,
        lora_scale(r, alpha, rslora),
        adapters,
    )?)
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
