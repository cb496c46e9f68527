//! The `finetune` pipeline: command line, recipes, run directories, and the glue that calls
//! the library crates stage by stage (mine → train → eval → export).
//!
//! This is the only crate where `anyhow` is used; the libraries return typed errors.

pub mod bench;
pub mod bench_kernels;
pub mod cli;
pub mod eval;
pub mod export;
pub mod mine;
pub mod plan;
pub mod pretrain;
pub mod recipe;
pub mod registry;
pub mod run_dir;
pub mod schedule;
pub mod score;
pub mod tiny_base;
pub mod train;
pub mod train_parallel;

use anyhow::{Context, Result};
use cli::{Cli, Command, RecipeArgs};
use recipe::ResolvedRecipe;
use std::process::ExitCode;

/// How a command ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Stopped by SIGINT/SIGTERM after writing a checkpoint: exit code 130.
    Interrupted,
}

impl Outcome {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::Interrupted => ExitCode::from(130),
        }
    }
}

/// Runs one parsed command line.
pub fn execute(cli: Cli) -> Result<Outcome> {
    match cli.command {
        None => run(&cli.run.recipe, cli.run.incremental),
        Some(Command::Run(args)) => run(&args.recipe, args.incremental),
        Some(Command::Mine(args)) => mine::command(&args),
        Some(Command::Train(args)) => train::command(&args),
        Some(Command::Eval(args)) => eval::command(&args),
        Some(Command::Export(args)) => export::command(&args),
        Some(Command::Schedule(args)) => schedule::command(&args),
        Some(Command::Plan(args)) => {
            anyhow::ensure!(
                args.gpu_mem.is_finite() && args.gpu_mem > 0.0,
                "flag --gpu-mem: must be a number of GiB > 0, got {}",
                args.gpu_mem
            );
            plan::command(&args)
        }
        Some(Command::Doctor) => doctor(),
        Some(Command::Score(args)) => score::command(&args),
        Some(Command::Bench(cli::BenchCommand::Train(args))) => bench::train(&args),
        Some(Command::Bench(cli::BenchCommand::Kernels(args))) => bench_kernels::kernels(&args),
        Some(Command::Pretrain(args)) => pretrain::command(&args),
    }
}

/// Resolves the recipe and prints it if asked; `None` when it was printed.
pub(crate) fn resolve(args: &RecipeArgs) -> Result<Option<ResolvedRecipe>> {
    let resolved = args.resolve()?;
    if args.print_recipe {
        print!("{}", resolved.to_toml());
        return Ok(None);
    }
    Ok(Some(resolved))
}

/// The main job: mine → train → eval → export in a fresh run directory.
fn run(args: &RecipeArgs, incremental: bool) -> Result<Outcome> {
    let Some(resolved) = resolve(args)? else {
        return Ok(Outcome::Done);
    };
    // Check every input before anything is written.
    let head = resolved.check_repo()?;
    resolved.check_model_dir()?;
    if incremental {
        return run_incremental(&resolved, &head);
    }

    let dir = new_run_dir(&resolved, Some(&head))?;
    eprintln!(
        "finetune: run {} in {} (repo {} at {})",
        dir.id,
        dir.path.display(),
        head.path.display(),
        &head.commit[..12.min(head.commit.len())]
    );

    // 1. mine
    let data = dir.path.join("data");
    let outcome = mine::mine_into(&resolved, &data, false, false, 0)?;
    mine::print_summary(&outcome, &data);
    dir.stage_completed("mine")?;

    // 2. train
    let report = train::train_into(&resolved, &data, &dir.path, None, None, false)?;
    train::print_summary(&report);
    if report.summary.stopped_early {
        return Ok(Outcome::Interrupted);
    }
    dir.stage_completed("train")?;

    // 3. evaluate
    let inputs = eval::EvalInputs {
        base: match resolved.model_preset() {
            Some(_) => dir.path.join("base"),
            None => std::path::PathBuf::from(&resolved.recipe.model.base),
        },
        adapter: report.adapter.clone(),
        data: data.clone(),
        report_dir: dir.path.clone(),
    };
    let endpoint = None; // the main job evaluates with the built-in sampler
    let rep = eval::eval_into(&resolved, &inputs, endpoint, false)?;
    eval::print_report(&rep, &dir.path);
    dir.stage_completed("eval")?;

    // 4. export
    export::export_into(&resolved, &dir.path, &inputs.base, &report.adapter)?;
    dir.stage_completed("export")?;
    Ok(Outcome::Done)
}

/// `finetune run --incremental` (see [`registry`]): lock, mine new history into `<out>/data`,
/// warm-start from the current adapter on its base, evaluate, promote only if better.
fn run_incremental(resolved: &ResolvedRecipe, head: &finetune_mine::RepoHead) -> Result<Outcome> {
    let out = resolved.recipe.run.out.clone();
    let _lock = registry::Lock::acquire(&out)?;
    let mut reg = registry::Registry::load(&out)?;
    let shared = out.join("data");
    let incremental = shared.join("manifest.json").is_file();
    let outcome = mine::mine_into(resolved, &shared, incremental, false, 0)?;
    mine::print_summary(&outcome, &shared);
    if matches!(outcome, finetune_mine::MineOutcome::UpToDate(_)) && reg.current.is_some() {
        println!("finetune: no new commits since the last run; the current adapter stays");
        return Ok(Outcome::Done);
    }

    let dir = new_run_dir(resolved, Some(head))?;
    eprintln!(
        "finetune: incremental run {} in {}",
        dir.id,
        dir.path.display()
    );
    let data = dir.path.join("data");
    std::fs::create_dir_all(&data)?;
    for f in ["train.jsonl", "heldout.jsonl", "manifest.json"] {
        let from = shared.join(f);
        if from.is_file() {
            std::fs::copy(&from, data.join(f))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    dir.stage_completed("mine")?;

    // Warm start: the current adapter, on the very base (and tokenizer) it was trained on.
    let current = reg.current_adapter(&out);
    if let (Some(adapter), Some(_)) = (&current, resolved.model_preset()) {
        let base = adapter
            .parent()
            .map(|run| run.join("base"))
            .filter(|b| b.is_dir());
        if let Some(base) = base {
            copy_dir(&base, &dir.path.join("base"))?;
        }
    }
    let report = train::train_into(resolved, &data, &dir.path, None, current.as_deref(), false)?;
    train::print_summary(&report);
    if report.summary.stopped_early {
        return Ok(Outcome::Interrupted);
    }
    dir.stage_completed("train")?;

    let base = match resolved.model_preset() {
        Some(_) => dir.path.join("base"),
        None => std::path::PathBuf::from(&resolved.recipe.model.base),
    };
    let inputs = eval::EvalInputs {
        base: base.clone(),
        adapter: report.adapter.clone(),
        data: data.clone(),
        report_dir: dir.path.clone(),
    };
    let rep = eval::eval_into(resolved, &inputs, None, false)?;
    eval::print_report(&rep, &dir.path);
    dir.stage_completed("eval")?;

    // The gate: the new adapter against the current one, on the same held-out pairs.
    let mut adapters = vec![report.adapter.as_path()];
    adapters.extend(current.as_deref());
    let losses = eval::heldout_losses(
        &base,
        &adapters,
        &data,
        resolved.recipe.train.seq_len as usize,
        resolved.recipe.eval.max_examples as usize,
    )?;
    let (new_loss, current_loss) = (losses[0], losses.get(1).copied().flatten());
    let (promoted, reason) = registry::judge(new_loss, current_loss, current.is_some());
    let adapter_rel = report
        .adapter
        .strip_prefix(&out)
        .unwrap_or(&report.adapter)
        .display()
        .to_string();
    reg.record(
        &out,
        registry::Entry {
            run: dir.id.clone(),
            adapter: adapter_rel,
            heldout_loss: new_loss,
            current_loss,
            promoted,
            reason: reason.clone(),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    )?;
    if promoted {
        println!(
            "finetune: promoted {} ({reason}); {} now points to it",
            dir.id,
            out.join(registry::CURRENT_LINK).display()
        );
    } else {
        println!("finetune: not promoted: {reason}; the current adapter stays");
    }
    Ok(Outcome::Done)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Creates `<run.out>/runs/<id>/` with its manifest.json (recipe, tool, host, command, repo).
pub(crate) fn new_run_dir(
    resolved: &ResolvedRecipe,
    head: Option<&finetune_mine::RepoHead>,
) -> Result<run_dir::RunDir> {
    let started = chrono::Utc::now();
    let manifest = serde_json::json!({
        "format": 1,
        "id": null,
        "path": null,
        "stages_completed": [],
        "tool": {
            "name": "finetune",
            "version": env!("CARGO_PKG_VERSION"),
            "git": env!("FINETUNE_GIT_HASH"),
            "cuda": finetune_kernels::BUILT_WITH_CUDA,
        },
        "started_at": started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "host": {
            "name": gethostname::gethostname().to_string_lossy(),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        "command": std::env::args().collect::<Vec<_>>(),
        "repo": head.map(|head| serde_json::json!({
            "path": head.path.display().to_string(),
            "rev": head.rev,
            "commit": head.commit,
            "reference": head.reference,
        })),
        "recipe_file": resolved.file.as_ref().map(|p| p.display().to_string()),
        "flag_overrides": resolved.flag_overrides(),
        "recipe": serde_json::to_value(&resolved.recipe).context("recipe to JSON")?,
    });
    run_dir::RunDir::create(&resolved.recipe.run.out, started, manifest)
}

/// frozen_linear forward and dX on `dev` (f32 and bf16) against the CPU reference on a small
/// shape, one PASS/FAIL line each; returns the number of failures.
fn frozen_linear_checks(ordinal: usize, dev: &candle_core::Device) -> usize {
    use candle_core::DType;
    use finetune_kernels::{frozen_linear, KernelError};
    let mut failures = 0;
    for dtype in [DType::F32, DType::BF16] {
        let what = format!("cuda:{ordinal}: frozen_linear {dtype:?} forward+dX vs CPU");
        match frozen_linear::check_against_cpu(dev, dtype) {
            Ok(c) => println!(
                "{what}: max abs diff y {:.1e}, dX {:.1e} (tolerance {:.0e} relative to max |y| \
                 {:.1}, max |dX| {:.1}): PASS",
                c.forward_max_abs_diff,
                c.grad_max_abs_diff,
                c.rel_tolerance,
                c.forward_scale,
                c.grad_scale
            ),
            Err(KernelError::Mismatch {
                what: which,
                max_abs_err,
                tolerance,
                ..
            }) => {
                failures += 1;
                println!(
                    "{what}: {which} max abs diff {max_abs_err:.1e} over tolerance \
                     {tolerance:.1e}: FAIL"
                );
            }
            Err(e) => {
                failures += 1;
                println!("{what}: {e}: FAIL");
            }
        }
    }
    failures
}

/// Largest |difference| allowed between a parallel step on a GPU and the single-device CPU step
/// (f32 on both; the GPU sums in other orders).
const PARALLEL_GPU_TOLERANCE: f32 = 1e-4;

/// One training step of a tiny random model under parallel layouts (ranks as threads with the
/// in-process collectives, tensors on `dev`) against the single-device CPU step.
fn parallel_checks(label: &str, dev: &candle_core::Device, tolerance: f32) -> usize {
    match finetune_train::parallel::check::layouts_on(dev, tolerance) {
        Ok(lines) => report_lines(label, "parallel step", &lines, tolerance),
        Err(e) => {
            println!("{label}: parallel step: FAILED: {e}");
            1
        }
    }
}

fn report_lines(
    label: &str,
    what: &str,
    lines: &[finetune_train::parallel::check::CheckLine],
    tolerance: f32,
) -> usize {
    let mut failures = 0;
    for l in lines {
        if l.ok {
            println!(
                "{label}: {what}, {}: ok (max abs diff {:.1e} vs single-device CPU)",
                l.name, l.max_abs_diff
            );
        } else {
            failures += 1;
            println!(
                "{label}: {what}, {}: FAILED: max abs diff {:.1e} > {tolerance:.0e}",
                l.name, l.max_abs_diff
            );
        }
    }
    failures
}

/// NCCL over every GPU (one rank each: every collective against the CPU backend), and one
/// training step through the parallel engine over an NCCL world of one rank per GPU, with the
/// gradient all-reduce after the backward and overlapped on a second stream.
#[cfg(feature = "cuda")]
fn nccl_checks() -> usize {
    use candle_core::Device;
    use finetune_train::parallel::check;
    let devices: Vec<Device> = match finetune_kernels::device::cuda_devices() {
        Ok(g) => g
            .iter()
            .filter_map(|g| Device::new_cuda(g.ordinal).ok())
            .collect(),
        Err(_) => return 1,
    };
    let mut failures = 0;
    let label = format!("nccl ({} rank(s), one per GPU)", devices.len());
    match check::nccl_ops(&devices) {
        Ok(lines) => failures += report_lines(&label, "collective", &lines, 1e-6),
        Err(e) => {
            failures += 1;
            println!("{label}: FAILED: {e}");
        }
    }
    match check::nccl_step(&devices, PARALLEL_GPU_TOLERANCE) {
        Ok(l) => failures += report_lines(&label, "step", &l, PARALLEL_GPU_TOLERANCE),
        Err(e) => {
            failures += 1;
            println!("nccl: parallel step over NCCL: FAILED: {e}");
        }
    }
    failures
}

#[cfg(not(feature = "cuda"))]
fn nccl_checks() -> usize {
    0
}

/// `finetune doctor`: this build, the CPU, the GPUs, and a smoke check on each device.
fn doctor() -> Result<Outcome> {
    use candle_core::Device;
    use finetune_kernels::device;

    println!("finetune {}", cli::VERSION);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cpu: {} {}, {threads} threads",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let mut failures = 0;
    match device::matmul_smoke_check(&Device::Cpu) {
        Ok(err) => println!("cpu: f32 matmul check ok (max abs error {err:.1e})"),
        Err(e) => {
            failures += 1;
            println!("cpu: FAILED: {e}");
        }
    }
    failures += parallel_checks("cpu", &Device::Cpu, 1e-5);
    if !finetune_kernels::BUILT_WITH_CUDA {
        println!("cuda: not in this build (rebuild with --features cuda, see README)");
    } else {
        match device::cuda_devices() {
            Err(e) => {
                failures += 1;
                println!("cuda: FAILED: {e}");
            }
            Ok(gpus) if gpus.is_empty() => {
                failures += 1;
                println!("cuda: FAILED: the driver reports no GPU");
            }
            Ok(gpus) => {
                let (major, minor) = gpus[0].driver_version;
                println!("cuda: driver {major}.{minor}, {} GPU(s)", gpus.len());
                for gpu in gpus {
                    let (cc_major, cc_minor) = gpu.compute_capability;
                    println!(
                        "cuda:{}: {}, compute capability {cc_major}.{cc_minor}, {:.1} GiB",
                        gpu.ordinal,
                        gpu.name,
                        gpu.total_memory_bytes as f64 / (1u64 << 30) as f64
                    );
                    let dev = match Device::new_cuda(gpu.ordinal) {
                        Ok(d) => d,
                        Err(e) => {
                            failures += 1;
                            println!("cuda:{}: FAILED: {e}", gpu.ordinal);
                            continue;
                        }
                    };
                    match device::matmul_smoke_check(&dev) {
                        Ok(err) => println!(
                            "cuda:{}: f32 matmul check ok (max abs error {err:.1e})",
                            gpu.ordinal
                        ),
                        Err(e) => {
                            failures += 1;
                            println!("cuda:{}: FAILED: {e}", gpu.ordinal);
                        }
                    }
                    failures += frozen_linear_checks(gpu.ordinal, &dev);
                    if gpu.ordinal == 0 {
                        failures += parallel_checks("cuda:0", &dev, PARALLEL_GPU_TOLERANCE);
                    }
                }
                failures += nccl_checks();
            }
        }
    }
    anyhow::ensure!(failures == 0, "{failures} check(s) failed");
    Ok(Outcome::Done)
}
