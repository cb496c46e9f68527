//! `moe_experts`: the routed experts of one MoE layer — gather by expert, gate/up/down grouped
//! GEMMs on the frozen stacked base with each expert's LoRA adapter, SwiGLU, routing weights,
//! combine — as ONE autograd node whose backward is written out by hand (llm.c style) with the
//! same kernels ([`crate::grouped_linear`]'s products, [`crate::swiglu`]'s backward formula,
//! [`crate::moe_permute`]'s gather and sum, each the other's adjoint).
//!
//! Math (rows sorted by expert: slot n holds token t(n) for expert e(n), `offsets` per expert;
//! x `[T, H]`, routing weights w `[T, E]`, W_p `[E, out, in]` frozen, A_p `[E, r, in]`,
//! B_p `[E, out, r]`, scale s; the LoRA path in f32, the rest in x's dtype):
//!   xs = gather(x)                         ha_p = xs₃₂·A_pᵀ (per expert)
//!   g = xs·W_gᵀ + s·ha_g·B_gᵀ,  u likewise,  h = silu(g) ⊙ u
//!   o = h·W_dᵀ + s·ha_d·B_dᵀ,  y = sum(o ⊙ w[t(n), e(n)])   (each token's slots, in slot order)
//! Backward, dy `[T, H]`:
//!   dyw = gather(dy),  q = dyw·W_d,  gd' = s·dyw₃₂·B_d,  ρ = w[t(n), e(n)]
//!   dw[t(n), e(n)] = ⟨q, h⟩ + ⟨gd', ha_d⟩          (= ⟨dyw, o⟩ without o)
//!   dh = ρ·q + (ρ·gd')·A_d,  dA_d = Σ (ρ·gd')ᵀ·h₃₂,  dB_d = s·Σ dyw₃₂ᵀ·(ρ·ha_d)
//!   (dg, du) = swiglu′(g, u, dh)
//!   for p in g, u: hp = s·dp₃₂·B_p,  dA_p = Σ hpᵀ·xs₃₂,  dB_p = s·Σ dp₃₂ᵀ·ha_p
//!   dx = sum(dg·W_g + du·W_u + hg·A_g + hu·A_u)
//! (Σ: per expert over its rows). The forward is the grouped MoE path of finetune-model op for
//! op, so in f32 the two agree to rounding (tested here against the autograd composition of
//! the same kernels, and in finetune-model on whole models).
//!
//! Why: candle's autograd keeps every intermediate of the forward alive until the backward and
//! zero-fills and adds a full-size gradient on every graph edge. What this node keeps for its
//! backward, at the Qwen3-Coder-30B-A3B shape (H 2048, expert width I 768, 128 experts, top-8,
//! r 16) and 4,096 tokens (N = 32,768 slots), bf16 compute:
//! - g and u `[N, I]` in the compute dtype: 2 · 48 MiB = 96 MiB. Kept rather than recomputed:
//!   recomputing them costs two of the three grouped GEMMs (≈ 206 GFLOP) for 96 MiB.
//! - ha_g, ha_u, ha_d `[N, r]` f32: 3 · 2 MiB (only with adapters).
//! - nothing else: x and w are the node's inputs (the graph keeps them anyway: they are the
//!   post-attention norm's and the router's outputs); xs and xs₃₂ (128 + 256 MiB) are
//!   recomputed by a gather and a cast; h (48 MiB) by the element-wise SwiGLU; o (128 MiB) is
//!   not needed at all (dw from q = dyw·W_d, which dh needs anyway).
//!
//! ≈ 102 MiB per layer, where the autograd grouped path keeps ≈ 1.77 GiB: xs 128, xs₃₂ 256,
//! per gate and up projection the base product, the f32 delta and its bf16 cast, the result
//! (48 + 96 + 48 + 48 MiB) and s·B, h 48 and h₃₂ 96, for down the base product 128, the f32
//! delta 256 and its cast 128, o 128, and o ⊙ w 128 MiB. In f32 (casts are free) the same
//! count gives 61.2 KiB per routed row plus the s·B stacks against 6.2 KiB per row; counted on
//! the CPU (finetune-model's `moe_memory` example, heap bytes kept by the graph at a 30B-A3B
//! layer, 64 and 128 tokens) the two paths differ by exactly that: 28 MiB + 54.8 KiB per row.
//!
//! Gradients of the six stacked adapters: a candle CustomOp takes at most three inputs and its
//! backward can only return gradients for those. The node's inputs are x, w and a one-element
//! *carrier* tensor that depends on the six stacks through two carrier nodes (three stacks each)
//! and a join ([`crate::carrier`]); the expert node's backward computes the six gradients and
//! posts them to a mailbox shared with the carriers, whose backward (candle runs it after the
//! node's: the carriers are its inputs) hands each stack its gradient. The stacks then get
//! exactly one gradient each, as they do on the autograd path, without copying them into one
//! packed input.
//!
//! Device-generic: every step is a tensor op or one of the kernels (CPU reference or CUDA); the
//! node's own forward runs `sum_rows` on the storage of the weighted rows. In bf16 it runs on
//! the CPU as on the GPU (every kernel's CPU reference takes bf16, f32 arithmetic, one
//! rounding per output), so CPU bf16 runs need not fall back to the per-expert path.

use crate::carrier::{carry, Mailbox};
use crate::grouped_linear::{grouped_product, Kind};
use crate::moe_permute::{gather_rows, sum_rows, Permutation, SumRows};
use crate::saved::SavedBytes;
use crate::swiglu::{swiglu_backward, Swiglu};
use crate::WeightFn;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};
use std::sync::{Arc, Mutex};

/// A frozen expert stack `[E, out, in]`, materialized (e.g. dequantized from FP8) by the op for
/// each product that needs it and dropped after it.
#[derive(Clone)]
pub struct FrozenStack {
    weight: WeightFn,
    dims: (usize, usize, usize),
}

impl FrozenStack {
    /// `weight` must return a tensor of `dims` = (E, out, in) in the activations' dtype.
    pub fn new(weight: WeightFn, dims: (usize, usize, usize)) -> Self {
        Self { weight, dims }
    }

    fn materialize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let w = (self.weight)()?;
        let (e, o, i) = self.dims;
        if w.dims() != [e, o, i] || w.dtype() != dtype {
            candle_core::bail!(
                "moe-experts: an expert stack came out {:?} {:?}, expected {:?} {dtype:?}",
                w.dims(),
                w.dtype(),
                [e, o, i]
            );
        }
        w.contiguous()
    }
}

/// The frozen gate, up and down stacks of one layer.
#[derive(Clone)]
pub struct ExpertStacks {
    pub gate: FrozenStack,
    pub up: FrozenStack,
    pub down: FrozenStack,
}

/// The stacked adapters (A `[E, r, in]`, B `[E, out, r]`, f32) of gate, up and down and the
/// scale s; gradients flow to these tensors (usually the adapter's own variables).
pub struct StackedAdapters {
    pub gate: (Tensor, Tensor),
    pub up: (Tensor, Tensor),
    pub down: (Tensor, Tensor),
    pub scale: f64,
}

/// Which slots run which expert for which token.
pub struct Routing {
    perm: Arc<Permutation>,
    offsets: Arc<Vec<usize>>,
    /// Per slot, its entry t·E + e of the flattened routing weights `[N]`.
    pick: Tensor,
    /// Per entry t·E + e, its slot, or N for a pair not routed (reads an appended zero) `[T·E]`.
    slot_of: Tensor,
    tokens: usize,
    experts: usize,
}

impl Routing {
    /// From the tokens of each expert (`routed[e]`, each token index < `tokens`; a token may
    /// appear under several experts, at most once under each).
    pub fn new(routed: &[Vec<u32>], tokens: usize, device: &Device) -> candle_core::Result<Self> {
        let experts = routed.len();
        let mut offsets = Vec::with_capacity(experts + 1);
        offsets.push(0);
        let (mut rows, mut pick) = (Vec::new(), Vec::new());
        for (e, toks) in routed.iter().enumerate() {
            rows.extend_from_slice(toks);
            pick.extend(toks.iter().map(|&t| t as usize * experts + e));
            offsets.push(rows.len());
        }
        let n = rows.len();
        let mut slot_of = vec![n as u32; tokens * experts];
        for (slot, &entry) in pick.iter().enumerate() {
            if entry >= slot_of.len() || slot_of[entry] != n as u32 {
                candle_core::bail!(
                    "moe-experts: routing entry {entry} (token·{experts} + expert) is out of range or repeated"
                );
            }
            slot_of[entry] = slot as u32;
        }
        let pick: Vec<u32> = pick.into_iter().map(|p| p as u32).collect();
        Ok(Self {
            perm: Arc::new(Permutation::new(rows, tokens, device)?),
            offsets: Arc::new(offsets),
            pick: Tensor::new(pick.as_slice(), device)?,
            slot_of: Tensor::new(slot_of.as_slice(), device)?,
            tokens,
            experts,
        })
    }

    /// Slots N (tokens × experts per token).
    pub fn slots(&self) -> usize {
        self.perm.slots()
    }

    /// The routing weight of each slot, `[N, 1]` (w `[T, E]`).
    fn slot_weights(&self, w: &Tensor) -> candle_core::Result<Tensor> {
        w.flatten_all()?.index_select(&self.pick, 0)?.unsqueeze(1)
    }
}

/// y `[T, H]` = the routed experts' SwiGLU outputs (with their adapters when `lora` is given)
/// weighted by `weights` `[T, E]` (zero off each token's experts) and summed per token;
/// differentiable in x, in `weights` and in the six tensors of `lora`, with the backward of
/// the module doc. x f32 or bf16 (the stacks' dtype once materialized), the adapters f32.
pub fn moe_experts(
    x: &Tensor,
    weights: &Tensor,
    routing: &Arc<Routing>,
    base: &ExpertStacks,
    lora: Option<&StackedAdapters>,
) -> candle_core::Result<Tensor> {
    let (t, h) = x.dims2()?;
    if weights.dims() != [routing.tokens, routing.experts] || t != routing.tokens {
        candle_core::bail!(
            "moe-experts: x {:?}, weights {:?} for a routing of {} tokens over {} experts",
            x.dims(),
            weights.dims(),
            routing.tokens,
            routing.experts
        );
    }
    let e = routing.experts;
    let (gd, ud, dd) = (base.gate.dims, base.up.dims, base.down.dims);
    if gd.0 != e || gd != ud || gd.2 != h || dd != (e, h, gd.1) {
        candle_core::bail!(
            "moe-experts: stacks gate {gd:?}, up {ud:?}, down {dd:?} for {e} experts of hidden size {h}"
        );
    }
    if let Some(l) = lora {
        let (i, r) = (gd.1, l.gate.0.dim(1)?);
        for (what, t, want) in [
            ("gate A", &l.gate.0, [e, r, h]),
            ("gate B", &l.gate.1, [e, i, r]),
            ("up A", &l.up.0, [e, r, h]),
            ("up B", &l.up.1, [e, i, r]),
            ("down A", &l.down.0, [e, r, i]),
            ("down B", &l.down.1, [e, h, r]),
        ] {
            if t.dims() != want || t.dtype() != DType::F32 {
                candle_core::bail!(
                    "moe-experts: adapter {what} is {:?} {:?}, expected {want:?} f32",
                    t.dims(),
                    t.dtype()
                );
            }
        }
    }
    let adapters = lora.map(|l| Adapters {
        ab: [&l.gate, &l.up, &l.down].map(|(a, b)| (a.detach(), b.detach())),
        scale: l.scale,
    });
    let mut op = MoeExperts {
        routing: routing.clone(),
        base: [base.gate.clone(), base.up.clone(), base.down.clone()],
        lora: adapters,
        pending: Mutex::new(None),
        saved: Mutex::new(None),
        mailbox: Mailbox::new("moe-experts"),
    };
    let trained = x.track_op()
        || weights.track_op()
        || lora.is_some_and(|l| {
            [&l.gate, &l.up, &l.down]
                .iter()
                .any(|(a, b)| a.track_op() || b.track_op())
        });
    let (yw, saved) = op.forward(&x.detach(), &weights.detach())?;
    op.pending = Mutex::new(Some(yw));
    // Nothing to differentiate (inference): keep nothing.
    op.saved = Mutex::new(trained.then_some(saved));
    match lora {
        Some(l) => {
            let carrier = carry(
                &[&l.gate.0, &l.gate.1, &l.up.0, &l.up.1, &l.down.0, &l.down.1],
                &op.mailbox,
            )?;
            x.apply_op3(weights, &carrier, op)
        }
        None => x.apply_op2(weights, op),
    }
}

/// The adapters as the op holds them (detached: the op reads their values; their gradients
/// travel through the carriers).
struct Adapters {
    ab: [(Tensor, Tensor); 3],
    scale: f64,
}

/// What the backward needs besides the node's inputs (module doc: the memory math).
struct Saved {
    g: Tensor,
    u: Tensor,
    /// ha_g, ha_u, ha_d (with adapters).
    ha: Option<[Tensor; 3]>,
    /// Their bytes, in `crate::saved::held_bytes` while kept.
    _held: SavedBytes,
}

struct MoeExperts {
    routing: Arc<Routing>,
    base: [FrozenStack; 3],
    lora: Option<Adapters>,
    /// The weighted rows o ⊙ w, computed before the node is made; its forward sums them.
    pending: Mutex<Option<Tensor>>,
    saved: Mutex<Option<Saved>>,
    mailbox: Arc<Mailbox>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MoeExperts {
    fn offsets(&self) -> &Arc<Vec<usize>> {
        &self.routing.offsets
    }

    /// Projection `p` (0 gate, 1 up, 2 down) of the rows `x` (`x32`: the same in f32, with
    /// adapters): x·W_pᵀ + s·(x₃₂·A_pᵀ)·B_pᵀ, and ha = x₃₂·A_pᵀ.
    fn project(
        &self,
        p: usize,
        x: &Tensor,
        x32: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let y = {
            let w = self.base[p].materialize(x.dtype())?;
            grouped_product(Kind::Forward, x, &w, self.offsets())?
        };
        let (Some(l), Some(x32)) = (&self.lora, x32) else {
            return Ok((y, None));
        };
        let (a, b) = &l.ab[p];
        let ha = grouped_product(Kind::Forward, x32, a, self.offsets())?;
        // s on the small B, as the autograd grouped path does.
        let delta = grouped_product(Kind::Forward, &ha, &(b * l.scale)?, self.offsets())?;
        let dtype = y.dtype();
        Ok(((y + delta.to_dtype(dtype)?)?, Some(ha)))
    }

    /// The weighted rows o ⊙ w `[N, H]` and what the backward keeps.
    fn forward(&self, x: &Tensor, weights: &Tensor) -> candle_core::Result<(Tensor, Saved)> {
        let xs = gather_rows(x, &self.routing.perm)?;
        let xs32 = match self.lora {
            Some(_) => Some(xs.to_dtype(DType::F32)?),
            None => None,
        };
        let (g, ha_g) = self.project(0, &xs, xs32.as_ref())?;
        let (u, ha_u) = self.project(1, &xs, xs32.as_ref())?;
        drop((xs, xs32));
        let h = g.apply_op2_no_bwd(&u, &Swiglu)?;
        let h32 = match self.lora {
            Some(_) => Some(h.to_dtype(DType::F32)?),
            None => None,
        };
        let (o, ha_d) = self.project(2, &h, h32.as_ref())?;
        let yw = o.broadcast_mul(&self.routing.slot_weights(weights)?)?;
        let ha = match (ha_g, ha_u, ha_d) {
            (Some(a), Some(b), Some(c)) => Some([a, b, c]),
            _ => None,
        };
        let _held = SavedBytes::of([&g, &u].into_iter().chain(ha.iter().flatten()));
        Ok((yw, Saved { g, u, ha, _held }))
    }

    /// The node's output from the pending weighted rows: `sum_rows` on their storage.
    fn take_pending(&self) -> candle_core::Result<Tensor> {
        lock(&self.pending)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("moe-experts: forward ran twice".into()))
    }

    /// dx `[T, H]` and d(weights) `[T, E]`; the six adapter gradients go to the mailbox.
    fn backward(
        &self,
        x: &Tensor,
        weights: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let Saved { g, u, ha, .. } = lock(&self.saved).take().ok_or_else(|| {
            candle_core::Error::Msg(
                "moe-experts: no saved activations (backward ran twice, or the forward was not differentiable)"
                    .into(),
            )
        })?;
        let (x, weights) = (x.detach(), weights.detach());
        let dtype = x.dtype();
        let off = self.offsets();
        let perm = &self.routing.perm;
        let rho = self.routing.slot_weights(&weights)?; // [N, 1]
        let dyw = gather_rows(&dy.to_dtype(dtype)?, perm)?;
        let h = g.apply_op2_no_bwd(&u, &Swiglu)?;
        let h32 = h.to_dtype(DType::F32)?;
        // Down: q = dyw·W_d serves both dh and dw.
        let q = {
            let w = self.base[2].materialize(dtype)?;
            grouped_product(Kind::InputGrad, &dyw, &w, off)?
        };
        let mut dw_slot = (q.to_dtype(DType::F32)? * &h32)?.sum(1)?; // [N]
        let mut dh = q.broadcast_mul(&rho)?;
        drop(q);
        let adapters = self.lora.as_ref().zip(ha.as_ref());
        let mut down_grads = None;
        if let Some((l, [_, _, ha_d])) = adapters {
            let s = l.scale;
            let rho32 = rho.to_dtype(DType::F32)?;
            let dyw32 = dyw.to_dtype(DType::F32)?;
            let (ad, bd) = &l.ab[2];
            let gdp = grouped_product(Kind::InputGrad, &dyw32, &(bd * s)?, off)?; // [N, r]
            dw_slot = (dw_slot + (&gdp * ha_d)?.sum(1)?)?;
            let gd = gdp.broadcast_mul(&rho32)?;
            let d_ad = grouped_product(Kind::WeightGrad, &gd, &h32, off)?;
            let rho_ha = ha_d.broadcast_mul(&rho32)?;
            let d_bd = (grouped_product(Kind::WeightGrad, &dyw32, &rho_ha, off)? * s)?;
            dh = (dh + grouped_product(Kind::InputGrad, &gd, ad, off)?.to_dtype(dtype)?)?;
            down_grads = Some((d_ad, d_bd));
        }
        drop((dyw, h, h32));
        let (dg, du) = swiglu_backward(&g, &u, &dh)?;
        drop((g, u, dh));
        let mut dxs = self.base_input_grad(&dg, &du)?;
        if let (Some((l, [ha_g, ha_u, _])), Some((d_ad, d_bd))) = (adapters, down_grads) {
            let s = l.scale;
            // Gate and up read the same rows: their adapters' dx summed in f32 first.
            let xs32 = gather_rows(&x, perm)?.to_dtype(DType::F32)?;
            let mut grads = Vec::with_capacity(6);
            let mut dx32: Option<Tensor> = None;
            for (p, d, ha) in [(0, &dg, ha_g), (1, &du, ha_u)] {
                let (a, b) = &l.ab[p];
                let d32 = d.to_dtype(DType::F32)?;
                let hp = grouped_product(Kind::InputGrad, &d32, &(b * s)?, off)?; // [N, r]
                grads.push(grouped_product(Kind::WeightGrad, &hp, &xs32, off)?);
                grads.push((grouped_product(Kind::WeightGrad, &d32, ha, off)? * s)?);
                let part = grouped_product(Kind::InputGrad, &hp, a, off)?;
                dx32 = Some(match dx32 {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
            grads.extend([d_ad, d_bd]);
            if let Some(dx32) = dx32 {
                dxs = (dxs + dx32.to_dtype(dtype)?)?;
            }
            self.mailbox.post(grads)?;
        }
        Ok((
            sum_rows(&dxs, perm)?,
            self.weights_grad(&dw_slot, &weights)?,
        ))
    }

    /// dg·W_g + du·W_u (each stack materialized for its product only).
    fn base_input_grad(&self, dg: &Tensor, du: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = dg.dtype();
        let from_gate = {
            let w = self.base[0].materialize(dtype)?;
            grouped_product(Kind::InputGrad, dg, &w, self.offsets())?
        };
        let w = self.base[1].materialize(dtype)?;
        from_gate + grouped_product(Kind::InputGrad, du, &w, self.offsets())?
    }

    /// The slots' routing-weight gradients `[N]` placed at their (token, expert) entries of a
    /// `[T, E]` gradient (zero elsewhere): a gather through the inverse index, not a scatter.
    fn weights_grad(&self, dw_slot: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
        let zero = Tensor::zeros(1, weights.dtype(), weights.device())?;
        Tensor::cat(&[&dw_slot.to_dtype(weights.dtype())?, &zero], 0)?
            .index_select(&self.routing.slot_of, 0)?
            .reshape(weights.shape())
    }
}

/// The node's forward on any backend: `sum_rows` of the pending weighted rows, whose storage
/// is `S` on this device.
fn combine<S, F>(op: &MoeExperts, pick: F) -> candle_core::Result<(S, Shape)>
where
    F: FnOnce(&Storage, &Layout, &SumRows) -> candle_core::Result<(S, Shape)>,
{
    let yw = op.take_pending()?;
    let (storage, layout) = yw.storage_and_layout();
    pick(&storage, layout, &SumRows(op.routing.perm.clone()))
}

fn cpu_combine(op: &MoeExperts) -> candle_core::Result<(CpuStorage, Shape)> {
    combine(op, |s, l, sum| match s {
        Storage::Cpu(s) => sum.cpu_fwd(s, l),
        _ => candle_core::bail!("moe-experts: the rows are not on the CPU"),
    })
}

#[cfg(feature = "cuda")]
fn cuda_combine(op: &MoeExperts) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    combine(op, |s, l, sum| match s {
        Storage::Cuda(s) => sum.cuda_fwd(s, l),
        _ => candle_core::bail!("moe-experts: the rows are not on the GPU"),
    })
}

/// Without adapters: the node over (x, weights).
impl CustomOp2 for MoeExperts {
    fn name(&self) -> &'static str {
        "moe-experts"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_combine(self)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_combine(self)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weights: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.backward(x, weights, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// With adapters: the node over (x, weights, carrier of the six stacks).
impl CustomOp3 for MoeExperts {
    fn name(&self) -> &'static str {
        "moe-experts"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_combine(self)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_combine(self)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weights: &Tensor,
        carrier: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.backward(x, weights, dy)?;
        // The carrier must receive a gradient, or candle would not run the carriers' backward.
        Ok((Some(dx), Some(dw), Some(carrier.zeros_like()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use crate::grouped_linear::grouped_linear;
    use candle_core::Var;

    const T: usize = 7;
    const E: usize = 5;
    const H: usize = 12;
    const I: usize = 10;
    const R: usize = 3;
    const S: f64 = 1.75;

    /// Top-2 of 5 experts for 7 tokens; expert 3 gets no token.
    fn routed() -> Vec<Vec<u32>> {
        let mut routed = vec![Vec::new(); E];
        for t in 0..T as u32 {
            for e in [
                (t % 3) as usize,
                if t % 2 == 0 { 4 } else { (t as usize + 1) % 3 },
            ] {
                routed[e].push(t);
            }
        }
        assert!(routed[3].is_empty() && routed.iter().map(Vec::len).sum::<usize>() == 2 * T);
        routed
    }

    /// Routing weights `[T, E]`: positive on each token's experts, zero elsewhere.
    fn weights(routed: &[Vec<u32>]) -> Tensor {
        let raw = tensor(&[T, E], 71).abs().unwrap().to_vec2::<f32>().unwrap();
        let mut w = vec![0f32; T * E];
        for (e, toks) in routed.iter().enumerate() {
            for &t in toks {
                w[t as usize * E + e] = 0.1 + raw[t as usize][e];
            }
        }
        Tensor::from_vec(w, (T, E), &Device::Cpu).unwrap()
    }

    struct Case {
        x: Var,
        w: Var,
        stacks: [Tensor; 3],
        lora: [Var; 6],
        upstream: Tensor,
        routed: Vec<Vec<u32>>,
    }

    fn case() -> Case {
        let routed = routed();
        let v = |shape: &[usize], salt| Var::from_tensor(&(tensor(shape, salt) * 0.3).unwrap());
        Case {
            x: v(&[T, H], 1).unwrap(),
            w: Var::from_tensor(&weights(&routed)).unwrap(),
            stacks: [
                (tensor(&[E, I, H], 2) * 0.2).unwrap(),
                (tensor(&[E, I, H], 3) * 0.2).unwrap(),
                (tensor(&[E, H, I], 4) * 0.2).unwrap(),
            ],
            lora: [
                v(&[E, R, H], 5).unwrap(),
                v(&[E, I, R], 6).unwrap(),
                v(&[E, R, H], 7).unwrap(),
                v(&[E, I, R], 8).unwrap(),
                v(&[E, R, I], 9).unwrap(),
                v(&[E, H, R], 10).unwrap(),
            ],
            upstream: tensor(&[T, H], 11),
            routed,
        }
    }

    /// Frozen stacks that hand out these tensors (gate, up, down).
    fn base_of(stacks: &[Tensor; 3]) -> ExpertStacks {
        let stack = |t: &Tensor| {
            let (t, dims) = (t.clone(), t.dims3().unwrap());
            FrozenStack::new(Arc::new(move || Ok(t.clone())), dims)
        };
        ExpertStacks {
            gate: stack(&stacks[0]),
            up: stack(&stacks[1]),
            down: stack(&stacks[2]),
        }
    }

    /// The same computation as candle autograd over the same kernels: finetune-model's grouped
    /// MoE path, op for op.
    fn reference(c: &Case, with_lora: bool) -> Tensor {
        let mut rows = Vec::new();
        let mut offsets = vec![0];
        let mut pick = Vec::new();
        for (e, toks) in c.routed.iter().enumerate() {
            rows.extend_from_slice(toks);
            pick.extend(toks.iter().map(|&t| t * E as u32 + e as u32));
            offsets.push(rows.len());
        }
        let offsets = Arc::new(offsets);
        let perm = Arc::new(Permutation::new(rows, T, &Device::Cpu).unwrap());
        let xs = gather_rows(c.x.as_tensor(), &perm).unwrap();
        let xs32 = xs.to_dtype(DType::F32).unwrap();
        let project = |x: &Tensor, p: usize| {
            let y = grouped_linear(x, &c.stacks[p], &offsets, false).unwrap();
            if !with_lora {
                return y;
            }
            let (a, b) = (c.lora[2 * p].as_tensor(), c.lora[2 * p + 1].as_tensor());
            let ha = grouped_linear(x, a, &offsets, true).unwrap();
            let delta = grouped_linear(&ha, &(b * S).unwrap(), &offsets, true).unwrap();
            (y + delta).unwrap()
        };
        let g = project(&xs32, 0);
        let u = project(&xs32, 1);
        let h = crate::swiglu(&g, &u).unwrap();
        let o = project(&h, 2);
        let pick = Tensor::new(pick.as_slice(), &Device::Cpu).unwrap();
        let rw =
            c.w.flatten_all()
                .unwrap()
                .index_select(&pick, 0)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
        sum_rows(&o.broadcast_mul(&rw).unwrap(), &perm).unwrap()
    }

    fn ours(c: &Case, with_lora: bool) -> Tensor {
        let routing = Arc::new(Routing::new(&c.routed, T, &Device::Cpu).unwrap());
        let base = base_of(&c.stacks);
        let l = |i: usize| c.lora[i].as_tensor().clone();
        let adapters = StackedAdapters {
            gate: (l(0), l(1)),
            up: (l(2), l(3)),
            down: (l(4), l(5)),
            scale: S,
        };
        moe_experts(
            c.x.as_tensor(),
            c.w.as_tensor(),
            &routing,
            &base,
            with_lora.then_some(&adapters),
        )
        .unwrap()
    }

    /// Output and gradients (x, routing weights, the six stacks) of [`moe_experts`] for the
    /// case's values on `device` in `dtype` (x, weights and stacks; adapters f32), as f32 CPU
    /// tensors.
    fn ours_on(c: &Case, device: &Device, dtype: DType) -> Vec<Tensor> {
        let on = |t: &Tensor, dt: DType| t.to_dtype(dt).unwrap().to_device(device).unwrap();
        let x = Var::from_tensor(&on(c.x.as_tensor(), dtype)).unwrap();
        let w = Var::from_tensor(&on(c.w.as_tensor(), dtype)).unwrap();
        let lora: Vec<Var> = c
            .lora
            .iter()
            .map(|v| Var::from_tensor(&on(v.as_tensor(), DType::F32)).unwrap())
            .collect();
        let routing = Arc::new(Routing::new(&c.routed, T, device).unwrap());
        let base = base_of(&c.stacks.clone().map(|t| on(&t, dtype)));
        let l = |i: usize| lora[i].as_tensor().clone();
        let adapters = StackedAdapters {
            gate: (l(0), l(1)),
            up: (l(2), l(3)),
            down: (l(4), l(5)),
            scale: S,
        };
        let y = moe_experts(
            x.as_tensor(),
            w.as_tensor(),
            &routing,
            &base,
            Some(&adapters),
        )
        .unwrap();
        let grads = (y.to_dtype(DType::F32).unwrap() * on(&c.upstream, DType::F32))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let host = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        let mut out = vec![host(&y)];
        out.extend(
            [x.as_tensor(), w.as_tensor()]
                .into_iter()
                .chain(lora.iter().map(|v| v.as_tensor()))
                .map(|t| host(grads.get(t).unwrap())),
        );
        out
    }

    /// On the GPU (f32 and bf16) the node gives the CPU's output and gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference() {
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let c = case();
        let want = ours_on(&c, &Device::Cpu, DType::F32);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            let got = ours_on(&c, &gpu, dtype);
            let names = [
                "y", "dx", "dw", "dA_g", "dB_g", "dA_u", "dB_u", "dA_d", "dB_d",
            ];
            let d: Vec<f32> = got.iter().zip(&want).map(|(g, w)| rel_diff(g, w)).collect();
            eprintln!(
                "moe-experts cuda {dtype:?}: {:?}",
                names.iter().zip(&d).collect::<Vec<_>>()
            );
            for (n, d) in names.iter().zip(&d) {
                assert!(*d < tol, "{dtype:?} {n}: {d}");
            }
        }
    }

    /// bf16 on the CPU (the per-kernel CPU references in bf16: gather/sum, grouped products,
    /// SwiGLU): output and every gradient within the CUDA bf16 test's tolerance of the f32
    /// node, and not equal to it (bf16 really computed). Not exact: the node rounds g, u, h, o
    /// and its backward's intermediates to bf16 where the f32 node keeps f32.
    #[test]
    fn bf16_on_the_cpu_is_within_bf16_precision_of_f32() {
        let c = case();
        let want = ours_on(&c, &Device::Cpu, DType::F32);
        let got = ours_on(&c, &Device::Cpu, DType::BF16);
        let names = [
            "y", "dx", "dw", "dA_g", "dB_g", "dA_u", "dB_u", "dA_d", "dB_d",
        ];
        let d: Vec<f32> = got.iter().zip(&want).map(|(g, w)| rel_diff(g, w)).collect();
        eprintln!(
            "moe-experts cpu bf16 vs f32: {:?}",
            names.iter().zip(&d).collect::<Vec<_>>()
        );
        for (n, d) in names.iter().zip(&d) {
            assert!(*d < 3e-2, "{n}: {d}");
        }
        assert!(d[0] > 0.0 && d[1] > 0.0, "bf16 equals f32: {d:?}");
    }

    /// Output, dx, d(routing weights) and the six adapter gradients equal candle autograd's over
    /// the same kernels (an expert without tokens included), with and without adapters.
    #[test]
    fn output_and_every_gradient_equal_autograd() {
        for with_lora in [true, false] {
            let c = case();
            let (y, want) = (ours(&c, with_lora), reference(&c, with_lora));
            let d = rel_diff(&y, &want);
            assert!(d < 1e-6, "lora {with_lora}: y {d}");
            let grads = |y: &Tensor| {
                (y * &c.upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (got, exp) = (grads(&y), grads(&want));
            let mut checked = vec![("x", c.x.as_tensor()), ("w", c.w.as_tensor())];
            if with_lora {
                let names = ["gate A", "gate B", "up A", "up B", "down A", "down B"];
                checked.extend(names.iter().zip(&c.lora).map(|(n, v)| (*n, v.as_tensor())));
            }
            for (what, t) in checked {
                let (g, e) = (got.get(t).unwrap(), exp.get(t).unwrap());
                let d = rel_diff(g, e);
                assert!(d < 1e-5, "lora {with_lora}: d{what} differs by {d}");
                let max = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(max > 0.0, "lora {with_lora}: d{what} is zero");
            }
            for v in &c.lora {
                assert_eq!(got.get(v.as_tensor()).is_some(), with_lora);
            }
            // The expert without tokens: zero adapter gradients; the weights' gradient is zero
            // off each token's experts.
            if with_lora {
                for v in &c.lora {
                    let g3 = got.get(v.as_tensor()).unwrap().get(3).unwrap();
                    let m = g3
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert_eq!(m, 0.0);
                }
            }
            let dw = got.get(c.w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let w = c.w.as_tensor().to_vec2::<f32>().unwrap();
            for (dr, wr) in dw.iter().zip(&w) {
                for (d, w) in dr.iter().zip(wr) {
                    assert!(*w != 0.0 || *d == 0.0, "gradient {d} off the top-k");
                }
            }
        }
    }

    /// Without anything to differentiate the node keeps nothing, and a backward through a
    /// node whose inputs are constants is never asked for; a bad stack is refused by name.
    #[test]
    fn constants_keep_nothing_and_bad_shapes_are_refused() {
        let c = case();
        let routing = Arc::new(Routing::new(&c.routed, T, &Device::Cpu).unwrap());
        let base = base_of(&c.stacks);
        let stack = |t: &Tensor| base_of(&[t.clone(), t.clone(), t.clone()]).gate;
        let (x, w) = (c.x.as_tensor().detach(), c.w.as_tensor().detach());
        let y = moe_experts(&x, &w, &routing, &base, None).unwrap();
        assert!(!y.track_op());
        let want = reference(&c, false);
        assert!(rel_diff(&y, &want) < 1e-6);
        let bad = ExpertStacks {
            down: stack(&c.stacks[0]),
            ..base.clone()
        };
        let err = moe_experts(&x, &w, &routing, &bad, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("down"), "{err}");
        let err = Routing::new(&[vec![0, 0]], 2, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("repeated"), "{err}");
    }
}
