//! Parallel training: collectives ([`collective`], [`nccl`] behind `cuda`), layouts
//! ([`layout`]), one rank's forward/backward under a layout ([`engine`]), launch environment
//! and rendezvous ([`launch`]), and [`RankContext`], which the trainer consults to split a
//! step's sequences over the data ranks and to reduce losses and gradients so that every
//! layout computes the single-device step:
//!
//! - the step's B sequences (the same on every rank: all ranks draw from the same seeded
//!   batch iterator) are split into contiguous slices of ⌈B / data ranks⌉, padded with a
//!   two-token sequence without targets (zero loss, zero gradient) so that the ranks of an
//!   all-to-all group run the same number of forwards;
//! - the loss is Σ CE over the data ranks / target tokens of the whole step (the single-device
//!   normalisation);
//! - gradients, bucketed: attention adapters summed over the world (each rank holds the share of
//!   its heads × its tokens), dense-MLP adapters over the world from tensor-parallel index 0 only
//!   (the tp ranks compute them identically), expert adapters over the data-parallel group
//!   (ranks holding the same experts); the buckets are all-reduced while the backward of the
//!   step's last sequence goes on ([`buckets`]);
//! - under tensor parallelism, embedding, lm_head and loss are vocabulary-parallel ([`vocab`]);
//! - the clipping norm adds the expert norms of the ranks of replica 0 (each expert once).
//!
//! Every rank keeps the attention and dense adapters whole and only its experts' adapters, with
//! their AdamW state; a checkpoint gathers the experts' adapters and moments on rank 0 and is
//! written whole (PEFT names, full tensors), so any layout resumes it ([`RankContext::restrict`]).
//!
//! Base weights: each rank loads only its shard ([`RankContext::base_shard`],
//! [`load_rank_model`]): the experts of its expert shard, the q/k/v rows and o_proj columns of
//! its heads, under vocabulary parallelism its rows of embed_tokens and lm_head, the rest (norms,
//! routers, dense MLPs) whole — read alone from the memory-mapped safetensors
//! (`finetune_model::shard`). The engine asks the model for its pieces in global indices and the
//! model uses the rows it holds.

pub mod buckets;
pub mod check;
pub mod collective;
pub mod engine;
pub mod launch;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod vocab;

pub use collective::{Collective, CollectiveError, CpuCollective, Solo};
pub use layout::{expert_of, Coords, GroupKind, Layout, LayoutError};

use crate::checkpoint::Checkpoint;
use crate::TrainError;
use candle_core::{Tensor, Var};
use finetune_data::Sequence;
use finetune_model::{BaseShard, Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::Path;
use std::time::Duration;

/// A rank's communicators, one per [`GroupKind`], and where the gradient buckets are
/// all-reduced when that is a communication stream of their own ([`buckets`]).
pub struct Comms {
    pub world: Box<dyn Collective>,
    pub tp: Box<dyn Collective>,
    pub a2a: Box<dyn Collective>,
    pub dp: Box<dyn Collective>,
    /// The gradient all-reduce on a second stream (NCCL: `nccl::NcclSide`, made when process
    /// 0 asked for it in `nccl_setup::ids`); `None`: over `world`/`dp` themselves.
    pub side: Option<Box<dyn buckets::SideReduce>>,
}

/// A rank's CPU communicators, movable to its thread ([`CpuComms::into_comms`] there).
pub struct CpuComms {
    pub world: CpuCollective,
    pub tp: CpuCollective,
    pub a2a: CpuCollective,
    pub dp: CpuCollective,
}

impl CpuComms {
    /// The communicators of every rank of `layout` (index = rank), as threads of this process.
    pub fn for_layout(layout: &Layout, timeout: Duration) -> Vec<CpuComms> {
        let mut per_kind: Vec<Vec<Option<CpuCollective>>> = Vec::new();
        for kind in layout::GROUP_KINDS {
            let mut slots: Vec<Option<CpuCollective>> = (0..layout.world).map(|_| None).collect();
            for members in layout.groups(kind) {
                for (handle, &rank) in CpuCollective::group(members.len(), timeout)
                    .into_iter()
                    .zip(&members)
                {
                    slots[rank] = Some(handle);
                }
            }
            per_kind.push(slots);
        }
        let mut it: Vec<_> = per_kind.into_iter().map(|v| v.into_iter()).collect();
        (0..layout.world)
            .map(|_| {
                let mut next = |k: usize| {
                    it[k]
                        .next()
                        .flatten()
                        .expect("every rank is in one group of each kind")
                };
                CpuComms {
                    world: next(0),
                    tp: next(1),
                    a2a: next(2),
                    dp: next(3),
                }
            })
            .collect()
    }

    pub fn into_comms(self) -> Comms {
        Comms {
            world: Box::new(self.world),
            tp: Box::new(self.tp),
            a2a: Box::new(self.a2a),
            dp: Box::new(self.dp),
            side: None,
        }
    }
}

/// How an adapter's gradient is reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Attention,
    Dense,
    Expert,
}

pub(crate) fn class_of(name: &str) -> Class {
    if expert_of(name).is_some() {
        Class::Expert
    } else if name.contains(".mlp.") {
        Class::Dense
    } else {
        Class::Attention
    }
}

/// Elements per all-reduce bucket (64 MiB of f32).
pub const BUCKET_ELEMENTS: usize = 1 << 24;

/// Environment variable: `0` turns the overlap of the gradient all-reduce with the backward
/// off (every bucket is reduced after the backward; same results, for debugging).
pub const OVERLAP_ENV: &str = "FINETUNE_OVERLAP_GRAD_REDUCE";
/// Environment variable: `0` turns the vocabulary-parallel embedding and loss off under tensor
/// parallelism (every tp rank then runs them whole, for debugging).
pub const VOCAB_PARALLEL_ENV: &str = "FINETUNE_VOCAB_PARALLEL";

/// Whether the overlap of the gradient all-reduce with the backward is on ([`OVERLAP_ENV`]).
pub fn overlap_enabled() -> bool {
    env_on(OVERLAP_ENV)
}

/// Environment variable: `1` reduces the gradient buckets of an NCCL run on a second CUDA stream
/// beside the backward (`nccl::NcclSide`). Off by default until a GPU session has run
/// `finetune doctor`'s overlapped NCCL step (it runs it whatever this says); without it the
/// buckets are enqueued on the compute stream at the same points (the path checked on a GPU).
pub const NCCL_SIDE_STREAM_ENV: &str = "FINETUNE_NCCL_SIDE_STREAM";

/// Whether an NCCL run reduces its buckets on a side stream: overlap on and
/// [`NCCL_SIDE_STREAM_ENV`] = `1`.
pub fn nccl_side_stream_enabled() -> bool {
    overlap_enabled() && std::env::var(NCCL_SIDE_STREAM_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Whether environment variable `name` is unset or anything but `0`/`false`/`off`.
fn env_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off"
        )
    })
}

/// A rank of a parallel run: its layout, place and communicators, and the full adapter set
/// (names and shapes) that checkpoints hold.
pub struct RankContext {
    pub layout: Layout,
    pub coords: Coords,
    pub comms: Comms,
    /// Every adapter of the run (all experts), name order: (name, A dims, B dims).
    full: Vec<(String, Vec<usize>, Vec<usize>)>,
    n_experts: usize,
    /// Where this rank's tensors live (a resumed checkpoint is moved there).
    device: candle_core::Device,
    /// Under tensor parallelism, vocabulary-parallel embedding, lm_head and loss ([`vocab`]);
    /// on unless [`VOCAB_PARALLEL_ENV`] is `0`.
    pub vocab_parallel: bool,
    /// Logits per chunk of the vocabulary-parallel loss (`None`: the device's default).
    pub vocab_chunk_elems: Option<usize>,
    /// Launch each gradient bucket's all-reduce as soon as the backward has finished its
    /// layers ([`buckets`]); on unless [`OVERLAP_ENV`] is `0`.
    pub overlap: bool,
    /// Elements per gradient all-reduce bucket ([`BUCKET_ELEMENTS`]).
    pub bucket_elements: usize,
    /// Buckets launched during the backward / in all, at the last step.
    last_overlap: [std::sync::atomic::AtomicUsize; 2],
}

impl RankContext {
    /// Rank `rank` of `layout`, for a run whose whole adapter is `full`.
    pub fn new(
        layout: Layout,
        rank: usize,
        comms: Comms,
        full: &Lora,
        n_experts: usize,
    ) -> Result<Self, TrainError> {
        if comms.world.size() != layout.world || comms.world.rank() != rank {
            return Err(TrainError::Options(format!(
                "rank {rank} of {} got a world communicator of rank {} of {}",
                layout.world,
                comms.world.rank(),
                comms.world.size()
            )));
        }
        Ok(Self {
            layout,
            coords: layout.coords(rank),
            comms,
            full: full
                .tensors()
                .map(|(n, a, b)| (n.to_string(), a.dims().to_vec(), b.dims().to_vec()))
                .collect(),
            n_experts,
            device: full
                .vars()
                .next()
                .map_or(candle_core::Device::Cpu, |v| v.device().clone()),
            vocab_parallel: env_on(VOCAB_PARALLEL_ENV),
            vocab_chunk_elems: None,
            overlap: overlap_enabled(),
            bucket_elements: BUCKET_ELEMENTS,
            last_overlap: Default::default(),
        })
    }

    /// The part of the base weights this rank computes with: the experts of its expert shard,
    /// the query heads of its tensor-parallel index (with their key/value heads), and its
    /// vocabulary rows when [`Self::vocab_parallel_active`] (else every row).
    pub fn base_shard(&self, config: &Qwen3MoeConfig) -> BaseShard {
        let (l, k) = (&self.layout, self.coords);
        BaseShard {
            experts: l.experts_of_shard(l.shard(k), config.num_experts),
            heads: l.heads(k.t, config.num_attention_heads),
            vocab: if self.vocab_parallel_active() {
                vocab::shard(config.vocab_size, l.tp, k.t)
            } else {
                0..config.vocab_size
            },
        }
    }

    /// Whether this rank runs the embedding and the loss vocabulary-parallel (tp > 1 and
    /// [`Self::vocab_parallel`]).
    pub fn vocab_parallel_active(&self) -> bool {
        self.vocab_parallel && self.layout.tp > 1
    }

    /// At the last step: how many gradient buckets were launched during the backward, and
    /// how many there were.
    pub fn last_overlap(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.last_overlap[0].load(Relaxed),
            self.last_overlap[1].load(Relaxed),
        )
    }

    pub fn rank(&self) -> usize {
        self.coords.rank
    }

    /// Releases the other ranks from their collectives: this rank failed.
    pub fn abort(&self, reason: &str) {
        for c in [
            &self.comms.world,
            &self.comms.tp,
            &self.comms.a2a,
            &self.comms.dp,
        ] {
            c.abort(reason);
        }
    }

    /// Whether adapter `name` is kept on shard `shard`.
    fn shard_keeps(&self, shard: usize, name: &str) -> bool {
        match expert_of(name) {
            Some(e) => self.layout.shard_of_expert(e, self.n_experts) == shard,
            None => true,
        }
    }

    /// Whether this rank keeps adapter `name`.
    pub fn keeps(&self, name: &str) -> bool {
        self.shard_keeps(self.layout.shard(self.coords), name)
    }

    /// This rank's part of the whole adapter `full`.
    pub fn local_lora(&self, full: &Lora) -> Result<Lora, TrainError> {
        Ok(Lora::from_tensors(
            full.r,
            full.scale,
            full.tensors()
                .filter(|(n, _, _)| self.keeps(n))
                .map(|(n, a, b)| (n.to_string(), a.clone(), b.clone())),
        )?)
    }

    /// This rank's part of a whole checkpoint: its adapters, their moments and update counts
    /// (selected per module, then stacked like the rank's adapter).
    pub fn restrict(&self, ckpt: Checkpoint) -> Result<Checkpoint, TrainError> {
        let keep: Vec<bool> = ckpt
            .lora
            .names()
            .flat_map(|n| {
                let k = self.keeps(n);
                [k, k]
            })
            .collect();
        let dev = &self.device;
        let lora = Lora::from_tensors(
            ckpt.lora.r,
            ckpt.lora.scale,
            ckpt.lora
                .tensors()
                .filter(|(n, _, _)| self.keeps(n))
                .map(|(n, a, b)| Ok((n.to_string(), a.to_device(dev)?, b.to_device(dev)?)))
                .collect::<candle_core::Result<Vec<_>>>()?,
        )?;
        let pick = |v: Vec<Tensor>| -> Result<Vec<Tensor>, TrainError> {
            let per_module = ckpt.lora.unstack_params(&v)?;
            let mine: Vec<Tensor> = per_module
                .into_iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(t, _)| t.to_device(dev))
                .collect::<candle_core::Result<_>>()?;
            Ok(lora.stack_params(&mine)?)
        };
        let (m, v) = (pick(ckpt.m)?, pick(ckpt.v)?);
        let mut state = ckpt.state;
        let per_module = ckpt.lora.unstack_counts(&state.adam_t)?;
        let mine: Vec<u64> = per_module
            .into_iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(t, _)| t)
            .collect();
        state.adam_t = lora.stack_counts(&mine)?;
        Ok(Checkpoint {
            dir: ckpt.dir,
            lora,
            meta: ckpt.meta,
            m,
            v,
            state,
        })
    }

    /// This rank's sequences of a step (or of the held-out set): a contiguous slice of
    /// ⌈n / data ranks⌉ indices of `batch`, `None` marking padding.
    pub fn local_slice(&self, batch: &[usize]) -> Vec<Option<usize>> {
        let d = self.layout.data_ranks();
        let per = batch.len().div_ceil(d);
        let start = self.local_offset(batch.len());
        (start..start + per)
            .map(|i| batch.get(i).copied())
            .collect()
    }

    /// The place in a step's batch of `n` sequences of this rank's first slot
    /// ([`Self::local_slice`]).
    pub fn local_offset(&self, n: usize) -> usize {
        self.layout.data_index(self.coords) * n.div_ceil(self.layout.data_ranks())
    }

    /// A sequence without targets: loss 0 and zero gradients, for padding.
    pub fn padding() -> Sequence {
        Sequence {
            ids: vec![0, 0],
            position_ids: vec![0, 1],
            labels: vec![-100, -100],
            doc_lens: vec![2],
        }
    }

    /// Σ over the data ranks of a per-rank sum (the ranks of a tp group hold the same one).
    pub fn sum_over_data(&self, v: f64) -> Result<f64, TrainError> {
        let mine = if self.coords.t == 0 { v } else { 0.0 };
        Ok(self.comms.world.all_reduce_f64(&[mine])?[0])
    }

    /// Whether any rank asked to stop (all ranks must leave the loop at the same step).
    pub fn any(&self, flag: bool) -> Result<bool, TrainError> {
        Ok(self
            .comms
            .world
            .all_reduce_f64(&[f64::from(u8::from(flag))])?[0]
            > 0.0)
    }

    /// Runs a step's forwards and backwards through `run` and sums this rank's gradient
    /// shares into the step's gradients (see the module doc), bucket by bucket ([`buckets`]):
    /// `run` gets a callback for the last sequence's backward, through which the buckets are
    /// all-reduced as the layers finish (with [`Self::overlap`]; else all after `run`).
    /// `grads` comes back complete (zeros where no gradient came), aligned with `vars`.
    pub(crate) fn reduced_step<T>(
        &self,
        lora: &Lora,
        vars: &[Var],
        grads: &mut [Option<Tensor>],
        run: impl FnOnce(&mut [Option<Tensor>], engine::LayerDone<'_>) -> Result<T, TrainError>,
    ) -> Result<T, TrainError> {
        let plan = buckets::BucketPlan::new(lora, self.bucket_elements);
        let t0 = self.coords.t == 0;
        let r = std::thread::scope(|s| {
            let mut red = buckets::Reducer::new(&plan, &self.comms, vars, t0, self.overlap, s);
            let out = run(grads, &mut |l, g| red.layer_done(l, g))?;
            let early = red.finish(grads)?;
            Ok::<_, TrainError>((out, early))
        });
        let (out, early) = r.inspect_err(|e| self.abort(&format!("rank {}: {e}", self.rank())))?;
        use std::sync::atomic::Ordering::Relaxed;
        self.last_overlap[0].store(early, Relaxed);
        self.last_overlap[1].store(plan.buckets.len(), Relaxed);
        Ok(out)
    }

    /// Clips the reduced gradients (every entry `Some`, aligned with `lora.vars()`) to global
    /// norm `max_norm`; returns the norm before clipping.
    pub fn clip(
        &self,
        lora: &Lora,
        grads: &mut [Option<Tensor>],
        max_norm: f64,
    ) -> Result<f64, TrainError> {
        let classes: Vec<Class> = lora.var_modules().map(|m| class_of(&m[0])).collect();
        // Global norm: shared adapters are now whole on every rank; each expert is counted
        // once, on its replica-0 rank.
        let (mut shared, mut experts) = (0f64, 0f64);
        for (g, class) in grads.iter().zip(&classes) {
            let Some(g) = g else { continue };
            // Per expert for a stack, as `clip_grad_norm`.
            let s: f64 = crate::adamw::per_slice_sq_sums(g)?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?
                .iter()
                .sum();
            match class {
                Class::Expert => experts += s,
                _ => shared += s,
            }
        }
        let mine = if self.coords.d == 0 { experts } else { 0.0 };
        let experts = self.comms.world.all_reduce_f64(&[mine])?[0];
        let norm = (shared + experts).sqrt();
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
        Ok(norm)
    }

    /// The whole adapter and AdamW state, gathered on rank 0 (`None` elsewhere). Every rank
    /// must call it. `m`, `v` and `t` are this rank's, aligned with `lora.vars()`; the result's
    /// are aligned with the whole adapter's `vars()`.
    #[allow(clippy::type_complexity)]
    pub fn gather(
        &self,
        lora: &Lora,
        m: &[Tensor],
        v: &[Tensor],
        t: &[u64],
    ) -> Result<Option<(Lora, Vec<Tensor>, Vec<Tensor>, Vec<u64>)>, TrainError> {
        let world = &self.comms.world;
        let dev = lora
            .vars()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        // Per module (PEFT order), whatever the storage: experts travel and are matched by
        // name, so the gathered checkpoint does not depend on the layout.
        let var_tensors: Vec<Tensor> = lora.vars().map(|v| v.as_tensor().clone()).collect();
        let vars = lora.unstack_params(&var_tensors)?;
        let (m, v) = (lora.unstack_params(m)?, lora.unstack_params(v)?);
        let t = lora.unstack_counts(t)?;
        let names: Vec<&str> = lora.names().flat_map(|n| [n, n]).collect();
        // Received expert tensors on rank 0: name → [A, B, mA, mB, vA, vB].
        let mut received: std::collections::HashMap<String, Vec<Tensor>> = Default::default();
        // One sender per round (the replica-0 ranks), so rank 0 holds one shard at a time.
        for src in 0..self.layout.world {
            let sc = self.layout.coords(src);
            if sc.d != 0 || self.layout.ep == 1 {
                continue;
            }
            let mut counts = vec![0usize; self.layout.world];
            let payload = if self.rank() == src {
                let mut parts = Vec::new();
                for (i, var) in vars.iter().enumerate() {
                    if expert_of(names[i]).is_some() {
                        for x in [var, &m[i], &v[i]] {
                            parts.push(x.flatten_all()?);
                        }
                    }
                }
                let p = if parts.is_empty() {
                    Tensor::zeros(0, candle_core::DType::F32, &dev)?
                } else {
                    Tensor::cat(&parts, 0)?
                };
                counts[0] = p.dim(0)?;
                p
            } else {
                Tensor::zeros(0, candle_core::DType::F32, &dev)?
            };
            let (got, _) = world.all_to_all(&payload.unsqueeze(1)?, &counts)?;
            if self.rank() != 0 {
                continue;
            }
            let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
            let shard = self.layout.shard(sc);
            let mut off = 0usize;
            for (name, ad, bd) in &self.full {
                if expert_of(name).is_none() || !self.shard_keeps(shard, name) {
                    continue;
                }
                let mut take = |dims: &Vec<usize>| -> Result<Tensor, TrainError> {
                    let n: usize = dims.iter().product();
                    let t = Tensor::from_vec(got[off..off + n].to_vec(), dims.as_slice(), &dev)?;
                    off += n;
                    Ok(t)
                };
                let (a, ma, va) = (take(ad)?, take(ad)?, take(ad)?);
                let (b, mb, vb) = (take(bd)?, take(bd)?, take(bd)?);
                received.insert(name.clone(), vec![a, b, ma, mb, va, vb]);
            }
            if off != got.len() {
                return Err(TrainError::Options(format!(
                    "gathering rank {src}'s experts: {} values received, {off} expected",
                    got.len()
                )));
            }
        }
        if self.rank() != 0 {
            return Ok(None);
        }
        // Every parameter is updated at every step (absent gradients are zeros), so all
        // update counts are equal: rank 0's first one stands for the gathered experts.
        let t0 = t.first().copied().unwrap_or(0);
        let mut own: std::collections::HashMap<&str, usize> = Default::default();
        for (i, n) in lora.names().enumerate() {
            own.insert(n, i);
        }
        let (mut ts, mut ms, mut vs, mut ts_out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (name, _, _) in &self.full {
            let (a, b, ma, mb, va, vb) = match (own.get(name.as_str()), received.remove(name)) {
                (Some(&i), _) => (
                    vars[2 * i].clone(),
                    vars[2 * i + 1].clone(),
                    m[2 * i].clone(),
                    m[2 * i + 1].clone(),
                    v[2 * i].clone(),
                    v[2 * i + 1].clone(),
                ),
                (None, Some(x)) => {
                    let mut x = x.into_iter();
                    let mut n = || x.next().expect("six tensors per gathered adapter");
                    (n(), n(), n(), n(), n(), n())
                }
                (None, None) => {
                    return Err(TrainError::Options(format!(
                        "adapter {name} was held by no rank"
                    )))
                }
            };
            let (ta, tb) = match own.get(name.as_str()) {
                Some(&i) => (t[2 * i], t[2 * i + 1]),
                None => (t0, t0),
            };
            ts.push((name.clone(), a, b));
            ms.extend([ma, mb]);
            vs.extend([va, vb]);
            ts_out.extend([ta, tb]);
        }
        // Back to the storage of the whole adapter (its stacks span every expert).
        let whole = Lora::from_tensors(lora.r, lora.scale, ts)?;
        let (ms, vs) = (whole.stack_params(&ms)?, whole.stack_params(&vs)?);
        let ts_out = whole.stack_counts(&ts_out)?;
        Ok(Some((whole, ms, vs, ts_out)))
    }
}

/// NCCL communicators for a layout: one unique id per group (all kinds, in
/// [`layout::GROUP_KINDS`] order, groups in [`Layout::groups`] order), then, when the gradient
/// all-reduce gets its own stream, one for the world and one per data-parallel group (the
/// side communicators, `nccl::NcclSide`); made in one place and handed to every rank, and each
/// rank's joining of its groups. Whether there is a side stream is decided by process 0 alone
/// (the length of the ids), so that every rank uses the same communicators for the buckets.
#[cfg(feature = "cuda")]
pub mod nccl_setup {
    use super::layout::{GroupKind, GROUP_KINDS};
    use super::nccl::{unique_id, Fence, NcclCollective, NcclSide};
    use super::{Collective, CollectiveError, Comms, Layout, Solo};
    use candle_core::Device;
    use std::sync::Arc;

    /// Unique ids of every group of `layout`, concatenated (128 bytes each), and with `side`
    /// those of the side communicators after them.
    pub fn ids(layout: &Layout, side: bool) -> Result<Vec<u8>, CollectiveError> {
        let mut out = Vec::new();
        for kind in GROUP_KINDS {
            for _ in layout.groups(kind) {
                out.extend(unique_id()?);
            }
        }
        if side {
            for _ in 0..1 + layout.groups(GroupKind::Dp).len() {
                out.extend(unique_id()?);
            }
        }
        Ok(out)
    }

    fn id_at(ids: &[u8], k: usize) -> Result<[u8; 128], CollectiveError> {
        ids.get(k * 128..k * 128 + 128)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| CollectiveError::Invalid {
                op: "join",
                message: format!("{} bytes of unique ids, too few", ids.len()),
            })
    }

    /// Rank `rank` joins its groups on `device` (every rank of the run must call it at the
    /// same time; groups of one rank other than the world need no communicator), and the
    /// side communicators when `ids` has them.
    pub fn join(
        layout: &Layout,
        rank: usize,
        device: &Device,
        ids: &[u8],
    ) -> Result<Comms, CollectiveError> {
        let fence = Arc::new(Fence::new());
        let mut comms: Vec<Box<dyn Collective>> = Vec::new();
        let mut offset = 0;
        for (k, kind) in GROUP_KINDS.into_iter().enumerate() {
            let groups = layout.groups(kind);
            for (g, members) in groups.iter().enumerate() {
                let Some(pos) = members.iter().position(|&r| r == rank) else {
                    continue;
                };
                let id = id_at(ids, offset + g)?;
                comms.push(if members.len() == 1 && k > 0 {
                    Box::new(Solo)
                } else {
                    Box::new(
                        NcclCollective::join(device, pos, members.len(), id)?
                            .with_fence(fence.clone()),
                    )
                });
            }
            offset += groups.len();
        }
        let side = match (ids.len() / 128).saturating_sub(offset) {
            0 => None,
            _ => {
                let dp_groups = layout.groups(GroupKind::Dp);
                let (g, members) = dp_groups
                    .iter()
                    .enumerate()
                    .find(|(_, m)| m.contains(&rank))
                    .ok_or_else(|| CollectiveError::Invalid {
                        op: "join",
                        message: format!("rank {rank} is in no data-parallel group"),
                    })?;
                let pos = members.iter().position(|&r| r == rank).unwrap_or(0);
                let world = (rank, layout.world, id_at(ids, offset)?);
                let dp = (members.len() > 1).then_some((pos, members.len()));
                let dp = match dp {
                    Some((p, n)) => Some((p, n, id_at(ids, offset + 1 + g)?)),
                    None => None,
                };
                Some(Box::new(NcclSide::join(device, world, dp, fence)?)
                    as Box<dyn super::buckets::SideReduce>)
            }
        };
        let mut it = comms.into_iter();
        let mut next = || {
            it.next().ok_or_else(|| CollectiveError::Invalid {
                op: "join",
                message: format!("rank {rank} is missing from a group"),
            })
        };
        Ok(Comms {
            world: next()?,
            tp: next()?,
            a2a: next()?,
            dp: next()?,
            side,
        })
    }
}

/// Loads rank `ctx`'s shard ([`RankContext::base_shard`]) of the base model in `dir` (config
/// `config`) onto `device`: only the shard's bytes are read from the files.
pub fn load_rank_model(
    dir: &Path,
    config: &Qwen3MoeConfig,
    ctx: &RankContext,
    device: &candle_core::Device,
) -> Result<Qwen3Moe, TrainError> {
    let io = |e: &dyn std::fmt::Display| TrainError::Io {
        path: dir.to_path_buf(),
        message: format!("rank {}: {e}", ctx.rank()),
    };
    let weights = Weights::open(dir, device).map_err(|e| io(&e))?;
    Qwen3Moe::load_shard(config.clone(), &weights, device, &ctx.base_shard(config))
        .map_err(|e| io(&e))
}

/// Runs `f` on a trainer for every rank of `layout` as threads of this process (1 GiB stacks),
/// with the in-process CPU collectives; tensors live on `device` (the CPU collectives copy
/// through the host, so this also runs a layout on one GPU). Each rank loads its own shard of
/// the base model in `base` ([`load_rank_model`]) and gets its own copy of `full`. Returns the
/// results by rank; the first error fails the whole run.
#[allow(clippy::too_many_arguments)]
pub fn simulate<T: Send>(
    layout: Layout,
    base: &Path,
    config: &Qwen3MoeConfig,
    full: &Lora,
    train: &[Sequence],
    heldout: &[Sequence],
    options: &crate::TrainOptions,
    device: &candle_core::Device,
    f: impl Fn(&mut crate::Trainer) -> Result<T, TrainError> + Sync,
) -> Result<Vec<T>, TrainError> {
    let comms = CpuComms::for_layout(&layout, Duration::from_secs(600));
    let n_experts = config.num_experts;
    let results: Vec<Result<T, TrainError>> = std::thread::scope(|s| {
        let f = &f;
        let joins: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .stack_size(1 << 30)
                    .spawn_scoped(s, move || -> Result<T, TrainError> {
                        let own = copy_lora(full, device)?;
                        let ctx = RankContext::new(layout, rank, c.into_comms(), &own, n_experts)?;
                        let model = match load_rank_model(base, config, &ctx, device) {
                            Ok(m) => m,
                            Err(e) => {
                                ctx.abort(&format!("rank {rank}: {e}"));
                                return Err(e);
                            }
                        };
                        let mut t = crate::Trainer::new_parallel(
                            &model,
                            &own,
                            train.to_vec(),
                            heldout.to_vec(),
                            options.clone(),
                            ctx,
                        )?;
                        let r = f(&mut t);
                        if let (Err(e), Some(ctx)) = (&r, t.rank_context()) {
                            ctx.abort(&format!("rank {rank}: {e}"));
                        }
                        r
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    results.into_iter().collect()
}

/// A copy of `lora` with its own storage on `device` (ranks update their adapters in place).
pub fn copy_lora(lora: &Lora, device: &candle_core::Device) -> Result<Lora, TrainError> {
    Ok(Lora::from_tensors(
        lora.r,
        lora.scale,
        lora.tensors()
            .map(|(n, a, b)| {
                Ok((
                    n.to_string(),
                    a.to_device(device)?.copy()?,
                    b.to_device(device)?.copy()?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?,
    )?)
}
