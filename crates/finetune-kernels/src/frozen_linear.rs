//! `frozen_linear`: y = x·Wᵀ for a frozen weight W `[out, in]`, whose backward returns dX only.
//!
//! Math: y[t][o] = Σᵢ x[t][i]·W[o][i]; dL/dx = dL/dy·W; no dL/dW, because W is frozen.
//! candle's own matmul backward always computes and stores dL/dW (measured: about 2× the
//! backward time and twice the gradient memory for LoRA training, DESIGN.md), so every frozen
//! projection goes through this op. The CPU forward is the reference (candle's f32 matmul on a
//! copy of the input); the CUDA forward comes with the GPU kernels (a cuda build reports the
//! op as missing rather than computing something else).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The op; holds the weight (f32, dequantized for this use).
pub struct FrozenLinear {
    w: Tensor,
}

impl FrozenLinear {
    /// `w` is `[out, in]`.
    pub fn new(w: Tensor) -> Self {
        Self { w }
    }
}

/// y = x·Wᵀ over the last dimension of `x`, with a gradient for `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1(FrozenLinear::new(w.clone()))
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
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: input not contiguous".into()))?;
        let data = storage.as_slice::<f32>()?[start..end].to_vec();
        let x = Tensor::from_vec(data, layout.shape(), self.w.device())?;
        let y = x.broadcast_matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.broadcast_matmul(&self.w)?))
    }
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
