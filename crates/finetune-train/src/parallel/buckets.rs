//! The data-parallel gradient all-reduce, bucketed and overlapped with the backward.
//!
//! [`BucketPlan`]: each reduction class (attention adapters over the world, dense-MLP adapters
//! over the world, expert adapters over the data-parallel group; see the module doc of
//! `parallel`) is packed into buckets of at most `cap` elements in backward order (last layer
//! first), and the buckets are ordered by the layer after whose backward they are complete
//! (the lowest layer among their tensors). The plan depends only on the adapter names and
//! shapes, so the ranks of a group make the same buckets in the same order.
//!
//! [`Reducer`]: during the backward of a step's last sequence (earlier sequences of the step
//! only accumulate), the engine reports each finished layer ([`Reducer::layer_done`]), and
//! the buckets complete by then are packed and handed to a communication thread of this rank
//! through a channel; it all-reduces them in plan order while the backward of the earlier
//! layers goes on. [`Reducer::finish`] launches the rest, joins and unpacks, before clipping
//! and the optimizer. Without overlap every bucket is reduced in [`Reducer::finish`], in the
//! same order with the same contents, so both give bit-identical gradients (each element's
//! sum over the ranks does not depend on when it is taken).
//!
//! A backend that only enqueues its collectives on the device stream
//! ([`Collective::enqueues`], NCCL) is called from the compute thread at the same points
//! instead: a second thread issuing NCCL calls on the same stream would interleave them with
//! the compute thread's tensor-parallel and all-to-all calls in an order that differs between
//! ranks, which can deadlock.

use super::collective::{Collective, CollectiveError};
use super::{class_of, Class, Comms};
use crate::TrainError;
use candle_core::{Tensor, Var};
use finetune_model::Lora;
use std::sync::mpsc;

/// Which communicator a bucket is reduced over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    World,
    Dp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    over: Over,
    /// Gradient indices (aligned with `lora.vars()`), in packing order.
    pub members: Vec<usize>,
    /// Complete after this layer's backward (`None`: only at the end).
    pub ready_after: Option<usize>,
    /// Dense-MLP adapters: only tensor-parallel index 0 contributes (the tp ranks hold equal
    /// copies).
    dense: bool,
}

/// Layer index of an adapter name `model.layers.{L}.…`.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The buckets of a rank's adapters (module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Bucket>,
}

impl BucketPlan {
    pub fn new(lora: &Lora, cap: usize) -> Self {
        let cap = cap.max(1);
        // (gradient index, elements, layer, class) per A and B.
        let mut items: Vec<(usize, usize, Option<usize>, Class)> = Vec::new();
        // One item per variable (a stack of experts' adapters is one tensor).
        for (k, (var, modules)) in lora.vars().zip(lora.var_modules()).enumerate() {
            let name = &modules[0];
            items.push((k, var.elem_count(), layer_of(name), class_of(name)));
        }
        // Backward order: higher layers first (no layer: last), then name order.
        let key = |l: Option<usize>| l.map_or(0, |l| l + 1);
        items.sort_by(|x, y| key(y.2).cmp(&key(x.2)).then(x.0.cmp(&y.0)));
        let mut buckets = Vec::new();
        for class in [Class::Attention, Class::Dense, Class::Expert] {
            let mut cur: Option<(Bucket, usize)> = None;
            for &(i, n, layer, c) in &items {
                if c != class {
                    continue;
                }
                if let Some((b, filled)) = &mut cur {
                    if *filled + n <= cap {
                        b.members.push(i);
                        b.ready_after = b.ready_after.zip(layer).map(|(x, y)| x.min(y));
                        *filled += n;
                        continue;
                    }
                }
                if let Some((b, _)) = cur.take() {
                    buckets.push(b);
                }
                cur = Some((
                    Bucket {
                        over: if class == Class::Expert {
                            Over::Dp
                        } else {
                            Over::World
                        },
                        members: vec![i],
                        ready_after: layer,
                        dense: class == Class::Dense,
                    },
                    n,
                ));
            }
            if let Some((b, _)) = cur {
                buckets.push(b);
            }
        }
        // Launch order: as the backward completes them (stable: classes in the order above).
        buckets.sort_by_key(|b| std::cmp::Reverse(key(b.ready_after)));
        BucketPlan { buckets }
    }
}

type Job = (usize, Over, Tensor);
type Done = (usize, Result<Tensor, CollectiveError>);

/// One step's gradient reduction on one rank (module doc).
pub struct Reducer<'a> {
    plan: &'a BucketPlan,
    comms: &'a Comms,
    vars: &'a [Var],
    /// Tensor-parallel index 0 (the dense adapters' contributor).
    t0: bool,
    /// Launch buckets as layers finish (else all in `finish`).
    overlap: bool,
    next: usize,
    /// Buckets launched before `finish`.
    early: usize,
    /// Reduced buckets (inline path), by plan index.
    reduced: Vec<Option<Tensor>>,
    thread: Option<(mpsc::Sender<Job>, mpsc::Receiver<Done>)>,
}

impl<'a> Reducer<'a> {
    /// A reducer for one step; with `overlap` and a blocking backend, its communication thread
    /// is spawned on `scope` (it ends when the reducer is dropped).
    pub fn new<'scope, 'env>(
        plan: &'a BucketPlan,
        comms: &'a Comms,
        vars: &'a [Var],
        t0: bool,
        overlap: bool,
        scope: &'scope std::thread::Scope<'scope, 'env>,
    ) -> Self
    where
        'a: 'scope,
    {
        let threaded = overlap && !comms.world.enqueues() && !comms.dp.enqueues();
        let thread = threaded.then(|| {
            let (job_tx, job_rx) = mpsc::channel::<Job>();
            let (done_tx, done_rx) = mpsc::channel::<Done>();
            let (world, dp): (&'a dyn Collective, &'a dyn Collective) =
                (comms.world.as_ref(), comms.dp.as_ref());
            std::thread::Builder::new()
                .name("grad-all-reduce".into())
                .spawn_scoped(scope, move || {
                    for (i, over, flat) in job_rx {
                        let r = reduce(if over == Over::World { world } else { dp }, &flat);
                        let failed = r.is_err();
                        if done_tx.send((i, r)).is_err() || failed {
                            break;
                        }
                    }
                })
                .expect("spawning the gradient all-reduce thread");
            (job_tx, done_rx)
        });
        Reducer {
            plan,
            comms,
            vars,
            t0,
            overlap,
            next: 0,
            early: 0,
            reduced: vec![None; plan.buckets.len()],
            thread,
        }
    }

    /// Layer `layer`'s backward is done (on the step's last sequence): launches the buckets
    /// complete by now.
    pub fn layer_done(
        &mut self,
        layer: usize,
        grads: &mut [Option<Tensor>],
    ) -> Result<(), TrainError> {
        if !self.overlap {
            return Ok(());
        }
        while let Some(b) = self.plan.buckets.get(self.next) {
            if b.ready_after.is_none_or(|r| r < layer) {
                break;
            }
            self.launch(grads)?;
            self.early += 1;
        }
        Ok(())
    }

    /// Packs bucket `next` (taking its gradients out of `grads`) and reduces it or hands it
    /// to the communication thread.
    fn launch(&mut self, grads: &mut [Option<Tensor>]) -> Result<(), TrainError> {
        let i = self.next;
        let b = &self.plan.buckets[i];
        let mut flat = Vec::with_capacity(b.members.len());
        for &m in &b.members {
            let g = match grads[m].take() {
                Some(g) => g,
                // No token reached it: a zero gradient (as the single-device step).
                None => self.vars[m].as_tensor().zeros_like()?,
            };
            let g = if b.dense && !self.t0 {
                g.zeros_like()?
            } else {
                g
            };
            flat.push(g.flatten_all()?);
        }
        let flat = Tensor::cat(&flat, 0)?;
        match &self.thread {
            Some((tx, rx)) => {
                if tx.send((i, b.over, flat)).is_err() {
                    return Err(stopped(rx));
                }
            }
            None => self.reduced[i] = Some(reduce(self.comm(b.over), &flat)?),
        }
        self.next += 1;
        Ok(())
    }

    fn comm(&self, over: Over) -> &dyn Collective {
        match over {
            Over::World => self.comms.world.as_ref(),
            Over::Dp => self.comms.dp.as_ref(),
        }
    }

    /// Launches what is left, waits for every bucket and writes the reduced gradients into
    /// `grads` (every entry `Some`); returns how many buckets were launched during the
    /// backward.
    pub fn finish(mut self, grads: &mut [Option<Tensor>]) -> Result<usize, TrainError> {
        while self.next < self.plan.buckets.len() {
            self.launch(grads)?;
        }
        if let Some((tx, rx)) = self.thread.take() {
            drop(tx);
            for _ in 0..self.plan.buckets.len() {
                let (i, r) = rx.recv().map_err(|_| stopped(&rx))?;
                self.reduced[i] = Some(r?);
            }
        }
        for (b, sum) in self.plan.buckets.iter().zip(&mut self.reduced) {
            let sum = sum
                .take()
                .ok_or_else(|| TrainError::Options("a gradient bucket was never reduced".into()))?;
            let mut off = 0;
            for &m in &b.members {
                if grads[m].is_some() {
                    return Err(TrainError::Options(format!(
                        "gradient {m} changed after its bucket was launched"
                    )));
                }
                let shape = self.vars[m].as_tensor().shape().clone();
                let k = shape.elem_count();
                grads[m] = Some(sum.narrow(0, off, k)?.reshape(shape)?);
                off += k;
            }
        }
        Ok(self.early)
    }
}

/// Why the communication thread stopped: the error it reported, if any.
fn stopped(rx: &mpsc::Receiver<Done>) -> TrainError {
    match rx.try_iter().find_map(|(_, r)| r.err()) {
        Some(e) => e.into(),
        None => TrainError::Options("the gradient all-reduce thread stopped".into()),
    }
}

fn reduce(comm: &dyn Collective, flat: &Tensor) -> Result<Tensor, CollectiveError> {
    if comm.size() == 1 {
        return Ok(flat.clone());
    }
    comm.all_reduce_sum(flat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn lora() -> Lora {
        let t = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
        Lora::from_tensors(
            2,
            1.0,
            [
                ("model.layers.0.self_attn.q_proj", 3),
                ("model.layers.1.mlp.experts.0.up_proj", 5),
                ("model.layers.1.self_attn.q_proj", 3),
                ("model.layers.10.self_attn.q_proj", 3),
                ("model.layers.2.mlp.up_proj", 4),
                ("model.layers.2.self_attn.q_proj", 3),
            ]
            .into_iter()
            .map(|(n, k)| (n.to_string(), t(2, k), t(k, 2))),
        )
        .unwrap()
    }

    #[test]
    fn buckets_follow_the_backward_and_respect_the_cap() {
        let l = lora();
        let names: Vec<&str> = l.tensors().map(|(n, _, _)| n).collect();
        let plan = BucketPlan::new(&l, 12);
        // Every gradient exactly once.
        let mut all: Vec<usize> = plan
            .buckets
            .iter()
            .flat_map(|b| b.members.clone())
            .collect();
        all.sort();
        assert_eq!(all, (0..2 * names.len()).collect::<Vec<_>>());
        for b in &plan.buckets {
            let n: usize = b.members.iter().map(|&m| [6, 10, 6, 6, 8, 6][m / 2]).sum();
            assert!(n <= 12 || b.members.len() == 1, "{b:?}");
            let low = b.members.iter().map(|&m| layer_of(names[m / 2])).min();
            assert_eq!(b.ready_after, low.flatten(), "{b:?}");
        }
        // Launch order follows the backward: layer 10 (numeric, not name order) first.
        let ready: Vec<Option<usize>> = plan.buckets.iter().map(|b| b.ready_after).collect();
        assert_eq!(ready.first(), Some(&Some(10)));
        assert!(ready.windows(2).all(|w| w[0] >= w[1]), "{ready:?}");
        // One bucket per class when everything fits.
        assert_eq!(BucketPlan::new(&l, 1 << 20).buckets.len(), 3);
    }
}
