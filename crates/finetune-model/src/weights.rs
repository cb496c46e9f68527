//! Weights of a Hugging Face model directory: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped; every tensor checked by name and shape.
//!
//! Frozen projections keep their stored precision ([`BaseWeight`]): f32/bf16/f16 as stored, or
//! FP8 E4M3 with one f32 scale per 128×128 block (`<name>.weight_scale_inv`, the
//! Qwen3-Coder-*-FP8 layout), and are dequantized when used — never as a full-precision copy of
//! the whole model.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Errors loading weights; each names the file or the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{0}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights(PathBuf),
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("missing tensor `{name}` (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {found:?}, expected {expected}")]
    Dtype {
        name: String,
        found: DType,
        expected: &'static str,
    },
    #[error("unexpected tensors not used by the model: {0}")]
    Unexpected(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Side of the FP8 scale blocks.
pub const FP8_BLOCK: usize = 128;

/// A frozen projection weight `[out, in]` in its stored precision.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// f32, bf16 or f16, as stored.
    Dense(Tensor),
    /// FP8 E4M3 values and f32 scales `[ceil(out/128), ceil(in/128)]`:
    /// W[i][j] = q[i][j] · scale_inv[i / 128][j / 128].
    Fp8 { q: Tensor, scale_inv: Tensor },
}

impl BaseWeight {
    pub fn shape(&self) -> &[usize] {
        match self {
            BaseWeight::Dense(t) => t.dims(),
            BaseWeight::Fp8 { q, .. } => q.dims(),
        }
    }

    /// The weight in `dtype`, dequantized for this use only.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => t.to_dtype(dtype),
            BaseWeight::Fp8 { q, scale_inv } => {
                let (out, inp) = q.dims2()?;
                let (r, c) = scale_inv.dims2()?;
                let scale = scale_inv
                    .to_dtype(DType::F32)?
                    .reshape((r, 1, c, 1))?
                    .broadcast_as((r, FP8_BLOCK, c, FP8_BLOCK))?
                    .reshape((r * FP8_BLOCK, c * FP8_BLOCK))?
                    .narrow(0, 0, out)?
                    .narrow(1, 0, inp)?;
                (q.to_dtype(DType::F32)? * scale)?.to_dtype(dtype)
            }
        }
    }
}

/// The safetensors of one model directory.
pub struct Weights {
    st: candle_core::safetensors::MmapedSafetensors,
    names: BTreeSet<String>,
    used: std::cell::RefCell<BTreeSet<String>>,
    device: Device,
}

impl Weights {
    /// Opens `dir/model.safetensors` or the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self, WeightsError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| WeightsError::Index {
                path: index.clone(),
                message: e.to_string(),
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightsError::Index {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| WeightsError::Index {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(WeightsError::NoWeights(dir.to_path_buf()));
        };
        for f in &files {
            if !f.is_file() {
                return Err(WeightsError::Open {
                    path: f.clone(),
                    message: "shard listed in the index is missing".into(),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we rely on
        // nobody truncating them while the model is loaded.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                WeightsError::Open {
                    path: dir.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            st,
            names,
            used: Default::default(),
            device: device.clone(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Loads `name`, checking its shape; keeps the stored dtype.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, WeightsError> {
        if !self.contains(name) {
            return Err(WeightsError::Missing {
                name: name.into(),
                expected: expected.to_vec(),
            });
        }
        let view = self.st.get(name)?;
        if view.shape() != expected {
            return Err(WeightsError::Shape {
                name: name.into(),
                found: view.shape().to_vec(),
                expected: expected.to_vec(),
            });
        }
        self.used.borrow_mut().insert(name.into());
        Ok(self.st.load(name, &self.device)?)
    }

    /// A projection `prefix.weight` of shape `[out, in]`, with `prefix.weight_scale_inv` when
    /// it is stored in FP8.
    pub fn base_weight(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
    ) -> Result<BaseWeight, WeightsError> {
        let name = format!("{prefix}.weight");
        let w = self.tensor(&name, &[out, inp])?;
        match w.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => Ok(BaseWeight::Dense(w)),
            DType::F8E4M3 => {
                let scale_name = format!("{prefix}.weight_scale_inv");
                let blocks = [out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK)];
                let scale_inv = self.tensor(&scale_name, &blocks)?;
                Ok(BaseWeight::Fp8 { q: w, scale_inv })
            }
            found => Err(WeightsError::Dtype {
                name,
                found,
                expected: "f32, bf16, f16 or FP8 E4M3 with weight_scale_inv",
            }),
        }
    }

    /// Fails if any tensor of the files was not used by the model.
    pub fn check_all_used(&self) -> Result<(), WeightsError> {
        let used = self.used.borrow();
        let unexpected: Vec<&String> = self.names.difference(&used).collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        let mut list: Vec<String> = unexpected
            .iter()
            .take(5)
            .map(|s| format!("`{s}`"))
            .collect();
        if unexpected.len() > 5 {
            list.push(format!("and {} more", unexpected.len() - 5));
        }
        Err(WeightsError::Unexpected(list.join(", ")))
    }
}
