//! `rms_norm`: y = x / sqrt(mean(x²) + eps) · w over the last dimension D of x, with a frozen
//! weight w `[D]`: the backward gives dx only,
//!   r = 1 / sqrt(Σⱼ xⱼ² / D + eps),   dxᵢ = r·dyᵢ·wᵢ − xᵢ·r³·(Σⱼ dyⱼ·wⱼ·xⱼ) / D.
//!
//! The plain candle version (six ops, each with its own backward and gradient accumulation)
//! is what `finetune-model` used before; this one is one pass over each row forward and one
//! backward, both computed in f32 for f32 and bf16 storage.
//!
//! - CPU (the reference, and the fast path: rayon over rows): [`RmsNorm::cpu_fwd`],
//!   [`RmsNormBwd::cpu_fwd`].
//! - CUDA (`cuda` feature, kernels/rms_norm.cu): one warp per row.
//! - Backward: [`RmsNormBwd`], its own op (x, w, dy) → dx, so it runs on both devices.

use crate::common::{cpu_f32, cpu_out, rows_per_task, same_dtype, LaunchShape};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// y = x / sqrt(mean(x²) + eps) · w over the last dimension; `w` (`[D]`) is frozen and cast to
/// x's dtype (f32 or bf16).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2(&w, RmsNorm { eps })
}

/// The forward op (x, w) → y.
pub struct RmsNorm {
    pub eps: f64,
}

/// The backward op (x, w, dy) → dx.
pub struct RmsNormBwd {
    pub eps: f64,
}

/// D and the number of rows of x, after checking w is `[D]`.
fn dims(x: &Layout, w: &Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    let d = *x.dims().last().unwrap_or(&0);
    if d == 0 || w.dims() != [d] {
        candle_core::bail!(
            "{op}: x is {:?}, weight is {:?} (expected [{d}])",
            x.dims(),
            w.dims()
        );
    }
    Ok((d, x.shape().elem_count() / d))
}

/// 1 / sqrt(mean(x²) + eps) of one row.
fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps as f32).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d, _) = dims(xl, wl, self.name())?;
        same_dtype(self.name(), &[("x", xs.dtype()), ("w", ws.dtype())])?;
        let x = cpu_f32(xs, xl, self.name(), "x")?;
        let w = cpu_f32(ws, wl, self.name(), "w")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * rows_per_task(d))
            .zip(x.par_chunks(d * rows_per_task(d)))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    for ((y, x), w) in y.iter_mut().zip(x).zip(w.iter()) {
                        *y = x * r * w;
                    }
                }
            });
        Ok((cpu_out(y, xs.dtype()), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (d, rows) = dims(xl, wl, self.name())?;
        same_dtype(self.name(), &[("x", xs.dtype()), ("w", ws.dtype())])?;
        crate::common::float_dtype(xs.dtype(), self.name(), "x")?;
        let y = match xs.dtype() {
            candle_core::DType::BF16 => {
                cuda::launch::<half::bf16>("rms_norm_fwd", &[(xs, xl), (ws, wl)], rows, d, self.eps)
            }
            _ => cuda::launch::<f32>("rms_norm_fwd", &[(xs, xl), (ws, wl)], rows, d, self.eps),
        }?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d, _) = dims(xl, wl, self.name())?;
        if gl.dims() != xl.dims() {
            candle_core::bail!(
                "{}: dy is {:?}, x is {:?}",
                self.name(),
                gl.dims(),
                xl.dims()
            );
        }
        same_dtype(
            self.name(),
            &[("x", xs.dtype()), ("w", ws.dtype()), ("dy", gs.dtype())],
        )?;
        let x = cpu_f32(xs, xl, self.name(), "x")?;
        let w = cpu_f32(ws, wl, self.name(), "w")?;
        let g = cpu_f32(gs, gl, self.name(), "dy")?;
        let chunk = d * rows_per_task(d);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(dx, (x, g))| {
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    let dot: f32 = x
                        .iter()
                        .zip(g)
                        .zip(w.iter())
                        .map(|((x, g), w)| g * w * x)
                        .sum();
                    let c = r * r * r * dot / d as f32;
                    for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w.iter()) {
                        *dx = r * g * w - x * c;
                    }
                }
            });
        Ok((cpu_out(dx, xs.dtype()), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (d, rows) = dims(xl, wl, self.name())?;
        if gl.dims() != xl.dims() {
            candle_core::bail!(
                "{}: dy is {:?}, x is {:?}",
                self.name(),
                gl.dims(),
                xl.dims()
            );
        }
        same_dtype(
            self.name(),
            &[("x", xs.dtype()), ("w", ws.dtype()), ("dy", gs.dtype())],
        )?;
        crate::common::float_dtype(xs.dtype(), self.name(), "x")?;
        let args = [(xs, xl), (ws, wl), (gs, gl)];
        let dx = match xs.dtype() {
            candle_core::DType::BF16 => {
                cuda::launch::<half::bf16>("rms_norm_bwd", &args, rows, d, self.eps)
            }
            _ => cuda::launch::<f32>("rms_norm_bwd", &args, rows, d, self.eps),
        }?;
        Ok((dx, xl.shape().clone()))
    }
}

/// `rms_norm_{fwd,bwd}_*`'s launch for `rows` rows: one warp per row, 8 rows per block of
/// 256 threads (at least one block; the warps past `rows` return).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(rows: usize) -> LaunchShape {
    LaunchShape {
        grid: (rows.div_ceil(8).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::common::cuda::{suffix, view};
    use candle_core::cuda_backend::cudarc::driver::{
        DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, WithDType};

    /// Launches `<name>_<dtype>` with the views of `inputs`, a fresh output of x's size, rows,
    /// D and eps: one warp per row, 8 rows per block.
    pub(super) fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        rows: usize,
        d: usize,
        eps: f64,
    ) -> candle_core::Result<CudaStorage> {
        let dev = inputs[0].0.device.clone();
        let views = inputs
            .iter()
            .map(|(s, l)| view::<T>(s, l, name, "input"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(rows * d) }?;
        let f = dev.get_or_load_custom_func(
            &format!("{name}_{}", suffix(T::DTYPE)),
            "rms_norm",
            crate::ptx::RMS_NORM,
        )?;
        let (rows_i, d_i, eps_f) = (rows as i32, d as i32, eps as f32);
        let mut b = f.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&out).arg(&rows_i).arg(&d_i).arg(&eps_f);
        let cfg = LaunchConfig::from(super::launch_shape(rows));
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{DType, Var, D};

    const EPS: f64 = 1e-6;

    /// The doc comment's formula in plain candle ops (as finetune-model wrote it).
    fn plain(x: &Tensor, w: &Tensor) -> Tensor {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(var + EPS).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    /// D = 48 (not a multiple of the 32-lane warp), 15 rows over two leading dimensions.
    fn sample() -> (Tensor, Tensor, Tensor) {
        (
            tensor(&[3, 5, 48], 1),
            tensor(&[48], 2),
            tensor(&[3, 5, 48], 3),
        )
    }

    #[test]
    fn forward_equals_the_plain_formula() {
        let (x, w, _) = sample();
        let d = rel_diff(&rms_norm(&x, &w, EPS).unwrap(), &plain(&x, &w));
        assert!(d < 1e-6, "{d}");
    }

    /// L = Σ y ⊙ G: dL/dx from the op vs candle autograd of the plain formula; w gets none.
    #[test]
    fn input_gradient_equals_autograd_of_the_plain_formula() {
        let (x, w, g) = sample();
        let x = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let ours = (rms_norm(x.as_tensor(), wv.as_tensor(), EPS).unwrap() * &g).unwrap();
        let ours = ours.sum_all().unwrap().backward().unwrap();
        let theirs = (plain(x.as_tensor(), &w) * &g).unwrap();
        let theirs = theirs.sum_all().unwrap().backward().unwrap();
        let d = rel_diff(
            ours.get(x.as_tensor()).unwrap(),
            theirs.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
        assert!(ours.get(wv.as_tensor()).is_none(), "the weight is frozen");
    }

    #[test]
    fn bf16_input_is_computed_in_f32_and_rounded_once() {
        let (x, w, _) = sample();
        let xb = x.to_dtype(DType::BF16).unwrap();
        let want = plain(&xb.to_dtype(DType::F32).unwrap(), &w);
        let got = rms_norm(&xb, &w, EPS).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let d = rel_diff(&got, &want);
        assert!(d < 4e-3, "{d}");
    }

    #[test]
    fn weight_of_the_wrong_length_is_refused_naming_both_shapes() {
        let (x, _, _) = sample();
        let err = rms_norm(&x, &tensor(&[47], 2), EPS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 5, 48]") && err.contains("[47]"), "{err}");
    }

    /// kernels/rms_norm.cu (`rms_norm_{fwd,bwd}_{f32,bf16}`) run on the CPU by
    /// finetune-kernel-emu with the CUDA launch's geometry and arguments, in both fiber orders,
    /// against [`RmsNorm`]'s and [`RmsNormBwd`]'s CPU forward. Rows 13, 17 and 31 (a last block
    /// of 5, 1 and 7 of its 8 row warps: the rest return; 31 rows need all 4 blocks' 8 rows,
    /// which a block stride of 7 would miss), 8 (exactly one block), 1 and 3; D 1 and
    /// 5 (most lanes idle), 48 and 100 (a partial last stride of the lanes), 32 and 257.
    ///
    /// Tolerances: the kernel and the reference do the same f32 operations per element
    /// (x·r·w; r·dy·w − x·c with c = r³·dot / D), but sum x² and dy·w·x in another order
    /// (32 lane-strided partial sums and a shuffle tree, vs a sequential sum): a few f32
    /// roundings of a sum of ≤ 257 terms, ≈ 1e-6 relative (measured here: at most 3.3e-7), so
    /// 1e-5 relative to max(1, |value|) in f32 (absolute near zero, where dx's two terms
    /// cancel). A bf16 output must be the rounding (to nearest even) of a value within that
    /// 1e-5 of the f32 reference on the same bf16 inputs: the kernel rounds its f32 result
    /// once, as the op's bf16 CPU forward rounds this reference.
    #[test]
    fn emulated_kernels_equal_the_cpu_reference() {
        use crate::common::test::{bf16_bits, bf16_outside, data};
        use finetune_kernel_emu::{launch, max_relative_difference, Buffer, Order};
        type Bf = u16;
        extern "C" {
            fn rms_norm_fwd_f32(
                x: *const f32,
                w: *const f32,
                y: *mut f32,
                rows: i32,
                d: i32,
                eps: f32,
            );
            fn rms_norm_fwd_bf16(
                x: *const Bf,
                w: *const Bf,
                y: *mut Bf,
                rows: i32,
                d: i32,
                eps: f32,
            );
            fn rms_norm_bwd_f32(
                x: *const f32,
                w: *const f32,
                dy: *const f32,
                dx: *mut f32,
                rows: i32,
                d: i32,
                eps: f32,
            );
            fn rms_norm_bwd_bf16(
                x: *const Bf,
                w: *const Bf,
                dy: *const Bf,
                dx: *mut Bf,
                rows: i32,
                d: i32,
                eps: f32,
            );
        }
        const TOL: f32 = 1e-5;
        for (rows, d) in [
            (13usize, 48usize),
            (17, 5),
            (8, 32),
            (1, 257),
            (3, 1),
            (31, 100),
        ] {
            let salt = (rows * 1000 + d) as u64;
            let (x, w, g) = (
                data(rows * d, salt),
                data(d, salt + 1),
                data(rows * d, salt + 2),
            );
            let (rows_i, d_i, eps) = (rows as i32, d as i32, EPS as f32);
            let shape = launch_shape(rows).into();
            for dtype in [DType::F32, DType::BF16] {
                // The reference in f32 on the values the kernel reads (rounded to bf16 for the
                // bf16 kernels): the op's bf16 CPU forward is this rounded once.
                let t = |v: &[f32], dims: &[usize]| {
                    Tensor::from_vec(v.to_vec(), dims, &candle_core::Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                };
                let (xt, wt, gt) = (t(&x, &[rows, d]), t(&w, &[d]), t(&g, &[rows, d]));
                let want_y = xt.apply_op2_no_bwd(&wt, &RmsNorm { eps: EPS }).unwrap();
                let want_dx = xt
                    .apply_op3_no_bwd(&wt, &gt, &RmsNormBwd { eps: EPS })
                    .unwrap();
                for order in Order::BOTH {
                    let what = format!("{rows}×{d} {dtype:?} {order:?}");
                    if dtype == DType::F32 {
                        let (xb, wb, gb) = (
                            Buffer::from_slice(&x),
                            Buffer::from_slice(&w),
                            Buffer::from_slice(&g),
                        );
                        let y = Buffer::filled(rows * d, f32::NAN);
                        let dx = Buffer::filled(rows * d, f32::NAN);
                        launch(shape, order, || unsafe {
                            rms_norm_fwd_f32(xb.ptr(), wb.ptr(), y.mut_ptr(), rows_i, d_i, eps)
                        })
                        .unwrap();
                        launch(shape, order, || unsafe {
                            rms_norm_bwd_f32(
                                xb.ptr(),
                                wb.ptr(),
                                gb.ptr(),
                                dx.mut_ptr(),
                                rows_i,
                                d_i,
                                eps,
                            )
                        })
                        .unwrap();
                        for (name, got, want) in
                            [("y", y.to_vec(), &want_y), ("dx", dx.to_vec(), &want_dx)]
                        {
                            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                            let (err, at) = max_relative_difference(&got, &want);
                            assert!(
                                err <= TOL,
                                "{what} {name}: {err:e} at {at} ({} vs {})",
                                got[at],
                                want[at]
                            );
                        }
                    } else {
                        let (xb, wb, gb) = (
                            Buffer::from_slice(&bf16_bits(&x)),
                            Buffer::from_slice(&bf16_bits(&w)),
                            Buffer::from_slice(&bf16_bits(&g)),
                        );
                        // 0xFFFF: a NaN, for what the kernel leaves unwritten.
                        let y = Buffer::filled(rows * d, 0xFFFFu16);
                        let dx = Buffer::filled(rows * d, 0xFFFFu16);
                        launch(shape, order, || unsafe {
                            rms_norm_fwd_bf16(xb.ptr(), wb.ptr(), y.mut_ptr(), rows_i, d_i, eps)
                        })
                        .unwrap();
                        launch(shape, order, || unsafe {
                            rms_norm_bwd_bf16(
                                xb.ptr(),
                                wb.ptr(),
                                gb.ptr(),
                                dx.mut_ptr(),
                                rows_i,
                                d_i,
                                eps,
                            )
                        })
                        .unwrap();
                        for (name, got, want) in
                            [("y", y.to_vec(), &want_y), ("dx", dx.to_vec(), &want_dx)]
                        {
                            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                            let bad = bf16_outside(&got, &want, TOL);
                            assert!(bad.is_none(), "{what} {name}: {bad:?}");
                        }
                    }
                }
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_forward_and_backward_equal_the_cpu_reference() {
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let (x, w, g) = sample();
        let want_y = rms_norm(&x, &w, EPS).unwrap();
        let want_dx = x
            .apply_op3_no_bwd(&w, &g, &RmsNormBwd { eps: EPS })
            .unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let y = rms_norm(&on(&x), &on(&w), EPS).unwrap();
            let dx = on(&x)
                .apply_op3_no_bwd(&on(&w), &on(&g), &RmsNormBwd { eps: EPS })
                .unwrap();
            let (dy, ddx) = (rel_diff(&y, &want_y), rel_diff(&dx, &want_dx));
            eprintln!("rms_norm cuda {dtype:?}: forward {dy:e}, backward {ddx:e}");
            assert!(
                dy < tol && ddx < tol,
                "{dtype:?}: forward {dy}, backward {ddx}"
            );
            // Through autograd on the GPU too.
            let xv = Var::from_tensor(&on(&x)).unwrap();
            let grads = (rms_norm(xv.as_tensor(), &on(&w), EPS).unwrap() * on(&g))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = rel_diff(grads.get(xv.as_tensor()).unwrap(), &want_dx);
            assert!(d < tol, "{dtype:?} autograd: {d}");
        }
    }
}
