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
//! CPU only so far; a CUDA kernel is future work (issue #9): `cuda_fwd` is candle's default
//! error, so callers use it on CPU tensors only.

use crate::common::{cpu_f32, exp_sub_sum, gemm_f32, max, simd};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
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
    causal_attention_blocked(q, k, v, doc_start, past, scale, BLOCK)
}

/// [`causal_attention`] with `block` rows per task (tests use small blocks so that a few
/// tokens span several).
fn causal_attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    doc_start: &[u32],
    past: usize,
    scale: f64,
    block: usize,
) -> candle_core::Result<Tensor> {
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
    if doc_start.len() != t
        || doc_start
            .iter()
            .enumerate()
            .any(|(i, &s)| s as usize > i || (i > 0 && s < doc_start[i - 1]))
    {
        candle_core::bail!(
            "attention: doc_start must hold {t} non-decreasing values with doc_start[i] ≤ i"
        );
    }
    let op = Attention {
        doc_start: doc_start.to_vec(),
        past,
        scale: scale as f32,
        block: block.max(1),
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The op; `lse` keeps the forward's row logsumexps (`[T·H]`) for the backward.
pub struct Attention {
    doc_start: Vec<u32>,
    past: usize,
    scale: f32,
    block: usize,
    lse: Mutex<Option<Vec<f32>>>,
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
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? = Some(lse);
        Ok((CpuStorage::F32(o), Shape::from((n.t, n.h * n.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (t, h, d) = q.dims3()?;
        let (g, s, _) = k.dims3()?;
        let n = Dims { t, h, g, d, s };
        let lse = match self.lse.lock() {
            Ok(mut l) => l.take(),
            Err(_) => None,
        };
        let (qv, kv, vv) = (host(q)?, host(k)?, host(v)?);
        let lse = match lse {
            Some(l) => l,
            None => self.forward(&qv, &kv, &vv, &n).1, // a second backward: recompute
        };
        let (dq, dk, dv) = self.backward(&qv, &kv, &vv, &host(o)?, &host(d_o)?, &lse, &n);
        // Keep the logsumexps for another backward through the same graph.
        if let Ok(mut l) = self.lse.lock() {
            *l = Some(lse);
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (t, h, d), dev)?),
            Some(Tensor::from_vec(dk, (g, s, d), dev)?),
            Some(Tensor::from_vec(dv, (g, s, d), dev)?),
        ))
    }
}

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
                    let y = causal_attention_blocked(qv, kv, vv, &ds, past, scale, block).unwrap();
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
