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
    #[error("tensor `{name}`: {message}")]
    Slice { name: String, message: String },
    #[error("unexpected tensors not used by the model: {0}")]
    Unexpected(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

pub use finetune_kernels::fp8_dequant::FP8_BLOCK;

/// A frozen projection weight `[out, in]` in its stored precision.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// f32, bf16 or f16, as stored.
    Dense(Tensor),
    /// FP8 E4M3 values and f32 scales `[ceil(out/128), ceil(in/128)]`:
    /// W[i][j] = q[i][j] · scale_inv[i / 128][j / 128].
    ///
    /// `q` is an `F8E4M3` tensor on the CPU. On a CUDA device it is a `U8` tensor of the same
    /// E4M3 bit patterns (still one byte per weight): candle 0.11.1's CUDA cast from F8E4M3
    /// looks up a kernel named `cast_f8e4m3_<dtype>` while its PTX defines
    /// `cast_f8_e4m3_<dtype>`, so `to_dtype` on a CUDA F8E4M3 tensor fails (seen on an H200:
    /// `CUDA_ERROR_NOT_FOUND`, tests/cuda_parity.rs reports it).
    Fp8 { q: Tensor, scale_inv: Tensor },
}

pub use finetune_kernels::fp8_dequant::e4m3_table;

impl BaseWeight {
    pub fn shape(&self) -> &[usize] {
        match self {
            BaseWeight::Dense(t) => t.dims(),
            BaseWeight::Fp8 { q, .. } => q.dims(),
        }
    }

    /// The weights of `parts` (same shape and storage kind) stacked along a new first
    /// dimension: `[E, out, in]` values (and `[E, ⌈out/128⌉, ⌈in/128⌉]` FP8 scales).
    pub fn stack(parts: &[BaseWeight]) -> candle_core::Result<BaseWeight> {
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match p {
                BaseWeight::Dense(t) => Some(t),
                BaseWeight::Fp8 { .. } => None,
            })
            .collect();
        if let Some(dense) = dense {
            return Ok(BaseWeight::Dense(Tensor::stack(&dense, 0)?));
        }
        let mut qs = Vec::with_capacity(parts.len());
        let mut scales = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                BaseWeight::Fp8 { q, scale_inv } => {
                    qs.push(q);
                    scales.push(scale_inv);
                }
                BaseWeight::Dense(_) => candle_core::bail!("cannot stack FP8 and dense weights"),
            }
        }
        // candle has no copy kernels for F8E4M3 on every path: stack the bit patterns.
        let q = if qs[0].dtype() == DType::F8E4M3 {
            let bytes: Vec<Tensor> = qs
                .iter()
                .map(|q| f8_bits(q))
                .collect::<candle_core::Result<_>>()?;
            let stacked = Tensor::stack(&bytes, 0)?;
            from_f8_bits(&stacked)?
        } else {
            Tensor::stack(&qs, 0)?
        };
        Ok(BaseWeight::Fp8 {
            q,
            scale_inv: Tensor::stack(&scales, 0)?,
        })
    }

    /// Entry `index` of a stacked weight (a view, no copy).
    pub fn get(&self, index: usize) -> candle_core::Result<BaseWeight> {
        Ok(match self {
            BaseWeight::Dense(t) => BaseWeight::Dense(t.get(index)?),
            BaseWeight::Fp8 { q, scale_inv } => BaseWeight::Fp8 {
                q: q.get(index)?,
                scale_inv: scale_inv.get(index)?,
            },
        })
    }

    /// The weight in `dtype`, dequantized for this use only; a stacked weight `[E, out, in]`
    /// comes back stacked.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        if let (BaseWeight::Fp8 { q, scale_inv }, 3) = (self, self.shape().len()) {
            let (e, out, inp) = q.dims3()?;
            let (_, sr, sc) = scale_inv.dims3()?;
            if out % FP8_BLOCK == 0 {
                // Blocks never straddle two experts: one launch over [E·out, in].
                let flat = BaseWeight::Fp8 {
                    q: q.reshape((e * out, inp))?,
                    scale_inv: scale_inv.reshape((e * sr, sc))?,
                };
                return flat.dequantize(dtype)?.reshape((e, out, inp));
            }
            let parts: Vec<Tensor> = (0..e)
                .map(|i| self.get(i)?.dequantize(dtype))
                .collect::<candle_core::Result<_>>()?;
            return Tensor::stack(&parts, 0);
        }
        match self {
            BaseWeight::Dense(t) => t.to_dtype(dtype),
            // One projection at a time, by finetune-kernels' op (CPU table, CUDA kernel).
            BaseWeight::Fp8 { q, scale_inv } => match dtype {
                DType::F32 | DType::BF16 => finetune_kernels::fp8_dequant(q, scale_inv, dtype),
                _ => finetune_kernels::fp8_dequant(q, scale_inv, DType::F32)?.to_dtype(dtype),
            },
        }
    }
}

/// F8E4M3 values as their bit patterns (U8), on the CPU.
fn f8_bits(q: &Tensor) -> candle_core::Result<Tensor> {
    let bits: Vec<u8> = q
        .flatten_all()?
        .to_vec1::<float8::F8E4M3>()?
        .into_iter()
        .map(|v| v.to_bits())
        .collect();
    Tensor::from_vec(bits, q.shape(), q.device())
}

/// The inverse of [`f8_bits`].
fn from_f8_bits(bits: &Tensor) -> candle_core::Result<Tensor> {
    let values: Vec<float8::F8E4M3> = bits
        .flatten_all()?
        .to_vec1::<u8>()?
        .into_iter()
        .map(float8::F8E4M3::from_bits)
        .collect();
    Tensor::from_vec(values, bits.shape(), bits.device())
}

/// The safetensors of one model directory.
pub struct Weights {
    pub(crate) st: candle_core::safetensors::MmapedSafetensors,
    names: BTreeSet<String>,
    /// Tensors read, or checked and left to other ranks ([`crate::shard`]).
    pub(crate) used: std::cell::RefCell<BTreeSet<String>>,
    pub(crate) device: Device,
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

    /// Every tensor name of the files, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The stored shape of tensor `name`, without loading it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st.get(name).ok().map(|view| view.shape().to_vec())
    }

    /// Loads `name`, checking its shape; keeps the stored dtype.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, WeightsError> {
        self.tensor_on(name, expected, &self.device)
    }

    fn tensor_on(
        &self,
        name: &str,
        expected: &[usize],
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        // Presence and shape checked (and the name marked used) as for a shard's reads.
        self.checked_view(name, expected)?;
        Ok(self.st.load(name, device)?)
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
        // Staged on the CPU (as candle's own load to a GPU does), so that FP8 can travel as bytes.
        let w = self.tensor_on(&name, &[out, inp], &Device::Cpu)?;
        match w.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => {
                Ok(BaseWeight::Dense(w.to_device(&self.device)?))
            }
            DType::F8E4M3 => {
                let scale_name = format!("{prefix}.weight_scale_inv");
                let blocks = [out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK)];
                let scale_inv = self.tensor(&scale_name, &blocks)?;
                let q = if self.device.is_cpu() {
                    w
                } else {
                    // The stored E4M3 bit patterns as U8 (see BaseWeight::Fp8).
                    let bytes = self.st.get(&name)?.data().to_vec();
                    Tensor::from_vec(bytes, (out, inp), &self.device)?
                };
                Ok(BaseWeight::Fp8 { q, scale_inv })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors buffer holding one F8_E4M3 tensor `q` of all 256 bit patterns.
    fn all_e4m3_patterns() -> Vec<u8> {
        let mut header =
            r#"{"q":{"dtype":"F8_E4M3","shape":[256],"data_offsets":[0,256]}}"#.to_string();
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut buf = (header.len() as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(header.as_bytes());
        buf.extend(0..=255u8);
        buf
    }

    #[test]
    fn e4m3_table_equals_candles_cpu_cast_for_every_bit_pattern() {
        let t = candle_core::safetensors::load_buffer(&all_e4m3_patterns(), &Device::Cpu).unwrap();
        let q = &t["q"];
        assert_eq!(q.dtype(), DType::F8E4M3);
        let cast: Vec<f32> = q.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let table = e4m3_table();
        for (bits, (&want, &got)) in cast.iter().zip(table.iter()).enumerate() {
            assert!(
                want == got || (want.is_nan() && got.is_nan()),
                "bits {bits:#04x}: candle {want}, table {got}"
            );
        }
        assert_eq!(table[0x7e], 448.0);
        assert_eq!(table[0x01], 2f32.powi(-9));
        assert!(table[0x7f].is_nan() && table[0xff].is_nan());
    }

    #[test]
    fn fp8_as_bytes_dequantizes_like_fp8() {
        // The CUDA form (U8 bit patterns) through the table equals the CPU form through
        // candle's cast, scales included; checked here on the CPU.
        let t = candle_core::safetensors::load_buffer(&all_e4m3_patterns(), &Device::Cpu).unwrap();
        let pattern: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        let (out, inp) = (130, 200);
        let bytes: Vec<u8> = (0..out * inp)
            .map(|i| pattern[(i * 31) % pattern.len()])
            .collect();
        let idx = Tensor::from_vec(
            bytes.iter().map(|&b| b as u32).collect::<Vec<_>>(),
            out * inp,
            &Device::Cpu,
        )
        .unwrap();
        let q8 = t["q"]
            .index_select(&idx, 0)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let qu = Tensor::from_vec(bytes, (out, inp), &Device::Cpu).unwrap();
        let scale_inv = Tensor::new(&[[0.5f32, 2.0], [0.25, 3.0]], &Device::Cpu).unwrap();
        let a = BaseWeight::Fp8 {
            q: q8,
            scale_inv: scale_inv.clone(),
        };
        let b = BaseWeight::Fp8 { q: qu, scale_inv };
        let a = a.dequantize(DType::F32).unwrap();
        let b = b.dequantize(DType::F32).unwrap();
        let diff: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    /// Stacked FP8 weights whose blocks align with the experts (out a multiple of 128)
    /// dequantize in one launch to exactly the per-expert values; a view of one entry is that
    /// expert's weight.
    #[test]
    fn stacked_fp8_dequantizes_like_each_part() {
        let part = |salt: usize| {
            let bits: Vec<u8> = (0..128 * 200)
                .map(|i| ((i * 13 + salt * 7) % 255) as u8)
                .collect();
            let q = Tensor::from_vec(bits, (128, 200), &Device::Cpu).unwrap();
            let scale =
                Tensor::from_vec(vec![0.5 + salt as f32, 2.0], (1, 2), &Device::Cpu).unwrap();
            BaseWeight::Fp8 {
                q,
                scale_inv: scale,
            }
        };
        let parts = [part(0), part(1), part(2)];
        let stacked = BaseWeight::stack(&parts).unwrap();
        assert_eq!(stacked.shape(), &[3, 128, 200]);
        let all = stacked.dequantize(DType::F32).unwrap();
        for (i, p) in parts.iter().enumerate() {
            let want = p.dequantize(DType::F32).unwrap();
            let got = all.get(i).unwrap();
            let view = stacked.get(i).unwrap().dequantize(DType::F32).unwrap();
            let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let c = view.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                a.iter()
                    .zip(&b)
                    .all(|(x, y)| x == y || (x.is_nan() && y.is_nan())),
                "part {i}"
            );
            assert!(
                c.iter()
                    .zip(&b)
                    .all(|(x, y)| x == y || (x.is_nan() && y.is_nan())),
                "view {i}"
            );
        }
    }
}
