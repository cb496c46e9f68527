//! `frozen_batched_linear`: y[e] = x[e]·W[e]ᵀ for E frozen weights W `[E, out, in]` at once (the
//! experts of one MoE layer, each on its own padded group of tokens x `[E, C, in]`), whose
//! backward returns dX only.
//!
//! Math: y[e][c][o] = Σᵢ x[e][c][i]·W[e][o][i]; dL/dx[e] = dL/dy[e]·W[e]; no dL/dW (frozen).
//!
//! - CPU forward (the reference): candle's batched matmul, x·Wᵀ, on f32 or bf16 (candle's CPU
//!   matmul widens bf16 to f32, multiplies and rounds once: the CUDA path's convention).
//! - CUDA forward (`cuda` feature): one strided-batched cuBLAS GEMM through candle's
//!   `BackendStorage::matmul`, W read through a transposed layout (`[E, in, out]`, strides
//!   `[out·in, 1, in]`) without a copy; f32 or bf16 (f32 accumulation), x and W of one dtype.
//! - Backward, on either device: dL/dx = dL/dy·W with candle's batched matmul.
//!
//! One launch instead of one GEMM (and a dozen autograd nodes) per expert; the price is the
//! padding of every group to the largest one.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};

/// The op; holds the stacked weights `[E, out, in]` (in the input's dtype).
pub struct FrozenBatchedLinear {
    w: Tensor,
}

/// y = x·Wᵀ per batch entry, for x `[E, C, in]` and W `[E, out, in]`, gradient for x only.
pub fn frozen_batched_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (e, _, inp) = x.dims3()?;
    let (we, _, win) = w.dims3()?;
    if e != we || inp != win {
        candle_core::bail!(
            "frozen-batched-linear: input {:?} and weights {:?} do not match ([E, C, in] and [E, out, in])",
            x.dims(),
            w.dims()
        );
    }
    x.contiguous()?
        .apply_op1(FrozenBatchedLinear { w: w.contiguous()? })
}

impl FrozenBatchedLinear {
    /// The CPU forward on the input's values `data` (of the weights' dtype).
    fn cpu<T: WithDType>(
        &self,
        data: &[T],
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-batched-linear: input not contiguous".into())
        })?;
        if self.w.dtype() != T::DTYPE {
            candle_core::bail!(
                "frozen-batched-linear: input {:?} and weights {:?}: both must be f32 or both bf16",
                T::DTYPE,
                self.w.dtype()
            );
        }
        let x = Tensor::from_vec(data[start..end].to_vec(), layout.shape(), self.w.device())?;
        let y = x.matmul(&self.w.transpose(1, 2)?)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<T>()?;
        Ok((T::to_cpu_storage_owned(values), shape))
    }
}

impl CustomOp1 for FrozenBatchedLinear {
    fn name(&self) -> &'static str {
        "frozen-batched-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(v) => self.cpu(v, layout),
            CpuStorage::BF16(v) => self.cpu(v, layout),
            other => candle_core::bail!(
                "frozen-batched-linear: input is {:?}, expected f32 or bf16",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::Storage;
        let err = |m: String| candle_core::Error::Msg(format!("frozen-batched-linear (cuda): {m}"));
        let (e, c, inp) = layout.shape().dims3()?;
        let (_, out, _) = self.w.dims3()?;
        let (x_start, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("input not contiguous".into()))?;
        if self.w.dtype() != storage.dtype() {
            return Err(err(format!(
                "input {:?} and weights {:?}: both must be f32 or both bf16",
                storage.dtype(),
                self.w.dtype()
            )));
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cuda(w_cuda) = &*w_storage else {
            return Err(err("weights not on the GPU".into()));
        };
        let x_layout = Layout::contiguous_with_offset((e, c, inp), x_start);
        let wt_layout = Layout::new(
            (e, inp, out).into(),
            vec![out * inp, 1, inp],
            w_layout.start_offset(),
        );
        let y = storage.matmul(w_cuda, (e, c, out, inp), &x_layout, &wt_layout)?;
        Ok((y, Shape::from((e, c, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.contiguous()?.matmul(&self.w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// Forward and dX equal a per-expert loop of plain matmuls; W gets no gradient.
    #[test]
    fn equals_one_matmul_per_expert_and_leaves_the_weights_without_gradient() {
        let dev = Device::Cpu;
        let (e, c, inp, out) = (3, 4, 6, 5);
        let x = Var::from_vec(values(e * c * inp, 1), (e, c, inp), &dev).unwrap();
        let w = Var::from_vec(values(e * out * inp, 2), (e, out, inp), &dev).unwrap();
        let g = Tensor::from_vec(values(e * c * out, 3), (e, c, out), &dev).unwrap();
        let y = frozen_batched_linear(&x, &w).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none(), "a frozen weight got a gradient");
        let dx = grads.get(&x).unwrap();
        for k in 0..e {
            let (xk, wk, gk) = (x.get(k).unwrap(), w.get(k).unwrap(), g.get(k).unwrap());
            let want_y = xk.matmul(&wk.t().unwrap()).unwrap();
            let want_dx = gk.matmul(&wk).unwrap();
            let dy = (y.get(k).unwrap() - want_y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let dd = (dx.get(k).unwrap() - want_dx)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(dy.to_scalar::<f32>().unwrap() < 1e-6);
            assert!(dd.to_scalar::<f32>().unwrap() < 1e-6);
        }
        assert_eq!(y.dtype(), DType::F32);
    }

    /// bf16 on the CPU: forward and dX equal the f32 computation on the same (bf16-exact)
    /// values rounded once to bf16 — candle's CPU matmul widens bf16 to f32 and multiplies with
    /// the same f32 GEMM, so the results are bit-identical, not merely within an ulp.
    #[test]
    fn bf16_equals_the_f32_computation_rounded_once() {
        let dev = Device::Cpu;
        let (e, c, inp, out) = (3, 5, 7, 4);
        let bf = |v: Vec<f32>, shape: (usize, usize, usize)| {
            Tensor::from_vec(v, shape, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let x = bf(values(e * c * inp, 4), (e, c, inp));
        let w = bf(values(e * out * inp, 5), (e, out, inp));
        let g = bf(values(e * c * out, 6), (e, c, out));
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = frozen_batched_linear(&xv, &w).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let dx = (&y * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&xv)
            .unwrap()
            .clone();
        let (x32, w32, g32) = (f32_of(&x), f32_of(&w), f32_of(&g));
        let want_y = frozen_batched_linear(&x32, &w32).unwrap();
        let want_dx = g32.matmul(&w32).unwrap();
        let bits = |t: &Tensor| {
            f32_of(&t.to_dtype(DType::BF16).unwrap())
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(&y), bits(&want_y), "forward");
        assert_eq!(bits(&dx), bits(&want_dx), "dX");
        // Mixed dtypes are refused, naming both.
        let err = frozen_batched_linear(&x32, &w).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("BF16"), "{err}");
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 4, 6), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 5, 6), DType::F32, &dev).unwrap();
        let err = frozen_batched_linear(&x, &w).unwrap_err().to_string();
        assert!(
            err.contains("[3, 4, 6]") && err.contains("[2, 5, 6]"),
            "{err}"
        );
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference_in_f32_and_bf16() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let (e, c, inp, out) = (4, 33, 96, 40);
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
            let x = Tensor::from_vec(values(e * c * inp, 1), (e, c, inp), &Device::Cpu).unwrap();
            let w =
                Tensor::from_vec(values(e * out * inp, 2), (e, out, inp), &Device::Cpu).unwrap();
            let (x, w) = (
                x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap(),
                w.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap(),
            );
            let want = frozen_batched_linear(&x, &w).unwrap();
            let got = frozen_batched_linear(
                &x.to_device(&gpu).unwrap().to_dtype(dtype).unwrap(),
                &w.to_device(&gpu).unwrap().to_dtype(dtype).unwrap(),
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
            let diff = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            eprintln!("frozen_batched_linear {dtype:?}: max abs diff {diff:e} (scale {scale:e})");
            assert!(diff <= tol * scale, "{dtype:?}: {diff} > {tol} × {scale}");
        }
    }
}
