//! Recipes: every knob of a run in one typed TOML file.
//!
//! Precedence, lowest first: built-in defaults ([`Recipe::default`], identical to
//! `recipes/tiny-cpu.toml`, which a test checks), the `--recipe FILE`, then command-line flags.
//! Every error names where the bad value came from: `FILE:LINE:COL` and the dotted key for a
//! recipe file, the flag for a command-line value.
//!
//! Paths in a recipe (`run.out`, `mine.repo`, `model.base`) are relative to the directory the
//! command runs in, like the flags that set them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Projections a LoRA adapter may target (Hugging Face names; the experts' projections apply
/// to every expert).
pub const KNOWN_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Built-in eval suites; a path ending in `.jsonl` names a user suite.
pub const KNOWN_SUITES: [&str; 3] = ["repo-heldout", "pr-replay", "humaneval"];

/// The largest LoRA rank any serving engine we export to accepts (vLLM's largest
/// `--max-lora-rank`).
pub const MAX_LORA_RANK: u32 = 512;

/// A complete, resolved set of knobs. Sections mirror the command-line flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub run: RunSection,
    pub mine: MineSection,
    pub model: ModelSection,
    pub lora: LoraSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub export: ExportSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Root of the run directories: each run gets `<out>/runs/<id>/`.
    pub out: PathBuf,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            out: PathBuf::from("finetune-out"),
        }
    }
}

/// How a mined edit is written as the training target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PairFormat {
    /// SEARCH/REPLACE blocks (the Aider edit format).
    SearchReplace,
    /// Unified diff, as `git diff` prints it.
    Udiff,
}

impl From<finetune_mine::PairFormat> for PairFormat {
    fn from(f: finetune_mine::PairFormat) -> Self {
        match f {
            finetune_mine::PairFormat::SearchReplace => PairFormat::SearchReplace,
            finetune_mine::PairFormat::Udiff => PairFormat::Udiff,
        }
    }
}

impl From<PairFormat> for finetune_mine::PairFormat {
    fn from(f: PairFormat) -> Self {
        match f {
            PairFormat::SearchReplace => finetune_mine::PairFormat::SearchReplace,
            PairFormat::Udiff => finetune_mine::PairFormat::Udiff,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MineSection {
    pub repo: PathBuf,
    pub rev: String,
    pub since: Option<String>,
    pub until: Option<String>,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub format: PairFormat,
    pub heldout: f64,
    pub max_files: u32,
    pub max_lines: u32,
    pub max_file_bytes: u64,
    pub max_line_chars: u32,
    pub max_pair_tokens: u32,
    pub skip_bots: bool,
    pub skip_boilerplate: bool,
    pub skip_generated: bool,
    pub dedup_threshold: f64,
}

impl Default for MineSection {
    /// The miner's own defaults, so that there is one place they are set.
    fn default() -> Self {
        let m = finetune_mine::MineOptions::default();
        let narrow = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Self {
            repo: m.repo,
            rev: m.rev,
            since: m.since,
            until: m.until,
            paths: m.paths,
            exclude: m.exclude,
            format: m.format.into(),
            heldout: m.heldout,
            max_files: narrow(m.max_files),
            max_lines: narrow(m.max_lines),
            max_file_bytes: m.max_file_bytes,
            max_line_chars: narrow(m.max_line_chars),
            max_pair_tokens: narrow(m.max_pair_tokens),
            skip_bots: m.skip_bots,
            skip_boilerplate: m.skip_boilerplate,
            skip_generated: m.skip_generated,
            dedup_threshold: m.dedup_threshold,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `tiny` (embedded, pretrained), `tiny-random`, another preset name, or a Hugging Face
    /// model directory.
    pub base: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            base: "tiny".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: u32,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    pub lora_dropout: f64,
    pub use_rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            lora_alpha: 32.0,
            target_modules: KNOWN_TARGET_MODULES.map(String::from).to_vec(),
            lora_dropout: 0.0,
            use_rslora: false,
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Compute dtype of activations and LoRA matmuls (master weights and Adam moments are f32
/// whatever this says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ComputeDtype {
    /// f32 on CPU, bf16 on GPU.
    Auto,
    F32,
    Bf16,
}

/// What happens to a pair longer than `train.seq_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Overlong {
    /// Cut the context (never the instruction or the target); drop when that is not enough.
    Truncate,
    /// Cut the context, then the end of the target (changes larger than the sequence still
    /// train, as language modelling; the cut target is not a complete edit).
    TruncateTarget,
    /// Drop the pair.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup: u64,
    /// Optimizer steps; 0 means: train for `epochs` passes instead.
    pub max_steps: u64,
    pub epochs: f64,
    pub micro_batch: u32,
    pub grad_accum: u32,
    pub seq_len: u32,
    pub overlong: Overlong,
    pub seed: u64,
    pub recompute: bool,
    pub dtype: ComputeDtype,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub eval_every: u64,
    pub save_every: u64,
    pub keep_checkpoints: u32,
    pub gpus: u32,
    /// Tensor-parallel ranks (attention heads); divides `ep`.
    pub tp: u32,
    /// Expert-parallel ranks (experts sharded over them); 0: all ranks of the run.
    pub ep: u32,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            schedule: Schedule::Cosine,
            warmup: 10,
            max_steps: 200,
            epochs: 1.0,
            micro_batch: 4,
            grad_accum: 1,
            seq_len: 1024,
            overlong: Overlong::TruncateTarget,
            seed: 42,
            recompute: false,
            dtype: ComputeDtype::Auto,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            eval_every: 50,
            save_every: 100,
            keep_checkpoints: 2,
            gpus: 1,
            tp: 1,
            ep: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    pub suites: Vec<String>,
    pub max_examples: u32,
    pub max_new_tokens: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub samples: u32,
    pub endpoint: Option<String>,
    pub test_cmd: Option<String>,
    pub timeout_secs: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            suites: vec!["repo-heldout".into()],
            max_examples: 64,
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            samples: 1,
            endpoint: None,
            test_cmd: None,
            timeout_secs: 60,
        }
    }
}

/// What `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    /// PEFT adapter, one tensor pair per expert (vLLM, SGLang, PEFT).
    Peft,
    /// PEFT `target_parameters` adapter on fused 3D experts (transformers >= 5 + PEFT).
    PeftFused,
    /// Full checkpoint with the adapter merged into the base weights.
    Merged,
}

/// Dtype of a merged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MergedDtype {
    Bf16,
    /// FP8 E4M3 with fresh 128×128 block scales.
    Fp8,
    /// Full precision (twice bf16's size), e.g. to check a merge exactly.
    F32,
}

impl From<MergedDtype> for finetune_export::merge::MergedDtype {
    fn from(d: MergedDtype) -> Self {
        match d {
            MergedDtype::Bf16 => Self::Bf16,
            MergedDtype::Fp8 => Self::Fp8,
            MergedDtype::F32 => Self::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    pub formats: Vec<ExportFormat>,
    pub merged_dtype: MergedDtype,
    /// Name the adapter is served under (vLLM `--lora-modules NAME=PATH`).
    pub adapter_name: String,
    /// Replace an existing export directory (refused otherwise).
    pub force: bool,
}

impl Default for ExportSection {
    fn default() -> Self {
        Self {
            formats: vec![ExportFormat::Peft],
            merged_dtype: MergedDtype::Bf16,
            adapter_name: "finetune".into(),
            force: false,
        }
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    /// A recipe file, with the 1-based line and column of the value.
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// A command-line flag, e.g. `--rank`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// A recipe that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type, located in the file.
    #[error("{origin}: {}{message}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Parse {
        origin: Origin,
        key: Option<String>,
        message: String,
    },
    /// A well-typed value outside what the key accepts.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
}

/// Line/column lookup of the keys of one recipe file.
struct SourceMap {
    path: PathBuf,
    text: String,
    /// dotted key → byte span of its value (falls back to the key's span).
    spans: BTreeMap<String, Range<usize>>,
}

impl SourceMap {
    fn new(path: &Path, text: &str) -> Self {
        let mut spans = BTreeMap::new();
        if let Ok(doc) = toml_edit::Document::parse(text) {
            if let Some(table) = doc.as_item().as_table_like() {
                collect_spans(table, "", &mut spans);
            }
        }
        Self {
            path: path.to_path_buf(),
            text: text.to_string(),
            spans,
        }
    }

    fn origin_at(&self, offset: usize) -> Origin {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        Origin::File {
            path: self.path.clone(),
            line,
            column,
        }
    }

    /// The innermost key whose key or value span contains `offset`.
    fn key_at(&self, offset: usize) -> Option<String> {
        self.spans
            .iter()
            .filter(|(_, span)| span.start <= offset && offset < span.end.max(span.start + 1))
            .max_by_key(|(key, _)| key.len())
            .map(|(key, _)| key.clone())
    }
}

fn collect_spans(
    table: &dyn toml_edit::TableLike,
    prefix: &str,
    out: &mut BTreeMap<String, Range<usize>>,
) {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        // Span covering the key and, for plain values, the value: errors point at either.
        let key_span = key.span();
        let value_span = item.span();
        let span = match (key_span, value_span) {
            (Some(k), Some(v)) if !item.is_table() => k.start.min(v.start)..k.end.max(v.end),
            (Some(k), _) => k,
            (None, Some(v)) => v,
            (None, None) => continue,
        };
        out.insert(path.clone(), span);
        if let Some(inner) = item.as_table_like() {
            collect_spans(inner, &path, out);
        }
    }
}

/// A recipe together with where each of its values came from.
#[derive(Debug, Clone)]
pub struct ResolvedRecipe {
    pub recipe: Recipe,
    /// The `--recipe` file, if any.
    pub file: Option<PathBuf>,
    /// dotted key → origin, for keys set by the file or a flag.
    origins: BTreeMap<String, Origin>,
}

impl ResolvedRecipe {
    /// The built-in defaults.
    pub fn defaults() -> Self {
        Self {
            recipe: Recipe::default(),
            file: None,
            origins: BTreeMap::new(),
        }
    }

    /// Reads and type-checks a recipe file (values are checked by [`Self::validate`]).
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(path, &text)
    }

    /// Parses recipe text; `path` is only used in messages.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, RecipeError> {
        let map = SourceMap::new(path, text);
        let recipe: Recipe = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            RecipeError::Parse {
                origin: map.origin_at(offset),
                key: map.key_at(offset),
                message: e.message().trim().to_string(),
            }
        })?;
        let origins = map
            .spans
            .iter()
            .map(|(key, span)| (key.clone(), map.origin_at(span.start)))
            .collect();
        Ok(Self {
            recipe,
            file: Some(path.to_path_buf()),
            origins,
        })
    }

    /// Records that `key` was set by command-line `flag`.
    pub fn set_by_flag(&mut self, key: &str, flag: &str) {
        self.origins
            .insert(key.to_string(), Origin::Flag(flag.to_string()));
    }

    /// Where `key` (dotted, e.g. `lora.r`) got its value.
    pub fn origin(&self, key: &str) -> Origin {
        // A value set through its whole section (`lora = { r = 0 }`) is found at the section.
        let mut k = key;
        loop {
            if let Some(o) = self.origins.get(k) {
                return o.clone();
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => return Origin::Default,
            }
        }
    }

    /// The keys set by flags, with the flag that set each.
    pub fn flag_overrides(&self) -> BTreeMap<String, String> {
        self.origins
            .iter()
            .filter_map(|(k, o)| match o {
                Origin::Flag(f) => Some((k.clone(), f.clone())),
                _ => None,
            })
            .collect()
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> RecipeError {
        RecipeError::Invalid {
            origin: self.origin(key),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Checks every value that does not need the filesystem. Returns the first problem.
    pub fn validate(&self) -> Result<(), RecipeError> {
        let r = &self.recipe;
        let positive = |key: &str, v: f64| -> Result<(), RecipeError> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(self.invalid(key, format!("must be a number > 0, got {v}")))
            }
        };
        let non_negative = |key: &str, v: f64| -> Result<(), RecipeError> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(self.invalid(key, format!("must be a number >= 0, got {v}")))
            }
        };
        let at_least_one = |key: &str, v: u64| -> Result<(), RecipeError> {
            if v >= 1 {
                Ok(())
            } else {
                Err(self.invalid(key, "must be at least 1, got 0"))
            }
        };

        if r.run.out.as_os_str().is_empty() {
            return Err(self.invalid("run.out", "must not be empty"));
        }

        // mine
        if r.mine.repo.as_os_str().is_empty() {
            return Err(self.invalid("mine.repo", "must not be empty"));
        }
        if r.mine.rev.trim().is_empty() {
            return Err(self.invalid("mine.rev", "must not be empty"));
        }
        if !(0.0..1.0).contains(&r.mine.heldout) {
            return Err(self.invalid(
                "mine.heldout",
                format!("must be in [0, 1), got {}", r.mine.heldout),
            ));
        }
        at_least_one("mine.max_files", r.mine.max_files.into())?;
        at_least_one("mine.max_lines", r.mine.max_lines.into())?;
        at_least_one("mine.max_file_bytes", r.mine.max_file_bytes)?;
        at_least_one("mine.max_line_chars", r.mine.max_line_chars.into())?;
        at_least_one("mine.max_pair_tokens", r.mine.max_pair_tokens.into())?;
        if !(r.mine.dedup_threshold > 0.0 && r.mine.dedup_threshold.is_finite()) {
            return Err(self.invalid(
                "mine.dedup_threshold",
                format!(
                    "must be a Jaccard similarity in (0, 1], or above 1 to keep near-duplicates; got {}",
                    r.mine.dedup_threshold
                ),
            ));
        }

        // model
        if r.model.base.trim().is_empty() {
            return Err(self.invalid(
                "model.base",
                "must be a preset name (tiny, tiny-random, qwen3-coder-30b-a3b, qwen3-coder-480b-a35b) or a model directory",
            ));
        }

        // lora
        if r.lora.r == 0 || r.lora.r > MAX_LORA_RANK {
            return Err(self.invalid(
                "lora.r",
                format!("must be between 1 and {MAX_LORA_RANK}, got {}", r.lora.r),
            ));
        }
        positive("lora.lora_alpha", r.lora.lora_alpha)?;
        if !(r.lora.lora_dropout.is_finite() && (0.0..1.0).contains(&r.lora.lora_dropout)) {
            return Err(self.invalid(
                "lora.lora_dropout",
                format!("must be in [0, 1), got {}", r.lora.lora_dropout),
            ));
        }
        if r.lora.target_modules.is_empty() {
            return Err(self.invalid(
                "lora.target_modules",
                format!(
                    "must name at least one of {}",
                    KNOWN_TARGET_MODULES.join(", ")
                ),
            ));
        }
        for (i, m) in r.lora.target_modules.iter().enumerate() {
            if !KNOWN_TARGET_MODULES.contains(&m.as_str()) {
                return Err(self.invalid(
                    "lora.target_modules",
                    format!(
                        "unknown module `{m}` (expected some of {})",
                        KNOWN_TARGET_MODULES.join(", ")
                    ),
                ));
            }
            if r.lora.target_modules[..i].contains(m) {
                return Err(self.invalid("lora.target_modules", format!("`{m}` is listed twice")));
            }
        }

        // train
        positive("train.lr", r.train.lr)?;
        if r.train.max_steps == 0 {
            positive("train.epochs", r.train.epochs)?;
        }
        at_least_one("train.micro_batch", r.train.micro_batch.into())?;
        at_least_one("train.grad_accum", r.train.grad_accum.into())?;
        if r.train.seq_len < 16 {
            return Err(self.invalid(
                "train.seq_len",
                format!("must be at least 16 tokens, got {}", r.train.seq_len),
            ));
        }
        non_negative("train.weight_decay", r.train.weight_decay)?;
        non_negative("train.max_grad_norm", r.train.max_grad_norm)?;
        at_least_one("train.save_every", r.train.save_every)?;
        at_least_one("train.keep_checkpoints", r.train.keep_checkpoints.into())?;
        at_least_one("train.gpus", r.train.gpus.into())?;
        at_least_one("train.tp", r.train.tp.into())?;

        // eval
        for s in &r.eval.suites {
            if !KNOWN_SUITES.contains(&s.as_str()) && !s.ends_with(".jsonl") {
                return Err(self.invalid(
                    "eval.suites",
                    format!(
                        "unknown suite `{s}` (expected {} or a user suite FILE.jsonl)",
                        KNOWN_SUITES.join(", ")
                    ),
                ));
            }
        }
        if r.eval.suites.iter().any(|s| s == "pr-replay") && r.eval.test_cmd.is_none() {
            return Err(self.invalid(
                "eval.suites",
                "the pr-replay suite runs the project's tests: set eval.test_cmd (--test-cmd)",
            ));
        }
        non_negative("eval.temperature", r.eval.temperature)?;
        if !(r.eval.top_p > 0.0 && r.eval.top_p <= 1.0) {
            return Err(self.invalid(
                "eval.top_p",
                format!("must be in (0, 1], got {}", r.eval.top_p),
            ));
        }
        at_least_one("eval.samples", r.eval.samples.into())?;
        at_least_one("eval.max_new_tokens", r.eval.max_new_tokens.into())?;
        at_least_one("eval.timeout_secs", r.eval.timeout_secs)?;
        if let Some(url) = &r.eval.endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(self.invalid(
                    "eval.endpoint",
                    format!("must be an http:// or https:// URL, got `{url}`"),
                ));
            }
        }

        // export
        if r.export.formats.is_empty() {
            return Err(self.invalid(
                "export.formats",
                "must list at least one of peft, peft-fused, merged",
            ));
        }
        let name = &r.export.adapter_name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(self.invalid(
                "export.adapter_name",
                format!(
                    "must be non-empty and use only letters, digits, `.`, `_`, `-`; got `{name}`"
                ),
            ));
        }
        Ok(())
    }

    /// The base model as a preset, or `None` when `model.base` names a directory.
    pub fn model_preset(&self) -> Option<finetune_model::Preset> {
        // `tiny-random`: the tiny shape with random weights instead of the pretrained ones.
        match self.recipe.model.base.as_str() {
            crate::tiny_base::TINY_RANDOM => Some(finetune_model::Preset::Tiny),
            name => name.parse().ok(),
        }
    }

    /// Checks that `model.base` is a preset or a directory holding a `config.json`.
    pub fn check_model_dir(&self) -> Result<(), RecipeError> {
        if self.model_preset().is_some() {
            return Ok(());
        }
        let dir = Path::new(&self.recipe.model.base);
        if !dir.is_dir() {
            return Err(self.invalid(
                "model.base",
                format!(
                    "`{}` is neither a preset (tiny, tiny-random, qwen3-coder-30b-a3b, qwen3-coder-480b-a35b) \
                     nor an existing model directory",
                    dir.display()
                ),
            ));
        }
        if !dir.join("config.json").is_file() {
            return Err(self.invalid(
                "model.base",
                format!(
                    "`{}` has no config.json: expected a Hugging Face model directory \
                     (config.json, *.safetensors, tokenizer.json)",
                    dir.display()
                ),
            ));
        }
        finetune_model::Qwen3MoeConfig::from_file(&dir.join("config.json"))
            .map_err(|e| self.invalid("model.base", e.to_string()))?;
        Ok(())
    }

    /// Checks that `mine.repo` is a git repository and `mine.rev` resolves in it.
    pub fn check_repo(&self) -> Result<finetune_mine::RepoHead, RecipeError> {
        let m = &self.recipe.mine;
        finetune_mine::resolve_head(&m.repo, &m.rev).map_err(|e| {
            let key = match e {
                finetune_mine::MineError::BadRevision { .. } => "mine.rev",
                _ => "mine.repo",
            };
            self.invalid(key, e.to_string())
        })
    }

    /// The recipe as TOML, with every key (optional keys left unset are omitted).
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.recipe).expect("a Recipe always serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ResolvedRecipe, RecipeError> {
        let r = ResolvedRecipe::from_str(Path::new("bad.toml"), text)?;
        r.validate()?;
        Ok(r)
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[lora]\nr = 8\nrank = 8\n").unwrap_err().to_string();
        assert!(err.starts_with("bad.toml:3:1: "), "{err}");
        assert!(err.contains("unknown field `rank`"), "{err}");
        assert!(err.contains("lora.rank"), "{err}");
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = parse("[trainer]\nlr = 1e-4\n").unwrap_err().to_string();
        assert!(err.starts_with("bad.toml:1:2: trainer: "), "{err}");
        assert!(err.contains("unknown field `trainer`"), "{err}");
    }

    #[test]
    fn wrong_type_names_file_line_and_key() {
        let err = parse("[train]\nseed = 1\nlr = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.toml:3:"), "{err}");
        assert!(err.contains("train.lr"), "{err}");
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn invalid_values_name_file_line_and_key() {
        for (text, line, key) in [
            ("[lora]\nr = 0\n", 2, "lora.r"),
            ("[train]\n\nlr = -1e-4\n", 3, "train.lr"),
            ("[train]\nmicro_batch = 0\n", 2, "train.micro_batch"),
            ("lora.lora_dropout = 1.5\n", 1, "lora.lora_dropout"),
            (
                "[lora]\ntarget_modules = [\"q_proj\", \"qkv\"]\n",
                2,
                "lora.target_modules",
            ),
            ("[eval]\nsuites = [\"pr-replay\"]\n", 2, "eval.suites"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, RecipeError::Invalid { .. }), "{text}: {err}");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("bad.toml:{line}:")),
                "{text}: {msg}"
            );
            assert!(msg.contains(key), "{text}: {msg}");
        }
    }

    #[test]
    fn inline_sections_are_located_too() {
        let err = parse("train = { lr = 1e-4, micro_batch = 0 }\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.toml:1:"), "{err}");
        assert!(err.contains("train.micro_batch"), "{err}");
    }

    #[test]
    fn flag_values_name_the_flag() {
        let mut r = ResolvedRecipe::defaults();
        r.recipe.lora.r = 0;
        r.set_by_flag("lora.r", "--rank");
        let err = r.validate().unwrap_err().to_string();
        assert_eq!(err, "flag --rank: lora.r: must be between 1 and 512, got 0");
    }

    #[test]
    fn missing_model_dir_names_the_key_and_line() {
        let r = parse("[model]\nbase = \"/no/such/model\"\n").unwrap();
        let err = r.check_model_dir().unwrap_err().to_string();
        assert!(err.starts_with("bad.toml:2:"), "{err}");
        assert!(err.contains("model.base"), "{err}");
        assert!(err.contains("/no/such/model"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let text = format!("[model]\nbase = \"{}\"\n", dir.path().display());
        let err = parse(&text).unwrap().check_model_dir().unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = parse(&text).unwrap().check_model_dir().unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let config = serde_json::json!({
            "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 8, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "moe_intermediate_size": 8, "num_experts_per_tok": 2,
            "num_experts": 4
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        parse(&text).unwrap().check_model_dir().unwrap();
    }

    #[test]
    fn printed_toml_reads_back_identically() {
        let mut r = ResolvedRecipe::defaults();
        r.recipe.train.max_steps = 0;
        r.recipe.eval.endpoint = Some("http://localhost:8000/v1".into());
        let text = r.to_toml();
        let back = ResolvedRecipe::from_str(Path::new("printed.toml"), &text).unwrap();
        assert_eq!(back.recipe, r.recipe);
    }

    #[test]
    fn defaults_are_valid() {
        ResolvedRecipe::defaults().validate().unwrap();
    }
}
