//! AdamW with decoupled weight decay on f32 master parameters, and global-norm clipping, in
//! PyTorch's operation order (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_) so that f32
//! trajectories agree step for step.
//!
//! At step t (1-based) with gradient g, for each parameter p with moments m, v:
//!   p ← p · (1 − lr·wd)
//!   m ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²
//!   p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! Clipping: n = ‖(g₁, …, gₖ)‖₂ over all gradients; every g ← g · min(1, max_norm / (n + 10⁻⁶)).
//! As in PyTorch, a parameter without a gradient at a step is skipped: neither it nor its
//! moments change, and t counts that parameter's own updates (the trainer gives every adapter
//! a gradient, zeros for an expert no token was routed to, so all counts stay equal).
//!
//! Every operation is per element, with t the same for all elements of a tensor: AdamW on the
//! stacked `[E, …]` tensor of a MoE layer's expert adapters is AdamW on each expert's slice
//! (the experts of a stack are updated together, so their t agree), bit for bit.

use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except weight decay, which LoRA recipes usually set to 0.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer: f32 moments per parameter.
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates of each parameter (t in the bias corrections).
    t: Vec<u64>,
    step: u64,
}

impl AdamW {
    /// Parameters must be f32 (the master copy, whatever the compute dtype).
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        for p in &params {
            if p.dtype() != DType::F32 {
                candle_core::bail!(
                    "AdamW keeps f32 master weights; got a {:?} parameter",
                    p.dtype()
                );
            }
        }
        let m = params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<_>>()?;
        let v = params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<_>>()?;
        let t = vec![0; params.len()];
        Ok(Self {
            config,
            params,
            m,
            v,
            t,
            step: 0,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The state a checkpoint keeps: first and second moments, and each parameter's update
    /// count.
    pub fn state(&self) -> (&[Tensor], &[Tensor], &[u64]) {
        (&self.m, &self.v, &self.t)
    }

    /// Restores a state from [`Self::state`] (shapes must match the parameters), after
    /// `steps` optimizer steps.
    pub fn set_state(
        &mut self,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
        t: Vec<u64>,
        steps: u64,
    ) -> Result<()> {
        if m.len() != self.params.len()
            || v.len() != self.params.len()
            || t.len() != self.params.len()
        {
            candle_core::bail!(
                "optimizer state for {} parameters, expected {}",
                m.len(),
                self.params.len()
            );
        }
        for (i, p) in self.params.iter().enumerate() {
            if m[i].dims() != p.dims() || v[i].dims() != p.dims() {
                candle_core::bail!(
                    "optimizer state {i} is {:?}, parameter is {:?}",
                    m[i].dims(),
                    p.dims()
                );
            }
        }
        (self.m, self.v, self.t, self.step) = (m, v, t, steps);
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to the i-th parameter, `None`
    /// when it got no gradient this step.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let c = self.config;
        if self.params.first().is_some_and(|p| p.device().is_cuda()) {
            return self.fused_step(grads, lr);
        }
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            self.t[i] += 1;
            let t = self.t[i] as i32;
            let bias1 = 1.0 - c.beta1.powi(t);
            let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
            let p = &self.params[i];
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (self.m[i].div(&denom)? * (lr / bias1))?;
            p.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

impl AdamW {
    /// [`Self::step`] on the GPU: finetune-kernels' multi-tensor `adamw_step`, one launch for
    /// every parameter instead of ~10 element-wise ops each (a MoE adapter has thousands of
    /// tensors); bit for bit the same update (crates/finetune-train/tests/adamw_multi.rs, and
    /// the kernel's own GPU test). The moments become variables once so that the kernel
    /// updates them in place.
    fn fused_step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = self.config;
        let mut moments = Vec::new();
        for (i, g) in grads.iter().enumerate() {
            if g.is_none() {
                continue;
            }
            self.t[i] += 1;
            // A no-op when the moment is already a variable (every step after the first).
            let (m, v) = (Var::from_tensor(&self.m[i])?, Var::from_tensor(&self.v[i])?);
            self.m[i] = m.as_tensor().clone();
            self.v[i] = v.as_tensor().clone();
            moments.push((i, m, v));
        }
        let batch: Vec<finetune_kernels::AdamWTensor> = moments
            .iter()
            .map(|(i, m, v)| finetune_kernels::AdamWTensor {
                param: &self.params[*i],
                m,
                v,
                grad: grads[*i].as_ref().expect("only parameters with a gradient"),
                t: self.t[*i],
            })
            .collect();
        finetune_kernels::adamw_step(
            &batch,
            &finetune_kernels::AdamWHyper {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
            },
        )
    }
}

/// Scales the present `grads` in place so that their global 2-norm is at most `max_norm`;
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    // Per-tensor sums of squares on the device, read back together (one transfer, not one
    // device sync per tensor), then added in f64 in order. A stacked expert adapter's gradient
    // (`[E, …, …]`, the only rank-3 parameters) gives one f32 sum per expert, as when each
    // expert was its own tensor, so the norm does not depend on the storage.
    let sums: Vec<Tensor> = grads
        .iter()
        .flatten()
        .map(per_slice_sq_sums)
        .collect::<Result<_>>()?;
    let sum: f64 = if sums.is_empty() {
        0.0
    } else {
        Tensor::cat(&sums, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .sum()
    };
    let norm = sum.sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Sums of squares of `g`: one per slice of the first dimension for a rank-3 tensor (a stack
/// of experts' adapters), else one for the whole tensor; a 1-D tensor either way.
pub fn per_slice_sq_sums(g: &Tensor) -> Result<Tensor> {
    let sq = g.sqr()?;
    if g.rank() == 3 {
        // [E, n] and a reduction over the contiguous last dimension (candle's fast path).
        let e = g.dim(0)?;
        sq.reshape((e, g.elem_count() / e.max(1)))?.sum(1)
    } else {
        sq.sum_all()?.reshape(1)
    }
}
