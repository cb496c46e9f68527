//! The training loop against PyTorch (datasets/fixtures/trainer, made by
//! scripts/make_trainer_fixture.py), and its resume, recompute and failure behaviour.

use candle_core::{Device, Tensor};
use finetune_data::Sequence;
use finetune_model::peft::AdapterMeta;
use finetune_model::{Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::{
    checkpoint, AdamWConfig, LrSchedule, RunOutput, TrainError, TrainOptions, Trainer,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

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
            let mut doc_lens = Vec::new();
            for (i, &p) in pos.iter().enumerate() {
                if p == 0 {
                    doc_lens.push(0);
                }
                let _ = i;
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

fn reference_lora(r: &HashMap<String, Tensor>, model: &Qwen3Moe, prefix: &str) -> Lora {
    Lora::from_tensors(
        4,
        2.0,
        model.lora_targets().into_iter().map(|(name, _, _)| {
            let a = r[&format!("{prefix}.{name}.A")].clone();
            let b = r[&format!("{prefix}.{name}.B")].clone();
            (name, a, b)
        }),
    )
    .unwrap()
}

fn options() -> TrainOptions {
    TrainOptions {
        lr: 2e-2,
        schedule: LrSchedule::Cosine,
        warmup: 2,
        total_steps: 10,
        micro_batch: 2,
        grad_accum: 2,
        seed: 42,
        recompute: false,
        adamw: AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        eval_every: 0,
        eval_sequences: 0,
        save_every: 0,
        keep_checkpoints: 2,
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

fn flat(lora: &Lora) -> Vec<f32> {
    lora.tensors()
        .flat_map(|(_, a, b)| {
            let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            v
        })
        .collect()
}

/// The acceptance check: 10 steps (4 packed sequences per step as 2 micro-batches × 2
/// accumulation steps, warmup + cosine, weight decay, clipping) follow PyTorch: loss within
/// 1e-4 at every step, and the final adapter close to PyTorch's.
#[test]
fn ten_steps_reproduce_pytorch() {
    let r = reference();
    let model = model();
    let lora = reference_lora(&r, &model, "init");
    let mut trainer = Trainer::new(&model, lora, sequences(&r), vec![], options()).unwrap();
    let mut got = Vec::new();
    let stop = AtomicBool::new(false);
    finetune_train::on_large_stack(|| {
        trainer.run(None, &stop, &mut |m| got.push((m.loss, m.lr, m.grad_norm)))
    })
    .unwrap();
    let want_loss = r["losses"].to_vec1::<f64>().unwrap();
    let want_lr = r["lrs"].to_vec1::<f64>().unwrap();
    let want_norm = r["norms"].to_vec1::<f64>().unwrap();
    assert_eq!(got.len(), 10);
    for (s, (loss, lr, norm)) in got.iter().enumerate() {
        eprintln!(
            "step {s}: loss {loss:.6} (PyTorch {:.6}), norm {norm:.5} ({:.5})",
            want_loss[s], want_norm[s]
        );
        assert!(
            (loss - want_loss[s]).abs() <= 1e-4,
            "step {s}: loss {loss} vs {}",
            want_loss[s]
        );
        assert!(
            (lr - want_lr[s]).abs() <= 1e-12,
            "step {s}: lr {lr} vs {}",
            want_lr[s]
        );
        assert!(
            (norm - want_norm[s]).abs() <= 1e-3 * want_norm[s].max(1.0),
            "step {s}: norm {norm} vs {}",
            want_norm[s]
        );
    }
    // The final adapter: Adam's update is ≈ lr·sign(g) where |g| ≫ ε, so elements whose
    // gradient is rounding noise may move differently by up to 2·lr; compare the whole update.
    let init = flat(&reference_lora(&r, &model, "init"));
    let want = flat(&reference_lora(&r, &model, "final"));
    let have = flat(trainer.lora());
    let worst = have
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let norm = |v: Vec<f32>| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = norm(have.iter().zip(&want).map(|(a, b)| a - b).collect());
    let update = norm(want.iter().zip(&init).map(|(a, b)| a - b).collect());
    eprintln!(
        "final adapter: max abs diff {worst:.2e}, ‖ours − PyTorch‖ / ‖PyTorch's update‖ = {:.2e}",
        diff / update
    );
    assert!(
        worst < 1e-3 && diff / update < 1e-3,
        "final adapter differs: {worst}, {}",
        diff / update
    );
}

/// Per-layer recompute gives the plain path's gradients (same losses, same weights), with
/// dropout on so that the replayed masks must match too.
#[test]
fn recompute_equals_the_plain_backward_with_dropout() {
    let r = reference();
    let model = model();
    let run = |recompute: bool| {
        let mut lora = reference_lora(&r, &model, "init");
        lora.set_dropout(0.1, 9);
        let mut o = options();
        o.total_steps = 3;
        o.recompute = recompute;
        let mut trainer = Trainer::new(&model, lora, sequences(&r), vec![], o).unwrap();
        let mut losses = Vec::new();
        let stop = AtomicBool::new(false);
        finetune_train::on_large_stack(|| trainer.run(None, &stop, &mut |m| losses.push(m.loss)))
            .unwrap();
        (losses, flat(trainer.lora()))
    };
    let (plain_loss, plain_w) = run(false);
    let (re_loss, re_w) = run(true);
    for (a, b) in plain_loss.iter().zip(&re_loss) {
        assert!((a - b).abs() < 1e-6, "loss {a} vs {b}");
    }
    let worst = plain_w
        .iter()
        .zip(&re_w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "weights differ by {worst}");
    // Dropout did something: without it the weights differ.
    let mut o = options();
    o.total_steps = 3;
    let mut t = Trainer::new(
        &model,
        reference_lora(&r, &model, "init"),
        sequences(&r),
        vec![],
        o,
    )
    .unwrap();
    finetune_train::on_large_stack(|| t.run(None, &AtomicBool::new(false), &mut |_| {})).unwrap();
    assert_ne!(flat(t.lora()), plain_w);
}

/// N steps, checkpoint, resume in a new trainer, N steps = 2N steps in one go, bit for bit
/// (with dropout: its masks are keyed by the sequences' numbers, step × B + place, so the
/// resumed steps must draw the masks the uninterrupted run drew).
#[test]
fn resume_is_bit_identical() {
    let r = reference();
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let lora = || {
        let mut l = reference_lora(&r, &model, "init");
        l.set_dropout(0.05, 3);
        l
    };
    let mut o = options();
    o.total_steps = 6;
    o.micro_batch = 1;
    o.grad_accum = 1; // one sequence per step: the cursor crosses an epoch boundary
    let stop = AtomicBool::new(false);
    let mut whole = Trainer::new(&model, lora(), sequences(&r), vec![], o.clone()).unwrap();
    finetune_train::on_large_stack(|| whole.run(None, &stop, &mut |_| {})).unwrap();

    let out = output(dir.path());
    o.save_every = 3;
    let mut first = Trainer::new(&model, lora(), sequences(&r), vec![], o.clone()).unwrap();
    // Stop after step 3 (a stop request is honoured after the step, with a checkpoint).
    let stop_flag = AtomicBool::new(false);
    finetune_train::on_large_stack(|| {
        first.run(Some(&out), &stop_flag, &mut |m| {
            if m.step == 3 {
                stop_flag.store(true, std::sync::atomic::Ordering::SeqCst)
            }
        })
    })
    .unwrap();
    assert_eq!(first.step(), 3);
    let ckpt_dir = checkpoint::latest(&dir.path().join("checkpoints")).unwrap();
    assert!(ckpt_dir.ends_with("step-000003"));
    let ckpt = checkpoint::load(&ckpt_dir, &model.lora_targets()).unwrap();
    let mut second = Trainer::new(&model, lora(), sequences(&r), vec![], o).unwrap();
    second.resume(ckpt).unwrap();
    finetune_train::on_large_stack(|| second.run(Some(&out), &stop, &mut |_| {})).unwrap();
    assert_eq!(second.step(), 6);
    assert_eq!(
        flat(second.lora()),
        flat(whole.lora()),
        "resumed weights differ"
    );
    // metrics.jsonl has one line per step across both runs.
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // keep_checkpoints = 2: steps 3 and 6 remain.
    let kept: Vec<u64> = checkpoint::list(&dir.path().join("checkpoints"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![3, 6]);
}

#[test]
fn corrupt_checkpoints_are_refused_by_name() {
    let r = reference();
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let mut o = options();
    o.total_steps = 1;
    let mut t = Trainer::new(
        &model,
        reference_lora(&r, &model, "init"),
        sequences(&r),
        vec![],
        o,
    )
    .unwrap();
    finetune_train::on_large_stack(|| {
        t.run(
            Some(&output(dir.path())),
            &AtomicBool::new(false),
            &mut |_| {},
        )
    })
    .unwrap();
    let ckpt = checkpoint::latest(&dir.path().join("checkpoints")).unwrap();
    let targets = model.lora_targets();
    assert!(checkpoint::load(&ckpt, &targets).is_ok());
    // One flipped byte inside the optimizer's tensors.
    let opt = ckpt.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&opt, &bytes).unwrap();
    let e = checkpoint::load(&ckpt, &targets)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("corrupt"),
        "{e}"
    );
    // A truncated state file.
    let state = ckpt.join("trainer_state.json");
    std::fs::write(&state, "{\"format\": 1, \"step\":").unwrap();
    let e = checkpoint::load(&ckpt, &targets)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("trainer_state.json") && e.contains("corrupt"),
        "{e}"
    );
}

#[test]
fn empty_dataset_and_non_finite_steps_fail_clearly() {
    let r = reference();
    let model = model();
    let e = Trainer::new(
        &model,
        reference_lora(&r, &model, "init"),
        vec![],
        vec![],
        options(),
    )
    .err()
    .expect("must fail");
    assert!(matches!(e, TrainError::EmptyDataset), "{e}");
    // An absurd learning rate overflows the weights: the loss turns non-finite, those steps are
    // skipped, and after max_bad_steps in a row the run stops with an error (and a checkpoint).
    let dir = tempfile::tempdir().unwrap();
    let mut o = options();
    o.lr = 1e38;
    o.warmup = 0;
    o.schedule = LrSchedule::Constant;
    o.max_grad_norm = 0.0;
    let mut t = Trainer::new(
        &model,
        reference_lora(&r, &model, "init"),
        sequences(&r),
        vec![],
        o,
    )
    .unwrap();
    let mut skipped = Vec::new();
    let e = finetune_train::on_large_stack(|| {
        t.run(
            Some(&output(dir.path())),
            &AtomicBool::new(false),
            &mut |m| skipped.push(m.skipped),
        )
    })
    .expect_err("must fail");
    assert!(matches!(e, TrainError::NonFinite { steps: 3, .. }), "{e}");
    assert!(
        skipped.ends_with(&[true, true, true]) && !skipped[0],
        "{skipped:?}"
    );
}

/// Expert adapters stored stacked (one `[E, …]` variable per MoE layer and projection, what
/// `Lora::from_tensors` makes) train exactly like the per-module storage they replaced (every
/// expert its own variables, `Lora::from_tensors_per_module`): 10 steps with weight decay,
/// clipping, warmup + cosine and gradient accumulation give the same losses, gradient norms
/// and final adapter (≤ 1e-6; in practice bit for bit) on the per-expert reference path, on
/// the grouped path and on the grouped path's hand-written backward (`GroupedManual`, whose
/// per-module case stacks the experts' views per use), while AdamW sees 6 tensors per MoE layer
/// where it saw 24.
#[test]
fn stacked_expert_adapters_train_like_per_module_ones() {
    use finetune_model::model::MoePath;
    let r = reference();
    let mut model = model();
    let per_module = |r: &HashMap<String, Tensor>, model: &Qwen3Moe| {
        Lora::from_tensors_per_module(
            4,
            2.0,
            reference_lora(r, model, "init")
                .tensors()
                .map(|(n, a, b)| (n.to_string(), a.copy().unwrap(), b.copy().unwrap())),
        )
        .unwrap()
    };
    for path in [MoePath::PerExpert, MoePath::Grouped, MoePath::GroupedManual] {
        model.set_moe_path(path);
        let run = |lora: Lora| {
            let n_vars = lora.vars().count();
            let mut trainer = Trainer::new(&model, lora, sequences(&r), vec![], options()).unwrap();
            let mut metrics = Vec::new();
            let stop = AtomicBool::new(false);
            finetune_train::on_large_stack(|| {
                trainer.run(None, &stop, &mut |m| metrics.push((m.loss, m.grad_norm)))
            })
            .unwrap();
            (n_vars, metrics, flat(trainer.lora()))
        };
        let (n_stacked, m_stacked, w_stacked) = run(reference_lora(&r, &model, "init"));
        let (n_module, m_module, w_module) = run(per_module(&r, &model));
        // The fixture: 3 layers × 4 attention projections, 2 MoE layers × 4 experts × 3, and
        // 3 dense-MLP projections; A and B each.
        assert_eq!(n_module, 2 * (3 * 4 + 2 * 4 * 3 + 3), "{path:?}");
        assert_eq!(n_stacked, 2 * (3 * 4 + 2 * 3 + 3), "{path:?}");
        assert_eq!(m_stacked.len(), 10);
        // Clipping is exercised (max_grad_norm 1.0): some steps' norms exceed it.
        assert!(
            m_stacked.iter().any(|m| m.1 > options().max_grad_norm),
            "{m_stacked:?}"
        );
        for (s, (a, b)) in m_stacked.iter().zip(&m_module).enumerate() {
            assert!(
                (a.0 - b.0).abs() <= 1e-6 && (a.1 - b.1).abs() <= 1e-6 * b.1.max(1.0),
                "{path:?} step {s}: loss/norm {a:?} stacked vs {b:?} per module"
            );
        }
        assert_eq!(w_stacked.len(), w_module.len());
        let worst = w_stacked
            .iter()
            .zip(&w_module)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let same = w_stacked
            .iter()
            .zip(&w_module)
            .filter(|(x, y)| x.to_bits() == y.to_bits())
            .count();
        eprintln!(
            "{path:?}: adapters after 10 steps differ by at most {worst:e}; {same} of {} values bit-identical",
            w_module.len()
        );
        assert!(worst <= 1e-6, "{path:?}: adapters differ by {worst}");
        // The adapters moved (the comparison is not of untouched values).
        let init = flat(&reference_lora(&r, &model, "init"));
        let moved = w_stacked
            .iter()
            .zip(&init)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-3, "{path:?}: the adapters moved by only {moved}");
    }
}

/// Training with each layer's attention half as one node with a hand-written backward
/// (`AttentionPath::Manual`) follows the autograd chain: 10 steps with weight decay, clipping,
/// warmup + cosine and gradient accumulation give the same losses and gradient norms (≤ 1e-5
/// relative) and the same final adapter (≤ 1e-3 of the largest change training made), with the
/// layers kept for the backward and with per-layer recompute (the layer replayed from a `Var`
/// input).
#[test]
fn manual_attention_block_trains_like_the_chain() {
    use finetune_model::model::{AttentionPath, MoePath};
    let r = reference();
    let mut model = model();
    model.set_moe_path(MoePath::GroupedManual);
    for recompute in [false, true] {
        let mut run = |path| {
            model.set_attention_path(path);
            let options = TrainOptions {
                recompute,
                ..options()
            };
            let lora = reference_lora(&r, &model, "init");
            let mut trainer = Trainer::new(&model, lora, sequences(&r), vec![], options).unwrap();
            let mut metrics = Vec::new();
            let stop = AtomicBool::new(false);
            finetune_train::on_large_stack(|| {
                trainer.run(None, &stop, &mut |m| metrics.push((m.loss, m.grad_norm)))
            })
            .unwrap();
            (metrics, flat(trainer.lora()))
        };
        let (m_chain, w_chain) = run(AttentionPath::Chain);
        let (m_manual, w_manual) = run(AttentionPath::Manual);
        assert_eq!(m_manual.len(), 10);
        for (s, (a, b)) in m_manual.iter().zip(&m_chain).enumerate() {
            assert!(
                (a.0 - b.0).abs() <= 1e-5 * b.0.abs().max(1.0)
                    && (a.1 - b.1).abs() <= 1e-5 * b.1.max(1.0),
                "recompute {recompute}, step {s}: loss/norm {a:?} manual vs {b:?} chain"
            );
        }
        let largest_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let worst = largest_diff(&w_manual, &w_chain);
        // What training changed (the comparison is not of two untrained copies). AdamW divides
        // each gradient by its running RMS, so an element whose gradient is near zero moves by
        // up to ~lr per step on the rounding of that gradient: the bound is relative to the
        // largest change, not to the values.
        let init = flat(&reference_lora(&r, &model, "init"));
        let moved = largest_diff(&w_chain, &init);
        assert!(
            moved > 1e-3,
            "recompute {recompute}: adapters moved by {moved}"
        );
        assert!(
            worst <= 1e-3 * moved,
            "recompute {recompute}: adapters differ by {worst} (training moved them by up to {moved})"
        );
        eprintln!(
            "recompute {recompute}: adapters after 10 steps differ by at most {worst:e} (moved {moved:e})"
        );
    }
}
