//! `fp8_linear` / `fp8_grouped_linear`: y = x·Wᵀ for a frozen FP8 E4M3 weight with 128×128
//! block scales (`weight_scale_inv`, the Qwen3-Coder-*-FP8 / DeepSeek-V3 layout) on the FP8
//! tensor cores: the activations are quantized to E4M3 too (one f32 scale per row and 128
//! columns, s = amax/448, the DeepSeek-V3 recipe) and one block-scaled cuBLASLt matmul per row
//! group (expert) multiplies the two FP8 operands with f32 accumulation and writes bf16.
//!
//! Math, for rows n of group e (rows `offsets[e]..offsets[e + 1]`, W = `q`·`scale_inv` per block):
//!   s[n][b] = max_{c in block b} |x[n][c]| / 448   (1 where that is 0: a zero block, or an
//!                                                   amax under 224·2⁻¹⁴⁹ whose quotient underflows)
//!   qx[n][c] = e4m3(x[n][c] / s[n][c/128])          (round to nearest even, saturating)
//!   y[n][o] = Σ_c qx[n][c]·s[n][c/128] · q_e[o][c]·scale_inv_e[o/128][c/128]
//! i.e. today's path (x·dequant(W)ᵀ in bf16) with x replaced by its FP8 round trip: the
//! numerics change is the activation quantization (≤ 2⁻⁴ relative per element, the E4M3
//! mantissa), the weight side is exact either way. Backward: dx = dy·dequant(W) per group, in
//! dy's dtype (the weight dequantized for that product and dropped, as `grouped_linear_frozen`
//! does); there is no dW (the weight is frozen).
//!
//! - CPU (the reference and test oracle): [`quantize_rows_cpu`] (an IEEE f32 division per
//!   element, then the `float8` crate's rounding, a port of CUDA's cuda_fp8.hpp), the dequantized
//!   values of both operands, one f32 GEMM per group. Runs whenever x is on the CPU, so the
//!   numerics of the GPU path can be tested without a GPU.
//! - CUDA (`cuda` feature): kernels/fp8_quantize.cu, then per non-empty group one
//!   `cublasLtMatmul` in the "TN" form Hopper's FP8 kernels need (cuBLAS is column-major:
//!   D = yᵀ `[N, rows]` = op(A)·op(B) with A = W_e stored `[K, N]` (ld K) transposed and
//!   B = qx's rows stored `[K, rows]` (ld K) not transposed; both K-major), A's scale mode
//!   `CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F`, B's `..._VEC128_32F`, compute
//!   `CUBLAS_COMPUTE_32F`, scale type f32, C = D bf16 (β = 0). cuBLASLt's grouped batch mode
//!   (`CUBLASLT_BATCH_MODE_GROUPED`, which the cuBLAS docs list with VEC128/BLK128x128 on sm_90)
//!   arrived in CUDA 13.1 (cudarc binds it from `cuda-13010`); we ship 13.0, hence one call per
//!   group (the per-expert loop of `grouped_linear`).
//!
//! Requirements (checked by [`unsupported`]; the model falls back to today's dequantize + bf16
//! GEMM path, naming the reason): K a multiple of 128 (whole activation blocks, the layout
//! below), N a multiple of 16 (FP8 tensor-core kernels need 16-byte aligned dimensions, cuBLAS
//! docs "cublasLtMatmul": "All matrix dimensions must meet the optimal requirements listed in
//! Tensor Core Usage"; PyTorch's `_scaled_mm` checks the same), bf16 activations on the GPU (the
//! output is bf16; "FP8 DType is not supported" with these scale modes). A cuBLASLt that finds no
//! algorithm (e.g. a GPU other than Hopper: NVIDIA documents the VEC128/BLK128x128 modes for
//! sm_90) makes the op itself fall back, with one message on stderr.
//!
//! Scale layouts, from what we relied on: NVIDIA's CUDALibrarySamples
//! `cuBLASLt/LtBlk128x128Fp8Matmul` (the same two modes, TN form) and its `Common/helpers.h`
//! `getScaleTensorSize` (VEC128: ⌈inner/128⌉·outer floats; BLK128x128:
//! roundup(⌈inner/128⌉, 4)·⌈outer/128⌉ floats, inner = K for both operands in the TN form), and
//! PyTorch's `aten/src/ATen/native/cuda/ScaledBlas.cpp` (`is_blockwise_1x128_scaling`: the
//! activation scales `[M, ⌈K/128⌉]` with strides (1, M), "outer-dim-major";
//! `is_blockwise_128x128_scaling`: the weight scales `[⌈N/128⌉, ⌈K/128⌉]` row-major, in one
//! version with the row stride rounded up to 4 floats, "16-byte aligned strides").
//! - Weight (A): our `scale_inv` `[⌈N/128⌉, ⌈K/128⌉]` row-major is that layout; its rows are
//!   padded to a multiple of 4 floats when ⌈K/128⌉ is not (one small copy per call: ⌈K/128⌉ = 6
//!   for the 30B-A3B down projection, 16 for gate/up, which need none).
//! - Activations (B): per group, the group's rows adjacent for each column block; each group's
//!   block starts on a multiple of 4 floats (16-byte aligned scale pointers), see
//!   [`act_scale_bases`].
//!
//! On by default nowhere: [`enabled`] (`FINETUNE_FP8_GEMM=1` or [`set_enabled`]) decides whether
//! the model uses it for FP8 weights, until a GPU session has run `cuda_equals_the_cpu_reference`.

use crate::common::{cpu_f32, cpu_out, gemm_f32, EnvSwitch, LaunchShape};
use crate::fp8_dequant::{e4m3_table, FP8_BLOCK};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::Arc;

/// E4M3's largest finite magnitude: a block's largest |x| maps onto it.
pub const E4M3_MAX: f32 = 448.0;

static FP8_GEMM: EnvSwitch = EnvSwitch::new("FINETUNE_FP8_GEMM");

/// Whether the model multiplies FP8 weights with this op (`FINETUNE_FP8_GEMM=1` in the
/// environment, or [`set_enabled`]); off by default.
pub fn enabled() -> bool {
    FP8_GEMM.get()
}

/// Turns the model's use of this op on or off for the whole process.
pub fn set_enabled(on: bool) {
    FP8_GEMM.set(on)
}

/// Why this op cannot compute x·Wᵀ for activations of `dtype` on `device` and a weight
/// `[n, k]` (`None`: it can). The model uses today's path when there is a reason.
pub fn unsupported(dtype: DType, device: &Device, n: usize, k: usize) -> Option<String> {
    if k == 0 || k % FP8_BLOCK != 0 {
        return Some(format!(
            "in-features {k} is not a multiple of {FP8_BLOCK} (one activation scale per {FP8_BLOCK} columns)"
        ));
    }
    if n == 0 || n % 16 != 0 {
        return Some(format!(
            "out-features {n} is not a multiple of 16 (FP8 tensor cores need 16-byte aligned dimensions)"
        ));
    }
    match (device.is_cpu(), dtype) {
        (true, DType::F32 | DType::BF16) | (false, DType::BF16) => None,
        (true, other) => Some(format!("activations are {other:?}, expected f32 or bf16")),
        (false, other) => Some(format!(
            "activations are {other:?}: the GPU FP8 GEMM takes and writes bf16"
        )),
    }
}

/// Whether a model multiplies activations of `dtype` on `device` by an FP8 weight `[n, k]` with
/// this op: [`enabled`] and nothing [`unsupported`]. When it is enabled but unsupported, the
/// reason goes to stderr once (per reason) and the caller keeps today's path.
pub fn use_for(dtype: DType, device: &Device, n: usize, k: usize) -> bool {
    if !enabled() {
        return false;
    }
    let Some(why) = unsupported(dtype, device, n, k) else {
        return true;
    };
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if let Ok(mut said) = SAID.lock() {
        if !said.contains(&why) {
            eprintln!(
                "finetune: FINETUNE_FP8_GEMM: a [{n}, {k}] FP8 weight takes the dequantize path instead: {why}"
            );
            said.push(why);
        }
    }
    false
}

/// Where each row group's activation scales start, and their total length: group g (rows
/// `offsets[g]..offsets[g + 1]`) holds rows_g · `k_blocks` floats (column block b of its row r
/// at `bases[g] + b·rows_g + r`), and every group starts on a multiple of 4 floats.
pub fn act_scale_bases(offsets: &[usize], k_blocks: usize) -> (Vec<usize>, usize) {
    let mut bases = Vec::with_capacity(offsets.len().saturating_sub(1));
    let mut next = 0;
    for pair in offsets.windows(2) {
        bases.push(next);
        next += ((pair[1] - pair[0]) * k_blocks).next_multiple_of(4);
    }
    (bases, next)
}

/// kernels/fp8_quantize.cu's launch for x `[rows, cols]` with `k_blocks` = ⌈cols/128⌉: one
/// block of 128 threads (one per column of the block) per row (x) and column block (y).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn quantize_launch_shape(rows: usize, k_blocks: usize) -> LaunchShape {
    LaunchShape {
        grid: (rows as u32, k_blocks as u32, 1),
        block: (FP8_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The E4M3 bit pattern of `v` (round to nearest even, saturating to ±448, NaN → 0x7f): the
/// `float8` crate, which ports CUDA's `__nv_cvt_double_to_fp8` (f32 → f64 is exact, so this
/// equals the hardware's f32 conversion, `cvt.rn.satfinite.e4m3x2.f32`).
fn e4m3_bits(v: f32) -> u8 {
    float8::F8E4M3::from_f32(v).to_bits()
}

/// The block scale of a block whose largest magnitude is `amax`: amax / 448, or 1 where that
/// is not positive (an all-zero block, or subnormals whose scale underflows to 0: dividing by
/// a 0 scale would give NaN and ±448 bytes for values that are all but zero).
fn block_scale(amax: f32) -> f32 {
    let s = amax / E4M3_MAX;
    if s > 0.0 {
        s
    } else {
        1.0
    }
}

/// Quantizes x `[rows, cols]` (row-major f32) per row and 128-column block: E4M3 bytes
/// `[rows, cols]` and the scales in the layout of [`act_scale_bases`] for `offsets` (from 0 to
/// rows; `[0, rows]` for one group). The last block of a row may be narrower than 128.
pub fn quantize_rows_cpu(x: &[f32], cols: usize, offsets: &[usize]) -> (Vec<u8>, Vec<f32>) {
    let k_blocks = cols.div_ceil(FP8_BLOCK);
    let (bases, len) = act_scale_bases(offsets, k_blocks);
    let mut q = vec![0u8; x.len()];
    let mut scales = vec![0f32; len];
    for (g, pair) in offsets.windows(2).enumerate() {
        let rows_g = pair[1] - pair[0];
        for row in pair[0]..pair[1] {
            for b in 0..k_blocks {
                let range =
                    row * cols + b * FP8_BLOCK..row * cols + ((b + 1) * FP8_BLOCK).min(cols);
                let amax = x[range.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = block_scale(amax);
                scales[bases[g] + b * rows_g + (row - pair[0])] = s;
                for i in range {
                    q[i] = e4m3_bits(x[i] / s);
                }
            }
        }
    }
    (q, scales)
}

/// x `[rows, cols]` (f32 or bf16, any device) quantized as [`quantize_rows_cpu`] describes: the
/// E4M3 bytes (U8 `[rows, cols]`) and the scales (f32, [`act_scale_bases`]'s length). On a GPU
/// by kernels/fp8_quantize.cu (the same operations).
pub fn fp8_quantize_rows(x: &Tensor, offsets: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, _) = x.dims2()?;
    check_offsets("fp8-quantize", offsets, rows)?;
    let x = x.contiguous()?;
    let offsets = Arc::new(offsets.to_vec());
    let q = x.apply_op1_no_bwd(&Quantize {
        offsets: offsets.clone(),
        scales: false,
    })?;
    let s = x.apply_op1_no_bwd(&Quantize {
        offsets,
        scales: true,
    })?;
    Ok((q, s))
}

fn check_offsets(op: &str, offsets: &[usize], rows: usize) -> candle_core::Result<()> {
    if offsets.len() < 2 || offsets[0] != 0 || offsets[offsets.len() - 1] != rows {
        candle_core::bail!(
            "{op}: offsets {:?}… must run from 0 to the {rows} rows",
            &offsets[..offsets.len().min(4)]
        );
    }
    if offsets.windows(2).any(|p| p[0] > p[1]) {
        candle_core::bail!("{op}: offsets must not decrease");
    }
    Ok(())
}

/// [`fp8_quantize_rows`]' op: the bytes, or the scales.
struct Quantize {
    offsets: Arc<Vec<usize>>,
    scales: bool,
}

impl CustomOp1 for Quantize {
    fn name(&self) -> &'static str {
        "fp8-quantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let x = cpu_f32(s, l, self.name(), "x")?;
        let (q, scales) = quantize_rows_cpu(&x, cols, &self.offsets);
        Ok(if self.scales {
            let n = scales.len();
            (CpuStorage::F32(scales), Shape::from(n))
        } else {
            (CpuStorage::U8(q), Shape::from((rows, cols)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let (q, scales) = cuda::quantize(s, l, &self.offsets)?;
        let dev = s.device.clone();
        Ok(if self.scales {
            let n = scales.len();
            (
                candle_core::CudaStorage::wrap_cuda_slice(scales, dev),
                Shape::from(n),
            )
        } else {
            (
                candle_core::CudaStorage::wrap_cuda_slice(q, dev),
                Shape::from((rows, cols)),
            )
        })
    }
}

/// A stacked FP8 weight `q` `[E, N, K]` (U8 bit patterns or F8E4M3) with `scale_inv`
/// `[E, ⌈N/128⌉, ⌈K/128⌉]`, dequantized to `dtype` `[E, N, K]` (one launch when blocks never
/// straddle two experts, N a multiple of 128).
pub fn dequantize_stack(
    q: &Tensor,
    scale_inv: &Tensor,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let (e, n, k) = q.dims3()?;
    let (_, sr, sc) = scale_inv.dims3()?;
    if n % FP8_BLOCK == 0 {
        return crate::fp8_dequant(
            &q.reshape((e * n, k))?,
            &scale_inv.reshape((e * sr, sc))?,
            dtype,
        )?
        .reshape((e, n, k));
    }
    let parts: Vec<Tensor> = (0..e)
        .map(|i| crate::fp8_dequant(&q.get(i)?, &scale_inv.get(i)?, dtype))
        .collect::<candle_core::Result<_>>()?;
    Tensor::stack(&parts, 0)
}

/// y = x·Wᵀ over the last dimension of x (f32 or bf16 on the CPU, bf16 on a GPU) for an FP8
/// weight `q` `[N, K]` with `scale_inv` `[⌈N/128⌉, ⌈K/128⌉]`, activations quantized to FP8
/// (see the module doc); differentiable in x only.
pub fn fp8_linear(x: &Tensor, q: &Tensor, scale_inv: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = q.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("fp8-linear: x {dims:?} does not end in the weight's in = {k}");
    }
    let rows = x.elem_count() / k.max(1);
    let y = fp8_grouped_linear(
        &x.reshape((rows, k))?,
        &q.unsqueeze(0)?,
        &scale_inv.unsqueeze(0)?,
        &Arc::new(vec![0, rows]),
    )?;
    let mut out = dims;
    *out.last_mut().expect("x has a last dimension") = n;
    y.reshape(out)
}

/// y[r] = x[r]·W[e]ᵀ for the rows `offsets[e]..offsets[e + 1]` of x `[rows, K]`, W stacked FP8
/// (`q` `[E, N, K]`, `scale_inv` `[E, ⌈N/128⌉, ⌈K/128⌉]`), activations quantized to FP8 (see the
/// module doc); differentiable in x only.
pub fn fp8_grouped_linear(
    x: &Tensor,
    q: &Tensor,
    scale_inv: &Tensor,
    offsets: &Arc<Vec<usize>>,
) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (e, n, qk) = q.dims3()?;
    let (se, sr, sc) = scale_inv.dims3()?;
    if qk != k || se != e || sr != n.div_ceil(FP8_BLOCK) || sc != k.div_ceil(FP8_BLOCK) {
        candle_core::bail!(
            "fp8-linear: x {:?}, q {:?}, scale_inv {:?}: expected x [rows, K], q [E, N, K], scale_inv [E, ⌈N/128⌉, ⌈K/128⌉]",
            x.dims(),
            q.dims(),
            scale_inv.dims()
        );
    }
    if offsets.len() != e + 1 {
        candle_core::bail!("fp8-linear: {} offsets for {e} experts", offsets.len());
    }
    check_offsets("fp8-linear", offsets, rows)?;
    if let Some(why) = unsupported(x.dtype(), x.device(), n, k) {
        candle_core::bail!("fp8-linear: {why}");
    }
    x.contiguous()?.apply_op1(Fp8Linear {
        q: q.contiguous()?,
        scale_inv: scale_inv.to_dtype(DType::F32)?.contiguous()?,
        offsets: offsets.clone(),
        dims: (e, n, k),
    })
}

/// The op of [`fp8_grouped_linear`] over x.
struct Fp8Linear {
    q: Tensor,
    scale_inv: Tensor,
    offsets: Arc<Vec<usize>>,
    dims: (usize, usize, usize),
}

impl Fp8Linear {
    /// The reference: quantized x and the weight, both dequantized, one f32 GEMM per group.
    fn cpu(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (_, n, k) = self.dims;
        let (qx, scales) = quantize_rows_cpu(x, k, &self.offsets);
        let table = e4m3_table();
        let k_blocks = k.div_ceil(FP8_BLOCK);
        let (bases, _) = act_scale_bases(&self.offsets, k_blocks);
        let w = dequantize_stack(
            &self.q.to_device(&Device::Cpu)?,
            &self.scale_inv.to_device(&Device::Cpu)?,
            DType::F32,
        )?
        .flatten_all()?
        .to_vec1::<f32>()?;
        let rows = x.len() / k;
        let mut y = vec![0f32; rows * n];
        for (g, pair) in self.offsets.windows(2).enumerate() {
            let rows_g = pair[1] - pair[0];
            if rows_g == 0 {
                continue;
            }
            let xd: Vec<f32> = (0..rows_g * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    table[qx[(pair[0] + r) * k + c] as usize]
                        * scales[bases[g] + (c / FP8_BLOCK) * rows_g + r]
                })
                .collect();
            let we = &w[g * n * k..(g + 1) * n * k];
            let threads = rayon::current_num_threads();
            gemm_f32(
                (rows_g, n, k),
                (&mut y[pair[0] * n..pair[1] * n], n, false),
                (&xd, k, 1),
                // Wᵀ: element (c, o) at o·K + c.
                (we, 1, k),
                1.0,
                threads,
            );
        }
        Ok(y)
    }
}

impl CustomOp1 for Fp8Linear {
    fn name(&self) -> &'static str {
        "fp8-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, _) = l.shape().dims2()?;
        let x = cpu_f32(s, l, self.name(), "x")?;
        let y = self.cpu(&x)?;
        Ok((cpu_out(y, s.dtype()), Shape::from((rows, self.dims.1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, _) = l.shape().dims2()?;
        let y = cuda::forward(self, s, l)?;
        Ok((y, Shape::from((rows, self.dims.1))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (q, s, dtype) = (self.q.clone(), self.scale_inv.clone(), dy.dtype());
        let weight: crate::WeightFn = Arc::new(move || dequantize_stack(&q, &s, dtype));
        Ok(Some(crate::grouped_linear::grouped_input_grad(
            dy,
            weight,
            self.dims,
            &self.offsets,
        )?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The quantize launch and the block-scaled cuBLASLt matmuls.
    use super::{act_scale_bases, dequantize_stack, quantize_launch_shape, Fp8Linear, FP8_BLOCK};
    use crate::common::cuda::view;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Tensor};
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};

    /// x quantized on the GPU: E4M3 bytes `[rows, cols]` and the scales of `offsets`' groups.
    pub(super) fn quantize(
        s: &CudaStorage,
        l: &Layout,
        offsets: &[usize],
    ) -> candle_core::Result<(CudaSlice<u8>, CudaSlice<f32>)> {
        let (rows, cols) = l.shape().dims2()?;
        let dev = s.device.clone();
        let k_blocks = cols.div_ceil(FP8_BLOCK);
        let (bases, len) = act_scale_bases(offsets, k_blocks);
        let q = dev.alloc_zeros::<u8>(rows * cols)?;
        // Zeros: the padding between groups is never read, but defined.
        let scales = dev.alloc_zeros::<f32>(len.max(1))?;
        if rows == 0 || cols == 0 {
            return Ok((q, scales));
        }
        let to_i32 = |v: &[usize]| -> candle_core::Result<Vec<i32>> {
            v.iter()
                .map(|&o| {
                    i32::try_from(o).map_err(|_| {
                        candle_core::Error::Msg(format!("fp8-quantize: {o} does not fit an i32"))
                    })
                })
                .collect()
        };
        if k_blocks > 65_535 {
            candle_core::bail!("fp8-quantize: {cols} columns: more than 65,535 blocks of 128");
        }
        let offsets_d = dev.clone_htod(&to_i32(offsets)?)?;
        let bases_d = dev.clone_htod(&to_i32(&bases)?)?;
        let (rows_i, cols_i, groups) = (rows as i32, cols as i32, (offsets.len() - 1) as i32);
        let cfg = LaunchConfig::from(quantize_launch_shape(rows, k_blocks));
        let name = match s.dtype() {
            DType::BF16 => "fp8_quantize_rows_bf16",
            DType::F32 => "fp8_quantize_rows_f32",
            other => {
                candle_core::bail!("fp8-quantize (cuda): x is {other:?}, expected f32 or bf16")
            }
        };
        let f = dev.get_or_load_custom_func(name, "fp8_quantize", crate::ptx::FP8_QUANTIZE)?;
        // The input view, declared before the builder that borrows it.
        let (xb, xf) = if s.dtype() == DType::BF16 {
            (Some(view::<half::bf16>(s, l, "fp8-quantize", "x")?), None)
        } else {
            (None, Some(view::<f32>(s, l, "fp8-quantize", "x")?))
        };
        let mut b = f.builder();
        match (&xb, &xf) {
            (Some(x), _) => b.arg(x),
            (_, Some(x)) => b.arg(x),
            _ => unreachable!("one of the two views is set"),
        };
        b.arg(&q)
            .arg(&scales)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&offsets_d)
            .arg(&bases_d)
            .arg(&groups);
        // SAFETY: the kernel reads rows·cols inputs and `offsets`/`bases` (groups + 1 and
        // groups entries), and writes rows·cols bytes and scales below `len` (act_scale_bases).
        unsafe { b.launch(cfg) }.w()?;
        Ok((q, scales))
    }

    /// One cuBLASLt handle and workspace per device, for the process's lifetime.
    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
    }
    // SAFETY: a cuBLASLt handle may be used from any thread (cuBLAS docs, "Thread Safety": the
    // library is thread safe, the handle holds no per-thread state); calls are serialized on
    // candle's one stream per device.
    unsafe impl Send for Lt {}
    unsafe impl Sync for Lt {}

    /// 32 MiB: NVIDIA's recommendation for Hopper (cudarc's `Workspace` uses the same).
    const WORKSPACE: usize = 32 << 20;

    fn lt(dev: &CudaDevice) -> candle_core::Result<Arc<Lt>> {
        static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<Lt>>>> = OnceLock::new();
        let mut map = HANDLES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("fp8-linear: cuBLASLt handle lock".into()))?;
        if let Some(lt) = map.get(&dev.id()) {
            return Ok(lt.clone());
        }
        dev.cuda_stream().context().bind_to_thread().w()?;
        let handle = result::create_handle()
            .map_err(|e| candle_core::Error::Msg(format!("fp8-linear: cublasLtCreate: {e}")))?;
        let workspace = dev.alloc_zeros::<u8>(WORKSPACE)?;
        let lt = Arc::new(Lt { handle, workspace });
        map.insert(dev.id(), lt.clone());
        Ok(lt)
    }

    /// The heuristic's algorithm per (device, N, rows, K): asked once per shape (the query
    /// costs more than a small expert's GEMM).
    type AlgoKey = (DeviceId, u64, u64, u64);
    fn algo_cache() -> &'static Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>> {
        static CACHE: OnceLock<Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>> =
            OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    /// A cuBLASLt status as an error naming the call.
    fn st(what: &str, s: sys::cublasStatus_t) -> Result<(), String> {
        s.result().map_err(|e| format!("{what}: {e}"))
    }

    /// Descriptors destroyed when dropped.
    struct Descs {
        desc: sys::cublasLtMatmulDesc_t,
        layouts: Vec<sys::cublasLtMatrixLayout_t>,
        pref: sys::cublasLtMatmulPreference_t,
    }

    impl Drop for Descs {
        fn drop(&mut self) {
            // SAFETY: each handle was created by the matching create call and is destroyed once.
            unsafe {
                for l in &self.layouts {
                    if !l.is_null() {
                        let _ = sys::cublasLtMatrixLayoutDestroy(*l);
                    }
                }
                if !self.desc.is_null() {
                    let _ = sys::cublasLtMatmulDescDestroy(self.desc);
                }
                if !self.pref.is_null() {
                    let _ = sys::cublasLtMatmulPreferenceDestroy(self.pref);
                }
            }
        }
    }

    /// Device pointers of one group's product.
    struct GroupPtrs {
        w: u64,
        w_scale: u64,
        x: u64,
        x_scale: u64,
        y: u64,
    }

    /// y_g `[rows, n]` (bf16, row-major) = dequant(x_g)·dequant(W_e)ᵀ as one block-scaled
    /// cuBLASLt matmul (see the module doc for the operand mapping).
    ///
    /// # Safety
    /// The pointers hold: W_e n×k E4M3 bytes, its padded BLK128x128 scales, x_g rows×k E4M3
    /// bytes, its VEC128 scales (⌈k/128⌉·rows floats), y_g rows×n bf16; all on `stream`'s
    /// device, 16-byte aligned.
    unsafe fn matmul(
        lt: &Lt,
        stream: &CudaStream,
        key: AlgoKey,
        (n, rows, k): (u64, u64, u64),
        p: &GroupPtrs,
    ) -> Result<(), String> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulMatrixScale_t as S;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let mut d = Descs {
            desc: std::ptr::null_mut(),
            layouts: Vec::new(),
            pref: std::ptr::null_mut(),
        };
        st(
            "cublasLtMatmulDescCreate",
            sys::cublasLtMatmulDescCreate(
                &mut d.desc,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            ),
        )?;
        // One attribute from a value of its C type (its size is the attribute's size).
        unsafe fn set<T>(
            desc: sys::cublasLtMatmulDesc_t,
            attr: D,
            value: &T,
        ) -> Result<(), String> {
            st(
                "cublasLtMatmulDescSetAttribute",
                sys::cublasLtMatmulDescSetAttribute(
                    desc,
                    attr,
                    (value as *const T).cast::<c_void>(),
                    std::mem::size_of::<T>(),
                ),
            )
        }
        // cublasOperation_t as int32: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        for (attr, value) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, 1i32),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, 0),
            (
                D::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                S::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32,
            ),
            (
                D::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                S::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32,
            ),
        ] {
            set(d.desc, attr, &value)?;
        }
        for (attr, pointer) in [
            (D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, p.w_scale),
            (D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, p.x_scale),
        ] {
            set(d.desc, attr, &pointer)?;
        }
        use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_8F_E4M3};
        for (ty, r, c, ld) in [
            (CUDA_R_8F_E4M3, k, n, k),    // A: W_e stored [K, N], op T
            (CUDA_R_8F_E4M3, k, rows, k), // B: x_g stored [K, rows], op N
            (CUDA_R_16BF, n, rows, n),    // C = D: yᵀ [N, rows]
        ] {
            let mut l = std::ptr::null_mut();
            st(
                "cublasLtMatrixLayoutCreate",
                sys::cublasLtMatrixLayoutCreate(&mut l, ty, r, c, ld as i64),
            )?;
            d.layouts.push(l);
        }
        let (a_l, b_l, c_l) = (d.layouts[0], d.layouts[1], d.layouts[2]);
        let algo = {
            let cached = algo_cache().lock().ok().and_then(|c| c.get(&key).copied());
            match cached {
                Some(a) => a,
                None => {
                    st(
                        "cublasLtMatmulPreferenceCreate",
                        sys::cublasLtMatmulPreferenceCreate(&mut d.pref),
                    )?;
                    let ws = WORKSPACE;
                    st(
                        "cublasLtMatmulPreferenceSetAttribute",
                        sys::cublasLtMatmulPreferenceSetAttribute(
                            d.pref,
                            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                            (&ws as *const usize).cast(),
                            8,
                        ),
                    )?;
                    // One expert's rows start inside a larger buffer: promise 16-byte alignment
                    // only (the default assumes 256, and an algorithm chosen under it may
                    // misread the others).
                    let align = 16u32;
                    for attr in [
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    ] {
                        st(
                            "cublasLtMatmulPreferenceSetAttribute",
                            sys::cublasLtMatmulPreferenceSetAttribute(
                                d.pref,
                                attr,
                                (&align as *const u32).cast(),
                                4,
                            ),
                        )?;
                    }
                    let mut heur: sys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
                    let mut found = 0i32;
                    st(
                        "cublasLtMatmulAlgoGetHeuristic",
                        sys::cublasLtMatmulAlgoGetHeuristic(
                            lt.handle, d.desc, a_l, b_l, c_l, c_l, d.pref, 1, &mut heur, &mut found,
                        ),
                    )?;
                    if found == 0 {
                        return Err(format!(
                            "cublasLtMatmulAlgoGetHeuristic found no block-scaled FP8 algorithm \
                             for N {n}, rows {rows}, K {k} (VEC128/BLK128x128 need an sm_90 GPU)"
                        ));
                    }
                    st("heuristic state", heur.state)?;
                    if let Ok(mut c) = algo_cache().lock() {
                        c.insert(key, heur.algo);
                    }
                    heur.algo
                }
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        let (ws, _ws_rec) = lt.workspace.device_ptr(stream);
        st(
            "cublasLtMatmul",
            sys::cublasLtMatmul(
                lt.handle,
                d.desc,
                (&alpha as *const f32).cast(),
                p.w as *const c_void,
                a_l,
                p.x as *const c_void,
                b_l,
                (&beta as *const f32).cast(),
                p.y as *const c_void,
                c_l,
                p.y as *mut c_void,
                c_l,
                &algo,
                ws as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as sys::cudaStream_t,
            ),
        )
    }

    /// The weight's scales as cuBLASLt's BLK128x128 layout wants them: `[E, ⌈N/128⌉, Kp]` f32
    /// with Kp = ⌈K/128⌉ rounded up to 4 (the padding never multiplies anything), at offset 0.
    fn padded_weight_scales(scale_inv: &Tensor) -> candle_core::Result<Tensor> {
        let kb = scale_inv.dim(2)?;
        let pad = kb.next_multiple_of(4) - kb;
        let s = scale_inv.to_dtype(DType::F32)?;
        if pad == 0 {
            // A fresh copy when the view does not start at a 16-byte boundary.
            let (start, _) = s.layout().contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("fp8-linear: scales not contiguous".into())
            })?;
            return if start % 4 == 0 { Ok(s) } else { s.copy() };
        }
        s.pad_with_zeros(2, 0, pad)?.contiguous()
    }

    pub(super) fn forward(
        op: &Fp8Linear,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device.clone();
        let (_, n, k) = op.dims;
        let (rows, _) = l.shape().dims2()?;
        let mut y = dev.alloc_zeros::<half::bf16>(rows * n)?;
        if rows == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(y, dev));
        }
        let (qx, xs) = quantize(s, l, &op.offsets)?;
        let (bases, _) = act_scale_bases(&op.offsets, k / FP8_BLOCK);
        let ws = padded_weight_scales(&op.scale_inv)?;
        let wq = if op.q.layout().start_offset() % 16 == 0 {
            op.q.clone()
        } else {
            op.q.copy()?
        };
        let (wq_s, wq_l) = wq.storage_and_layout();
        let (ws_s, ws_l) = ws.storage_and_layout();
        let (candle_core::Storage::Cuda(wq_c), candle_core::Storage::Cuda(ws_c)) = (&*wq_s, &*ws_s)
        else {
            candle_core::bail!("fp8-linear (cuda): the weight is not on the GPU");
        };
        if wq_c.dtype() != DType::U8 {
            candle_core::bail!(
                "fp8-linear (cuda): the weight is {:?}, expected U8 E4M3 bit patterns",
                wq_c.dtype()
            );
        }
        let stream = dev.cuda_stream();
        let lt = lt(&dev)?;
        let wv = view::<u8>(wq_c, wq_l, "fp8-linear", "q")?;
        let sv = view::<f32>(ws_c, ws_l, "fp8-linear", "scale_inv")?;
        let (w_ptr, _r1) = wv.device_ptr(&stream);
        let (ws_ptr, _r2) = sv.device_ptr(&stream);
        let (x_ptr, _r3) = qx.device_ptr(&stream);
        let (xs_ptr, _r4) = xs.device_ptr(&stream);
        let mut failure = None;
        {
            let (y_ptr, _r5) = y.device_ptr_mut(&stream);
            let w_scale_stride =
                (n.div_ceil(FP8_BLOCK) * k.div_ceil(FP8_BLOCK).next_multiple_of(4)) as u64;
            for (g, (pair, &base)) in op.offsets.windows(2).zip(&bases).enumerate() {
                let (start, end) = (pair[0], pair[1]);
                if end == start {
                    continue;
                }
                let p = GroupPtrs {
                    w: w_ptr + (g * n * k) as u64,
                    w_scale: ws_ptr + g as u64 * w_scale_stride * 4,
                    x: x_ptr + (start * k) as u64,
                    x_scale: xs_ptr + (base * 4) as u64,
                    y: y_ptr + (start * n * 2) as u64,
                };
                let key = (dev.id(), n as u64, (end - start) as u64, k as u64);
                // SAFETY: the pointers address the buffers above at the offsets of group g
                // (shapes checked by fp8_grouped_linear, scale layouts by act_scale_bases and
                // padded_weight_scales), 16-byte aligned (K a multiple of 128, N of 16, bases
                // and padded rows multiples of 4 floats); all on candle's stream.
                if let Err(why) = unsafe {
                    matmul(
                        &lt,
                        &stream,
                        key,
                        (n as u64, (end - start) as u64, k as u64),
                        &p,
                    )
                } {
                    failure = Some(why);
                    break;
                }
            }
        }
        drop((_r1, _r2, _r3, _r4));
        if let Some(why) = failure {
            // Today's path: the weight dequantized to bf16, one cuBLAS GEMM per group.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "finetune: the FP8 GEMM is unavailable here ({why}); FP8 weights are \
                     dequantized to bf16 instead (unset FINETUNE_FP8_GEMM to silence this)"
                )
            });
            let w = dequantize_stack(&op.q, &op.scale_inv, DType::BF16)?;
            let (w_s, w_l) = w.storage_and_layout();
            let candle_core::Storage::Cuda(w_c) = &*w_s else {
                candle_core::bail!("fp8-linear (cuda): the dequantized weight is not on the GPU");
            };
            let lin = crate::grouped_linear::GroupedLinear::forward(op.offsets.clone());
            use candle_core::CustomOp2;
            return Ok(lin.cuda_fwd(s, l, w_c, w_l)?.0);
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{data, rel_diff, tensor};
    use candle_core::Var;

    /// The E4M3 value nearest `v`, by search over all 254 finite patterns, ties to the even
    /// pattern, |v| beyond 448 saturating: an oracle independent of the `float8` crate.
    fn nearest_e4m3(v: f32) -> u8 {
        let table = e4m3_table();
        let v = v.clamp(-E4M3_MAX, E4M3_MAX) as f64;
        let mut best: Option<(f64, u8)> = None;
        for bits in 0u8..=255 {
            let t = table[bits as usize];
            if t.is_nan() {
                continue;
            }
            let d = (t as f64 - v).abs();
            best = match best {
                None => Some((d, bits)),
                Some((bd, bb)) => {
                    let better = d < bd
                        || (d == bd && (bits & 1) == 0 && (bb & 1) == 1)
                        // ±0: the sign of v.
                        || (d == bd && t == 0.0 && (bits >> 7) == u8::from(v.is_sign_negative()));
                    if better {
                        Some((d, bits))
                    } else {
                        Some((bd, bb))
                    }
                }
            };
        }
        best.expect("finite patterns exist").1
    }

    /// x `[rows, cols]` with per-row magnitudes that differ by orders of magnitude, a zero
    /// block and a value far from the others in one block.
    fn activations(rows: usize, cols: usize, salt: u64) -> Vec<f32> {
        let mut x = data(rows * cols, salt);
        for (i, v) in x.iter_mut().enumerate() {
            let (r, c) = (i / cols, i % cols);
            *v *= 10f32.powi((r % 5) as i32 - 2);
            if r == 1 && c < FP8_BLOCK.min(cols) {
                *v = 0.0;
            }
            if r == 2 && c == 3 {
                *v = 1e4;
            }
        }
        x
    }

    #[test]
    fn quantization_rounds_to_the_nearest_e4m3_with_per_block_scales() {
        let (rows, cols) = (7, 300); // the last block is 44 wide
        let x = activations(rows, cols, 1);
        let offsets = [0, 3, 3, 7];
        let (q, s) = quantize_rows_cpu(&x, cols, &offsets);
        let kb = cols.div_ceil(FP8_BLOCK);
        let (bases, len) = act_scale_bases(&offsets, kb);
        assert_eq!(bases, vec![0, 12, 12]);
        assert_eq!(len, 24);
        assert_eq!(s.len(), len);
        let table = e4m3_table();
        for (g, pair) in offsets.windows(2).enumerate() {
            for row in pair[0]..pair[1] {
                for b in 0..kb {
                    let cs = b * FP8_BLOCK..((b + 1) * FP8_BLOCK).min(cols);
                    let amax = cs
                        .clone()
                        .map(|c| x[row * cols + c].abs())
                        .fold(0f32, f32::max);
                    let scale = s[bases[g] + b * (pair[1] - pair[0]) + row - pair[0]];
                    if amax == 0.0 {
                        assert_eq!(scale, 1.0);
                    } else {
                        assert_eq!(scale, amax / 448.0, "row {row} block {b}");
                    }
                    let mut top = 0f32;
                    for c in cs {
                        let i = row * cols + c;
                        assert_eq!(q[i], nearest_e4m3(x[i] / scale), "x[{row}][{c}] = {}", x[i]);
                        let back = table[q[i] as usize] * scale;
                        // E4M3 keeps 3 mantissa bits: half an ulp is 2⁻⁴ relative for normal
                        // values; subnormals (below 2⁻⁶·scale) lose at most 2⁻¹⁰·scale.
                        assert!(
                            (back - x[i]).abs() <= x[i].abs() / 16.0 + scale * 2f32.powi(-10),
                            "x[{row}][{c}] = {} → {back}",
                            x[i]
                        );
                        top = top.max(table[q[i] as usize].abs());
                    }
                    // The block's largest magnitude maps onto 448 (or the block is zero).
                    assert_eq!(top, if amax == 0.0 { 0.0 } else { 448.0 });
                }
            }
        }
        // The op gives the same on the CPU device.
        let xt = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
        let (qt, st) = fp8_quantize_rows(&xt, &offsets).unwrap();
        assert_eq!(qt.flatten_all().unwrap().to_vec1::<u8>().unwrap(), q);
        assert_eq!(st.to_vec1::<f32>().unwrap(), s);
    }

    /// kernels/fp8_quantize.cu (both instantiations) run on the CPU by finetune-kernel-emu in
    /// both fiber orders with the CUDA launch's geometry: the bytes and every scale of
    /// [`quantize_rows_cpu`] bit for bit (no tolerance: the kernel does the same operations, an
    /// amax (max is exact and order-free, NaN ignored by both fmaxf and f32::max), one f32
    /// division for the scale and one per element, round to nearest even with saturation), and
    /// the padding between groups' scales left as it was. Several row groups with empty ones
    /// first, between and last, 300 columns (a 44-wide last block), exactly 128, and 5; an
    /// all-zero and an all −0 block, NaNs of both signs, a block whose largest element divided
    /// by its scale is 448.00003 (past 448 by the scale's rounding), and an f32 block of
    /// subnormals whose scale rounds so coarsely that its largest element becomes 560 before
    /// saturating to 448.
    #[test]
    fn emulated_kernels_equal_the_cpu_reference_bit_for_bit() {
        use finetune_kernel_emu::{launch, Buffer, Order};
        extern "C" {
            fn fp8_quantize_rows_f32(
                x: *const f32,
                q: *mut u8,
                scales: *mut f32,
                rows: i32,
                cols: i32,
                offsets: *const i32,
                bases: *const i32,
                groups: i32,
            );
            fn fp8_quantize_rows_bf16(
                x: *const u16,
                q: *mut u8,
                scales: *mut f32,
                rows: i32,
                cols: i32,
                offsets: *const i32,
                bases: *const i32,
                groups: i32,
            );
        }
        let subnormal = |units: u32| f32::from_bits(units); // units of 2⁻¹⁴⁹
        for (rows, cols, offsets) in [
            (41usize, 300usize, vec![0usize, 0, 5, 5, 23, 41, 41]),
            (9, 128, vec![0, 9]),
            (3, 5, vec![0, 1, 3]),
        ] {
            let mut x = activations(rows, cols, 3);
            let at = |r: usize, c: usize| r * cols + c.min(cols - 1);
            let block0 = |r: usize| r * cols..r * cols + FP8_BLOCK.min(cols);
            if rows > 6 {
                x[block0(5)].fill(-0.0);
                x[at(4, 1)] = f32::NAN;
                x[at(4, 2)] = -f32::NAN;
                // Row 6 is scaled by 0.1 (|x| < 0.2): 2.046875 (a bf16 value) is its first
                // block's amax, and 2.046875 / f32(2.046875 / 448) = 448.00003.
                x[at(6, 7)] = 2.046875;
                let s = 2.046875f32 / E4M3_MAX;
                assert!(2.046875 / s > E4M3_MAX);
                // Largest 1,120·2⁻¹⁴⁹: its scale 2.5·2⁻¹⁴⁹ rounds to 2·2⁻¹⁴⁹ (even), so the
                // element divides to 560 and saturates; the others land in between.
                for (i, v) in x[block0(3)].iter_mut().enumerate() {
                    *v = subnormal((i as u32 * 97) % 1120);
                }
                x[at(3, 9)] = -subnormal(1120);
                assert_eq!(subnormal(1120) / (subnormal(1120) / E4M3_MAX), 560.0);
                // Largest 100·2⁻¹⁴⁹: amax / 448 underflows to 0, so the scale is 1 (a 0 scale
                // would turn the block's elements into NaN and ±448 bytes).
                for (i, v) in x[block0(7)].iter_mut().enumerate() {
                    *v = subnormal((i as u32 * 13) % 101);
                }
                assert_eq!(subnormal(100) / E4M3_MAX, 0.0);
            }
            let k_blocks = cols.div_ceil(FP8_BLOCK);
            let (bases, len) = act_scale_bases(&offsets, k_blocks);
            // The scales the groups define; the rest is padding (4-float alignment).
            let mut defined = vec![false; len.max(1)];
            for (g, pair) in offsets.windows(2).enumerate() {
                defined[bases[g]..bases[g] + (pair[1] - pair[0]) * k_blocks].fill(true);
            }
            let offsets_i: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
            let bases_i: Vec<i32> = bases.iter().map(|&b| b as i32).collect();
            let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let x_of_bf16: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let shape = quantize_launch_shape(rows, k_blocks);
            for bf16 in [false, true] {
                let (want_q, want_s) =
                    quantize_rows_cpu(if bf16 { &x_of_bf16 } else { &x }, cols, &offsets);
                for order in Order::BOTH {
                    let what = format!("{rows}×{cols} {offsets:?} bf16 {bf16} {order:?}");
                    let (xf, xh) = (Buffer::from_slice(&x), Buffer::from_slice(&xb));
                    let (off, bas) = (Buffer::from_slice(&offsets_i), Buffer::from_slice(&bases_i));
                    // 0x7f (+NaN) where no element should be one: only +NaN inputs map to it.
                    let q = Buffer::filled(rows * cols, 0x7fu8);
                    let scales = Buffer::filled(len.max(1), f32::NAN);
                    let (r, c, g) = (rows as i32, cols as i32, (offsets.len() - 1) as i32);
                    launch(shape.into(), order, || unsafe {
                        if bf16 {
                            fp8_quantize_rows_bf16(
                                xh.ptr().cast(),
                                q.mut_ptr(),
                                scales.mut_ptr(),
                                r,
                                c,
                                off.ptr(),
                                bas.ptr(),
                                g,
                            )
                        } else {
                            fp8_quantize_rows_f32(
                                xf.ptr(),
                                q.mut_ptr(),
                                scales.mut_ptr(),
                                r,
                                c,
                                off.ptr(),
                                bas.ptr(),
                                g,
                            )
                        }
                    })
                    .unwrap();
                    let got_q = q.to_vec();
                    if let Some(i) = (0..got_q.len()).find(|&i| got_q[i] != want_q[i]) {
                        panic!(
                            "{what}: q[{}][{}] = {:#04x}, want {:#04x} (x = {:e})",
                            i / cols,
                            i % cols,
                            got_q[i],
                            want_q[i],
                            x[i]
                        );
                    }
                    for (i, got) in scales.to_vec().into_iter().enumerate() {
                        if defined[i] {
                            assert_eq!(got.to_bits(), want_s[i].to_bits(), "{what}: scale {i}");
                        } else {
                            assert!(got.is_nan(), "{what}: padding scale {i} written ({got})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_ties_and_saturation_match_the_oracle() {
        // Exact midpoints between E4M3 neighbours (ties to even), values past 448, subnormals
        // and their midpoints, and ±0.
        let table = e4m3_table();
        let mut values = vec![
            0.0f32,
            -0.0,
            448.0,
            449.0,
            464.0,
            500.0,
            -1e9,
            2f32.powi(-10),
        ];
        for bits in 0u8..0x7e {
            let (a, b) = (table[bits as usize], table[bits as usize + 1]);
            values.extend([(a + b) / 2.0, -(a + b) / 2.0, a * 1.01, b * 0.99]);
        }
        for v in values {
            assert_eq!(e4m3_bits(v), nearest_e4m3(v), "{v}");
        }
    }

    /// x·Wᵀ in f64 from x's quantization and W's dequantization done here by table lookups:
    /// the reference for the op, independent of its GEMM and of fp8_dequant.
    fn reference(
        x: &[f32],
        cols: usize,
        offsets: &[usize],
        wq: &[u8],
        ws: &[f32],
        (n, k): (usize, usize),
    ) -> Vec<f32> {
        let (q, s) = quantize_rows_cpu(x, cols, offsets);
        let (bases, _) = act_scale_bases(offsets, k.div_ceil(FP8_BLOCK));
        let table = e4m3_table();
        let (nb, kb) = (n.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK));
        let rows = x.len() / cols;
        let mut y = vec![0f32; rows * n];
        for (g, pair) in offsets.windows(2).enumerate() {
            let rg = pair[1] - pair[0];
            for r in pair[0]..pair[1] {
                for o in 0..n {
                    let mut acc = 0f64;
                    for c in 0..k {
                        let xv = table[q[r * k + c] as usize] as f64
                            * s[bases[g] + (c / FP8_BLOCK) * rg + r - pair[0]] as f64;
                        let wv = table[wq[(g * n + o) * k + c] as usize] as f64
                            * ws[(g * nb + o / FP8_BLOCK) * kb + c / FP8_BLOCK] as f64;
                        acc += xv * wv;
                    }
                    y[r * n + o] = acc as f32;
                }
            }
        }
        y
    }

    /// An FP8 stack `[e, n, k]` (no NaN patterns) with scales that differ per block.
    fn weight(e: usize, n: usize, k: usize, salt: usize) -> (Vec<u8>, Vec<f32>) {
        let q: Vec<u8> = (0..e * n * k)
            .map(|i| ((i * 37 + salt) % 0x7e) as u8 | if (i + salt) % 3 == 0 { 0x80 } else { 0 })
            .collect();
        let blocks = e * n.div_ceil(FP8_BLOCK) * k.div_ceil(FP8_BLOCK);
        let s = (0..blocks)
            .map(|i| 2f32.powi((i % 5) as i32 - 8) * (1.0 + (i % 3) as f32 * 0.25))
            .collect();
        (q, s)
    }

    fn weight_tensors(
        (q, s): &(Vec<u8>, Vec<f32>),
        (e, n, k): (usize, usize, usize),
        device: &Device,
    ) -> (Tensor, Tensor) {
        (
            Tensor::from_vec(q.clone(), (e, n, k), device).unwrap(),
            Tensor::from_vec(
                s.clone(),
                (e, n.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK)),
                device,
            )
            .unwrap(),
        )
    }

    #[test]
    fn cpu_forward_and_input_gradient_equal_the_f64_reference() {
        // 3 experts (one empty), K 256 → N 144 (N not a multiple of 128: a partial scale row).
        let (e, n, k) = (3, 144, 256);
        let offsets = Arc::new(vec![0, 5, 5, 12]);
        let w = weight(e, n, k, 1);
        let (q, s) = weight_tensors(&w, (e, n, k), &Device::Cpu);
        let x = activations(12, k, 2);
        let want = reference(&x, k, &offsets, &w.0, &w.1, (n, k));
        let xv = Var::from_vec(x.clone(), (12, k), &Device::Cpu).unwrap();
        let y = fp8_grouped_linear(xv.as_tensor(), &q, &s, &offsets).unwrap();
        let want_t = Tensor::from_vec(want, (12, n), &Device::Cpu).unwrap();
        let d = rel_diff(&y, &want_t);
        assert!(d < 1e-6, "forward {d}");
        // dx = dy·dequant(W) per group, against candle's matmul on the dequantized stack.
        let g = tensor(&[12, n], 3);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(xv.as_tensor()).unwrap();
        let wd = dequantize_stack(&q, &s, DType::F32).unwrap();
        let parts: Vec<Tensor> = (0..e)
            .filter(|&i| offsets[i + 1] > offsets[i])
            .map(|i| {
                g.narrow(0, offsets[i], offsets[i + 1] - offsets[i])
                    .unwrap()
                    .matmul(&wd.get(i).unwrap())
                    .unwrap()
            })
            .collect();
        let d = rel_diff(dx, &Tensor::cat(&parts, 0).unwrap());
        assert!(d < 1e-6, "dx {d}");
    }

    #[test]
    fn the_single_weight_form_and_bf16_inputs() {
        let (n, k) = (128, 384);
        let w = weight(1, n, k, 4);
        let (q, s) = weight_tensors(&w, (1, n, k), &Device::Cpu);
        let (q, s) = (q.squeeze(0).unwrap(), s.squeeze(0).unwrap());
        let x = activations(2 * 3, k, 5);
        let want = reference(&x, k, &[0, 6], &w.0, &w.1, (n, k));
        let xt = Tensor::from_vec(x, (2, 3, k), &Device::Cpu).unwrap();
        let y = fp8_linear(&xt, &q, &s).unwrap();
        assert_eq!(y.dims(), [2, 3, n]);
        let want = Tensor::from_vec(want, (2, 3, n), &Device::Cpu).unwrap();
        assert!(rel_diff(&y, &want) < 1e-6);
        // bf16 activations: the same quantization of the bf16 values, a bf16 result.
        let xb = xt.to_dtype(DType::BF16).unwrap();
        let yb = fp8_linear(&xb, &q, &s).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let xr = xb.to_dtype(DType::F32).unwrap();
        let yr = fp8_linear(&xr, &q, &s)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(rel_diff(&yb, &yr), 0.0);
    }

    #[test]
    fn unsupported_shapes_and_dtypes_are_named() {
        let cpu = Device::Cpu;
        assert_eq!(unsupported(DType::F32, &cpu, 768, 2048), None);
        assert_eq!(unsupported(DType::BF16, &cpu, 2048, 768), None);
        let why = unsupported(DType::F32, &cpu, 768, 200).unwrap();
        assert!(why.contains("in-features 200"), "{why}");
        let why = unsupported(DType::F32, &cpu, 40, 256).unwrap();
        assert!(why.contains("out-features 40"), "{why}");
        let why = unsupported(DType::F16, &cpu, 128, 256).unwrap();
        assert!(why.contains("F16"), "{why}");
        // The op refuses them too, and bad offsets.
        let w = weight(1, 40, 256, 1);
        let (q, s) = weight_tensors(&w, (1, 40, 256), &cpu);
        let x = tensor(&[4, 256], 1);
        let err = fp8_grouped_linear(&x, &q, &s, &Arc::new(vec![0, 4]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("out-features 40"), "{err}");
        let w = weight(2, 128, 256, 1);
        let (q, s) = weight_tensors(&w, (2, 128, 256), &cpu);
        let err = fp8_grouped_linear(&x, &q, &s, &Arc::new(vec![0, 3, 2]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("offsets"), "{err}");
    }

    /// The GPU: quantization bit for bit and the block-scaled cuBLASLt GEMM against the CPU
    /// reference at the 30B-A3B expert shapes (gate/up K 2048 → N 768, down K 768 → N 2048),
    /// an odd row count, and the grouped form against per-expert calls.
    ///
    /// Tolerance: both sides multiply the same FP8 values with the same scales (the
    /// quantization is checked equal first), so the only differences are the accumulation order
    /// (f32 on the tensor cores, where the block scales are applied to partial sums per 128-wide
    /// K block, against one f32 GEMM of dequantized values on the CPU: ~K·2⁻²⁴ relative, 1e-4
    /// at K = 2048) and the rounding of the result to bf16 (2⁻⁹ relative per element), so a
    /// difference of 1e-2 of the largest |y| (rel_diff's measure) allows 5× bf16's worst case.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference() {
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        for (rows, k, n) in [(256, 2048, 768), (256, 768, 2048), (37, 2048, 768)] {
            let x = Tensor::from_vec(activations(rows, k, 7), (rows, k), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let xg = x.to_device(&gpu).unwrap();
            // Quantization: the same bytes (±0 aside) and the same scales.
            let offsets = [0, rows / 3, rows / 3, rows];
            let (qc, sc) = fp8_quantize_rows(&x, &offsets).unwrap();
            let (qg, sg) = fp8_quantize_rows(&xg, &offsets).unwrap();
            let strip = |t: &Tensor| -> Vec<u8> {
                t.to_device(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<u8>()
                    .unwrap()
                    .into_iter()
                    .map(|b| if b == 0x80 { 0 } else { b })
                    .collect()
            };
            assert_eq!(strip(&qc), strip(&qg), "rows {rows} K {k}: quantized bytes");
            let (sc, sg) = (
                sc.to_vec1::<f32>().unwrap(),
                sg.to_device(&Device::Cpu)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            assert_eq!(sc, sg, "rows {rows} K {k}: scales");
            // One weight.
            let w = weight(1, n, k, 9);
            let (q, s) = weight_tensors(&w, (1, n, k), &Device::Cpu);
            let (q, s) = (q.squeeze(0).unwrap(), s.squeeze(0).unwrap());
            let want = fp8_linear(&x, &q, &s).unwrap();
            let got = fp8_linear(
                &xg,
                &q.to_device(&gpu).unwrap(),
                &s.to_device(&gpu).unwrap(),
            )
            .unwrap();
            let d = rel_diff(&got, &want);
            eprintln!("fp8-linear cuda rows {rows} K {k} → N {n}: rel diff {d:e}");
            assert!(d < 1e-2, "rows {rows} K {k} N {n}: {d}");
            // Grouped (4 experts, one empty, uneven) against one call per expert, and its dx
            // against the CPU's.
            let e = 4;
            let offsets = Arc::new(vec![0, rows / 4, rows / 4, rows / 2 + 1, rows]);
            let w = weight(e, n, k, 11);
            let (q, s) = weight_tensors(&w, (e, n, k), &Device::Cpu);
            let (qg, sgw) = (q.to_device(&gpu).unwrap(), s.to_device(&gpu).unwrap());
            let xv = Var::from_tensor(&xg).unwrap();
            let y = fp8_grouped_linear(xv.as_tensor(), &qg, &sgw, &offsets).unwrap();
            let parts: Vec<Tensor> = (0..e)
                .filter(|&i| offsets[i + 1] > offsets[i])
                .map(|i| {
                    fp8_linear(
                        &xg.narrow(0, offsets[i], offsets[i + 1] - offsets[i])
                            .unwrap(),
                        &qg.get(i).unwrap(),
                        &sgw.get(i).unwrap(),
                    )
                    .unwrap()
                })
                .collect();
            let d = rel_diff(&y, &Tensor::cat(&parts, 0).unwrap());
            eprintln!("fp8-grouped-linear cuda vs per-expert rows {rows} K {k} N {n}: {d:e}");
            assert!(d < 1e-2, "grouped vs per-expert: {d}");
            let want = fp8_grouped_linear(&x, &q, &s, &offsets).unwrap();
            let d = rel_diff(&y, &want);
            assert!(d < 1e-2, "grouped vs CPU: {d}");
            let g = tensor(&[rows, n], 13).to_dtype(DType::BF16).unwrap();
            let grads = (y.to_dtype(DType::F32).unwrap()
                * g.to_device(&gpu).unwrap().to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
            let xc = Var::from_tensor(&x).unwrap();
            let yc = fp8_grouped_linear(xc.as_tensor(), &q, &s, &offsets).unwrap();
            let gc = (yc.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = rel_diff(
                grads.get(xv.as_tensor()).unwrap(),
                gc.get(xc.as_tensor()).unwrap(),
            );
            eprintln!("fp8-grouped-linear cuda dx rows {rows}: {d:e}");
            assert!(d < 1e-2, "dx: {d}");
        }
    }
}
