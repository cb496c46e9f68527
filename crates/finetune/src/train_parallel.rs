//! `finetune train` over several ranks: `train.gpus` worker threads in this process (one per
//! GPU on a CUDA build, NCCL between them; on a CPU build the same number of ranks as threads
//! with the in-process collectives, which runs every layout on any machine), times the
//! processes a launcher started (torchrun-style `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/
//! `MASTER_PORT` or Slurm's `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`, CUDA builds only).
//! The layout is `train.tp` × `train.ep` (finetune-train's `parallel::layout`); each rank loads
//! only its shard of the base weights (its experts, heads and vocabulary rows:
//! `parallel::load_rank_model`), on its GPU or, on the CPU, into its own memory; rank 0 reports
//! progress and writes metrics, checkpoints and the final adapter.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use finetune_data::Sequence;
use finetune_model::peft::{self, AdapterMeta};
use finetune_model::{Lora, Qwen3Moe, Qwen3MoeConfig};
use finetune_train::parallel::launch::{self, LaunchEnv};
use finetune_train::parallel::{Layout, RankContext};
use finetune_train::{checkpoint, RunOutput, StepMetrics, TrainOptions, TrainSummary, Trainer};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Where this process's ranks sit.
pub struct World {
    pub layout: Layout,
    /// Ranks in this process (threads) and the global rank of the first.
    pub local: usize,
    pub first_rank: usize,
    pub launch: Option<LaunchEnv>,
}

/// The run's world from `train.gpus`, `train.tp`, `train.ep` and the launch environment;
/// `None` for a single-rank run.
pub fn world(
    gpus: u32,
    tp: u32,
    ep: u32,
    config: &finetune_model::Qwen3MoeConfig,
) -> Result<Option<World>> {
    let launch = launch::from_env(|k| std::env::var(k).ok())?;
    let local = gpus.max(1) as usize;
    let processes = launch.as_ref().map_or(1, |l| l.processes);
    let n = processes * local;
    if n == 1 {
        return Ok(None);
    }
    if processes > 1 && !finetune_kernels::BUILT_WITH_CUDA {
        bail!(
            "{processes} processes (WORLD_SIZE / SLURM_NTASKS): multi-process training needs NCCL, \
             a `--features cuda` build; a CPU build runs --gpus N ranks as threads of one process"
        );
    }
    let tp = tp.max(1) as usize;
    let ep = if ep == 0 { n } else { ep as usize };
    let layout = Layout::new(n, tp, ep, config).with_context(|| {
        format!("flags --gpus {gpus} × {processes} process(es), --tp {tp}, --ep {ep} [train.gpus, train.tp, train.ep]")
    })?;
    Ok(Some(World {
        layout,
        local,
        first_rank: launch.as_ref().map_or(0, |l| l.process) * local,
        launch,
    }))
}

/// The device of local rank `i`: GPU (local process index × ranks per process + i) on a CUDA
/// build with GPUs, else the CPU.
fn device_of(world: &World, i: usize) -> Result<Device> {
    if finetune_kernels::BUILT_WITH_CUDA
        && finetune_kernels::device::cuda_devices().is_ok_and(|g| !g.is_empty())
    {
        let ordinal = world.launch.as_ref().map_or(0, |l| l.local) * world.local + i;
        return Device::new_cuda(ordinal).with_context(|| format!("opening cuda:{ordinal}"));
    }
    Ok(Device::Cpu)
}

/// Everything a rank needs, shared by the threads.
pub struct ParallelRun<'a> {
    pub world: World,
    /// The base model's directory: each rank reads its shard from it.
    pub base: &'a Path,
    pub config: Qwen3MoeConfig,
    /// The whole adapter, on the CPU.
    pub lora: &'a Lora,
    pub train: Vec<Sequence>,
    pub heldout: Vec<Sequence>,
    pub options: TrainOptions,
    pub out: RunOutput,
    pub adapter_meta: AdapterMeta,
    pub run_dir: &'a Path,
    pub resume: Option<PathBuf>,
    pub targets: Vec<(String, usize, usize)>,
}

/// Trains on every rank of this process; returns rank 0's summary (on the process that holds
/// rank 0; the others return their first rank's).
pub fn run(
    p: ParallelRun<'_>,
    stop: &AtomicBool,
    report: &(dyn Fn(&StepMetrics) + Sync),
    start: &(dyn Fn(u64) + Sync),
) -> Result<TrainSummary> {
    let w = &p.world;
    let devices: Vec<Device> = (0..w.local)
        .map(|i| device_of(w, i))
        .collect::<Result<_>>()?;
    let on_gpu = devices.iter().any(|d| d.is_cuda());
    if !on_gpu {
        eprintln!(
            "train: {} ranks as threads of this process on the CPU (tp {}, ep {}: the in-process \
             collectives; for testing layouts, not for speed)",
            w.layout.world, w.layout.tp, w.layout.ep
        );
    }
    let n_experts = p.config.num_experts;
    let layout = w.layout;
    // Communicators: in-process CPU groups, or NCCL ids made by process 0.
    let mut cpu = if on_gpu {
        Vec::new()
    } else {
        finetune_train::parallel::CpuComms::for_layout(&layout, Duration::from_secs(1800))
            .into_iter()
            .map(Some)
            .collect()
    };
    let nccl_ids: Vec<u8> = if on_gpu { nccl_ids(w)? } else { Vec::new() };
    let results: Vec<Result<TrainSummary>> = std::thread::scope(|s| {
        let mut joins = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let rank = w.first_rank + i;
            let device = device.clone();
            let cpu_comms = cpu.get_mut(rank).and_then(Option::take);
            let ids = &nccl_ids;
            let p = &p;
            let job = move || -> Result<TrainSummary> {
                let comms = match cpu_comms {
                    Some(c) => c.into_comms(),
                    None => nccl_join(&layout, rank, &device, ids)?,
                };
                // Each rank its own copy of the whole adapter (its Vars are updated in place).
                let mut full = Lora::from_tensors(
                    p.lora.r,
                    p.lora.scale,
                    p.lora
                        .tensors()
                        .map(|(n, a, b)| {
                            Ok((
                                n.to_string(),
                                a.to_device(&device)?.copy()?,
                                b.to_device(&device)?.copy()?,
                            ))
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?,
                )?;
                // Dropout as the single-device run draws it (counter-based masks).
                full.copy_dropout(p.lora);
                let ctx = RankContext::new(layout, rank, comms, &full, n_experts)?;
                // This rank's shard of the base weights only, read from the files.
                let model: Qwen3Moe = match finetune_train::parallel::load_rank_model(
                    p.base, &p.config, &ctx, &device,
                ) {
                    Ok(m) => m,
                    Err(e) => {
                        if on_gpu {
                            // NCCL calls cannot be interrupted (as below).
                            eprintln!("finetune: error: rank {rank}: {e:#}");
                            std::process::exit(1);
                        }
                        ctx.abort(&format!("rank {rank}: {e:#}"));
                        return Err(e.into());
                    }
                };
                if i == 0 {
                    let s = model.shard();
                    let bytes: usize = model
                        .base_tensors()
                        .iter()
                        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                        .sum();
                    eprintln!(
                        "train: rank {rank} loaded experts {:?} of {}, heads {:?} of {}, \
                         vocabulary rows {:?} of {}: {:.1} MiB of base weights",
                        s.experts,
                        p.config.num_experts,
                        s.heads,
                        p.config.num_attention_heads,
                        s.vocab,
                        p.config.vocab_size,
                        bytes as f64 / (1u64 << 20) as f64
                    );
                }
                let mut trainer = Trainer::new_parallel(
                    &model,
                    &full,
                    p.train.clone(),
                    p.heldout.clone(),
                    p.options.clone(),
                    ctx,
                )?;
                let result = (|| -> Result<TrainSummary> {
                    if let Some(dir) = &p.resume {
                        trainer.resume(checkpoint::load(dir, &p.targets)?)?;
                    }
                    if rank == 0 {
                        start(trainer.step());
                    }
                    let summary = trainer.run(Some(&p.out), stop, &mut |m| {
                        if rank == 0 {
                            report(m)
                        }
                    })?;
                    if let Some(whole) = trainer.whole_lora()? {
                        peft::write_adapter(&whole, &p.adapter_meta, &p.run_dir.join("adapter"))?;
                    }
                    Ok(summary)
                })();
                if let Err(e) = &result {
                    if on_gpu {
                        // NCCL calls cannot be interrupted: the other ranks would wait forever
                        // for this one, so a failed rank ends the process.
                        eprintln!("finetune: error: rank {rank}: {e:#}");
                        std::process::exit(1);
                    }
                    if let Some(ctx) = trainer.rank_context() {
                        ctx.abort(&format!("rank {rank}: {e:#}"));
                    }
                }
                result
            };
            joins.push(
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .stack_size(1 << 30)
                    .spawn_scoped(s, job)
                    .expect("spawning a rank thread"),
            );
        }
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    // The first failure is the cause; the others are usually "another rank failed".
    let mut first = None;
    for r in results {
        match r {
            Ok(s) => {
                first.get_or_insert(Ok(s));
            }
            Err(e) => {
                if !matches!(first, Some(Err(_))) {
                    first = Some(Err(e));
                }
            }
        }
    }
    first.unwrap_or_else(|| bail!("no rank ran"))
}

#[cfg(feature = "cuda")]
fn nccl_ids(w: &World) -> Result<Vec<u8>> {
    use finetune_train::parallel::nccl_setup;
    let mine = if w.first_rank == 0 {
        Some(nccl_setup::ids(
            &w.layout,
            finetune_train::parallel::nccl_side_stream_enabled(),
        )?)
    } else {
        None
    };
    match &w.launch {
        Some(env) if env.processes > 1 => {
            Ok(launch::share_blob(env, mine, Duration::from_secs(600))?)
        }
        _ => mine.context("process 0 makes the NCCL ids"),
    }
}

#[cfg(not(feature = "cuda"))]
fn nccl_ids(_: &World) -> Result<Vec<u8>> {
    bail!("this build has no NCCL (rebuild with --features cuda)")
}

#[cfg(feature = "cuda")]
fn nccl_join(
    layout: &Layout,
    rank: usize,
    device: &Device,
    ids: &[u8],
) -> Result<finetune_train::parallel::Comms> {
    Ok(finetune_train::parallel::nccl_setup::join(
        layout, rank, device, ids,
    )?)
}

#[cfg(not(feature = "cuda"))]
fn nccl_join(
    _: &Layout,
    _: usize,
    _: &Device,
    _: &[u8],
) -> Result<finetune_train::parallel::Comms> {
    bail!("this build has no NCCL (rebuild with --features cuda)")
}
