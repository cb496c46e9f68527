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
use candle_core::Device;
use finetune_data::pack::Sequence;
use finetune_model::model::MoePath;
use finetune_model::{lora_scale, Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::{on_large_stack, AdamWConfig, LrSchedule, TrainOptions, Trainer};
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
        })?;
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
        "warmup_steps": args.warmup,
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
        })),
    });
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
        let started = std::time::Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        (p.forward, p.backward) = (forward, started.elapsed().as_secs_f64());
        p.memory = [before, after_forward, mib()];
        drop(grads);
    }
    Ok(p)
}
