//! One rank's forward and backward of one packed sequence under a [`Layout`]: each layer runs
//! as segments separated by collectives, and the backward walks the segments in reverse,
//! calling the adjoint collective between them explicitly (so every rank makes the same
//! collective calls in the same order, whatever its graph looks like):
//!
//! ```text
//! forward                                   backward (g = ∂loss/∂ layer output)
//! p  = attention of my heads (x)            ∂p: backprop Σ p·g_h → LoRA grads, ĝx
//! h  = x + all_reduce_tp(p)                 g_x = g_h + all_reduce_tp(ĝx)   (Megatron's f/g)
//! n2 = norm(h); w, routes = router(n2)      MoE:
//! send = n2[tokens for my tp slice of       ĝ1 = ∂(Σ o·g)/∂h (router weights), ∂/∂yback
//!        experts], grouped by owner         ∂yrecv = a2a(∂yback)            (reverse combine)
//! recv = a2a(send)                          backprop Σ yrecv·∂yrecv → expert LoRA grads, ∂recv
//! yrecv = my experts (recv)                 ∂send = a2a(∂recv)              (reverse dispatch)
//! yback = a2a(yrecv)                        ĝ3 = ∂(Σ send·∂send)/∂h
//! o = Σ w · yback (my slice of experts)     g_h = g + all_reduce_tp(ĝ1 + ĝ3)
//! y = h + all_reduce_tp(o)                  dense MLP (replicated over tp): g_h = g + ∂(Σ o·g)/∂h
//! ```
//!
//! The LoRA gradients a rank gets are its share: attention adapters from its heads and its
//! tokens, expert adapters from its experts and the tokens of its all-to-all group, dense-MLP
//! adapters from its tokens (identical on the ranks of a tensor-parallel group). `RankContext`
//! sums them over the right groups, bucket by bucket as the backward finishes the layers
//! (the `layer_done` callback, `buckets`).
//!
//! Base weights: the rank's model holds only its shard (`super::load_rank_model`): the engine
//! asks for its heads (`attention_heads`), its experts (`expert_forward`, global indices) and
//! its vocabulary rows (`vocab`), and the model computes with the rows it holds, no whole
//! tensor narrowed.
//!
//! Dtypes: a rank computes in its model's compute dtype (`Qwen3Moe::compute_dtype`: bf16 on a
//! GPU, f32 on the CPU unless asked otherwise), as the single-device path does: hidden states,
//! the all-reduced attention and MoE partial sums, the all-to-all payloads and their gradients
//! are in that dtype (the CPU collectives sum in f32 and round once); the LoRA paths run in f32
//! (their gradients arrive in f32 for the f32 master weights), the expert counts travel in f32,
//! and the loss is f32.
//!
//! Around the layers: under tensor parallelism the embedding and the head + loss are
//! vocabulary-parallel (`vocab`: embedding = all_reduce_tp(my rows' lookup); loss from the
//! local logits with all-reduced max, Σ exp and target logit; ∂x = norm backward of
//! all_reduce_tp(my rows' ∂)); otherwise every rank runs them whole.

use super::layout::{Coords, Layout};
use super::{vocab, RankContext};
use crate::TrainError;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use finetune_data::Sequence;
use finetune_kernels::moe_permute::{gather_rows, slot_weights, sum_rows, Permutation};
use finetune_model::{Lora, Qwen3Moe, SequenceContext};
use std::sync::Arc;

struct MoeTape {
    send: Tensor,
    send_counts: Vec<usize>,
    recv: Var,
    recv_counts: Vec<usize>,
    yrecv: Tensor,
    yback: Var,
}

struct LayerTape {
    xin: Var,
    attn: Tensor,
    h: Var,
    /// The MLP output: this rank's partial sum over its experts (MoE), or the whole dense MLP.
    out: Tensor,
    moe: Option<MoeTape>,
}

/// Forward of layer `l` on input `x` (a plain tensor): its tape and its output.
fn layer(
    model: &Qwen3Moe,
    lora: &Lora,
    rc: &RankContext,
    ctx: &SequenceContext,
    l: usize,
    x: &Tensor,
) -> Result<(LayerTape, Tensor), TrainError> {
    let (lay, k) = (rc.layout, rc.coords);
    let dev = x.device().clone();
    let (t_len, hidden) = x.dims2()?;
    let heads = lay.heads(k.t, model.config.num_attention_heads);
    let xin = Var::from_tensor(x)?;
    let attn = model.attention_heads(l, xin.as_tensor(), ctx, Some(lora), heads)?;
    let attn_full = rc.comms.tp.all_reduce_sum(&attn.detach())?;
    let h = Var::from_tensor(&(x.detach() + attn_full)?)?;
    let n2 = model.post_attention_norm(l, h.as_tensor())?;
    let (out, moe) = if model.layer_is_moe(l) {
        let (out, tape) = moe_forward(model, lora, rc, ctx, l, &n2, t_len, hidden, &dev)?;
        (out, Some(tape))
    } else {
        (
            model.dense_mlp(l, &n2, Some(lora), &ctx.dropout_rows())?,
            None,
        )
    };
    let y = match moe {
        Some(_) => (h.as_tensor().detach() + rc.comms.tp.all_reduce_sum(&out.detach())?)?,
        None => (h.as_tensor().detach() + out.detach())?,
    };
    Ok((
        LayerTape {
            xin,
            attn,
            h,
            out,
            moe,
        },
        y,
    ))
}

/// A forward: each layer's tape (or, with `recompute`, only its input, the layer being
/// replayed in the backward — collectives included, in the same order on every rank), the
/// summed cross-entropy and, when asked for, its gradient (divided by the step's target
/// count) with respect to the last hidden state.
struct Forward {
    ctx: SequenceContext,
    tapes: Vec<Option<LayerTape>>,
    inputs: Vec<Tensor>,
    loss_sum: f64,
    g_top: Option<Tensor>,
}

/// Forward of `seq` (number `number` of the run: its dropout masks' key); with `n_step` also
/// ∂(loss_sum / n_step)/∂(last hidden state). Under
/// tensor parallelism with [`RankContext::vocab_parallel`] the embedding and the head are
/// vocabulary-parallel ([`super::vocab`]); otherwise every tp rank runs them whole (the
/// chunked `Qwen3Moe::head_loss_sum`).
fn forward(
    model: &Qwen3Moe,
    lora: &Lora,
    rc: &RankContext,
    seq: &Sequence,
    number: u64,
    recompute: bool,
    n_step: Option<f64>,
) -> Result<Forward, TrainError> {
    let mut ctx = model.sequence_context(&seq.position_ids, 0)?;
    ctx.set_dropout_sequence(number);
    let vocab_parallel = rc.vocab_parallel_active();
    let tp = rc.comms.tp.as_ref();
    let mut x = if vocab_parallel {
        vocab::embed(model, tp, &seq.ids)?
    } else {
        model.embed_tokens(&seq.ids)?
    };
    let mut tapes = Vec::with_capacity(model.num_layers());
    let mut inputs = Vec::with_capacity(model.num_layers());
    for l in 0..model.num_layers() {
        let (tape, y) = layer(model, lora, rc, &ctx, l, &x)?;
        if recompute {
            inputs.push(x);
            tapes.push(None);
        } else {
            tapes.push(Some(tape));
        }
        x = y;
    }
    let (loss_sum, g_top) = if vocab_parallel {
        let chunk = rc
            .vocab_chunk_elems
            .unwrap_or_else(|| finetune_kernels::cross_entropy::default_chunk_elems(x.device()));
        vocab::loss_and_grad(model, tp, &x, &seq.labels, n_step.map(|n| 1.0 / n), chunk)?
    } else {
        match n_step {
            Some(n) => {
                let top = Var::from_tensor(&x)?;
                let loss = model.head_loss_sum(top.as_tensor(), &seq.labels)?;
                let store = (&loss / n)?.backward()?;
                (
                    loss.to_scalar::<f32>()? as f64,
                    Some(grad_or_zeros(&store, &top)?),
                )
            }
            None => {
                let loss = model.head_loss_sum(&x.detach(), &seq.labels)?;
                (loss.to_scalar::<f32>()? as f64, None)
            }
        }
    };
    Ok(Forward {
        ctx,
        tapes,
        inputs,
        loss_sum,
        g_top,
    })
}

#[allow(clippy::too_many_arguments)]
fn moe_forward(
    model: &Qwen3Moe,
    lora: &Lora,
    rc: &RankContext,
    ctx: &SequenceContext,
    l: usize,
    n2: &Tensor,
    t_len: usize,
    hidden: usize,
    dev: &candle_core::Device,
) -> Result<(Tensor, MoeTape), TrainError> {
    let lay: Layout = rc.layout;
    let k: Coords = rc.coords;
    let n_exp = model.config.num_experts;
    let per = n_exp / lay.ep;
    let a2a = lay.a2a();
    let (weights, routed) = model.route(l, n2)?;
    // This tp rank's slice of the experts lives on shards a'·tp + t, a' < a2a: rows for shard
    // a'·tp + t go to a2a rank a', grouped by expert.
    let mut tok_idx: Vec<u32> = Vec::new();
    let mut w_idx: Vec<u32> = Vec::new();
    let mut send_counts = vec![0usize; a2a];
    let mut expert_counts: Vec<f32> = Vec::with_capacity(a2a * per);
    for (dest, count) in send_counts.iter_mut().enumerate() {
        for e in lay.experts_of_shard(dest * lay.tp + k.t, n_exp) {
            expert_counts.push(routed[e].len() as f32);
            for &tok in &routed[e] {
                tok_idx.push(tok);
                w_idx.push(tok * n_exp as u32 + e as u32);
            }
            *count += routed[e].len();
        }
    }
    let counts = Tensor::from_vec(expert_counts, (a2a * per, 1), dev)?;
    let (counts, _) = rc.comms.a2a.all_to_all(&counts, &vec![per; a2a])?;
    let counts: Vec<f32> = counts.flatten_all()?.to_vec1()?;
    // Rows travel in the compute dtype (n2's); the expert counts above in f32 (exact).
    let dtype = n2.dtype();
    // Gathers and sums through finetune-kernels' moe_permute (one thread per output element
    // both ways) rather than index_select/index_add, whose CUDA backward/forward loops over all
    // T·k rows in each thread.
    let send_perm = Arc::new(Permutation::new(tok_idx.clone(), t_len, dev)?);
    let send = if tok_idx.is_empty() {
        Tensor::zeros((0, hidden), dtype, dev)?
    } else {
        gather_rows(n2, &send_perm)?
    };
    let (recv, recv_counts) = rc.comms.a2a.all_to_all(&send.detach(), &send_counts)?;
    let recv = Var::from_tensor(&recv)?;
    // With dropout, the rows' token keys travel with them (four exact 16-bit pieces in f32 per
    // key): the experts draw each token's masks as the single-device run does.
    let recv_keys: Vec<u64> = if lora.dropout_active() {
        let keys = ctx.dropout_rows().keys_of(&tok_idx);
        let keys = Tensor::from_vec(
            finetune_model::dropout::keys_to_f32(&keys),
            (tok_idx.len(), 4),
            &candle_core::Device::Cpu,
        )?
        .to_device(dev)?;
        let (keys, _) = rc.comms.a2a.all_to_all(&keys, &send_counts)?;
        finetune_model::dropout::keys_from_f32(&keys.flatten_all()?.to_vec1::<f32>()?)
    } else {
        Vec::new()
    };
    // Received rows: by sender, then by my local expert.
    let mine = lay.experts_of_shard(lay.shard(k), n_exp);
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); per];
    let mut off = 0u32;
    for src in 0..a2a {
        for (j, r) in rows.iter_mut().enumerate() {
            let n = counts[src * per + j] as u32;
            r.extend(off..off + n);
            off += n;
        }
    }
    // The local experts' adapters: slices of this rank's stacks, whose gradients reach each
    // stack as one tensor (every used expert runs below and is in the segment's backward).
    let used: Vec<bool> = rows.iter().map(|r| !r.is_empty()).collect();
    let mut adapters = model.expert_adapters(l, mine.clone(), &used, Some(lora))?;
    // Every received row belongs to exactly one local expert: one gather sorts them by expert,
    // each expert reads its contiguous slice, and one sum puts the outputs back in place.
    let by_expert: Vec<u32> = rows.concat();
    let recv_len = recv.as_tensor().dim(0)?;
    let local_perm = Arc::new(Permutation::new(by_expert, recv_len, dev)?);
    let sorted = gather_rows(recv.as_tensor(), &local_perm)?;
    let mut outputs = Vec::with_capacity(per);
    let mut offset = 0;
    for (j, r) in rows.iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        let keys: Vec<u64> = if recv_keys.is_empty() {
            Vec::new()
        } else {
            r.iter().map(|&i| recv_keys[i as usize]).collect()
        };
        outputs.push(model.expert_forward_with(
            l,
            mine.start + j,
            &sorted.narrow(0, offset, r.len())?,
            Some(lora),
            std::mem::take(&mut adapters[j]),
            &finetune_model::dropout::Rows::Keys(&keys),
        )?);
        offset += r.len();
    }
    let yrecv = if outputs.is_empty() {
        recv.as_tensor().zeros_like()?
    } else {
        sum_rows(&Tensor::cat(&outputs, 0)?, &local_perm)?
    };
    let (yback, _) = rc.comms.a2a.all_to_all(&yrecv.detach(), &recv_counts)?;
    let yback = Var::from_tensor(&yback)?;
    let out = if tok_idx.is_empty() {
        Tensor::zeros((t_len, hidden), dtype, dev)?
    } else {
        // Each slot's routing weight: entry t·E + e of the [T, E] table.
        let w_perm = Arc::new(Permutation::new(w_idx, t_len * n_exp, dev)?);
        let w = slot_weights(&weights, &w_perm)?;
        let contrib = yback.as_tensor().broadcast_mul(&w)?;
        sum_rows(&contrib, &send_perm)?
    };
    Ok((
        out,
        MoeTape {
            send,
            send_counts,
            recv,
            recv_counts,
            yrecv,
            yback,
        },
    ))
}

fn grad_or_zeros(store: &GradStore, v: &Var) -> candle_core::Result<Tensor> {
    match store.get(v.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => v.as_tensor().zeros_like(),
    }
}

/// Backprops Σ(y ⊙ g), i.e. the vector-Jacobian product of y with g.
fn vjp(y: &Tensor, g: &Tensor) -> candle_core::Result<GradStore> {
    (y * g)?.sum_all()?.backward()
}

/// Called after each layer's backward (last layer first) with that layer's index and the
/// gradients so far: the overlapped all-reduce launches the buckets that are complete.
pub(crate) type LayerDone<'a> =
    &'a mut dyn FnMut(usize, &mut [Option<Tensor>]) -> Result<(), TrainError>;

/// Forward and backward of `seq` (number `number` of the run) on this rank: returns the sequence's summed cross-entropy
/// and adds `∂(loss_sum / n_step)/∂θ` (this rank's share) into `grads`, aligned with `vars`.
/// With `recompute` only each layer's input is kept through the forward and the layer is
/// replayed in the backward (activation checkpointing per layer, as the single-device path).
/// `layer_done`, if given, is called after each layer's backward.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate(
    model: &Qwen3Moe,
    lora: &Lora,
    vars: &[Var],
    rc: &RankContext,
    seq: &Sequence,
    number: u64,
    n_step: f64,
    recompute: bool,
    grads: &mut [Option<Tensor>],
    mut layer_done: Option<LayerDone<'_>>,
) -> Result<f64, TrainError> {
    let add = |grads: &mut [Option<Tensor>], store: &GradStore| -> Result<(), TrainError> {
        for (acc, var) in grads.iter_mut().zip(vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    };
    let mut f = forward(model, lora, rc, seq, number, recompute, Some(n_step))?;
    let mut g = f
        .g_top
        .take()
        .ok_or_else(|| TrainError::Options("no gradient reached the last layer".into()))?;
    let tp = &rc.comms.tp;
    let a2a = &rc.comms.a2a;
    for l in (0..f.tapes.len()).rev() {
        let tape = match f.tapes[l].take() {
            Some(t) => t,
            None => layer(model, lora, rc, &f.ctx, l, &f.inputs[l])?.0,
        };
        let g_h = match &tape.moe {
            None => {
                let s = vjp(&tape.out, &g)?;
                add(grads, &s)?;
                (&g + grad_or_zeros(&s, &tape.h)?)?
            }
            Some(m) => {
                let s1 = vjp(&tape.out, &g)?;
                let g1 = grad_or_zeros(&s1, &tape.h)?;
                let g_yback = grad_or_zeros(&s1, &m.yback)?;
                let (g_yrecv, _) = a2a.all_to_all(&g_yback, &m.send_counts)?;
                let s2 = vjp(&m.yrecv, &g_yrecv)?;
                add(grads, &s2)?;
                let g_recv = grad_or_zeros(&s2, &m.recv)?;
                let (g_send, _) = a2a.all_to_all(&g_recv, &m.recv_counts)?;
                let s3 = vjp(&m.send, &g_send)?;
                let g3 = grad_or_zeros(&s3, &tape.h)?;
                (&g + tp.all_reduce_sum(&(g1 + g3)?)?)?
            }
        };
        let s4 = vjp(&tape.attn, &g_h)?;
        add(grads, &s4)?;
        if l > 0 {
            let gx = grad_or_zeros(&s4, &tape.xin)?;
            g = (&g_h + tp.all_reduce_sum(&gx)?)?;
        }
        // Layer 0's input gradient would flow into the (frozen) embedding: under vocabulary
        // parallelism the adjoint of its all-reduce is the identity into frozen rows, so there
        // is nothing to do.
        if let Some(done) = layer_done.as_mut() {
            done(l, grads)?;
        }
    }
    Ok(f.loss_sum)
}

/// The summed cross-entropy of `seq` (no gradients).
pub(crate) fn loss_sum(
    model: &Qwen3Moe,
    lora: &Lora,
    rc: &RankContext,
    seq: &Sequence,
) -> Result<f64, TrainError> {
    Ok(forward(model, lora, rc, seq, 0, true, None)?.loss_sum)
}
