//! A checkpoint stored in FP8 E4M3 with one power-of-two scale per 128×128 block, lossless to
//! bf16: how the embedded `tiny` base travels inside the binary at half the bytes of bf16.
//!
//! Every 2-D weight W `[out, in]` is stored as E4M3 values q and f32 scales `weight_scale_inv`
//! `[ceil(out/128), ceil(in/128)]` (the Qwen3-Coder-*-FP8 layout, `<name>_scale_inv` next to
//! `<name>`), W = q · s per block; 1-D weights (norms) stay bf16. The block scale is
//! s = 2^⌈log₂(amax / 448)⌉, so |W / s| ≤ 448 (E4M3's largest finite value) and, because s is
//! a power of two, every q · s is exactly a bf16 number (4 significant bits, an exponent within
//! bf16's range): [`expand_to_bf16`] reproduces the same bf16 file, byte for byte, every time.

use crate::weights::{BaseWeight, FP8_BLOCK};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// E4M3's largest finite magnitude.
const E4M3_MAX: f32 = 448.0;

/// The scale name of a quantized weight.
fn scale_name(name: &str) -> String {
    format!("{name}_scale_inv")
}

/// Quantizes `tensors` (any float dtype): 2-D → FP8 + power-of-two block scales, others → bf16.
pub fn quantize(tensors: &[(String, Tensor)]) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        if t.rank() != 2 {
            out.insert(name.clone(), t.to_dtype(DType::BF16)?);
            continue;
        }
        let (rows, cols) = t.dims2()?;
        let (br, bc) = (rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK));
        let values: Vec<Vec<f32>> = t.to_vec2()?;
        let mut scales = vec![0f32; br * bc];
        for (i, row) in values.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let s = &mut scales[(i / FP8_BLOCK) * bc + j / FP8_BLOCK];
                *s = s.max(v.abs());
            }
        }
        for s in &mut scales {
            // 2^⌈log₂(amax/448)⌉; an all-zero block gets scale 1.
            *s = if *s > 0.0 {
                2f32.powi((*s / E4M3_MAX).log2().ceil() as i32)
            } else {
                1.0
            };
        }
        let scaled: Vec<f32> = values
            .iter()
            .enumerate()
            .flat_map(|(i, row)| {
                let scales = &scales;
                row.iter()
                    .enumerate()
                    .map(move |(j, &v)| v / scales[(i / FP8_BLOCK) * bc + j / FP8_BLOCK])
            })
            .collect();
        let q = Tensor::from_vec(scaled, (rows, cols), &Device::Cpu)?.to_dtype(DType::F8E4M3)?;
        out.insert(name.clone(), q);
        out.insert(
            scale_name(name),
            Tensor::from_vec(scales, (br, bc), &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// Writes [`quantize`]d `tensors` as a safetensors file at `path`.
pub fn write_quantized(
    tensors: &[(String, Tensor)],
    path: &std::path::Path,
) -> candle_core::Result<()> {
    candle_core::safetensors::save(&quantize(tensors)?, path)
}

/// The bf16 safetensors file (bytes) of an FP8 file written by [`write_quantized`]: every
/// FP8 weight times its block scales, every other tensor as bf16.
pub fn expand_to_bf16(fp8_file: &[u8]) -> candle_core::Result<Vec<u8>> {
    let tensors = candle_core::safetensors::load_buffer(fp8_file, &Device::Cpu)?;
    let mut out = HashMap::new();
    for (name, t) in &tensors {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let value = if t.dtype() == DType::F8E4M3 {
            let scale_inv = tensors.get(&scale_name(name)).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!("FP8 tensor `{name}` has no `{name}_scale_inv`"))
            })?;
            BaseWeight::Fp8 {
                q: t.clone(),
                scale_inv,
            }
            .dequantize(DType::BF16)?
        } else {
            t.to_dtype(DType::BF16)?
        };
        out.insert(name.clone(), value);
    }
    safetensors::serialize(&out, None).map_err(candle_core::Error::wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_weights_expand_exactly_and_stay_close() {
        // Values of very different magnitudes per block, a zero block, and a 1-D norm.
        let (rows, cols) = (130, 260);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                if r >= 128 && c >= 256 {
                    0.0
                } else {
                    ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 10f32.powi((c / 128) as i32 - 2)
                }
            })
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let norm = Tensor::new(&[1.0f32, 0.5, -2.25], &Device::Cpu).unwrap();
        let tensors = vec![
            ("a.weight".to_string(), w.clone()),
            ("n.weight".to_string(), norm.clone()),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fp8.safetensors");
        write_quantized(&tensors, &path).unwrap();
        let fp8 = std::fs::read(&path).unwrap();
        let bf16 = expand_to_bf16(&fp8).unwrap();
        assert_eq!(bf16, expand_to_bf16(&fp8).unwrap(), "deterministic");
        let t = candle_core::safetensors::load_buffer(&bf16, &Device::Cpu).unwrap();
        assert_eq!(t.len(), 2);
        let a = &t["a.weight"];
        assert_eq!(a.dtype(), DType::BF16);
        // The bf16 value is exactly q · s (the f32 product, then bf16, loses nothing).
        let a32: Vec<Vec<f32>> = a.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let q = candle_core::safetensors::load_buffer(&fp8, &Device::Cpu).unwrap();
        let exact: Vec<Vec<f32>> = BaseWeight::Fp8 {
            q: q["a.weight"].clone(),
            scale_inv: q["a.weight_scale_inv"].clone(),
        }
        .dequantize(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
        assert_eq!(a32, exact);
        // Each scale is a power of two; E4M3 keeps 3 mantissa bits: relative error ≤ 2^-4 for
        // normal values, and small values lose at most one subnormal step (2^-9 · s).
        let scales: Vec<Vec<f32>> = q["a.weight_scale_inv"].to_vec2().unwrap();
        for row in &scales {
            for s in row {
                assert_eq!(s.log2().fract(), 0.0, "scale {s}");
            }
        }
        let orig: Vec<Vec<f32>> = w.to_vec2().unwrap();
        for (i, (ro, rq)) in orig.iter().zip(&a32).enumerate() {
            for (j, (&o, &v)) in ro.iter().zip(rq).enumerate() {
                let s = scales[i / 128][j / 128];
                assert!(
                    (o - v).abs() <= o.abs() / 16.0 + s * 2f32.powi(-9),
                    "[{i},{j}]: {o} → {v} (scale {s})"
                );
            }
        }
        assert_eq!(a32[129][259], 0.0);
        let n: Vec<f32> = t["n.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(n, vec![1.0, 0.5, -2.25]);
    }
}
