//! The eval stage (`finetune eval`, and step 4 of `finetune run`): the base model and base +
//! adapter on the same suites, per-example values in `samples.json`, the comparison in
//! `report.json`, `report.md` and `report.svg` (finetune-eval's report).
//!
//! Suites (`eval.suites`): `repo-heldout` (teacher-forced loss of the real change, and the
//! model's own edit: applies cleanly / exact match / similarity), `pr-replay` (needs
//! `eval.test_cmd`: the generated edit applied on the commit's parent, the test command run in
//! the sandbox), `humaneval`, and user suites given as a `FILE.jsonl`.

use crate::cli::EvalArgs;
use crate::recipe::ResolvedRecipe;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use finetune_data::{load_tokenizer, read_pairs, PairText, Template};
use finetune_eval::endpoint::Endpoint;
use finetune_eval::heldout::{self, EditScore};
use finetune_eval::passk::pass_at_k;
use finetune_eval::pr_replay::{self, Replay};
use finetune_eval::report::{self, MetricSamples, Report, RunResults, RunSamples};
use finetune_eval::sandbox::SandboxLimits;
use finetune_eval::suite::SuiteResult;
use finetune_eval::{GenerationParams, Generator, ModelGenerator};
use finetune_model::{Lora, Qwen3Moe, Qwen3MoeConfig, Weights};
use std::path::{Path, PathBuf};

/// Seed of the report's bootstrap intervals.
const REPORT_SEED: u64 = 20_261_125;

/// Where an evaluation reads from.
pub struct EvalInputs {
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub data: PathBuf,
    pub report_dir: PathBuf,
}

/// The repository the pairs were mined from (data/manifest.json), when it is still there.
fn mined_repo(data: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(data.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let p = PathBuf::from(v["repo"]["path"].as_str()?);
    p.exists().then_some(p)
}

fn samples(
    suite: &str,
    metric: &str,
    higher: bool,
    ids: Vec<String>,
    base: Vec<f64>,
    adapter: Vec<f64>,
) -> MetricSamples {
    MetricSamples {
        suite: suite.into(),
        metric: metric.into(),
        higher_is_better: higher,
        ids,
        base,
        adapter,
    }
}

fn edit_metrics(
    suite: &str,
    base: &[EditScore],
    adapter: &[EditScore],
    out: &mut Vec<MetricSamples>,
) {
    let ids: Vec<String> = base.iter().map(|e| e.id.clone()).collect();
    let bool01 = |b: bool| if b { 1.0 } else { 0.0 };
    if base.iter().chain(adapter).all(|e| e.applies.is_some()) {
        out.push(samples(
            suite,
            "applies cleanly",
            true,
            ids.clone(),
            base.iter()
                .map(|e| bool01(e.applies == Some(true)))
                .collect(),
            adapter
                .iter()
                .map(|e| bool01(e.applies == Some(true)))
                .collect(),
        ));
    }
    out.push(samples(
        suite,
        "exact match",
        true,
        ids.clone(),
        base.iter().map(|e| bool01(e.exact)).collect(),
        adapter.iter().map(|e| bool01(e.exact)).collect(),
    ));
    out.push(samples(
        suite,
        "similarity",
        true,
        ids,
        base.iter().map(|e| e.similarity).collect(),
        adapter.iter().map(|e| e.similarity).collect(),
    ));
}

/// pass@1 (and pass@10 with ≥ 10 samples) per problem of a code suite, base vs adapter.
fn push_code_suite(
    suite: &str,
    base: &SuiteResult,
    adapter: &SuiteResult,
    out: &mut Vec<MetricSamples>,
) -> Result<()> {
    let ids: Vec<String> = base.problems.iter().map(|p| p.id.clone()).collect();
    for k in [1usize, 10] {
        if base.samples < k {
            continue;
        }
        let per = |r: &SuiteResult| -> Result<Vec<f64>> {
            r.problems
                .iter()
                .map(|p| Ok(pass_at_k(p.n, p.passed, k)?))
                .collect()
        };
        out.push(samples(
            suite,
            &format!("pass@{k}"),
            true,
            ids.clone(),
            per(base)?,
            per(adapter)?,
        ));
    }
    Ok(())
}

/// Evaluates base and base + adapter; writes samples.json and the report into `inputs.report_dir`.
pub fn eval_into(
    resolved: &ResolvedRecipe,
    inputs: &EvalInputs,
    endpoint: Option<(&str, &str, &str, usize)>,
    quiet: bool,
) -> Result<Report> {
    let e = &resolved.recipe.eval;
    let seq_len = resolved.recipe.train.seq_len as usize;
    let say = |m: String| {
        if !quiet {
            eprintln!("eval: {m}")
        }
    };
    let heldout_path = inputs.data.join("heldout.jsonl");
    let mut pairs: Vec<PairText> = if heldout_path.is_file() {
        read_pairs(&heldout_path)?
    } else {
        Vec::new()
    };
    pairs.truncate(e.max_examples as usize);
    let repo = mined_repo(&inputs.data);

    let config = Qwen3MoeConfig::from_file(&inputs.base.join("config.json"))?;
    let tokenizer = load_tokenizer(&inputs.base.join("tokenizer.json"), config.vocab_size)?;
    let template = Template::for_tokenizer(&tokenizer);
    // The model itself only without an endpoint (a served 480B model is not loaded here).
    let local: Option<(Qwen3Moe, Lora, String)> = match endpoint {
        Some(_) => None,
        None => {
            let device = Device::Cpu;
            let weights = Weights::open(&inputs.base, &device)?;
            let model = Qwen3Moe::load(config, &weights, &device)?;
            let (lora, meta) =
                finetune_model::peft::read_adapter(&inputs.adapter, &model.lora_targets())
                    .with_context(|| format!("adapter {}", inputs.adapter.display()))?;
            Some((model, lora, meta.base_model_name_or_path))
        }
    };
    let params = GenerationParams {
        max_new_tokens: e.max_new_tokens as usize,
        temperature: e.temperature,
        top_p: e.top_p,
        stop: vec!["<|im_end|>".into()],
        seed: resolved.recipe.train.seed,
    };
    // Code suites stop at their own sequences (added by each suite), not at <|im_end|> alone.
    let params_code = GenerationParams {
        stop: Vec::new(),
        ..params.clone()
    };
    let endpoints = endpoint.map(|(url, base_name, adapter_name, concurrency)| {
        let mk = |name: &str| {
            let mut ep = Endpoint::new(url, name);
            ep.concurrency = concurrency.max(1);
            ep
        };
        (mk(base_name), mk(adapter_name))
    });
    let locals = local.as_ref().map(|(model, lora, _)| {
        (
            ModelGenerator {
                model,
                lora: None,
                tokenizer: &tokenizer,
                name: "base".into(),
            },
            ModelGenerator {
                model,
                lora: Some(lora),
                tokenizer: &tokenizer,
                name: "base+adapter".into(),
            },
        )
    });
    let (gb, ga): (&dyn Generator, &dyn Generator) = match (&endpoints, &locals) {
        (Some((b, a)), _) => (b, a),
        (None, Some((b, a))) => (b, a),
        (None, None) => unreachable!("a local model is loaded when there is no endpoint"),
    };

    let mut metrics = Vec::new();
    let mut notes = Vec::new();
    let mut generated: Option<(Vec<EditScore>, Vec<EditScore>)> = None;
    for suite in &e.suites {
        match suite.as_str() {
            "repo-heldout" => {
                if pairs.is_empty() {
                    notes.push(format!("repo-heldout: no held-out pairs in {}", heldout_path.display()));
                    continue;
                }
                match &local {
                    Some((model, lora, _)) => {
                        say(format!("repo-heldout: teacher-forced loss on {} pairs", pairs.len()));
                        let lb = heldout::teacher_forced(model, None, &pairs, &tokenizer, template, seq_len)?;
                        let la = heldout::teacher_forced(model, Some(lora), &pairs, &tokenizer, template, seq_len)?;
                        let per = |v: &[heldout::LossScore]| {
                            v.iter().map(heldout::LossScore::mean).collect::<Vec<_>>()
                        };
                        metrics.push(samples("repo-heldout", "loss", false, lb.iter().map(|s| s.id.clone()).collect(), per(&lb), per(&la)));
                    }
                    None => notes.push("repo-heldout: the teacher-forced loss needs the built-in model; with --endpoint only generated edits are scored".into()),
                }
                if e.max_new_tokens > 0 {
                    let budget = seq_len.saturating_sub(e.max_new_tokens as usize).max(1);
                    let prompts = heldout::prompts(&pairs, &tokenizer, template, budget)?;
                    say(format!("repo-heldout: generating {} edits with base and base+adapter", prompts.len()));
                    let eb = heldout::generated_edits(gb, &pairs, &prompts, &params, repo.as_deref())?;
                    let ea = heldout::generated_edits(ga, &pairs, &prompts, &params, repo.as_deref())?;
                    if repo.is_none() {
                        notes.push("repo-heldout: the mined repository is not at hand, applies-cleanly left out".into());
                    }
                    edit_metrics("repo-heldout", &eb, &ea, &mut metrics);
                    generated = Some((eb, ea));
                }
            }
            "pr-replay" => {
                let (Some(cmd), Some(repo)) = (&e.test_cmd, &repo) else {
                    notes.push("pr-replay: needs --test-cmd and the mined repository; skipped".into());
                    continue;
                };
                let Some((eb, ea)) = &generated else {
                    notes.push("pr-replay: replays repo-heldout's generated edits; list repo-heldout first (and --max-new-tokens > 0)".into());
                    continue;
                };
                let timeout = std::time::Duration::from_secs(e.timeout_secs.max(1));
                let run_test = |dir: &Path| pr_replay::run_test_command(dir, cmd, timeout);
                let (mut ids, mut vb, mut va, mut unjudged) = (Vec::new(), Vec::new(), Vec::new(), 0);
                for pair in &pairs {
                    let Some(commit) = pair.meta.commits.first() else { continue };
                    let (Some(b), Some(a)) = (eb.iter().find(|x| x.id == pair.id), ea.iter().find(|x| x.id == pair.id)) else { continue };
                    say(format!("pr-replay: {}", pair.id));
                    if pr_replay::replay(repo, commit, &pair.target, &pair.format, &run_test)? != Replay::Green {
                        unjudged += 1;
                        continue;
                    }
                    let green = |g: &str| -> Result<f64> {
                        Ok(if pr_replay::replay(repo, commit, g, &pair.format, &run_test)? == Replay::Green { 1.0 } else { 0.0 })
                    };
                    ids.push(pair.id.clone());
                    vb.push(green(&b.generated)?);
                    va.push(green(&a.generated)?);
                }
                if unjudged > 0 {
                    notes.push(format!("pr-replay: {unjudged} commits left out: their own change is not green under the test command"));
                }
                metrics.push(samples("pr-replay", "green first try", true, ids, vb, va));
            }
            "humaneval" => {
                say("humaneval: generating and running completions in the sandbox".into());
                let limit = Some(e.max_examples as usize);
                let limits = SandboxLimits { wall_secs: e.timeout_secs.max(1) as f64, ..finetune_eval::humaneval::humaneval_limits() };
                let hb = finetune_eval::humaneval::run_humaneval(gb, &params_code, e.samples.max(1) as usize, limit, &limits)?;
                let ha = finetune_eval::humaneval::run_humaneval(ga, &params_code, e.samples.max(1) as usize, limit, &limits)?;
                push_code_suite("humaneval", &hb, &ha, &mut metrics)?;
            }
            file if file.ends_with(".jsonl") => {
                say(format!("{file}: user suite in the sandbox"));
                let limits = SandboxLimits { wall_secs: e.timeout_secs.max(1) as f64, ..SandboxLimits::default() };
                let path = Path::new(file);
                let ub = finetune_eval::user_suite::run_user_suite(path, gb, &params_code, e.samples.max(1) as usize, &limits)?;
                let ua = finetune_eval::user_suite::run_user_suite(path, ga, &params_code, e.samples.max(1) as usize, &limits)?;
                push_code_suite(file, &ub, &ua, &mut metrics)?;
            }
            other => bail!("eval.suites: unknown suite `{other}` (repo-heldout, pr-replay, humaneval, or FILE.jsonl)"),
        }
    }
    let base_name = local
        .as_ref()
        .map_or(inputs.base.display().to_string(), |l| l.2.clone());
    let run = RunSamples {
        base: format!("{} ({base_name})", gb.describe()),
        adapter: format!("{} ({})", ga.describe(), inputs.adapter.display()),
        metrics,
    };
    std::fs::create_dir_all(&inputs.report_dir)?;
    report::write_atomic(
        &inputs.report_dir.join(report::SAMPLES_JSON),
        (serde_json::to_string_pretty(&run)? + "\n").as_bytes(),
    )?;
    let mut rep = Report::from_samples("base vs base + adapter", &run, REPORT_SEED)?;
    rep.notes.extend(notes);
    report::write_report(&rep, &inputs.report_dir)?;
    Ok(rep)
}

/// The `repo-heldout` loss (mean over the held-out pairs of their mean target-token
/// cross-entropy) of each adapter on `base`, the base loaded once; `None` without held-out pairs.
pub fn heldout_losses(
    base: &Path,
    adapters: &[&Path],
    data: &Path,
    seq_len: usize,
    max_examples: usize,
) -> Result<Vec<Option<f64>>> {
    let path = data.join("heldout.jsonl");
    let mut pairs = if path.is_file() {
        read_pairs(&path)?
    } else {
        Vec::new()
    };
    pairs.truncate(max_examples);
    if pairs.is_empty() {
        return Ok(vec![None; adapters.len()]);
    }
    let config = Qwen3MoeConfig::from_file(&base.join("config.json"))?;
    let tokenizer = load_tokenizer(&base.join("tokenizer.json"), config.vocab_size)?;
    let weights = Weights::open(base, &Device::Cpu)?;
    let model = Qwen3Moe::load(config, &weights, &Device::Cpu)?;
    let template = Template::for_tokenizer(&tokenizer);
    adapters
        .iter()
        .map(|adapter| {
            let (lora, _) = finetune_model::peft::read_adapter(adapter, &model.lora_targets())
                .with_context(|| format!("adapter {}", adapter.display()))?;
            let scores = heldout::teacher_forced(
                &model,
                Some(&lora),
                &pairs,
                &tokenizer,
                template,
                seq_len,
            )?;
            Ok((!scores.is_empty()).then(|| {
                scores.iter().map(heldout::LossScore::mean).sum::<f64>() / scores.len() as f64
            }))
        })
        .collect()
}

/// Prints the report table (stdout).
pub fn print_report(report: &Report, dir: &Path) {
    print!("{}", report.to_markdown());
    println!(
        "eval: report in {}/report.md (and report.json, report.svg)",
        dir.display()
    );
}

/// `finetune eval`.
pub fn command(args: &EvalArgs) -> Result<crate::Outcome> {
    let Some(resolved) = crate::resolve(&args.recipe)? else {
        return Ok(crate::Outcome::Done);
    };
    if let Some(pair) = &args.compare {
        let (a, b) = (&pair[0], &pair[1]);
        let ra = RunResults::load(a)?;
        let rb = RunResults::load(b)?;
        let label = |p: &Path| {
            p.file_name().map_or(p.display().to_string(), |n| {
                n.to_string_lossy().into_owned()
            })
        };
        let rep = report::compare(&label(a), &ra, &label(b), &rb, REPORT_SEED)?;
        let dir = args
            .report_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."));
        report::write_report(&rep, &dir)?;
        print_report(&rep, &dir);
        return Ok(crate::Outcome::Done);
    }
    let run = args.run.clone();
    let need = |flag: &str, v: Option<PathBuf>| {
        v.with_context(|| format!("flag {flag}: required without --run"))
    };
    let base = match &run {
        Some(r) if r.join("base/config.json").is_file() => r.join("base"),
        _ => {
            resolved.check_model_dir()?;
            if resolved.model_preset().is_some() {
                bail!("model.base = `{}`: evaluate a run directory (--run) whose base/ holds the model, or pass --model DIR", resolved.recipe.model.base);
            }
            PathBuf::from(&resolved.recipe.model.base)
        }
    };
    let inputs = EvalInputs {
        base,
        adapter: match &args.adapter {
            Some(a) => a.clone(),
            None => need("--adapter", run.as_ref().map(|r| r.join("adapter")))?,
        },
        data: match &args.data {
            Some(d) => d.clone(),
            None => need("--data", run.as_ref().map(|r| r.join("data")))?,
        },
        report_dir: match &args.report_dir {
            Some(d) => d.clone(),
            None => need("--report-dir", run.clone())?,
        },
    };
    let endpoint = match &resolved.recipe.eval.endpoint {
        Some(url) => Some((
            url.as_str(),
            args.endpoint_base.as_deref().context(
                "flag --endpoint-base: the served base model's name is required with --endpoint",
            )?,
            args.endpoint_adapter.as_deref().context(
                "flag --endpoint-adapter: the served adapter's name is required with --endpoint",
            )?,
            args.concurrency,
        )),
        None => None,
    };
    let rep = eval_into(&resolved, &inputs, endpoint, args.quiet)?;
    print_report(&rep, &inputs.report_dir);
    Ok(crate::Outcome::Done)
}
