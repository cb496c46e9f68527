//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `….lora_B.weight` (`[out, r]`),
//! the per-expert layout that PEFT, vLLM and SGLang load (DESIGN.md, "Export and serving").
//! Reading checks every tensor against the model's projections, so an adapter of the wrong
//! shape or for another model is refused by name.

use crate::lora::{lora_scale, Lora};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{}: {message}", path.display())]
    Bad { path: PathBuf, message: String },
}

fn bad(path: &Path, message: impl Into<String>) -> PeftError {
    PeftError::Bad {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// What `adapter_config.json` records besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMeta {
    pub base_model_name_or_path: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    /// Module kinds (`q_proj`, `down_proj`, …).
    pub target_modules: Vec<String>,
}

/// `base_model.model.<module>.lora_{A,B}.weight`.
pub fn peft_key(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Reads the adapter in `dir` for a model whose adaptable projections are `targets`
/// (`(module, out, in)`, [`crate::Qwen3Moe::lora_targets`]).
pub fn read_adapter(
    dir: &Path,
    targets: &[(String, usize, usize)],
) -> Result<(Lora, AdapterMeta), PeftError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| bad(&config_path, format!("cannot read: {e}")))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&config_path, format!("not JSON: {e}")))?;
    let r = config["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(&config_path, "no positive integer `r`"))? as usize;
    let meta = AdapterMeta {
        base_model_name_or_path: config["base_model_name_or_path"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        r,
        lora_alpha: config["lora_alpha"].as_f64().unwrap_or(r as f64),
        lora_dropout: config["lora_dropout"].as_f64().unwrap_or(0.0),
        use_rslora: config["use_rslora"].as_bool().unwrap_or(false),
        target_modules: config["target_modules"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|e| bad(&weights_path, format!("cannot read: {e}")))?;
    let mut adapters = Vec::new();
    let mut known = BTreeSet::new();
    for (name, out, inp) in targets {
        let (ka, kb) = (peft_key(name, 'A'), peft_key(name, 'B'));
        match (tensors.get(&ka), tensors.get(&kb)) {
            (Some(a), Some(b)) => {
                if a.dims() != [r, *inp] || b.dims() != [*out, r] {
                    return Err(bad(
                        &weights_path,
                        format!(
                            "`{ka}` is {:?} and `{kb}` is {:?}, but this model needs [{r}, {inp}] and [{out}, {r}] (r = {r} from adapter_config.json)",
                            a.dims(),
                            b.dims()
                        ),
                    ));
                }
                adapters.push((name.clone(), a.clone(), b.clone()));
                known.insert(ka);
                known.insert(kb);
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    &weights_path,
                    format!("`{name}` has only one of lora_A and lora_B"),
                ))
            }
        }
    }
    let unknown: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
    if !unknown.is_empty() {
        let mut unknown: Vec<&String> = unknown;
        unknown.sort();
        unknown.truncate(3);
        return Err(bad(
            &weights_path,
            format!("tensors for modules this model does not have: {unknown:?}"),
        ));
    }
    if adapters.is_empty() {
        return Err(bad(&weights_path, "no LoRA tensors"));
    }
    let lora = Lora::from_tensors(r, lora_scale(r, meta.lora_alpha, meta.use_rslora), adapters)
        .map_err(|e| bad(&weights_path, e.to_string()))?;
    Ok((lora, meta))
}

/// Writes `lora` into `dir` (created) as a PEFT adapter; each file atomically.
pub fn write_adapter(lora: &Lora, meta: &AdapterMeta, dir: &Path) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(|e| bad(dir, e.to_string()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, a, b) in lora.tensors() {
        // An expert's A and B are views of its stack: copied out contiguously (safetensors
        // writes a tensor's own bytes).
        let f32 = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .and_then(|t| t.contiguous())
                .map_err(|e| bad(dir, e.to_string()))
        };
        tensors.insert(peft_key(name, 'A'), f32(&a)?);
        tensors.insert(peft_key(name, 'B'), f32(&b)?);
    }
    let path = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| bad(&path, e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| bad(&path, e.to_string()))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_model_name_or_path,
        "r": meta.r,
        "lora_alpha": meta.lora_alpha,
        "lora_dropout": meta.lora_dropout,
        "use_rslora": meta.use_rslora,
        "target_modules": meta.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    });
    let path = dir.join("adapter_config.json");
    let tmp = dir.join(".adapter_config.json.tmp");
    let text = serde_json::to_string_pretty(&config).map_err(|e| bad(&path, e.to_string()))?;
    std::fs::write(&tmp, text + "\n").map_err(|e| bad(&path, e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| bad(&path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<(String, usize, usize)> {
        vec![
            ("model.layers.0.self_attn.q_proj".into(), 8, 6),
            ("model.layers.0.mlp.experts.1.down_proj".into(), 6, 4),
        ]
    }

    #[test]
    fn written_adapter_reads_back_equal_and_wrong_shapes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let modules = ["q_proj".to_string(), "down_proj".to_string()];
        let lora = Lora::init(&targets(), &modules, 2, 8.0, 3, &Device::Cpu).unwrap();
        let meta = AdapterMeta {
            base_model_name_or_path: "tiny".into(),
            r: 2,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: modules.to_vec(),
        };
        write_adapter(&lora, &meta, dir.path()).unwrap();
        let (back, meta_back) = read_adapter(dir.path(), &targets()).unwrap();
        assert_eq!(meta_back, meta);
        assert_eq!(back.scale, 8.0);
        for ((n1, a1, b1), (n2, a2, b2)) in lora.tensors().zip(back.tensors()) {
            assert_eq!(n1, n2);
            assert_eq!(a1.to_vec2::<f32>().unwrap(), a2.to_vec2::<f32>().unwrap());
            assert_eq!(b1.to_vec2::<f32>().unwrap(), b2.to_vec2::<f32>().unwrap());
        }
        // Same adapter against a model with other widths: refused, naming the tensor.
        let other = vec![("model.layers.0.self_attn.q_proj".to_string(), 8, 7)];
        let e = read_adapter(dir.path(), &other)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            e.contains("adapter_model.safetensors")
                && e.contains("q_proj.lora_A.weight")
                && e.contains("[2, 7]"),
            "{e}"
        );
        // A model without the expert: the extra tensors are named.
        let fewer = vec![("model.layers.0.self_attn.q_proj".to_string(), 8, 6)];
        let e = read_adapter(dir.path(), &fewer)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains("experts.1.down_proj"), "{e}");
        let e = read_adapter(&dir.path().join("nope"), &fewer)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains("adapter_config.json"), "{e}");
    }
}
