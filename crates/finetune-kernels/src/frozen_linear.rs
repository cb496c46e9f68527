//! `frozen_linear`: y = x·Wᵀ for a frozen weight W `[out, in]`, whose backward returns dX only.
//!
//! Math: y[t][o] = Σᵢ x[t][i]·W[o][i]; dL/dx = dL/dy·W; no dL/dW, because W is frozen.
//! candle's own matmul backward always computes and stores dL/dW (measured: about 2× the
//! backward time and twice the gradient memory for LoRA training, DESIGN.md), so every frozen
//! projection goes through this op.
//!
//! - CPU forward (the reference): candle's f32 matmul on a copy of the input, x·Wᵀ.
//! - CUDA forward (`cuda` feature): one cuBLAS GEMM through candle's `BackendStorage::matmul`
//!   on the CUDA storages of x (viewed as `[T, in]`, T = product of the leading dims) and of W
//!   with a transposed layout (`[in, out]`, strides `[1, in]`, so cuBLAS reads W as Wᵀ without a
//!   copy). x and W must have the same dtype, f32 or bf16; f32 is computed in full f32 (candle
//!   does not enable TF32 unless asked), bf16 with cuBLAS's f32 accumulation and a bf16 result.
//! - Backward, on either device: dL/dx = dL/dy·W with candle's matmul.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

/// The op; holds the weight (in the activations' dtype: f32 on CPU, f32 or bf16 on CUDA), or
/// a function that makes it for each use ([`frozen_linear_lazy`]).
pub struct FrozenLinear {
    w: Weight,
}

enum Weight {
    Held(Tensor),
    Lazy(crate::WeightFn),
}

impl FrozenLinear {
    /// `w` is `[out, in]`.
    pub fn new(w: Tensor) -> Self {
        Self { w: Weight::Held(w) }
    }

    /// The weight for this use.
    fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.w {
            Weight::Held(w) => Ok(w.clone()),
            Weight::Lazy(make) => make(),
        }
    }
}

/// y = x·Wᵀ over the last dimension of `x`, with a gradient for `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1(FrozenLinear::new(w.clone()))
}

/// [`frozen_linear`] with the weight made by `weight` for the forward and again for the
/// backward, and dropped after each (not kept by the graph in between).
pub fn frozen_linear_lazy(x: &Tensor, weight: crate::WeightFn) -> candle_core::Result<Tensor> {
    x.apply_op1(FrozenLinear {
        w: Weight::Lazy(weight),
    })
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        // f32 or bf16 (the compute dtypes): the product in f32 on the exact values, rounded
        // once to x's dtype (what candle's CPU matmul does with bf16 operands).
        let data = crate::common::cpu_f32(storage, layout, "frozen-linear", "input")?.into_owned();
        let w = self.weight()?.to_dtype(DType::F32)?;
        let x = Tensor::from_vec(data, layout.shape(), w.device())?;
        let y = x.broadcast_matmul(&w.t()?)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((crate::common::cpu_out(values, storage.dtype()), shape))
    }

    /// y = x·Wᵀ as one cuBLAS GEMM: candle's CUDA matmul of x `[1, T, in]` (contiguous) with the
    /// transposed layout of W, `[1, in, out]` with strides `[·, 1, in]`.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::Storage;

        let err = |m: String| candle_core::Error::Msg(format!("frozen-linear (cuda): {m}"));
        let w = self.weight()?;
        let (out, inp) = w.dims2()?;
        let x_dims = layout.dims();
        if x_dims.last() != Some(&inp) {
            return Err(err(format!(
                "input {x_dims:?} does not end in the weight's in = {inp}"
            )));
        }
        let (x_start, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("input not contiguous".into()))?;
        let dtype = storage.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16) || w.dtype() != dtype {
            return Err(err(format!(
                "input {dtype:?} and weight {:?}: both must be f32 or both bf16",
                w.dtype()
            )));
        }
        let w = if w.is_contiguous() {
            w
        } else {
            w.contiguous()?
        };
        let (w_storage, w_layout) = w.storage_and_layout();
        let Storage::Cuda(w_cuda) = &*w_storage else {
            return Err(err(format!(
                "weight on {:?}, input on a CUDA device",
                w.device().location()
            )));
        };
        let t = layout.shape().elem_count() / inp;
        let x_layout = Layout::contiguous_with_offset((1, t, inp), x_start);
        // W [out, in] row-major read as Wᵀ [in, out]: element (i, o) at o·in + i.
        let wt_layout = Layout::new(
            (1, inp, out).into(),
            vec![inp * out, 1, inp],
            w_layout.start_offset(),
        );
        let y = storage.matmul(w_cuda, (1, t, out, inp), &x_layout, &wt_layout)?;
        let mut dims = x_dims.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.broadcast_matmul(&self.weight()?)?))
    }
}

/// How far `frozen_linear` on a device is from the CPU reference ([`check_against_cpu`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceCheck {
    /// max |y_device − y_cpu|
    pub forward_max_abs_diff: f32,
    /// max |dX_device − dX_cpu|
    pub grad_max_abs_diff: f32,
    /// max |y_cpu| and max |dX_cpu|: the tolerance is relative to these.
    pub forward_scale: f32,
    pub grad_scale: f32,
    /// Relative tolerance used: 1e-5 for f32, 1e-2 for bf16 (8-bit mantissa result).
    pub rel_tolerance: f32,
}

/// Runs `frozen_linear` forward and backward on `device` in `dtype` (f32 or bf16) on a small
/// shape (x `[3, 5, 96]`, W `[40, 96]`, upstream gradient G `[3, 5, 40]`) and compares y = x·Wᵀ
/// and dX = G·W with the CPU reference in f32 on the same values (rounded to `dtype` first, so
/// both sides see identical inputs). Fails with [`crate::KernelError::Mismatch`] when a max
/// abs diff exceeds `rel_tolerance` × the largest reference magnitude.
pub fn check_against_cpu(device: &Device, dtype: DType) -> crate::Result<DeviceCheck> {
    const B: usize = 3;
    const T: usize = 5;
    const IN: usize = 96;
    const OUT: usize = 40;
    let fill = |len: usize, salt: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    };
    // Values as `dtype` holds them, in f32 on the CPU.
    let rounded = |v: Vec<f32>, shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)
    };
    let x = rounded(fill(B * T * IN, 1), &[B, T, IN])?;
    let w = rounded(fill(OUT * IN, 2), &[OUT, IN])?;
    let g = rounded(fill(B * T * OUT, 3), &[B, T, OUT])?;

    // L = Σ y ⊙ G, so dL/dy = G and dL/dx = G·W.
    let run = |dev: &Device, dt: DType| -> candle_core::Result<(Tensor, Tensor)> {
        let xv = candle_core::Var::from_tensor(&x.to_dtype(dt)?.to_device(dev)?)?;
        let wd = w.to_dtype(dt)?.to_device(dev)?;
        let gd = g.to_dtype(dt)?.to_device(dev)?;
        let y = frozen_linear(xv.as_tensor(), &wd)?;
        let grads = (&y * &gd)?.sum_all()?.backward()?;
        let dx = grads
            .get(xv.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: no gradient for x".into()))?
            .clone();
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
        Ok((host(&y)?, host(&dx)?))
    };
    let (y_ref, dx_ref) = run(&Device::Cpu, DType::F32)?;
    let (y_dev, dx_dev) = run(device, dtype)?;
    let max_abs = |t: &Tensor| -> candle_core::Result<f32> {
        t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    let check = DeviceCheck {
        forward_max_abs_diff: max_abs(&(&y_dev - &y_ref)?)?,
        grad_max_abs_diff: max_abs(&(&dx_dev - &dx_ref)?)?,
        forward_scale: max_abs(&y_ref)?,
        grad_scale: max_abs(&dx_ref)?,
        rel_tolerance: if dtype == DType::F32 { 1e-5 } else { 1e-2 },
    };
    for (what, diff, scale) in [
        (
            "frozen_linear forward",
            check.forward_max_abs_diff,
            check.forward_scale,
        ),
        (
            "frozen_linear dX",
            check.grad_max_abs_diff,
            check.grad_scale,
        ),
    ] {
        let tolerance = check.rel_tolerance * scale;
        if diff.is_nan() || diff > tolerance {
            return Err(crate::KernelError::Mismatch {
                device: format!("{device:?} {dtype:?}"),
                what,
                max_abs_err: diff,
                tolerance,
            });
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + salt * 11) % 23) as f32 - 11.0) / 7.0)
            .collect()
    }

    /// bf16 x and W on the CPU (a bf16 model there): y in bf16, the f32 product of the same
    /// values rounded once.
    #[test]
    fn bf16_on_the_cpu_is_the_f32_product_rounded_once() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(data(5 * 6, 1), (5, 6), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let w = Tensor::from_vec(data(4 * 6, 2), (4, 6), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = frozen_linear(&x, &w).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = widen(&x)
            .matmul(&widen(&w).t().unwrap())
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bits = |t: &Tensor| -> Vec<u16> {
            let v: Vec<half::bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&y), bits(&want));
    }

    /// The lazy variant: the same y and dX as the held weight, the weight made once for the
    /// forward and once for the backward.
    #[test]
    fn the_lazy_variant_equals_the_held_weight_and_makes_it_per_use() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let dev = Device::Cpu;
        let x = Var::from_vec(data(5 * 6, 1), (5, 6), &dev).unwrap();
        let w = Tensor::from_vec(data(4 * 6, 2), (4, 6), &dev).unwrap();
        let g = Tensor::from_vec(data(5 * 4, 3), (5, 4), &dev).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let make: crate::WeightFn = {
            let (w, calls) = (w.clone(), calls.clone());
            Arc::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                w.affine(1.0, 0.0)
            })
        };
        let y = frozen_linear_lazy(x.as_tensor(), make).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let want = frozen_linear(x.as_tensor(), &w).unwrap();
        let diff = crate::common::test::rel_diff;
        assert_eq!(diff(&y, &want), 0.0);
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let want_grads = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (dx, want_dx) = (
            grads.get(x.as_tensor()).unwrap(),
            want_grads.get(x.as_tensor()).unwrap(),
        );
        assert_eq!(diff(dx, want_dx), 0.0);
    }

    #[test]
    fn forward_and_input_gradient_equal_plain_matmul() {
        let dev = Device::Cpu;
        let x = Var::from_vec(data(5 * 6, 1), (5, 6), &dev).unwrap();
        let w = Tensor::from_vec(data(4 * 6, 2), (4, 6), &dev).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let reference = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = (&y - &reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        // L = Σ y² → dL/dx = 2y·W.
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let want = (reference * 2.0).unwrap().matmul(&w).unwrap();
        let diff = (gx - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    /// The point of the op: no gradient of W's shape is computed or stored; candle's own
    /// matmul stores one for Wᵀ (so this check can fail).
    #[test]
    fn no_weight_gradient_is_computed() {
        let dev = Device::Cpu;
        let x = Var::from_vec(data(5 * 6, 1), (5, 6), &dev).unwrap();
        let w = Tensor::from_vec(data(4 * 6, 2), (4, 6), &dev).unwrap();
        let weight_shaped = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter_map(|id| g.get_id(*id))
                .filter(|t| t.dims() == [6, 4] || t.dims() == [4, 6])
                .count()
        };
        let ours = frozen_linear(x.as_tensor(), &w).unwrap().sum_all().unwrap();
        assert_eq!(weight_shaped(&ours.backward().unwrap()), 0);
        let plain = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(weight_shaped(&plain.backward().unwrap()), 1);
    }

    #[test]
    fn cpu_check_against_itself_is_exact() {
        let c = check_against_cpu(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(c.forward_max_abs_diff, 0.0);
        assert_eq!(c.grad_max_abs_diff, 0.0);
        assert!(c.forward_scale > 1.0 && c.grad_scale > 1.0, "{c:?}");
    }

    /// Runs on a GPU machine (test executable built with `--features cuda`, see
    /// scripts/device-run.sh); skipped, with a message, where no GPU is visible.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_forward_and_input_gradient_equal_the_cpu_reference() {
        match crate::device::cuda_devices() {
            Ok(g) if !g.is_empty() => {}
            other => {
                eprintln!("skipped: no CUDA device ({other:?})");
                return;
            }
        }
        let gpu = Device::new_cuda(0).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let c = check_against_cpu(&gpu, dtype).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            eprintln!(
                "cuda {dtype:?}: forward max abs diff {:e} (max |y| {}), dX max abs diff {:e} \
                 (max |dX| {})",
                c.forward_max_abs_diff, c.forward_scale, c.grad_max_abs_diff, c.grad_scale
            );
        }
    }

    #[test]
    fn batched_inputs_use_the_last_dimension() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(data(2 * 3 * 6, 3), (2, 3, 6), &dev).unwrap();
        let w = Tensor::from_vec(data(4 * 6, 2), (4, 6), &dev).unwrap();
        let y = frozen_linear(&x, &w).unwrap();
        assert_eq!(y.dims(), [2, 3, 4]);
        let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = (y - reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
