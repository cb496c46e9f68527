//! The training loop ([`Trainer::run`]): one optimizer step reads top to bottom.
//!
//! Per step s (0-based) with B = micro_batch × grad_accum sequences x₁…x_B and N the number of
//! target tokens among them:
//!   loss_s = (1/N) Σ_b Σ_{t ∈ targets(x_b)} −log p(x_b[t] | x_b[<t])
//! computed sequence by sequence: each sequence's summed cross-entropy / N is backpropagated and
//! its LoRA gradients added, so accumulation changes nothing but memory (transformers' Trainer
//! normalises by `num_items_in_batch` the same way). Then global-norm clipping, AdamW at
//! lr_at(s), and the bookkeeping: metrics, held-out loss every `eval_every` steps, a checkpoint
//! every `save_every` steps and at the end. A step whose loss or gradient norm is not finite is
//! skipped (no update) and counted; `max_bad_steps` of them in a row stop the run. A stop
//! request (SIGINT/SIGTERM in the binary) ends the loop after the current step with a
//! checkpoint.
//!
//! With `recompute`, each layer's activations are dropped after the forward and the layer is
//! replayed during backward (activation checkpointing per layer): memory holds one layer's
//! graph instead of all of them, at the cost of a second forward. Dropout masks are functions
//! of (seed, module, token, feature) (`finetune_model::dropout`; the trainer numbers sequence b of
//! step s as s·B + b), so the replayed layer draws the same ones and gradients equal the plain
//! path's; parallel ranks draw them the same way, so dropout changes nothing there either.
//!
//! A parallel run ([`Trainer::new_parallel`], one `Trainer` per rank) goes through the same
//! loop: each rank takes its slice of the step's sequences, runs them with the layout's
//! forward/backward (`parallel::engine`, with per-layer recompute too), and the
//! loss, gradients and clipping norm are reduced over the ranks before the identical AdamW
//! update (`parallel` module doc). Rank 0 writes metrics and checkpoints (whole adapters).

use crate::adamw::{clip_grad_norm, AdamW, AdamWConfig};
use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::schedule::{lr_at, LrSchedule};
use crate::TrainError;
use candle_core::{Tensor, Var};
use finetune_data::{Batches, Cursor, Sequence};
use finetune_model::peft::AdapterMeta;
use finetune_model::{Lora, Qwen3Moe};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything that shapes a run (from the recipe).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub lr: f64,
    pub schedule: LrSchedule,
    pub warmup: u64,
    pub total_steps: u64,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub recompute: bool,
    pub adamw: AdamWConfig,
    /// 0 turns clipping off (the norm is still reported).
    pub max_grad_norm: f64,
    /// Held-out loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Held-out sequences read per evaluation (0: all).
    pub eval_sequences: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    pub keep_checkpoints: usize,
    pub max_bad_steps: u64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens read this step (all of them, prompt and target).
    pub tokens: u64,
    pub target_tokens: u64,
    pub tokens_per_sec: f64,
    pub elapsed_secs: f64,
    pub peak_rss_mib: Option<f64>,
    pub skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub stopped_early: bool,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub heldout_before: Option<f64>,
    pub heldout_after: Option<f64>,
    pub skipped_steps: u64,
    pub tokens_seen: u64,
    pub elapsed_secs: f64,
    pub last_checkpoint: Option<PathBuf>,
}

/// Where a run writes: `metrics.jsonl` and `checkpoints/` under `dir`.
pub struct RunOutput {
    pub dir: PathBuf,
    pub adapter_meta: AdapterMeta,
    /// The resolved settings recorded in every checkpoint.
    pub recipe: serde_json::Value,
}

pub struct Trainer<'m> {
    model: &'m Qwen3Moe,
    lora: Lora,
    vars: Vec<Var>,
    opt: AdamW,
    train: Vec<Sequence>,
    heldout: Vec<Sequence>,
    batches: Batches,
    options: TrainOptions,
    step: u64,
    tokens_seen: u64,
    skipped_steps: u64,
    bad_in_a_row: u64,
    elapsed_before: f64,
    last_heldout: Option<f64>,
    /// This rank's place in a parallel run (`None`: single device).
    parallel: Option<crate::parallel::RankContext>,
    /// Full-parameter training ([`Trainer::new_full`]): the checkpoint names of `vars`, which
    /// are the model's own weights (`lora` is then empty).
    full: Option<Vec<String>>,
}

/// Peak resident memory of this process (Linux), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs `f` on a thread with a 1 GiB stack: candle's backward recurses once per graph node and
/// overflows the default 8 MiB on a real model's graph. The thread is one of a rayon pool of
/// the configured size (`RAYON_NUM_THREADS`, else the available cores) whose threads all have
/// that stack, so the parallel loops inside the step (candle's gemm, the fused ops) run on this
/// pool with the step's own thread taking part, rather than the step's thread waiting idle
/// for the global pool's threads (one thread more than there are cores, DESIGN.md "CPU speed").
pub fn on_large_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    const STACK: usize = 1 << 30;
    match rayon::ThreadPoolBuilder::new()
        .stack_size(STACK)
        .thread_name(|i| format!("train-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        // No pool (threads could not be spawned): one plain thread, as before.
        Err(_) => std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("train".into())
                .stack_size(STACK)
                .spawn_scoped(s, f)
                .expect("spawning the training thread")
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
    }
}

impl<'m> Trainer<'m> {
    /// A fresh run (step 0) of `lora` on `train`, held-out loss on `heldout`.
    pub fn new(
        model: &'m Qwen3Moe,
        lora: Lora,
        train: Vec<Sequence>,
        heldout: Vec<Sequence>,
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        if train.is_empty() {
            return Err(TrainError::EmptyDataset);
        }
        if options.micro_batch == 0 || options.grad_accum == 0 {
            return Err(TrainError::Options(
                "micro_batch and grad_accum must be at least 1".into(),
            ));
        }
        let vars: Vec<Var> = lora.vars().cloned().collect();
        if vars.is_empty() {
            return Err(TrainError::Options(
                "no LoRA target matched a projection of the model".into(),
            ));
        }
        Self::new_with(model, lora, vars, train, heldout, options)
    }

    fn new_with(
        model: &'m Qwen3Moe,
        lora: Lora,
        vars: Vec<Var>,
        train: Vec<Sequence>,
        heldout: Vec<Sequence>,
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        if train.is_empty() {
            return Err(TrainError::EmptyDataset);
        }
        if options.micro_batch == 0 || options.grad_accum == 0 {
            return Err(TrainError::Options(
                "micro_batch and grad_accum must be at least 1".into(),
            ));
        }
        let opt = AdamW::new(vars.clone(), options.adamw)?;
        let batches = Batches::new(train.len(), options.seed, Cursor::default());
        Ok(Self {
            model,
            lora,
            vars,
            opt,
            train,
            heldout,
            batches,
            options,
            step: 0,
            tokens_seen: 0,
            skipped_steps: 0,
            bad_in_a_row: 0,
            elapsed_before: 0.0,
            last_heldout: None,
            parallel: None,
            full: None,
        })
    }

    /// One rank of a parallel run: `full` is the whole adapter (every rank builds the same one,
    /// e.g. from the same seed); the rank keeps its part of it ([`RankContext::local_lora`]).
    /// Every rank must be given the same data and options.
    ///
    /// [`RankContext::local_lora`]: crate::parallel::RankContext::local_lora
    pub fn new_parallel(
        model: &'m Qwen3Moe,
        full: &Lora,
        train: Vec<Sequence>,
        heldout: Vec<Sequence>,
        options: TrainOptions,
        rank: crate::parallel::RankContext,
    ) -> Result<Self, TrainError> {
        // The model must hold what this rank computes with (its shard, or the whole model).
        let need = rank.base_shard(&model.config);
        if !model.shard().covers(&need) {
            return Err(TrainError::Options(format!(
                "rank {}: the base model holds {:?}, this rank needs {need:?} (load it with \
                 parallel::load_rank_model)",
                rank.rank(),
                model.shard()
            )));
        }
        let mut lora = rank.local_lora(full)?;
        // The same masks as the single-device run (counter-based: `finetune_model::dropout`).
        lora.copy_dropout(full);
        let mut t = Self::new(model, lora, train, heldout, options)?;
        t.parallel = Some(rank);
        Ok(t)
    }

    /// This rank's place in a parallel run.
    pub fn rank_context(&self) -> Option<&crate::parallel::RankContext> {
        self.parallel.as_ref()
    }

    /// A fresh full-parameter run (`finetune pretrain`): `params` are the model's own weights
    /// as variables ([`Qwen3Moe::make_trainable`]), trained with the same loop, checkpoints
    /// ([`checkpoint::save_full`]) and metrics as an adapter.
    pub fn new_full(
        model: &'m Qwen3Moe,
        params: Vec<(String, Var)>,
        train: Vec<Sequence>,
        heldout: Vec<Sequence>,
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        if options.recompute {
            // The recompute path starts backward at detached layer inputs: the embedding
            // would get no gradient.
            return Err(TrainError::Options(
                "activation recompute is for adapter training; full-parameter training runs without it".into(),
            ));
        }
        let lora = Lora::init(&[], &[], 1, 1.0, 0, model.device())?;
        let vars = params.iter().map(|(_, v)| v.clone()).collect();
        let mut trainer = Self::new_with(model, lora, vars, train, heldout, options)?;
        trainer.full = Some(params.into_iter().map(|(n, _)| n).collect());
        Ok(trainer)
    }

    /// Continues a full-parameter run from `ckpt` bit-identically (see [`Self::resume`]).
    pub fn resume_full(&mut self, ckpt: checkpoint::FullCheckpoint) -> Result<(), TrainError> {
        let names = self.full.clone().unwrap_or_default();
        let same = ckpt.params.len() == self.vars.len()
            && ckpt
                .params
                .iter()
                .zip(names.iter().zip(&self.vars))
                .all(|((n, t), (name, var))| n == name && t.dims() == var.dims());
        if !same {
            return Err(TrainError::Checkpoint {
                path: ckpt.dir.clone(),
                message: "its weights have other names or shapes than this run's model".into(),
            });
        }
        for (var, (_, t)) in self.vars.iter().zip(&ckpt.params) {
            var.set(&t.to_device(var.device())?)?;
        }
        self.restore(ckpt.m, ckpt.v, &ckpt.state)
    }

    /// The trained weights by checkpoint name (full-parameter runs; empty otherwise).
    pub fn full_params(&self) -> Vec<(String, Tensor)> {
        self.full
            .iter()
            .flatten()
            .zip(&self.vars)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Continues from `ckpt`: adapter, moments, update counts, data cursor and counters (dropout
    /// masks follow from the step), so that the rest of the run is bit-identical to an uninterrupted one.
    /// The adapter in `ckpt` must have the same modules and shapes as this trainer's.
    pub fn resume(&mut self, ckpt: Checkpoint) -> Result<(), TrainError> {
        // Checkpoints hold whole adapters; a rank resumes its part (any layout).
        let ckpt = match &self.parallel {
            Some(p) => p.restrict(ckpt)?,
            None => ckpt,
        };
        let here: Vec<(&str, Vec<usize>, Vec<usize>)> = self
            .lora
            .tensors()
            .map(|(n, a, b)| (n, a.dims().to_vec(), b.dims().to_vec()))
            .collect();
        let there: Vec<(&str, Vec<usize>, Vec<usize>)> = ckpt
            .lora
            .tensors()
            .map(|(n, a, b)| (n, a.dims().to_vec(), b.dims().to_vec()))
            .collect();
        if here != there {
            return Err(TrainError::Checkpoint {
                path: ckpt.dir.clone(),
                message: "its adapter has other modules or shapes than this run's".into(),
            });
        }
        // Same modules and shapes: the same variables (stacks included), in the same order.
        for (var, src) in self.vars.iter().zip(ckpt.lora.vars()) {
            var.set(&src.as_tensor().to_device(var.device())?)?;
        }
        self.restore(ckpt.m, ckpt.v, &ckpt.state)
    }

    /// The optimizer, data cursor and counters of a checkpoint's state.
    fn restore(
        &mut self,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
        s: &checkpoint::TrainerState,
    ) -> Result<(), TrainError> {
        self.opt.set_state(m, v, s.adam_t.clone(), s.step)?;
        self.batches = Batches::new(self.train.len(), self.options.seed, s.cursor);
        self.step = s.step;
        self.tokens_seen = s.tokens_seen;
        self.skipped_steps = s.skipped_steps;
        self.bad_in_a_row = s.bad_steps_in_a_row;
        self.elapsed_before = s.elapsed_secs;
        self.last_heldout = s.last_heldout_loss;
        Ok(())
    }

    pub fn lora(&self) -> &Lora {
        &self.lora
    }

    /// The whole adapter: this trainer's, or in a parallel run the experts' adapters gathered
    /// from every rank onto rank 0 (`None` on the other ranks, which must call it too).
    pub fn whole_lora(&self) -> Result<Option<Lora>, TrainError> {
        match &self.parallel {
            None => Ok(Some(Lora::from_tensors(
                self.lora.r,
                self.lora.scale,
                self.lora
                    .tensors()
                    .map(|(n, a, b)| (n.to_string(), a.clone(), b.clone())),
            )?)),
            Some(p) => {
                let (m, v, t) = self.opt.state();
                Ok(p.gather(&self.lora, m, v, t)?.map(|w| w.0))
            }
        }
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Mean cross-entropy over the target tokens of the held-out sequences (dropout off);
    /// `None` without held-out data.
    pub fn heldout_loss(&self) -> Result<Option<f64>, TrainError> {
        if self.heldout.is_empty() {
            return Ok(None);
        }
        let n = match self.options.eval_sequences {
            0 => self.heldout.len(),
            k => k.min(self.heldout.len()),
        };
        self.lora.set_training(false);
        let result = (|| {
            if let Some(p) = &self.parallel {
                let all: Vec<usize> = (0..n).collect();
                let count: usize = self.heldout[..n].iter().map(|s| s.target_tokens()).sum();
                let mut sum = 0f64;
                for slot in p.local_slice(&all) {
                    let pad = crate::parallel::RankContext::padding();
                    let seq = slot.map_or(&pad, |i| &self.heldout[i]);
                    sum += crate::parallel::engine::loss_sum(self.model, &self.lora, p, seq)?;
                }
                return Ok(Some(p.sum_over_data(sum)? / count.max(1) as f64));
            }
            let (mut sum, mut count) = (0f64, 0usize);
            for seq in &self.heldout[..n] {
                let logits =
                    self.model
                        .forward_with(&seq.ids, &seq.position_ids, Some(&self.lora))?;
                let s = Qwen3Moe::loss_sum_tensor(&logits.detach(), &seq.labels)?;
                sum += s.to_scalar::<f32>()? as f64;
                count += seq.target_tokens();
            }
            Ok::<_, TrainError>(Some(sum / count.max(1) as f64))
        })();
        self.lora.set_training(true);
        result
    }

    /// Summed loss of `seq` and its gradient contribution `d(loss_sum / n_step)/dθ`, added
    /// into `grads`. `number` is the sequence's number in the run (its dropout masks' key).
    fn accumulate(
        &self,
        seq: &Sequence,
        number: u64,
        n_step: f64,
        grads: &mut [Option<Tensor>],
        layer_done: Option<crate::parallel::engine::LayerDone<'_>>,
    ) -> Result<f64, TrainError> {
        let mut add = |store: &candle_core::backprop::GradStore| -> Result<(), TrainError> {
            for (acc, var) in grads.iter_mut().zip(&self.vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };
        if let Some(p) = &self.parallel {
            return crate::parallel::engine::accumulate(
                self.model,
                &self.lora,
                &self.vars,
                p,
                seq,
                number,
                n_step,
                self.options.recompute,
                grads,
                layer_done,
            );
        }
        let lora = Some(&self.lora);
        let mut ctx = self.model.sequence_context(&seq.position_ids, 0)?;
        ctx.set_dropout_sequence(number);
        if !self.options.recompute {
            // The head's loss fused with lm_head: the [T, vocab] logits are never built.
            let mut x = self.model.embed_tokens(&seq.ids)?;
            for layer in 0..self.model.num_layers() {
                x = self.model.layer_forward(layer, &x, &ctx, lora, None)?;
            }
            let loss_sum = self.model.head_loss_sum(&x, &seq.labels)?;
            add(&(&loss_sum / n_step)?.backward()?)?;
            return Ok(loss_sum.to_scalar::<f32>()? as f64);
        }
        // Forward keeping only each layer's input (the replay draws the same dropout masks:
        // they are functions of the sequence's number, the module and the token).
        let mut inputs = Vec::with_capacity(self.model.num_layers());
        let mut x = self.model.embed_tokens(&seq.ids)?;
        for layer in 0..self.model.num_layers() {
            inputs.push(x.clone());
            x = self
                .model
                .layer_forward(layer, &x, &ctx, lora, None)?
                .detach();
        }
        // Head and loss, then each layer replayed from its input, last to first: the gradient
        // flowing into layer i's output is g, so backpropagating Σ(yᵢ ⊙ g) gives that layer's
        // LoRA gradients and the gradient of its input.
        let top = Var::from_tensor(&x)?;
        let loss_sum = self.model.head_loss_sum(top.as_tensor(), &seq.labels)?;
        let store = (&loss_sum / n_step)?.backward()?;
        let mut g = store
            .get(top.as_tensor())
            .cloned()
            .ok_or_else(|| TrainError::Options("no gradient reached the last layer".into()))?;
        for layer in (0..self.model.num_layers()).rev() {
            let input = Var::from_tensor(&inputs[layer])?;
            let y = self
                .model
                .layer_forward(layer, input.as_tensor(), &ctx, lora, None)?;
            let store = (y * &g)?.sum_all()?.backward()?;
            add(&store)?;
            if layer > 0 {
                g = store.get(input.as_tensor()).cloned().ok_or_else(|| {
                    TrainError::Options("no gradient reached a layer input".into())
                })?;
            }
        }
        Ok(loss_sum.to_scalar::<f32>()? as f64)
    }

    /// The summed loss of the step's sequences `batch` (indices into the training set) and its
    /// gradients d(loss_sum / n_targets)/dθ, one per variable (zeros where no gradient came). A
    /// parallel rank runs its slice of the step, padded so that its all-to-all group runs in
    /// lockstep, and returns the loss summed over the data ranks and the gradients summed over
    /// the ranks (`RankContext::reduced_step`; not yet clipped).
    fn step_grads(
        &self,
        batch: &[usize],
        n_targets: usize,
    ) -> Result<(f64, Vec<Option<Tensor>>), TrainError> {
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0f64;
        let slots: Vec<Option<usize>> = match &self.parallel {
            Some(p) => p.local_slice(batch),
            None => batch.iter().map(|&i| Some(i)).collect(),
        };
        let pad = crate::parallel::RankContext::padding();
        let n_step = n_targets.max(1) as f64;
        // Sequence b of step s is number s·B + b of the run (B the step's sequences): the key
        // of its dropout masks, the same whichever rank runs it.
        let per_step = (self.options.micro_batch * self.options.grad_accum).max(batch.len());
        let first = self.step * per_step as u64
            + self
                .parallel
                .as_ref()
                .map_or(0, |p| p.local_offset(batch.len())) as u64;
        if let Some(p) = &self.parallel {
            // The gradient all-reduce runs during the last sequence's backward (or after it),
            // and is complete before the loss's all-reduce below.
            let local = p.reduced_step(&self.lora, &self.vars, &mut grads, |grads, done| {
                let mut sum = 0f64;
                let last = slots.len().saturating_sub(1);
                let mut done = Some(done);
                for (k, slot) in slots.iter().enumerate() {
                    let seq = slot.map_or(&pad, |i| &self.train[i]);
                    let hook = if k == last { done.take() } else { None };
                    sum += self.accumulate(seq, first + k as u64, n_step, grads, hook)?;
                }
                Ok(sum)
            })?;
            loss_sum = p.sum_over_data(local)?;
        } else {
            for (k, slot) in slots.into_iter().enumerate() {
                let seq = slot.map_or(&pad, |i| &self.train[i]);
                loss_sum += self.accumulate(seq, first + k as u64, n_step, &mut grads, None)?;
            }
        }
        // A module no token reached gets a zero gradient (transformers 5's fused experts
        // do the same), so its AdamW moments keep decaying like everyone else's.
        let grads: Vec<Option<Tensor>> = grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.zeros_like()).map(Some))
            .collect::<candle_core::Result<_>>()?;
        Ok((loss_sum, grads))
    }

    /// The loss and the (reduced, unclipped) gradients of one step over the training
    /// sequences `batch`, with the gradient norm, without updating anything: what an
    /// optimizer step would see. Gradients are named `<module>.A` / `<module>.B`; a parallel
    /// rank returns those of the adapters it holds. Every rank of a parallel run must call it.
    #[allow(clippy::type_complexity)]
    pub fn step_gradients(
        &self,
        batch: &[usize],
    ) -> Result<(f64, f64, Vec<(String, Tensor)>), TrainError> {
        let n_targets: usize = batch.iter().map(|&i| self.train[i].target_tokens()).sum();
        let (loss_sum, mut grads) = self.step_grads(batch, n_targets)?;
        let norm = match &self.parallel {
            Some(p) => p.clip(&self.lora, &mut grads, f64::INFINITY)?,
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        let names = self
            .lora
            .names()
            .flat_map(|n| [format!("{n}.A"), format!("{n}.B")]);
        // Per module, whatever the storage (a stacked expert gradient gives each expert its
        // slice).
        let grads: Vec<Tensor> = grads.into_iter().flatten().collect();
        let grads = self.lora.unstack_params(&grads)?;
        Ok((
            loss_sum / n_targets.max(1) as f64,
            norm,
            names.zip(grads).collect(),
        ))
    }

    fn state(&self, out: &RunOutput, elapsed: f64) -> TrainerState {
        TrainerState {
            format: checkpoint::FORMAT,
            step: self.step,
            total_steps: self.options.total_steps,
            cursor: self.batches.cursor(),
            adam_t: self.opt.state().2.to_vec(),
            tokens_seen: self.tokens_seen,
            skipped_steps: self.skipped_steps,
            bad_steps_in_a_row: self.bad_in_a_row,
            elapsed_secs: elapsed,
            last_heldout_loss: self.last_heldout,
            recipe: out.recipe.clone(),
            checksums: HashMap::new(),
        }
    }

    /// Writes a checkpoint of the current state under `out.dir/checkpoints`.
    /// In a parallel run every rank must call it: the experts' adapters and moments are
    /// gathered, and rank 0 writes the whole checkpoint (the path is returned on every rank).
    pub fn save(&self, out: &RunOutput, elapsed: f64) -> Result<PathBuf, TrainError> {
        let (m, v, t) = self.opt.state();
        if self.full.is_some() {
            return checkpoint::save_full(
                &out.dir.join("checkpoints"),
                &self.full_params(),
                (m, v),
                self.state(out, elapsed),
                self.options.keep_checkpoints,
            );
        }
        if let Some(p) = &self.parallel {
            let dir = out
                .dir
                .join("checkpoints")
                .join(checkpoint::dir_name(self.step));
            if let Some((lora, m, v, t)) = p.gather(&self.lora, m, v, t)? {
                let mut state = self.state(out, elapsed);
                state.adam_t = t;
                checkpoint::save(
                    &out.dir.join("checkpoints"),
                    &lora,
                    &out.adapter_meta,
                    (&m, &v),
                    state,
                    self.options.keep_checkpoints,
                )?;
            }
            // Nobody reads the checkpoint before rank 0 has renamed it into place.
            p.comms.world.barrier()?;
            return Ok(dir);
        }
        checkpoint::save(
            &out.dir.join("checkpoints"),
            &self.lora,
            &out.adapter_meta,
            (m, v),
            self.state(out, elapsed),
            self.options.keep_checkpoints,
        )
    }

    /// Trains until `total_steps` (or `stop` is raised), calling `report` after every step.
    pub fn run(
        &mut self,
        out: Option<&RunOutput>,
        stop: &AtomicBool,
        report: &mut dyn FnMut(&StepMetrics),
    ) -> Result<TrainSummary, TrainError> {
        let o = self.options.clone();
        let started = Instant::now();
        let elapsed = |before: f64| before + started.elapsed().as_secs_f64();
        let writes = self.parallel.as_ref().is_none_or(|p| p.rank() == 0);
        let mut metrics_file = match out {
            Some(out) if writes => {
                std::fs::create_dir_all(&out.dir).map_err(|e| TrainError::io(&out.dir, e))?;
                let path = out.dir.join("metrics.jsonl");
                Some((
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| TrainError::io(&path, e))?,
                    path,
                ))
            }
            _ => None,
        };
        let mut summary = TrainSummary {
            steps: self.step,
            stopped_early: false,
            first_loss: None,
            last_loss: None,
            heldout_before: None,
            heldout_after: None,
            skipped_steps: self.skipped_steps,
            tokens_seen: self.tokens_seen,
            elapsed_secs: 0.0,
            last_checkpoint: None,
        };
        if self.step == 0 {
            self.last_heldout = self.heldout_loss()?;
        }
        summary.heldout_before = self.last_heldout;
        let per_step = o.micro_batch * o.grad_accum;
        while self.step < o.total_steps {
            let step_started = Instant::now();
            let lr = lr_at(o.schedule, o.lr, o.warmup, o.total_steps, self.step);

            // The sequences of this step, and the target tokens the loss is averaged over.
            let batch: Vec<usize> = (0..per_step).map(|_| self.batches.next_index()).collect();
            let n_targets: usize = batch.iter().map(|&i| self.train[i].target_tokens()).sum();
            let n_tokens: usize = batch.iter().map(|&i| self.train[i].ids.len()).sum();

            // Forward + backward per sequence; gradients accumulate.
            let (loss_sum, mut grads) = self.step_grads(&batch, n_targets)?;
            let loss = loss_sum / n_targets.max(1) as f64;

            // Clip, then update, unless the step is not finite.
            let max_norm = if o.max_grad_norm > 0.0 {
                o.max_grad_norm
            } else {
                f64::INFINITY
            };
            let grad_norm = match &self.parallel {
                Some(p) => p.clip(&self.lora, &mut grads, max_norm)?,
                None => clip_grad_norm(&mut grads, max_norm)?,
            };
            let skipped = !loss.is_finite() || !grad_norm.is_finite();
            if skipped {
                self.skipped_steps += 1;
                self.bad_in_a_row += 1;
            } else {
                self.bad_in_a_row = 0;
                self.opt.step(&grads, lr)?;
            }
            self.step += 1;
            self.tokens_seen += n_tokens as u64;

            // Bookkeeping: held-out loss, checkpoint, metrics.
            let last = self.step == o.total_steps;
            let heldout = if (o.eval_every > 0 && self.step % o.eval_every == 0) || last {
                self.last_heldout = self.heldout_loss()?;
                self.last_heldout
            } else {
                None
            };
            let bad_run = self.bad_in_a_row >= o.max_bad_steps.max(1);
            let checkpoint = match out {
                Some(out)
                    if (o.save_every > 0 && self.step % o.save_every == 0) || last || bad_run =>
                {
                    let dir = self.save(out, elapsed(self.elapsed_before))?;
                    summary.last_checkpoint = Some(dir.clone());
                    Some(dir.display().to_string())
                }
                _ => None,
            };
            let saved = checkpoint.is_some();
            let secs = step_started.elapsed().as_secs_f64();
            let m = StepMetrics {
                step: self.step,
                total_steps: o.total_steps,
                loss,
                lr,
                grad_norm,
                tokens: n_tokens as u64,
                target_tokens: n_targets as u64,
                tokens_per_sec: n_tokens as f64 / secs.max(1e-9),
                elapsed_secs: elapsed(self.elapsed_before),
                peak_rss_mib: peak_rss_mib(),
                skipped,
                heldout_loss: heldout,
                checkpoint,
            };
            if let Some((f, path)) = metrics_file.as_mut() {
                let line = serde_json::to_string(&m).map_err(|e| TrainError::io(path, e))?;
                writeln!(f, "{line}")
                    .and_then(|_| f.flush())
                    .map_err(|e| TrainError::io(path, e))?;
            }
            report(&m);
            if !skipped {
                summary.first_loss.get_or_insert(loss);
                summary.last_loss = Some(loss);
            }
            if bad_run {
                return Err(TrainError::NonFinite {
                    steps: self.bad_in_a_row,
                    step: self.step,
                });
            }
            // A stop request (signal) ends the run here, after a checkpoint; the ranks of a
            // parallel run agree on it, so that all of them leave at the same step.
            let stop_now = match &self.parallel {
                Some(p) => p.any(stop.load(Ordering::SeqCst))?,
                None => stop.load(Ordering::SeqCst),
            };
            if stop_now && !last {
                if let (Some(out), false) = (out, saved) {
                    summary.last_checkpoint = Some(self.save(out, elapsed(self.elapsed_before))?);
                }
                summary.stopped_early = true;
                break;
            }
        }
        summary.steps = self.step;
        summary.heldout_after = self.last_heldout;
        summary.skipped_steps = self.skipped_steps;
        summary.tokens_seen = self.tokens_seen;
        summary.elapsed_secs = elapsed(self.elapsed_before);
        Ok(summary)
    }
}

/// Steps for `epochs` passes over `sequences` at `per_step` sequences per step (at least 1).
pub fn steps_for_epochs(sequences: usize, per_step: usize, epochs: f64) -> u64 {
    ((sequences as f64 * epochs) / per_step.max(1) as f64)
        .ceil()
        .max(1.0) as u64
}

/// The recipe keys two runs must agree on to resume one from the other; returns those that
/// differ (dotted paths), ignoring `allowed`.
pub fn differing_keys(
    a: &serde_json::Value,
    b: &serde_json::Value,
    allowed: &[&str],
) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &path,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", a, b, &mut out);
    out.retain(|k| {
        !allowed
            .iter()
            .any(|p| k == p || k.starts_with(&format!("{p}.")))
    });
    out
}
