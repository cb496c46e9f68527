//! Per-rank sharded loading of the base weights (`parallel::load_rank_model`), checked against
//! the whole model loaded on its own:
//! - each rank of a layout holds exactly its slices (tensor names, shapes and values): its
//!   experts whole and no other, the q/k/v rows and o_proj columns of its heads, its vocabulary
//!   rows of embed_tokens / lm_head under vocabulary parallelism, everything else whole; stored
//!   dtypes kept (FP8 with its cut scales), except FP8 cuts off 128-block boundaries, which hold
//!   the dequantized f32 slice;
//! - the experts held by one replica's ranks add up to the whole model's expert bytes;
//! - a checkpoint split over several files (an index) gives the same slices as one file;
//! - a shard refuses, naming what it holds, what needs more than it holds;
//! - `finetune plan`'s per-GPU base-weight bytes equal the bytes a sharded load holds, for the
//!   tiny preset's shapes in bf16 and in FP8 (a head_dim of 128, so that head cuts fall on
//!   blocks as in the Qwen3-Coder checkpoints).
//!
//! Models: the bf16 and FP8 tiny fixtures (head_dim 40: FP8 head cuts take the f32 fallback),
//! and random checkpoints of the tiny preset's shapes written here.

use candle_core::{DType, Device, Tensor};
use finetune_model::dropout::Rows;
use finetune_model::{BaseShard, BaseWeight, Lora, Preset, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::parallel::{load_rank_model, CpuComms, Layout, RankContext};
use finetune_train::plan::{budget, PlanInput, WeightFormat};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe")
}

/// Every rank's context of `layout` (the communicators are made but never used).
fn contexts(layout: Layout, config: &Qwen3MoeConfig, vocab_parallel: bool) -> Vec<RankContext> {
    let full = Lora::init(
        &Qwen3Moe::targets_of(config),
        &["q_proj".to_string()],
        2,
        1.0,
        0,
        &Device::Cpu,
    )
    .unwrap();
    CpuComms::for_layout(&layout, Duration::from_secs(5))
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let mut ctx =
                RankContext::new(layout, rank, c.into_comms(), &full, config.num_experts).unwrap();
            ctx.vocab_parallel = vocab_parallel;
            ctx
        })
        .collect()
}

fn tensors(model: &Qwen3Moe) -> BTreeMap<String, Tensor> {
    let list = model.base_tensors();
    let n = list.len();
    let map: BTreeMap<String, Tensor> = list.into_iter().collect();
    assert_eq!(map.len(), n, "a tensor is listed twice");
    map
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The f32 values of weight `name` of `map` (FP8 values times their block scales).
fn values(map: &BTreeMap<String, Tensor>, name: &str) -> Tensor {
    let t = &map[name];
    match map.get(&format!("{name}_scale_inv")) {
        Some(s) => BaseWeight::Fp8 {
            q: t.clone(),
            scale_inv: s.clone(),
        }
        .dequantize(DType::F32)
        .unwrap(),
        None => t.to_dtype(DType::F32).unwrap(),
    }
}

fn expert_of(name: &str) -> Option<usize> {
    name.split(".mlp.experts.")
        .nth(1)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Which slice of the whole weight `name` a rank holding `shard` has: (dimension, range), or
/// `None` for the whole tensor. Written from the layout rules, independently of the loader.
fn expected_cut(
    name: &str,
    shard: &BaseShard,
    c: &Qwen3MoeConfig,
) -> Option<(usize, Range<usize>)> {
    let d = c.head_dim();
    let group = c.num_attention_heads / c.num_key_value_heads;
    let (h0, h1) = (shard.heads.start, shard.heads.end);
    if name.ends_with("self_attn.q_proj.weight") {
        Some((0, h0 * d..h1 * d))
    } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.v_proj.weight")
    {
        Some((0, h0 / group * d..h1 / group * d))
    } else if name.ends_with("self_attn.o_proj.weight") {
        Some((1, h0 * d..h1 * d))
    } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        Some((0, shard.vocab.clone()))
    } else {
        None
    }
}

/// Loads every rank of `layout` from `dir` and checks each against `whole` (module doc);
/// returns the bytes each rank holds.
fn check_layout(dir: &Path, whole: &Qwen3Moe, layout: Layout, vocab_parallel: bool) -> Vec<usize> {
    let c = &whole.config;
    let want_all = tensors(whole);
    let is_scale = |n: &str| n.ends_with("_scale_inv");
    let whole_expert_bytes: usize = want_all
        .iter()
        .filter(|(n, _)| expert_of(n).is_some())
        .map(|(_, t)| bytes(t))
        .sum();
    let mut replica0_expert_bytes = 0;
    let mut held = Vec::new();
    let mut fallbacks = 0;
    for ctx in contexts(layout, c, vocab_parallel) {
        let k = ctx.coords;
        let shard = ctx.base_shard(c);
        // The shard, from the layout's rules: expert shard a·tp + t, heads of t, vocabulary
        // rows of t (the first V mod tp shards one row longer) under vocabulary parallelism.
        let per = c.num_experts / layout.ep;
        let s = k.a * layout.tp + k.t;
        assert_eq!(shard.experts, s * per..(s + 1) * per, "{layout:?} {k:?}");
        let hp = c.num_attention_heads / layout.tp;
        assert_eq!(shard.heads, k.t * hp..(k.t + 1) * hp);
        if vocab_parallel && layout.tp > 1 {
            let (base, extra) = (c.vocab_size / layout.tp, c.vocab_size % layout.tp);
            let start = k.t * base + k.t.min(extra);
            assert_eq!(shard.vocab, start..start + base + usize::from(k.t < extra));
        } else {
            assert_eq!(shard.vocab, 0..c.vocab_size);
        }
        let model = load_rank_model(dir, c, &ctx, &Device::Cpu).unwrap();
        assert_eq!(model.shard(), &shard);
        let got = tensors(&model);
        // Names: every whole tensor but the other shards' experts (scales aside: an FP8 cut
        // off block boundaries has none).
        let want_names: BTreeSet<&String> = want_all
            .keys()
            .filter(|n| !is_scale(n))
            .filter(|n| expert_of(n).is_none_or(|e| shard.experts.contains(&e)))
            .collect();
        let got_names: BTreeSet<&String> = got.keys().filter(|n| !is_scale(n)).collect();
        assert_eq!(got_names, want_names, "{layout:?} rank {}", k.rank);
        for name in got_names {
            let cut = expected_cut(name, &shard, c);
            let mut want = values(&want_all, name);
            if let Some((dim, r)) = &cut {
                want = want.narrow(*dim, r.start, r.len()).unwrap();
            }
            let g = values(&got, name);
            assert_eq!(g.dims(), want.dims(), "{layout:?} rank {}: {name}", k.rank);
            let (a, b): (Vec<f32>, Vec<f32>) = (
                g.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(a == b, "{layout:?} rank {}: {name} values differ", k.rank);
            // Stored dtype kept, except an FP8 cut off 128-block boundaries (dequantized f32).
            let scale = format!("{name}_scale_inv");
            let fp8 = want_all.contains_key(&scale);
            let off_blocks = cut.as_ref().is_some_and(|(dim, r)| {
                let len = want_all[name.as_str()].dims()[*dim];
                fp8 && *r != (0..len) && (r.start % 128 != 0 || (r.end % 128 != 0 && r.end != len))
            });
            if off_blocks {
                assert_eq!(got[name.as_str()].dtype(), DType::F32, "{name}");
                assert!(!got.contains_key(&scale), "{name}");
                fallbacks += 1;
            } else {
                assert_eq!(
                    got[name.as_str()].dtype(),
                    want_all[name.as_str()].dtype(),
                    "{layout:?} rank {}: {name}",
                    k.rank
                );
                assert_eq!(got.contains_key(&scale), fp8, "{name}");
            }
        }
        let experts: usize = got
            .iter()
            .filter(|(n, _)| expert_of(n).is_some())
            .map(|(_, t)| bytes(t))
            .sum();
        assert_eq!(experts * layout.ep, whole_expert_bytes, "{layout:?} {k:?}");
        if k.d == 0 {
            replica0_expert_bytes += experts;
        }
        held.push(got.values().map(bytes).sum());
    }
    // One replica's ranks hold every expert exactly once (a tp group's ranks hold different
    // experts: shard a·tp + t).
    assert_eq!(replica0_expert_bytes, whole_expert_bytes, "{layout:?}");
    let fp8 = want_all.keys().any(|n| is_scale(n));
    eprintln!(
        "{}: {layout:?} vocabulary parallel {vocab_parallel}: bytes per rank {held:?} of {} \
         whole, experts {whole_expert_bytes} over the replica, {fallbacks} FP8 f32 fallbacks",
        dir.display(),
        want_all.values().map(bytes).sum::<usize>(),
    );
    if !fp8 {
        assert_eq!(fallbacks, 0);
    }
    held
}

fn load_whole(dir: &Path) -> Qwen3Moe {
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
    let w = Weights::open(dir, &Device::Cpu).unwrap();
    Qwen3Moe::load(config, &w, &Device::Cpu).unwrap()
}

/// The bf16 and FP8 fixtures (4 experts, 4 heads over 2 key/value heads of 40, vocabulary 300,
/// a dense layer) under ep 2, ep 4, tp 2, dp 2, ep 2 × dp 2, tp 2 × ep 4, tp 2 × dp 2, with and
/// without vocabulary parallelism.
#[test]
fn each_rank_holds_exactly_its_slices_of_the_fixtures() {
    for kind in ["bf16", "fp8"] {
        let dir = fixtures().join(kind);
        let whole = load_whole(&dir);
        let mut fp8_fallbacks_seen = false;
        for (world, tp, ep, vp) in [
            (2, 1, 2, true),
            (4, 1, 4, true),
            (2, 2, 2, true),
            (2, 2, 2, false),
            (2, 1, 1, true),
            (4, 1, 2, true),
            (4, 2, 4, true),
            (4, 2, 2, true),
        ] {
            let layout = Layout::new(world, tp, ep, &whole.config).unwrap();
            let held = check_layout(&dir, &whole, layout, vp);
            let all: usize = tensors(&whole).values().map(bytes).sum();
            if ep > 1 || tp > 1 {
                assert!(
                    held.iter().all(|&b| b < all),
                    "{layout:?}: {held:?} of {all}"
                );
            } else {
                assert!(held.iter().all(|&b| b == all));
            }
            fp8_fallbacks_seen |= kind == "fp8" && tp > 1;
        }
        assert_eq!(fp8_fallbacks_seen, kind == "fp8");
    }
}

/// A random checkpoint of `config` in `dir`: bf16, or with every projection (q/k/v/o and the
/// experts' and dense MLPs' gate/up/down) in FP8 block-128 with f32 scales and the rest bf16,
/// the Qwen3-Coder-FP8 layout.
fn write_checkpoint(config: &Qwen3MoeConfig, dir: &Path, fp8: bool) {
    finetune_model::init::write_random_checkpoint(config, 3, dir).unwrap();
    if !fp8 {
        return;
    }
    let path = dir.join("model.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let (proj, rest): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(n, _)| n.ends_with("_proj.weight"));
    let mut out = finetune_model::fp8::quantize(&proj).unwrap();
    out.extend(rest);
    candle_core::safetensors::save(&out, &path).unwrap();
}

/// `finetune plan`'s base-weight bytes per GPU (`plan::budget(..).weights`) against the bytes
/// each rank of the layout holds after a sharded load: the tiny preset's shapes (2 layers, one
/// dense), bf16 and FP8 (head_dim 128 so that FP8 head cuts fall on blocks), every layout of 8
/// GPUs the planner considers.
#[test]
fn plan_weights_equal_the_bytes_a_sharded_load_holds() {
    let mut config = Preset::Tiny.config();
    config.num_hidden_layers = 2;
    config.mlp_only_layers = vec![1];
    config.head_dim = Some(128);
    config.vocab_size = 1024;
    for (fp8, format) in [
        (false, WeightFormat::Bf16),
        (true, WeightFormat::Fp8Block128),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(&config, dir.path(), fp8);
        let whole = load_whole(dir.path());
        let input = PlanInput {
            config: whole.config.clone(),
            gpus: 8,
            gpu_mem: 80.0 * finetune_train::plan::GIB,
            weights: format,
            r: 16,
            targets: vec!["q_proj".into()],
            seq_len: 128,
            micro_batch: 1,
        };
        let mut checked = 0;
        for b in finetune_train::plan::layouts(&input)
            .into_iter()
            .filter(|b| !b.recompute)
        {
            let layout = Layout::new(8, b.tp, b.ep, &whole.config).unwrap();
            let held = check_layout(dir.path(), &whole, layout, true);
            let planned = budget(&input, b.tp, b.ep, false).weights;
            for (rank, &h) in held.iter().enumerate() {
                assert_eq!(
                    h as f64, planned,
                    "fp8 {fp8} tp {} ep {} rank {rank}: held {h} bytes, planned {planned}",
                    b.tp, b.ep
                );
            }
            eprintln!(
                "plan fp8 {fp8} tp {} ep {}: {planned} bytes per GPU planned = held",
                b.tp, b.ep
            );
            checked += 1;
        }
        // tp ∈ {1, 2} (4 heads, 2 key/value heads) × ep ∈ {1, 2, 4, 8} (8 experts), ep ≥ tp.
        assert_eq!(checked, 7);
    }
}

/// A checkpoint split over several files with `model.safetensors.index.json` (how the 480B
/// ships: 49 files) gives every rank the same slices as the single file: the bf16 fixture's
/// tensors dealt over three files, loaded at tp 2 × ep 2 and ep 4.
#[test]
fn a_sharded_checkpoint_loads_the_same_slices_as_one_file() {
    let one = fixtures().join("bf16");
    let all = candle_core::safetensors::load(one.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(one.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut files: Vec<std::collections::HashMap<String, Tensor>> = vec![Default::default(); 3];
    let mut map = serde_json::Map::new();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        files[i % 3].insert(name.clone(), all[name].clone());
        map.insert(
            name.clone(),
            serde_json::json!(format!("model-{:05}-of-00003.safetensors", i % 3 + 1)),
        );
    }
    for (i, f) in files.iter().enumerate() {
        let path = dir
            .path()
            .join(format!("model-{:05}-of-00003.safetensors", i + 1));
        candle_core::safetensors::save(f, path).unwrap();
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let config = Qwen3MoeConfig::from_file(&one.join("config.json")).unwrap();
    for (world, tp, ep) in [(2, 2, 2), (4, 1, 4)] {
        let layout = Layout::new(world, tp, ep, &config).unwrap();
        for ctx in contexts(layout, &config, true) {
            let a = load_rank_model(&one, &config, &ctx, &Device::Cpu).unwrap();
            let b = load_rank_model(dir.path(), &config, &ctx, &Device::Cpu).unwrap();
            let (a, b) = (tensors(&a), tensors(&b));
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{layout:?}"
            );
            for (name, t) in &a {
                let u = &b[name];
                assert_eq!(t.dims(), u.dims(), "{name}");
                assert_eq!(t.dtype(), u.dtype(), "{name}");
                let (x, y): (Vec<f32>, Vec<f32>) = (
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                    u.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                );
                assert!(x == y, "{layout:?} rank {}: {name}", ctx.rank());
            }
        }
    }
}

/// A rank's shard refuses what needs the whole model, naming what it holds: the whole decoder
/// layer, an expert of another shard, heads it does not hold, full-parameter training; a shard
/// that splits a key/value group is refused at load; and a trainer is refused a model that lacks
/// its rank's shard.
#[test]
fn a_shard_refuses_what_it_does_not_hold() {
    let dir = fixtures().join("bf16");
    let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
    let layout = Layout::new(2, 2, 2, &config).unwrap();
    let ctxs = contexts(layout, &config, true);
    let mut m = load_rank_model(&dir, &config, &ctxs[1], &Device::Cpu).unwrap();
    let x = Tensor::zeros((3, config.hidden_size), DType::F32, &Device::Cpu).unwrap();
    let ctx = m.sequence_context(&[0, 1, 2], 0).unwrap();
    let e = m
        .layer_forward(0, &x, &ctx, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs the whole model") && e.contains("experts 2..4"),
        "{e}"
    );
    let e = m
        .expert_forward(0, 1, &x, None, &Rows::Sequence(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expert 1 of layer 0") && e.contains("2..4"),
        "{e}"
    );
    assert!(m.expert_forward(0, 3, &x, None, &Rows::Sequence(0)).is_ok());
    let e = m
        .attention_heads(0, &x, &ctx, None, 0..2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("heads 0..2") && e.contains("holds heads 2..4"),
        "{e}"
    );
    assert!(m.attention_heads(0, &x, &ctx, None, 2..4).is_ok());
    let e = m.head_loss_sum(&x, &[1, 2, 3]).unwrap_err().to_string();
    assert!(
        e.contains("whole vocabulary") && e.contains("150..300"),
        "{e}"
    );
    assert!(m.make_trainable().is_err());
    // The LoRA targets stay the whole model's.
    assert_eq!(m.lora_targets(), load_whole(&dir).lora_targets());
    // Heads 1..3 split both key/value groups of 2 query heads.
    let w = Weights::open(&dir, &Device::Cpu).unwrap();
    let mut bad = BaseShard::whole(&config);
    bad.heads = 1..3;
    let e = Qwen3Moe::load_shard(config.clone(), &w, &Device::Cpu, &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("heads 1..3") && e.contains("whole groups"),
        "{e}"
    );
    // Rank 0 handed rank 1's shard.
    let r = finetune_train::Trainer::new_parallel(
        &m,
        &Lora::init(
            &Qwen3Moe::targets_of(&config),
            &["q_proj".to_string()],
            2,
            1.0,
            0,
            &Device::Cpu,
        )
        .unwrap(),
        vec![finetune_train::parallel::RankContext::padding()],
        vec![],
        finetune_train::TrainOptions {
            lr: 1e-3,
            schedule: finetune_train::LrSchedule::Constant,
            warmup: 0,
            total_steps: 1,
            micro_batch: 1,
            grad_accum: 1,
            seed: 1,
            recompute: false,
            adamw: finetune_train::AdamWConfig::default(),
            max_grad_norm: 1.0,
            eval_every: 0,
            eval_sequences: 0,
            save_every: 0,
            keep_checkpoints: 1,
            max_bad_steps: 1,
        },
        contexts(layout, &config, true).remove(0),
    );
    let e = r.err().unwrap().to_string();
    assert!(e.contains("rank 0") && e.contains("needs"), "{e}");
}
