//! Parallel layouts against the single-device run, with the world as threads of this process
//! (the CPU collectives): every layout gives the single-device loss, gradient norm and LoRA
//! gradients (≤ 1e-5, f32), and a checkpoint written at one layout resumes at another.
//!
//! Model: the tiny fixture (3 layers, 4 heads over 2 key/value heads, 4 experts of which 2 are
//! active per token, layer 2 dense), the trainer fixture's 4 packed sequences, and the adapter
//! PyTorch trained (B ≠ 0, so every A and B gets a gradient).

use candle_core::{Device, Tensor};
use finetune_data::Sequence;
use finetune_model::peft::AdapterMeta;
use finetune_model::{Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::parallel::{CpuComms, Layout, RankContext};
use finetune_train::{checkpoint, AdamWConfig, LrSchedule, RunOutput, TrainOptions, Trainer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("trainer/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn model() -> Qwen3Moe {
    let dir = fixtures().join("tiny-qwen3-moe/bf16");
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir, &Device::Cpu).unwrap();
    Qwen3Moe::load(config, &weights, &Device::Cpu).unwrap()
}

fn sequences(r: &HashMap<String, Tensor>) -> Vec<Sequence> {
    (0..4)
        .map(|k| {
            let v = |n: &str| r[&format!("seq.{k}.{n}")].to_vec1::<i64>().unwrap();
            let pos: Vec<u32> = v("pos").iter().map(|&p| p as u32).collect();
            let mut doc_lens: Vec<usize> = Vec::new();
            for &p in &pos {
                if p == 0 {
                    doc_lens.push(0);
                }
                *doc_lens.last_mut().unwrap() += 1;
            }
            Sequence {
                ids: v("ids").iter().map(|&x| x as u32).collect(),
                position_ids: pos,
                labels: v("labels"),
                doc_lens,
            }
        })
        .collect()
}

/// The adapter PyTorch trained in the fixture: A and B both non-zero.
fn adapter(r: &HashMap<String, Tensor>, model: &Qwen3Moe) -> Lora {
    Lora::from_tensors(
        4,
        2.0,
        model.lora_targets().into_iter().map(|(name, _, _)| {
            let a = r[&format!("final.{name}.A")].clone();
            let b = r[&format!("final.{name}.B")].clone();
            (name, a, b)
        }),
    )
    .unwrap()
}

const EPS: f64 = 1e-3;

fn options(total_steps: u64) -> TrainOptions {
    TrainOptions {
        lr: 2e-2,
        schedule: LrSchedule::Cosine,
        warmup: 1,
        total_steps,
        micro_batch: 2,
        grad_accum: 2,
        seed: 42,
        recompute: false,
        // Adam moves an element whose gradient is rounding noise by about ±lr whatever its
        // size (m/√v ≈ ±1 when |g| ≫ ε): with ε = 1e-3 the update is about linear in such
        // gradients, so that summation-order differences (~1e-8) stay that small in the
        // adapter and a 1e-5 comparison of adapters after a resume means something.
        adamw: AdamWConfig {
            weight_decay: 0.01,
            eps: EPS,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        eval_every: 0,
        eval_sequences: 0,
        save_every: 2,
        keep_checkpoints: 3,
        max_bad_steps: 3,
    }
}

fn output(dir: &Path) -> RunOutput {
    RunOutput {
        dir: dir.to_path_buf(),
        adapter_meta: AdapterMeta {
            base_model_name_or_path: "tiny-fixture".into(),
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: vec!["q_proj".into()],
        },
        recipe: serde_json::json!({"lr": 2e-2}),
    }
}

/// Runs `f(trainer)` on every rank of `layout` (threads with large stacks) and returns the
/// results by rank.
fn on_world<T: Send>(
    layout: Layout,
    model: &Qwen3Moe,
    full: &Lora,
    train: &[Sequence],
    heldout: &[Sequence],
    opts: &TrainOptions,
    f: impl Fn(&mut Trainer) -> T + Sync,
) -> Vec<T> {
    let comms = CpuComms::for_layout(&layout, Duration::from_secs(120));
    let n_experts = model.config.num_experts;
    // Lora holds Vars (Arc'd tensors): each rank gets its own copy of the whole adapter.
    let fulls: Vec<Lora> = (0..layout.world)
        .map(|_| {
            Lora::from_tensors(
                full.r,
                full.scale,
                full.tensors()
                    .map(|(n, a, b)| (n.to_string(), a.copy().unwrap(), b.copy().unwrap())),
            )
            .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        let f = &f;
        let joins: Vec<_> = comms
            .into_iter()
            .zip(fulls)
            .enumerate()
            .map(|(rank, (c, full))| {
                std::thread::Builder::new()
                    .stack_size(256 << 20)
                    .spawn_scoped(s, move || {
                        let ctx = RankContext::new(layout, rank, c.into_comms(), &full, n_experts)
                            .unwrap();
                        let mut t = Trainer::new_parallel(
                            model,
                            &full,
                            train.to_vec(),
                            heldout.to_vec(),
                            opts.clone(),
                            ctx,
                        )
                        .unwrap();
                        f(&mut t)
                    })
                    .unwrap()
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The acceptance check: ep 2, ep 4, tp 2, dp 2, ep 2 × dp 2 (and tp 2 with ep 4, tp 2 × dp 2,
/// per-layer recompute, and a step of 3 sequences over 2 data ranks, which needs padding) give
/// the single-device loss, norm and every LoRA gradient within 1e-5.
#[test]
fn every_layout_gives_the_single_device_loss_and_gradients() {
    let r = reference();
    let model = model();
    let full = adapter(&r, &model);
    let train = sequences(&r);
    let opts = options(1);
    for batch in [vec![0usize, 1, 2, 3], vec![2, 0, 3]] {
        let single = Trainer::new(
            &model,
            adapter(&r, &model),
            train.clone(),
            vec![],
            opts.clone(),
        )
        .unwrap();
        let (loss, norm, grads) =
            finetune_train::on_large_stack(|| single.step_gradients(&batch)).unwrap();
        let want: HashMap<String, Tensor> = grads.into_iter().collect();
        assert!(want.len() > 40, "{} gradients", want.len());
        for (name, g) in &want {
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "single-device gradient of {name} is zero");
        }
        // (world, tp, ep, recompute): ep2, ep4, tp2, dp2, ep2×dp2, tp2×ep4, tp2×dp2, and three
        // of them with per-layer recompute (layers replayed, collectives included).
        for (world, tp, ep, recompute) in [
            (2, 1, 2, false),
            (4, 1, 4, false),
            (2, 2, 2, false),
            (2, 1, 1, false),
            (4, 1, 2, false),
            (4, 2, 4, false),
            (4, 2, 2, false),
            (4, 1, 2, true),
            (2, 2, 2, true),
            (4, 2, 4, true),
        ] {
            let mut opts = opts.clone();
            opts.recompute = recompute;
            let layout = Layout::new(world, tp, ep, &model.config).unwrap();
            let ranks = on_world(layout, &model, &full, &train, &[], &opts, |t| {
                t.step_gradients(&batch).unwrap()
            });
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut worst = 0f32;
            for (rank, (l, n, grads)) in ranks.iter().enumerate() {
                assert!(
                    (l - loss).abs() <= 1e-5,
                    "{layout:?} rank {rank}: loss {l} vs {loss}"
                );
                assert!(
                    (n - norm).abs() <= 1e-5 * norm.max(1.0),
                    "{layout:?} rank {rank}: norm {n} vs {norm}"
                );
                for (name, g) in grads {
                    let d = max_diff(g, &want[name]);
                    worst = worst.max(d);
                    assert!(d <= 1e-5, "{layout:?} rank {rank}: {name} differs by {d}");
                    *seen.entry(name.clone()).or_default() += 1;
                }
            }
            // Every gradient is held by someone; experts by world/ep ranks each.
            assert_eq!(seen.len(), want.len(), "{layout:?}");
            for (name, count) in &seen {
                let want_count = if name.contains(".experts.") {
                    world / ep
                } else {
                    world
                };
                assert_eq!(*count, want_count, "{layout:?}: {name}");
            }
            eprintln!(
                "batch {batch:?} world {world} tp {tp} ep {ep} recompute {recompute}: loss {loss:.6}, max |Δgrad| {worst:.2e}"
            );
        }
    }
}

fn flat(lora: &Lora) -> Vec<f32> {
    lora.tensors()
        .flat_map(|(_, a, b)| {
            let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            v
        })
        .collect()
}

/// Train 2 of 4 steps at ep 2 × dp 2 (world 4), stop with a checkpoint, resume at world 1 and
/// at tp 2 × ep 2 (world 2): both end where an uninterrupted single-device run ends (losses
/// and adapter within 1e-5). The held-out loss is computed in parallel too.
#[test]
fn a_checkpoint_from_four_ranks_resumes_on_one_and_on_two() {
    let r = reference();
    let model = model();
    let train = sequences(&r);
    let heldout = train[..3].to_vec();
    let opts = options(4);
    let stop = AtomicBool::new(false);

    let mut single = Trainer::new(
        &model,
        adapter(&r, &model),
        train.clone(),
        heldout.clone(),
        opts.clone(),
    )
    .unwrap();
    let mut want_losses = Vec::new();
    let summary = finetune_train::on_large_stack(|| {
        single.run(None, &stop, &mut |m| want_losses.push(m.loss))
    })
    .unwrap();
    let want = flat(single.lora());

    let dir = tempfile::tempdir().unwrap();
    let out = output(dir.path());
    let full = adapter(&r, &model);
    let layout = Layout::new(4, 1, 2, &model.config).unwrap();
    let stops: Vec<AtomicBool> = (0..4).map(|_| AtomicBool::new(false)).collect();
    let first = on_world(layout, &model, &full, &train, &heldout, &opts, |t| {
        let rank = t.rank_context().unwrap().rank();
        let mut losses = Vec::new();
        let s = t
            .run(Some(&out), &stops[rank], &mut |m| {
                losses.push(m.loss);
                if m.step == 2 && rank == 0 {
                    stops[0].store(true, Ordering::SeqCst);
                }
            })
            .unwrap();
        (losses, s)
    });
    for (rank, (losses, s)) in first.iter().enumerate() {
        assert!(s.stopped_early && s.steps == 2, "rank {rank}: {s:?}");
        assert_eq!(losses.len(), 2);
        for (a, b) in losses.iter().zip(&want_losses) {
            assert!((a - b).abs() <= 1e-5, "rank {rank}: loss {a} vs {b}");
        }
        let (hb, wb) = (s.heldout_before.unwrap(), summary.heldout_before.unwrap());
        assert!((hb - wb).abs() <= 1e-5, "held-out {hb} vs {wb}");
    }
    let ckpt_dir = checkpoint::latest(&dir.path().join("checkpoints")).unwrap();
    assert!(ckpt_dir.ends_with("step-000002"));

    // World 1.
    let ckpt = checkpoint::load(&ckpt_dir, &model.lora_targets()).unwrap();
    assert_eq!(
        ckpt.lora.len(),
        full.len(),
        "the checkpoint holds every adapter"
    );
    let mut resumed = Trainer::new(
        &model,
        adapter(&r, &model),
        train.clone(),
        heldout.clone(),
        opts.clone(),
    )
    .unwrap();
    resumed.resume(ckpt).unwrap();
    let mut losses = Vec::new();
    let no_stop = AtomicBool::new(false);
    let s = finetune_train::on_large_stack(|| {
        resumed.run(None, &no_stop, &mut |m| losses.push(m.loss))
    })
    .unwrap();
    assert_eq!(s.steps, 4);
    for (a, b) in losses.iter().zip(&want_losses[2..]) {
        assert!((a - b).abs() <= 1e-5, "resumed on 1: loss {a} vs {b}");
    }
    let got = flat(resumed.lora());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "resumed on 1: adapter differs by {worst}");
    let hd = (s.heldout_after.unwrap() - summary.heldout_after.unwrap()).abs();
    assert!(hd <= 1e-5, "held-out after: {hd}");

    // World 2, tp 2 × ep 2: resume from the same checkpoint, then gather the final adapter
    // through a checkpoint written at step 4.
    let layout = Layout::new(2, 2, 2, &model.config).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let out2 = output(dir2.path());
    let second = on_world(layout, &model, &full, &train, &heldout, &opts, |t| {
        let ckpt = checkpoint::load(&ckpt_dir, &model.lora_targets()).unwrap();
        t.resume(ckpt).unwrap();
        let mut losses = Vec::new();
        let no_stop = AtomicBool::new(false);
        t.run(Some(&out2), &no_stop, &mut |m| losses.push(m.loss))
            .unwrap();
        losses
    });
    for losses in &second {
        for (a, b) in losses.iter().zip(&want_losses[2..]) {
            assert!((a - b).abs() <= 1e-5, "resumed on 2: loss {a} vs {b}");
        }
    }
    let last = checkpoint::load(
        &checkpoint::latest(&dir2.path().join("checkpoints")).unwrap(),
        &model.lora_targets(),
    )
    .unwrap();
    assert_eq!(last.state.step, 4);
    let got = flat(&last.lora);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "resumed on 2: adapter differs by {worst}");
}
