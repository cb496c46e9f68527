//! `causal_attention`: grouped-query attention over packed documents, causal within each
//! document, without the `[heads, T, keys]` score, mask and probability tensors:
//!   o[i, h] = Σ_{j ∈ A(i)} softmax_j(scale · q[i, h]·k[g(h), j]) · v[g(h), j]
//! with q `[T, H, d]`, k and v `[G, S, d]` (G key/value heads, g(h) = h / (H/G), S = past + T
//! keys: `past` cached keys, then the T tokens'), and A(i) = the cached keys j < past, plus the
//! keys past + j for doc_start[i] ≤ j ≤ i (token i's own document up to itself; `doc_start[i]` is
//! the index of its document's first token). Output `[T, H·d]` (heads concatenated, as o_proj
//! takes them). Keys outside A(i) are never visited (the plain version computes every score and
//! masks with −∞: more than twice the work for one document, far more for many short ones).
//!
//! Backward (flash-attention style, from the stored row logsumexps): with P_ij = exp(s_ij −
//! lse_i), dP_ij = do_i·v_j and D_i = do_i·o_i:
//!   dq_i = scale Σ_j P_ij (dP_ij − D_i) k_j,  dk_j = scale Σ_i P_ij (dP_ij − D_i) q_i,
//!   dv_j = Σ_i P_ij do_i,
//! in one pass over blocks of query rows (P and dP computed once per block and head), in
//! parallel: dq written per block, dk and dv added into per-task accumulators summed at the end.
//!
//! How (CPU, rayon, f32): in blocks of `block` query tokens, per head, every product above is
//! one small GEMM (the `gemm` crate, single-threaded inside a rayon task) over the block's
//! contiguous key range — S = Q_b·K_rangeᵀ, O_b = P·V_range, dP = dO_b·V_rangeᵀ,
//! dQ_b = dS·K_range, dV_range += Pᵀ·dO_b, dK_range += dSᵀ·Q_b — and the row work
//! (max, exp, sums, masking) runs over whole rows with a vectorised exp (`common::exp_poly`),
//! compiled for AVX2+FMA where the CPU has it. Inside the range, keys outside A(i) (the causal
//! triangle of the block's diagonal, other documents) get probability exactly 0. The
//! per-element loop this replaced spent ~45% of a tiny-model training step in scalar `expf`
//! and 32-wide dot products.
//!
//! CUDA (`cuda` feature, kernels/attention.cu): the same formulas tiled flash-attention style
//! (blocks of query rows stream key tiles with an online softmax; dq per query block, dk/dv per
//! key block, from the stored logsumexps), f32 or bf16 storage, f32 arithmetic, head dims 32,
//! 64 and 128 ([`cuda_supported`]). Memory O(T·d) instead of the plain path's `[H, T, keys]`
//! scores, probabilities and their gradients. Scalar FMA kernels by default; tensor-core
//! variants (WMMA, bf16, head dims 64 and 128: every tile product on the tensor cores, a
//! two-pass forward) when [`set_tensor_cores`] or `FINETUNE_ATTENTION_TENSOR_CORES=1` turns
//! them on — opt-in until a GPU session has run their test (written without a GPU).

use crate::common::{cpu_f32, exp_sub_sum, gemm_f32, max, simd, LaunchShape};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Query tokens per block: a 64 × keys score block stays in L2 for the sequence lengths
/// trained on CPU, and the GEMMs have 64 rows.
const BLOCK: usize = 64;

/// Attention of q `[T, H, d]` over k, v `[G, past + T, d]` (f32, CPU), per-document causal as
/// `doc_start` (one per token, non-decreasing, `doc_start[i] ≤ i`) says; → `[T, H·d]`,
/// differentiable in q, k and v.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    doc_start: &[u32],
    past: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    causal_attention_docs(
        q,
        k,
        v,
        &Documents::new(doc_start, q.device())?,
        past,
        scale,
    )
}

/// [`causal_attention`] with the sequence's [`Documents`] made once (the model makes them per
/// sequence and uses them in every layer).
pub fn causal_attention_docs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    docs: &Documents,
    past: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = docs_op(q, k, v, docs, past, scale)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The documents of one packed sequence: each token's document start, and on a GPU the starts
/// and ends in device memory — uploaded once per sequence rather than once per layer (a copy
/// from pageable host memory first waits for everything queued on the stream).
#[derive(Clone, Debug)]
pub struct Documents {
    start: std::sync::Arc<[u32]>,
    start_dev: Option<Tensor>,
    end_dev: Option<Tensor>,
}

impl Documents {
    /// `doc_start[i]`: the index of token i's document's first token (non-decreasing,
    /// `doc_start[i] ≤ i`); device copies when `device` is not the CPU.
    pub fn new(doc_start: &[u32], device: &candle_core::Device) -> candle_core::Result<Self> {
        let t = doc_start.len();
        if doc_start
            .iter()
            .enumerate()
            .any(|(i, &s)| s as usize > i || (i > 0 && s < doc_start[i - 1]))
        {
            candle_core::bail!(
                "attention: doc_start must hold {t} non-decreasing values with doc_start[i] ≤ i"
            );
        }
        let (start_dev, end_dev) = if device.is_cpu() {
            (None, None)
        } else {
            (
                Some(Tensor::new(doc_start, device)?),
                Some(Tensor::new(doc_ends(doc_start).as_slice(), device)?),
            )
        };
        Ok(Self {
            start: doc_start.into(),
            start_dev,
            end_dev,
        })
    }

    /// The document start of each token.
    pub fn starts(&self) -> &[u32] {
        &self.start
    }
}

/// Whether the tensor-core kernels are on: `FINETUNE_ATTENTION_TENSOR_CORES=1` in the
/// environment, or [`set_tensor_cores`].
static TENSOR_CORES: crate::common::EnvSwitch =
    crate::common::EnvSwitch::new("FINETUNE_ATTENTION_TENSOR_CORES");

/// Turns the tensor-core CUDA kernels on or off for later calls (bf16, head dims 64 and 128;
/// other cases keep the scalar kernels).
pub fn set_tensor_cores(on: bool) {
    TENSOR_CORES.set(on)
}

/// Whether later calls use the tensor-core kernels where they apply.
pub fn tensor_cores() -> bool {
    TENSOR_CORES.get()
}

/// Whether the tensor-core kernels cover head dimension `d` and `dtype`.
pub fn tensor_cores_cover(d: usize, dtype: candle_core::DType) -> bool {
    matches!(d, 64 | 128) && dtype == candle_core::DType::BF16
}

/// [`causal_attention`] with `block` rows per CPU task (tests use small blocks so that a few
/// tokens span several) and the choice of CUDA kernels (`tensor_cores`: the WMMA variants).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn causal_attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    docs: &Documents,
    past: usize,
    scale: f64,
    block: usize,
    tensor_cores: bool,
) -> candle_core::Result<Tensor> {
    let op = Attention::new(q, k, v, docs, past, scale, block, tensor_cores)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Whether the CUDA kernels cover head dimension `d` and `dtype` (others: the plain path).
pub fn cuda_supported(d: usize, dtype: candle_core::DType) -> bool {
    matches!(d, 32 | 64 | 128)
        && matches!(dtype, candle_core::DType::F32 | candle_core::DType::BF16)
}

/// doc_end[i]: the last token of token i's document (key past + j is seen by the queries
/// j ..= doc_end[j]).
fn doc_ends(doc_start: &[u32]) -> Vec<u32> {
    let t = doc_start.len();
    let mut doc_end = vec![0u32; t];
    for i in (0..t).rev() {
        doc_end[i] = if i + 1 < t && doc_start[i + 1] == doc_start[i] {
            doc_end[i + 1]
        } else {
            i as u32
        };
    }
    doc_end
}

/// The forward's row logsumexps (`[T·H]`), kept for the backward where they were computed.
enum Lse {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>),
}

/// The op; `lse` keeps the forward's row logsumexps for the backward. On the GPU the document
/// starts and ends are also on the device.
pub struct Attention {
    doc_start: std::sync::Arc<[u32]>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    doc_start_dev: Option<Tensor>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    doc_end_dev: Option<Tensor>,
    past: usize,
    scale: f32,
    /// Query tokens per CPU task.
    block: usize,
    /// CUDA: the tensor-core kernels (bf16, head dims 64 and 128) instead of the scalar ones.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tensor_cores: bool,
    lse: Mutex<Option<Lse>>,
}

impl Attention {
    /// The op for q, k, v of these shapes (checked) and `docs` (uploaded for this call when
    /// they were made for the CPU and q is on a GPU).
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: &Documents,
        past: usize,
        scale: f64,
        block: usize,
        tensor_cores: bool,
    ) -> candle_core::Result<Self> {
        let (t, h, d) = q.dims3()?;
        let (g, s, dk) = k.dims3()?;
        if v.dims() != k.dims() || dk != d || s != past + t || g == 0 || h % g != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}, past {past}: expected q [T, H, d], k = v [G, past + T, d], G dividing H",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if docs.start.len() != t {
            candle_core::bail!(
                "attention: doc_start must hold {t} non-decreasing values with doc_start[i] ≤ i, got {} values",
                docs.start.len()
            );
        }
        if !q.device().is_cpu() && docs.start_dev.is_none() {
            // Documents made for the CPU, attention on a GPU: upload them for this call.
            let on = Documents::new(&docs.start, q.device())?;
            return Self::new(q, k, v, &on, past, scale, block, tensor_cores);
        }
        Ok(Self {
            doc_start: docs.start.clone(),
            doc_start_dev: docs.start_dev.clone(),
            doc_end_dev: docs.end_dev.clone(),
            past,
            scale: scale as f32,
            block: block.max(1),
            tensor_cores,
            lse: Mutex::new(None),
        })
    }
}

/// The op [`causal_attention_docs`] applies, for a caller that runs its forward
/// (`apply_op3_no_bwd` on contiguous q, k, v; the op keeps the row logsumexps) and later its
/// backward ([`CustomOp3::bwd`] with the same q, k, v, the output and its gradient) itself:
/// [`crate::attention_block`].
pub(crate) fn docs_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    docs: &Documents,
    past: usize,
    scale: f64,
) -> candle_core::Result<Attention> {
    let tc = tensor_cores() && tensor_cores_cover(q.dims3()?.2, q.dtype()) && q.device().is_cuda();
    Attention::new(q, k, v, docs, past, scale, BLOCK, tc)
}

#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    h: usize,
    g: usize,
    d: usize,
    s: usize,
}

/// The keys of query token i inside a key range starting at `lo`, as at most two local index
/// ranges: the cached keys [0, past) (when the range holds them) and the document's keys
/// [past + doc_start[i], past + i].
fn visible(doc_start: &[u32], past: usize, i: usize, lo: usize) -> [std::ops::Range<usize>; 2] {
    let own = past + doc_start[i] as usize - lo..past + i + 1 - lo;
    if past > 0 {
        // lo is 0 whenever there are cached keys (every query sees all of them).
        [0..past - lo, own]
    } else {
        [0..0, own]
    }
}

impl Attention {
    /// The key range [lo, hi) that query tokens [i0, i1) see between them.
    fn key_range(&self, i0: usize, i1: usize) -> (usize, usize) {
        let lo = if self.past > 0 {
            0
        } else {
            self.doc_start[i0] as usize
        };
        (lo, self.past + i1)
    }

    /// o and the row logsumexps, rows in (token, head) order.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], n: &Dims) -> (Vec<f32>, Vec<f32>) {
        let Dims { t, h, g, d, s } = *n;
        let (group, bl) = (h / g, self.block);
        let mut o = vec![0f32; t * h * d];
        let mut lse = vec![0f32; t * h];
        o.par_chunks_mut(bl * h * d)
            .zip(lse.par_chunks_mut(bl * h))
            .enumerate()
            .for_each_init(Vec::new, |scores, (blk, (o, lse))| {
                let i0 = blk * bl;
                let i1 = (i0 + bl).min(t);
                let rows = i1 - i0;
                let (lo, hi) = self.key_range(i0, i1);
                let len = hi - lo;
                scores.resize(rows * len, 0.0);
                for head in 0..h {
                    let kv = (head / group * s + lo) * d;
                    // S = scale · Q_b·K_rangeᵀ
                    gemm_f32(
                        (rows, len, d),
                        (scores, len, false),
                        (&q[(i0 * h + head) * d..], h * d, 1),
                        (&k[kv..], 1, d),
                        self.scale,
                        1,
                    );
                    for (r, row) in scores.chunks_mut(len).enumerate() {
                        let ranges = visible(&self.doc_start, self.past, i0 + r, lo);
                        lse[r * h + head] = row_softmax(row, &ranges);
                    }
                    // O_b = P·V_range, into the head's columns of the block's rows.
                    gemm_f32(
                        (rows, d, len),
                        (&mut o[head * d..], h * d, false),
                        (scores, len, 1),
                        (&v[kv..], d, 1),
                        1.0,
                        1,
                    );
                }
            });
        (o, lse)
    }

    /// dq, dk, dv (flat, in q's and k's layouts).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        d_o: &[f32],
        lse: &[f32],
        n: &Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims { t, h, g, d, s } = *n;
        let (group, bl, scale) = (h / g, self.block, self.scale);
        // D_i = do_i · o_i per (token, head) row.
        let big_d: Vec<f32> = d_o
            .par_chunks(d)
            .zip(o.par_chunks(d))
            .map(|(a, b)| dot(a, b))
            .collect();
        // Tasks over blocks of query tokens, each block's dq written in place and its dk, dv
        // contributions added into the task's own accumulators (summed at the end, in task
        // order): block b goes to task b mod tasks, so that every task gets early (cheap) and
        // late (costly, the causal triangle) blocks. Twice as many tasks as threads lets rayon
        // even out the rest, within 256 MiB of accumulators.
        let mut dq = vec![0f32; t * h * d];
        let n_blocks = t.div_ceil(bl);
        let acc_len = g * s * d;
        let max_tasks = (1usize << 25) / acc_len.max(1);
        let tasks = (2 * rayon::current_num_threads())
            .min(n_blocks)
            .min(max_tasks)
            .max(1);
        let mut buckets: Vec<Vec<(usize, &mut [f32])>> = (0..tasks).map(|_| Vec::new()).collect();
        for (blk, chunk) in dq.chunks_mut(bl * h * d).enumerate() {
            buckets[blk % tasks].push((blk, chunk));
        }
        let partial: Vec<(Vec<f32>, Vec<f32>)> = buckets
            .into_par_iter()
            .map(|bucket| {
                let mut dk = vec![0f32; acc_len];
                let mut dv = vec![0f32; acc_len];
                let (mut p, mut dp) = (Vec::new(), Vec::new());
                for (blk, dq) in bucket {
                    let i0 = blk * bl;
                    let i1 = (i0 + bl).min(t);
                    let rows = i1 - i0;
                    let (lo, hi) = self.key_range(i0, i1);
                    let len = hi - lo;
                    p.resize(rows * len, 0.0);
                    dp.resize(rows * len, 0.0);
                    for head in 0..h {
                        let kv = (head / group * s + lo) * d;
                        let row0 = i0 * h + head;
                        // S = scale · Q_b·K_rangeᵀ and dP = dO_b·V_rangeᵀ …
                        gemm_f32(
                            (rows, len, d),
                            (&mut p, len, false),
                            (&q[row0 * d..], h * d, 1),
                            (&k[kv..], 1, d),
                            scale,
                            1,
                        );
                        gemm_f32(
                            (rows, len, d),
                            (&mut dp, len, false),
                            (&d_o[row0 * d..], h * d, 1),
                            (&v[kv..], 1, d),
                            1.0,
                            1,
                        );
                        // … → P in p's place, dS = P ⊙ (dP − D) in dp's.
                        for (r, (p, dp)) in p.chunks_mut(len).zip(dp.chunks_mut(len)).enumerate() {
                            let row = row0 + r * h;
                            let ranges = visible(&self.doc_start, self.past, i0 + r, lo);
                            row_ds(p, dp, &ranges, lse[row], big_d[row]);
                        }
                        // dQ_b = scale · dS·K_range
                        gemm_f32(
                            (rows, d, len),
                            (&mut dq[head * d..], h * d, false),
                            (&dp, len, 1),
                            (&k[kv..], d, 1),
                            scale,
                            1,
                        );
                        // dV_range += Pᵀ·dO_b,  dK_range += scale · dSᵀ·Q_b
                        gemm_f32(
                            (len, d, rows),
                            (&mut dv[kv..], d, true),
                            (&p, 1, len),
                            (&d_o[row0 * d..], h * d, 1),
                            1.0,
                            1,
                        );
                        gemm_f32(
                            (len, d, rows),
                            (&mut dk[kv..], d, true),
                            (&dp, 1, len),
                            (&q[row0 * d..], h * d, 1),
                            scale,
                            1,
                        );
                    }
                }
                (dk, dv)
            })
            .collect();
        let mut partial = partial.into_iter();
        let (mut dk, mut dv) = partial.next().unwrap_or_default();
        for (pk, pv) in partial {
            dk.iter_mut().zip(&pk).for_each(|(a, b)| *a += b);
            dv.iter_mut().zip(&pv).for_each(|(a, b)| *a += b);
        }
        (dq, dk, dv)
    }
}

simd!(fn row_softmax(row: &mut [f32], ranges: &[std::ops::Range<usize>; 2]) -> f32 = row_softmax_body);
simd!(fn row_ds(p: &mut [f32], dp: &mut [f32], ranges: &[std::ops::Range<usize>; 2], lse: f32, big_d: f32) = row_ds_body);

/// Scores → probabilities over the visible `ranges` of one row (zeros elsewhere); returns the
/// row's logsumexp.
#[inline(always)]
fn row_softmax_body(row: &mut [f32], ranges: &[std::ops::Range<usize>; 2]) -> f32 {
    let m = ranges
        .iter()
        .map(|r| max(&row[r.clone()]))
        .fold(f32::NEG_INFINITY, f32::max);
    let mut l = 0f32;
    for r in ranges {
        l += exp_sub_sum(&mut row[r.clone()], m);
    }
    let inv = 1.0 / l;
    let mut at = 0;
    for r in ranges {
        row[at..r.start.max(at)].fill(0.0);
        row[r.clone()].iter_mut().for_each(|x| *x *= inv);
        at = at.max(r.end);
    }
    row[at..].fill(0.0);
    m + l.ln()
}

/// One query row of the backward: scores S → P = exp(S − lse) on the visible keys (0
/// elsewhere) in `p`, and dP → dS = P ⊙ (dP − D) in `dp`.
#[inline(always)]
fn row_ds_body(
    p: &mut [f32],
    dp: &mut [f32],
    ranges: &[std::ops::Range<usize>; 2],
    lse: f32,
    big_d: f32,
) {
    let mut at = 0;
    for r in ranges {
        p[at..r.start.max(at)].fill(0.0);
        exp_sub_sum(&mut p[r.clone()], lse);
        at = at.max(r.end);
    }
    p[at..].fill(0.0);
    dp.iter_mut()
        .zip(p.iter())
        .for_each(|(dp, p)| *dp = *p * (*dp - big_d));
}

/// Σ aᵢ·bᵢ with 8 independent partial sums: a sequential f32 sum cannot be vectorized (the
/// compiler may not reorder it), this one becomes SIMD multiply-adds.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn dims(ql: &Layout, kl: &Layout) -> candle_core::Result<Dims> {
    let (t, h, d) = ql.shape().dims3()?;
    let (g, s, _) = kl.shape().dims3()?;
    Ok(Dims { t, h, g, d, s })
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = dims(ql, kl)?;
        let q = cpu_f32(qs, ql, self.name(), "q")?;
        let k = cpu_f32(ks, kl, self.name(), "k")?;
        let v = cpu_f32(vs, vl, self.name(), "v")?;
        let (o, lse) = self.forward(&q, &k, &v, &n);
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? =
            Some(Lse::Cpu(lse));
        // bf16 inputs (read exactly as f32 above): the output rounded once to bf16.
        let dtype = candle_core::backend::BackendStorage::dtype(qs);
        Ok((
            crate::common::cpu_out(o, dtype),
            Shape::from((n.t, n.h * n.d)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = dims(ql, kl)?;
        let (o, lse) = cuda::forward(self, (qs, ql), (ks, kl), (vs, vl), &n)?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? =
            Some(Lse::Cuda(lse));
        Ok((o, Shape::from((n.t, n.h * n.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t, h, d) = q.dims3()?;
        let (g, s, _) = k.dims3()?;
        let n = Dims { t, h, g, d, s };
        let lse = match self.lse.lock() {
            Ok(mut l) => l.take(),
            Err(_) => None,
        };
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            return cuda::backward(self, q, k, v, o, d_o, lse, &n);
        }
        // In f32 whatever the inputs' dtype (bf16 exactly widened); gradients back in it.
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (qv, kv, vv) = (host(q)?, host(k)?, host(v)?);
        let lse = match lse {
            Some(Lse::Cpu(l)) => l,
            // A second backward (recompute), or logsumexps from another device.
            _ => self.forward(&qv, &kv, &vv, &n).1,
        };
        let (dq, dk, dv) = self.backward(&qv, &kv, &vv, &host(o)?, &host(d_o)?, &lse, &n);
        // Keep the logsumexps for another backward through the same graph.
        if let Ok(mut l) = self.lse.lock() {
            *l = Some(Lse::Cpu(lse));
        }
        let (dev, dt) = (q.device(), q.dtype());
        Ok((
            Some(Tensor::from_vec(dq, (t, h, d), dev)?.to_dtype(dt)?),
            Some(Tensor::from_vec(dk, (g, s, d), dev)?.to_dtype(dt)?),
            Some(Tensor::from_vec(dv, (g, s, d), dev)?.to_dtype(dt)?),
        ))
    }
}

/// Rows per block of the scalar kernels (kernels/attention.cu's FWD_BR, BWD_BR, BWD_BC).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FWD_BR: usize = 32;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const BWD_BR: usize = 16;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const BWD_BC: usize = 16;
/// The tensor-core kernels' rows per block (TC_ROWS = TC_TILE in attention.cu).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const TC_ROWS: usize = 64;

/// The three tensor-core kernels, whose dynamic shared memory differs.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum TcKernel {
    Forward,
    Dq,
    DkDv,
}

/// The launch shape of one kernel over `rows` (query rows or keys) × `grid_y` heads: a
/// tensor-core kernel (`tc`) in blocks of TC_ROWS rows with its dynamic shared memory, a
/// scalar one in blocks of `scalar_rows` rows, 4 threads a row.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(
    tc: Option<TcKernel>,
    d: usize,
    (rows, grid_y): (usize, usize),
    scalar_rows: usize,
) -> LaunchShape {
    match tc {
        Some(which) => LaunchShape {
            grid: (rows.div_ceil(TC_ROWS) as u32, grid_y as u32, 1),
            block: (128, 1, 1),
            shared_mem_bytes: tc_smem(which, d) as u32,
        },
        None => LaunchShape {
            grid: (rows.div_ceil(scalar_rows) as u32, grid_y as u32, 1),
            block: ((scalar_rows * 4) as u32, 1, 1),
            shared_mem_bytes: 0,
        },
    }
}

/// Dynamic shared memory of a tensor-core kernel (the layouts in attention.cu's comments):
/// bf16 tiles of 64 rows × (D + 8), f32 score tiles 64 × 68, bf16 probability tiles 64 × 72.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn tc_smem(which: TcKernel, d: usize) -> usize {
    let tile_h = TC_ROWS * (d + 8) * 2;
    let tile_s = TC_ROWS * (TC_ROWS + 4) * 4;
    let tile_p = TC_ROWS * (TC_ROWS + 8) * 2;
    match which {
        TcKernel::Forward => 3 * tile_h + tile_s + tile_p,
        TcKernel::Dq => 4 * tile_h + 2 * tile_s + tile_p,
        TcKernel::DkDv => 4 * tile_h + 2 * tile_s + 2 * tile_p + 2 * TC_ROWS * 4,
    }
}

/// `attention_bwd_dot_*`'s launch over `rows` = T·H rows: one warp a row, 8 per block.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn dot_launch_shape(rows: usize) -> LaunchShape {
    LaunchShape {
        grid: (rows.div_ceil(8) as u32, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launches of kernels/attention.cu (tile sizes must match its FWD_BR / BWD_BR / BWD_BC).
    use super::{
        cuda_supported, dot_launch_shape, launch_shape, tc_smem, Attention, Dims, Lse, TcKernel,
        BWD_BC, BWD_BR, FWD_BR,
    };
    use crate::common::cuda::{suffix, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};

    const NAME: &str = "causal-attention (cuda)";
    const MAX_DYNAMIC_SMEM: CUfunction_attribute =
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;

    /// [`launch_shape`], with a tensor-core kernel's dynamic shared memory limit raised on `f`.
    fn config(
        f: &CudaFunction,
        tc: Option<TcKernel>,
        d: usize,
        dims: (usize, usize),
        scalar_rows: usize,
    ) -> candle_core::Result<LaunchConfig> {
        if let Some(which) = tc {
            f.set_attribute(MAX_DYNAMIC_SMEM, tc_smem(which, d) as i32)
                .w()?;
        }
        Ok(launch_shape(tc, d, dims, scalar_rows).into())
    }

    /// `attention_<what>_<f32|bf16>[_d<D>]` of kernels/attention.cu.
    fn kernel(what: &str, dtype: DType, d: Option<usize>) -> String {
        match d {
            Some(d) => format!("attention_{what}_{}_d{d}", suffix(dtype)),
            None => format!("attention_{what}_{}", suffix(dtype)),
        }
    }

    fn check(dtype: DType, others: &[DType], n: &Dims) -> candle_core::Result<()> {
        if !cuda_supported(n.d, dtype) || others.iter().any(|&o| o != dtype) {
            candle_core::bail!(
                "{NAME}: head dim {} and dtypes {dtype:?}/{others:?}: the kernels cover head dims 32, 64, 128 and f32 or bf16 (all inputs the same)",
                n.d
            );
        }
        Ok(())
    }

    /// Runs `f` with the contiguous u32 device slice of `t`.
    fn with_u32<R>(
        t: Option<&Tensor>,
        f: impl FnOnce(
            &candle_core::cuda_backend::cudarc::driver::CudaView<'_, u32>,
        ) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let t = t.ok_or_else(|| candle_core::Error::Msg(format!("{NAME}: no device indices")))?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(c) = &*storage else {
            candle_core::bail!("{NAME}: indices not on the GPU");
        };
        let start = layout.start_offset();
        f(&c.as_cuda_slice::<u32>()?
            .slice(start..start + t.elem_count()))
    }

    /// o `[T, H·D]` and the row logsumexps.
    pub(super) fn forward(
        op: &Attention,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        n: &Dims,
    ) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
        check(q.0.dtype(), &[k.0.dtype(), v.0.dtype()], n)?;
        match q.0.dtype() {
            DType::BF16 => forward_typed::<half::bf16>(op, q, k, v, n),
            _ => forward_typed::<f32>(op, q, k, v, n),
        }
    }

    fn forward_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        op: &Attention,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        n: &Dims,
    ) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
        let dev = q.0.device.clone();
        let (qv, kv, vv) = (
            view::<T>(q.0, q.1, NAME, "q")?,
            view::<T>(k.0, k.1, NAME, "k")?,
            view::<T>(v.0, v.1, NAME, "v")?,
        );
        // SAFETY: the kernel writes every row of o and every logsumexp.
        let o = unsafe { dev.alloc::<T>(n.t * n.h * n.d) }?;
        let lse = unsafe { dev.alloc::<f32>(n.t * n.h) }?;
        if n.t > 0 {
            let tc = op.tensor_cores;
            let name = kernel(if tc { "fwd_tc" } else { "fwd" }, T::DTYPE, Some(n.d));
            let f = dev.get_or_load_custom_func(&name, "attention", crate::ptx::ATTENTION)?;
            let (t, h, g, past) = (n.t as i32, n.h as i32, n.g as i32, op.past as i32);
            let which = tc.then_some(TcKernel::Forward);
            let cfg = config(&f, which, n.d, (n.t, n.h), FWD_BR)?;
            with_u32(op.doc_start_dev.as_ref(), |ds| {
                let mut b = f.builder();
                b.arg(&qv).arg(&kv).arg(&vv).arg(ds).arg(&o).arg(&lse);
                b.arg(&t).arg(&h).arg(&g).arg(&past).arg(&op.scale);
                unsafe { b.launch(cfg) }.w().map(|_| ())
            })?;
        }
        Ok((CudaStorage::wrap_cuda_slice(o, dev), lse))
    }

    /// dq, dk, dv through [`AttentionBwd`] (one packed output, split here).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        op: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: Option<Lse>,
        n: &Dims,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match lse {
            Some(Lse::Cuda(l)) => l,
            // A second backward through the same graph: recompute them.
            _ => {
                let (qs, ql) = q.storage_and_layout();
                let (ks, kl) = k.storage_and_layout();
                let (vs, vl) = v.storage_and_layout();
                let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs)
                else {
                    candle_core::bail!("{NAME}: q, k, v not all on the GPU");
                };
                forward(op, (qs, ql), (ks, kl), (vs, vl), n)?.1
            }
        };
        let bwd = AttentionBwd {
            op,
            o: o.contiguous()?,
            d_o: d_o.contiguous()?,
            lse: &lse,
        };
        let packed = q.apply_op3_no_bwd(k, v, &bwd)?;
        drop(bwd);
        // Keep the logsumexps for another backward through the same graph.
        if let Ok(mut l) = op.lse.lock() {
            *l = Some(Lse::Cuda(lse));
        }
        let (nq, nkv) = (n.t * n.h * n.d, n.g * n.s * n.d);
        Ok((
            Some(packed.narrow(0, 0, nq)?.reshape((n.t, n.h, n.d))?),
            Some(packed.narrow(0, nq, nkv)?.reshape((n.g, n.s, n.d))?),
            Some(packed.narrow(0, nq + nkv, nkv)?.reshape((n.g, n.s, n.d))?),
        ))
    }

    /// (q, k, v) → [dq | dk | dv] flat, with o, do and the logsumexps held by the op.
    struct AttentionBwd<'a> {
        op: &'a Attention,
        o: Tensor,
        d_o: Tensor,
        lse: &'a CudaSlice<f32>,
    }

    impl CustomOp3 for AttentionBwd<'_> {
        fn name(&self) -> &'static str {
            "causal-attention-bwd"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("causal-attention-bwd: the CPU backward is Attention::backward")
        }

        fn cuda_fwd(
            &self,
            qs: &CudaStorage,
            ql: &Layout,
            ks: &CudaStorage,
            kl: &Layout,
            vs: &CudaStorage,
            vl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = super::dims(ql, kl)?;
            let (os, ol) = self.o.storage_and_layout();
            let (gs, gl) = self.d_o.storage_and_layout();
            let (Storage::Cuda(os), Storage::Cuda(gs)) = (&*os, &*gs) else {
                candle_core::bail!("{NAME}: o or do not on the GPU");
            };
            check(
                qs.dtype(),
                &[ks.dtype(), vs.dtype(), os.dtype(), gs.dtype()],
                &n,
            )?;
            let args = [(qs, ql), (ks, kl), (vs, vl), (os, ol), (gs, gl)];
            let out = match qs.dtype() {
                DType::BF16 => self.typed::<half::bf16>(&args, &n),
                _ => self.typed::<f32>(&args, &n),
            }?;
            let len = n.t * n.h * n.d + 2 * n.g * n.s * n.d;
            Ok((out, Shape::from(len)))
        }
    }

    impl AttentionBwd<'_> {
        fn typed<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
            &self,
            args: &[(&CudaStorage, &Layout); 5],
            n: &Dims,
        ) -> candle_core::Result<CudaStorage> {
            let dev = args[0].0.device.clone();
            let [q, k, v, o, d_o] = args.map(|(s, l)| view::<T>(s, l, NAME, "input"));
            let (q, k, v, o, d_o) = (q?, k?, v?, o?, d_o?);
            let (nq, nkv) = (n.t * n.h * n.d, n.g * n.s * n.d);
            // Keys no query sees (none without a cache) keep zero gradients: zero-filled.
            let mut out = dev.alloc_zeros::<T>(nq + 2 * nkv)?;
            if n.t == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            let rows = n.t * n.h;
            // SAFETY: one value per row, all written.
            let big_d = unsafe { dev.alloc::<f32>(rows) }?;
            let (rows_i, d_i) = (rows as i32, n.d as i32);
            let f = dev.get_or_load_custom_func(
                &kernel("bwd_dot", T::DTYPE, None),
                "attention",
                crate::ptx::ATTENTION,
            )?;
            let mut b = f.builder();
            b.arg(&d_o).arg(&o).arg(&big_d).arg(&rows_i).arg(&d_i);
            unsafe { b.launch(LaunchConfig::from(dot_launch_shape(rows))) }.w()?;
            let (t, h, g, past) = (n.t as i32, n.h as i32, n.g as i32, self.op.past as i32);
            let scale = self.op.scale;
            let (mut dq, mut dkv) = out.split_at_mut(nq);
            with_u32(self.op.doc_start_dev.as_ref(), |ds| {
                let tc = self.op.tensor_cores;
                let name = kernel(if tc { "bwd_dq_tc" } else { "bwd_dq" }, T::DTYPE, Some(n.d));
                let f = dev.get_or_load_custom_func(&name, "attention", crate::ptx::ATTENTION)?;
                let mut b = f.builder();
                b.arg(&q)
                    .arg(&k)
                    .arg(&v)
                    .arg(&d_o)
                    .arg(self.lse)
                    .arg(&big_d)
                    .arg(ds);
                b.arg(&mut dq)
                    .arg(&t)
                    .arg(&h)
                    .arg(&g)
                    .arg(&past)
                    .arg(&scale);
                let cfg = config(&f, tc.then_some(TcKernel::Dq), n.d, (n.t, n.h), BWD_BR)?;
                unsafe { b.launch(cfg) }.w()?;
                with_u32(self.op.doc_end_dev.as_ref(), |de| {
                    let what = if tc { "bwd_dkdv_tc" } else { "bwd_dkdv" };
                    let name = kernel(what, T::DTYPE, Some(n.d));
                    let f =
                        dev.get_or_load_custom_func(&name, "attention", crate::ptx::ATTENTION)?;
                    let mut b = f.builder();
                    b.arg(&q)
                        .arg(&k)
                        .arg(&v)
                        .arg(&d_o)
                        .arg(self.lse)
                        .arg(&big_d);
                    b.arg(ds).arg(de).arg(&mut dkv);
                    b.arg(&t).arg(&h).arg(&g).arg(&past).arg(&scale);
                    let which = tc.then_some(TcKernel::DkDv);
                    let cfg = config(&f, which, n.d, (n.s, n.g), BWD_BC)?;
                    unsafe { b.launch(cfg) }.w().map(|_| ())
                })
            })?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
    }
}

#[cfg(test)]
mod emulated;
#[cfg(test)]
mod emulated_kernels;
#[cfg(test)]
mod emulated_scalar;
#[cfg(test)]
mod emulated_tc;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{Device, Var, D};

    /// The doc comment's attention in plain candle ops with an additive −∞ mask (as
    /// finetune-model wrote it).
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, doc_start: &[u32], past: usize) -> Tensor {
        let (t, h, d) = q.dims3().unwrap();
        let (g, s, _) = k.dims3().unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    let ok = j < past || (j - past <= i && j - past >= doc_start[i] as usize);
                    if ok {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, t, s), &Device::Cpu).unwrap();
        let rep = |x: &Tensor| {
            x.unsqueeze(1)
                .unwrap()
                .broadcast_as((g, h / g, s, d))
                .unwrap()
                .reshape((h, s, d))
                .unwrap()
        };
        let qh = q.transpose(0, 1).unwrap().contiguous().unwrap();
        let scores = (qh.matmul(&rep(k).t().unwrap()).unwrap() / (d as f64).sqrt())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&rep(v))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((t, h * d))
            .unwrap()
    }

    /// 3 documents of 4, 1 and 6 tokens; 4 query heads over 2 key/value heads of 8.
    fn sample(past: usize) -> (Tensor, Tensor, Tensor, Vec<u32>, Tensor) {
        let doc_start = vec![0, 0, 0, 0, 4, 5, 5, 5, 5, 5, 5];
        let t = doc_start.len();
        (
            tensor(&[t, 4, 8], 41),
            tensor(&[2, past + t, 8], 42),
            tensor(&[2, past + t, 8], 43),
            doc_start,
            tensor(&[t, 32], 44),
        )
    }

    #[test]
    fn forward_equals_the_masked_plain_formula() {
        for past in [0, 3] {
            let (q, k, v, ds, _) = sample(past);
            let scale = 1.0 / 8f64.sqrt();
            let got = causal_attention(&q, &k, &v, &ds, past, scale).unwrap();
            let d = rel_diff(&got, &plain(&q, &k, &v, &ds, past));
            assert!(d < 1e-6, "past {past}: {d}");
        }
    }

    #[test]
    fn gradients_equal_autograd_of_the_plain_formula() {
        for past in [0, 3] {
            let (q, k, v, ds, g) = sample(past);
            let vars: Vec<Var> = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap()).to_vec();
            let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let loss = |y: Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let ours = loss(causal_attention(qv, kv, vv, &ds, past, 1.0 / 8f64.sqrt()).unwrap());
            let theirs = loss(plain(qv, kv, vv, &ds, past));
            for (what, x) in [("dq", qv), ("dk", kv), ("dv", vv)] {
                let d = rel_diff(ours.get(x).unwrap(), theirs.get(x).unwrap());
                assert!(d < 1e-5, "past {past} {what}: {d}");
            }
        }
    }

    /// bf16 inputs on the CPU (a bf16 model's attention there): the output and the gradients
    /// come back in bf16; the output is the f32 computation on the same (bf16) values rounded
    /// once (read exactly as f32, computed in f32), the gradients within bf16's precision of it.
    #[test]
    fn bf16_inputs_give_the_f32_result_rounded_once_on_the_cpu() {
        use candle_core::DType;
        let (q, k, v, ds, g) = sample(3);
        let round = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let (qb, kb, vb, gb) = (round(&q), round(&k), round(&v), round(&g));
        let widen = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let run = |q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor| {
            let vars: Vec<Var> = [q, k, v].map(|x| Var::from_tensor(x).unwrap()).to_vec();
            let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let y = causal_attention(qv, kv, vv, &ds, 3, 1.0 / 8f64.sqrt()).unwrap();
            let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
            let d = [qv, kv, vv].map(|x| grads.get(x).unwrap().clone());
            (y, d)
        };
        let (y, d) = run(&qb, &kb, &vb, &gb);
        let (y32, d32) = run(&widen(&qb), &widen(&kb), &widen(&vb), &widen(&gb));
        assert_eq!(y.dtype(), DType::BF16);
        let bits = |t: &Tensor| -> Vec<u16> {
            let v: Vec<half::bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&y), bits(&round(&y32)), "output");
        // The backward reads the bf16-rounded output (as the GPU kernels do): within bf16's
        // rounding of the f32 gradients, not bit for bit.
        for (what, (a, b)) in ["dq", "dk", "dv"].iter().zip(d.iter().zip(&d32)) {
            assert_eq!(a.dtype(), DType::BF16, "{what}");
            let r = rel_diff(&widen(a), b);
            assert!(r < 1e-2, "{what}: {r}");
        }
    }

    /// 40 tokens in documents of 9, 1, 17 and 13 tokens, so that blocks of 1, 3, 4 and 16
    /// tokens start inside documents, hold several, and key blocks straddle the cached keys.
    fn long_sample(past: usize) -> (Tensor, Tensor, Tensor, Vec<u32>, Tensor) {
        let mut doc_start = Vec::new();
        let mut start = 0u32;
        for len in [9u32, 1, 17, 13] {
            doc_start.extend(std::iter::repeat_n(start, len as usize));
            start += len;
        }
        let t = doc_start.len();
        (
            tensor(&[t, 6, 16], 51),
            tensor(&[3, past + t, 16], 52),
            tensor(&[3, past + t, 16], 53),
            doc_start,
            tensor(&[t, 96], 54),
        )
    }

    #[test]
    fn every_block_size_gives_the_plain_formula_and_its_gradients() {
        for past in [0, 5] {
            for (q, k, v, ds, g) in [sample(past), long_sample(past)] {
                let d = q.dim(2).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let vars: Vec<Var> = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap()).to_vec();
                let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor());
                let want_y = plain(qv, kv, vv, &ds, past);
                let want = (&want_y * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for block in [1, 3, 4, 16, 64] {
                    let docs = Documents::new(&ds, &Device::Cpu).unwrap();
                    let y = causal_attention_blocked(qv, kv, vv, &docs, past, scale, block, false)
                        .unwrap();
                    let dy = rel_diff(&y, &want_y);
                    assert!(dy < 1e-6, "past {past} block {block}: y {dy}");
                    let got = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    for (what, x) in [("dq", qv), ("dk", kv), ("dv", vv)] {
                        let d = rel_diff(got.get(x).unwrap(), want.get(x).unwrap());
                        assert!(d < 1e-5, "past {past} block {block} {what}: {d}");
                    }
                }
            }
        }
    }

    /// The CUDA kernels against the CPU reference: head dims 32 and 128, 70 tokens in 4
    /// documents (several query and key tiles, documents crossing tile edges), with and
    /// without cached keys, f32 and bf16 storage, forward and all three gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_forward_and_gradients_equal_the_cpu_reference() {
        use candle_core::DType;
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        // 70 tokens in 4 documents (tiles of 16/32 and 64 rows cross document edges), and 150
        // in 3 (several 64-row tiles of the tensor-core kernels, a one-token document).
        let layouts: [&[(u32, u32)]; 2] = [
            &[(0, 20), (20, 1), (21, 30), (51, 19)],
            &[(0, 60), (60, 1), (61, 89)],
        ];
        for docs in layouts {
            let mut doc_start = Vec::new();
            for &(start, len) in docs {
                doc_start.extend(std::iter::repeat_n(start, len as usize));
            }
            let t = doc_start.len();
            for d in [32, 64, 128] {
                for past in [0, 5] {
                    let (q, k, v) = (
                        tensor(&[t, 4, d], 51),
                        tensor(&[2, past + t, d], 52),
                        tensor(&[2, past + t, d], 53),
                    );
                    let g = tensor(&[t, 4 * d], 54);
                    let scale = 1.0 / (d as f64).sqrt();
                    let run = |q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, tc: bool| {
                        let vars: Vec<Var> =
                            [q, k, v].map(|x| Var::from_tensor(x).unwrap()).to_vec();
                        let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor());
                        // The documents made on q's device, once per call here (the model
                        // makes them once per sequence).
                        let docs = Documents::new(&doc_start, qv.device()).unwrap();
                        let y = causal_attention_blocked(qv, kv, vv, &docs, past, scale, BLOCK, tc)
                            .unwrap();
                        let grads = (y.to_dtype(DType::F32).unwrap()
                            * g.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                        let gr = [qv, kv, vv].map(|x| grads.get(x).unwrap().clone());
                        (y, gr)
                    };
                    let (want_y, want_g) = run(&q, &k, &v, &g, false);
                    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                        for tc in [false, true] {
                            if tc && !tensor_cores_cover(d, dtype) {
                                continue;
                            }
                            let on =
                                |x: &Tensor| x.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
                            let (y, gr) = run(&on(&q), &on(&k), &on(&v), &on(&g), tc);
                            let dy = rel_diff(&y, &want_y);
                            let dg: Vec<f32> =
                                (0..3).map(|i| rel_diff(&gr[i], &want_g[i])).collect();
                            let what = format!(
                                "T {t} d {d} past {past} {dtype:?}{}",
                                if tc { " tensor cores" } else { "" }
                            );
                            eprintln!(
                                "attention cuda {what}: o {dy:e}, dq {:e}, dk {:e}, dv {:e}",
                                dg[0], dg[1], dg[2]
                            );
                            assert!(dy < tol, "{what}: o {dy}");
                            for (name, e) in ["dq", "dk", "dv"].iter().zip(&dg) {
                                assert!(*e < tol, "{what}: {name} {e}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Documents made once serve every call (as the model uses them for all its layers) and
    /// give what the per-call form gives; a sequence of another length is refused.
    #[test]
    fn documents_made_once_equal_the_per_call_form() {
        let (q, k, v, ds, _) = long_sample(5);
        let docs = Documents::new(&ds, &Device::Cpu).unwrap();
        assert_eq!(docs.starts(), ds.as_slice());
        let once = causal_attention_docs(&q, &k, &v, &docs, 5, 0.25).unwrap();
        let per_call = causal_attention(&q, &k, &v, &ds, 5, 0.25).unwrap();
        assert_eq!(rel_diff(&once, &per_call), 0.0);
        let short = Documents::new(&ds[..10], &Device::Cpu).unwrap();
        let err = causal_attention_docs(&q, &k, &v, &short, 5, 0.25)
            .unwrap_err()
            .to_string();
        assert!(err.contains("got 10 values"), "{err}");
    }

    #[test]
    fn bad_document_starts_are_refused() {
        let (q, k, v, mut ds, _) = sample(0);
        ds[2] = 3;
        let err = causal_attention(&q, &k, &v, &ds, 0, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("doc_start"), "{err}");
    }
}
