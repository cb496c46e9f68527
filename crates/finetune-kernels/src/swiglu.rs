//! `swiglu`: y = silu(g) ⊙ u, silu(g) = g·σ(g) = g / (1 + e^(−g)), the gated activation of a
//! SwiGLU MLP (g = gate_proj(x), u = up_proj(x)), with both input gradients from one pass:
//!   dg = dy·u·σ(g)·(1 + g·(1 − σ(g))),   du = dy·silu(g).
//!
//! The plain candle version is four ops (neg, exp, add, div) plus the product, each with its own
//! backward; this is one pass forward and one backward that returns dg and du together (one
//! `[2, …]` tensor, so candle adds no zero-filled gradient per edge), computed in f32 for f32 and
//! bf16 storage.
//!
//! - CPU (the reference, rayon over chunks): [`Swiglu::cpu_fwd`], [`SwigluBwd::cpu_fwd`]; bf16
//!   widened to f32 and each output rounded once, as on CUDA.
//! - CUDA (`cuda` feature, kernels/swiglu.cu): element-wise, grid-stride.
//! - Backward: [`SwigluBwd`], (g, u, dy) → `[2, …shape]` = (dg, du), on both devices.

use crate::common::{cpu_f32, cpu_out, same_dtype, stride_grid, LaunchShape, PAR_GRAIN};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// y = silu(g) ⊙ u (same shape and dtype, f32 or bf16), differentiable in both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, Swiglu)
}

/// (dg, du) for y = silu(g) ⊙ u and upstream dy, without autograd (for ops that write their own
/// backward, [`crate::moe_experts`]).
pub(crate) fn swiglu_backward(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let both = g
        .contiguous()?
        .apply_op3_no_bwd(&u.contiguous()?, &dy.contiguous()?, &SwigluBwd)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The forward op (g, u) → y.
pub struct Swiglu;

/// The backward op (g, u, dy) → `[2, …shape]`: dg at index 0, du at index 1.
pub struct SwigluBwd;

fn check_shapes(op: &str, a: &Layout, b: &Layout, names: (&str, &str)) -> candle_core::Result<()> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "{op}: {} is {:?}, {} is {:?} (they must match)",
            names.0,
            a.dims(),
            names.1,
            b.dims()
        );
    }
    Ok(())
}

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        check_shapes(self.name(), gl, ul, ("g", "u"))?;
        same_dtype(self.name(), &[("g", gs.dtype()), ("u", us.dtype())])?;
        let g = cpu_f32(gs, gl, self.name(), "g")?;
        let u = cpu_f32(us, ul, self.name(), "u")?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(PAR_GRAIN)
            .zip(g.par_chunks(PAR_GRAIN).zip(u.par_chunks(PAR_GRAIN)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((cpu_out(y, gs.dtype()), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        check_shapes(self.name(), gl, ul, ("g", "u"))?;
        same_dtype(self.name(), &[("g", gs.dtype()), ("u", us.dtype())])?;
        crate::common::float_dtype(gs.dtype(), self.name(), "g")?;
        let n = gl.shape().elem_count();
        let args = [(gs, gl), (us, ul)];
        let y = match gs.dtype() {
            candle_core::DType::BF16 => cuda::launch::<half::bf16>("swiglu_fwd", &args, n, n),
            _ => cuda::launch::<f32>("swiglu_fwd", &args, n, n),
        }?;
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwigluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        check_shapes(self.name(), gl, ul, ("g", "u"))?;
        check_shapes(self.name(), gl, dl, ("g", "dy"))?;
        same_dtype(
            self.name(),
            &[("g", gs.dtype()), ("u", us.dtype()), ("dy", ds.dtype())],
        )?;
        let g = cpu_f32(gs, gl, self.name(), "g")?;
        let u = cpu_f32(us, ul, self.name(), "u")?;
        let dy = cpu_f32(ds, dl, self.name(), "dy")?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(PAR_GRAIN)
            .zip(du.par_chunks_mut(PAR_GRAIN))
            .zip(g.par_chunks(PAR_GRAIN))
            .zip(u.par_chunks(PAR_GRAIN).zip(dy.par_chunks(PAR_GRAIN)))
            .for_each(|(((dg, du), g), (u, dy))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = dy[i] * g[i] * s;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((cpu_out(out, gs.dtype()), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        check_shapes(self.name(), gl, ul, ("g", "u"))?;
        check_shapes(self.name(), gl, dl, ("g", "dy"))?;
        same_dtype(
            self.name(),
            &[("g", gs.dtype()), ("u", us.dtype()), ("dy", ds.dtype())],
        )?;
        crate::common::float_dtype(gs.dtype(), self.name(), "g")?;
        let n = gl.shape().elem_count();
        let args = [(gs, gl), (us, ul), (ds, dl)];
        let out = match gs.dtype() {
            candle_core::DType::BF16 => cuda::launch::<half::bf16>("swiglu_bwd", &args, n, 2 * n),
            _ => cuda::launch::<f32>("swiglu_bwd", &args, n, 2 * n),
        }?;
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// `swiglu_{fwd,bwd}_*`'s launch over `n` elements: a grid-stride loop, blocks of 256
/// threads.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(n: usize) -> LaunchShape {
    LaunchShape {
        grid: (stride_grid(n, 256), 1, 1),
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

    /// Launches `<name>_<dtype>` over `n` elements with the views of `inputs` and a fresh
    /// output of `out_len` elements.
    pub(super) fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        n: usize,
        out_len: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = inputs[0].0.device.clone();
        let views = inputs
            .iter()
            .map(|(s, l)| view::<T>(s, l, name, "input"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(out_len) }?;
        let f = dev.get_or_load_custom_func(
            &format!("{name}_{}", suffix(T::DTYPE)),
            "swiglu",
            crate::ptx::SWIGLU,
        )?;
        let n_arg = n;
        let mut b = f.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&out).arg(&n_arg);
        let cfg = LaunchConfig::from(super::launch_shape(n));
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::Var;

    /// The doc comment's formula in plain candle ops.
    fn plain(g: &Tensor, u: &Tensor) -> Tensor {
        let silu = (g / (g.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
        (silu * u).unwrap()
    }

    fn sample() -> (Tensor, Tensor, Tensor) {
        // Scaled so that σ saturates on some elements (|g| up to 16).
        let g = (tensor(&[7, 3, 50], 11) * 8.0).unwrap();
        (g, tensor(&[7, 3, 50], 12), tensor(&[7, 3, 50], 13))
    }

    #[test]
    fn forward_equals_the_plain_formula() {
        let (g, u, _) = sample();
        let d = rel_diff(&swiglu(&g, &u).unwrap(), &plain(&g, &u));
        assert!(d < 1e-6, "{d}");
    }

    /// L = Σ y ⊙ G: both gradients vs candle autograd of the plain formula.
    #[test]
    fn gradients_equal_autograd_of_the_plain_formula() {
        let (g, u, dy) = sample();
        let (g, u) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
        let loss = |y: Tensor| (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = loss(swiglu(g.as_tensor(), u.as_tensor()).unwrap());
        let theirs = loss(plain(g.as_tensor(), u.as_tensor()));
        for (what, v) in [("dg", &g), ("du", &u)] {
            let d = rel_diff(
                ours.get(v.as_tensor()).unwrap(),
                theirs.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{what}: {d}");
        }
    }

    /// bf16 on the CPU: y, dg and du equal the f32 formulas on the same (bf16-exact) values
    /// rounded once to bf16, bit for bit (element-wise in f32, one rounding per output: the
    /// CUDA kernels' convention).
    #[test]
    fn bf16_equals_the_f32_computation_rounded_once() {
        use candle_core::DType;
        let (g, u, dy) = sample();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (gb, ub, dyb) = (bf(&g), bf(&u), bf(&dy));
        let bits = |t: &Tensor| {
            f32_of(&bf(t))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let y = swiglu(&gb, &ub).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(
            bits(&y),
            bits(&swiglu(&f32_of(&gb), &f32_of(&ub)).unwrap()),
            "y"
        );
        let (dg, du) = swiglu_backward(&gb, &ub, &dyb).unwrap();
        let (want_dg, want_du) =
            swiglu_backward(&f32_of(&gb), &f32_of(&ub), &f32_of(&dyb)).unwrap();
        assert_eq!(dg.dtype(), DType::BF16);
        assert_eq!(bits(&dg), bits(&want_dg), "dg");
        assert_eq!(bits(&du), bits(&want_du), "du");
    }

    #[test]
    fn shapes_that_differ_are_refused() {
        let err = swiglu(&tensor(&[2, 3], 1), &tensor(&[3, 2], 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
    }

    /// kernels/swiglu.cu (`swiglu_{fwd,bwd}_{f32,bf16}`) run on the CPU by finetune-kernel-emu
    /// with the CUDA launch's geometry and arguments, in both fiber orders, against
    /// [`Swiglu`]'s and [`SwigluBwd`]'s CPU forward: bit for bit, as both do the same f32
    /// operations per element in the same order with the same expf (the emulator's is libm's,
    /// which Rust's `f32::exp` calls too; a GPU's differs by an ulp, which its own test
    /// allows), and round bf16 outputs once to nearest even. n = 1, 255, 256, 257 and 1,000
    /// (partial last blocks); 1,000 again with the grid capped at 2 blocks, so that the
    /// grid-stride loop covers the rest (as the CUDA grid, capped at 524,280 blocks, does for
    /// huge inputs); 0 (one block with nothing to do). g spans [−16, 16) (σ saturates) plus
    /// ±100 and ±0 (e^100 overflows to ∞).
    #[test]
    fn emulated_kernels_equal_the_cpu_reference_bit_for_bit() {
        use crate::common::test::{bf16_bits, data};
        use candle_core::DType;
        use finetune_kernel_emu::{launch, Buffer, Order};
        type Bf = u16;
        extern "C" {
            fn swiglu_fwd_f32(g: *const f32, u: *const f32, y: *mut f32, n: usize);
            fn swiglu_fwd_bf16(g: *const Bf, u: *const Bf, y: *mut Bf, n: usize);
            fn swiglu_bwd_f32(
                g: *const f32,
                u: *const f32,
                dy: *const f32,
                out: *mut f32,
                n: usize,
            );
            fn swiglu_bwd_bf16(g: *const Bf, u: *const Bf, dy: *const Bf, out: *mut Bf, n: usize);
        }
        use crate::common::test::f32_bits as bits;
        fn assert_same(got: &[u32], want: &[u32], what: &str) {
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(
                first.is_none() && got.len() == want.len(),
                "{what}: first difference at {first:?}: {:?} vs {:?}",
                first.map(|i| f32::from_bits(got[i])),
                first.map(|i| f32::from_bits(want[i]))
            );
        }
        for (n, capped) in [
            (1usize, false),
            (255, false),
            (256, false),
            (257, false),
            (1000, false),
            (1000, true),
            (0, false),
        ] {
            let mut g: Vec<f32> = data(n, n as u64).iter().map(|x| x * 8.0).collect();
            for (slot, v) in g.iter_mut().zip([100.0, -100.0, 0.0, -0.0]) {
                *slot = v;
            }
            let (u, dy) = (data(n, n as u64 + 1), data(n, n as u64 + 2));
            let mut shape = launch_shape(n);
            if capped {
                assert!(
                    shape.grid.0 > 2,
                    "the cap must leave elements to the stride loop"
                );
                shape.grid.0 = 2;
            }
            for dtype in [DType::F32, DType::BF16] {
                let t = |v: &[f32]| {
                    Tensor::from_vec(v.to_vec(), n, &candle_core::Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (gt, ut, dyt) = (t(&g), t(&u), t(&dy));
                let want_y = bits(&gt.apply_op2_no_bwd(&ut, &Swiglu).unwrap());
                let want_b = bits(&gt.apply_op3_no_bwd(&ut, &dyt, &SwigluBwd).unwrap());
                for order in Order::BOTH {
                    let what = format!("n {n} capped {capped} {dtype:?} {order:?}");
                    let (y, b) = if dtype == DType::F32 {
                        let (gb, ub, db) = (
                            Buffer::from_slice(&g),
                            Buffer::from_slice(&u),
                            Buffer::from_slice(&dy),
                        );
                        let y = Buffer::filled(n, f32::NAN);
                        let out = Buffer::filled(2 * n, f32::NAN);
                        launch(shape.into(), order, || unsafe {
                            swiglu_fwd_f32(gb.ptr(), ub.ptr(), y.mut_ptr(), n)
                        })
                        .unwrap();
                        launch(shape.into(), order, || unsafe {
                            swiglu_bwd_f32(gb.ptr(), ub.ptr(), db.ptr(), out.mut_ptr(), n)
                        })
                        .unwrap();
                        let f = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        (f(y.to_vec()), f(out.to_vec()))
                    } else {
                        let (gb, ub, db) = (
                            Buffer::from_slice(&bf16_bits(&g)),
                            Buffer::from_slice(&bf16_bits(&u)),
                            Buffer::from_slice(&bf16_bits(&dy)),
                        );
                        // 0xFFFF: a NaN, for what the kernel leaves unwritten.
                        let y = Buffer::filled(n, 0xFFFFu16);
                        let out = Buffer::filled(2 * n, 0xFFFFu16);
                        launch(shape.into(), order, || unsafe {
                            swiglu_fwd_bf16(gb.ptr(), ub.ptr(), y.mut_ptr(), n)
                        })
                        .unwrap();
                        launch(shape.into(), order, || unsafe {
                            swiglu_bwd_bf16(gb.ptr(), ub.ptr(), db.ptr(), out.mut_ptr(), n)
                        })
                        .unwrap();
                        let f =
                            |v: Vec<u16>| v.iter().map(|&b| (b as u32) << 16).collect::<Vec<_>>();
                        (f(y.to_vec()), f(out.to_vec()))
                    };
                    assert_same(&y, &want_y, &format!("{what} y"));
                    assert_same(&b, &want_b, &format!("{what} (dg, du)"));
                }
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_forward_and_backward_equal_the_cpu_reference() {
        use candle_core::DType;
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let (g, u, dy) = sample();
        let want_y = swiglu(&g, &u).unwrap();
        let want_b = g.apply_op3_no_bwd(&u, &dy, &SwigluBwd).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let y = swiglu(&on(&g), &on(&u)).unwrap();
            let b = on(&g)
                .apply_op3_no_bwd(&on(&u), &on(&dy), &SwigluBwd)
                .unwrap();
            let (dy_err, db_err) = (rel_diff(&y, &want_y), rel_diff(&b, &want_b));
            eprintln!("swiglu cuda {dtype:?}: forward {dy_err:e}, backward {db_err:e}");
            assert!(dy_err < tol && db_err < tol, "{dtype:?}: {dy_err} {db_err}");
        }
    }
}
