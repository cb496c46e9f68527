//! `finetune plan`: the per-GPU memory budget of LoRA training (finetune_train::plan) for a
//! preset or model directory × GPU count × recipe, the layout chosen and the largest
//! micro-batch that fits.

use crate::cli::PlanArgs;
use anyhow::Result;
use finetune_model::Qwen3MoeConfig;
use finetune_train::plan::{layouts, Budget, PlanInput, WeightFormat, GIB};
use std::path::Path;

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / GIB)
}

/// `finetune plan`.
pub fn command(args: &PlanArgs) -> Result<crate::Outcome> {
    let Some(resolved) = crate::resolve(&args.recipe)? else {
        return Ok(crate::Outcome::Done);
    };
    resolved.check_model_dir()?;
    let r = &resolved.recipe;
    let config = match resolved.model_preset() {
        Some(p) => p.config(),
        None => Qwen3MoeConfig::from_file(&Path::new(&r.model.base).join("config.json"))?,
    };
    let weights = match args.weights.as_deref() {
        Some("fp8") => WeightFormat::Fp8Block128,
        Some(_) => WeightFormat::Bf16,
        None if config.quantization_config.is_some() => WeightFormat::Fp8Block128,
        None => WeightFormat::Bf16,
    };
    let input = PlanInput {
        config,
        gpus: r.train.gpus.max(1) as usize,
        gpu_mem: args.gpu_mem * GIB,
        weights,
        r: r.lora.r as usize,
        targets: r.lora.target_modules.clone(),
        seq_len: r.train.seq_len as usize,
        micro_batch: r.train.micro_batch as usize,
    };
    let all = layouts(&input);
    let best: &Budget = &all[0];
    let (total, active) = input.config.parameter_counts();
    println!(
        "plan: {} ({:.1}B parameters, {:.1}B active), {} base, LoRA r = {} on {}, {} × {} GiB, micro-batch {} × {} tokens",
        r.model.base,
        total as f64 / 1e9,
        active as f64 / 1e9,
        if weights == WeightFormat::Fp8Block128 { "FP8 block-128" } else { "bf16" },
        input.r,
        input.targets.join(","),
        input.gpus,
        args.gpu_mem,
        input.micro_batch,
        input.seq_len
    );
    println!("\n| per GPU | bytes |\n|---|---:|");
    for (name, v) in [
        ("base weights", best.weights),
        (
            &*format!(
                "LoRA ({:.0}M parameters: f32 master + grad + Adam m, v + bf16 copy)",
                best.lora_params / 1e6
            ),
            best.lora,
        ),
        (
            &*format!(
                "activations ({}{})",
                // Every rank computes in the GPU's compute dtype, bf16 (2 bytes).
                if input.activation_bytes() == 2.0 {
                    "bf16"
                } else {
                    "f32"
                },
                if best.recompute {
                    ", per-layer recompute"
                } else {
                    ""
                }
            ),
            best.activations,
        ),
        ("communication buffers", best.communication),
        ("workspace (assumed)", best.workspace),
        ("total", best.total()),
    ] {
        println!("| {name} | {} |", gib(v));
    }
    let mem = input.gpu_mem;
    let max_tokens = best.max_tokens(mem);
    let fits = best.total() <= mem;
    println!(
        "\nlayout: attention/vocabulary tensor parallel {} × experts expert parallel {}{}; {}",
        best.tp,
        best.ep,
        if best.recompute { ", recompute on" } else { "" },
        if fits {
            format!(
                "FITS: up to {max_tokens} tokens per micro-batch per GPU ({} sequences of {})",
                max_tokens / input.seq_len.max(1),
                input.seq_len
            )
        } else if max_tokens > 0 {
            format!(
                "does NOT fit {} tokens per micro-batch; at most {max_tokens} tokens",
                best.tokens
            )
        } else {
            "does NOT fit: the weights and LoRA state alone exceed the GPU".to_string()
        }
    );
    println!("\nother layouts (total per GPU for the recipe's micro-batch):");
    for b in all.iter().skip(1).take(6) {
        println!(
            "  tp {} ep {}{}: {}",
            b.tp,
            b.ep,
            if b.recompute { " recompute" } else { "" },
            gib(b.total())
        );
    }
    Ok(crate::Outcome::Done)
}
