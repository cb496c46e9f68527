//! `finetune bench train`: the speed and memory of the LoRA training loop of `finetune train`
//! (the same `Trainer::run`: forward, backward, clipping, AdamW) on synthetic token ids, for
//! `scripts/bench-gpu.sh`, which runs HF transformers + PEFT on the same checkpoint and shapes
//! in the same call and prints the ratio.
//!
//! Synthetic data: one sequence of `--seq` token ids, one document, every token a target (as the
//! PyTorch side's `labels = input_ids`); id t = (t · 2654435761 mod 2³²) mod vocab (Knuth's
//! multiplicative hash), the formula scripts/bench_gpu_train.py uses too, so both sides see the
//! same tokens and their first-step losses can be compared. The model is
//! any Hugging Face directory (bf16 or FP8 block-128); `scripts/bench_gpu_train.py make-base`
//! writes a random one with the true layer shapes of a preset and fewer layers.

use crate::cli::BenchTrainArgs;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use finetune_data::pack::Sequence;
use finetune_model::model::{AttentionPath, MoePath};
use finetune_model::{lora_scale, Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::{on_large_stack, AdamWConfig, LrSchedule, TrainOptions, Trainer};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

/// The projections `--targets all` names (attention and experts; never the router or lm_head).
const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub fn train(args: &BenchTrainArgs) -> Result<Outcome> {
    if args.seq < 2 {
        bail!("flag --seq = {}: need at least 2 tokens", args.seq);
    }
    if args.steps == 0 {
        bail!("flag --steps = 0: nothing to measure");
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(args.tf32);
    let device = if args.cpu {
        Device::Cpu
    } else if finetune_kernels::BUILT_WITH_CUDA {
        Device::new_cuda(0).context("opening CUDA device 0 (use --cpu to bench the CPU)")?
    } else {
        eprintln!("bench: this build has no CUDA: benchmarking the CPU");
        Device::Cpu
    };
    let config_path = args.model.join("config.json");
    let config = Qwen3MoeConfig::from_file(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let loading = std::time::Instant::now();
    let weights = Weights::open(&args.model, &device)?;
    let mut model = Qwen3Moe::load(config.clone(), &weights, &device)?;
    let dtype = if args.bf16 {
        // bf16 runs on the CPU only for comparisons (candle widens each product to f32): no
        // speed worth benchmarking.
        if device.is_cpu() {
            bail!("flag --bf16: bf16 compute needs a GPU to be benchmarked (on the CPU it is a slow emulation for tests); drop --bf16 or --cpu");
        }
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    };
    model.set_compute_dtype(dtype)?;
    model.set_fused_attention(args.attention.as_deref() != Some("plain"));
    if args.attention.as_deref() == Some("tensor-core") {
        finetune_kernels::attention::set_tensor_cores(true);
    }
    if let Some(name) = args.moe.as_deref() {
        let path = MoePath::from_name(name)
            .with_context(|| format!("flag --moe = {name}: not a MoE path"))?;
        model.set_moe_path(path);
    }
    if let Some(name) = args.attention_block.as_deref() {
        let path = AttentionPath::from_name(name)
            .with_context(|| format!("flag --attention-block = {name}: not an attention path"))?;
        model.set_attention_path(path);
    }
    let compute = match (args.bf16, args.tf32) {
        (true, _) => "bf16",
        (false, true) => "f32+tf32",
        (false, false) => "f32",
    };
    let load_secs = loading.elapsed().as_secs_f64();
    let targets: Vec<String> = if args.targets.iter().any(|t| t == "all") {
        ALL_TARGETS.map(String::from).to_vec()
    } else {
        args.targets.clone()
    };
    let scale = lora_scale(
        args.rank,
        args.alpha.unwrap_or(2.0 * args.rank as f64),
        false,
    );
    let lora = Lora::init(
        &model.lora_targets(),
        &targets,
        args.rank,
        scale,
        args.seed,
        &device,
    )?;
    let lora_params: usize = lora.vars().map(|v| v.elem_count()).sum();
    // What AdamW and clipping iterate over (a stack of experts' adapters is one tensor).
    let lora_tensors = lora.vars().count();
    let ids = bench_ids(args.seq, config.vocab_size);
    let sequence = Sequence {
        labels: ids.iter().map(|&i| i64::from(i)).collect(),
        position_ids: (0..args.seq as u32).collect(),
        doc_lens: vec![args.seq],
        ids,
    };
    let total_steps = args.warmup + args.steps;
    let options = TrainOptions {
        lr: 1e-4,
        schedule: LrSchedule::Constant,
        warmup: 0,
        total_steps,
        micro_batch: 1,
        grad_accum: 1,
        seed: args.seed,
        recompute: args.recompute,
        adamw: AdamWConfig::default(),
        max_grad_norm: 1.0,
        eval_every: 0,
        eval_sequences: 0,
        save_every: 0,
        keep_checkpoints: 1,
        max_bad_steps: total_steps + 1,
    };
    eprintln!(
        "bench: {} ({} layers, {} experts), {} on {:?}, seq {}, r = {} on {}, {} LoRA parameters in {} tensors, loaded in {load_secs:.1} s",
        args.model.display(),
        config.num_hidden_layers,
        config.num_experts,
        compute,
        device,
        args.seq,
        args.rank,
        targets.join(","),
        lora_params,
        lora_tensors
    );
    let stop = AtomicBool::new(false);
    let mut steps = Vec::new();
    let mut profile = None;
    let profiled = sequence.clone();
    on_large_stack(|| -> Result<()> {
        let mut trainer = Trainer::new(&model, lora, vec![sequence], Vec::new(), options)?;
        let mut last = 0.0;
        // The measured steps are the CUDA profiler range (tools/kernel-profile then counts only
        // them; a no-op without a profiler or on the CPU). Best effort: a failed mark is said.
        let mark = |start: bool| {
            if let Err(e) = finetune_kernels::device::profiler_range(&device, start) {
                eprintln!("bench: warning: profiler range mark failed: {e}");
            }
        };
        if args.warmup == 0 {
            mark(true);
        }
        trainer.run(None, &stop, &mut |m| {
            let secs = m.elapsed_secs - last;
            last = m.elapsed_secs;
            eprintln!(
                "bench: step {}/{}  loss {:.4}  {:.3} s  {:.0} tokens/s{}",
                m.step,
                m.total_steps,
                m.loss,
                secs,
                m.tokens as f64 / secs,
                if m.step <= args.warmup {
                    "  (warm-up)"
                } else {
                    ""
                }
            );
            steps.push((m.step, secs, m.loss, m.tokens));
            if m.step == args.warmup {
                mark(true);
            }
        })?;
        mark(false);
        if args.profile {
            profile = Some(forward_backward_secs(
                &model,
                trainer.lora(),
                &profiled,
                &device,
            )?);
        }
        Ok(())
    })?;
    let measured: Vec<f64> = steps
        .iter()
        .filter(|s| s.0 > args.warmup)
        .map(|s| s.1)
        .collect();
    let mut sorted = measured.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let tokens_per_sec = args.seq as f64 / median;
    let result = serde_json::json!({
        "side": "finetune",
        "model": args.model.display().to_string(),
        "device": format!("{device:?}"),
        "compute": compute,
        "layers": config.num_hidden_layers,
        "seq": args.seq,
        "rank": args.rank,
        "targets": targets,
        "lora_params": lora_params,
        "lora_tensors": lora_tensors,
        "recompute": args.recompute,
        "moe": args.moe.clone().or_else(|| std::env::var("FINETUNE_MOE_PATH").ok()).unwrap_or_else(|| (if device.is_cuda() { "grouped" } else { "per-expert" }).into()),
        "attention": args.attention.as_deref().unwrap_or("fused"),
        "attention_block": args.attention_block.clone().or_else(|| std::env::var("FINETUNE_ATTENTION_BLOCK").ok()).unwrap_or_else(|| "chain".into()),
        "warmup_steps": args.warmup,
        // The opt-in GPU paths this run had on (environment or flags).
        "opt_ins": {
            "attention_tensor_cores": finetune_kernels::attention::tensor_cores(),
            "lora_linear_gpu": finetune_kernels::lora_linear::on_gpu(),
            "grouped_gemm_cublas": finetune_kernels::grouped_linear::cublas_grouped(),
            "fp8_gemm": finetune_kernels::fp8_linear::enabled(),
            "route_on_device": finetune_kernels::moe_route::on_device(),
        },
        "step_secs": measured,
        "median_step_secs": median,
        "tokens_per_sec": tokens_per_sec,
        "losses": steps.iter().map(|s| s.2).collect::<Vec<_>>(),
        "load_secs": load_secs,
        "profile": profile.map(|p: Profile| serde_json::json!({
            "forward_and_loss_secs": p.forward,
            "backward_secs": p.backward,
            "rest_of_step_secs": median - p.forward - p.backward,
            "forward_phases": p.phases.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "gpu_mib_before": p.memory[0],
            "gpu_mib_after_forward": p.memory[1],
            "gpu_mib_after_backward": p.memory[2],
            "graph_retained_mib": p.graph.bytes as f64 / 1048576.0,
            "node_saved_mib": p.node_saved_bytes as f64 / 1048576.0,
            "graph_retained_storages": p.graph.storages,
            "graph_retained_largest": p.graph.largest.iter().map(|(l, n, b)| serde_json::json!({
                "tensor": l, "count": n, "mib": *b as f64 / 1048576.0,
            })).collect::<Vec<_>>(),
        })),
    });
    if let Some(p) = &result["profile"].as_object() {
        eprintln!(
            "bench: the autograd graph holds {:.1} MiB in {} storages at the backward's start (and the hand-written nodes {:.1} MiB inside their ops); largest:",
            p["graph_retained_mib"].as_f64().unwrap_or(0.0),
            p["graph_retained_storages"],
            p["node_saved_mib"].as_f64().unwrap_or(0.0)
        );
        for g in p["graph_retained_largest"]
            .as_array()
            .into_iter()
            .flatten()
            .take(8)
        {
            eprintln!(
                "bench:   {:>9.1} MiB  {:>4} × {}",
                g["mib"].as_f64().unwrap_or(0.0),
                g["count"],
                g["tensor"].as_str().unwrap_or("")
            );
        }
    }
    println!("{}", serde_json::to_string(&result)?);
    if let Some(path) = &args.json {
        crate::run_dir::write_atomic(
            path,
            (serde_json::to_string_pretty(&result)? + "\n").as_bytes(),
        )?;
    }
    eprintln!(
        "bench: median step {median:.3} s = {tokens_per_sec:.0} tokens/s over {} steps",
        measured.len()
    );
    Ok(Outcome::Done)
}

/// The benchmark's token ids: t ↦ (t · 2654435761 mod 2³²) mod vocab.
pub fn bench_ids(seq: usize, vocab: usize) -> Vec<u32> {
    (0..seq as u32)
        .map(|t| t.wrapping_mul(2_654_435_761) % vocab as u32)
        .collect()
}

/// What `--profile` measures on one more step.
struct Profile {
    /// Seconds of the forward + loss and of the backward (the second of two tries, the device
    /// synchronized around each phase).
    forward: f64,
    backward: f64,
    /// A third forward with its phases timed one by one (each between synchronizations, so
    /// their sum exceeds `forward`), and the MoE row counters.
    phases: Vec<(&'static str, f64)>,
    /// GPU memory in use (MiB) before the step, after the forward + loss, after the backward.
    memory: [Option<f64>; 3],
    /// What the autograd graph of the loss keeps alive for the backward ([`GraphRetained`]).
    graph: GraphRetained,
    /// What the hand-written nodes keep inside their ops at the same moment, which the graph
    /// walk cannot see (`finetune_kernels::saved`).
    node_saved_bytes: usize,
}

/// The storages the autograd graph of a loss holds when the backward starts: every tensor of
/// the graph that is not a variable (candle keeps each op's inputs, so every intermediate that
/// leads to the loss stays allocated until the backward has passed it), counted once per
/// storage (views share one), bytes from each view's extent. Device-independent: on the CPU it
/// shows what the same forward holds on a GPU (in the CPU's dtypes). Frozen weights are not
/// graph nodes and are not counted; tensors an op holds that do not track gradients (index
/// tensors, masks) are not either.
#[derive(Default)]
struct GraphRetained {
    bytes: u64,
    storages: usize,
    /// The largest groups: "dtype [dims]" of each storage's view nearest the loss, how many
    /// storages, their bytes.
    largest: Vec<(String, usize, u64)>,
}

fn graph_retained(loss: &Tensor) -> GraphRetained {
    let mut storages: HashMap<usize, (u64, String)> = HashMap::new();
    for node in loss.sorted_nodes() {
        if node.is_variable() {
            continue;
        }
        let (storage, layout) = node.storage_and_layout();
        let key = std::ptr::from_ref::<candle_core::Storage>(&storage).addr();
        // The view's extent: its last element's offset + 1.
        let last: usize = layout
            .dims()
            .iter()
            .zip(layout.stride())
            .map(|(&d, &st)| d.saturating_sub(1) * st)
            .sum();
        let extent = if node.elem_count() == 0 {
            0
        } else {
            layout.start_offset() + last + 1
        };
        let bytes = (extent * node.dtype().size_in_bytes()) as u64;
        let label = format!("{:?} {:?}", node.dtype(), node.dims());
        let e = storages.entry(key).or_insert((0, label));
        e.0 = e.0.max(bytes);
    }
    let mut groups: HashMap<String, (usize, u64)> = HashMap::new();
    for (bytes, label) in storages.values() {
        let g = groups.entry(label.clone()).or_default();
        g.0 += 1;
        g.1 += bytes;
    }
    let mut largest: Vec<(String, usize, u64)> =
        groups.into_iter().map(|(l, (n, b))| (l, n, b)).collect();
    largest.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    largest.truncate(15);
    GraphRetained {
        bytes: storages.values().map(|v| v.0).sum(),
        storages: storages.len(),
        largest,
    }
}

fn forward_backward_secs(
    model: &Qwen3Moe,
    lora: &Lora,
    sequence: &Sequence,
    device: &Device,
) -> Result<Profile> {
    let mib = || finetune_kernels::device::gpu_memory_used(device).map(|b| b as f64 / 1048576.0);
    let mut p = Profile {
        forward: 0.0,
        backward: 0.0,
        phases: Vec::new(),
        memory: [None; 3],
        graph: GraphRetained::default(),
        node_saved_bytes: 0,
    };
    for attempt in 0..3 {
        let timed_phases = attempt == 2;
        model.set_phase_timing(timed_phases);
        device.synchronize()?;
        let before = mib();
        let started = std::time::Instant::now();
        // The trainer's forward (Trainer::run without recompute): layers, then lm_head fused
        // with the loss, so that no [T, vocab] logits distort the times and the memory.
        let ctx = model.sequence_context(&sequence.position_ids, 0)?;
        let mut x = model.embed_tokens(&sequence.ids)?;
        for layer in 0..model.num_layers() {
            x = model.layer_forward(layer, &x, &ctx, Some(lora), None)?;
        }
        let loss = model.head_loss_sum(&x, &sequence.labels)?;
        device.synchronize()?;
        let forward = started.elapsed().as_secs_f64();
        let after_forward = mib();
        if timed_phases {
            p.phases = model.phase_times();
            model.set_phase_timing(false);
            break;
        }
        if attempt == 1 {
            p.graph = graph_retained(&loss);
            p.node_saved_bytes = finetune_kernels::saved::held_bytes();
        }
        let started = std::time::Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        (p.forward, p.backward) = (forward, started.elapsed().as_secs_f64());
        p.memory = [before, after_forward, mib()];
        drop(grads);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    /// x (a variable, not counted) · w (frozen, not a graph node) = y [4, 5] f32; a reshaped view
    /// of y (same storage, counted once); its sum (a scalar). The graph holds y and the sum:
    /// 80 + 4 bytes in 2 storages.
    #[test]
    fn graph_retained_counts_each_storage_once_and_skips_variables_and_frozen_inputs() {
        let dev = Device::Cpu;
        let x = Var::ones((4, 3), DType::F32, &dev).unwrap();
        let w = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
        let y = x.as_tensor().matmul(&w).unwrap();
        let loss = y.reshape(20).unwrap().sum_all().unwrap();
        let g = graph_retained(&loss);
        assert_eq!((g.bytes, g.storages), (84, 2));
        // Labelled by the view nearest the loss (the reshape).
        assert_eq!(g.largest[0], ("F32 [20]".to_string(), 1, 80));
        // A bigger intermediate shows up first, with its bytes.
        let big = (x
            .as_tensor()
            .matmul(&Tensor::ones((3, 100), DType::F32, &dev).unwrap()))
        .unwrap()
        .sum_all()
        .unwrap();
        let g = graph_retained(&(loss + big).unwrap());
        assert_eq!(g.largest[0], ("F32 [4, 100]".to_string(), 1, 1600));
        assert_eq!(g.bytes, 80 + 4 + 1600 + 4 + 4);
    }
}
