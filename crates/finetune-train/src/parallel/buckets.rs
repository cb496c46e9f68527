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
//! the buckets complete by then are packed and launched; [`Reducer::finish`] launches the
//! rest, waits for every bucket and unpacks, before clipping and the optimizer. How a bucket
//! is launched depends on the backend:
//!
//! - blocking backends (the CPU threads): handed to a communication thread of this rank
//!   through a channel, which all-reduces them in plan order while the backward of the earlier
//!   layers goes on;
//! - a [`SideReduce`] (NCCL with its own communication stream, `nccl::NcclSide`): enqueued
//!   from the compute thread on the communication stream after the compute stream's work so
//!   far (an event), so the all-reduce runs beside the backward's later kernels. The packed
//!   input and the output stay in [`Reducer`]'s in-flight list until [`SideReduce::join`]
//!   has made the compute stream wait for the communication stream, and only then are dropped
//!   (their memory returns to the compute stream's pool after that wait, so it cannot be
//!   reused while the all-reduce reads or writes it); a reducer dropped early (an error) joins
//!   first too, and leaks the buffers if even that fails;
//! - a backend that only enqueues on the compute stream without a side stream
//!   ([`Collective::enqueues`]): called from the compute thread at the same points (a second
//!   thread issuing NCCL calls would interleave them with the compute thread's
//!   tensor-parallel and all-to-all calls in an order that differs between ranks, which can
//!   deadlock); its work then queues behind the backward's kernels (no overlap on the GPU).
//!
//! Without overlap every bucket is launched in [`Reducer::finish`] (on the side stream too
//! when there is one, so that every rank makes the same calls on the same communicators), in
//! the same order with the same contents, so both give bit-identical gradients (each
//! element's sum over the ranks does not depend on when it is taken).

use super::collective::{Collective, CollectiveError};
use super::{class_of, Class, Comms};
use crate::TrainError;
use candle_core::{Tensor, Var};
use finetune_model::Lora;
use std::sync::mpsc;

/// Which communicator a bucket is reduced over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    World,
    Dp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub over: Over,
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

/// A bucket's all-reduce enqueued on a communication stream ([`SideReduce::launch`]).
pub struct InFlight {
    /// The sum over the group: valid only after [`SideReduce::join`].
    pub sum: Tensor,
    /// What the communication stream may still read or write besides `sum` (the packed
    /// input): dropped only after [`SideReduce::join`].
    pub keep: Box<dyn Send>,
}

/// The gradient all-reduce on a communication stream of its own beside the compute stream
/// (NCCL: `nccl::NcclSide`), called from the compute thread only, in plan order on every
/// rank.
pub trait SideReduce: Send + Sync {
    /// Makes the communication stream wait for the work enqueued so far on the compute stream
    /// (which produced `flat`: contiguous f32 on the device) and enqueues Σ over group `over`
    /// of `flat` there; returns at once.
    fn launch(&self, over: Over, flat: Tensor) -> Result<InFlight, CollectiveError>;
    /// Makes the compute stream wait for everything enqueued on the communication stream
    /// (returns at once; the compute stream's later work, the optimizer's included, is
    /// ordered after the all-reduces).
    fn join(&self) -> Result<(), CollectiveError>;
}

type Job = (usize, Over, Tensor);
type Done = (usize, Result<Tensor, CollectiveError>);

/// How buckets are launched (module doc).
enum Mode<'a> {
    /// Reduced on the calling thread (blocking backends without overlap; NCCL without a
    /// side stream).
    Inline,
    /// Handed to the communication thread.
    Thread(mpsc::Sender<Job>, mpsc::Receiver<Done>),
    /// Enqueued on the communication stream.
    Side(&'a dyn SideReduce),
}

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
    /// Reduced buckets (inline and thread paths), by plan index.
    reduced: Vec<Option<Tensor>>,
    mode: Mode<'a>,
    /// Buckets enqueued on the communication stream and not yet joined (side path).
    in_flight: Vec<(usize, InFlight)>,
}

impl<'a> Reducer<'a> {
    /// A reducer for one step. With a side stream (`comms.side`) every bucket goes there
    /// (launched during the backward with `overlap`, else in `finish`); otherwise, with
    /// `overlap` and a blocking backend, its communication thread is spawned on `scope` (it
    /// ends when the reducer is dropped).
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
        let mode = if let Some(side) = comms.side.as_deref() {
            Mode::Side(side)
        } else if threaded {
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
            Mode::Thread(job_tx, done_rx)
        } else {
            Mode::Inline
        };
        Reducer {
            plan,
            comms,
            vars,
            t0,
            overlap,
            next: 0,
            early: 0,
            reduced: vec![None; plan.buckets.len()],
            mode,
            in_flight: Vec::new(),
        }
    }

    /// Plan indices of the buckets enqueued on the communication stream and not yet joined.
    pub fn in_flight(&self) -> Vec<usize> {
        self.in_flight.iter().map(|(i, _)| *i).collect()
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

    /// Packs bucket `next` (taking its gradients out of `grads`) and reduces it, hands it
    /// to the communication thread or enqueues it on the communication stream.
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
        match &self.mode {
            Mode::Thread(tx, rx) => {
                if tx.send((i, b.over, flat)).is_err() {
                    return Err(stopped(rx));
                }
            }
            Mode::Side(side) => {
                // The exact tensor the stream reads is the one kept alive (no copy made
                // inside `launch` that could be freed while the stream reads it).
                let flat = flat.to_dtype(candle_core::DType::F32)?.contiguous()?;
                let f = side.launch(b.over, flat)?;
                self.in_flight.push((i, f));
            }
            Mode::Inline => self.reduced[i] = Some(reduce(self.comm(b.over), &flat)?),
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
        match std::mem::replace(&mut self.mode, Mode::Inline) {
            Mode::Thread(tx, rx) => {
                drop(tx);
                for _ in 0..self.plan.buckets.len() {
                    let (i, r) = rx.recv().map_err(|_| stopped(&rx))?;
                    self.reduced[i] = Some(r?);
                }
            }
            Mode::Side(side) => {
                // Put back so that a failed join still joins (or leaks) on drop.
                self.mode = Mode::Side(side);
                side.join()?;
                // The compute stream now waits for the all-reduces: the inputs may go.
                for (i, f) in std::mem::take(&mut self.in_flight) {
                    self.reduced[i] = Some(f.sum);
                    drop(f.keep);
                }
            }
            Mode::Inline => {}
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

impl Drop for Reducer<'_> {
    /// A reducer dropped with buckets in flight (an error during the backward or in
    /// `finish`): the compute stream waits for the communication stream before their memory
    /// is released; if even that fails, the buffers are leaked rather than handed back to an
    /// allocator the stream may still be writing through.
    fn drop(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        if let Mode::Side(side) = &self.mode {
            if side.join().is_err() {
                for f in std::mem::take(&mut self.in_flight) {
                    std::mem::forget(f);
                }
            }
        }
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

    /// What the fake side stream saw, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        /// Launch number, group, elements.
        Launch(usize, Over, usize),
        Join,
        /// A launch's kept input was dropped.
        Released(usize),
    }

    type Log = std::sync::Arc<std::sync::Mutex<Vec<Ev>>>;

    /// Dropped with a launch's kept input: logs it.
    struct Token(usize, Log);

    impl Drop for Token {
        fn drop(&mut self) {
            self.1.lock().unwrap().push(Ev::Released(self.0));
        }
    }

    /// A side stream that records its calls; its "sum" is 2 × the bucket (two ranks holding
    /// the same gradients). Launch number `fail_at` fails.
    struct FakeSide {
        log: Log,
        launches: std::sync::atomic::AtomicUsize,
        fail_at: Option<usize>,
    }

    impl SideReduce for FakeSide {
        fn launch(&self, over: Over, flat: Tensor) -> Result<InFlight, CollectiveError> {
            let k = self
                .launches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if Some(k) == self.fail_at {
                return Err(CollectiveError::Invalid {
                    op: "fake",
                    message: format!("launch {k} fails"),
                });
            }
            assert!(flat.is_contiguous() && flat.dtype() == DType::F32);
            self.log
                .lock()
                .unwrap()
                .push(Ev::Launch(k, over, flat.elem_count()));
            Ok(InFlight {
                sum: (&flat * 2.0)?,
                keep: Box::new((flat, Token(k, self.log.clone()))),
            })
        }

        fn join(&self) -> Result<(), CollectiveError> {
            self.log.lock().unwrap().push(Ev::Join);
            Ok(())
        }
    }

    fn fake_comms(fail_at: Option<usize>) -> (Comms, Log) {
        use super::super::Solo;
        let log = Log::default();
        let side = FakeSide {
            log: log.clone(),
            launches: Default::default(),
            fail_at,
        };
        let comms = Comms {
            world: Box::new(Solo),
            tp: Box::new(Solo),
            a2a: Box::new(Solo),
            dp: Box::new(Solo),
            side: Some(Box::new(side)),
        };
        (comms, log)
    }

    fn random_grads(vars: &[Var]) -> Vec<Option<Tensor>> {
        vars.iter()
            .map(|v| Some(Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap()))
            .collect()
    }

    /// Buckets in flight after each layer, the log, the reduced gradients, buckets launched
    /// early.
    type SideRun = (Vec<Vec<usize>>, Vec<Ev>, Vec<Option<Tensor>>, usize);

    /// The backward of layers 10 … 0 through a reducer on the fake side stream: the buckets
    /// in flight after each layer, the log, and the reduced gradients.
    fn run_side(overlap: bool, grads: &[Option<Tensor>]) -> SideRun {
        let l = lora();
        let vars: Vec<Var> = l.vars().cloned().collect();
        let plan = BucketPlan::new(&l, 12);
        let (comms, log) = fake_comms(None);
        let mut grads = grads.to_vec();
        let mut in_flight = Vec::new();
        let early = std::thread::scope(|s| {
            let mut red = Reducer::new(&plan, &comms, &vars, true, overlap, s);
            for layer in (0..=10).rev() {
                red.layer_done(layer, &mut grads).unwrap();
                in_flight.push(red.in_flight());
                // Nothing joined or released during the backward.
                assert!(
                    log.lock()
                        .unwrap()
                        .iter()
                        .all(|e| matches!(e, Ev::Launch(..))),
                    "{:?}",
                    log.lock().unwrap()
                );
            }
            red.finish(&mut grads).unwrap()
        });
        let log = log.lock().unwrap().clone();
        (in_flight, log, grads, early)
    }

    #[test]
    fn side_stream_buckets_stay_in_flight_until_joined() {
        let l = lora();
        let vars: Vec<Var> = l.vars().cloned().collect();
        let plan = BucketPlan::new(&l, 12);
        let grads = random_grads(&vars);
        let (in_flight, log, reduced, early) = run_side(true, &grads);
        // After layer L, exactly the buckets complete by then (ready_after ≥ L) are in flight,
        // in plan order.
        for (step, layer) in (0..=10usize).rev().enumerate() {
            let want: Vec<usize> = (0..plan.buckets.len())
                .filter(|&i| plan.buckets[i].ready_after.is_some_and(|r| r >= layer))
                .collect();
            assert_eq!(in_flight[step], want, "after layer {layer}");
        }
        let n = plan.buckets.len();
        assert_eq!(early, in_flight.last().unwrap().len());
        // Every bucket holds adapters of some layer, so all go out during the backward, and
        // at several points of it (layer 10's first, alone).
        assert_eq!(early, n);
        assert!(n >= 3 && !in_flight[0].is_empty() && in_flight[0].len() < n);
        // Every bucket launched once in plan order with its group and size, then one join,
        // then (only then) every kept input released.
        let sizes: Vec<usize> = plan
            .buckets
            .iter()
            .map(|b| b.members.iter().map(|&m| vars[m].elem_count()).sum())
            .collect();
        let mut want: Vec<Ev> = (0..n)
            .map(|i| Ev::Launch(i, plan.buckets[i].over, sizes[i]))
            .collect();
        want.push(Ev::Join);
        assert_eq!(log[..=n], want[..]);
        let mut released: Vec<Ev> = log[n + 1..].to_vec();
        released.sort_by_key(|e| format!("{e:?}"));
        let mut all: Vec<Ev> = (0..n).map(Ev::Released).collect();
        all.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(released, all);
        // The reduced gradients are the fake's sums, unpacked to their tensors.
        for (g, r) in grads.iter().zip(&reduced) {
            let (g, r) = (g.as_ref().unwrap(), r.as_ref().unwrap());
            assert_eq!(g.shape(), r.shape());
            let d: f32 = ((g * 2.0).unwrap() - r)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0);
        }
        // Without overlap: nothing launched during the backward, the same launches (order,
        // groups, sizes) in `finish`, the same gradients bit for bit.
        let (in_flight0, log0, reduced0, early0) = run_side(false, &grads);
        assert_eq!(early0, 0);
        assert!(in_flight0.iter().all(Vec::is_empty));
        assert_eq!(log0[..=n], want[..]);
        for (a, b) in reduced.iter().zip(&reduced0) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_failed_launch_joins_before_releasing_what_is_in_flight() {
        let l = lora();
        let vars: Vec<Var> = l.vars().cloned().collect();
        let plan = BucketPlan::new(&l, 12);
        let (comms, log) = fake_comms(Some(2));
        let mut grads = random_grads(&vars);
        let err = std::thread::scope(|s| {
            let mut red = Reducer::new(&plan, &comms, &vars, true, true, s);
            for layer in (0..=10).rev() {
                if let Err(e) = red.layer_done(layer, &mut grads) {
                    assert_eq!(red.in_flight(), vec![0, 1]);
                    return e;
                }
            }
            panic!("launch 2 should have failed");
        });
        assert!(err.to_string().contains("launch 2 fails"), "{err}");
        let log = log.lock().unwrap().clone();
        let n = plan.buckets.len();
        assert_eq!(
            log[..3],
            [
                Ev::Launch(0, plan.buckets[0].over, log_size(&log, 0)),
                Ev::Launch(1, plan.buckets[1].over, log_size(&log, 1)),
                Ev::Join
            ]
        );
        let mut rest = log[3..].to_vec();
        rest.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(rest, vec![Ev::Released(0), Ev::Released(1)], "{n} buckets");
    }

    fn log_size(log: &[Ev], k: usize) -> usize {
        log.iter()
            .find_map(|e| match e {
                Ev::Launch(i, _, n) if *i == k => Some(*n),
                _ => None,
            })
            .unwrap()
    }
}
