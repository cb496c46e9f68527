//! The train stage (`finetune train`, and step 3 of `finetune run`): mined pairs → tokenizer,
//! packed sequences → LoRA training with metrics, checkpoints and resume → `adapter/`.
//!
//! Run directory layout written here:
//! - `base/` (embedded `tiny` and `tiny-random` only): the base model as a Hugging Face
//!   checkpoint (config.json, model.safetensors, tokenizer.json), so other tools can load
//!   base + adapter: `tiny` is the embedded pretrained base ([`crate::tiny_base`]) with its
//!   own tokenizer; `tiny-random` random weights with a BPE trained on the run's pairs;
//! - `metrics.jsonl`, `checkpoints/step-NNNNNN/`, `adapter/` (the final PEFT adapter),
//!   `train.json` (data statistics and the run's summary).

use crate::cli::TrainArgs;
use crate::recipe::{ComputeDtype, Overlong, ResolvedRecipe, Schedule};
use crate::run_dir::write_atomic;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use finetune_data::{
    encode_pairs, load_tokenizer, pack, read_pairs, train_byte_level_bpe, EncodeStats, OverLength,
    PairText, Template,
};
use finetune_model::peft::{self, AdapterMeta};
use finetune_model::{lora_scale, Lora, Preset, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::{
    checkpoint, differing_keys, on_large_stack, steps_for_epochs, AdamWConfig, LrSchedule,
    RunOutput, StepMetrics, TrainOptions, TrainSummary, Trainer,
};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Seed of the `tiny-random` base's weights: fixed, so every run shares one base.
const TINY_BASE_SEED: u64 = 0;

/// Steps in a row with a non-finite loss or gradient norm before a run gives up.
const MAX_BAD_STEPS: u64 = 5;

/// Recipe keys that may change between a run and its resume (they do not change the
/// trajectory).
const RESUMABLE_CHANGES: &[&str] = &[
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "data.dir",
    // Checkpoints hold whole adapters: a run resumes on any number of GPUs and any layout.
    "train.gpus",
    "train.tp",
    "train.ep",
];

/// What the train stage did, for the caller's summary.
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub adapter: PathBuf,
    pub train_stats: EncodeStats,
    pub sequences: usize,
    pub summary: TrainSummary,
}

/// The base model of a run: its directory (config.json, weights, tokenizer.json).
fn prepare_base(
    resolved: &ResolvedRecipe,
    run_dir: &Path,
    train_pairs: &[PairText],
) -> Result<PathBuf> {
    match resolved.model_preset() {
        Some(Preset::Tiny) if resolved.recipe.model.base != crate::tiny_base::TINY_RANDOM => {
            // The embedded pretrained base, with its own fixed tokenizer.
            let dir = run_dir.join("base");
            if !dir.join("model.safetensors").is_file() || !dir.join("tokenizer.json").is_file() {
                crate::tiny_base::write_into(&dir)
                    .with_context(|| format!("writing the tiny base into {}", dir.display()))?;
            }
            Ok(dir)
        }
        Some(Preset::Tiny) => {
            let dir = run_dir.join("base");
            let config = Preset::Tiny.config();
            if !dir.join("model.safetensors").is_file() {
                finetune_model::init::write_random_checkpoint(&config, TINY_BASE_SEED, &dir)
                    .with_context(|| format!("writing the tiny base into {}", dir.display()))?;
            }
            let tokenizer = dir.join("tokenizer.json");
            if !tokenizer.is_file() {
                eprintln!(
                    "train: training a {}-token byte-level BPE on {} pairs",
                    config.vocab_size,
                    train_pairs.len()
                );
                let texts = train_pairs
                    .iter()
                    .map(|p| format!("{}\n\n{}\n\n{}", p.instruction, p.context, p.target));
                train_byte_level_bpe(texts, config.vocab_size, &tokenizer)?;
            }
            Ok(dir)
        }
        Some(other) => bail!(
            "model.base: the `{other}` preset has random weights and exists for `finetune plan` \
             and benchmarks; train on a downloaded checkpoint with --model DIR"
        ),
        None => Ok(PathBuf::from(&resolved.recipe.model.base)),
    }
}

/// The device training runs on: the first GPU when this build has CUDA and one is there.
fn device() -> Device {
    if finetune_kernels::BUILT_WITH_CUDA {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
        eprintln!("train: no usable CUDA device, training on the CPU");
    }
    Device::Cpu
}

/// The settings a checkpoint records and a resume must match.
fn fingerprint(resolved: &ResolvedRecipe, data: &Path) -> Result<serde_json::Value> {
    let r = &resolved.recipe;
    Ok(serde_json::json!({
        "model": serde_json::to_value(&r.model)?,
        "lora": serde_json::to_value(&r.lora)?,
        "train": serde_json::to_value(&r.train)?,
        "data": {
            "dir": data.display().to_string(),
            "train.jsonl": checkpoint::checksum(&data.join("train.jsonl"))?,
        },
    }))
}

fn options(resolved: &ResolvedRecipe, sequences: usize) -> Result<TrainOptions> {
    let t = &resolved.recipe.train;
    let per_step = (t.micro_batch * t.grad_accum) as usize;
    let total_steps = if t.max_steps > 0 {
        t.max_steps
    } else {
        steps_for_epochs(sequences, per_step, t.epochs)
    };
    Ok(TrainOptions {
        lr: t.lr,
        schedule: match t.schedule {
            Schedule::Cosine => LrSchedule::Cosine,
            Schedule::Linear => LrSchedule::Linear,
            Schedule::Constant => LrSchedule::Constant,
        },
        warmup: t.warmup,
        total_steps,
        micro_batch: t.micro_batch as usize,
        grad_accum: t.grad_accum as usize,
        seed: t.seed,
        recompute: t.recompute,
        adamw: AdamWConfig {
            weight_decay: t.weight_decay,
            ..AdamWConfig::default()
        },
        max_grad_norm: t.max_grad_norm,
        eval_every: t.eval_every,
        eval_sequences: 0,
        save_every: t.save_every,
        keep_checkpoints: t.keep_checkpoints.max(1) as usize,
        max_bad_steps: MAX_BAD_STEPS,
    })
}

/// Progress: a bar on a terminal, a plain line every few steps otherwise.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    every: u64,
}

impl Progress {
    pub(crate) fn new(total: u64, start: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "train {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
                )
                .expect("a valid progress template"),
            );
            bar.set_position(start);
            bar
        });
        Self {
            bar,
            quiet,
            every: (total / 50).max(1),
        }
    }

    pub(crate) fn step(&self, m: &StepMetrics) {
        let held = m
            .heldout_loss
            .map(|h| format!("  held-out {h:.4}"))
            .unwrap_or_default();
        let skipped = if m.skipped {
            "  (skipped: not finite)"
        } else {
            ""
        };
        let line = format!(
            "loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{held}{skipped}",
            m.loss, m.lr, m.grad_norm, m.tokens_per_sec
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(line);
                if m.heldout_loss.is_some() {
                    bar.println(format!(
                        "step {}/{}: {}",
                        m.step,
                        m.total_steps,
                        bar.message()
                    ));
                }
            }
            None if !self.quiet
                && (m.step % self.every == 0
                    || m.step == m.total_steps
                    || m.heldout_loss.is_some()) =>
            {
                eprintln!("train: step {}/{}  {line}", m.step, m.total_steps);
            }
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Raised by SIGINT/SIGTERM; a second signal exits at once.
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(signal, stop.clone())
            .context("installing the signal handler")?;
    }
    Ok(stop)
}

/// The train stage on the pairs in `data`, writing into `run_dir`.
pub fn train_into(
    resolved: &ResolvedRecipe,
    data: &Path,
    run_dir: &Path,
    resume: Option<&Path>,
    init_adapter: Option<&Path>,
    quiet: bool,
) -> Result<TrainReport> {
    let r = &resolved.recipe;
    let t = &r.train;
    if t.dtype == ComputeDtype::Bf16 && !finetune_kernels::BUILT_WITH_CUDA && !quiet {
        eprintln!(
            "train: --dtype bf16 on the CPU: computed in bf16 as on a GPU (bf16 products widened \
             to f32 and rounded), slower than f32; for comparisons with GPU runs"
        );
    }
    // The data.
    let train_path = data.join("train.jsonl");
    let heldout_path = data.join("heldout.jsonl");
    if !train_path.is_file() {
        bail!(
            "{}: no such file: expected a mined dataset (run `finetune mine --out {}` first)",
            train_path.display(),
            data.display()
        );
    }
    let train_pairs = read_pairs(&train_path)?;
    let heldout_pairs = if heldout_path.is_file() {
        read_pairs(&heldout_path)?
    } else {
        Vec::new()
    };
    if train_pairs.is_empty() {
        bail!("{}: no training pairs: mining kept nothing (see {}/manifest.json for what was skipped and why)", train_path.display(), data.display());
    }

    // Resume: the checkpoint, and the recipe it was made with.
    let resume_dir = match resume {
        Some(p) if p.join("trainer_state.json").is_file() => Some(p.to_path_buf()),
        Some(p) => Some(checkpoint::latest(&p.join("checkpoints")).with_context(|| {
            format!("--resume {}: neither a checkpoint (trainer_state.json) nor a run directory with checkpoints/", p.display())
        })?),
        None => None,
    };
    let fingerprint = fingerprint(resolved, data)?;
    if let Some(dir) = &resume_dir {
        let state = checkpoint::read_state(dir)?;
        let differ = differing_keys(&state.recipe, &fingerprint, RESUMABLE_CHANGES);
        if !differ.is_empty() {
            bail!(
                "--resume {}: the checkpoint was made with other settings; these keys differ: {} \
                 (resume with the recipe and data of the original run, or start a new run)",
                dir.display(),
                differ.join(", ")
            );
        }
    }

    // The base model and tokenizer.
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let base = prepare_base(resolved, run_dir, &train_pairs)?;
    let config = Qwen3MoeConfig::from_file(&base.join("config.json"))?;
    let tokenizer_path = base.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        bail!(
            "{}: no tokenizer.json in the model directory",
            base.display()
        );
    }
    let tokenizer = load_tokenizer(&tokenizer_path, config.vocab_size)?;
    let template = Template::for_tokenizer(&tokenizer);
    let seq_len = t.seq_len as usize;
    let policy = match t.overlong {
        Overlong::Truncate => OverLength::Truncate,
        Overlong::TruncateTarget => OverLength::TruncateTarget,
        Overlong::Drop => OverLength::Drop,
    };
    let (train_examples, train_stats) =
        encode_pairs(&train_pairs, &tokenizer, template, seq_len, policy)?;
    let (heldout_examples, heldout_stats) =
        encode_pairs(&heldout_pairs, &tokenizer, template, seq_len, policy)?;
    if !quiet {
        eprintln!(
            "train: {} pairs → {} kept ({} truncated, {} dropped as longer than {seq_len} tokens), {} tokens of which {} targets; held-out {} kept of {}",
            train_stats.pairs, train_stats.kept, train_stats.truncated, train_stats.dropped_too_long,
            train_stats.tokens, train_stats.target_tokens, heldout_stats.kept, heldout_stats.pairs
        );
    }
    if train_examples.is_empty() {
        bail!(
            "{}: all {} pairs are longer than train.seq_len = {seq_len} tokens even after truncation (raise --seq-len or mine with a smaller --max-pair-tokens)",
            train_path.display(),
            train_stats.pairs
        );
    }
    let train_seqs = pack(&train_examples, seq_len);
    let heldout_seqs = pack(&heldout_examples, seq_len);

    // Model and adapter. Several ranks (--gpus, a launcher): nothing of the base is loaded
    // here, each rank loads its own shard (train_parallel); the adapter is made on the CPU.
    let world = crate::train_parallel::world(t.gpus, t.tp, t.ep, &config)?;
    let device = if world.is_some() {
        Device::Cpu
    } else {
        device()
    };
    // train.dtype: auto = bf16 on a GPU, f32 on the CPU; several ranks choose per rank device
    // (train_parallel), the same way.
    let compute = compute_dtype(t.dtype, &device);
    let model = if world.is_some() {
        None
    } else {
        let weights = Weights::open(&base, &device)?;
        let mut model = Qwen3Moe::load(config.clone(), &weights, &device)?;
        model
            .set_compute_dtype(compute)
            .context("flag --dtype / train.dtype")?;
        Some(model)
    };
    let targets = match &model {
        Some(m) => m.lora_targets(),
        None => Qwen3Moe::targets_of(&config),
    };
    let rank = r.lora.r as usize;
    let scale = lora_scale(rank, r.lora.lora_alpha, r.lora.use_rslora);
    let mut lora = match init_adapter {
        Some(dir) => {
            let (lora, meta) = peft::read_adapter(dir, &targets)
                .with_context(|| format!("--init-adapter {}", dir.display()))?;
            if meta.r != rank {
                bail!("--init-adapter {}: its rank is {}, this run's lora.r is {rank} (pass --rank {})", dir.display(), meta.r, meta.r);
            }
            Lora::from_tensors(
                rank,
                scale,
                lora.tensors()
                    .map(|(n, a, b)| (n.to_string(), a.clone(), b.clone())),
            )?
        }
        None => Lora::init(
            &targets,
            &r.lora.target_modules,
            rank,
            scale,
            t.seed,
            &device,
        )?,
    };
    lora.set_dropout(r.lora.lora_dropout, t.seed ^ 0xD40_0001);
    let adapter_meta = AdapterMeta {
        base_model_name_or_path: base
            .canonicalize()
            .unwrap_or(base.clone())
            .display()
            .to_string(),
        r: rank,
        lora_alpha: r.lora.lora_alpha,
        lora_dropout: r.lora.lora_dropout,
        use_rslora: r.lora.use_rslora,
        target_modules: r.lora.target_modules.clone(),
    };
    let options = options(resolved, train_seqs.len())?;
    let total = options.total_steps;
    let out = RunOutput {
        dir: run_dir.to_path_buf(),
        adapter_meta: adapter_meta.clone(),
        recipe: fingerprint,
    };

    let stop = stop_flag()?;
    let sequences = train_seqs.len();
    if let Some(world) = world {
        // Processes other than the first train but write nothing (rank 0 writes the run).
        let writes = world.first_rank == 0;
        let progress = std::sync::Mutex::new(None::<Progress>);
        let summary = crate::train_parallel::run(
            crate::train_parallel::ParallelRun {
                world,
                base: &base,
                config,
                lora: &lora,
                train: train_seqs,
                heldout: heldout_seqs,
                options,
                out,
                adapter_meta: adapter_meta.clone(),
                run_dir,
                resume: resume_dir.clone(),
                targets: targets.clone(),
                dtype: t.dtype,
            },
            &stop,
            &|m| {
                if let Some(p) = progress.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    p.step(m)
                }
            },
            &|step| {
                *progress.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Progress::new(total, step, quiet));
            },
        )?;
        if let Some(p) = progress.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            p.finish();
        }
        return finish(
            writes,
            data,
            run_dir,
            train_stats,
            heldout_stats,
            sequences,
            seq_len,
            total,
            summary,
        );
    }
    let summary = on_large_stack(|| -> Result<TrainSummary> {
        let model = model.context("the single-device run loads the model")?;
        let mut trainer = Trainer::new(&model, lora, train_seqs, heldout_seqs, options)?;
        if let Some(dir) = &resume_dir {
            trainer.resume(checkpoint::load(dir, &targets)?)?;
            if !quiet {
                eprintln!(
                    "train: resuming from {} (step {}/{total})",
                    dir.display(),
                    trainer.step()
                );
            }
        }
        let progress = Progress::new(total, trainer.step(), quiet);
        let result = trainer.run(Some(&out), &stop, &mut |m| progress.step(m));
        progress.finish();
        let summary = result?;
        // The final adapter, also when stopped early (it is the last checkpoint's).
        peft::write_adapter(trainer.lora(), &adapter_meta, &run_dir.join("adapter"))?;
        Ok(summary)
    })?;
    finish(
        true,
        data,
        run_dir,
        train_stats,
        heldout_stats,
        sequences,
        seq_len,
        total,
        summary,
    )
}

/// `train.json` (where `writes`), and the report.
#[allow(clippy::too_many_arguments)]
fn finish(
    writes: bool,
    data: &Path,
    run_dir: &Path,
    train_stats: EncodeStats,
    heldout_stats: EncodeStats,
    sequences: usize,
    seq_len: usize,
    total: u64,
    summary: TrainSummary,
) -> Result<TrainReport> {
    let report = serde_json::json!({
        "data": {"dir": data.display().to_string(), "train": train_stats, "heldout": heldout_stats,
                 "train_sequences": sequences, "seq_len": seq_len},
        "steps": summary.steps,
        "total_steps": total,
        "stopped_early": summary.stopped_early,
        "first_loss": summary.first_loss,
        "last_loss": summary.last_loss,
        "heldout_loss_before": summary.heldout_before,
        "heldout_loss_after": summary.heldout_after,
        "skipped_steps": summary.skipped_steps,
        "tokens_seen": summary.tokens_seen,
        "elapsed_secs": summary.elapsed_secs,
        "last_checkpoint": summary.last_checkpoint.as_ref().map(|p| p.display().to_string()),
    });
    if writes {
        write_atomic(
            &run_dir.join("train.json"),
            (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
        )?;
    }
    Ok(TrainReport {
        run_dir: run_dir.to_path_buf(),
        adapter: run_dir.join("adapter"),
        train_stats,
        sequences,
        summary,
    })
}

/// Prints what training did (stdout: the result; stderr had the progress).
pub fn print_summary(report: &TrainReport) {
    let s = &report.summary;
    let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.4}"));
    println!(
        "train: {} steps{} on {} sequences ({} pairs, {} truncated, {} dropped); loss {} → {}; held-out loss {} → {}; {:.0} s",
        s.steps,
        if s.stopped_early { format!(" (interrupted; continue with `finetune train --resume {}`)", report.run_dir.display()) } else { String::new() },
        report.sequences,
        report.train_stats.kept,
        report.train_stats.truncated,
        report.train_stats.dropped_too_long,
        f(s.first_loss),
        f(s.last_loss),
        f(s.heldout_before),
        f(s.heldout_after),
        s.elapsed_secs
    );
    println!("train: adapter in {}", report.adapter.display());
}

/// `finetune train`.
pub fn command(args: &TrainArgs) -> Result<crate::Outcome> {
    let Some(resolved) = crate::resolve(&args.recipe)? else {
        return Ok(crate::Outcome::Done);
    };
    resolved.check_model_dir()?;
    // Where to write: --run-dir, the run a checkpoint belongs to, or a new run directory.
    let resume_run = args.resume.as_ref().map(|p| {
        if p.join("trainer_state.json").is_file() {
            p.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_else(|| p.clone())
        } else {
            p.clone()
        }
    });
    let run_dir = match (&args.run_dir, &resume_run) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => crate::new_run_dir(&resolved, None)?.path,
    };
    // The data: --data, or (resuming) the directory the run was trained on.
    let data = match (&args.data, &args.resume) {
        (Some(d), _) => d.clone(),
        (None, Some(_)) => {
            let train_json = run_dir.join("checkpoints");
            let state = checkpoint::latest(&train_json)
                .map(|c| checkpoint::read_state(&c))
                .transpose()?
                .with_context(|| format!("--resume: no checkpoint under {}", train_json.display()))?;
            PathBuf::from(state.recipe["data"]["dir"].as_str().unwrap_or_default())
        }
        (None, None) => bail!("flag --data: required: the mined dataset directory (the --out of `finetune mine`, or <run>/data)"),
    };
    let report = train_into(
        &resolved,
        &data,
        &run_dir,
        args.resume.as_deref(),
        args.init_adapter.as_deref(),
        args.quiet,
    )?;
    print_summary(&report);
    Ok(if report.summary.stopped_early {
        crate::Outcome::Interrupted
    } else {
        crate::Outcome::Done
    })
}

/// The compute dtype of a model on `device` for `train.dtype`: auto = bf16 on a GPU, f32 on the
/// CPU (single device, and each rank of a parallel run on its own device).
pub fn compute_dtype(choice: ComputeDtype, device: &Device) -> candle_core::DType {
    match choice {
        ComputeDtype::F32 => candle_core::DType::F32,
        ComputeDtype::Bf16 => candle_core::DType::BF16,
        ComputeDtype::Auto if device.is_cuda() => candle_core::DType::BF16,
        ComputeDtype::Auto => candle_core::DType::F32,
    }
}
