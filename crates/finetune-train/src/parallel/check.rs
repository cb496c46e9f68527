//! Self-checks of the parallel machinery on a device, for `finetune doctor` (the GPU machine
//! has no cargo: what must be checked there runs from the release binary).
//!
//! - [`layouts_on`]: one training step's loss and LoRA gradients of a tiny random Qwen3-MoE
//!   (the `tiny` preset's shapes, 2 layers) under several layouts, ranks as threads with the
//!   in-process collectives and tensors on the device, each rank loading only its shard of the
//!   base weights: in f32 against the single-device CPU run (largest absolute difference), in
//!   bf16 (the GPU's compute dtype) against the single-device bf16 run on the same device
//!   (largest relative difference: bf16 rounds the ranks' partial sums in other places).
//! - [`nccl_ops`] (cuda): every NCCL collective over one rank per GPU, against the CPU backend
//!   on the same inputs; [`nccl_step`]: the same training step over an NCCL world of one rank
//!   per GPU, with the gradient all-reduce after the backward and overlapped on a side stream.

use super::{simulate, Layout};
use crate::{AdamWConfig, LrSchedule, TrainError, TrainOptions, Trainer};
use candle_core::{DType, Device, Tensor};
use finetune_data::Sequence;
use finetune_model::{Lora, Preset, Qwen3Moe, Weights};

/// One compared quantity.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub name: String,
    /// The largest difference: absolute, or relative when [`Self::relative`].
    pub max_abs_diff: f32,
    /// Whether `max_abs_diff` is relative (|Δloss|/|loss|, |Δnorm|/norm, ‖Δg‖/‖g‖ per gradient).
    pub relative: bool,
    pub ok: bool,
}

/// Largest relative difference ([`compare_relative`]: loss, norm, all LoRA gradients together)
/// allowed between a bf16 parallel step and the single-device bf16 step. bf16 keeps 8
/// significant bits, and ranks round in other places than the single device (a tp rank's o_proj
/// and expert partial sums are rounded before the all-reduce): on the CPU this check measured
/// 2.2e-3 (single rank, ep 2) and 2.3e-2 (tp 2 × ep 2), and on the tests' fixture the
/// single-device bf16 step is itself 5.8e-2 from the f32 one (tests/parallel.rs). A wrong
/// share of a gradient is off by O(1); the layouts' logic is checked exactly in f32.
pub const BF16_TOLERANCE: f32 = 5e-2;

/// A tiny random model (its checkpoint directory, removed on drop; loaded whole on `device` and
/// on the CPU), an adapter with A and B non-zero, and four packed sequences.
pub struct Fixture {
    pub dir: std::path::PathBuf,
    pub cpu: Qwen3Moe,
    pub dev: Qwen3Moe,
    pub lora: Lora,
    pub sequences: Vec<Sequence>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CPU f32 tensor of `shape` with values uniform in ±std·√3 (standard deviation `std`) from
/// a SplitMix64 stream seeded by `seed`: the same values on every run and machine.
fn seeded_uniform(shape: &candle_core::Shape, std: f64, seed: u64) -> candle_core::Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let half_width = std * 3f64.sqrt();
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            ((2.0 * unit - 1.0) * half_width) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

impl Fixture {
    pub fn new(device: &Device) -> Result<Self, TrainError> {
        let mut config = Preset::Tiny.config();
        config.num_hidden_layers = 2;
        config.mlp_only_layers = vec![1];
        let dir = std::env::temp_dir().join(format!(
            "finetune-parallel-check-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let io = |e: &dyn std::fmt::Display| TrainError::Io {
            path: dir.clone(),
            message: e.to_string(),
        };
        finetune_model::init::write_random_checkpoint(&config, 7, &dir).map_err(|e| io(&e))?;
        let load = |d: &Device| -> Result<Qwen3Moe, TrainError> {
            let w = Weights::open(&dir, d).map_err(|e| io(&e))?;
            Qwen3Moe::load(config.clone(), &w, d).map_err(|e| io(&e))
        };
        let (cpu, dev) = match (load(&Device::Cpu), load(device)) {
            (Ok(cpu), Ok(dev)) => (cpu, dev),
            (Err(e), _) | (_, Err(e)) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let modules: Vec<String> = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec();
        let init = Lora::init(&cpu.lora_targets(), &modules, 4, 2.0, 1, &Device::Cpu)?;
        // B ≠ 0 so that A gets a gradient too (PEFT's B = 0 would leave dA = 0). Seeded, not
        // candle's unseeded CPU randn: each run checks the same instance (with a fresh B per
        // run, the bf16 layouts' distance from the single-device step varied from 0.009 to
        // 0.069 between runs of the same code, the bf16 routing flipping on some instances).
        let lora = Lora::from_tensors(
            4,
            2.0,
            init.tensors()
                .enumerate()
                .map(|(i, (n, a, b))| {
                    Ok((
                        n.to_string(),
                        a.clone(),
                        seeded_uniform(b.shape(), 0.05, i as u64)?,
                    ))
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
        )?;
        let vocab = config.vocab_size as u32;
        let sequences = [(24usize, 0usize), (17, 8), (30, 12), (11, 0)]
            .iter()
            .enumerate()
            .map(|(k, &(len, second_doc))| {
                let ids: Vec<u32> = (0..len as u32)
                    .map(|i| (i * 7 + k as u32 * 13 + 1) % vocab)
                    .collect();
                let position_ids: Vec<u32> = (0..len)
                    .map(|i| {
                        if second_doc > 0 && i >= second_doc {
                            (i - second_doc) as u32
                        } else {
                            i as u32
                        }
                    })
                    .collect();
                let labels: Vec<i64> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| if i < 3 { -100 } else { t as i64 })
                    .collect();
                let doc_lens = if second_doc > 0 {
                    vec![second_doc, len - second_doc]
                } else {
                    vec![len]
                };
                Sequence {
                    ids,
                    position_ids,
                    labels,
                    doc_lens,
                }
            })
            .collect();
        Ok(Self {
            dir,
            cpu,
            dev,
            lora,
            sequences,
        })
    }

    pub fn options() -> TrainOptions {
        TrainOptions {
            lr: 1e-3,
            schedule: LrSchedule::Constant,
            warmup: 0,
            total_steps: 1,
            micro_batch: 4,
            grad_accum: 1,
            seed: 1,
            recompute: false,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            eval_every: 0,
            eval_sequences: 0,
            save_every: 1,
            keep_checkpoints: 1,
            max_bad_steps: 1,
        }
    }

    /// Loss, norm and gradients of one step on the CPU, single device.
    #[allow(clippy::type_complexity)]
    pub fn reference(&self) -> Result<(f64, f64, Vec<(String, Tensor)>), TrainError> {
        self.single_step(&self.cpu)
    }

    /// Loss, norm and gradients of one single-device step of `model` (one of this fixture's,
    /// on its device, in its compute dtype).
    #[allow(clippy::type_complexity)]
    pub fn single_step(
        &self,
        model: &Qwen3Moe,
    ) -> Result<(f64, f64, Vec<(String, Tensor)>), TrainError> {
        let t = Trainer::new(
            model,
            super::copy_lora(&self.lora, model.device())?,
            self.sequences.clone(),
            vec![],
            Self::options(),
        )?;
        crate::on_large_stack(|| t.step_gradients(&[0, 1, 2, 3]))
    }
}

type StepResult = (f64, f64, Vec<(String, Tensor)>);

/// Compares ranks' step results with the reference; gradients move to the CPU.
pub fn compare(
    name: &str,
    reference: &StepResult,
    ranks: &[StepResult],
    tolerance: f32,
) -> Result<CheckLine, TrainError> {
    let want: std::collections::HashMap<&str, &Tensor> =
        reference.2.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut worst = 0f32;
    let mut seen = std::collections::HashSet::new();
    for (loss, norm, grads) in ranks {
        worst = worst.max((loss - reference.0).abs() as f32);
        worst = worst.max(((norm - reference.1) / reference.1.max(1.0)).abs() as f32);
        for (n, g) in grads {
            let w = want.get(n.as_str()).ok_or_else(|| {
                TrainError::Options(format!("{name}: gradient {n} has no reference"))
            })?;
            let d = (g.to_device(&Device::Cpu)? - *w)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            worst = worst.max(d);
            seen.insert(n.clone());
        }
    }
    Ok(line(name, seen.len(), want.len(), worst, false, tolerance))
}

fn line(
    name: &str,
    seen: usize,
    want: usize,
    worst: f32,
    relative: bool,
    tolerance: f32,
) -> CheckLine {
    let complete = seen == want;
    CheckLine {
        name: if complete {
            name.to_string()
        } else {
            format!("{name} ({seen} of {want} gradients)")
        },
        max_abs_diff: worst,
        relative,
        ok: complete && worst <= tolerance && worst.is_finite(),
    }
}

/// [`compare`] by relative differences, for bf16 steps: the largest of |Δloss|/|loss|,
/// |Δnorm|/norm and ‖Δg‖/‖g‖ over all LoRA gradients together (every rank's, Frobenius). All
/// together rather than per tensor: bf16's own per-tensor error is large where a gradient
/// nearly cancels or a near-tied top-k routing choice flips (one expert's gradient moves a lot),
/// while a wrong share of a gradient moves the whole by far more than rounding.
pub fn compare_relative(
    name: &str,
    reference: &StepResult,
    ranks: &[StepResult],
    tolerance: f32,
) -> Result<CheckLine, TrainError> {
    let want: std::collections::HashMap<&str, &Tensor> =
        reference.2.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let rel = |a: f64, b: f64| ((a - b) / b.abs().max(1e-12)).abs() as f32;
    let mut worst = 0f32;
    let mut seen = std::collections::HashSet::new();
    let (mut diff, mut size) = (0f64, 0f64);
    for (loss, norm, grads) in ranks {
        worst = worst
            .max(rel(*loss, reference.0))
            .max(rel(*norm, reference.1));
        for (n, g) in grads {
            let w = want.get(n.as_str()).ok_or_else(|| {
                TrainError::Options(format!("{name}: gradient {n} has no reference"))
            })?;
            let (d, s) = sq_diff_and_size(g, w)?;
            diff += d;
            size += s;
            seen.insert(n.clone());
        }
    }
    let global = if diff == 0.0 {
        0.0
    } else {
        (diff.sqrt() / size.sqrt()) as f32
    };
    worst = worst.max(global);
    Ok(line(name, seen.len(), want.len(), worst, true, tolerance))
}

/// Σ(a − b)² and Σb², in f64 on the CPU (∞ when the shapes differ).
fn sq_diff_and_size(a: &Tensor, b: &Tensor) -> Result<(f64, f64), TrainError> {
    let host = |t: &Tensor| -> Result<Vec<f64>, TrainError> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?)
    };
    let (a, b) = (host(a)?, host(b)?);
    if a.len() != b.len() {
        return Ok((f64::INFINITY, 1.0));
    }
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    Ok((diff, b.iter().map(|y| y * y).sum()))
}

/// ‖a − b‖ / ‖b‖ (Frobenius), in f64 on the CPU; 0 when both are zero.
pub fn relative_norm_diff(a: &Tensor, b: &Tensor) -> Result<f32, TrainError> {
    let (diff, size) = sq_diff_and_size(a, b)?;
    Ok(if diff == 0.0 {
        0.0
    } else {
        (diff.sqrt() / size.sqrt()) as f32
    })
}

/// One step under ep 2, tp 2 × ep 2 and dp 2 (2 ranks as threads on `device`, in-process
/// collectives), the ranks computing in `dtype`: in f32 against the single-device CPU step
/// (largest absolute difference), in bf16 against the single-device bf16 step on `device`
/// ([`compare_relative`]).
pub fn layouts_on(
    device: &Device,
    dtype: DType,
    tolerance: f32,
) -> Result<Vec<CheckLine>, TrainError> {
    let mut fx = Fixture::new(device)?;
    let reference = if dtype == DType::F32 {
        fx.reference()?
    } else {
        fx.dev.set_compute_dtype(dtype)?;
        fx.single_step(&fx.dev)?
    };
    let mut out = Vec::new();
    for (world, tp, ep, name) in [
        (1, 1, 1, "single rank"),
        (2, 1, 2, "ep 2"),
        (2, 2, 2, "tp 2 × ep 2"),
        (2, 1, 1, "dp 2"),
    ] {
        let layout = Layout::new(world, tp, ep, &fx.dev.config)?;
        let ranks = simulate(
            layout,
            &fx.dir,
            &fx.dev.config,
            &fx.lora,
            &fx.sequences,
            &[],
            &Fixture::options(),
            device,
            dtype,
            |t| t.step_gradients(&[0, 1, 2, 3]),
        )?;
        out.push(if dtype == DType::F32 {
            compare(name, &reference, &ranks, tolerance)?
        } else {
            compare_relative(name, &reference, &ranks, tolerance)?
        });
    }
    Ok(out)
}

#[cfg(feature = "cuda")]
pub use cuda_checks::{nccl_ops, nccl_step};

#[cfg(feature = "cuda")]
mod cuda_checks {
    use super::super::collective::{Collective, CpuCollective};
    use super::super::nccl::{unique_id, NcclCollective};
    use super::super::{nccl_setup, Layout, RankContext};
    use super::{compare, compare_relative, CheckLine, Fixture};
    use crate::{TrainError, Trainer};
    use candle_core::{DType, Device, Tensor};
    use std::time::Duration;

    /// What one rank computes with `c` from rank-dependent inputs, as host vectors.
    fn exercise(
        c: &dyn Collective,
        dev: &Device,
    ) -> Result<Vec<(&'static str, Vec<f32>)>, TrainError> {
        let (r, n) = (c.rank(), c.size());
        let x = Tensor::arange(0f32, (4 * n * 3) as f32, dev)?
            .reshape((4 * n, 3))?
            .affine(1.0, r as f64 * 100.0)?;
        let flat = |t: Tensor| -> Result<Vec<f32>, TrainError> {
            Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
        };
        // Uneven splits: rank r sends (j + r) % 3 rows to rank j, the rest to itself.
        let mut counts: Vec<usize> = (0..n).map(|j| (j + r) % 3).collect();
        let used: usize = counts.iter().sum();
        counts[r] += 4 * n - used.min(4 * n);
        let (a2a, recv) = c.all_to_all(&x, &counts)?;
        c.barrier()?;
        // bf16 (the ranks' compute dtype on a GPU): small integers, whose sums over up to 8
        // ranks (< 256) are exact in bf16 whatever the order, so NCCL's must equal the CPU's.
        let xb = Tensor::from_vec(
            (0..4 * n * 3)
                .map(|i| (i % 16 + r) as f32)
                .collect::<Vec<_>>(),
            (4 * n, 3),
            dev,
        )?
        .to_dtype(DType::BF16)?;
        // A result that is not bf16 fails the comparison (NaN).
        let bf16 = |t: Tensor| -> Result<Vec<f32>, TrainError> {
            let ok = t.dtype() == DType::BF16;
            let v: Vec<f32> = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            Ok(if ok { v } else { vec![f32::NAN; v.len()] })
        };
        Ok(vec![
            ("all_reduce", flat(c.all_reduce_sum(&x)?)?),
            ("all_gather", flat(c.all_gather(&x)?)?),
            ("reduce_scatter", flat(c.reduce_scatter_sum(&x)?)?),
            ("all_to_all", flat(a2a)?),
            (
                "all_to_all counts",
                recv.iter().map(|&v| v as f32).collect(),
            ),
            ("broadcast", flat(c.broadcast(&x, n - 1)?)?),
            (
                "all_reduce_f64",
                c.all_reduce_f64(&[r as f64 + 0.5, 1.0])?
                    .into_iter()
                    .map(|v| v as f32)
                    .collect(),
            ),
            ("all_reduce bf16", bf16(c.all_reduce_sum(&xb)?)?),
            ("all_gather bf16", bf16(c.all_gather(&xb)?)?),
            ("all_to_all bf16", bf16(c.all_to_all(&xb, &counts)?.0)?),
            ("broadcast bf16", bf16(c.broadcast(&xb, n - 1)?)?),
        ])
    }

    /// Every collective over NCCL with one rank per device in `devices` (threads), against
    /// the CPU backend on the same inputs.
    pub fn nccl_ops(devices: &[Device]) -> Result<Vec<CheckLine>, TrainError> {
        let n = devices.len();
        let id = unique_id()?;
        let cpu = CpuCollective::group(n, Duration::from_secs(120));
        let results: Vec<Result<_, TrainError>> = std::thread::scope(|s| {
            let joins: Vec<_> = cpu
                .into_iter()
                .enumerate()
                .map(|(r, c)| {
                    let dev = devices[r].clone();
                    s.spawn(move || -> Result<_, TrainError> {
                        let nccl = NcclCollective::join(&dev, r, n, id)?;
                        let got = exercise(&nccl, &dev)?;
                        let want = exercise(&c, &Device::Cpu)?;
                        Ok((got, want))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut lines: Vec<CheckLine> = Vec::new();
        for r in results {
            let (got, want) = r?;
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                let d = if g.len() == w.len() {
                    g.iter()
                        .zip(w)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max)
                } else {
                    f32::INFINITY
                };
                match lines.iter_mut().find(|l| l.name == *name) {
                    Some(l) => {
                        l.max_abs_diff = l.max_abs_diff.max(d);
                        l.ok &= d <= 1e-6;
                    }
                    None => lines.push(CheckLine {
                        name: name.to_string(),
                        max_abs_diff: d,
                        relative: false,
                        ok: d <= 1e-6,
                    }),
                }
            }
        }
        Ok(lines)
    }

    /// One training step through the parallel engine over an NCCL world of one rank per
    /// device in `devices` (dp n: experts replicated, every bucket summed over all ranks),
    /// computing in `dtype`: in f32 against the single-device CPU step, in bf16 against the
    /// single-device bf16 step on the first device ([`compare_relative`]); twice: the gradient buckets all-reduced on the
    /// compute stream after the backward (no overlap, as `FINETUNE_OVERLAP_GRAD_REDUCE=0`), and
    /// on the side stream (`nccl::NcclSide`) as the backward finishes their layers, with
    /// 2,000-element buckets so that several are in flight at once. The second line fails if
    /// no bucket was launched before the backward ended.
    pub fn nccl_step(
        devices: &[Device],
        dtype: DType,
        tolerance: f32,
    ) -> Result<Vec<CheckLine>, TrainError> {
        let n = devices.len();
        let Some(first) = devices.first() else {
            return Err(TrainError::Options("nccl_step: no GPU".into()));
        };
        let mut fx = Fixture::new(first)?;
        let reference = if dtype == DType::F32 {
            fx.reference()?
        } else {
            fx.dev.set_compute_dtype(dtype)?;
            fx.single_step(&fx.dev)?
        };
        let layout = Layout::new(n, 1, 1, &fx.dev.config)?;
        let mut lines = Vec::new();
        for side in [false, true] {
            let ids = nccl_setup::ids(&layout, side)?;
            let results: Vec<Result<_, TrainError>> = std::thread::scope(|s| {
                let joins: Vec<_> = devices
                    .iter()
                    .enumerate()
                    .map(|(rank, device)| {
                        let (fx, ids) = (&fx, &ids);
                        std::thread::Builder::new()
                            .name(format!("nccl-rank-{rank}"))
                            .stack_size(1 << 30)
                            .spawn_scoped(s, move || -> Result<_, TrainError> {
                                let comms = nccl_setup::join(&layout, rank, device, ids)?;
                                let own = super::super::copy_lora(&fx.lora, device)?;
                                let config = &fx.dev.config;
                                let mut ctx = RankContext::new(
                                    layout,
                                    rank,
                                    comms,
                                    &own,
                                    config.num_experts,
                                )?;
                                ctx.overlap = side;
                                ctx.bucket_elements = 2_000;
                                let mut model =
                                    super::super::load_rank_model(&fx.dir, config, &ctx, device)?;
                                model.set_compute_dtype(dtype)?;
                                let t = Trainer::new_parallel(
                                    &model,
                                    &own,
                                    fx.sequences.clone(),
                                    vec![],
                                    Fixture::options(),
                                    ctx,
                                )?;
                                let step = t.step_gradients(&[0, 1, 2, 3])?;
                                let launched =
                                    t.rank_context().map_or((0, 0), |c| c.last_overlap());
                                Ok((step, launched))
                            })
                            .expect("spawning an NCCL rank thread")
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| j.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            });
            let mut steps = Vec::new();
            let mut launched = (usize::MAX, 0);
            for r in results {
                let (step, (early, all)) = r?;
                steps.push(step);
                launched = (launched.0.min(early), all);
            }
            let name = if side {
                format!(
                    "parallel step over NCCL (dp {n}, {dtype:?}), buckets on a side stream during \
                     the backward ({} of {} launched early, NCCL launch order {})",
                    launched.0,
                    launched.1,
                    if super::super::nccl::implicit_launch_order() {
                        "implicit"
                    } else {
                        "fenced"
                    }
                )
            } else {
                format!(
                    "parallel step over NCCL (dp {n}, {dtype:?}), buckets on the compute stream \
                     after the backward"
                )
            };
            let mut line = if dtype == DType::F32 {
                compare(&name, &reference, &steps, tolerance)?
            } else {
                compare_relative(&name, &reference, &steps, tolerance)?
            };
            if side && launched.0 == 0 {
                line.ok = false;
                line.name += ": no bucket overlapped the backward";
            }
            lines.push(line);
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doctor_layout_check_passes_on_the_cpu() {
        let lines = layouts_on(&Device::Cpu, DType::F32, 1e-5).unwrap();
        assert_eq!(lines.len(), 4);
        for l in &lines {
            assert!(l.ok && !l.relative, "{l:?}");
        }
    }

    /// The doctor's bf16 check on the CPU: ranks in bf16 against the single-device bf16 step,
    /// within [`BF16_TOLERANCE`].
    #[test]
    fn the_doctor_bf16_layout_check_passes_on_the_cpu() {
        let lines = layouts_on(&Device::Cpu, DType::BF16, BF16_TOLERANCE).unwrap();
        assert_eq!(lines.len(), 4);
        for l in &lines {
            eprintln!("{l:?}");
            assert!(l.ok && l.relative, "{l:?}");
        }
    }

    #[test]
    fn relative_norm_diff_against_its_definition() {
        let b = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let a = Tensor::new(&[3f32, 3.5], &Device::Cpu).unwrap();
        // ‖(0, 0.5)‖ / ‖(3, 4)‖ = 0.5 / 5.
        assert!((relative_norm_diff(&a, &b).unwrap() - 0.1).abs() < 1e-7);
        assert_eq!(relative_norm_diff(&b, &b).unwrap(), 0.0);
    }
}
