//! `finetune export`: a run's adapter → the per-expert PEFT layout (vLLM, SGLang), the fused
//! PEFT layout (transformers ≥ 5 + PEFT), or a merged checkpoint, each written atomically, and
//! the commands that serve it.

use crate::cli::ExportArgs;
use crate::recipe::{ExportFormat, Origin, ResolvedRecipe};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use finetune_export::{adapter, fused, merge, serve, write_dir_atomically, Source};
use std::path::{Path, PathBuf};

/// The name of a format's directory under `<RUN>/export/` (as spelled on the command line).
pub fn format_name(format: ExportFormat) -> &'static str {
    match format {
        ExportFormat::Peft => "peft",
        ExportFormat::PeftFused => "peft-fused",
        ExportFormat::Merged => "merged",
    }
}

/// The base model directory: `--model` (or the recipe's model.base when a file or flag set
/// it), else `<RUN>/base`, else the model.base recorded in the run's manifest.
fn base_dir(resolved: &ResolvedRecipe, run: Option<&Path>) -> Result<PathBuf> {
    let origin = resolved.origin("model.base");
    if origin != Origin::Default {
        if let Some(preset) = resolved.model_preset() {
            bail!(
                "{origin}: model.base: `{preset}` is a preset; export needs the Hugging Face \
                 directory of the base the adapter was trained on (--model DIR{})",
                if run.is_some() {
                    ", or leave it out to use <RUN>/base"
                } else {
                    ""
                }
            );
        }
        resolved.check_model_dir()?;
        return Ok(PathBuf::from(&resolved.recipe.model.base));
    }
    if let Some(run) = run {
        let base = run.join("base");
        if base.join("config.json").is_file() {
            return Ok(base);
        }
        let manifest = run.join(crate::run_dir::MANIFEST);
        if let Ok(text) = std::fs::read_to_string(&manifest) {
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", manifest.display()))?;
            if let Some(base) = json["recipe"]["model"]["base"].as_str() {
                if Path::new(base).join("config.json").is_file() {
                    return Ok(PathBuf::from(base));
                }
            }
        }
    }
    bail!(
        "flag --model: required: the Hugging Face directory of the base model the adapter was \
         trained on{}",
        match run {
            Some(run) => format!(
                " ({} has no base/ and its manifest names no model directory)",
                run.display()
            ),
            None => String::new(),
        }
    )
}

/// Refuses an output directory that holds (or is) one of the inputs: replacing it would delete them.
fn check_out_is_not_an_input(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(out_abs) = out.canonicalize() else {
        return Ok(()); // does not exist yet, so it holds nothing
    };
    for (what, input) in inputs {
        if let Ok(input_abs) = input.canonicalize() {
            if input_abs.starts_with(&out_abs) {
                bail!(
                    "flag --out: {} holds the {what} {}; exporting there would replace it",
                    out.display(),
                    input.display()
                );
            }
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Exports `source` in `format` into `out` and prints where, with the commands that serve it.
pub fn export_one(
    resolved: &ResolvedRecipe,
    source: &Source,
    format: ExportFormat,
    out: &Path,
) -> Result<()> {
    let e = &resolved.recipe.export;
    let name = &e.adapter_name;
    let base = absolute(&source.base_dir);
    match format {
        ExportFormat::Peft => {
            let report =
                write_dir_atomically(out, e.force, |dir| adapter::export_peft(source, dir))?;
            let out = absolute(out);
            println!(
                "export: peft adapter (r = {}, {} modules) in {}",
                report.r,
                report.modules,
                out.display()
            );
            if !report.filled.is_empty() {
                eprintln!(
                    "export: note: {} projections the adapter leaves out were written with zero \
                     A and B (every expert needs gate, up and down for vLLM); the model computes \
                     the same",
                    report.filled.len()
                );
            }
            if !report.dense_mlp_layers.is_empty() {
                eprintln!(
                    "export: note: PEFT 0.21 with transformers 5 drops the adapters of the dense \
                     MLP layers {:?} when it loads this layout (it retargets gate/up/down_proj to \
                     the fused experts); vLLM and SGLang load them. For transformers + PEFT use \
                     --format peft-fused.",
                    report.dense_mlp_layers
                );
            }
            if source.meta.use_rslora && source.lora.names().any(|n| n.contains(".mlp.experts.")) {
                eprintln!(
                    "export: note: PEFT 0.21 with transformers 5 fuses the experts' gate/up of an \
                     rsLoRA adapter in this layout with 2 x lora_alpha, which scales them sqrt(2) \
                     too much; for transformers + PEFT use --format peft-fused."
                );
            }
            println!(
                "  vLLM:   {}",
                serve::vllm_adapter(&base, name, &out, report.r)
            );
            println!(
                "  SGLang: {}",
                serve::sglang_adapter(&base, name, &out, report.r)
            );
        }
        ExportFormat::PeftFused => {
            let report =
                write_dir_atomically(out, e.force, |dir| fused::export_fused(source, dir))?;
            let out = absolute(out);
            println!(
                "export: peft-fused adapter (r = {}{}, {} tensors) for transformers >= 5 + PEFT in {}",
                report.r,
                report
                    .gate_up_rank
                    .map(|g| format!("; fused experts' gate_up_proj rank {g}"))
                    .unwrap_or_default(),
                report.tensors,
                out.display()
            );
            println!("  PEFT (Python): {}", serve::peft_load(&base, &out));
        }
        ExportFormat::Merged => {
            let dtype: merge::MergedDtype = e.merged_dtype.into();
            let report = write_dir_atomically(out, e.force, |dir| {
                merge::write_merged(
                    &source.base_dir,
                    &source.lora,
                    dtype,
                    dir,
                    merge::DEFAULT_SHARD_BYTES,
                )
            })?;
            let out = absolute(out);
            println!(
                "export: merged {} checkpoint ({} tensors, {} adapted projections merged{}, {} \
                 shard{}, {:.1} MB) in {}",
                match dtype {
                    merge::MergedDtype::Bf16 => "bf16",
                    merge::MergedDtype::F32 => "f32",
                    merge::MergedDtype::Fp8 => "FP8 (E4M3, 128x128 blocks)",
                },
                report.tensors,
                report.merged,
                if dtype == merge::MergedDtype::Fp8 {
                    format!(", {} projections quantized afresh", report.requantized)
                } else {
                    String::new()
                },
                report.shards,
                if report.shards == 1 { "" } else { "s" },
                report.bytes as f64 / 1e6,
                out.display()
            );
            println!("  vLLM:   {}", serve::vllm_model(&out));
            println!("  SGLang: {}", serve::sglang_model(&out));
        }
    }
    Ok(())
}

/// The export stage of the main job: the recipe's formats into `<run>/export/<format>/`.
pub fn export_into(
    resolved: &ResolvedRecipe,
    run_dir: &Path,
    base: &Path,
    adapter: &Path,
) -> Result<()> {
    let source = Source::read(adapter, base)?;
    for format in formats(resolved) {
        let out = run_dir.join("export").join(format_name(format));
        export_one(resolved, &source, format, &out)
            .with_context(|| format!("export --format {}", format_name(format)))?;
    }
    Ok(())
}

/// The recipe's formats, each once, in their order.
fn formats(resolved: &ResolvedRecipe) -> Vec<ExportFormat> {
    let mut formats: Vec<ExportFormat> = Vec::new();
    for f in &resolved.recipe.export.formats {
        if !formats.contains(f) {
            formats.push(*f);
        }
    }
    formats
}

/// `finetune export`.
pub fn command(args: &ExportArgs) -> Result<Outcome> {
    let Some(resolved) = crate::resolve(&args.recipe)? else {
        return Ok(Outcome::Done);
    };
    let run = args.run.as_deref();
    if let Some(run) = run {
        if !run.is_dir() {
            bail!("flag --run: {} is not a directory", run.display());
        }
    }
    let adapter = match (&args.adapter, run) {
        (Some(a), _) => a.clone(),
        (None, Some(run)) => run.join("adapter"),
        (None, None) => bail!(
            "flag --run: required: the run directory to export from (or give --adapter DIR, \
             --model DIR and --out DIR)"
        ),
    };
    if !adapter.join("adapter_config.json").is_file() {
        bail!(
            "{}: no adapter_config.json: expected a PEFT adapter directory (flag --adapter{})",
            adapter.display(),
            if args.adapter.is_none() {
                ", default <RUN>/adapter: has the run finished training?"
            } else {
                ""
            }
        );
    }
    let base = base_dir(&resolved, run)?;
    let formats = formats(&resolved);
    let outs: Vec<(ExportFormat, PathBuf)> = formats
        .iter()
        .map(|&f| {
            let dir = match (&args.recipe.out, run) {
                (Some(out), _) if formats.len() == 1 => out.clone(),
                (Some(out), _) => out.join(format_name(f)),
                (None, Some(run)) => run.join("export").join(format_name(f)),
                (None, None) => bail!("flag --out: required without --run"),
            };
            Ok((f, dir))
        })
        .collect::<Result<_>>()?;
    for (_, out) in &outs {
        check_out_is_not_an_input(out, &[("adapter", &adapter), ("base model", &base)])?;
    }
    let source = Source::read(&adapter, &base)?;
    for (format, out) in &outs {
        export_one(&resolved, &source, *format, out)
            .with_context(|| format!("export --format {}", format_name(*format)))?;
    }
    Ok(Outcome::Done)
}
