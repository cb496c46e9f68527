//! `lora_linear`: a frozen projection with its LoRA adapter as one op,
//!   y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ
//! (x `[…, in]`, W `[out, in]` frozen, A `[r, in]`, B `[out, r]`, s the adapter's scale), with
//! the gradients of x, A and B from one backward call (W gets none):
//!   xa = x·Aᵀ,  g = s·dy·B,  dB = s·dyᵀ·xa,  dA = gᵀ·x,  dX = dy·W + g·A.
//!
//! Why: written as candle ops (frozen_linear, two matmuls, a scale and an add) a projection is
//! five graph nodes, and candle's backward zero-fills and adds a gradient for every edge, four of
//! them `[T, out]` or `[T, in]` tensors; this is one node whose backward hands candle dX, dA and
//! dB once. Each product is one GEMM of the `gemm` crate (candle's CPU matmul kernels) reading
//! and writing the tensors' storage in place.
//!
//! Without LoRA dropout (the adapter's input would differ from x): the model uses the plain ops
//! then, and the plain formula is this op's test reference.
//!
//! - CPU (f32): each product one GEMM of the `gemm` crate in place.
//! - Other devices (CUDA; x and W f32 or bf16, A and B f32 as the model keeps them): the forward
//!   is [`forward_storage`], generic over candle's `BackendStorage` (cuBLAS GEMMs through
//!   candle's storage ops, the adapter's path in f32 and rounded once to x's dtype, exactly as
//!   the model's plain ops) and the backward [`backward_tensors`] in tensor ops. Both are tested
//!   on the CPU backend against the plain formula; the graph keeps only x, A, B and W (not the
//!   f32 copy of x, x·Aᵀ and the f32 delta the plain ops keep per projection). Opt-in on the GPU
//!   ([`set_on_gpu`], `FINETUNE_LORA_LINEAR_GPU=1`) until a GPU session has run its test.

use crate::common::gemm_f32;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

static ON_GPU: crate::common::EnvSwitch = crate::common::EnvSwitch::new("FINETUNE_LORA_LINEAR_GPU");

/// Turns the fused op on or off for GPU tensors (the model asks [`on_gpu`]).
pub fn set_on_gpu(on: bool) {
    ON_GPU.set(on)
}

/// Whether the model should use this op for GPU tensors: `FINETUNE_LORA_LINEAR_GPU=1` or
/// [`set_on_gpu`].
pub fn on_gpu() -> bool {
    ON_GPU.get()
}

/// y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ over the last dimension of x (f32, CPU), differentiable in x, A
/// and B (not W).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    let (out, w_in) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    if w_in != inp || a_in != inp || b.dims() != [out, r] {
        candle_core::bail!(
            "lora-linear: x {:?}, W {:?}, A {:?}, B {:?}: expected x [.., in], W [out, in], A [r, in], B [out, r]",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        );
    }
    let x_dtypes: &[DType] = if x.device().is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    for (what, t, dtypes) in [
        ("x", x, x_dtypes),
        ("W", w, &[x.dtype()][..]),
        ("A", a, &[DType::F32][..]),
        ("B", b, &[DType::F32][..]),
    ] {
        if !dtypes.contains(&t.dtype()) || !t.device().same_device(x.device()) {
            candle_core::bail!(
                "lora-linear: {what} is {:?} on {:?}; the op takes x and W in f32 (or both bf16 on a GPU) and A, B in f32, all on x's device",
                t.dtype(),
                t.device().location()
            );
        }
    }
    let op = LoraLinear {
        w: w.detach().contiguous()?,
        scale: scale as f32,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The op over (x, A, B); holds W (frozen) and the scale.
pub struct LoraLinear {
    w: Tensor,
    scale: f32,
}

/// The contiguous f32 values of a CPU storage under `l`.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("lora-linear: {what} not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// The storages of `tensors` (made contiguous), to read as f32 slices with [`slices`].
fn contiguous(tensors: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
    tensors.iter().map(|t| t.contiguous()).collect()
}

/// The f32 values of CPU tensors (contiguous, from [`contiguous`]), named for errors.
fn slices<'a, G: std::ops::Deref<Target = Storage>>(
    guards: &'a [(G, &'a Layout)],
    names: &[&str],
) -> candle_core::Result<Vec<&'a [f32]>> {
    guards
        .iter()
        .zip(names)
        .map(|((storage, layout), name)| match &**storage {
            Storage::Cpu(s) => values(s, layout, name),
            _ => candle_core::bail!("lora-linear: {name} is not on the CPU"),
        })
        .collect()
}

fn threads() -> usize {
    rayon::current_num_threads()
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (
            values(xs, xl, "x")?,
            values(as_, al, "A")?,
            values(bs, bl, "B")?,
        );
        let (out, inp) = self.w.dims2()?;
        let r = al.dims()[0];
        let t = x.len() / inp.max(1);
        let mut y = vec![0f32; t * out];
        let w = contiguous(&[&self.w])?;
        let guards: Vec<_> = w.iter().map(|t| t.storage_and_layout()).collect();
        let w = slices(&guards, &["W"])?[0];
        // y = x·Wᵀ
        gemm_f32(
            (t, out, inp),
            (&mut y, out, false),
            (x, inp, 1),
            (w, 1, inp),
            1.0,
            threads(),
        );
        // xa = x·Aᵀ, then y += s·xa·Bᵀ
        let mut xa = vec![0f32; t * r];
        gemm_f32(
            (t, r, inp),
            (&mut xa, r, false),
            (x, inp, 1),
            (a, 1, inp),
            1.0,
            threads(),
        );
        gemm_f32(
            (t, out, r),
            (&mut y, out, true),
            (&xa, r, 1),
            (b, 1, r),
            self.scale,
            threads(),
        );
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("lora-linear: W is not on the GPU");
        };
        forward_storage((ws, wl), (xs, xl), (as_, al), (bs, bl), self.scale as f64)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.device().is_cpu() {
            let (dx, da, db) = backward_tensors(&self.w, x, a, b, dy, self.scale as f64)?;
            return Ok((Some(dx), Some(da), Some(db)));
        }
        let (out, inp) = self.w.dims2()?;
        let (r, _) = a.dims2()?;
        let t = x.elem_count() / inp.max(1);
        let s = self.scale;
        let n = threads();
        let (mut xa, mut g) = (vec![0f32; t * r], vec![0f32; t * r]);
        let (mut da, mut db) = (vec![0f32; r * inp], vec![0f32; out * r]);
        let mut dx = vec![0f32; t * inp];
        let held = contiguous(&[x, a, b, dy, &self.w])?;
        let guards: Vec<_> = held.iter().map(|t| t.storage_and_layout()).collect();
        let v = slices(&guards, &["x", "A", "B", "dy", "W"])?;
        let (xv, av, bv, dyv, wv) = (v[0], v[1], v[2], v[3], v[4]);
        // xa = x·Aᵀ,  g = s·dy·B
        gemm_f32(
            (t, r, inp),
            (&mut xa, r, false),
            (xv, inp, 1),
            (av, 1, inp),
            1.0,
            n,
        );
        gemm_f32(
            (t, r, out),
            (&mut g, r, false),
            (dyv, out, 1),
            (bv, r, 1),
            s,
            n,
        );
        // dB = s·dyᵀ·xa,  dA = gᵀ·x
        gemm_f32(
            (out, r, t),
            (&mut db, r, false),
            (dyv, 1, out),
            (&xa, r, 1),
            s,
            n,
        );
        gemm_f32(
            (r, inp, t),
            (&mut da, inp, false),
            (&g, 1, r),
            (xv, inp, 1),
            1.0,
            n,
        );
        // dX = dy·W + g·A
        gemm_f32(
            (t, inp, out),
            (&mut dx, inp, false),
            (dyv, out, 1),
            (wv, inp, 1),
            1.0,
            n,
        );
        gemm_f32(
            (t, inp, r),
            (&mut dx, inp, true),
            (&g, r, 1),
            (av, inp, 1),
            1.0,
            n,
        );
        drop(guards);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, inp), dev)?),
            Some(Tensor::from_vec(db, (out, r), dev)?),
        ))
    }
}

/// The forward on any candle backend: y = x·Wᵀ in x's dtype, plus s·(x·Aᵀ)·Bᵀ computed in
/// f32 (x converted when it is bf16) and rounded to x's dtype before the add — the model's
/// plain ops, step for step. Operands as (storage, layout); x, A and B contiguous.
pub fn forward_storage<S: BackendStorage>(
    w: (&S, &Layout),
    x: (&S, &Layout),
    a: (&S, &Layout),
    b: (&S, &Layout),
    scale: f64,
) -> candle_core::Result<(S, Shape)> {
    let (out, inp) = w.1.shape().dims2()?;
    let (r, _) = a.1.shape().dims2()?;
    let t = x.1.shape().elem_count() / inp.max(1);
    let x_l = Layout::contiguous_with_offset((t, inp), x.1.start_offset());
    let (rows_out, rows_r) = (Layout::contiguous((t, out)), Layout::contiguous((t, r)));
    // y = x·Wᵀ (W's layout transposed: no copy)
    let y =
        x.0.matmul(w.0, (1, t, out, inp), &x_l, &w.1.transpose(0, 1)?)?;
    // The adapter's path in f32.
    let x32 = x.0.to_dtype(&x_l, DType::F32)?;
    let xa = x32.matmul(
        a.0,
        (1, t, r, inp),
        &Layout::contiguous((t, inp)),
        &a.1.transpose(0, 1)?,
    )?;
    let delta = xa.matmul(b.0, (1, t, out, r), &rows_r, &b.1.transpose(0, 1)?)?;
    let delta = delta.affine(&rows_out, scale, 0.0)?;
    let delta = delta.to_dtype(&rows_out, y.dtype())?;
    let y = y.binary_impl::<candle_core::op::Add>(&delta, &rows_out, &rows_out)?;
    let mut dims = x.1.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Ok((y, Shape::from(dims)))
}

/// The backward in tensor ops (any device): with x₃₂ = x and dy₃₂ = dy in f32,
/// xa = x₃₂·Aᵀ, g = s·dy₃₂·B, dB = s·dy₃₂ᵀ·xa, dA = gᵀ·x₃₂, dX = dy·W + (g·A in x's dtype).
pub fn backward_tensors(
    w: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (out, inp) = w.dims2()?;
    let t = x.elem_count() / inp.max(1);
    let x2 = x.reshape((t, inp))?;
    let dy2 = dy.reshape((t, out))?;
    let (x32, dy32) = (x2.to_dtype(DType::F32)?, dy2.to_dtype(DType::F32)?);
    let xa = x32.matmul(&a.t()?)?;
    let g = (dy32.matmul(b)? * scale)?;
    let db = (dy32.t()?.matmul(&xa)? * scale)?;
    let da = g.t()?.matmul(&x32)?;
    let dx = (dy2.matmul(w)? + g.matmul(a)?.to_dtype(x.dtype())?)?;
    Ok((dx.reshape(x.shape())?, da, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{Device, Var};

    /// The doc comment's formula in plain candle ops (as finetune-model writes a projection
    /// with an adapter), W as a constant.
    fn plain(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Tensor {
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let delta = x
            .broadcast_matmul(&a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap();
        (y + (delta * s).unwrap()).unwrap()
    }

    #[test]
    fn output_and_gradients_equal_the_plain_formula() {
        for x_shape in [vec![7, 40], vec![2, 5, 40], vec![1, 40]] {
            let (inp, out, r, s) = (40, 24, 4, 2.5);
            let w = tensor(&[out, inp], 1);
            let x = Var::from_tensor(&tensor(&x_shape, 2)).unwrap();
            let a = Var::from_tensor(&tensor(&[r, inp], 3)).unwrap();
            let b = Var::from_tensor(&tensor(&[out, r], 4)).unwrap();
            let mut up_shape = x_shape.clone();
            *up_shape.last_mut().unwrap() = out;
            let upstream = tensor(&up_shape, 5);
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let ours = lora_linear(xt, &w, at, bt, s).unwrap();
            let theirs = plain(xt, &w, at, bt, s);
            assert_eq!(ours.dims(), theirs.dims());
            let dy = rel_diff(&ours, &theirs);
            assert!(dy < 1e-6, "{x_shape:?}: y {dy}");
            let grads = |y: Tensor| {
                (y * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (g1, g2) = (grads(ours), grads(theirs));
            for (what, v) in [("dx", xt), ("dA", at), ("dB", bt)] {
                let d = rel_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(d < 1e-5, "{x_shape:?} {what}: {d}");
            }
            // W is frozen: no gradient reaches it (it is not a variable, and the op asks none).
            assert!(g1.get(&w).is_none());
        }
    }

    /// The GPU path's code (generic forward on candle's CPU backend, tensor-op backward)
    /// against the plain formula and its autograd.
    #[test]
    fn the_generic_forward_and_backward_equal_the_plain_formula() {
        for x_shape in [vec![7, 40], vec![2, 5, 40]] {
            let (inp, out, r, s) = (40, 24, 4, 2.5);
            let w = tensor(&[out, inp], 1);
            let x = Var::from_tensor(&tensor(&x_shape, 2)).unwrap();
            let a = Var::from_tensor(&tensor(&[r, inp], 3)).unwrap();
            let b = Var::from_tensor(&tensor(&[out, r], 4)).unwrap();
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let theirs = plain(xt, &w, at, bt, s);
            // Forward: on the CPU storages, x offset inside its buffer (a narrowed tensor).
            let wide = Tensor::cat(
                &[
                    &tensor(&[3, 40], 9).flatten_all().unwrap(),
                    &xt.flatten_all().unwrap(),
                ],
                0,
            )
            .unwrap();
            let x_off = wide
                .narrow(0, 120, xt.elem_count())
                .unwrap()
                .reshape(xt.shape())
                .unwrap();
            let (ours, shape) = {
                let held = [&w, &x_off, at, bt];
                let guards: Vec<_> = held.iter().map(|t| t.storage_and_layout()).collect();
                let st: Vec<&CpuStorage> = guards
                    .iter()
                    .map(|(g, _)| match &**g {
                        Storage::Cpu(c) => c,
                        _ => unreachable!(),
                    })
                    .collect();
                forward_storage(
                    (st[0], guards[0].1),
                    (st[1], guards[1].1),
                    (st[2], guards[2].1),
                    (st[3], guards[3].1),
                    s,
                )
                .unwrap()
            };
            assert_eq!(shape.dims(), theirs.dims());
            let ours = Tensor::from_vec(
                ours.as_slice::<f32>().unwrap().to_vec(),
                shape,
                &Device::Cpu,
            )
            .unwrap();
            let dy = rel_diff(&ours, &theirs);
            assert!(dy < 1e-6, "{x_shape:?}: y {dy}");
            // Backward.
            let mut up_shape = x_shape.clone();
            *up_shape.last_mut().unwrap() = out;
            let upstream = tensor(&up_shape, 5);
            let want = (theirs * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (dx, da, db) = backward_tensors(&w, xt, at, bt, &upstream, s).unwrap();
            for (what, got, v) in [("dx", &dx, xt), ("dA", &da, at), ("dB", &db, bt)] {
                let d = rel_diff(got, want.get(v).unwrap());
                assert!(d < 1e-5, "{x_shape:?} {what}: {d}");
            }
        }
    }

    /// The GPU path against the CPU op: f32 and bf16 x and W, forward and all three gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference() {
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let (inp, out, r, s) = (256, 192, 16, 2.0);
        let (w, x, a, b) = (
            tensor(&[out, inp], 1),
            tensor(&[3, 37, inp], 2),
            tensor(&[r, inp], 3),
            tensor(&[out, r], 4),
        );
        let upstream = tensor(&[3, 37, out], 5);
        let run = |w: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, up: &Tensor| {
            let vars = [x, a, b].map(|t| Var::from_tensor(t).unwrap());
            let [xv, av, bv] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let y = lora_linear(xv, w, av, bv, s).unwrap();
            let grads = (y.to_dtype(DType::F32).unwrap() * up.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = [xv, av, bv].map(|v| grads.get(v).unwrap().clone());
            (y, g)
        };
        let (want_y, want_g) = run(&w, &x, &a, &b, &upstream);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let low = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let f32_on = |t: &Tensor| t.to_device(&gpu).unwrap();
            let (y, g) = run(
                &low(&w),
                &low(&x),
                &f32_on(&a),
                &f32_on(&b),
                &low(&upstream),
            );
            let dy = rel_diff(&y, &want_y);
            eprintln!("lora-linear cuda {dtype:?}: y {dy:e}");
            assert!(dy < tol, "{dtype:?}: y {dy}");
            for (what, got, want) in [
                ("dx", &g[0], &want_g[0]),
                ("dA", &g[1], &want_g[1]),
                ("dB", &g[2], &want_g[2]),
            ] {
                let d = rel_diff(got, want);
                eprintln!("lora-linear cuda {dtype:?}: {what} {d:e}");
                assert!(d < tol, "{dtype:?}: {what} {d}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_and_dtypes_are_refused() {
        let (x, w) = (tensor(&[3, 8], 1), tensor(&[6, 8], 2));
        let (a, b) = (tensor(&[2, 8], 3), tensor(&[6, 2], 4));
        let err = lora_linear(&x, &w, &a, &tensor(&[5, 2], 4), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected x [.., in]"), "{err}");
        let err = lora_linear(&x.to_dtype(DType::BF16).unwrap(), &w, &a, &b, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x is BF16"), "{err}");
    }
}
