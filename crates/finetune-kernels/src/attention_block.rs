//! `attention_block`: the attention half of a Qwen3-MoE decoder layer — input RMSNorm, q/k/v
//! projections on the frozen base with each one's LoRA adapter, per-head q/k RMSNorm, RoPE,
//! causal GQA attention over packed documents, o_proj with its adapter, the residual add — as
//! ONE autograd node whose backward is written out by hand (llm.c style) with the same kernels
//! ([`crate::rms_norm`]'s forward and backward ops, [`crate::rope`] and its transpose,
//! [`crate::attention`]'s forward and backward, candle matmuls). The MoE half's counterpart is
//! [`crate::moe_experts`]; this module follows it.
//!
//! Math (x `[T, D]`, W_p `[out_p, in_p]` frozen, A_p `[r, in_p]`, B_p `[out_p, r]`, scale s,
//! for p in q, k, v, o; the LoRA path in f32, the rest in x's dtype; a projection without an
//! adapter drops its LoRA terms):
//!   n = rmsnorm(x, w_in)                      lin_p(z) = z·W_pᵀ + s·ha_p·B_pᵀ, ha_p = z₃₂·A_pᵀ
//!   q = lin_q(n) `[T, H, d]`, k = lin_k(n), v = lin_v(n) `[T, G, d]`
//!   q̂ = rope(rmsnorm(q, w_qn)),  k̂ = rope(rmsnorm(k, w_kn))   (per head, over d)
//!   o = attention(q̂, k̂, v) `[T, H·d]` (per-document causal GQA, row logsumexps lse)
//!   h = x + lin_o(o)
//! Backward, dh `[T, D]`:
//!   do = dh·W_o + (s·dh₃₂·B_o)·A_o,  dA_o = (s·dh₃₂·B_o)ᵀ·o₃₂,  dB_o = s·dh₃₂ᵀ·ha_o
//!   (dq̂, dk̂, dv) = attention′(q̂, k̂, v, o, lse, do)   (flash-attention backward from lse)
//!   dq = rmsnorm′(q, w_qn, ropeᵀ(dq̂)),  dk = rmsnorm′(k, w_kn, ropeᵀ(dk̂))
//!   for p in q, k, v: g_p = s·dp₃₂·B_p,  dA_p = g_pᵀ·n₃₂,  dB_p = s·dp₃₂ᵀ·ha_p
//!   dn = Σ_p dp·W_p + Σ_p g_p·A_p,  dx = dh + rmsnorm′(x, w_in, dn)
//! with rmsnorm′ the fused op's backward (r = 1/rms(x): dxᵢ = r·dyᵢ·wᵢ − xᵢ·r³·Σⱼ dyⱼwⱼxⱼ / D)
//! and ropeᵀ the transposed rotation. The forward is finetune-model's attention chain op for
//! op, so in f32 the two agree to rounding (tested here against the autograd composition of
//! the same kernels, and in finetune-model on whole models).
//!
//! Why the residual add is inside: the node's own forward is that add (on the storages of x
//! and of lin_o(o), computed before the node is made), so lin_o(o) `[T, D]` is a temporary. An
//! add node after the block would keep it alive until the backward as its operand (candle's
//! graph holds every op's operands); h itself is kept either way (the next layer's input).
//!
//! Why: candle's autograd keeps every intermediate alive until the backward. What this node
//! keeps for its backward, at the Qwen3-Coder-30B-A3B shape (D 2048, H 32 × d 128, G 4, r 16)
//! and 4,096 tokens, bf16 compute:
//! - q and k before their norms `[T, H·d]`, `[T, G·d]`: 32 + 4 MiB. Kept rather than
//!   recomputed: they are GEMM outputs (q: 2·T·D·H·d = 69 GFLOP), and the norms' backward needs
//!   them; q̂ and k̂ are recomputed from them (RMSNorm and RoPE: element-wise).
//! - v `[G, T, d]`: 4 MiB (the attention's layout); o `[T, H·d]`: 32 MiB (the attention
//!   backward's D = do·o and o_proj's dA_o); lse `[T·H]` f32: 0.5 MiB (inside the attention
//!   op, on its device).
//! - ha_q, ha_k, ha_v, ha_o `[T, r]` f32: 4 · 0.25 MiB (only with adapters).
//! - nothing else: x is the node's input (the graph keeps it anyway: the previous layer's
//!   output); n and n₃₂ (16 + 32 MiB) are recomputed by the norm and a cast, o₃₂ by a cast.
//!
//! ≈ 73.5 MiB per layer in bf16 (18,816 bytes per token; 37,248 in f32). The autograd chain
//! keeps, per projection, the base product, the f32 copy of its input, x·Aᵀ, the f32 delta
//! before and after the scale, its cast and the sum; the norms' and RoPE's outputs; the
//! transposed copies; o and its f32 copy. Measured on the CPU (finetune-model's
//! `attention_memory` example: heap bytes kept alive by the graph after the forward of one
//! 30B-A3B-shaped attention half, r = 16 on q, k, v, o, at 512 and 1,024 tokens; per token
//! from the difference, less the 16 KiB per token of the example's own output and loss): in
//! bf16, whose CPU ops are the GPU's (frozen GEMM, f32 LoRA path, casts), 174,448 bytes per
//! token for the chain against 18,821 for the node — 681 against 73.5 MiB at 4,096 tokens; in
//! f32, where the CPU chain runs each adapted projection as one fused `lora_linear` op, 94,328
//! against 37,253 bytes per token.
//!
//! Gradients of up to eight adapter tensors: a CustomOp takes at most three inputs; the node's
//! inputs are x and a one-element carrier of the adapters present ([`crate::carrier`]), whose
//! gradients the node's backward posts to the carriers' mailbox. Each adapter tensor gets
//! exactly one gradient, as on the autograd path. When x needs no gradient (the first layer's
//! input: the frozen embeddings) the backward skips dx (the base products dp·W_p, the input
//! norm's backward).
//!
//! Device-generic: every step is a tensor op or one of the kernels (CPU reference or CUDA);
//! the node's own forward runs candle's add on the storages of x and lin_o(o).

use crate::attention::{docs_op, Attention, Documents};
use crate::carrier::{carry, Mailbox};
use crate::rms_norm::{RmsNorm, RmsNormBwd};
use crate::rope::Rope;
use crate::saved::SavedBytes;
use crate::WeightFn;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};
use std::sync::{Arc, Mutex};

/// A frozen projection `[out, in]`, materialized (e.g. dequantized from FP8) by the node for
/// each product that needs it and dropped after it.
#[derive(Clone)]
pub struct FrozenWeight {
    weight: WeightFn,
    dims: (usize, usize),
}

impl FrozenWeight {
    /// `weight` must return a tensor of `dims` = (out, in) in the activations' dtype.
    pub fn new(weight: WeightFn, dims: (usize, usize)) -> Self {
        Self { weight, dims }
    }

    fn materialize(&self, dtype: DType, what: &str) -> candle_core::Result<Tensor> {
        let w = (self.weight)()?;
        let (o, i) = self.dims;
        if w.dims() != [o, i] || w.dtype() != dtype {
            candle_core::bail!(
                "attention-block: the {what} weight came out {:?} {:?}, expected {:?} {dtype:?}",
                w.dims(),
                w.dtype(),
                [o, i]
            );
        }
        Ok(w)
    }
}

/// The frozen parts of one layer's attention and its shape.
#[derive(Clone)]
pub struct AttentionWeights {
    /// The input RMSNorm's weight `[D]`.
    pub input_norm: Tensor,
    /// q `[H·d, D]`, k and v `[G·d, D]`, o `[D, H·d]`.
    pub q: FrozenWeight,
    pub k: FrozenWeight,
    pub v: FrozenWeight,
    pub o: FrozenWeight,
    /// The per-head q and k RMSNorms' weights `[d]`.
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    /// H query heads, G key/value heads (G divides H), head dimension d.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Every RMSNorm's epsilon.
    pub eps: f64,
}

/// The adapters (A `[r, in]`, B `[out, r]`, f32) of q, k, v and o (`None`: no adapter on that
/// projection) and the scale s; gradients flow to these tensors (usually the adapter's own
/// variables).
pub struct BlockAdapters {
    pub q: Option<(Tensor, Tensor)>,
    pub k: Option<(Tensor, Tensor)>,
    pub v: Option<(Tensor, Tensor)>,
    pub o: Option<(Tensor, Tensor)>,
    pub scale: f64,
}

/// The sequence's RoPE tables cos, sin (T·d elements each, e.g. `[T, 1, d]`; cast to f32 as
/// [`crate::rope`] does) and its documents (each token attends to its own document's tokens up
/// to itself; no cached keys).
pub struct Positions<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub docs: &'a Documents,
}

/// h = x + o_proj(attention(…)) `[T, D]` (module doc), differentiable in x and in the adapter
/// tensors of `lora`, with the backward of the module doc. x f32 or bf16 (the weights' dtype
/// once materialized), the adapters f32.
pub fn attention_block(
    x: &Tensor,
    weights: &AttentionWeights,
    lora: Option<&BlockAdapters>,
    positions: &Positions<'_>,
) -> candle_core::Result<Tensor> {
    let (t, dm) = x.dims2()?;
    let w = weights;
    let (nh, nkv, d) = (w.heads, w.kv_heads, w.head_dim);
    if nkv == 0 || nh % nkv != 0 || d == 0 || d % 2 != 0 {
        candle_core::bail!(
            "attention-block: {nh} heads over {nkv} key/value heads of dimension {d}: expected key/value heads dividing the heads and an even head dimension"
        );
    }
    let want = [
        ("q", &w.q, (nh * d, dm)),
        ("k", &w.k, (nkv * d, dm)),
        ("v", &w.v, (nkv * d, dm)),
        ("o", &w.o, (dm, nh * d)),
    ];
    for (what, fw, dims) in want {
        if fw.dims != dims {
            candle_core::bail!(
                "attention-block: the {what} weight is {:?}, expected {dims:?} for x {:?}, {nh} heads and {nkv} key/value heads of dimension {d}",
                fw.dims,
                x.dims()
            );
        }
    }
    for (what, n, len) in [
        ("input norm", &w.input_norm, dm),
        ("q norm", &w.q_norm, d),
        ("k norm", &w.k_norm, d),
    ] {
        if n.dims() != [len] {
            candle_core::bail!(
                "attention-block: the {what} weight is {:?}, expected [{len}]",
                n.dims()
            );
        }
    }
    if positions.docs.starts().len() != t {
        candle_core::bail!(
            "attention-block: documents of {} tokens for x of {t}",
            positions.docs.starts().len()
        );
    }
    if let Some(l) = lora {
        let r = [&l.q, &l.k, &l.v, &l.o]
            .into_iter()
            .flatten()
            .map(|(a, _)| a.dim(0))
            .next()
            .transpose()?
            .unwrap_or(0);
        for (what, ab, (out, inp)) in [
            ("q", &l.q, want[0].2),
            ("k", &l.k, want[1].2),
            ("v", &l.v, want[2].2),
            ("o", &l.o, want[3].2),
        ] {
            let Some((a, b)) = ab else { continue };
            for (m, t, dims) in [("A", a, [r, inp]), ("B", b, [out, r])] {
                if t.dims() != dims || t.dtype() != DType::F32 {
                    candle_core::bail!(
                        "attention-block: adapter {what} {m} is {:?} {:?}, expected {dims:?} f32",
                        t.dims(),
                        t.dtype()
                    );
                }
            }
        }
    }
    let dtype = x.dtype();
    let table = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let norm = |t: &Tensor| t.to_dtype(dtype)?.contiguous();
    // The adapter tensors present, in the order q A, q B, k A, … (the mailbox's slots).
    let passengers: Vec<&Tensor> = lora.map_or_else(Vec::new, |l| {
        [&l.q, &l.k, &l.v, &l.o]
            .into_iter()
            .flatten()
            .flat_map(|(a, b)| [a, b])
            .collect()
    });
    let x_grad = x.track_op();
    let trained = x_grad || passengers.iter().any(|t| t.track_op());
    let mut op = AttentionBlock {
        proj: [w.q.clone(), w.k.clone(), w.v.clone(), w.o.clone()],
        input_norm: norm(&w.input_norm)?,
        q_norm: norm(&w.q_norm)?,
        k_norm: norm(&w.k_norm)?,
        heads: (nh, nkv, d),
        eps: w.eps,
        cos: table(positions.cos)?,
        sin: table(positions.sin)?,
        docs: positions.docs.clone(),
        lora: lora.map(|l| Adapters {
            ab: [&l.q, &l.k, &l.v, &l.o]
                .map(|ab| ab.as_ref().map(|(a, b)| (a.detach(), b.detach()))),
            scale: l.scale,
        }),
        x_grad,
        pending: Mutex::new(None),
        saved: Mutex::new(None),
        mailbox: Mailbox::new("attention-block"),
    };
    let x = x.contiguous()?;
    let (out, saved) = op.forward(&x.detach())?;
    op.pending = Mutex::new(Some(out));
    // Nothing to differentiate (inference): keep nothing.
    op.saved = Mutex::new(trained.then_some(saved));
    if passengers.is_empty() {
        x.apply_op1(op)
    } else {
        let carrier = carry(&passengers, &op.mailbox)?;
        x.apply_op2(&carrier, op)
    }
}

/// The adapters as the node holds them (detached: it reads their values; their gradients
/// travel through the carrier), by projection q, k, v, o.
struct Adapters {
    ab: [Option<(Tensor, Tensor)>; 4],
    scale: f64,
}

/// What the backward needs besides the node's input x (module doc: the memory math).
struct Saved {
    /// q `[T, H, d]` and k `[T, G, d]` before their norms.
    q: Tensor,
    k: Tensor,
    /// v `[G, T, d]`.
    v: Tensor,
    /// The attention's output `[T, H·d]`.
    o: Tensor,
    /// The attention op, holding its row logsumexps.
    attention: Attention,
    /// ha_q, ha_k, ha_v, ha_o `[T, r]` (projections with adapters).
    ha: [Option<Tensor>; 4],
    /// The bytes of q, k, v, o and ha, in `crate::saved::held_bytes` while kept.
    _held: SavedBytes,
}

const NAMES: [&str; 4] = ["q", "k", "v", "o"];

/// One projection's adapter gradients, and the adapter's share g_p·A_p of its input's gradient
/// (f32; when asked for).
struct AdapterGrads {
    da: Tensor,
    db: Tensor,
    dz: Option<Tensor>,
}

struct AttentionBlock {
    /// W_q, W_k, W_v, W_o.
    proj: [FrozenWeight; 4],
    /// The norms' weights in x's dtype.
    input_norm: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    /// (H, G, d).
    heads: (usize, usize, usize),
    eps: f64,
    /// RoPE tables, f32.
    cos: Tensor,
    sin: Tensor,
    docs: Documents,
    lora: Option<Adapters>,
    /// Whether x needs a gradient (else the backward skips dx).
    x_grad: bool,
    /// lin_o(o), computed before the node is made; its forward adds x.
    pending: Mutex<Option<Tensor>>,
    saved: Mutex<Option<Saved>>,
    mailbox: Arc<Mailbox>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AttentionBlock {
    /// Projection `p`'s adapter (A, B) when it has one.
    fn adapter(&self, p: usize) -> Option<(&Tensor, &Tensor, f64)> {
        let l = self.lora.as_ref()?;
        l.ab[p].as_ref().map(|(a, b)| (a, b, l.scale))
    }

    /// Whether any of the projections `ps` has an adapter.
    fn adapted(&self, ps: &[usize]) -> bool {
        ps.iter().any(|&p| self.adapter(p).is_some())
    }

    fn weight(&self, p: usize, dtype: DType) -> candle_core::Result<Tensor> {
        self.proj[p].materialize(dtype, NAMES[p])
    }

    /// Projection `p` of the rows `z` (`z32`: the same in f32, given when some projection
    /// reading `z` has an adapter): z·W_pᵀ + s·(z₃₂·A_pᵀ)·B_pᵀ, and ha = z₃₂·A_pᵀ.
    fn project(
        &self,
        p: usize,
        z: &Tensor,
        z32: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let y = {
            let w = self.weight(p, z.dtype())?;
            z.matmul(&w.t()?)?
        };
        let (Some((a, b, s)), Some(z32)) = (self.adapter(p), z32) else {
            return Ok((y, None));
        };
        let ha = z32.matmul(&a.t()?)?;
        // s on the small B.
        let delta = ha.matmul(&(b * s)?.t()?)?;
        let dtype = y.dtype();
        Ok(((y + delta.to_dtype(dtype)?)?, Some(ha)))
    }

    fn rms(&self, z: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        z.apply_op2_no_bwd(w, &RmsNorm { eps: self.eps })
    }

    fn rms_backward(&self, z: &Tensor, w: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        z.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })
    }

    fn rope(&self, z: &Tensor, transpose: bool) -> candle_core::Result<Tensor> {
        z.contiguous()?
            .apply_op3_no_bwd(&self.cos, &self.sin, &Rope { transpose })
    }

    /// q̂ `[T, H, d]` and k̂ `[G, T, d]` (the attention's layout) from q and k before their norms.
    fn rotate(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let qr = self.rope(&self.rms(q, &self.q_norm)?, false)?;
        let kr = self.rope(&self.rms(k, &self.k_norm)?, false)?;
        Ok((qr, kr.transpose(0, 1)?.contiguous()?))
    }

    /// lin_o(o) `[T, D]` and what the backward keeps.
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Saved)> {
        let (nh, nkv, d) = self.heads;
        let t = x.dim(0)?;
        let (q, k, v, ha_q, ha_k, ha_v) = {
            let n = self.rms(x, &self.input_norm)?;
            let n32 = match self.adapted(&[0, 1, 2]) {
                true => Some(n.to_dtype(DType::F32)?),
                false => None,
            };
            let (q, ha_q) = self.project(0, &n, n32.as_ref())?;
            let (k, ha_k) = self.project(1, &n, n32.as_ref())?;
            let (v, ha_v) = self.project(2, &n, n32.as_ref())?;
            (q, k, v, ha_q, ha_k, ha_v)
        };
        let q = q.reshape((t, nh, d))?;
        let k = k.reshape((t, nkv, d))?;
        let v = v.reshape((t, nkv, d))?.transpose(0, 1)?.contiguous()?;
        let (qr, kr) = self.rotate(&q, &k)?;
        let scale = 1.0 / (d as f64).sqrt();
        let attention = docs_op(&qr, &kr, &v, &self.docs, 0, scale)?;
        let o = qr.apply_op3_no_bwd(&kr, &v, &attention)?;
        drop((qr, kr));
        let o32 = match self.adapted(&[3]) {
            true => Some(o.to_dtype(DType::F32)?),
            false => None,
        };
        let (out, ha_o) = self.project(3, &o, o32.as_ref())?;
        let ha = [ha_q, ha_k, ha_v, ha_o];
        let _held = SavedBytes::of([&q, &k, &v, &o].into_iter().chain(ha.iter().flatten()));
        let saved = Saved {
            q,
            k,
            v,
            o,
            attention,
            ha,
            _held,
        };
        Ok((out, saved))
    }

    /// The adapter gradients (dA_p, dB_p) of projection `p` for the output gradient `dp`
    /// (`dp32` in f32) of inputs `z32`, and g_p·A_p (the adapter's share of dz, f32).
    fn adapter_grads(
        &self,
        p: usize,
        dp32: &Tensor,
        z32: &Tensor,
        ha: Option<&Tensor>,
        need_dz: bool,
    ) -> candle_core::Result<Option<AdapterGrads>> {
        let (Some((a, b, s)), Some(ha)) = (self.adapter(p), ha) else {
            return Ok(None);
        };
        let g = dp32.matmul(&(b * s)?)?; // [T, r]
        let da = g.t()?.matmul(z32)?;
        let db = (dp32.t()?.matmul(ha)? * s)?;
        let dz = match need_dz {
            true => Some(g.matmul(a)?),
            false => None,
        };
        Ok(Some(AdapterGrads { da, db, dz }))
    }

    /// dx (`None` when x needs no gradient); the adapter gradients go to the mailbox.
    fn backward(&self, x: &Tensor, dh: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Saved {
            q,
            k,
            v,
            o,
            attention,
            ha,
            ..
        } = lock(&self.saved).take().ok_or_else(|| {
            candle_core::Error::Msg(
                "attention-block: no saved activations (backward ran twice, or the forward was not differentiable)"
                    .into(),
            )
        })?;
        let x = x.detach();
        let dtype = x.dtype();
        let (t, nh, d) = q.dims3()?;
        let nkv = k.dim(1)?;
        let dy = dh.to_dtype(dtype)?.contiguous()?;
        let mut grads: [Option<(Tensor, Tensor)>; 4] = [None, None, None, None];
        // o_proj.
        let mut d_o = {
            let w = self.weight(3, dtype)?;
            dy.matmul(&w)?
        };
        if self.adapted(&[3]) {
            let (dy32, o32) = (dy.to_dtype(DType::F32)?, o.to_dtype(DType::F32)?);
            if let Some(AdapterGrads {
                da,
                db,
                dz: Some(part),
            }) = self.adapter_grads(3, &dy32, &o32, ha[3].as_ref(), true)?
            {
                d_o = (d_o + part.to_dtype(dtype)?)?;
                grads[3] = Some((da, db));
            }
        }
        // Attention, from q̂ and k̂ recomputed.
        let (dq, dk, dv) = {
            let (qr, kr) = self.rotate(&q, &k)?;
            let (dq, dk, dv) = attention.bwd(&qr, &kr, &v, &o, &d_o.contiguous()?)?;
            let missing =
                || candle_core::Error::Msg("attention-block: no attention gradient".into());
            (
                dq.ok_or_else(missing)?,
                dk.ok_or_else(missing)?,
                dv.ok_or_else(missing)?,
            )
        };
        drop((d_o, v, o, attention));
        // Through RoPE (its transpose) and the per-head norms.
        let dq = self
            .rms_backward(&q, &self.q_norm, &self.rope(&dq, true)?)?
            .reshape((t, nh * d))?;
        let dk = self.rope(&dk.transpose(0, 1)?, true)?;
        let dk = self
            .rms_backward(&k, &self.k_norm, &dk)?
            .reshape((t, nkv * d))?;
        let dv = dv.transpose(0, 1)?.contiguous()?.reshape((t, nkv * d))?;
        drop((q, k));
        // q, k, v projections.
        let need_dx = self.x_grad;
        let mut dn = None;
        if need_dx {
            for (p, dp) in [(0, &dq), (1, &dk), (2, &dv)] {
                let w = self.weight(p, dtype)?;
                let part = dp.matmul(&w)?;
                dn = Some(match dn {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        if self.adapted(&[0, 1, 2]) {
            let n32 = self.rms(&x, &self.input_norm)?.to_dtype(DType::F32)?;
            // The three adapters' dn summed in f32 first.
            let mut dn32: Option<Tensor> = None;
            for (p, dp) in [(0, &dq), (1, &dk), (2, &dv)] {
                if !self.adapted(&[p]) {
                    continue;
                }
                let dp32 = dp.to_dtype(DType::F32)?;
                if let Some(AdapterGrads { da, db, dz }) =
                    self.adapter_grads(p, &dp32, &n32, ha[p].as_ref(), need_dx)?
                {
                    grads[p] = Some((da, db));
                    if let Some(part) = dz {
                        dn32 = Some(match dn32 {
                            Some(acc) => (acc + part)?,
                            None => part,
                        });
                    }
                }
            }
            if let Some(part) = dn32 {
                if let Some(acc) = dn.take() {
                    dn = Some((acc + part.to_dtype(dtype)?)?);
                }
            }
        }
        if self.lora.is_some() {
            let posted: Vec<Tensor> = grads
                .into_iter()
                .flatten()
                .flat_map(|(a, b)| [a, b])
                .collect();
            if !posted.is_empty() {
                self.mailbox.post(posted)?;
            }
        }
        match dn {
            Some(dn) => Ok(Some(
                (&dy + self.rms_backward(&x, &self.input_norm, &dn)?)?.to_dtype(dh.dtype())?,
            )),
            None => Ok(None),
        }
    }

    /// The node's output from the pending lin_o(o): x + it, candle's add on their storages.
    fn take_pending(&self) -> candle_core::Result<Tensor> {
        lock(&self.pending)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attention-block: forward ran twice".into()))
    }
}

/// The node's forward on any backend: x + the pending lin_o(o), whose storage is `S` on this
/// device.
fn residual<S, F>(op: &AttentionBlock, xl: &Layout, pick: F) -> candle_core::Result<(S, Shape)>
where
    F: FnOnce(&Storage, &Layout) -> candle_core::Result<S>,
{
    let out = op.take_pending()?;
    if out.dims() != xl.dims() {
        candle_core::bail!(
            "attention-block: output {:?} for x {:?}",
            out.dims(),
            xl.dims()
        );
    }
    let (storage, layout) = out.storage_and_layout();
    Ok((pick(&storage, layout)?, xl.shape().clone()))
}

fn cpu_residual(
    op: &AttentionBlock,
    xs: &CpuStorage,
    xl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    residual(op, xl, |s, l| match s {
        Storage::Cpu(s) => xs.binary_impl::<candle_core::op::Add>(s, xl, l),
        _ => candle_core::bail!("attention-block: the output is not on the CPU"),
    })
}

#[cfg(feature = "cuda")]
fn cuda_residual(
    op: &AttentionBlock,
    xs: &candle_core::CudaStorage,
    xl: &Layout,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    residual(op, xl, |s, l| match s {
        Storage::Cuda(s) => xs.binary_impl::<candle_core::op::Add>(s, xl, l),
        _ => candle_core::bail!("attention-block: the output is not on the GPU"),
    })
}

/// Without adapters: the node over x.
impl CustomOp1 for AttentionBlock {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_residual(self, xs, xl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_residual(self, xs, xl)
    }

    fn bwd(&self, x: &Tensor, _h: &Tensor, dh: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.backward(x, dh)
    }
}

/// With adapters: the node over (x, carrier of the adapter tensors).
impl CustomOp2 for AttentionBlock {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_residual(self, xs, xl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_residual(self, xs, xl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        carrier: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.backward(x, dh)?;
        // The carrier must receive a gradient, or candle would not run the carriers' backward.
        Ok((dx, Some(carrier.zeros_like()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{Device, Var};

    const T: usize = 9;
    const DM: usize = 12;
    const NH: usize = 4;
    const NKV: usize = 2;
    const HD: usize = 8;
    const R: usize = 3;
    const S: f64 = 1.75;
    const EPS: f64 = 1e-6;
    /// Documents of 4, 1 and 4 tokens.
    const DOC_START: [u32; T] = [0, 0, 0, 0, 4, 5, 5, 5, 5];

    struct Case {
        x: Var,
        /// W_q, W_k, W_v, W_o.
        w: [Tensor; 4],
        /// input, q and k norms' weights.
        norms: [Tensor; 3],
        /// A and B of q, k, v, o.
        lora: [(Var, Var); 4],
        cos: Tensor,
        sin: Tensor,
        docs: Documents,
        upstream: Tensor,
    }

    /// Random weights; RoPE tables at positions restarting with each document, scaled by a
    /// YaRN-style attention factor 1.2 (so cos² + sin² ≠ 1: the backward must be the transpose,
    /// not the inverse rotation).
    fn case() -> Case {
        let v = |shape: &[usize], salt| Var::from_tensor(&(tensor(shape, salt) * 0.3).unwrap());
        let dims = [(NH * HD, DM), (NKV * HD, DM), (NKV * HD, DM), (DM, NH * HD)];
        let mut angles = Vec::with_capacity(T * HD);
        for (i, &s) in DOC_START.iter().enumerate() {
            let pos = (i - s as usize) as f32;
            let half: Vec<f32> = (0..HD / 2)
                .map(|j| pos * 10000f32.powf(-2.0 * j as f32 / HD as f32))
                .collect();
            angles.extend(half.iter().chain(&half));
        }
        let table = |f: fn(f32) -> f32| {
            let t: Vec<f32> = angles.iter().map(|&a| f(a) * 1.2).collect();
            Tensor::from_vec(t, (T, 1, HD), &Device::Cpu).unwrap()
        };
        let norm = |n: usize, salt| tensor(&[n], salt).abs().unwrap().affine(0.5, 0.5).unwrap();
        Case {
            x: v(&[T, DM], 1).unwrap(),
            w: [0, 1, 2, 3]
                .map(|p| (tensor(&[dims[p].0, dims[p].1], 10 + p as u64) * 0.2).unwrap()),
            norms: [norm(DM, 20), norm(HD, 21), norm(HD, 22)],
            lora: [0, 1, 2, 3].map(|p| {
                let (out, inp) = dims[p];
                (
                    v(&[R, inp], 30 + 2 * p as u64).unwrap(),
                    v(&[out, R], 31 + 2 * p as u64).unwrap(),
                )
            }),
            cos: table(f32::cos),
            sin: table(f32::sin),
            docs: Documents::new(&DOC_START, &Device::Cpu).unwrap(),
            upstream: tensor(&[T, DM], 40),
        }
    }

    /// finetune-model's attention chain over the same kernels, as candle autograd (`with[p]`:
    /// projection p has its adapter), for x in its dtype (weights cast to it).
    fn reference(c: &Case, x: &Tensor, with: [bool; 4]) -> Tensor {
        let dtype = x.dtype();
        let lin = |z: &Tensor, p: usize| {
            let y = z
                .matmul(&c.w[p].to_dtype(dtype).unwrap().t().unwrap())
                .unwrap();
            if !with[p] {
                return y;
            }
            let (a, b) = (c.lora[p].0.as_tensor(), c.lora[p].1.as_tensor());
            let z32 = z.to_dtype(DType::F32).unwrap();
            let delta = (z32
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * S)
                .unwrap();
            (y + delta.to_dtype(dtype).unwrap()).unwrap()
        };
        let rope = |z: &Tensor| crate::rope(z, &c.cos, &c.sin).unwrap();
        let n = crate::rms_norm(x, &c.norms[0], EPS).unwrap();
        let q = lin(&n, 0).reshape((T, NH, HD)).unwrap();
        let k = lin(&n, 1).reshape((T, NKV, HD)).unwrap();
        let v = lin(&n, 2).reshape((T, NKV, HD)).unwrap();
        let q = rope(&crate::rms_norm(&q, &c.norms[1], EPS).unwrap());
        let k = rope(&crate::rms_norm(&k, &c.norms[2], EPS).unwrap());
        let k = k.transpose(0, 1).unwrap().contiguous().unwrap();
        let v = v.transpose(0, 1).unwrap().contiguous().unwrap();
        let scale = 1.0 / (HD as f64).sqrt();
        let o = crate::causal_attention_docs(&q, &k, &v, &c.docs, 0, scale).unwrap();
        (x + lin(&o, 3)).unwrap()
    }

    fn weights_of(c: &Case, dtype: DType) -> AttentionWeights {
        let frozen = |t: &Tensor| {
            let t = t.to_dtype(dtype).unwrap();
            let dims = t.dims2().unwrap();
            FrozenWeight::new(Arc::new(move || Ok(t.clone())), dims)
        };
        AttentionWeights {
            input_norm: c.norms[0].clone(),
            q: frozen(&c.w[0]),
            k: frozen(&c.w[1]),
            v: frozen(&c.w[2]),
            o: frozen(&c.w[3]),
            q_norm: c.norms[1].clone(),
            k_norm: c.norms[2].clone(),
            heads: NH,
            kv_heads: NKV,
            head_dim: HD,
            eps: EPS,
        }
    }

    fn ours(c: &Case, x: &Tensor, with: [bool; 4]) -> Tensor {
        let ab = |p: usize| {
            with[p].then(|| {
                (
                    c.lora[p].0.as_tensor().clone(),
                    c.lora[p].1.as_tensor().clone(),
                )
            })
        };
        let adapters = BlockAdapters {
            q: ab(0),
            k: ab(1),
            v: ab(2),
            o: ab(3),
            scale: S,
        };
        let positions = Positions {
            cos: &c.cos,
            sin: &c.sin,
            docs: &c.docs,
        };
        let lora = with.iter().any(|&w| w).then_some(&adapters);
        attention_block(x, &weights_of(c, x.dtype()), lora, &positions).unwrap()
    }

    const NAMES: [&str; 8] = ["q A", "q B", "k A", "k B", "v A", "v B", "o A", "o B"];

    /// The gradients of x (`None` when it is a constant) and of the adapters in use for the
    /// loss Σ h ⊙ upstream (in f32).
    fn grads(
        c: &Case,
        x: &Tensor,
        h: &Tensor,
        with: [bool; 4],
    ) -> (Option<Tensor>, Vec<(&'static str, Tensor)>) {
        let g = (h.to_dtype(DType::F32).unwrap() * &c.upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut lora = Vec::new();
        for (p, (a, b)) in c.lora.iter().enumerate() {
            let (ga, gb) = (g.get(a.as_tensor()), g.get(b.as_tensor()));
            assert_eq!(ga.is_some(), with[p], "{}: gradient or not", NAMES[2 * p]);
            assert_eq!(
                gb.is_some(),
                with[p],
                "{}: gradient or not",
                NAMES[2 * p + 1]
            );
            if let (Some(ga), Some(gb)) = (ga, gb) {
                lora.push((NAMES[2 * p], ga.clone()));
                lora.push((NAMES[2 * p + 1], gb.clone()));
            }
        }
        (g.get(x).cloned(), lora)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Output, dx and every adapter's gradients equal candle autograd's over the same kernels
    /// (documents of 4, 1 and 4 tokens, GQA 4 over 2 heads, YaRN-scaled tables), with all
    /// adapters, with some projections without one, and with none; and with x a constant (the
    /// first layer's frozen embeddings), where only the adapters get gradients.
    #[test]
    fn output_and_every_gradient_equal_autograd() {
        let subsets = [
            [true; 4],
            [true, false, true, false],
            [false, true, false, false],
            [false; 4],
        ];
        for with in subsets {
            for x_trained in [true, false] {
                let c = case();
                let x = match x_trained {
                    true => c.x.as_tensor().clone(),
                    false => c.x.as_tensor().detach(),
                };
                let case = format!("adapters {with:?}, x trained {x_trained}");
                let (h, want) = (ours(&c, &x, with), reference(&c, &x, with));
                let d = rel_diff(&h, &want);
                assert!(d < 1e-6, "{case}: h {d}");
                if !x_trained && with == [false; 4] {
                    assert!(!h.track_op(), "{case}: a constant output is tracked");
                    continue;
                }
                let (gx, gl) = grads(&c, &x, &h, with);
                let (wx, wl) = grads(&c, &x, &want, with);
                // (candle's own ops hand a constant input a gradient too; the node skips it.)
                assert_eq!(gx.is_some(), x_trained, "{case}: dx or not");
                let mut pairs: Vec<(&str, Tensor, Tensor)> = gl
                    .into_iter()
                    .zip(wl)
                    .map(|((n, g), (_, w))| (n, g, w))
                    .collect();
                if let (Some(g), Some(w), true) = (gx, wx, x_trained) {
                    pairs.push(("x", g, w));
                }
                for (what, g, w) in pairs {
                    let d = rel_diff(&g, &w);
                    assert!(d < 1e-5, "{case}: d{what} differs by {d}");
                    assert!(max_abs(&w) > 0.0, "{case}: d{what} is zero");
                }
            }
        }
    }

    /// In bf16 (x, weights, activations; adapters f32) the node stays within the bf16 bound
    /// of the tests (5e-2 relative, `BF16_TOLERANCE` in finetune-train) of the bf16 autograd
    /// chain, in its output and every gradient.
    #[test]
    fn bf16_stays_within_rounding_of_the_bf16_chain() {
        let c = case();
        let with = [true, true, false, true];
        let x = Var::from_tensor(&c.x.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
        let (h, want) = (ours(&c, &x, with), reference(&c, &x, with));
        assert_eq!(h.dtype(), DType::BF16);
        let d = rel_diff(&h, &want);
        assert!(d < 5e-2, "h {d}");
        let (gx, gl) = grads(&c, &x, &h, with);
        let (wx, wl) = grads(&c, &x, &want, with);
        let mut worst = d;
        let mut pairs: Vec<(&str, Tensor, Tensor)> = gl
            .into_iter()
            .zip(wl)
            .map(|((n, g), (_, w))| (n, g, w))
            .collect();
        pairs.push(("x", gx.unwrap(), wx.unwrap()));
        for (what, g, w) in pairs {
            let d = rel_diff(&g, &w);
            worst = worst.max(d);
            assert!(d < 5e-2, "bf16 d{what} differs by {d}");
            assert!(max_abs(&w) > 0.0, "bf16 d{what} is zero");
        }
        eprintln!("attention-block bf16 vs bf16 chain: worst relative difference {worst:e}");
    }

    /// Output and gradients (x, the eight adapter tensors) of [`attention_block`] for the case's
    /// values on `device` in `dtype` (x and weights; adapters f32), as f32 CPU tensors.
    #[cfg(feature = "cuda")]
    fn ours_on(c: &Case, device: &candle_core::Device, dtype: DType) -> Vec<Tensor> {
        let on = |t: &Tensor, dt: DType| t.to_dtype(dt).unwrap().to_device(device).unwrap();
        let x = Var::from_tensor(&on(c.x.as_tensor(), dtype)).unwrap();
        let lora: Vec<Var> = c
            .lora
            .iter()
            .flat_map(|(a, b)| [a, b])
            .map(|v| Var::from_tensor(&on(v.as_tensor(), DType::F32)).unwrap())
            .collect();
        let moved = Case {
            x: x.clone(),
            w: c.w.clone().map(|t| on(&t, dtype)),
            norms: c.norms.clone().map(|t| on(&t, DType::F32)),
            lora: [0, 1, 2, 3].map(|p| (lora[2 * p].clone(), lora[2 * p + 1].clone())),
            cos: on(&c.cos, DType::F32),
            sin: on(&c.sin, DType::F32),
            docs: Documents::new(&DOC_START, device).unwrap(),
            upstream: on(&c.upstream, DType::F32),
        };
        let h = ours(&moved, x.as_tensor(), [true; 4]);
        let (gx, gl) = grads(&moved, x.as_tensor(), &h, [true; 4]);
        let host = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&candle_core::Device::Cpu)
                .unwrap()
        };
        let mut out = vec![host(&h), host(&gx.unwrap())];
        out.extend(gl.iter().map(|(_, g)| host(g)));
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
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-2)] {
            let got = ours_on(&c, &gpu, dtype);
            let names = ["h", "dx"].iter().chain(NAMES.iter());
            let d: Vec<f32> = got.iter().zip(&want).map(|(g, w)| rel_diff(g, w)).collect();
            eprintln!(
                "attention-block cuda {dtype:?}: {:?}",
                names.clone().zip(&d).collect::<Vec<_>>()
            );
            for (n, d) in names.zip(&d) {
                assert!(*d < tol, "{dtype:?} {n}: {d}");
            }
        }
    }

    /// Without anything to differentiate the node keeps nothing; a weight of the wrong shape
    /// and an adapter of the wrong shape are refused by name.
    #[test]
    fn constants_keep_nothing_and_bad_shapes_are_refused() {
        let c = case();
        let x = c.x.as_tensor().detach();
        let positions = Positions {
            cos: &c.cos,
            sin: &c.sin,
            docs: &c.docs,
        };
        let h = attention_block(&x, &weights_of(&c, DType::F32), None, &positions).unwrap();
        assert!(!h.track_op());
        let mut bad = weights_of(&c, DType::F32);
        bad.k = bad.q.clone();
        let err = attention_block(&x, &bad, None, &positions)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the k weight"), "{err}");
        let adapters = BlockAdapters {
            q: None,
            k: None,
            v: Some((
                c.lora[0].0.as_tensor().clone(),
                c.lora[0].1.as_tensor().clone(),
            )),
            o: None,
            scale: S,
        };
        let err = attention_block(&x, &weights_of(&c, DType::F32), Some(&adapters), &positions)
            .unwrap_err()
            .to_string();
        assert!(err.contains("adapter v B"), "{err}");
    }
}
