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
use finetune_train::parallel::{load_rank_model, CpuComms, Layout, RankContext};
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

/// The tiny fixture model's directory (bf16).
fn base_dir() -> PathBuf {
    fixtures().join("tiny-qwen3-moe/bf16")
}

fn model() -> Qwen3Moe {
    let dir = base_dir();
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
    base: &Path,
    full: &Lora,
    train: &[Sequence],
    heldout: &[Sequence],
    opts: &TrainOptions,
    f: impl Fn(&mut Trainer) -> T + Sync,
) -> Vec<T> {
    on_world_with(layout, base, full, train, heldout, opts, |_| {}, f)
}

/// [`on_world`], with `setup` applied to each rank's context first (switches, bucket size).
/// Each rank loads only its own shard of the base model in `base` (its experts, heads and
/// vocabulary rows; checked here), as `finetune train` does: no rank sees a whole model.
#[allow(clippy::too_many_arguments)]
fn on_world_with<T: Send>(
    layout: Layout,
    base: &Path,
    full: &Lora,
    train: &[Sequence],
    heldout: &[Sequence],
    opts: &TrainOptions,
    setup: impl Fn(&mut RankContext) + Sync,
    f: impl Fn(&mut Trainer) -> T + Sync,
) -> Vec<T> {
    let comms = CpuComms::for_layout(&layout, Duration::from_secs(120));
    let config = Qwen3MoeConfig::from_file(&base.join("config.json")).unwrap();
    let n_experts = config.num_experts;
    // Lora holds Vars (Arc'd tensors): each rank gets its own copy of the whole adapter.
    let fulls: Vec<Lora> = (0..layout.world)
        .map(|_| {
            let mut l = Lora::from_tensors(
                full.r,
                full.scale,
                full.tensors()
                    .map(|(n, a, b)| (n.to_string(), a.copy().unwrap(), b.copy().unwrap())),
            )
            .unwrap();
            l.copy_dropout(full);
            l
        })
        .collect();
    std::thread::scope(|s| {
        let (f, setup, config) = (&f, &setup, &config);
        let joins: Vec<_> = comms
            .into_iter()
            .zip(fulls)
            .enumerate()
            .map(|(rank, (c, full))| {
                std::thread::Builder::new()
                    .stack_size(256 << 20)
                    .spawn_scoped(s, move || {
                        let mut ctx =
                            RankContext::new(layout, rank, c.into_comms(), &full, n_experts)
                                .unwrap();
                        setup(&mut ctx);
                        let model = load_rank_model(base, config, &ctx, &Device::Cpu).unwrap();
                        let shard = ctx.base_shard(config);
                        assert_eq!(model.shard(), &shard);
                        // Sharded wherever the layout shards: experts over ep, heads (and,
                        // vocabulary-parallel, rows) over tp.
                        assert_eq!(shard.experts.len(), config.num_experts / layout.ep);
                        assert_eq!(shard.heads.len(), config.num_attention_heads / layout.tp);
                        if ctx.vocab_parallel_active() {
                            assert!(shard.vocab.len() < config.vocab_size);
                        }
                        let mut t = Trainer::new_parallel(
                            &model,
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

/// One rank's loss, gradient norm and LoRA gradients against the single-device step's (loss and
/// every gradient within 1e-5, the norm within 1e-5 relative); returns its largest gradient
/// difference.
fn check_rank(
    what: &str,
    rank: usize,
    (l, n, grads): &(f64, f64, Vec<(String, Tensor)>),
    (loss, norm): (f64, f64),
    want: &HashMap<String, Tensor>,
) -> f32 {
    assert!(
        (l - loss).abs() <= 1e-5,
        "{what} rank {rank}: loss {l} vs {loss}"
    );
    assert!(
        (n - norm).abs() <= 1e-5 * norm.max(1.0),
        "{what} rank {rank}: norm {n} vs {norm}"
    );
    let mut worst = 0f32;
    for (name, g) in grads {
        let d = max_diff(g, &want[name]);
        worst = worst.max(d);
        assert!(d <= 1e-5, "{what} rank {rank}: {name} differs by {d}");
    }
    worst
}

/// How a test runs the embedding and the loss under tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vp {
    /// Vocabulary-parallel, the device's default logits chunk (one chunk here).
    On,
    /// Vocabulary-parallel, chunks of 3 rows of the widest shard.
    Chunked,
    /// Replicated on every tp rank.
    Off,
}

impl Vp {
    fn apply(self, ctx: &mut RankContext, vocab: usize) {
        ctx.vocab_parallel = self != Vp::Off;
        if self == Vp::Chunked {
            let widest = vocab.div_ceil(ctx.layout.tp);
            ctx.vocab_chunk_elems = Some(3 * widest);
        }
    }
}

/// The acceptance check: ep 2, ep 4, tp 2, dp 2, ep 2 × dp 2 (and tp 2 with ep 4, tp 2 × dp 2,
/// per-layer recompute, vocabulary-parallel embedding and loss under tp — chunked or not — and
/// the replicated ones, and a step of 3 sequences over 2 data ranks, which needs padding) give
/// the single-device loss, norm and every LoRA gradient within 1e-5.
#[test]
fn every_layout_gives_the_single_device_loss_and_gradients() {
    let r = reference();
    let model = model();
    let base = base_dir();
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
        // (world, tp, ep, recompute, vocabulary parallel): ep2, ep4, tp2, dp2, ep2×dp2,
        // tp2×ep4, tp2×dp2, and three of them with per-layer recompute (layers replayed,
        // collectives included). Under tp the embedding and the loss are vocabulary-parallel
        // (`Vp::On`), once with 3-row logits chunks (`Vp::Chunked`: several chunks, each with
        // its collectives), and once replicated (`Vp::Off`, the switch).
        for (world, tp, ep, recompute, vp) in [
            (2, 1, 2, false, Vp::On),
            (4, 1, 4, false, Vp::On),
            (2, 2, 2, false, Vp::On),
            (2, 2, 2, false, Vp::Off),
            (2, 2, 2, false, Vp::Chunked),
            (2, 1, 1, false, Vp::On),
            (4, 1, 2, false, Vp::On),
            (4, 2, 4, false, Vp::On),
            (4, 2, 2, false, Vp::Chunked),
            (4, 1, 2, true, Vp::On),
            (2, 2, 2, true, Vp::On),
            (4, 2, 4, true, Vp::On),
        ] {
            let mut opts = opts.clone();
            opts.recompute = recompute;
            let layout = Layout::new(world, tp, ep, &model.config).unwrap();
            let ranks = on_world_with(
                layout,
                &base,
                &full,
                &train,
                &[],
                &opts,
                |ctx| vp.apply(ctx, model.config.vocab_size),
                |t| {
                    let active = t.rank_context().unwrap().vocab_parallel_active();
                    assert_eq!(active, tp > 1 && vp != Vp::Off, "{layout:?} {vp:?}");
                    t.step_gradients(&batch).unwrap()
                },
            );
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut worst = 0f32;
            for (rank, got) in ranks.iter().enumerate() {
                let what = format!("{layout:?}");
                worst = worst.max(check_rank(&what, rank, got, (loss, norm), &want));
                for (name, _) in &got.2 {
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
                "batch {batch:?} world {world} tp {tp} ep {ep} recompute {recompute} {vp:?}: loss {loss:.6}, max |Δgrad| {worst:.2e}"
            );
        }
    }
}

/// LoRA dropout (p = 0.1) in every kind of layout: ep 2, ep 4, tp 2, dp 2, ep 2 × dp 2, tp 2 ×
/// ep 4 (one with per-layer recompute) give the single-device step with the same dropout —
/// loss, norm and every gradient within 1e-5 — because the masks are keyed by (sequence, token,
/// module, feature) and rows reaching another rank's experts bring their token keys. The
/// single-device gradients with dropout differ from those without (the masks are drawn).
#[test]
fn every_layout_with_lora_dropout_gives_the_single_device_step() {
    let r = reference();
    let model = model();
    let base = base_dir();
    let mut full = adapter(&r, &model);
    full.set_dropout(0.1, 77);
    let train = sequences(&r);
    let opts = options(1);
    let batch = vec![0usize, 1, 2, 3];
    let single_with = |p: f64| {
        let mut lora = adapter(&r, &model);
        lora.set_dropout(p, 77);
        let t = Trainer::new(&model, lora, train.clone(), vec![], opts.clone()).unwrap();
        finetune_train::on_large_stack(|| t.step_gradients(&batch)).unwrap()
    };
    let (loss, norm, grads) = single_with(0.1);
    let want: HashMap<String, Tensor> = grads.into_iter().collect();
    let (loss_plain, _, grads_plain) = single_with(0.0);
    assert!((loss - loss_plain).abs() > 1e-4, "{loss} vs {loss_plain}");
    let moved = grads_plain
        .iter()
        .filter(|(n, g)| max_diff(g, &want[n]) > 1e-6)
        .count();
    assert!(
        moved * 10 >= want.len() * 9,
        "dropout changed only {moved} of {} gradients",
        want.len()
    );
    for (world, tp, ep, recompute) in [
        (2, 1, 2, false),
        (4, 1, 4, false),
        (2, 2, 2, false),
        (2, 1, 1, false),
        (4, 1, 2, false),
        (4, 2, 4, false),
        (4, 2, 4, true),
    ] {
        let mut opts = opts.clone();
        opts.recompute = recompute;
        let layout = Layout::new(world, tp, ep, &model.config).unwrap();
        let ranks = on_world(layout, &base, &full, &train, &[], &opts, |t| {
            assert!(t.lora().dropout_active());
            t.step_gradients(&batch).unwrap()
        });
        let mut worst = 0f32;
        for (rank, got) in ranks.iter().enumerate() {
            let what = format!("dropout {layout:?} recompute {recompute}");
            worst = worst.max(check_rank(&what, rank, got, (loss, norm), &want));
        }
        eprintln!(
            "dropout 0.1, world {world} tp {tp} ep {ep} recompute {recompute}: loss {loss:.6}, max |Δgrad| {worst:.2e}"
        );
    }
}

/// Vocabulary parallelism with tied embeddings (the embedded tiny base ties them; the fixture
/// does not) and a vocabulary of 301, which tp 2 splits 151 + 150: a random checkpoint of the
/// fixture's shape with those two changes gives the single-device loss, gradients and held-out
/// loss at tp 2 and tp 2 × dp 2 (≤ 1e-5), with one and with several logits chunks.
#[test]
fn vocabulary_parallel_handles_tied_embeddings_and_an_uneven_vocabulary() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let mut config = model().config.clone();
    config.vocab_size = 301;
    config.tie_word_embeddings = true;
    finetune_model::init::write_random_checkpoint(&config, 11, dir.path()).unwrap();
    let config = Qwen3MoeConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert!(config.tie_word_embeddings && config.vocab_size == 301);
    let weights = Weights::open(dir.path(), &Device::Cpu).unwrap();
    let model = Qwen3Moe::load(config, &weights, &Device::Cpu).unwrap();
    let base = dir.path().to_path_buf();
    let full = adapter(&r, &model);
    let train = sequences(&r);
    let heldout = train[1..].to_vec();
    let opts = options(1);
    let batch = vec![0usize, 1, 2, 3];
    let single = Trainer::new(
        &model,
        adapter(&r, &model),
        train.clone(),
        heldout.clone(),
        opts.clone(),
    )
    .unwrap();
    let (loss, norm, grads) =
        finetune_train::on_large_stack(|| single.step_gradients(&batch)).unwrap();
    let want_heldout = single.heldout_loss().unwrap().unwrap();
    let want: HashMap<String, Tensor> = grads.into_iter().collect();
    for (world, tp, ep, vp) in [
        (2, 2, 2, Vp::On),
        (2, 2, 2, Vp::Chunked),
        (4, 2, 2, Vp::Chunked),
    ] {
        let layout = Layout::new(world, tp, ep, &model.config).unwrap();
        let ranks = on_world_with(
            layout,
            &base,
            &full,
            &train,
            &heldout,
            &opts,
            |ctx| vp.apply(ctx, 301),
            |t| {
                assert!(t.rank_context().unwrap().vocab_parallel_active());
                let h = t.heldout_loss().unwrap().unwrap();
                (t.step_gradients(&batch).unwrap(), h)
            },
        );
        let mut worst = 0f32;
        for (rank, (got, h)) in ranks.iter().enumerate() {
            assert!(
                (h - want_heldout).abs() <= 1e-5,
                "{layout:?} rank {rank}: held-out {h} vs {want_heldout}"
            );
            assert!(!got.2.is_empty());
            let what = format!("{layout:?} {vp:?}");
            worst = worst.max(check_rank(&what, rank, got, (loss, norm), &want));
        }
        eprintln!(
            "vocab 301 tied, world {world} tp {tp} ep {ep} {vp:?}: loss {loss:.6}, max |Δgrad| {worst:.2e}"
        );
    }
}

/// The gradient all-reduce overlapped with the backward (buckets of 2,000 elements, so that
/// each class makes several and most are launched while earlier layers still run backward)
/// gives bit-identical losses, norms and gradients to the same buckets reduced after the
/// backward, at dp 2, ep 2 × dp 2 and tp 2 × dp 2 (and with recompute); and two training steps
/// end with bit-identical adapters.
#[test]
fn overlapped_gradient_all_reduce_is_bit_identical_to_the_plain_one() {
    let r = reference();
    let model = model();
    let base = base_dir();
    let full = adapter(&r, &model);
    let train = sequences(&r);
    let batch = vec![0usize, 1, 2, 3];
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    for (world, tp, ep, recompute) in [
        (2, 1, 1, false),
        (4, 1, 2, false),
        (4, 2, 2, false),
        (4, 1, 2, true),
    ] {
        let mut opts = options(1);
        opts.recompute = recompute;
        let layout = Layout::new(world, tp, ep, &model.config).unwrap();
        let run = |overlap: bool| {
            on_world_with(
                layout,
                &base,
                &full,
                &train,
                &[],
                &opts,
                |ctx| {
                    ctx.overlap = overlap;
                    ctx.bucket_elements = 2000;
                },
                |t| {
                    let g = t.step_gradients(&batch).unwrap();
                    (g, t.rank_context().unwrap().last_overlap())
                },
            )
        };
        let (on, off) = (run(true), run(false));
        for (rank, (((l1, n1, g1), (early, total)), ((l0, n0, g0), (early0, total0)))) in
            on.iter().zip(&off).enumerate()
        {
            assert_eq!(l1.to_bits(), l0.to_bits(), "{layout:?} rank {rank}: loss");
            assert_eq!(n1.to_bits(), n0.to_bits(), "{layout:?} rank {rank}: norm");
            assert_eq!(g1.len(), g0.len());
            for ((a, ta), (b, tb)) in g1.iter().zip(g0) {
                assert_eq!(a, b);
                assert!(bits(ta) == bits(tb), "{layout:?} rank {rank}: {a} differs");
            }
            // Several buckets, launched during the backward with overlap, after it without.
            assert_eq!(total, total0);
            assert!(*total > 6, "{layout:?}: {total} buckets");
            assert!(*early > *total / 2, "{layout:?}: {early} of {total} early");
            assert_eq!(
                *early0, 0,
                "{layout:?}: overlap off launched {early0} early"
            );
        }
    }
    // Two optimizer steps (clipping, AdamW) at ep 2 × dp 2: the same adapters, bit for bit.
    let layout = Layout::new(4, 1, 2, &model.config).unwrap();
    let opts = options(2);
    let dir = tempfile::tempdir().unwrap();
    let trained = |overlap: bool| {
        let out = output(&dir.path().join(format!("overlap-{overlap}")));
        let stop = AtomicBool::new(false);
        let mut ranks = on_world_with(
            layout,
            &base,
            &full,
            &train,
            &[],
            &opts,
            |ctx| {
                ctx.overlap = overlap;
                ctx.bucket_elements = 2000;
            },
            |t| {
                let mut losses = Vec::new();
                t.run(Some(&out), &stop, &mut |m| losses.push(m.loss.to_bits()))
                    .unwrap();
                losses
            },
        );
        let losses = ranks.remove(0);
        let last = checkpoint::load(
            &checkpoint::latest(&out.dir.join("checkpoints")).unwrap(),
            &model.lora_targets(),
        )
        .unwrap();
        (losses, flat(&last.lora))
    };
    let ((l1, a1), (l0, a0)) = (trained(true), trained(false));
    assert_eq!(l1, l0, "losses");
    assert_eq!(l1.len(), 2);
    assert!(
        a1.iter().zip(&a0).all(|(x, y)| x.to_bits() == y.to_bits()),
        "adapters after 2 steps differ"
    );
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
    let base = base_dir();
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
    let first = on_world(layout, &base, &full, &train, &heldout, &opts, |t| {
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
    let second = on_world(layout, &base, &full, &train, &heldout, &opts, |t| {
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

/// The FP8 fixture (block-128 E4M3 projections; head_dim 40, so tensor-parallel head cuts fall
/// off the blocks and take the dequantized-f32 fallback, expert shards stay FP8), each rank
/// loading only its shard: tp 2 × ep 2 and tp 2 × ep 4 give the single-device FP8 step's loss,
/// norm and LoRA gradients within 1e-5.
#[test]
fn fp8_shards_give_the_single_device_step() {
    let r = reference();
    let base = fixtures().join("tiny-qwen3-moe/fp8");
    let config = Qwen3MoeConfig::from_file(&base.join("config.json")).unwrap();
    let weights = Weights::open(&base, &Device::Cpu).unwrap();
    let model = Qwen3Moe::load(config, &weights, &Device::Cpu).unwrap();
    let full = adapter(&r, &model);
    let train = sequences(&r);
    let opts = options(1);
    let batch = vec![0usize, 1, 2, 3];
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
    for (world, tp, ep) in [(2, 2, 2), (4, 2, 4)] {
        let layout = Layout::new(world, tp, ep, &model.config).unwrap();
        let ranks = on_world(layout, &base, &full, &train, &[], &opts, |t| {
            t.step_gradients(&batch).unwrap()
        });
        let mut worst = 0f32;
        for (rank, got) in ranks.iter().enumerate() {
            let what = format!("{layout:?}");
            worst = worst.max(check_rank(&what, rank, got, (loss, norm), &want));
        }
        eprintln!("fp8 world {world} tp {tp} ep {ep}: loss {loss:.6}, max |Δgrad| {worst:.2e}");
    }
}
