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
//! CPU, f32 only, and without LoRA dropout (the adapter's input would differ from x): the model
//! uses the plain ops elsewhere, and the plain formula is this op's test reference.

use crate::common::gemm_f32;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

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
    for (what, t) in [("x", x), ("W", w), ("A", a), ("B", b)] {
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            candle_core::bail!(
                "lora-linear: {what} is {:?} on {:?}; the op is f32 on the CPU",
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

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::Var;

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
