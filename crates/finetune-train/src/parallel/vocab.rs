//! Vocabulary parallelism under tensor parallelism (Megatron's vocab-parallel embedding and
//! cross-entropy): tensor-parallel rank t of T holds rows [`shard`]`(V, T, t)` of embed_tokens
//! and of lm_head (the same rows of the same tensor with tied embeddings), about V/T each; V
//! need not divide by T (the first V mod T shards hold one row more).
//!
//! - Embedding ([`embed`]): each rank looks up only the ids in its rows (zero rows elsewhere),
//!   and the tp group all-reduces: exactly the whole lookup, since each row has one non-zero
//!   term. Its adjoint (the backward of an all-reduce whose inputs are disjoint partials) is
//!   the identity into a frozen table, so the backward does nothing there.
//! - Loss ([`loss_and_grad`]), chunked over the target rows like `Qwen3Moe::head_loss_sum`
//!   (at most about `chunk_elems` logits exist at once, no `[T, V]` logits anywhere): per chunk
//!   of rows, z = norm(x)·W_tᵀ on the local rows; the row max is all-gathered over the group
//!   and maxed (m), the local Σ exp(z − m) and the target logit (from the rank whose rows hold
//!   the target, 0 elsewhere) are all-reduced (one collective for both), and the row's loss is
//!   ln Σ + m − z_target. Gradient: softmax − onehot on the local rows times W_t gives the
//!   rank's partial ∂/∂norm(x); one all-reduce over the group sums the partials (once, after
//!   the chunks), and the final norm's backward turns it into ∂/∂x.
//!
//! A rank's model holds only its rows of embed_tokens and lm_head (`super::load_rank_model`);
//! [`embed`] and [`loss_and_grad`] ask for exactly those rows.
//!
//! Every rank of a tp group holds the same hidden states and labels, so they run the same
//! number of chunks (sized on the largest shard) and the same collectives in the same order.

use super::collective::Collective;
use crate::TrainError;
use candle_core::{DType, Tensor, Var};
use finetune_model::Qwen3Moe;
use std::ops::Range;

/// Rows of a `vocab`-row table held by tensor-parallel rank `t` of `tp`: contiguous, the first
/// `vocab % tp` shards one row longer.
pub fn shard(vocab: usize, tp: usize, t: usize) -> Range<usize> {
    let (base, extra) = (vocab / tp, vocab % tp);
    let start = t * base + t.min(extra);
    start..start + base + usize::from(t < extra)
}

/// The embeddings of `ids`, each rank of `tp` contributing the rows it holds.
pub(crate) fn embed(
    model: &Qwen3Moe,
    tp: &dyn Collective,
    ids: &[u32],
) -> Result<Tensor, TrainError> {
    let rows = shard(model.config.vocab_size, tp.size(), tp.rank());
    let local = model.embed_tokens_rows(ids, rows)?;
    // In the compute dtype: each element has one non-zero term, so the sum is exact.
    Ok(tp.all_reduce_sum(&local)?)
}

/// The summed cross-entropy of the last hidden state `x` `[T, H]` against `labels` (position t
/// predicts labels[t + 1]; −100 ignored), and with `scale` = Some(s) the gradient of s · loss
/// with respect to `x`; computed without gathering the logits (module doc). Every rank of the
/// group gets the same loss and gradient.
pub(crate) fn loss_and_grad(
    model: &Qwen3Moe,
    tp: &dyn Collective,
    x: &Tensor,
    labels: &[i64],
    scale: Option<f64>,
    chunk_elems: usize,
) -> Result<(f64, Option<Tensor>), TrainError> {
    let (size, vocab) = (tp.size(), model.config.vocab_size);
    let rows = shard(vocab, size, tp.rank());
    let widest = shard(vocab, size, 0).len();
    let dev = x.device();
    let (t, _) = x.dims2()?;
    if labels.len() != t {
        return Err(TrainError::Options(format!(
            "{} labels for {t} positions",
            labels.len()
        )));
    }
    let xv = Var::from_tensor(&x.detach())?;
    let normed = model.final_norm(xv.as_tensor())?;
    let h = normed.detach();
    let w = model.lm_head_rows(rows.clone(), h.dtype())?;
    let wt = w.t()?;
    // Position t predicts labels[t + 1]; the last position predicts nothing.
    let targets: Vec<i64> = labels[1..].iter().copied().chain([-100]).collect();
    if let Some(bad) = targets.iter().find(|&&l| l >= vocab as i64) {
        return Err(TrainError::Options(format!(
            "label {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let keep: Vec<u32> = (0..t as u32)
        .filter(|&i| targets[i as usize] >= 0)
        .collect();
    let keep_idx = Tensor::new(keep.as_slice(), dev)?;
    let hk = if keep.len() == t {
        h.clone()
    } else {
        h.index_select(&keep_idx, 0)?
    };
    let per = (chunk_elems / widest).max(1);
    let mut loss = Tensor::zeros((), DType::F32, dev)?;
    let mut dh_parts = Vec::new();
    for start in (0..keep.len()).step_by(per) {
        let n = per.min(keep.len() - start);
        let z = hk.narrow(0, start, n)?.matmul(&wt)?.to_dtype(DType::F32)?;
        let m = tp
            .all_gather(&z.max_keepdim(1)?)?
            .reshape((size, n))?
            .max(0)?
            .reshape((n, 1))?;
        let e = z.broadcast_sub(&m)?.exp()?;
        // The target's column in this shard (0 with weight 0 when another rank holds it).
        let (mut local, mut inside) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &row in &keep[start..start + n] {
            let tg = targets[row as usize] as usize;
            let mine = rows.contains(&tg);
            local.push(if mine { (tg - rows.start) as u32 } else { 0 });
            inside.push(f32::from(u8::from(mine)));
        }
        let local = Tensor::from_vec(local, (n, 1), dev)?;
        let inside = Tensor::from_vec(inside, (n, 1), dev)?;
        let z_target = (z.gather(&local, 1)? * &inside)?;
        let sums = tp.all_reduce_sum(&Tensor::cat(&[&e.sum_keepdim(1)?, &z_target], 1)?)?;
        let (s, z_target) = (sums.narrow(1, 0, 1)?, sums.narrow(1, 1, 1)?);
        loss = (loss + ((s.log()? + &m)? - z_target)?.sum_all()?)?;
        if scale.is_some() {
            let dz = e
                .broadcast_div(&s)?
                .scatter_add(&local, &inside.neg()?, 1)?;
            dh_parts.push(dz.to_dtype(w.dtype())?.matmul(&w)?);
        }
    }
    let loss = loss.to_scalar::<f32>()? as f64;
    let Some(scale) = scale else {
        return Ok((loss, None));
    };
    if dh_parts.is_empty() {
        // No target in the sequence (the same on every rank of the group: same labels).
        return Ok((loss, Some(x.zeros_like()?)));
    }
    let dh_kept = Tensor::cat(&dh_parts, 0)?.to_dtype(DType::F32)?;
    let dh_local = if keep.len() == t {
        dh_kept
    } else {
        Tensor::zeros((t, h.dim(1)?), DType::F32, dev)?.index_add(&keep_idx, &dh_kept, 0)?
    };
    let dh = (tp.all_reduce_sum(&dh_local)? * scale)?.to_dtype(h.dtype())?;
    let store = (normed * dh)?.sum_all()?.backward()?;
    let g = match store.get(xv.as_tensor()) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    Ok((loss, Some(g)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::CpuCollective;
    use candle_core::Device;
    use finetune_model::{Preset, Weights};
    use std::time::Duration;

    /// tp 3 over a vocabulary of 301 (101 + 100 + 100 rows), tied embeddings, 2-row chunks:
    /// every rank's loss and ∂loss/∂x equal the single-device fused head + loss
    /// (`Qwen3Moe::head_loss_sum`), and the sharded embedding equals the whole lookup exactly;
    /// each rank's model holds only its rows (a sharded load), and gives bit for bit what the
    /// whole model's rows give.
    #[test]
    fn three_shards_give_the_whole_head_loss_and_embedding() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Preset::Tiny.config();
        c.vocab_size = 301;
        c.num_hidden_layers = 1;
        c.tie_word_embeddings = true;
        finetune_model::init::write_random_checkpoint(&c, 5, dir.path()).unwrap();
        let weights = Weights::open(dir.path(), &Device::Cpu).unwrap();
        let model = Qwen3Moe::load(c.clone(), &weights, &Device::Cpu).unwrap();
        let shards: Vec<Qwen3Moe> = (0..3)
            .map(|r| {
                let mut s = finetune_model::BaseShard::whole(&c);
                s.vocab = shard(301, 3, r);
                let w = Weights::open(dir.path(), &Device::Cpu).unwrap();
                Qwen3Moe::load_shard(c.clone(), &w, &Device::Cpu, &s).unwrap()
            })
            .collect();
        // Sharded models hold only their rows: the whole-vocabulary paths refuse.
        let e = shards[1].embed_tokens(&[0]).unwrap_err().to_string();
        assert!(e.contains("151..") || e.contains("101..201"), "{e}");
        let t = 9;
        // Deterministic hidden states of unit scale.
        let x = (Tensor::arange(0f32, (t * c.hidden_size) as f32, &Device::Cpu).unwrap() * 0.37)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((t, c.hidden_size))
            .unwrap();
        // Targets on every shard, one ignored, one on each shard boundary.
        let labels: Vec<i64> = vec![-100, 0, 100, 101, -100, 200, 201, 300, 57];
        let ids: Vec<u32> = vec![0, 100, 101, 200, 201, 300, 7, 150, 299];
        let xv = Var::from_tensor(&x).unwrap();
        let want = model.head_loss_sum(xv.as_tensor(), &labels).unwrap();
        let want_g = (&want * 0.5)
            .unwrap()
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap()
            .clone();
        let want = want.to_scalar::<f32>().unwrap() as f64;
        let want_e = model.embed_tokens(&ids).unwrap();
        let group = CpuCollective::group(3, Duration::from_secs(60));
        let got: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = group
                .into_iter()
                .map(|comm| {
                    let (model, x, labels, ids) = (&model, &x, &labels, &ids);
                    let own = &shards[comm.rank()];
                    s.spawn(move || {
                        let (loss, g) =
                            loss_and_grad(model, &comm, x, labels, Some(0.5), 2 * 101).unwrap();
                        // The rank's own shard: the same numbers, bit for bit.
                        let (l2, g2) =
                            loss_and_grad(own, &comm, x, labels, Some(0.5), 2 * 101).unwrap();
                        assert_eq!(l2.to_bits(), loss.to_bits());
                        let (g, g2) = (g.unwrap(), g2.unwrap());
                        let bits = |t: &Tensor| -> Vec<u32> {
                            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                            v.into_iter().map(f32::to_bits).collect()
                        };
                        assert!(bits(&g) == bits(&g2), "rank {}: ∂x", comm.rank());
                        let e1 = embed(model, &comm, ids).unwrap();
                        let e2 = embed(own, &comm, ids).unwrap();
                        assert!(bits(&e1) == bits(&e2), "rank {}: embedding", comm.rank());
                        let (loss_only, none) =
                            loss_and_grad(model, &comm, x, labels, None, 1 << 20).unwrap();
                        assert!(none.is_none());
                        (loss, g, loss_only, embed(model, &comm, ids).unwrap())
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (rank, (loss, g, loss_only, e)) in got.iter().enumerate() {
            assert!((loss - want).abs() <= 1e-5, "rank {rank}: {loss} vs {want}");
            assert!((loss_only - want).abs() <= 1e-5, "rank {rank}: {loss_only}");
            let d = (g - &want_g)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d <= 1e-6, "rank {rank}: ∂x differs by {d}");
            let de = (e - &want_e)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(de, 0.0, "rank {rank}: embedding");
        }
    }

    #[test]
    fn shards_cover_the_vocabulary_once_in_order() {
        for (v, tp) in [(300, 2), (301, 2), (8191, 4), (7, 7), (10, 3)] {
            let mut next = 0;
            for t in 0..tp {
                let r = shard(v, tp, t);
                assert_eq!(r.start, next, "v {v} tp {tp} t {t}");
                assert!(r.len() == v / tp || r.len() == v / tp + 1, "{r:?}");
                next = r.end;
            }
            assert_eq!(next, v);
        }
        assert_eq!(shard(301, 2, 0), 0..151);
        assert_eq!(shard(301, 3, 0), 0..101);
        assert_eq!(shard(301, 2, 1), 151..301);
    }
}
