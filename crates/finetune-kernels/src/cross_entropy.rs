//! `cross_entropy`: the summed cross-entropy of a frozen final projection (lm_head) without the
//! `[T, V]` logits ever existing at once, and its gradient for the hidden states only:
//!   z = h·Wᵀ (h `[T, H]`, W `[V, H]` frozen),
//!   L = Σ_{t: target_t ≥ 0} (logsumexp(z_t) − z_t[target_t]),
//!   dL/dh = ((softmax(z) − onehot(target)) ⊙ keep)·W,   no dL/dW.
//!
//! How ([`linear_cross_entropy`]): rows whose target is ignored (< 0, transformers' −100) are
//! dropped first (they cost nothing); the kept rows go in chunks of about `chunk_elems / V`
//! rows; per chunk, z = h_c·Wᵀ is one GEMM (candle: gemm on CPU, cuBLAS on CUDA), the row op
//! [`CeRows`] turns z into each row's loss and softmax − onehot, and dh_c = (softmax −
//! onehot)·W is a second GEMM, done in the forward (as Liger's fused linear cross-entropy does)
//! so that the backward is a scale of a stored `[T, H]` tensor: no logits are kept or recomputed,
//! and at most one chunk's `[rows, V]` exists at a time. The gradient is only computed when `h`
//! is part of a graph (`Tensor::track_op`). On the CPU in f32 the same steps run without candle
//! ops: the GEMMs write into one reused logits buffer and straight into dh's rows, and the row
//! op works in place (vectorised exp); elsewhere they are candle ops and [`CeRows`] (which the
//! tests also run on the CPU).
//!
//! - [`CeRows`]: the row-wise logsumexp / gradient. CPU (the reference, rayon over rows)
//!   and CUDA (`cuda` feature, kernels/cross_entropy.cu: one block per row), f32 or bf16
//!   logits, f32 results.
//! - [`Precomputed`]: the op that puts the loss into the graph with its stored gradient.

use crate::common::{cpu_f32, exp_sub_sum, float_dtype, gemm_f32, max, simd, LaunchShape};
use crate::moe_permute::{gather_rows, sum_rows, Permutation};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;

/// A target that is ignored (no loss, no gradient), as `CeRows` sees it.
pub const IGNORE: u32 = u32::MAX;

/// Summed cross-entropy of z = h·Wᵀ against `targets` (one per row of `h`; negative = ignored),
/// chunked over rows so that at most about `chunk_elems` logits exist at once (`None`: a
/// default for the device, [`default_chunk_elems`]). `h` `[T, H]` and `w` `[V, H]` are f32 or
/// bf16 (w is cast to h's dtype); the result is an f32 scalar, differentiable in `h` only.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[i64],
    chunk_elems: Option<usize>,
) -> candle_core::Result<Tensor> {
    let (t, hidden) = h.dims2()?;
    let (v, w_hidden) = w.dims2()?;
    if w_hidden != hidden {
        candle_core::bail!(
            "linear-cross-entropy: h is [{t}, {hidden}], weight is [{v}, {w_hidden}]"
        );
    }
    if targets.len() != t {
        candle_core::bail!(
            "linear-cross-entropy: {} targets for {t} rows of h",
            targets.len()
        );
    }
    if let Some(bad) = targets.iter().find(|&&x| x >= v as i64) {
        candle_core::bail!("linear-cross-entropy: target {bad} is outside the vocabulary of {v}");
    }
    float_dtype(h.dtype(), "linear-cross-entropy", "h")?;
    let rows = (chunk_elems.unwrap_or_else(|| default_chunk_elems(h.device())) / v).max(1);
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        return cpu_linear_cross_entropy(h, w, targets, rows);
    }
    with_ops(h, w, targets, rows)
}

/// [`linear_cross_entropy`] on any device with candle ops and [`CeRows`], `rows` rows per chunk.
fn with_ops(h: &Tensor, w: &Tensor, targets: &[i64], rows: usize) -> candle_core::Result<Tensor> {
    let (t, v) = (h.dim(0)?, w.dim(0)?);
    let dev = h.device();
    // Frozen: no graph through W, whatever the caller passes.
    let w = w.to_dtype(h.dtype())?.detach();
    let keep: Vec<u32> = (0..t as u32)
        .filter(|&i| targets[i as usize] >= 0)
        .collect();
    let kept_targets: Vec<u32> = keep.iter().map(|&i| targets[i as usize] as u32).collect();
    // Kept rows gathered and their gradients put back with moe_permute's gather and sum (one
    // thread per element), not index_select/index_add: candle's CUDA index_add loops over
    // every kept row inside each of its H threads.
    let keep_perm = std::sync::Arc::new(Permutation::new(keep.clone(), t, dev)?);
    let hd = h.detach();
    let hk = if keep.len() == t {
        hd
    } else {
        gather_rows(&hd, &keep_perm)?
    };
    let want_grad = h.track_op();
    let wt = w.t()?;
    let mut loss = Tensor::zeros((), DType::F32, dev)?;
    let mut dh_parts = Vec::new();
    for start in (0..keep.len()).step_by(rows) {
        let n = rows.min(keep.len() - start);
        let z = hk.narrow(0, start, n)?.matmul(&wt)?;
        let tg = Tensor::new(&kept_targets[start..start + n], dev)?;
        let packed = z.apply_op2_no_bwd(&tg, &CeRows)?;
        loss = (loss + packed.narrow(0, n * v, n)?.sum_all()?)?;
        if want_grad {
            let dz = packed
                .narrow(0, 0, n * v)?
                .reshape((n, v))?
                .to_dtype(w.dtype())?;
            dh_parts.push(dz.matmul(&w)?);
        }
    }
    if !want_grad {
        return Ok(loss);
    }
    let dh = match dh_parts.len() {
        0 => h.zeros_like()?,
        _ if keep.len() == t => Tensor::cat(&dh_parts, 0)?,
        _ => sum_rows(&Tensor::cat(&dh_parts, 0)?, &keep_perm)?,
    };
    h.apply_op1(Precomputed {
        value: loss,
        grad: dh,
    })
}

/// [`linear_cross_entropy`] on the CPU in f32 with the same chunks, without candle ops: per
/// chunk one GEMM into a logits buffer reused by every chunk, the row op in place
/// ([`ce_row_in_place`]: the buffer becomes softmax − onehot) and one GEMM writing the chunk's
/// rows of dh directly. (The candle version allocated and zero-filled the logits, the row op's
/// output and every dh part, and concatenated the parts: about a third of its time.)
fn cpu_linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[i64],
    rows: usize,
) -> candle_core::Result<Tensor> {
    let (t, hidden) = h.dims2()?;
    let v = w.dim(0)?;
    let want_grad = h.track_op();
    let keep: Vec<usize> = (0..t).filter(|&i| targets[i] >= 0).collect();
    let (hc, wc) = (
        h.detach().contiguous()?,
        w.to_dtype(DType::F32)?.contiguous()?,
    );
    let (loss, dhk) = {
        let (hs, hl) = hc.storage_and_layout();
        let (ws, wl) = wc.storage_and_layout();
        let (Storage::Cpu(hs), Storage::Cpu(ws)) = (&*hs, &*ws) else {
            candle_core::bail!("linear-cross-entropy: h and the weight must both be on the CPU");
        };
        let hv = cpu_f32(hs, hl, "linear-cross-entropy", "h")?;
        let wv = cpu_f32(ws, wl, "linear-cross-entropy", "weight")?;
        // The kept rows of h, contiguous (h itself when every row is kept).
        let hk: std::borrow::Cow<[f32]> = if keep.len() == t {
            std::borrow::Cow::Borrowed(&hv[..])
        } else {
            std::borrow::Cow::Owned(
                keep.iter()
                    .flat_map(|&i| hv[i * hidden..(i + 1) * hidden].iter().copied())
                    .collect(),
            )
        };
        let threads = rayon::current_num_threads();
        let mut dhk = vec![0f32; if want_grad { keep.len() * hidden } else { 0 }];
        let mut z: Vec<f32> = Vec::new();
        let mut loss = 0f64;
        for start in (0..keep.len()).step_by(rows) {
            let n = rows.min(keep.len() - start);
            z.resize(n * v, 0.0);
            // z = h_c·Wᵀ
            gemm_f32(
                (n, v, hidden),
                (&mut z, v, false),
                (&hk[start * hidden..], hidden, 1),
                (&wv, 1, hidden),
                1.0,
                threads,
            );
            let chunk_loss: f64 = z
                .par_chunks_mut(v)
                .zip(keep[start..start + n].par_iter())
                .map(|(z, &i)| ce_row_in_place(z, targets[i] as usize) as f64)
                .sum();
            loss += chunk_loss;
            if want_grad {
                // dh_c = (softmax − onehot)·W
                gemm_f32(
                    (n, hidden, v),
                    (&mut dhk[start * hidden..], hidden, false),
                    (&z, v, 1),
                    (&wv, hidden, 1),
                    1.0,
                    threads,
                );
            }
        }
        (loss, dhk)
    };
    let dev = h.device();
    let loss = Tensor::new(loss as f32, dev)?;
    if !want_grad {
        return Ok(loss);
    }
    let dh = if keep.len() == t {
        dhk
    } else {
        let mut dh = vec![0f32; t * hidden];
        for (k, &i) in keep.iter().enumerate() {
            dh[i * hidden..(i + 1) * hidden].copy_from_slice(&dhk[k * hidden..(k + 1) * hidden]);
        }
        dh
    };
    h.apply_op1(Precomputed {
        value: loss,
        grad: Tensor::from_vec(dh, (t, hidden), dev)?,
    })
}

/// Logits per chunk: 4 Mi on CPU (16 MiB in f32: the chunk stays in cache-friendly sizes and
/// the GEMMs stay large), 64 Mi on CUDA (256 MiB in f32, a fraction of an 80 GB GPU).
pub fn default_chunk_elems(device: &Device) -> usize {
    if device.is_cpu() {
        1 << 22
    } else {
        1 << 26
    }
}

/// The row op: (logits z `[N, V]` f32/bf16, targets `[N]` u32, [`IGNORE`] = ignored) → f32
/// `[N·V + N]`: softmax(z_r) − onehot(t_r) for each row (zeros if ignored), then each row's
/// logsumexp(z_r) − z_r[t_r] (0 if ignored).
pub struct CeRows;

fn ce_dims(zl: &Layout, tl: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, v) = zl.shape().dims2()?;
    if tl.dims() != [n] {
        candle_core::bail!("ce-rows: logits are [{n}, {v}], targets {:?}", tl.dims());
    }
    Ok((n, v))
}

impl CustomOp2 for CeRows {
    fn name(&self) -> &'static str {
        "ce-rows"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = ce_dims(zl, tl)?;
        let z = cpu_f32(zs, zl, self.name(), "logits")?;
        let (a, b) = tl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("ce-rows: targets not contiguous".into()))?;
        let targets = &ts.as_slice::<u32>()?[a..b];
        let mut out = vec![0f32; n * v + n];
        let (grad, losses) = out.split_at_mut(n * v);
        grad.par_chunks_mut(v)
            .zip(losses.par_iter_mut())
            .zip(z.par_chunks(v).zip(targets.par_iter()))
            .for_each(|((g, loss), (z, &t))| {
                if t == IGNORE {
                    return; // already zeros
                }
                *loss = ce_row(z, g, t as usize);
            });
        Ok((CpuStorage::F32(out), Shape::from(n * v + n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::common::cuda::{suffix, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (n, v) = ce_dims(zl, tl)?;
        float_dtype(zs.dtype(), self.name(), "logits")?;
        let dev = zs.device.clone();
        let targets = view::<u32>(ts, tl, self.name(), "targets")?;
        // SAFETY: the kernel writes every element (zeros for ignored rows).
        let out = unsafe { dev.alloc::<f32>(n * v + n) }?;
        let f = dev.get_or_load_custom_func(
            &format!("ce_rows_{}", suffix(zs.dtype())),
            "cross_entropy",
            crate::ptx::CROSS_ENTROPY,
        )?;
        let (n_i, v_i) = (n as i32, v as i32);
        let cfg = LaunchConfig::from(launch_shape(n));
        match zs.dtype() {
            DType::BF16 => {
                let z = view::<half::bf16>(zs, zl, self.name(), "logits")?;
                let mut b = f.builder();
                b.arg(&z).arg(&targets).arg(&out).arg(&n_i).arg(&v_i);
                unsafe { b.launch(cfg) }.w()?;
            }
            _ => {
                let z = view::<f32>(zs, zl, self.name(), "logits")?;
                let mut b = f.builder();
                b.arg(&z).arg(&targets).arg(&out).arg(&n_i).arg(&v_i);
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(n * v + n),
        ))
    }
}

/// `ce_rows_*`'s launch for `n` rows: one block of 512 threads per row (at least one block:
/// a launch of an empty grid is an error, and the kernel's blocks past `n` return).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(n: usize) -> LaunchShape {
    LaunchShape {
        grid: (n.max(1) as u32, 1, 1),
        block: (512, 1, 1),
        shared_mem_bytes: 0,
    }
}

simd!(fn ce_row(z: &[f32], g: &mut [f32], t: usize) -> f32 = ce_row_body);
simd!(fn ce_row_in_place(z: &mut [f32], t: usize) -> f32 = ce_row_in_place_body);

/// One row: g = softmax(z) − onehot(t) and the loss logsumexp(z) − z[t], with m = max z:
/// e = exp(z − m) (one vectorised exp pass), s = Σ e, g = e / s, loss = ln s − (z[t] − m).
#[inline(always)]
fn ce_row_body(z: &[f32], g: &mut [f32], t: usize) -> f32 {
    let m = max(z);
    g.copy_from_slice(z);
    let s = exp_sub_sum(g, m);
    let inv = 1.0 / s;
    g.iter_mut().for_each(|x| *x *= inv);
    g[t] -= 1.0;
    s.ln() - (z[t] - m)
}

/// [`ce_row_body`] with the logits row turned into the gradient row in place.
#[inline(always)]
fn ce_row_in_place_body(z: &mut [f32], t: usize) -> f32 {
    let m = max(z);
    let picked = z[t] - m;
    let s = exp_sub_sum(z, m);
    let inv = 1.0 / s;
    z.iter_mut().for_each(|x| *x *= inv);
    z[t] -= 1.0;
    s.ln() - picked
}

/// Puts a value computed outside the graph into it as a function of its input x, with a
/// gradient computed alongside: forward returns `value`, backward `grad`·dy (dy the scalar
/// upstream gradient).
pub struct Precomputed {
    pub value: Tensor,
    pub grad: Tensor,
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        "precomputed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = self.value.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(v), self.value.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let value = self.value.contiguous()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, value.shape().clone())),
            _ => candle_core::bail!("precomputed: the value is not on the CUDA device"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            self.grad.broadcast_mul(&dy.to_dtype(self.grad.dtype())?)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{Var, D};

    /// The doc comment's loss in plain candle ops on the full logits (as finetune-model's
    /// `loss_sum_tensor` writes it).
    fn plain(h: &Tensor, w: &Tensor, targets: &[i64]) -> Tensor {
        let z = h.matmul(&w.t().unwrap()).unwrap();
        let t = z.dim(0).unwrap();
        let tg: Vec<u32> = targets.iter().map(|&x| x.max(0) as u32).collect();
        let keep: Vec<f32> = targets
            .iter()
            .map(|&x| f32::from(u8::from(x >= 0)))
            .collect();
        let tg = Tensor::from_vec(tg, (t, 1), &Device::Cpu).unwrap();
        let keep = Tensor::from_vec(keep, (t, 1), &Device::Cpu).unwrap();
        let max = z.max_keepdim(D::Minus1).unwrap().detach();
        let zm = z.broadcast_sub(&max).unwrap();
        let lse = zm
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let picked = zm.gather(&tg, 1).unwrap();
        ((lse - picked).unwrap() * keep).unwrap().sum_all().unwrap()
    }

    /// 37 rows (some ignored, including the last, as the shifted labels of a sequence end),
    /// hidden 24, vocabulary 101.
    fn sample() -> (Tensor, Tensor, Vec<i64>) {
        let targets = (0..37)
            .map(|i| {
                if i % 5 == 2 || i == 36 {
                    -100
                } else {
                    (i * 13 % 101) as i64
                }
            })
            .collect();
        (tensor(&[37, 24], 31), tensor(&[101, 24], 32), targets)
    }

    #[test]
    fn loss_equals_the_plain_formula_for_any_chunking() {
        let (h, w, t) = sample();
        let want = plain(&h, &w, &t).to_scalar::<f32>().unwrap();
        // 1 row per chunk, 3 rows (a remainder), and everything at once.
        for elems in [1, 303, 1 << 20] {
            let rows = (elems / 101).max(1);
            for (path, got) in [
                ("cpu", linear_cross_entropy(&h, &w, &t, Some(elems))),
                ("ops", with_ops(&h, &w, &t, rows)),
            ] {
                let got = got.unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs(),
                    "{path} {elems}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn hidden_gradient_equals_autograd_of_the_plain_formula() {
        let (h, w, t) = sample();
        let hv = Var::from_tensor(&h).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let theirs = (plain(hv.as_tensor(), &w, &t) * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        let want = theirs.get(hv.as_tensor()).unwrap();
        for elems in [1, 303, 1 << 20] {
            let rows = (elems / 101).max(1);
            let (hx, wx) = (hv.as_tensor(), wv.as_tensor());
            for (path, loss) in [
                ("cpu", linear_cross_entropy(hx, wx, &t, Some(elems))),
                ("ops", with_ops(hx, wx, &t, rows)),
            ] {
                // An upstream scale (the trainer divides by the step's target tokens).
                let ours = (loss.unwrap() * 0.5).unwrap().backward().unwrap();
                let d = rel_diff(ours.get(hx).unwrap(), want);
                assert!(d < 1e-5, "{path} {elems}: {d}");
                assert!(ours.get(wx).is_none(), "{path}: the weight is frozen");
            }
        }
    }

    #[test]
    fn all_ignored_gives_zero_loss_and_zero_gradient() {
        let (h, w, _) = sample();
        let hv = Var::from_tensor(&h).unwrap();
        let loss = linear_cross_entropy(hv.as_tensor(), &w, &[-100; 37], None).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
        let g = loss.backward().unwrap();
        let g = g
            .get(hv.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(g.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn bad_targets_and_shapes_are_refused() {
        let (h, w, mut t) = sample();
        t[3] = 101;
        let err = linear_cross_entropy(&h, &w, &t, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("101") && err.contains("vocabulary"), "{err}");
        let err = linear_cross_entropy(&h, &w, &t[..5], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("5 targets") && err.contains("37 rows"),
            "{err}"
        );
        let err = linear_cross_entropy(&h, &tensor(&[101, 23], 1), &t, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[37, 24]") && err.contains("[101, 23]"),
            "{err}"
        );
    }

    /// Without a graph (evaluation), no gradient is computed and the loss is the same.
    #[test]
    fn detached_input_gives_the_loss_alone() {
        let (h, w, t) = sample();
        let a = linear_cross_entropy(&h, &w, &t, None).unwrap();
        assert!(!a.track_op());
        let want = plain(&h, &w, &t).to_scalar::<f32>().unwrap();
        assert!((a.to_scalar::<f32>().unwrap() - want).abs() <= 1e-5 * want.abs());
    }

    /// kernels/cross_entropy.cu (`ce_rows_f32`, `ce_rows_bf16`) run on the CPU by
    /// finetune-kernel-emu with the CUDA launch's geometry and arguments, in both fiber orders,
    /// against [`CeRows`]' CPU forward. Vocabularies of 1 (softmax 1: gradient and loss 0), 37
    /// (most of the 512 threads idle, part of one warp), 512 (one element per thread) and 1,000
    /// (a partial second stride); targets 0, V − 1 (the vocabulary's edges), [`IGNORE`] (a
    /// zero row and loss) and interior ones; logits in [−16, 16) so that exp spans e^±32, and
    /// one of 120 per shape (e^120 overflows f32 unless the row's max is subtracted); no rows
    /// (one block that returns).
    ///
    /// Tolerance 1e-5 relative to max(1, |value|) (gradients are probabilities in [−1, 1], so
    /// for them it is absolute): the kernel sums exp(z − m) in its own order (strided
    /// per-thread partial sums, then warp and block trees) with libm's expf, and forms each
    /// probability as exp(z − m − lse); the reference sums 16 vectorised partial sums of a
    /// polynomial exp (≈ 2e-7 relative) and divides by the sum. Each step is a few f32
    /// roundings (the sum of ≤ 1,000 positive terms: ≈ 1e-6 relative in practice); the
    /// largest error, exp of an argument up to ≈ 40 in magnitude rounded once, is ≈ 40·6e-8 =
    /// 2.4e-6 relative (measured here: at most 1.1e-7). Ignored rows must be exactly zero on
    /// both sides.
    #[test]
    fn emulated_kernels_equal_the_cpu_reference() {
        use crate::common::test::{bf16_bits, data};
        use finetune_kernel_emu::{launch, max_relative_difference, Buffer, Order};
        extern "C" {
            fn ce_rows_f32(z: *const f32, targets: *const u32, out: *mut f32, n: i32, v: i32);
            fn ce_rows_bf16(z: *const u16, targets: *const u32, out: *mut f32, n: i32, v: i32);
        }
        for (n, v) in [(3usize, 1usize), (9, 37), (4, 512), (6, 1000), (0, 37)] {
            let mut logits: Vec<f32> = data(n * v, (n * v) as u64)
                .iter()
                .map(|x| x * 8.0)
                .collect();
            // One row whose last logit (in the second stride of the threads when V = 1,000)
            // dominates: without the max shift, or with a max that missed it, e^120 overflows.
            if n >= 2 {
                logits[(n - 2) * v + v - 1] = 120.0;
            }
            let targets: Vec<u32> = (0..n)
                .map(|r| match r % 4 {
                    0 => 0,
                    1 => v as u32 - 1,
                    2 => IGNORE,
                    _ => (r * 7 % v) as u32,
                })
                .collect();
            let tg = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let z = Tensor::from_vec(logits.clone(), (n, v), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let want = z
                    .apply_op2_no_bwd(&tg, &CeRows)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for order in Order::BOTH {
                    let t = Buffer::from_slice(&targets);
                    let out = Buffer::filled(n * v + n, f32::NAN);
                    let (n_i, v_i) = (n as i32, v as i32);
                    let shape = launch_shape(n).into();
                    if dtype == DType::BF16 {
                        let z = Buffer::from_slice(&bf16_bits(&logits));
                        launch(shape, order, || unsafe {
                            ce_rows_bf16(z.ptr(), t.ptr(), out.mut_ptr(), n_i, v_i)
                        })
                    } else {
                        let z = Buffer::from_slice(&logits);
                        launch(shape, order, || unsafe {
                            ce_rows_f32(z.ptr(), t.ptr(), out.mut_ptr(), n_i, v_i)
                        })
                    }
                    .unwrap();
                    let got = out.to_vec();
                    let what = format!("{n}×{v} {dtype:?} {order:?}");
                    let (err, at) = max_relative_difference(&got, &want);
                    assert!(
                        err <= 1e-5,
                        "{what}: {err:e} at {at} ({} vs {})",
                        got[at],
                        want[at]
                    );
                    for (r, _) in targets.iter().enumerate().filter(|(_, &t)| t == IGNORE) {
                        let zeros = got[r * v..(r + 1) * v].iter().all(|&g| g == 0.0);
                        assert!(zeros && got[n * v + r] == 0.0, "{what}: ignored row {r}");
                    }
                }
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_loss_and_gradient_equal_the_cpu_reference() {
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let (h, w, t) = sample();
        let hv = Var::from_tensor(&h).unwrap();
        let want_loss = linear_cross_entropy(hv.as_tensor(), &w, &t, None).unwrap();
        let want_dh = want_loss
            .backward()
            .unwrap()
            .get(hv.as_tensor())
            .unwrap()
            .clone();
        let want_loss = want_loss.to_scalar::<f32>().unwrap();
        // Also the raw row op on every row, ignored ones included.
        let z = h.matmul(&w.t().unwrap()).unwrap();
        let tg: Vec<u32> = t
            .iter()
            .map(|&x| if x < 0 { IGNORE } else { x as u32 })
            .collect();
        let tg = Tensor::new(tg.as_slice(), &Device::Cpu).unwrap();
        let want_rows = z.apply_op2_no_bwd(&tg, &CeRows).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let on = |x: &Tensor| x.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let rows = on(&z)
                .apply_op2_no_bwd(&tg.to_device(&gpu).unwrap(), &CeRows)
                .unwrap();
            let er = rel_diff(&rows, &want_rows);
            for elems in [303, 1 << 20] {
                let hg = Var::from_tensor(&on(&h)).unwrap();
                let loss = linear_cross_entropy(hg.as_tensor(), &on(&w), &t, Some(elems)).unwrap();
                let dh = loss
                    .backward()
                    .unwrap()
                    .get(hg.as_tensor())
                    .unwrap()
                    .clone();
                let loss = loss
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let el = (loss - want_loss).abs() / want_loss.abs();
                let ed = rel_diff(&dh, &want_dh);
                eprintln!(
                    "cross_entropy cuda {dtype:?} chunk {elems}: rows {er:e}, loss {el:e}, dh {ed:e}"
                );
                assert!(
                    er < tol && el < tol && ed < tol,
                    "{dtype:?}: {er} {el} {ed}"
                );
            }
        }
    }
}
