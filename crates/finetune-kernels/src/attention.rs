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
//! dq in parallel over query rows, dk and dv in parallel over key rows (no atomics).
//!
//! CPU only so far (rayon, f32); a CUDA kernel is future work (issue #9): `cuda_fwd` is
//! candle's default error, so callers use it on CPU tensors only.

use crate::common::cpu_f32;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

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
    lse: Mutex<Option<Vec<f32>>>,
}

struct Dims {
    t: usize,
    h: usize,
    g: usize,
    d: usize,
    s: usize,
}

impl Attention {
    /// The key indices query i sees: [0, past) and [past + doc_start[i], past + i].
    fn keys(&self, i: usize) -> impl Iterator<Item = usize> {
        (0..self.past).chain(self.past + self.doc_start[i] as usize..=self.past + i)
    }

    /// o and the row logsumexps, rows in (token, head) order.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], n: &Dims) -> (Vec<f32>, Vec<f32>) {
        let Dims { t, h, g, d, s } = *n;
        let group = h / g;
        let mut o = vec![0f32; t * h * d];
        let mut lse = vec![0f32; t * h];
        o.par_chunks_mut(d)
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each_init(Vec::new, |scores, (row, (o, lse))| {
                let (i, head) = (row / h, row % h);
                let qi = &q[row * d..][..d];
                let kv = head / group * s * d;
                scores.clear();
                let mut m = f32::NEG_INFINITY;
                for j in self.keys(i) {
                    let sc = dot(qi, &k[kv + j * d..][..d]) * self.scale;
                    m = m.max(sc);
                    scores.push(sc);
                }
                let mut l = 0f32;
                for (j, sc) in self.keys(i).zip(scores.iter_mut()) {
                    *sc = (*sc - m).exp();
                    l += *sc;
                    axpy(*sc, &v[kv + j * d..][..d], o);
                }
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x *= inv);
                *lse = m + l.ln();
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
        let group = h / g;
        let scale = self.scale;
        // D_i = do_i · o_i per (token, head) row.
        let big_d: Vec<f32> = d_o
            .par_chunks(d)
            .zip(o.par_chunks(d))
            .map(|(a, b)| dot(a, b))
            .collect();
        // dq: per query row.
        let mut dq = vec![0f32; t * h * d];
        dq.par_chunks_mut(d).enumerate().for_each(|(row, dq)| {
            let (i, head) = (row / h, row % h);
            let (qi, doi) = (&q[row * d..][..d], &d_o[row * d..][..d]);
            let kv = head / group * s * d;
            for j in self.keys(i) {
                let (kj, vj) = (&k[kv + j * d..][..d], &v[kv + j * d..][..d]);
                let p = (dot(qi, kj) * scale - lse[row]).exp();
                let ds = p * (dot(doi, vj) - big_d[row]);
                axpy(ds * scale, kj, dq);
            }
        });
        // The last token of each token's document: key past + j is seen by queries
        // j..=doc_end[j] (and cached keys by every query).
        let mut doc_end = vec![0usize; t];
        for i in (0..t).rev() {
            doc_end[i] = if i + 1 < t && self.doc_start[i + 1] == self.doc_start[i] {
                doc_end[i + 1]
            } else {
                i
            };
        }
        // dk, dv: per key row (kv head, key j), over the query heads of its group.
        let mut dkv = vec![0f32; 2 * g * s * d];
        let (dk, dv) = dkv.split_at_mut(g * s * d);
        dk.par_chunks_mut(d)
            .zip(dv.par_chunks_mut(d))
            .enumerate()
            .for_each(|(krow, (dk, dv))| {
                let (kvh, j) = (krow / s, krow % s);
                let (kj, vj) = (&k[krow * d..][..d], &v[krow * d..][..d]);
                let queries = if j < self.past {
                    0..t
                } else {
                    (j - self.past)..doc_end[j - self.past] + 1
                };
                for i in queries {
                    for head in kvh * group..(kvh + 1) * group {
                        let row = i * h + head;
                        let (qi, doi) = (&q[row * d..][..d], &d_o[row * d..][..d]);
                        let p = (dot(qi, kj) * scale - lse[row]).exp();
                        let ds = p * (dot(doi, vj) - big_d[row]);
                        axpy(p, doi, dv);
                        axpy(ds * scale, qi, dk);
                    }
                }
            });
        let dv = dkv.split_off(g * s * d);
        (dq, dkv, dv)
    }
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

/// y += a·x
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
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
