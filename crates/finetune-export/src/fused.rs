//! PEFT's `target_parameters` layout for transformers ≥ 5 (`--format peft-fused`).
//!
//! transformers 5 loads a Qwen3-MoE layer's experts as two 3D parameters,
//! `mlp.experts.gate_up_proj` `[E, 2I, H]` (each expert's gate rows, then its up rows) and
//! `mlp.experts.down_proj` `[E, H, I]`. PEFT 0.21 adapts them with `lora.ParamWrapper`, one per
//! parameter, nested on the experts module: `down_proj` outside, `gate_up_proj` inside (its
//! keys carry `base_layer.`). For a wrapper of rank ρ over E experts (PEFT's
//! `ParamWrapper.get_delta_weight`):
//!
//! - `lora_A.weight` is `[E·ρ, in]`; expert e's A is rows `e·ρ .. e·ρ + ρ` (expert-major);
//! - `lora_B.weight` is `[out, ρ·E]`; expert e's B is columns `k·E + e`, k = 0..ρ (rank-major);
//! - ΔW_e = scaling · B_e · A_e with scaling = lora_alpha / ρ (rsLoRA: / √ρ), `rank_pattern` and
//!   `alpha_pattern` giving ρ and alpha per parameter.
//!
//! A per-expert rank-r LoRA on gate and one on up are exactly one rank-2r LoRA on the fused
//! `gate_up_proj`: A_e = [A_gate_e; A_up_e] and B_e = [[B_gate_e, 0], [0, B_up_e]]. Its scale
//! stays s through `alpha_pattern` (2·alpha for alpha/r, √2·alpha for rsLoRA). `down_proj` keeps
//! rank r. This is what PEFT itself builds when it loads the per-expert layout
//! (`peft.utils.transformers_weight_conversion`; `scripts/verify_peft.py` checks the tensors
//! are equal). Attention projections stay `target_modules`; the gate/up/down projections of a
//! dense (`mlp_only_layers`) layer are targeted as the 2D parameters `mlp.{gate,up,down}_proj.weight`
//! (a `target_modules` entry ending in `gate_proj`, `up_proj` or `down_proj` would be retargeted
//! to the fused experts by PEFT's transformers-5 conversion, losing the dense layer's adapter);
//! their keys are the usual `….mlp.gate_proj.lora_A.weight`.

use crate::adapter::{complete, export_meta, place_and_kind, Place};
use crate::{file_error, write_file, ExportError, Source};
use candle_core::{DType, Tensor};
use finetune_model::peft::peft_key;
use finetune_model::{Lora, Qwen3MoeConfig};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The rank_pattern / alpha_pattern key PEFT itself writes for the fused gate/up parameter.
pub const GATE_UP_PATTERN: &str = r".*\.gate_up_proj";

/// A fused adapter: its tensors by PEFT key and its `adapter_config.json`.
pub struct Fused {
    pub tensors: HashMap<String, Tensor>,
    pub config: serde_json::Value,
}

/// Stacks expert tensors `[out, ρ]` into PEFT's `[out, ρ·E]` (column k·E + e).
fn rank_major(bs: &[Tensor]) -> Result<Tensor, ExportError> {
    let stacked = Tensor::stack(bs, 0)?; // [E, out, ρ]
    let (e, out, rho) = stacked.dims3()?;
    Ok(stacked
        .permute((1, 2, 0))?
        .contiguous()?
        .reshape((out, rho * e))?)
}

/// Converts a per-expert adapter (completed by [`complete`], so every expert has gate, up and
/// down) into the fused layout; `meta` gives r, alpha, rsLoRA and `base_model_name_or_path`.
pub fn to_fused(
    lora: &Lora,
    config: &Qwen3MoeConfig,
    meta: &finetune_model::peft::AdapterMeta,
) -> Result<Fused, ExportError> {
    let r = lora.r;
    let get = |name: &str| -> Result<(Tensor, Tensor), ExportError> {
        lora.get(name)
            .map(|(a, b)| (a.clone(), b.clone()))
            .ok_or_else(|| {
                ExportError::Refused(format!(
                    "`{name}` has no adapter while other experts of its layer do (complete the adapter first)"
                ))
            })
    };
    let mut tensors = HashMap::new();
    let mut attention = BTreeSet::new();
    let mut dense = BTreeSet::new();
    let mut experts = false;
    for name in lora.names() {
        let (place, kind) = place_and_kind(name);
        match place {
            Place::Attention => {
                attention.insert(kind.to_string());
            }
            Place::Dense => {
                dense.insert(kind.to_string());
            }
            Place::Expert => experts = true,
        }
        if place != Place::Expert {
            let (a, b) = get(name)?;
            tensors.insert(peft_key(name, 'A'), a.to_dtype(DType::F32)?);
            tensors.insert(peft_key(name, 'B'), b.to_dtype(DType::F32)?);
        }
    }
    if experts {
        for layer in (0..config.num_hidden_layers).filter(|&l| config.is_moe_layer(l)) {
            let p = format!("model.layers.{layer}.mlp.experts");
            let (mut a_gate_up, mut b_gate_up, mut a_down, mut b_down) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for e in 0..config.num_experts {
                let (ag, bg) = get(&format!("{p}.{e}.gate_proj"))?;
                let (au, bu) = get(&format!("{p}.{e}.up_proj"))?;
                let (ad, bd) = get(&format!("{p}.{e}.down_proj"))?;
                a_gate_up.push(ag);
                a_gate_up.push(au);
                // Block-diagonal [[B_gate, 0], [0, B_up]], [2I, 2r].
                let (i_g, i_u) = (bg.dims2()?.0, bu.dims2()?.0);
                let top = Tensor::cat(
                    &[&bg, &Tensor::zeros((i_g, r), DType::F32, bg.device())?],
                    1,
                )?;
                let bottom = Tensor::cat(
                    &[&Tensor::zeros((i_u, r), DType::F32, bu.device())?, &bu],
                    1,
                )?;
                b_gate_up.push(Tensor::cat(&[top, bottom], 0)?);
                a_down.push(ad);
                b_down.push(bd);
            }
            let key = |inner: bool, which: char| {
                format!(
                    "base_model.model.{p}.{}lora_{which}.weight",
                    if inner { "base_layer." } else { "" }
                )
            };
            tensors.insert(key(true, 'A'), Tensor::cat(&a_gate_up, 0)?);
            tensors.insert(key(true, 'B'), rank_major(&b_gate_up)?);
            tensors.insert(key(false, 'A'), Tensor::cat(&a_down, 0)?);
            tensors.insert(key(false, 'B'), rank_major(&b_down)?);
        }
    }
    let order = |set: &BTreeSet<String>| -> Vec<String> {
        crate::adapter::MODULE_KINDS
            .into_iter()
            .filter(|k| set.contains(*k))
            .map(String::from)
            .collect()
    };
    let mut target_parameters: Vec<String> = Vec::new();
    if experts {
        target_parameters.push("mlp.experts.gate_up_proj".into());
        target_parameters.push("mlp.experts.down_proj".into());
    }
    target_parameters.extend(order(&dense).into_iter().map(|k| format!("mlp.{k}.weight")));
    let (mut rank_pattern, mut alpha_pattern) = (serde_json::Map::new(), serde_json::Map::new());
    if experts {
        // Rank 2r; the same scale s as every other module.
        let alpha = if meta.use_rslora {
            meta.lora_alpha * std::f64::consts::SQRT_2
        } else {
            meta.lora_alpha * 2.0
        };
        rank_pattern.insert(GATE_UP_PATTERN.into(), (2 * r).into());
        alpha_pattern.insert(GATE_UP_PATTERN.into(), alpha.into());
    }
    let config_json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_model_name_or_path,
        "r": r,
        "lora_alpha": meta.lora_alpha,
        "lora_dropout": 0.0,
        "use_rslora": meta.use_rslora,
        "target_modules": order(&attention),
        "target_parameters": target_parameters,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    });
    Ok(Fused {
        tensors,
        config: config_json,
    })
}

/// What [`export_fused`] wrote.
#[derive(Debug, Clone)]
pub struct FusedReport {
    pub r: usize,
    /// Rank of the fused gate/up adapters (2r), when experts are adapted.
    pub gate_up_rank: Option<usize>,
    pub tensors: usize,
    pub filled: Vec<String>,
}

/// Writes `source` in the fused layout into `dir` (an existing empty directory).
pub fn export_fused(source: &Source, dir: &Path) -> Result<FusedReport, ExportError> {
    let (lora, filled) = complete(&source.lora, &source.config)?;
    let meta = export_meta(source, &lora);
    let fused = to_fused(&lora, &source.config, &meta)?;
    let path = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&fused.tensors, &tmp).map_err(|e| file_error(&path, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| file_error(&path, e))?;
    let text = serde_json::to_string_pretty(&fused.config)
        .map_err(|e| file_error(&dir.join("adapter_config.json"), e))?;
    write_file(&dir.join("adapter_config.json"), (text + "\n").as_bytes())?;
    let gate_up_rank = fused.config["rank_pattern"][GATE_UP_PATTERN]
        .as_u64()
        .map(|v| v as usize);
    Ok(FusedReport {
        r: lora.r,
        gate_up_rank,
        tensors: fused.tensors.len(),
        filled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tests::small_config;
    use crate::lora_targets;
    use candle_core::Device;

    /// ΔW of expert `e` from a fused wrapper, written the way PEFT's
    /// `ParamWrapper.get_delta_weight` computes it (A reshaped to [E, ρ, in], B to [out, ρ, E]),
    /// without the scale.
    fn peft_delta(a: &Tensor, b: &Tensor, experts: usize, e: usize) -> Tensor {
        let (rows, inp) = a.dims2().unwrap();
        let rho = rows / experts;
        let a_e = a.reshape((experts, rho, inp)).unwrap().get(e).unwrap();
        let out = b.dims2().unwrap().0;
        let b_e = b
            .reshape((out, rho, experts))
            .unwrap()
            .narrow(2, e, 1)
            .unwrap()
            .squeeze(2)
            .unwrap();
        b_e.matmul(&a_e).unwrap()
    }

    fn max_diff(x: &Tensor, y: &Tensor) -> f32 {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fused_deltas_equal_the_per_expert_ones() {
        let config = small_config();
        let targets = lora_targets(&config);
        let modules: Vec<String> = crate::adapter::MODULE_KINDS.map(String::from).to_vec();
        let init = Lora::init(&targets, &modules, 3, 0.5, 7, &Device::Cpu).unwrap();
        // Non-zero B everywhere, so that every block of the layout shows.
        let lora = Lora::from_tensors(
            3,
            0.5,
            init.tensors().enumerate().map(|(i, (n, a, b))| {
                let b = Tensor::arange(0f32, b.elem_count() as f32, &Device::Cpu)
                    .unwrap()
                    .reshape(b.shape())
                    .unwrap()
                    .affine(0.01, 0.1 + i as f64)
                    .unwrap();
                (n.to_string(), a.clone(), b)
            }),
        )
        .unwrap();
        let meta = finetune_model::peft::AdapterMeta {
            base_model_name_or_path: "base".into(),
            r: 3,
            lora_alpha: 1.5,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: modules.clone(),
        };
        let fused = to_fused(&lora, &config, &meta).unwrap();
        let c = &fused.config;
        assert_eq!(
            c["target_modules"],
            serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"])
        );
        assert_eq!(
            c["target_parameters"],
            serde_json::json!([
                "mlp.experts.gate_up_proj",
                "mlp.experts.down_proj",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight"
            ])
        );
        assert_eq!(c["rank_pattern"][GATE_UP_PATTERN], 6);
        // Scale of the fused gate/up = alpha' / 2r = 3.0 / 6 = lora_alpha / r.
        assert_eq!(c["alpha_pattern"][GATE_UP_PATTERN], 3.0);
        let experts = config.num_experts;
        for layer in 0..2 {
            let p = format!("base_model.model.model.layers.{layer}.mlp.experts");
            let a = &fused.tensors[&format!("{p}.base_layer.lora_A.weight")];
            let b = &fused.tensors[&format!("{p}.base_layer.lora_B.weight")];
            assert_eq!(a.dims(), [experts * 6, 16]);
            assert_eq!(b.dims(), [16, 6 * experts]);
            let ad = &fused.tensors[&format!("{p}.lora_A.weight")];
            let bd = &fused.tensors[&format!("{p}.lora_B.weight")];
            assert_eq!(ad.dims(), [experts * 3, 8]);
            assert_eq!(bd.dims(), [16, 3 * experts]);
            for e in 0..experts {
                let name = |k: &str| format!("model.layers.{layer}.mlp.experts.{e}.{k}");
                let delta = |k: &str| {
                    let (a, b) = lora.get(&name(k)).unwrap();
                    b.matmul(&a).unwrap()
                };
                let want = Tensor::cat(&[delta("gate_proj"), delta("up_proj")], 0).unwrap();
                assert!(max_diff(&peft_delta(a, b, experts, e), &want) < 1e-6);
                assert!(max_diff(&peft_delta(ad, bd, experts, e), &delta("down_proj")) < 1e-6);
            }
        }
        // Dense and attention keys are the per-expert layout's.
        for name in [
            "model.layers.2.mlp.up_proj",
            "model.layers.1.self_attn.o_proj",
        ] {
            let (a, _) = lora.get(name).unwrap();
            assert_eq!(max_diff(&fused.tensors[&peft_key(name, 'A')], &a), 0.0);
        }
        assert_eq!(fused.tensors.len(), 2 * (3 * 4 + 3 + 2 * 2));
        // rsLoRA keeps the scale too: alpha' / sqrt(2r) = alpha / sqrt(r).
        let rs = to_fused(
            &lora,
            &config,
            &finetune_model::peft::AdapterMeta {
                use_rslora: true,
                ..meta
            },
        )
        .unwrap();
        let alpha = rs.config["alpha_pattern"][GATE_UP_PATTERN]
            .as_f64()
            .unwrap();
        assert!((alpha / 6f64.sqrt() - 1.5 / 3f64.sqrt()).abs() < 1e-12);
    }
}
