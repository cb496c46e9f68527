//! `finetune pretrain`: full-parameter training of a small preset on a corpus of source code —
//! how the embedded `tiny` base (`datasets/tiny-base/`, `scripts/rebuild-tiny-base.sh`) is made.
//!
//! 1. Corpus: every file under the `--corpus` roots with a kept extension, walked in name order.
//!    A root with a `Cargo.toml` is a package: its `license` must be permissive (MIT, Apache-2.0,
//!    BSD, ISC, Zlib, Unlicense, … and their OR/AND combinations) or the root is skipped. Files
//!    go through finetune-mine's filters (lock files, vendored directories, `@generated`
//!    markers, binary, non-UTF-8, over `--max-file-bytes`, lines over 1,000 characters), its
//!    secret redaction and its exact + MinHash near-duplicate filter, in a seeded order (a hash
//!    of seed and path), until `--corpus-bytes` are kept. A seeded hash of the path sends
//!    `--heldout` of the files to the held-out part.
//! 2. Tokenizer: a byte-level BPE of `--vocab` tokens trained on the first `--tokenizer-bytes`
//!    of the training part; it is the base's fixed tokenizer.
//! 3. Documents: `### <path>\n<content>` + `<|endoftext|>`, cut into `--seq-len` pieces and
//!    packed (first-fit-decreasing) into sequences whose every token is a target.
//! 4. Training: the preset with tied embeddings, initialised from `--seed`, every weight
//!    trainable ([`Qwen3Moe::make_trainable`]), in the LoRA trainer's own loop (AdamW, warmup +
//!    cosine, clipping, metrics.jsonl, held-out loss, checkpoints, `--resume`, SIGINT).
//! 5. Output `<out>/model/`: `config.json`, `model.fp8.safetensors` (FP8 E4M3, power-of-two
//!    block scales: what the binary embeds), `model.safetensors` (its exact bf16 expansion),
//!    `tokenizer.json`; `<out>/pretrain.json` (corpus, tokens seen, wall time, losses) and
//!    `<out>/corpus.json` (every package with its licence and file counts).
//!
//! Everything is deterministic for a given corpus, seed and thread count.

use crate::run_dir::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use finetune_data::render::Example;
use finetune_data::{load_tokenizer, pack, train_byte_level_bpe, Sequence};
use finetune_mine::{dedup, filters, secrets};
use finetune_model::{Preset, Qwen3Moe, Qwen3MoeConfig, Weights};
use finetune_train::{checkpoint, on_large_stack, AdamWConfig, LrSchedule, TrainOptions, Trainer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `finetune pretrain` flags.
#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// Corpus roots (repeatable, or several after one flag): directories of source code. A root
    /// with a Cargo.toml is a package whose `license` must be permissive.
    #[arg(long, value_name = "DIR", required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Model shape (only `tiny` is trainable on a CPU in reasonable time).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Training tokens: steps = ⌈tokens / (seq_len × micro_batch)⌉.
    #[arg(long, value_name = "N")]
    pub tokens: u64,
    /// Output directory (model/, checkpoints/, metrics.jsonl, pretrain.json, corpus.json).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tokenizer vocabulary (special tokens included); also the model's vocab_size.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Tokens per packed training sequence (files are cut into pieces of this length).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Peak learning rate (linear warmup, then cosine decay to 0).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 60)]
    pub warmup: u64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of the initial weights, the corpus order, the held-out split and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of the files held out.
    #[arg(long, default_value_t = 0.02)]
    pub heldout: f64,
    /// File extensions kept.
    #[arg(long, value_delimiter = ',', default_value = "rs,py")]
    pub ext: Vec<String>,
    /// Globs of roots (by directory name) or files (by path under their root) to leave out,
    /// e.g. `log-*` for the crate an evaluation uses.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Stop collecting once this many bytes of training files are kept.
    #[arg(long, default_value_t = 64_000_000)]
    pub corpus_bytes: u64,
    /// Bytes of training text the tokenizer is trained on.
    #[arg(long, default_value_t = 24_000_000)]
    pub tokenizer_bytes: u64,
    /// Files larger than this many bytes are skipped.
    #[arg(long, default_value_t = 200_000)]
    pub max_file_bytes: u64,
    /// Held-out sequences scored during training (the final losses use up to 48).
    #[arg(long, default_value_t = 24)]
    pub eval_sequences: usize,
    /// Held-out loss every this many steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Checkpoint every this many steps (the last two are kept).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Continue from the newest checkpoint under <out>/checkpoints (same flags and corpus).
    #[arg(long)]
    pub resume: bool,
    /// No per-step lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Held-out sequences the final losses are measured on.
const HELDOUT_SEQUENCES: usize = 48;

/// Licences (SPDX ids) counted as permissive.
const PERMISSIVE: &[&str] = &[
    "MIT",
    "MIT-0",
    "Apache-2.0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSD-1-Clause",
    "0BSD",
    "ISC",
    "Zlib",
    "Unlicense",
    "CC0-1.0",
    "BSL-1.0",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "LLVM-exception",
    "PSF-2.0",
];

/// Whether an SPDX expression (`MIT OR Apache-2.0`, `(MIT OR Apache-2.0) AND Unicode-3.0`,
/// old-style `MIT/Apache-2.0`) allows use under permissive terms only: every AND term needs
/// a permissive alternative.
pub fn is_permissive(expr: &str) -> bool {
    let expr = expr.replace('/', " OR ");
    let terms: Vec<&str> = expr.split(" AND ").collect();
    !expr.trim().is_empty()
        && terms.iter().all(|term| {
            term.split(" OR ").any(|id| {
                let id = id.trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace());
                let id = id.split(" WITH ").next().unwrap_or(id).trim();
                PERMISSIVE.contains(&id)
            })
        })
}

/// One corpus root in `corpus.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RootRecord {
    pub name: String,
    pub path: String,
    pub license: String,
    pub train_files: usize,
    pub train_bytes: u64,
    pub heldout_files: usize,
}

/// `corpus.json`.
#[derive(Debug, Default, Serialize)]
pub struct CorpusRecord {
    pub roots: Vec<RootRecord>,
    /// Roots left out, with why.
    pub skipped_roots: BTreeMap<String, String>,
    /// Files left out, by reason.
    pub skipped_files: BTreeMap<String, usize>,
    pub secrets_redacted: usize,
    pub train_files: usize,
    pub train_bytes: u64,
    pub heldout_files: usize,
    pub heldout_bytes: u64,
}

/// A kept file: `### <path>\n<content>`.
struct Doc {
    text: String,
}

struct Candidate {
    root: usize,
    rel: String,
    path: PathBuf,
    key: u64,
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_symlink() {
            continue;
        }
        if ft.is_dir() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            walk(&path, root, out)?;
        } else if ft.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push((rel, path));
        }
    }
    Ok(())
}

/// The license of a root: Cargo.toml's `package.license`, or the name of a LICENSE file.
fn root_license(root: &Path) -> Option<String> {
    let manifest = root.join("Cargo.toml");
    if let Ok(text) = std::fs::read_to_string(&manifest) {
        let value: toml::Table = toml::from_str(&text).ok()?;
        return value
            .get("package")
            .and_then(|p| p.get("license"))
            .and_then(|l| l.as_str())
            .map(str::to_string);
    }
    None
}

/// Collects the corpus: (train docs, held-out docs, record).
fn collect(args: &PretrainArgs) -> Result<(Vec<Doc>, Vec<Doc>, CorpusRecord)> {
    let exclude =
        filters::glob_set(&args.exclude).map_err(|e| anyhow::anyhow!("flag --exclude: {e}"))?;
    let mut record = CorpusRecord::default();
    let mut roots: Vec<(String, PathBuf, String)> = Vec::new();
    let mut candidates = Vec::new();
    for root in &args.corpus {
        if !root.is_dir() {
            bail!("flag --corpus: {} is not a directory", root.display());
        }
        let name = root
            .canonicalize()
            .unwrap_or(root.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| root.display().to_string());
        if exclude.is_match(&name) {
            record
                .skipped_roots
                .insert(name, "excluded by --exclude".into());
            continue;
        }
        let license = if root.join("Cargo.toml").is_file() {
            match root_license(root) {
                Some(l) if is_permissive(&l) => l,
                Some(l) => {
                    record
                        .skipped_roots
                        .insert(name, format!("license `{l}` is not permissive"));
                    continue;
                }
                None => {
                    record
                        .skipped_roots
                        .insert(name, "Cargo.toml names no license".into());
                    continue;
                }
            }
        } else {
            ["LICENSE.txt", "LICENSE", "LICENSE.md", "COPYING"]
                .iter()
                .find(|f| root.join(f).is_file())
                .map(|f| format!("see {f}"))
                .unwrap_or_else(|| "not stated".into())
        };
        let mut files = Vec::new();
        walk(root, root, &mut files)?;
        let index = roots.len();
        for (rel, path) in files {
            let ext = rel.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
            if !args.ext.iter().any(|e| e == ext) {
                continue;
            }
            if exclude.is_match(&rel) {
                *record.skipped_files.entry("excluded".into()).or_default() += 1;
                continue;
            }
            let key = dedup::exact_key(&format!("{}:{name}/{rel}", args.seed));
            candidates.push(Candidate {
                root: index,
                rel,
                path,
                key,
            });
        }
        roots.push((name, root.clone(), license));
    }
    // The seeded order: which files make the cut, and which duplicate wins.
    candidates.sort_by_key(|c| (c.key, c.root, c.rel.clone()));
    let mut per_root: Vec<RootRecord> = roots
        .iter()
        .map(|(name, path, license)| RootRecord {
            name: name.clone(),
            path: path.display().to_string(),
            license: license.clone(),
            train_files: 0,
            train_bytes: 0,
            heldout_files: 0,
        })
        .collect();
    let mut deduper = dedup::Deduper::new(0.7);
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    let heldout_cut = (args.heldout.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let mut skip = |reason: &str| *record.skipped_files.entry(reason.into()).or_default() += 1;
    for c in candidates {
        if record.train_bytes >= args.corpus_bytes {
            break;
        }
        if let Some(s) = filters::path_skip(&c.rel) {
            skip(s.name());
            continue;
        }
        let Ok(bytes) = std::fs::read(&c.path) else {
            skip("unreadable");
            continue;
        };
        if bytes.len() as u64 > args.max_file_bytes {
            skip(filters::FileSkip::TooLarge.name());
            continue;
        }
        if bytes.is_empty() {
            skip("empty");
            continue;
        }
        if filters::is_binary(&bytes) {
            skip(filters::FileSkip::Binary.name());
            continue;
        }
        let Ok(text) = String::from_utf8(bytes) else {
            skip(filters::FileSkip::NonUtf8.name());
            continue;
        };
        if filters::has_generated_marker(&text) {
            skip(filters::FileSkip::Generated.name());
            continue;
        }
        if filters::has_long_line(&text, 1000) {
            skip(filters::FileSkip::LongLines.name());
            continue;
        }
        match deduper.check(&text) {
            Some(dedup::Duplicate::Exact) => {
                skip("exact-duplicate");
                continue;
            }
            Some(dedup::Duplicate::Near) => {
                skip("near-duplicate");
                continue;
            }
            None => {}
        }
        let (text, redacted) = secrets::redact(&text);
        record.secrets_redacted += redacted;
        let doc = Doc {
            text: format!("### {}\n{text}", c.rel),
        };
        let n = doc.text.len() as u64;
        // The held-out draw: a second hash of the path, so it is independent of the order.
        let draw = dedup::exact_key(&format!("heldout:{}:{}", args.seed, c.key));
        let r = &mut per_root[c.root];
        if draw < heldout_cut {
            r.heldout_files += 1;
            record.heldout_files += 1;
            record.heldout_bytes += n;
            heldout.push(doc);
        } else {
            r.train_files += 1;
            r.train_bytes += n;
            record.train_files += 1;
            record.train_bytes += n;
            train.push(doc);
        }
    }
    record.roots = per_root
        .into_iter()
        .filter(|r| r.train_files + r.heldout_files > 0)
        .collect();
    if train.is_empty() {
        bail!(
            "flag --corpus: no usable file (extensions {}) under {}",
            args.ext.join(", "),
            args.corpus
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((train, heldout, record))
}

/// Token ids of `docs` (each ending in `<|endoftext|>`), cut into `seq_len` pieces, stopping
/// after `limit` tokens; returns the examples and the tokens they hold.
fn encode_docs(
    docs: &[Doc],
    tokenizer: &tokenizers::Tokenizer,
    seq_len: usize,
    limit: u64,
) -> Result<(Vec<Example>, u64)> {
    let eos = tokenizer
        .token_to_id(finetune_data::SPECIAL_TOKENS[0])
        .context("the tokenizer has no <|endoftext|>")?;
    let mut examples = Vec::new();
    let mut tokens = 0u64;
    for chunk in docs.chunks(256) {
        if tokens >= limit {
            break;
        }
        let texts: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
        let encodings = tokenizer
            .encode_batch(texts, false)
            .map_err(|e| anyhow::anyhow!("tokenizing the corpus: {e}"))?;
        for enc in encodings {
            let mut ids = enc.get_ids().to_vec();
            ids.push(eos);
            for piece in ids.chunks(seq_len) {
                if piece.len() < 2 {
                    continue;
                }
                tokens += piece.len() as u64;
                examples.push(Example {
                    ids: piece.to_vec(),
                    labels: piece.iter().map(|&i| i as i64).collect(),
                });
            }
        }
    }
    Ok((examples, tokens))
}

/// The model shape `finetune pretrain` trains: the preset with `vocab` tokens and tied
/// embeddings (the input embedding doubles as lm_head: a third fewer bytes at this size).
pub fn pretrain_config(preset: Preset, vocab: usize) -> Qwen3MoeConfig {
    let mut c = preset.config();
    c.vocab_size = vocab;
    c.tie_word_embeddings = true;
    c
}

/// Mean loss over the target tokens of `seqs` under `model`.
pub fn mean_loss(model: &Qwen3Moe, seqs: &[Sequence]) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for s in seqs {
        let logits = model.forward(&s.ids, &s.position_ids)?;
        sum += Qwen3Moe::loss_sum_tensor(&logits, &s.labels)?.to_scalar::<f32>()? as f64;
        n += s.target_tokens();
    }
    Ok(sum / n.max(1) as f64)
}

/// `finetune pretrain`.
pub fn command(args: &PretrainArgs) -> Result<crate::Outcome> {
    let started = std::time::Instant::now();
    let preset: Preset = args
        .preset
        .parse()
        .map_err(|e| anyhow::anyhow!("flag --preset: {e}"))?;
    ensure!(args.tokens > 0, "flag --tokens: must be at least 1");
    ensure!(args.seq_len >= 16, "flag --seq-len: must be at least 16");
    ensure!(
        args.micro_batch >= 1,
        "flag --micro-batch: must be at least 1"
    );
    ensure!(
        (300..=65536).contains(&args.vocab),
        "flag --vocab: must be between 300 and 65536, got {}",
        args.vocab
    );
    ensure!(
        (0.0..0.5).contains(&args.heldout),
        "flag --heldout: must be in [0, 0.5), got {}",
        args.heldout
    );
    let out = &args.out;
    if !args.resume && (out.join("checkpoints").is_dir() || out.join("metrics.jsonl").is_file()) {
        bail!(
            "flag --out: {} already holds a run (checkpoints/ or metrics.jsonl); pass --resume to continue it or choose another directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    // 1. Corpus.
    let (train_docs, heldout_docs, record) = collect(args)?;
    eprintln!(
        "pretrain: corpus {} files ({:.1} MB) for training, {} held out ({:.1} MB), from {} roots ({} skipped); {} secrets redacted",
        record.train_files,
        record.train_bytes as f64 / 1e6,
        record.heldout_files,
        record.heldout_bytes as f64 / 1e6,
        record.roots.len(),
        record.skipped_roots.len(),
        record.secrets_redacted
    );
    write_atomic(
        &out.join("corpus.json"),
        (serde_json::to_string_pretty(&record)? + "\n").as_bytes(),
    )?;

    // 2. Tokenizer (kept when resuming: it is part of the run).
    let model_dir = out.join("model");
    let tokenizer_path = model_dir.join("tokenizer.json");
    if !(args.resume && tokenizer_path.is_file()) {
        let mut budget = args.tokenizer_bytes;
        let texts = train_docs.iter().map(|d| d.text.as_str()).take_while(|t| {
            let keep = budget > 0;
            budget = budget.saturating_sub(t.len() as u64);
            keep
        });
        let t = std::time::Instant::now();
        train_byte_level_bpe(texts, args.vocab, &tokenizer_path)?;
        eprintln!(
            "pretrain: {}-token byte-level BPE trained in {:.0} s",
            args.vocab,
            t.elapsed().as_secs_f64()
        );
    }
    let tokenizer = load_tokenizer(&tokenizer_path, args.vocab)?;

    // 3. Sequences.
    let per_step = args.micro_batch as u64 * args.seq_len as u64;
    let total_steps = args.tokens.div_ceil(per_step);
    let (train_examples, train_tokens) = encode_docs(
        &train_docs,
        &tokenizer,
        args.seq_len,
        args.tokens + per_step,
    )?;
    let (heldout_examples, heldout_tokens) = encode_docs(
        &heldout_docs,
        &tokenizer,
        args.seq_len,
        256 * args.seq_len as u64,
    )?;
    let train_seqs = pack(&train_examples, args.seq_len);
    let mut heldout_seqs = pack(&heldout_examples, args.seq_len);
    heldout_seqs.truncate(HELDOUT_SEQUENCES);
    let bytes_per_token = {
        let sample = &train_docs[..train_docs.len().min(500)];
        let bytes: usize = sample.iter().map(|d| d.text.len()).sum();
        bytes as f64
            / encode_docs(sample, &tokenizer, usize::MAX, u64::MAX)?
                .1
                .max(1) as f64
    };
    eprintln!(
        "pretrain: {} training sequences ({train_tokens} tokens available for {} requested), {} held-out sequences ({heldout_tokens} tokens); {total_steps} steps of {} × {} tokens",
        train_seqs.len(),
        args.tokens,
        heldout_seqs.len(),
        args.micro_batch,
        args.seq_len
    );

    // 4. Model: random init from the seed, every weight trainable.
    let config = pretrain_config(preset, args.vocab);
    let init_dir = out.join("init");
    finetune_model::init::write_random_checkpoint(&config, args.seed, &init_dir)
        .with_context(|| format!("writing the initial weights into {}", init_dir.display()))?;
    let device = Device::Cpu;
    let weights = Weights::open(&init_dir, &device)?;
    let mut model = Qwen3Moe::load(config.clone(), &weights, &device)?;
    let params = model.make_trainable()?;
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let options = TrainOptions {
        lr: args.lr,
        schedule: LrSchedule::Cosine,
        warmup: args.warmup,
        total_steps,
        micro_batch: args.micro_batch,
        grad_accum: 1,
        seed: args.seed,
        recompute: false,
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        eval_every: args.eval_every,
        eval_sequences: args.eval_sequences,
        save_every: args.save_every,
        keep_checkpoints: 2,
        max_bad_steps: 5,
    };
    let fingerprint = serde_json::json!({
        "preset": preset.name(), "vocab": args.vocab, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "seed": args.seed, "tokens": args.tokens,
        "train_sequences": train_seqs.len(), "train_tokens": train_tokens,
    });
    let run_out = finetune_train::RunOutput {
        dir: out.clone(),
        adapter_meta: finetune_model::peft::AdapterMeta {
            base_model_name_or_path: String::new(),
            r: 0,
            lora_alpha: 0.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: Vec::new(),
        },
        recipe: fingerprint.clone(),
    };
    let resume_dir = if args.resume {
        let dir = checkpoint::latest(&out.join("checkpoints")).with_context(|| {
            format!(
                "--resume: no checkpoint under {}",
                out.join("checkpoints").display()
            )
        })?;
        let state = checkpoint::read_state(&dir)?;
        let differ = finetune_train::differing_keys(&state.recipe, &fingerprint, &[]);
        if !differ.is_empty() {
            bail!(
                "--resume {}: the checkpoint was made with other settings or another corpus; these differ: {}",
                dir.display(),
                differ.join(", ")
            );
        }
        Some(dir)
    } else {
        None
    };
    eprintln!(
        "pretrain: {} ({n_params} parameters, tied embeddings), lr {:.1e} warmup {} cosine",
        preset.name(),
        args.lr,
        args.warmup
    );
    let stop = crate::train::stop_flag()?;
    let initial_heldout = mean_loss(&model, &heldout_seqs)?;
    let (summary, trained) = on_large_stack(|| -> Result<_> {
        let mut trainer =
            Trainer::new_full(&model, params, train_seqs, heldout_seqs.clone(), options)?;
        if let Some(dir) = &resume_dir {
            trainer.resume_full(checkpoint::load_full(dir, &names)?)?;
            eprintln!(
                "pretrain: resuming from {} (step {}/{total_steps})",
                dir.display(),
                trainer.step()
            );
        }
        let progress = crate::train::Progress::new(total_steps, trainer.step(), args.quiet);
        let result = trainer.run(Some(&run_out), &stop, &mut |m| progress.step(m));
        progress.finish();
        Ok((result?, trainer.full_params()))
    })?;
    let final_heldout = mean_loss(&model, &heldout_seqs)?;

    // 5. The model directory: FP8 (embedded) and its exact bf16 expansion.
    std::fs::create_dir_all(&model_dir)?;
    let fp8_path = model_dir.join("model.fp8.safetensors");
    let tmp = model_dir.join(".model.fp8.safetensors.tmp");
    finetune_model::fp8::write_quantized(&trained, &tmp)?;
    std::fs::rename(&tmp, &fp8_path)?;
    let bf16 = finetune_model::fp8::expand_to_bf16(&std::fs::read(&fp8_path)?)?;
    write_atomic(&model_dir.join("model.safetensors"), &bf16)?;
    let config_text =
        serde_json::to_string_pretty(&finetune_model::init::config_json(&config))? + "\n";
    write_atomic(&model_dir.join("config.json"), config_text.as_bytes())?;
    // The quantized model's held-out loss, loaded the way a run loads it.
    let weights = Weights::open(&model_dir, &device)?;
    let quantized = Qwen3Moe::load(config.clone(), &weights, &device)?;
    let quantized_heldout = mean_loss(&quantized, &heldout_seqs)?;
    let report = serde_json::json!({
        "preset": preset.name(),
        "parameters": n_params,
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "steps": summary.steps,
        "total_steps": total_steps,
        "stopped_early": summary.stopped_early,
        "tokens_seen": summary.tokens_seen,
        "train_sequences_available_tokens": train_tokens,
        "bytes_per_token": bytes_per_token,
        "wall_secs_training": summary.elapsed_secs,
        "wall_secs_this_invocation": started.elapsed().as_secs_f64(),
        "first_loss": summary.first_loss,
        "last_loss": summary.last_loss,
        "heldout_sequences": heldout_seqs.len(),
        "heldout_tokens": heldout_seqs.iter().map(|s| s.target_tokens()).sum::<usize>(),
        "heldout_loss_init": initial_heldout,
        "heldout_loss_f32": final_heldout,
        "heldout_loss_fp8": quantized_heldout,
        "uniform_loss": (args.vocab as f64).ln(),
        "corpus": {"train_files": record.train_files, "train_bytes": record.train_bytes,
                   "heldout_files": record.heldout_files, "heldout_bytes": record.heldout_bytes,
                   "roots": record.roots.len()},
        "settings": fingerprint,
    });
    write_atomic(
        &out.join("pretrain.json"),
        (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
    )?;
    println!(
        "pretrain: {} steps{}, {} tokens, {:.0} s; held-out loss {:.4} (init) → {:.4} (f32) / {:.4} (FP8, as embedded); uniform {:.4}; model in {}",
        summary.steps,
        if summary.stopped_early { " (interrupted; continue with --resume)" } else { "" },
        summary.tokens_seen,
        summary.elapsed_secs,
        initial_heldout,
        final_heldout,
        quantized_heldout,
        (args.vocab as f64).ln(),
        model_dir.display()
    );
    Ok(if summary.stopped_early {
        crate::Outcome::Interrupted
    } else {
        crate::Outcome::Done
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissive_licences_and_their_combinations() {
        for l in [
            "MIT",
            "MIT OR Apache-2.0",
            "MIT/Apache-2.0",
            "(MIT OR Apache-2.0) AND Unicode-3.0",
            "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT",
            "Zlib OR Apache-2.0 OR MIT",
            "Unlicense OR MIT",
            "BSD-3-Clause",
            "MIT OR Apache-2.0 OR LGPL-2.1-or-later",
        ] {
            assert!(is_permissive(l), "{l}");
        }
        for l in [
            "GPL-3.0",
            "MPL-2.0",
            "MIT AND GPL-2.0",
            "",
            "LGPL-2.1-or-later",
        ] {
            assert!(!is_permissive(l), "{l}");
        }
    }
}
