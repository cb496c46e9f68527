//! `rope`: rotary position embedding at given positions, y = x·cos + rotate_half(x)·sin with
//! rotate_half(x) = [−x₂, x₁] (x₁, x₂ the halves of the last dimension D), on x `[…, H, D]`
//! (N = the product of the leading dimensions: tokens) with per-token tables cos, sin `[N, D]`
//! (any shape of N·D elements, e.g. `[N, 1, D]`; f32). Elementwise, for i < D/2:
//!   yᵢ = xᵢ·cosᵢ − x_{i+D/2}·sinᵢ,   y_{i+D/2} = x_{i+D/2}·cos_{i+D/2} + xᵢ·sin_{i+D/2}.
//!
//! The map is linear in x, so the backward is its transpose, the same op with
//! `transpose: true` on dy (the inverse rotation when cos² + sin² = 1; YaRN scales both, so
//! the transpose is what is right in general):
//!   dxᵢ = dyᵢ·cosᵢ + dy_{i+D/2}·sin_{i+D/2},   dx_{i+D/2} = dy_{i+D/2}·cos_{i+D/2} − dyᵢ·sinᵢ.
//! The tables are constants (no gradient).
//!
//! - CPU (the reference, rayon over tokens): [`Rope::cpu_fwd`].
//! - CUDA (`cuda` feature, kernels/rope.cu): one thread per (row, i) pair, f32 arithmetic for
//!   f32 and bf16 x.

use crate::common::{cpu_f32, cpu_out, rows_per_task, stride_grid, LaunchShape};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// RoPE of x `[…, H, D]` (f32 or bf16) with tables cos, sin of N·D elements (cast to f32),
/// differentiable in x.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let table = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    x.contiguous()?
        .apply_op3(&table(cos)?, &table(sin)?, Rope { transpose: false })
}

/// The op (x, cos, sin) → y; with `transpose`, the transposed map (the backward).
pub struct Rope {
    pub transpose: bool,
}

/// (N, H, D) of x after checking the tables hold N·D elements and D is even.
fn dims(x: &Layout, cos: &Layout, sin: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let dims = x.dims();
    if dims.len() < 2 || dims[dims.len() - 1] % 2 != 0 {
        candle_core::bail!("rope: x is {dims:?}, expected […, heads, even head_dim]");
    }
    let (h, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let n = x.shape().elem_count() / (h * d).max(1);
    for (what, l) in [("cos", cos), ("sin", sin)] {
        if l.shape().elem_count() != n * d {
            candle_core::bail!(
                "rope: x is {dims:?} ({n} tokens of head_dim {d}), {what} is {:?} (expected {n}·{d} elements)",
                l.dims()
            );
        }
    }
    Ok((n, h, d))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.transpose {
            "rope-bwd"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, d) = dims(xl, cl, sl)?;
        let x = cpu_f32(xs, xl, self.name(), "x")?;
        let cos = cpu_f32(cs, cl, self.name(), "cos")?;
        let sin = cpu_f32(ss, sl, self.name(), "sin")?;
        let half = d / 2;
        let tokens_per_task = rows_per_task(h * d);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * d * tokens_per_task)
            .zip(x.par_chunks(h * d * tokens_per_task))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (k, (y, x)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    let tok = task * tokens_per_task + k / h;
                    let (c, s) = (&cos[tok * d..][..d], &sin[tok * d..][..d]);
                    for i in 0..half {
                        let (x1, x2) = (x[i], x[i + half]);
                        if self.transpose {
                            y[i] = x1 * c[i] + x2 * s[i + half];
                            y[i + half] = x2 * c[i + half] - x1 * s[i];
                        } else {
                            y[i] = x1 * c[i] - x2 * s[i];
                            y[i + half] = x2 * c[i + half] + x1 * s[i + half];
                        }
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
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, h, d) = dims(xl, cl, sl)?;
        crate::common::float_dtype(xs.dtype(), self.name(), "x")?;
        if cs.dtype() != DType::F32 || ss.dtype() != DType::F32 {
            candle_core::bail!("{}: cos/sin must be f32", self.name());
        }
        let y = match xs.dtype() {
            DType::BF16 => {
                cuda::launch::<half::bf16>(self.transpose, (xs, xl), (cs, cl), (ss, sl), n, h, d)
            }
            _ => cuda::launch::<f32>(self.transpose, (xs, xl), (cs, cl), (ss, sl), n, h, d),
        }?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                transpose: !self.transpose,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// `rope_*`'s launch for x `[n, h, d]`: a grid-stride loop over the n·h·d/2 rotation pairs,
/// blocks of 256 threads.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(n: usize, h: usize, d: usize) -> LaunchShape {
    LaunchShape {
        grid: (stride_grid(n * h * d / 2, 256), 1, 1),
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

    type Arg<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        transpose: bool,
        x: Arg,
        cos: Arg,
        sin: Arg,
        n: usize,
        h: usize,
        d: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = x.0.device.clone();
        let xv = view::<T>(x.0, x.1, "rope", "x")?;
        let cv = view::<f32>(cos.0, cos.1, "rope", "cos")?;
        let sv = view::<f32>(sin.0, sin.1, "rope", "sin")?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n * h * d) }?;
        let f = dev.get_or_load_custom_func(
            &format!("rope_{}", suffix(T::DTYPE)),
            "rope",
            crate::ptx::ROPE,
        )?;
        let (n_i, h_i, d_i, t_i) = (n as i32, h as i32, d as i32, i32::from(transpose));
        let mut b = f.builder();
        b.arg(&xv)
            .arg(&cv)
            .arg(&sv)
            .arg(&out)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&d_i)
            .arg(&t_i);
        let cfg = LaunchConfig::from(super::launch_shape(n, h, d));
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{Var, D};

    /// The doc comment's formula in plain candle ops (as finetune-model wrote it).
    fn plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(cos).unwrap() + rotated.broadcast_mul(sin).unwrap()).unwrap()
    }

    /// 6 tokens, 3 heads of 8; tables `[6, 1, 8]` as the model builds them, with a YaRN-like
    /// factor 1.1 so that cos² + sin² ≠ 1 (the backward must be the transpose, not the inverse).
    fn sample() -> (Tensor, Tensor, Tensor, Tensor) {
        let (n, h, d) = (6usize, 3usize, 8usize);
        let angles: Vec<f32> = (0..n)
            .flat_map(|p| {
                (0..2).flat_map(move |_| (0..d / 2).map(move |i| p as f32 * 0.7f32.powi(i as i32)))
            })
            .collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|&a| f(a) * 1.1).collect();
            Tensor::from_vec(v, (n, 1, d), &candle_core::Device::Cpu).unwrap()
        };
        (
            tensor(&[n, h, d], 21),
            table(f32::cos),
            table(f32::sin),
            tensor(&[n, h, d], 22),
        )
    }

    #[test]
    fn forward_equals_the_plain_formula() {
        let (x, c, s, _) = sample();
        let d = rel_diff(&rope(&x, &c, &s).unwrap(), &plain(&x, &c, &s));
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn gradient_equals_autograd_of_the_plain_formula() {
        let (x, c, s, g) = sample();
        let x = Var::from_tensor(&x).unwrap();
        let loss = |y: Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = loss(rope(x.as_tensor(), &c, &s).unwrap());
        let theirs = loss(plain(x.as_tensor(), &c, &s));
        let d = rel_diff(
            ours.get(x.as_tensor()).unwrap(),
            theirs.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn tables_of_the_wrong_size_are_refused() {
        let (x, c, _, _) = sample();
        let short = c.narrow(0, 0, 5).unwrap();
        let err = rope(&x, &short, &c).unwrap_err().to_string();
        assert!(
            err.contains("[6, 3, 8]") && err.contains("[5, 1, 8]"),
            "{err}"
        );
    }

    /// YaRN-style tables `[n, d]` (as the model builds them): angle p·θᵢ with θᵢ = 10000^(−2i/d)
    /// blended towards θᵢ/4 (interpolation) over a ramp of the frequencies, both halves the
    /// same, cos and sin scaled by YaRN's attention factor 0.1·ln 4 + 1 (cos² + sin² ≠ 1).
    fn yarn_tables(n: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let half = d / 2;
        let mscale = 0.1 * 4f32.ln() + 1.0;
        let theta = |i: usize| {
            let t = 10_000f32.powf(-2.0 * i as f32 / d as f32);
            let ramp = (i as f32 / half.max(2) as f32).clamp(0.0, 1.0);
            t * (1.0 - ramp) + t / 4.0 * ramp
        };
        let angle = |k: usize| (k / d) as f32 * theta(k % d % half);
        let table = |f: fn(f32) -> f32| (0..n * d).map(|k| f(angle(k)) * mscale).collect();
        (table(f32::cos), table(f32::sin))
    }

    /// kernels/rope.cu (`rope_f32`, `rope_bf16`) run on the CPU by finetune-kernel-emu with the
    /// CUDA launch's geometry and arguments, forward and transposed (the backward), in both
    /// fiber orders, against [`Rope`]'s CPU forward: bit for bit, as both do the same f32
    /// operations per element (two products and a difference or sum, no fused multiply-add)
    /// and round bf16 outputs once to nearest even. Shapes: 6 tokens × 3 heads × 8; 7 × 5 × 70
    /// (1,225 pairs: a partial last block; half 35, not a multiple of a warp), also with
    /// arbitrary tables whose halves differ (a model's repeat their frequencies, which would
    /// hide a kernel reading cosᵢ for cos_{i+D/2}); 3 × 1 × 2 (one
    /// pair per row); 11 × 2 × 64 with the grid capped at 2 blocks, so that the grid-stride
    /// loop covers the rest (as the CUDA grid, capped at 524,280 blocks, does for huge
    /// inputs); no tokens (one block with nothing to do).
    #[test]
    fn emulated_kernel_equals_the_cpu_reference_bit_for_bit() {
        use crate::common::test::{bf16_bits, data};
        use finetune_kernel_emu::{launch, Buffer, Order};
        type Bf = u16;
        extern "C" {
            fn rope_f32(
                x: *const f32,
                cos: *const f32,
                sin: *const f32,
                y: *mut f32,
                n: i32,
                h: i32,
                d: i32,
                transpose: i32,
            );
            fn rope_bf16(
                x: *const Bf,
                cos: *const f32,
                sin: *const f32,
                y: *mut Bf,
                n: i32,
                h: i32,
                d: i32,
                transpose: i32,
            );
        }
        for (n, h, d, capped, yarn) in [
            (6usize, 3usize, 8usize, false, true),
            (7, 5, 70, false, true),
            (7, 5, 70, false, false),
            (3, 1, 2, false, true),
            (11, 2, 64, true, true),
            (0, 2, 4, false, true),
        ] {
            let x = data(n * h * d, (n * h * d) as u64);
            let (cos, sin) = if yarn {
                yarn_tables(n, d)
            } else {
                (data(n * d, 1), data(n * d, 2))
            };
            let cpu = candle_core::Device::Cpu;
            let (ct, st) = (
                Tensor::from_vec(cos.clone(), (n, d), &cpu).unwrap(),
                Tensor::from_vec(sin.clone(), (n, d), &cpu).unwrap(),
            );
            let mut shape = launch_shape(n, h, d);
            if capped {
                assert!(
                    shape.grid.0 > 2,
                    "the cap must leave pairs to the stride loop"
                );
                shape.grid.0 = 2;
            }
            let (cb, sb) = (Buffer::from_slice(&cos), Buffer::from_slice(&sin));
            let (n_i, h_i, d_i) = (n as i32, h as i32, d as i32);
            for transpose in [false, true] {
                for dtype in [DType::F32, DType::BF16] {
                    let xt = Tensor::from_vec(x.clone(), (n, h, d), &cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    // The reference's output as f32 bits (bf16 widens exactly).
                    let want = crate::common::test::f32_bits(
                        &xt.apply_op3_no_bwd(&ct, &st, &Rope { transpose }).unwrap(),
                    );
                    for order in Order::BOTH {
                        let t_i = i32::from(transpose);
                        let got: Vec<u32> = if dtype == DType::F32 {
                            let xb = Buffer::from_slice(&x);
                            let y = Buffer::filled(n * h * d, f32::NAN);
                            launch(shape.into(), order, || unsafe {
                                rope_f32(
                                    xb.ptr(),
                                    cb.ptr(),
                                    sb.ptr(),
                                    y.mut_ptr(),
                                    n_i,
                                    h_i,
                                    d_i,
                                    t_i,
                                )
                            })
                            .unwrap();
                            y.to_vec().iter().map(|v| v.to_bits()).collect()
                        } else {
                            let xb = Buffer::from_slice(&bf16_bits(&x));
                            let y = Buffer::filled(n * h * d, 0xFFFFu16); // NaN
                            launch(shape.into(), order, || unsafe {
                                rope_bf16(
                                    xb.ptr(),
                                    cb.ptr(),
                                    sb.ptr(),
                                    y.mut_ptr(),
                                    n_i,
                                    h_i,
                                    d_i,
                                    t_i,
                                )
                            })
                            .unwrap();
                            y.to_vec().iter().map(|&b| (b as u32) << 16).collect()
                        };
                        let what = format!(
                            "{n}×{h}×{d} yarn {yarn} transpose {transpose} {dtype:?} {order:?}"
                        );
                        let first = got.iter().zip(&want).position(|(a, b)| a != b);
                        assert!(
                            first.is_none(),
                            "{what}: first difference at {first:?}: {:?} vs {:?}",
                            first.map(|i| f32::from_bits(got[i])),
                            first.map(|i| f32::from_bits(want[i]))
                        );
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
        let (x, c, s, g) = sample();
        let want_y = rope(&x, &c, &s).unwrap();
        let back = Rope { transpose: true };
        let want_dx = g.apply_op3_no_bwd(&c, &s, &back).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let (cg, sg) = (c.to_device(&gpu).unwrap(), s.to_device(&gpu).unwrap());
            let y = rope(&on(&x), &cg, &sg).unwrap();
            let dx = on(&g).apply_op3_no_bwd(&cg, &sg, &back).unwrap();
            let (ey, edx) = (rel_diff(&y, &want_y), rel_diff(&dx, &want_dx));
            eprintln!("rope cuda {dtype:?}: forward {ey:e}, backward {edx:e}");
            assert!(ey < tol && edx < tol, "{dtype:?}: {ey} {edx}");
        }
    }
}
