//! `fp8_dequant`: W[o][i] = e4m3(q[o][i]) · scale_inv[⌊o/128⌋][⌊i/128⌋], the FP8 block-128 layout
//! of Qwen3-Coder-*-FP8, dequantized into bf16 or f32 for one use (one projection at a time:
//! a full-precision copy of the model is never made).
//!
//! - CPU (the reference): the 256-entry E4M3 table ([`e4m3_table`]), one lookup and one multiply
//!   per element.
//! - CUDA (`cuda` feature, kernels/fp8_dequant.cu): one thread per element, the hardware
//!   E4M3 → f16 conversion (exact), the multiply in f32, rounded once to bf16 (or kept in f32).
//!
//! The weight is frozen, so there is no backward. `q` is FP8 bit patterns as `U8` (candle's CUDA
//! cast from its F8E4M3 dtype looks up a kernel name its PTX does not define, so FP8 weights
//! live as bytes on the GPU) or candle's `F8E4M3` on CPU; `scale_inv` is f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// Rows and columns of one scale block.
pub const FP8_BLOCK: usize = 128;

/// The value of every FP8 E4M3 bit pattern (OCP FP8 E4M3, "fn" variant as in PyTorch's
/// `float8_e4m3fn`): sign s = bit 7, exponent e = bits 6..3 (bias 7), mantissa m = bits 2..0;
/// e = 0: (−1)^s · m/8 · 2^−6 (subnormal); otherwise (−1)^s · (1 + m/8) · 2^(e−7); e = 15 and
/// m = 7 is NaN (no infinities). Every value is exact in f32.
pub fn e4m3_table() -> [f32; 256] {
    let mut table = [0f32; 256];
    for (bits, v) in table.iter_mut().enumerate() {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((bits >> 3) & 0xF) as i32;
        let m = (bits & 0x7) as f32;
        *v = if e == 15 && m == 7.0 {
            f32::NAN
        } else if e == 0 {
            sign * m / 8.0 * 2f32.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
        };
    }
    table
}

/// The dequantizing op; `dtype` is the output's (f32 or bf16).
pub struct Fp8Dequant {
    pub dtype: DType,
}

/// `q` `[out, in]` (U8 bit patterns or F8E4M3) with `scale_inv` `[⌈out/128⌉, ⌈in/128⌉]` (f32)
/// → the weight in `dtype` (f32 or bf16).
pub fn fp8_dequant(q: &Tensor, scale_inv: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        candle_core::bail!("fp8-dequant: output dtype {dtype:?} (expected f32 or bf16)");
    }
    let (out, inp) = q.dims2()?;
    let (r, c) = scale_inv.dims2()?;
    if r != out.div_ceil(FP8_BLOCK) || c != inp.div_ceil(FP8_BLOCK) {
        candle_core::bail!(
            "fp8-dequant: weight [{out}, {inp}] needs scales [{}, {}], got [{r}, {c}]",
            out.div_ceil(FP8_BLOCK),
            inp.div_ceil(FP8_BLOCK)
        );
    }
    q.contiguous()?.apply_op2_no_bwd(
        &scale_inv.to_dtype(DType::F32)?.contiguous()?,
        &Fp8Dequant { dtype },
    )
}

fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a [T],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("fp8-dequant: {what} is not contiguous")))?;
    Ok(&s[a..b])
}

impl CustomOp2 for Fp8Dequant {
    fn name(&self) -> &'static str {
        "fp8-dequant"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = lq.shape().dims2()?;
        let scale_cols = ls.shape().dims2()?.1;
        let table = e4m3_table();
        let bits: Vec<u8> = match q {
            CpuStorage::U8(v) => contiguous(v, lq, "q")?.to_vec(),
            CpuStorage::F8E4M3(v) => contiguous(v, lq, "q")?
                .iter()
                .map(|x| x.to_bits())
                .collect(),
            other => candle_core::bail!("fp8-dequant: q is {:?}", other.dtype()),
        };
        let scale = contiguous(s.as_slice::<f32>()?, ls, "scale_inv")?;
        let values = bits.iter().enumerate().map(|(idx, &b)| {
            let (r, c) = (idx / cols, idx % cols);
            table[b as usize] * scale[(r / FP8_BLOCK) * scale_cols + c / FP8_BLOCK]
        });
        let storage = match self.dtype {
            DType::F32 => CpuStorage::F32(values.collect()),
            _ => CpuStorage::BF16(values.map(half::bf16::from_f32).collect()),
        };
        Ok((storage, Shape::from((rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        s: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::common::LaunchShape;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (rows, cols) = lq.shape().dims2()?;
        let scale_cols = ls.shape().dims2()?.1;
        let n = rows * cols;
        let dev = q.device.clone();
        let (qa, qb) = lq
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fp8-dequant: q is not contiguous".into()))?;
        let q_bytes = match q.dtype() {
            DType::U8 => q.as_cuda_slice::<u8>()?.slice(qa..qb),
            other => {
                candle_core::bail!("fp8-dequant (cuda): q is {other:?}, expected U8 bit patterns")
            }
        };
        let (sa, sb) = ls.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fp8-dequant: scale_inv is not contiguous".into())
        })?;
        let scale = s.as_cuda_slice::<f32>()?.slice(sa..sb);
        let (rows_i, cols_i, sc_i) = (rows as i32, cols as i32, scale_cols as i32);
        let cfg = LaunchConfig::from(LaunchShape::for_num_elems(n));
        let storage = match self.dtype {
            DType::F32 => {
                let out = dev.alloc_zeros::<f32>(n)?;
                let f = dev.get_or_load_custom_func(
                    "fp8_dequant_f32",
                    "fp8_dequant",
                    crate::ptx::FP8_DEQUANT,
                )?;
                let mut b = f.builder();
                b.arg(&q_bytes)
                    .arg(&scale)
                    .arg(&out)
                    .arg(&rows_i)
                    .arg(&cols_i)
                    .arg(&sc_i);
                // An empty weight launches nothing (a grid of 0 blocks is a launch error).
                if n > 0 {
                    unsafe { b.launch(cfg) }.w()?;
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev)
            }
            _ => {
                let out = dev.alloc_zeros::<half::bf16>(n)?;
                let f = dev.get_or_load_custom_func(
                    "fp8_dequant_bf16",
                    "fp8_dequant",
                    crate::ptx::FP8_DEQUANT,
                )?;
                let mut b = f.builder();
                b.arg(&q_bytes)
                    .arg(&scale)
                    .arg(&out)
                    .arg(&rows_i)
                    .arg(&cols_i)
                    .arg(&sc_i);
                // An empty weight launches nothing (a grid of 0 blocks is a launch error).
                if n > 0 {
                    unsafe { b.launch(cfg) }.w()?;
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev)
            }
        };
        Ok((storage, Shape::from((rows, cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every bit pattern, scales that differ per block, shapes that are not multiples of 128.
    fn sample(device: &Device) -> (Tensor, Tensor, Vec<f32>) {
        let (rows, cols) = (130, 260);
        let bits: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 7 + i / 3) % 256) as u8)
            .collect();
        let scales: Vec<f32> = (0..2 * 3).map(|i| 0.5 + i as f32 * 0.25).collect();
        let table = e4m3_table();
        let expected = (0..rows * cols)
            .map(|i| table[bits[i] as usize] * scales[(i / cols / 128) * 3 + (i % cols) / 128])
            .collect();
        let q = Tensor::from_vec(bits, (rows, cols), device).unwrap();
        let s = Tensor::from_vec(scales, (2, 3), device).unwrap();
        (q, s, expected)
    }

    fn same(a: f32, b: f32) -> bool {
        a == b || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn cpu_dequantizes_every_block_with_its_own_scale() {
        let (q, s, expected) = sample(&Device::Cpu);
        let got = fp8_dequant(&q, &s, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap();
        let got = got.to_vec1::<f32>().unwrap();
        assert!(got.iter().zip(&expected).all(|(a, b)| same(*a, *b)));
        let bf = fp8_dequant(&q, &s, DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let bf = bf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in bf.iter().zip(&expected) {
            assert!(same(*a, half::bf16::from_f32(*b).to_f32()), "{a} vs {b}");
        }
    }

    #[test]
    fn f8e4m3_input_gives_the_same_values_as_bytes() {
        let (q, s, _) = sample(&Device::Cpu);
        let f8 = Tensor::from_vec(
            q.flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
                .into_iter()
                .map(float8::F8E4M3::from_bits)
                .collect::<Vec<_>>(),
            q.shape(),
            &Device::Cpu,
        )
        .unwrap();
        let a = fp8_dequant(&q, &s, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = fp8_dequant(&f8, &s, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| same(*x, *y)));
    }

    #[test]
    fn wrong_scale_shape_is_refused_naming_both_shapes() {
        let (q, _, _) = sample(&Device::Cpu);
        let s = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        let err = fp8_dequant(&q, &s, DType::F32).unwrap_err().to_string();
        assert!(
            err.contains("[130, 260]") && err.contains("[2, 3]") && err.contains("[1, 3]"),
            "{err}"
        );
    }

    /// kernels/fp8_dequant.cu run on the CPU by finetune-kernel-emu in both fiber orders, with
    /// the CUDA launch's geometry and with a grid of 3 blocks (fewer threads than elements, so
    /// the grid-stride loop runs several rounds): bit for bit the CPU reference, f32 and bf16.
    /// No tolerance: the kernel does the reference's operations (an exact E4M3 → f32
    /// conversion, one f32 multiply, for bf16 one rounding to nearest even). NaN matches NaN
    /// whatever its sign: the reference's table holds +NaN for both NaN patterns (0x7f, 0xff),
    /// the conversion keeps the pattern's sign.
    #[test]
    fn emulated_kernels_equal_the_cpu_reference_bit_for_bit() {
        use crate::common::{test::data, LaunchShape};
        use finetune_kernel_emu::{launch, Buffer, Order};
        extern "C" {
            fn fp8_dequant_bf16(
                q: *const u8,
                scale_inv: *const f32,
                out: *mut u16,
                rows: i32,
                cols: i32,
                scale_cols: i32,
            );
            fn fp8_dequant_f32(
                q: *const u8,
                scale_inv: *const f32,
                out: *mut f32,
                rows: i32,
                cols: i32,
                scale_cols: i32,
            );
        }
        // NaN as one pattern, then the index of the first difference (None: equal).
        let first_difference =
            |got: &[u32], want: &[u32], nan: u32, is_nan: &dyn Fn(u32) -> bool| {
                let canon = |b: u32| if is_nan(b) { nan } else { b };
                got.iter()
                    .zip(want)
                    .position(|(&g, &w)| canon(g) != canon(w))
                    .or((got.len() != want.len()).then_some(got.len().min(want.len())))
            };
        let f32_nan = |b: u32| f32::from_bits(b).is_nan();
        let bf16_nan = |b: u32| half::bf16::from_bits(b as u16).is_nan();
        // Both dimensions past a 128 boundary (3 × 3 scale blocks, the last ones partial), one
        // column, one row.
        for (rows, cols) in [(257usize, 300usize), (130, 1), (1, 129)] {
            let n = rows * cols;
            let (sr, sc) = (rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK));
            // Every bit pattern (NaNs, ±0, subnormals, ±448); scales of both signs and of
            // magnitudes from 10⁻³ to 10³, so that the bf16 rounding has work to do.
            let bits: Vec<u8> = (0..n).map(|i| ((i * 7 + i / 3) % 256) as u8).collect();
            let scales: Vec<f32> = data(sr * sc, 11)
                .into_iter()
                .enumerate()
                .map(|(i, v)| v * 10f32.powi((i % 7) as i32 - 3))
                .collect();
            let q = Tensor::from_vec(bits.clone(), (rows, cols), &Device::Cpu).unwrap();
            let s = Tensor::from_vec(scales.clone(), (sr, sc), &Device::Cpu).unwrap();
            let want_f32 = crate::common::test::f32_bits(&fp8_dequant(&q, &s, DType::F32).unwrap());
            let want_bf16: Vec<u32> = fp8_dequant(&q, &s, DType::BF16)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|v| u32::from(v.to_bits()))
                .collect();
            let full = LaunchShape::for_num_elems(n);
            let strided = LaunchShape {
                grid: (3, 1, 1),
                ..full
            };
            let (r, c, k) = (rows as i32, cols as i32, sc as i32);
            for (shape, order) in [full, strided]
                .into_iter()
                .flat_map(|g| Order::BOTH.map(|o| (g, o)))
            {
                let (qb, sb) = (Buffer::from_slice(&bits), Buffer::from_slice(&scales));
                let out = Buffer::filled(n, f32::NAN);
                launch(shape.into(), order, || unsafe {
                    fp8_dequant_f32(qb.ptr(), sb.ptr(), out.mut_ptr(), r, c, k)
                })
                .unwrap();
                let got: Vec<u32> = out.to_vec().iter().map(|v| v.to_bits()).collect();
                let at = first_difference(&got, &want_f32, f32::NAN.to_bits(), &f32_nan);
                assert_eq!(at, None, "f32 {rows}×{cols} {shape:?} {order:?}");
                // Filled with bf16 NaN: an unwritten element matches only where the reference
                // is NaN too (a NaN pattern), where the kernel would have written NaN.
                let out = Buffer::filled(n, 0x7fc0u16);
                launch(shape.into(), order, || unsafe {
                    fp8_dequant_bf16(qb.ptr(), sb.ptr(), out.mut_ptr(), r, c, k)
                })
                .unwrap();
                let got: Vec<u32> = out.to_vec().iter().map(|&v| u32::from(v)).collect();
                let at = first_difference(&got, &want_bf16, 0x7fc0, &bf16_nan);
                assert_eq!(at, None, "bf16 {rows}×{cols} {shape:?} {order:?}");
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let (q, s, expected) = sample(&gpu);
        for dtype in [DType::F32, DType::BF16] {
            let got = fp8_dequant(&q, &s, dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&expected) {
                let b = if dtype == DType::BF16 {
                    half::bf16::from_f32(*b).to_f32()
                } else {
                    *b
                };
                assert!(same(*a, b), "{dtype:?}: {a} vs {b}");
            }
        }
    }
}
