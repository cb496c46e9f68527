//! The per-expert PEFT layout (`--format peft`) and the completion both adapter layouts start
//! from.

use crate::{file_error, lora_targets, ExportError, Source};
use candle_core::{DType, Tensor};
use finetune_model::peft::{self, AdapterMeta};
use finetune_model::{Lora, Qwen3MoeConfig};
use std::collections::BTreeSet;
use std::path::Path;

/// Projection kinds in the order PEFT configs list them.
pub const MODULE_KINDS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Where a projection sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// `model.layers.{L}.self_attn.{q,k,v,o}_proj`
    Attention,
    /// `model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj`
    Expert,
    /// `model.layers.{L}.mlp.{gate,up,down}_proj` of a dense (`mlp_only_layers`) layer
    Dense,
}

/// Where module `name` sits and its kind (`q_proj`, …).
pub fn place_and_kind(name: &str) -> (Place, &str) {
    let kind = name.rsplit('.').next().unwrap_or(name);
    let place = if name.contains(".self_attn.") {
        Place::Attention
    } else if name.contains(".mlp.experts.") {
        Place::Expert
    } else {
        Place::Dense
    };
    (place, kind)
}

/// The adapter made complete for serving: every projection of a kind that it adapts somewhere
/// gets an adapter (attention and dense MLP projections per kind); if it adapts any expert
/// projection, every expert of every MoE layer gets gate, up and down, as vLLM requires (it
/// silently ignores what does not fit). What is added is zero (A = 0, B = 0), so the adapted
/// model computes exactly the same. Returns the completed adapter and the added module names.
pub fn complete(lora: &Lora, config: &Qwen3MoeConfig) -> Result<(Lora, Vec<String>), ExportError> {
    let targets = lora_targets(config);
    let known: BTreeSet<&str> = targets.iter().map(|(n, _, _)| n.as_str()).collect();
    if let Some(unknown) = lora.names().find(|n| !known.contains(n)) {
        return Err(ExportError::Refused(format!(
            "the adapter has `{unknown}`, a module this model does not have"
        )));
    }
    let present: BTreeSet<(Place, &str)> = lora.names().map(place_and_kind).collect();
    let any_expert = present.iter().any(|(p, _)| *p == Place::Expert);
    let r = lora.r;
    let mut tensors = Vec::new();
    let mut filled = Vec::new();
    for (name, out, inp) in &targets {
        let (place, kind) = place_and_kind(name);
        let wanted = match place {
            Place::Expert => any_expert,
            _ => present.contains(&(place, kind)),
        };
        if !wanted {
            continue;
        }
        match lora.get(name) {
            Some((a, b)) => tensors.push((name.clone(), a.clone(), b.clone())),
            None => {
                let device = candle_core::Device::Cpu;
                tensors.push((
                    name.clone(),
                    Tensor::zeros((r, *inp), DType::F32, &device)?,
                    Tensor::zeros((*out, r), DType::F32, &device)?,
                ));
                filled.push(name.clone());
            }
        }
    }
    Ok((Lora::from_tensors(r, lora.scale, tensors)?, filled))
}

/// Projection kinds an adapter has, in [`MODULE_KINDS`] order.
pub fn module_kinds(lora: &Lora) -> Vec<String> {
    let present: BTreeSet<&str> = lora.names().map(|n| place_and_kind(n).1).collect();
    MODULE_KINDS
        .into_iter()
        .filter(|k| present.contains(k))
        .map(String::from)
        .collect()
}

/// The `adapter_config.json` fields of an exported adapter: the source's rank, alpha and
/// scaling rule, the kinds it adapts, `base_model_name_or_path` pointing at the base, and
/// `lora_dropout` = 0 (a training setting; PEFT refuses dropout on fused experts).
pub fn export_meta(source: &Source, lora: &Lora) -> AdapterMeta {
    AdapterMeta {
        base_model_name_or_path: source.base_name(),
        r: source.meta.r,
        lora_alpha: source.meta.lora_alpha,
        lora_dropout: 0.0,
        use_rslora: source.meta.use_rslora,
        target_modules: module_kinds(lora),
    }
}

/// What [`export_peft`] wrote.
#[derive(Debug, Clone)]
pub struct PeftReport {
    pub r: usize,
    pub modules: usize,
    /// Modules added with zero A and B by [`complete`].
    pub filled: Vec<String>,
    /// Dense (`mlp_only_layers`) layers whose MLP is adapted: PEFT 0.21 on transformers 5 drops
    /// their adapters when it loads this layout (it retargets every gate/up/down_proj to the
    /// fused experts); vLLM and SGLang are not affected.
    pub dense_mlp_layers: Vec<usize>,
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Writes `source` as a per-expert PEFT adapter into `dir` (an existing empty directory),
/// completed by [`complete`], then reads it back with [`peft::read_adapter`] and checks that
/// every tensor is the one meant.
pub fn export_peft(source: &Source, dir: &Path) -> Result<PeftReport, ExportError> {
    let (lora, filled) = complete(&source.lora, &source.config)?;
    let meta = export_meta(source, &lora);
    peft::write_adapter(&lora, &meta, dir)?;
    // Read back: the same modules, tensors bit for bit, the same scale.
    let (back, back_meta) = peft::read_adapter(dir, &lora_targets(&source.config))?;
    let weights = dir.join("adapter_model.safetensors");
    if back_meta != meta || back.len() != lora.len() || back.scale != lora.scale {
        return Err(file_error(
            &weights,
            "reads back differently from what was written",
        ));
    }
    for ((n1, a1, b1), (n2, a2, b2)) in lora.tensors().zip(back.tensors()) {
        let same = |x: &Tensor, y: &Tensor| -> Result<bool, ExportError> {
            let x: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
            Ok(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()) && x.len() == y.len())
        };
        if n1 != n2 || !same(&a1, &a2)? || !same(&b1, &b2)? {
            return Err(file_error(
                &weights,
                format!("`{n1}` reads back differently from what was written"),
            ));
        }
    }
    let dense_mlp_layers: BTreeSet<usize> = lora
        .names()
        .filter(|n| place_and_kind(n).0 == Place::Dense)
        .filter_map(layer_of)
        .collect();
    Ok(PeftReport {
        r: lora.r,
        modules: lora.len(),
        filled,
        dense_mlp_layers: dense_mlp_layers.into_iter().collect(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use finetune_model::Preset;

    pub(crate) fn small_config() -> Qwen3MoeConfig {
        let mut c = Preset::Tiny.config();
        c.vocab_size = 64;
        c.hidden_size = 16;
        c.head_dim = Some(4);
        c.num_attention_heads = 2;
        c.num_key_value_heads = 1;
        c.intermediate_size = 24;
        c.moe_intermediate_size = 8;
        c.num_experts = 3;
        c.num_hidden_layers = 3;
        c.mlp_only_layers = vec![2];
        c
    }

    #[test]
    fn completion_fills_every_expert_with_zeros_and_keeps_the_rest() {
        let config = small_config();
        let targets = lora_targets(&config);
        // Only q_proj of layer 0 and down_proj of one expert.
        let modules: Vec<String> = vec!["q_proj".into(), "down_proj".into()];
        let some: Vec<(String, usize, usize)> = targets
            .iter()
            .filter(|(n, _, _)| {
                n == "model.layers.0.self_attn.q_proj"
                    || n == "model.layers.1.mlp.experts.2.down_proj"
            })
            .cloned()
            .collect();
        let lora = Lora::init(&some, &modules, 2, 1.5, 1, &candle_core::Device::Cpu).unwrap();
        let (full, filled) = complete(&lora, &config).unwrap();
        assert_eq!(full.scale, 1.5);
        // q_proj on all 3 layers, gate/up/down on 3 experts × 2 MoE layers; no dense MLP.
        assert_eq!(full.len(), 3 + 3 * 3 * 2);
        assert_eq!(filled.len(), full.len() - 2);
        assert!(full.names().all(|n| !n.contains("layers.2.mlp")));
        let (a, b) = full.get("model.layers.1.mlp.experts.2.down_proj").unwrap();
        let (a0, b0) = lora.get("model.layers.1.mlp.experts.2.down_proj").unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), a0.to_vec2::<f32>().unwrap());
        assert_eq!(b.to_vec2::<f32>().unwrap(), b0.to_vec2::<f32>().unwrap());
        let (a, b) = full.get("model.layers.0.mlp.experts.0.gate_proj").unwrap();
        assert_eq!(a.dims(), [2, 16]);
        assert_eq!(b.dims(), [8, 2]);
        assert_eq!(
            a.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert_eq!(
            module_kinds(&full),
            ["q_proj", "gate_proj", "up_proj", "down_proj"]
        );
        // A module the model does not have is refused by name.
        let alien = vec![("model.layers.7.self_attn.q_proj".to_string(), 8, 16)];
        let lora = Lora::init(&alien, &modules, 2, 1.0, 1, &candle_core::Device::Cpu).unwrap();
        let e = complete(&lora, &config).err().unwrap().to_string();
        assert!(e.contains("model.layers.7.self_attn.q_proj"), "{e}");
    }
}
