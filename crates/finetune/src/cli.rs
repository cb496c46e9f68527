//! Command-line interface: `finetune [run] …`, `mine`, `train`, `eval`, `export`, `plan`,
//! `schedule`, `doctor`, `score`, `bench`.
//!
//! Every stage takes the same recipe flags ([`RecipeArgs`]); each flag sets one recipe key and
//! wins over the `--recipe` file. `finetune --repo ./ --rank 16` is `finetune run --repo ./
//! --rank 16`.

use crate::recipe::{
    ComputeDtype, ExportFormat, MergedDtype, Overlong, PairFormat, RecipeError, ResolvedRecipe,
    Schedule,
};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `finetune --version`: version, git commit and whether the build has CUDA.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("FINETUNE_GIT_HASH"),
    ", cuda: ",
    env!("FINETUNE_CUDA"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "finetune",
    version = VERSION,
    about = "Fine-tune a LoRA adapter for a Qwen3-Coder MoE model on a repository's own history",
    long_about = "Fine-tune a LoRA adapter for a Qwen3-Coder MoE model on a repository's own history.\n\n\
        `finetune --repo ./ --rank 16` (the same as `finetune run --repo ./ --rank 16`) mines the \
        repository, trains the adapter, evaluates base and base+adapter side by side and exports \
        the adapter for vLLM and SGLang, all in one run directory <out>/runs/<id>/.\n\n\
        Every knob lives in a recipe (--recipe FILE, see recipes/); flags override the recipe. \
        Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted (a checkpoint was written).",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of the default `run` command.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mine, train, evaluate and export in one run directory (the default command).
    Run(RunArgs),
    /// Mine the repository's history and merged pull requests into training pairs.
    #[command(mut_arg("pair_format", |a| a.visible_alias("format")))]
    #[command(mut_arg("out", |a| a.help("Directory the pairs are written to: train.jsonl, heldout.jsonl, manifest.json.  [run.out]")))]
    Mine(MineArgs),
    /// Train the LoRA adapter on mined pairs (metrics.jsonl, checkpoints/, adapter/ in the run
    /// directory). Ctrl-C or SIGTERM writes a checkpoint and exits; --resume continues.
    Train(TrainArgs),
    /// Evaluate base and base+adapter on the eval suites and write the comparison report.
    Eval(EvalArgs),
    /// Export the adapter (PEFT, fused PEFT, merged weights) and print serve commands.
    #[command(mut_arg("export_formats", |a| a.visible_alias("format")))]
    #[command(mut_arg("adapter_name", |a| a.visible_alias("name")))]
    #[command(mut_arg("out", |a| a.help("Export directory: the export itself with one --format, one subdirectory per format with several. Default: <RUN>/export/<FORMAT>/.")))]
    #[command(mut_arg("model", |a| a.help("Base model the adapter was trained on, a Hugging Face directory (config.json, *.safetensors, tokenizer.json). Default: <RUN>/base when it exists, else the run's model.base.  [model.base]")))]
    Export(ExportArgs),
    /// Print the per-GPU memory budget and parallel layout of a model × GPU count × recipe.
    Plan(PlanArgs),
    /// Write the files that rerun `finetune run --incremental` on a schedule (cron, systemd or
    /// a Kubernetes CronJob): mine new history, warm-start from the current adapter, evaluate,
    /// promote only if better.
    Schedule(ScheduleArgs),
    /// Report this build, the CPU and the GPUs, and check each compute device against a
    /// plain reference. A new machine's first command.
    Doctor,
    /// Per-token log-probabilities of given token ids or texts under a model (and adapter).
    Score(ScoreArgs),
    /// Benchmarks (scripts/bench-gpu.sh runs them next to the PyTorch baseline).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Full-parameter training of a small preset on a code corpus, with its own byte-level
    /// BPE: how the embedded `tiny` base was made (scripts/rebuild-tiny-base.sh).
    Pretrain(crate::pretrain::PretrainArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Tokens/s of the LoRA training loop (forward, backward, clipping, AdamW: the loop of
    /// `finetune train`) on synthetic token ids; prints one JSON line with the step times.
    Train(BenchTrainArgs),
    /// Each fused op of finetune-kernels at a preset's layer shapes (forward, and forward +
    /// backward for the products) as TFLOPS or GB/s, next to candle's matmul (cuBLAS on a GPU)
    /// or an element-wise copy of the same size measured in the same run.
    Kernels(BenchKernelsArgs),
}

#[derive(Debug, Args)]
pub struct BenchKernelsArgs {
    /// Layer shapes of this preset: tiny, qwen3-coder-30b-a3b or qwen3-coder-480b-a35b.
    #[arg(long, default_value = "qwen3-coder-30b-a3b")]
    pub preset: String,
    /// Tokens (one document) per call.
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    /// Timed calls per op (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed calls first (kernel loading, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// LoRA rank of the lora_linear row.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Storage dtype of activations and weights: bf16 (GPU default) or f32 (the CPU's only).
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub dtype: Option<String>,
    /// Measure on the CPU even when the build has CUDA.
    #[arg(long)]
    pub cpu: bool,
    /// Also write one JSON object per op to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Hugging Face model directory (config.json, *.safetensors; bf16 or FP8 block-128), e.g.
    /// one written by `scripts/bench_gpu_train.py make-base`.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Tokens per sequence (one sequence, one document, per step).
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    /// Steps measured (the median step time is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    /// Steps run first and not measured (allocator and kernel-loading warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// lora_alpha (default 2·r, as scripts/bench_gpu_train.py).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Projections with adapters, comma-separated (q_proj, …, down_proj), or `all`
    /// (attention and experts).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub targets: Vec<String>,
    /// Seed of the adapter's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute each layer's activations in backward.
    #[arg(long)]
    pub recompute: bool,
    /// Let cuBLAS run f32 GEMMs on TF32 tensor cores (10-bit mantissa inputs, f32 accumulation).
    #[arg(long)]
    pub tf32: bool,
    /// Compute in bf16 (GPU only; LoRA path, softmaxes, norms' statistics and the loss in f32).
    #[arg(long)]
    pub bf16: bool,
    /// How MoE blocks run their experts: `grouped` (tokens sorted by expert, one GEMM per expert
    /// on exactly its rows; the GPU default), `grouped-manual` (the same as one autograd node
    /// with a hand-written backward; also FINETUNE_MOE_PATH=grouped-manual), `batched` (one
    /// strided-batched GEMM over groups padded to the largest) or `per-expert` (the reference
    /// loop; the CPU default).
    #[arg(long, value_name = "PATH", value_parser = ["grouped", "grouped-manual", "batched", "per-expert"])]
    pub moe: Option<String>,
    /// How attention runs: `fused` (finetune-kernels' causal_attention, flash-attention style on
    /// the GPU; the default where it covers the head dim), `tensor-core` (the same op with its
    /// WMMA kernels: bf16, head dims 64 and 128; also FINETUNE_ATTENTION_TENSOR_CORES=1) or
    /// `plain` (candle ops with a T×T mask and materialized scores: the comparison).
    #[arg(long, value_name = "PATH", value_parser = ["fused", "tensor-core", "plain"])]
    pub attention: Option<String>,
    /// How decoder layers run their attention half (input norm to residual add): `chain`
    /// (autograd ops; the default) or `manual` (one node with a hand-written backward that keeps
    /// less for the backward, finetune_kernels::attention_block; also
    /// FINETUNE_ATTENTION_BLOCK=manual; the chain where it does not apply, e.g. LoRA dropout).
    #[arg(long, value_name = "PATH", value_parser = ["chain", "manual"])]
    pub attention_block: Option<String>,
    /// After the measured steps, time the forward + loss and the backward of one more step
    /// separately (the device synchronized around each), the forward's phases per kind (each
    /// bracketed by synchronizations), the GPU memory in use before, after the forward and
    /// after the backward, and the bytes the autograd graph keeps alive for the backward (by
    /// tensor shape: also on the CPU).
    #[arg(long)]
    pub profile: bool,
    /// Benchmark the CPU even in a CUDA build.
    #[arg(long)]
    pub cpu: bool,
    /// Also write the result JSON to this file (atomically).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scheduled retraining: take <OUT>'s lock, mine only commits new since the last run into
    /// <OUT>/data, warm-start from the current adapter (<OUT>/registry.json), evaluate, and
    /// promote the new adapter (registry.json and the <OUT>/current link) only if its held-out
    /// loss beats the current one's. Nothing new to mine: nothing is trained.
    #[arg(long)]
    pub incremental: bool,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

/// Where `finetune schedule` installs the retraining job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// A crontab line.
    Cron,
    /// A systemd service and timer.
    Systemd,
    /// A Kubernetes CronJob manifest (GPU request, volumes for the repository and outputs).
    K8s,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// How often: 1d (daily at 03:00), 1w (Sundays at 03:00), Nh (every N hours) or a cron
    /// expression such as '30 2 * * *'.
    #[arg(long, value_name = "WHEN", default_value = "1d")]
    pub every: String,

    /// What to write into <OUT>/schedule/ (and print).
    #[arg(long, value_name = "KIND", default_value = "cron")]
    pub emit: Emit,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

/// Flags shared by every stage.
#[derive(Debug, Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Mined dataset directory (train.jsonl, heldout.jsonl): the --out of `finetune mine`, or
    /// <run>/data. Optional with --resume (the run's own data is used).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// Run directory to write metrics.jsonl, checkpoints/, adapter/ (and base/ for the
    /// embedded tiny model) into. Default: a new <OUT>/runs/<id>/, or the resumed run's.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,

    /// Continue a run bit-identically from a checkpoint directory (…/checkpoints/step-N) or
    /// a run directory (its newest checkpoint). Refused, naming the keys, when the recipe or
    /// the data differ from the original run's (eval_every, save_every and keep_checkpoints
    /// may change).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,

    /// Warm start from an existing PEFT adapter (e.g. the current adapter of a scheduled
    /// retraining): its rank must equal --rank and its tensors must fit the model.
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,

    /// No progress bar or per-step lines (errors and the summary are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory to evaluate: its base (base/ or the recipe's model), its adapter/ and its
    /// data/heldout.jsonl; the report is written into it.
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,

    /// PEFT adapter to evaluate against the base (default: <RUN>/adapter).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Mined dataset whose heldout.jsonl the repo-heldout suite reads (default: <RUN>/data).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// Directory the report (report.json, report.md, report.svg) is written to (default: the
    /// run directory).
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,

    /// With --endpoint: the served model name of the base (the `model` field of requests).
    #[arg(long, value_name = "NAME")]
    pub endpoint_base: Option<String>,

    /// With --endpoint: the served name of the adapter (vLLM's --lora-modules NAME=PATH).
    #[arg(long, value_name = "NAME")]
    pub endpoint_adapter: Option<String>,

    /// Requests in flight at once against --endpoint.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub concurrency: usize,

    /// Compare two earlier evaluations instead of evaluating: two run directories (or
    /// report.json files); writes a report of B against A.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    pub compare: Option<Vec<PathBuf>>,

    /// No per-suite progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Run directory to export from: its adapter/ is the adapter, its base/ (if any) the base
    /// model, and <RUN>/export/<FORMAT>/ the default output.
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,

    /// PEFT adapter directory to export (adapter_config.json, adapter_model.safetensors).
    /// Default: <RUN>/adapter.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Args)]
pub struct MineArgs {
    /// Mine only the commits after the last one recorded in <OUT>/manifest.json, and merge
    /// the new pairs into the dataset (deduplicated, re-split). Nothing changes when the
    /// repository has no new commit.
    #[arg(long)]
    pub incremental: bool,

    /// No progress bar and no summary (errors are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Worker threads (default: all cores). The pairs do not depend on it.
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Hugging Face model directory (config.json, *.safetensors; tokenizer.json for texts).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// JSONL input, one sequence per line: {"ids": [..]} or {"text": ".."}; other fields are
    /// copied to the output.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// JSONL output: each input line plus "ids" and "logprobs" (null for the first token, then
    /// log p(token | tokens before it)) and "total" (their sum).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Memory of one GPU in GiB (80 for an H100 80GB, 140 for an H200 141GB).
    #[arg(
        long,
        value_name = "GB",
        default_value_t = 80.0,
        help_heading = "Planning"
    )]
    pub gpu_mem: f64,

    /// How the base projections are stored: bf16, or fp8 (E4M3, 128×128 block scales). Default:
    /// fp8 when the model's config.json has an FP8 quantization_config, else bf16.
    #[arg(long, value_name = "FORMAT", value_parser = ["bf16", "fp8"], help_heading = "Planning")]
    pub weights: Option<String>,

    #[command(flatten)]
    pub recipe: RecipeArgs,
}

/// Parses a bool flag given as `--flag` (true) or `--flag=false`.
fn bool_flag(s: &str) -> Result<bool, String> {
    match s {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected true or false, got `{s}`")),
    }
}

/// The recipe, and one flag per recipe key. A flag that is given wins over the recipe file.
#[derive(Debug, Args, Default)]
pub struct RecipeArgs {
    /// Recipe TOML file with every knob (see recipes/); flags given here override it.
    /// Without it, the built-in defaults apply (identical to recipes/tiny-cpu.toml).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,

    /// Print the resolved recipe (defaults < --recipe < flags) as TOML and exit.
    #[arg(long)]
    pub print_recipe: bool,

    /// Root directory of run directories; each run writes <OUT>/runs/<id>/.  [run.out]
    #[arg(long, value_name = "DIR", help_heading = "Run")]
    pub out: Option<PathBuf>,

    /// Git repository to learn from (its working directory or a bare repo).  [mine.repo]
    #[arg(long, value_name = "PATH", help_heading = "Mining")]
    pub repo: Option<PathBuf>,
    /// Revision whose first-parent history is mined (branch, tag, sha).  [mine.rev]
    #[arg(long, value_name = "REV", help_heading = "Mining")]
    pub rev: Option<String>,
    /// Only changes after this date (YYYY-MM-DD) or revision.  [mine.since]
    #[arg(long, value_name = "DATE|REV", help_heading = "Mining")]
    pub since: Option<String>,
    /// Only changes up to this date (YYYY-MM-DD) or revision.  [mine.until]
    #[arg(long, value_name = "DATE|REV", help_heading = "Mining")]
    pub until: Option<String>,
    /// Only files matching these globs (repeatable or comma-separated).  [mine.paths]
    #[arg(long, value_name = "GLOB", value_delimiter = ',', num_args = 1.., help_heading = "Mining")]
    pub paths: Option<Vec<String>>,
    /// Skip files matching these globs (repeatable or comma-separated).  [mine.exclude]
    #[arg(long, value_name = "GLOB", value_delimiter = ',', num_args = 1.., help_heading = "Mining")]
    pub exclude: Option<Vec<String>>,
    /// How the edit is written as the training target.  [mine.format]
    #[arg(long, value_name = "FORMAT", help_heading = "Mining")]
    pub pair_format: Option<PairFormat>,
    /// Fraction of the most recent changes held out for evaluation, in [0, 1).  [mine.heldout]
    #[arg(long, value_name = "F", help_heading = "Mining")]
    pub heldout: Option<f64>,
    /// Skip changes touching more than N files.  [mine.max_files]
    #[arg(long, value_name = "N", help_heading = "Mining")]
    pub max_files: Option<u32>,
    /// Skip changes adding plus removing more than N lines.  [mine.max_lines]
    #[arg(long, value_name = "N", help_heading = "Mining")]
    pub max_lines: Option<u32>,
    /// Skip files larger than N bytes.  [mine.max_file_bytes]
    #[arg(long, value_name = "N", help_heading = "Mining")]
    pub max_file_bytes: Option<u64>,
    /// Skip files with a line longer than N characters (minified or generated).  [mine.max_line_chars]
    #[arg(long, value_name = "N", help_heading = "Mining")]
    pub max_line_chars: Option<u32>,
    /// Drop pairs longer than N tokens.  [mine.max_pair_tokens]
    #[arg(long, value_name = "N", help_heading = "Mining")]
    pub max_pair_tokens: Option<u32>,
    /// Skip commits by bots (dependabot, renovate, *[bot], ...); `--skip-bots=false` keeps them.  [mine.skip_bots]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_flag, help_heading = "Mining")]
    pub skip_bots: Option<bool>,
    /// Skip changes whose message says nothing ("wip", "fix", "update", "fix typo", ...).  [mine.skip_boilerplate]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_flag, help_heading = "Mining")]
    pub skip_boilerplate: Option<bool>,
    /// Skip lock files, vendored directories (vendor/, node_modules/, third_party/) and
    /// generated files (@generated markers, linguist-generated, *.min.js).  [mine.skip_generated]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_flag, help_heading = "Mining")]
    pub skip_generated: Option<bool>,
    /// Drop a pair whose edit has Jaccard similarity >= this with an older one (MinHash over
    /// word 5-grams); above 1 keeps near-duplicates.  [mine.dedup_threshold]
    #[arg(long, value_name = "J", help_heading = "Mining")]
    pub dedup_threshold: Option<f64>,

    /// Base model: `tiny` (embedded pretrained tiny Qwen3-MoE, no download), `tiny-random`
    /// (the same shape, random weights), a preset (qwen3-coder-30b-a3b,
    /// qwen3-coder-480b-a35b: random weights, for planning and benchmarks) or a Hugging Face
    /// model directory (config.json, *.safetensors, tokenizer.json).  [model.base]
    #[arg(long, value_name = "PRESET|DIR", help_heading = "Model")]
    pub model: Option<String>,

    /// LoRA rank r, 1..=512.  [lora.r]
    #[arg(long, value_name = "R", help_heading = "LoRA")]
    pub rank: Option<u32>,
    /// LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).  [lora.lora_alpha]
    #[arg(long, value_name = "ALPHA", help_heading = "LoRA")]
    pub lora_alpha: Option<f64>,
    /// Projections to adapt, comma-separated: q_proj,k_proj,v_proj,o_proj (attention),
    /// gate_proj,up_proj,down_proj (every expert).  [lora.target_modules]
    #[arg(long, value_name = "MODULES", value_delimiter = ',', num_args = 1.., help_heading = "LoRA")]
    pub target_modules: Option<Vec<String>>,
    /// Dropout on the LoRA input, in [0, 1).  [lora.lora_dropout]
    #[arg(long, value_name = "P", help_heading = "LoRA")]
    pub lora_dropout: Option<f64>,
    /// Rank-stabilised LoRA scaling alpha/sqrt(r).  [lora.use_rslora]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_flag, help_heading = "LoRA")]
    pub use_rslora: Option<bool>,

    /// Peak learning rate.  [train.lr]
    #[arg(
        long,
        value_name = "LR",
        allow_hyphen_values = true,
        help_heading = "Training"
    )]
    pub lr: Option<f64>,
    /// Learning-rate schedule after warmup.  [train.schedule]
    #[arg(long, value_name = "SCHEDULE", help_heading = "Training")]
    pub schedule: Option<Schedule>,
    /// Linear warmup steps.  [train.warmup]
    #[arg(long, value_name = "STEPS", help_heading = "Training")]
    pub warmup: Option<u64>,
    /// Optimizer steps; 0 trains for --epochs passes instead.  [train.max_steps]
    #[arg(long, value_name = "STEPS", help_heading = "Training")]
    pub max_steps: Option<u64>,
    /// Passes over the training pairs, used when max_steps is 0.  [train.epochs]
    #[arg(
        long,
        value_name = "N",
        allow_hyphen_values = true,
        help_heading = "Training"
    )]
    pub epochs: Option<f64>,
    /// Packed sequences per micro-batch.  [train.micro_batch]
    #[arg(long, value_name = "N", help_heading = "Training")]
    pub micro_batch: Option<u32>,
    /// Micro-batches accumulated per optimizer step.  [train.grad_accum]
    #[arg(long, value_name = "N", help_heading = "Training")]
    pub grad_accum: Option<u32>,
    /// Tokens per packed sequence.  [train.seq_len]
    #[arg(long, value_name = "TOKENS", help_heading = "Training")]
    pub seq_len: Option<u32>,
    /// A pair longer than --seq-len: `truncate` cuts its context (never the instruction or
    /// the target) or drops it when that is not enough; `truncate-target` also cuts the end of
    /// the target; `drop` drops it. All are counted.  [train.overlong]
    #[arg(long, value_name = "POLICY", help_heading = "Training")]
    pub overlong: Option<Overlong>,
    /// Seed of LoRA initialisation, dropout and data order.  [train.seed]
    #[arg(long, value_name = "SEED", help_heading = "Training")]
    pub seed: Option<u64>,
    /// Recompute each layer's activations in backward (less memory, ~30% more compute).  [train.recompute]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_flag, help_heading = "Training")]
    pub recompute: Option<bool>,
    /// Compute dtype (master weights and Adam moments are always f32).  [train.dtype]
    #[arg(long, value_name = "DTYPE", help_heading = "Training")]
    pub dtype: Option<ComputeDtype>,
    /// AdamW decoupled weight decay.  [train.weight_decay]
    #[arg(
        long,
        value_name = "WD",
        allow_hyphen_values = true,
        help_heading = "Training"
    )]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value (0 disables).  [train.max_grad_norm]
    #[arg(
        long,
        value_name = "NORM",
        allow_hyphen_values = true,
        help_heading = "Training"
    )]
    pub max_grad_norm: Option<f64>,
    /// Held-out loss every N steps (0: only at the end).  [train.eval_every]
    #[arg(long, value_name = "STEPS", help_heading = "Training")]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps.  [train.save_every]
    #[arg(long, value_name = "STEPS", help_heading = "Training")]
    pub save_every: Option<u64>,
    /// Checkpoints kept (older ones are deleted).  [train.keep_checkpoints]
    #[arg(long, value_name = "N", help_heading = "Training")]
    pub keep_checkpoints: Option<u32>,
    /// GPUs used in this process (one worker thread each; on a CPU build, N ranks as threads
    /// with in-process collectives).  [train.gpus]
    #[arg(long, value_name = "N", help_heading = "Training")]
    pub gpus: Option<u32>,
    /// Tensor-parallel ranks: attention heads split over them; divides --ep.  [train.tp]
    #[arg(long, value_name = "N", help_heading = "Training")]
    pub tp: Option<u32>,
    /// Expert-parallel ranks: experts split over them (0: all ranks).  [train.ep]
    #[arg(long, value_name = "N", help_heading = "Training")]
    pub ep: Option<u32>,

    /// Eval suites, comma-separated: repo-heldout, pr-replay, humaneval, or a user suite
    /// FILE.jsonl.  [eval.suites]
    #[arg(long, value_name = "SUITES", value_delimiter = ',', num_args = 1.., help_heading = "Evaluation")]
    pub suites: Option<Vec<String>>,
    /// At most N examples per suite.  [eval.max_examples]
    #[arg(long, value_name = "N", help_heading = "Evaluation")]
    pub max_examples: Option<u32>,
    /// Generation length limit.  [eval.max_new_tokens]
    #[arg(long, value_name = "N", help_heading = "Evaluation")]
    pub max_new_tokens: Option<u32>,
    /// Sampling temperature (0: greedy).  [eval.temperature]
    #[arg(
        long,
        value_name = "T",
        allow_hyphen_values = true,
        help_heading = "Evaluation"
    )]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold, in (0, 1].  [eval.top_p]
    #[arg(long, value_name = "P", help_heading = "Evaluation")]
    pub top_p: Option<f64>,
    /// Samples per problem (pass@k needs samples >= k).  [eval.samples]
    #[arg(long, value_name = "N", help_heading = "Evaluation")]
    pub samples: Option<u32>,
    /// OpenAI-compatible server to generate with instead of the built-in sampler.  [eval.endpoint]
    #[arg(long, value_name = "URL", help_heading = "Evaluation")]
    pub endpoint: Option<String>,
    /// Test command for the pr-replay suite, run in the repository after applying an edit.  [eval.test_cmd]
    #[arg(long, value_name = "CMD", help_heading = "Evaluation")]
    pub test_cmd: Option<String>,
    /// Time limit for one sandboxed execution, in seconds.  [eval.timeout_secs]
    #[arg(long, value_name = "SECS", help_heading = "Evaluation")]
    pub eval_timeout: Option<u64>,

    /// What to export, comma-separated.  [export.formats]
    #[arg(long, value_name = "FORMATS", value_delimiter = ',', num_args = 1.., help_heading = "Export")]
    pub export_formats: Option<Vec<ExportFormat>>,
    /// Dtype of a merged checkpoint: bf16, fp8 (E4M3 with 128x128 block scales) or f32.  [export.merged_dtype]
    #[arg(long, value_name = "DTYPE", help_heading = "Export")]
    pub merged_dtype: Option<MergedDtype>,
    /// Name the adapter is served under (vLLM --lora-modules NAME=PATH).  [export.adapter_name]
    #[arg(long, value_name = "NAME", help_heading = "Export")]
    pub adapter_name: Option<String>,
    /// Replace an existing export directory (refused otherwise).  [export.force]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_flag, help_heading = "Export")]
    pub force: Option<bool>,
}

impl RecipeArgs {
    /// Defaults, then `--recipe`, then every flag given; validated.
    pub fn resolve(&self) -> Result<ResolvedRecipe, RecipeError> {
        let mut resolved = match &self.recipe {
            Some(path) => ResolvedRecipe::from_file(path)?,
            None => ResolvedRecipe::defaults(),
        };
        self.apply(&mut resolved);
        resolved.validate()?;
        Ok(resolved)
    }

    /// Writes every flag that was given into the recipe and records its origin.
    fn apply(&self, resolved: &mut ResolvedRecipe) {
        let mut set: Vec<(&str, &str)> = Vec::new();
        let r = &mut resolved.recipe;
        macro_rules! flag {
            ($field:ident, $flag:literal, $key:literal => $($target:tt)+) => {
                if let Some(v) = &self.$field {
                    r.$($target)+ = v.clone().into();
                    set.push(($key, $flag));
                }
            };
        }
        flag!(out, "--out", "run.out" => run.out);
        flag!(repo, "--repo", "mine.repo" => mine.repo);
        flag!(rev, "--rev", "mine.rev" => mine.rev);
        flag!(since, "--since", "mine.since" => mine.since);
        flag!(until, "--until", "mine.until" => mine.until);
        flag!(paths, "--paths", "mine.paths" => mine.paths);
        flag!(exclude, "--exclude", "mine.exclude" => mine.exclude);
        flag!(pair_format, "--pair-format", "mine.format" => mine.format);
        flag!(heldout, "--heldout", "mine.heldout" => mine.heldout);
        flag!(max_files, "--max-files", "mine.max_files" => mine.max_files);
        flag!(max_lines, "--max-lines", "mine.max_lines" => mine.max_lines);
        flag!(max_file_bytes, "--max-file-bytes", "mine.max_file_bytes" => mine.max_file_bytes);
        flag!(max_line_chars, "--max-line-chars", "mine.max_line_chars" => mine.max_line_chars);
        flag!(max_pair_tokens, "--max-pair-tokens", "mine.max_pair_tokens" => mine.max_pair_tokens);
        flag!(skip_bots, "--skip-bots", "mine.skip_bots" => mine.skip_bots);
        flag!(skip_boilerplate, "--skip-boilerplate", "mine.skip_boilerplate" => mine.skip_boilerplate);
        flag!(skip_generated, "--skip-generated", "mine.skip_generated" => mine.skip_generated);
        flag!(dedup_threshold, "--dedup-threshold", "mine.dedup_threshold" => mine.dedup_threshold);
        flag!(model, "--model", "model.base" => model.base);
        flag!(rank, "--rank", "lora.r" => lora.r);
        flag!(lora_alpha, "--lora-alpha", "lora.lora_alpha" => lora.lora_alpha);
        flag!(target_modules, "--target-modules", "lora.target_modules" => lora.target_modules);
        flag!(lora_dropout, "--lora-dropout", "lora.lora_dropout" => lora.lora_dropout);
        flag!(use_rslora, "--use-rslora", "lora.use_rslora" => lora.use_rslora);
        flag!(lr, "--lr", "train.lr" => train.lr);
        flag!(schedule, "--schedule", "train.schedule" => train.schedule);
        flag!(warmup, "--warmup", "train.warmup" => train.warmup);
        flag!(max_steps, "--max-steps", "train.max_steps" => train.max_steps);
        flag!(epochs, "--epochs", "train.epochs" => train.epochs);
        flag!(micro_batch, "--micro-batch", "train.micro_batch" => train.micro_batch);
        flag!(grad_accum, "--grad-accum", "train.grad_accum" => train.grad_accum);
        flag!(seq_len, "--seq-len", "train.seq_len" => train.seq_len);
        flag!(overlong, "--overlong", "train.overlong" => train.overlong);
        flag!(seed, "--seed", "train.seed" => train.seed);
        flag!(recompute, "--recompute", "train.recompute" => train.recompute);
        flag!(dtype, "--dtype", "train.dtype" => train.dtype);
        flag!(weight_decay, "--weight-decay", "train.weight_decay" => train.weight_decay);
        flag!(max_grad_norm, "--max-grad-norm", "train.max_grad_norm" => train.max_grad_norm);
        flag!(eval_every, "--eval-every", "train.eval_every" => train.eval_every);
        flag!(save_every, "--save-every", "train.save_every" => train.save_every);
        flag!(keep_checkpoints, "--keep-checkpoints", "train.keep_checkpoints" => train.keep_checkpoints);
        flag!(gpus, "--gpus", "train.gpus" => train.gpus);
        flag!(tp, "--tp", "train.tp" => train.tp);
        flag!(ep, "--ep", "train.ep" => train.ep);
        flag!(suites, "--suites", "eval.suites" => eval.suites);
        flag!(max_examples, "--max-examples", "eval.max_examples" => eval.max_examples);
        flag!(max_new_tokens, "--max-new-tokens", "eval.max_new_tokens" => eval.max_new_tokens);
        flag!(temperature, "--temperature", "eval.temperature" => eval.temperature);
        flag!(top_p, "--top-p", "eval.top_p" => eval.top_p);
        flag!(samples, "--samples", "eval.samples" => eval.samples);
        flag!(endpoint, "--endpoint", "eval.endpoint" => eval.endpoint);
        flag!(test_cmd, "--test-cmd", "eval.test_cmd" => eval.test_cmd);
        flag!(eval_timeout, "--eval-timeout", "eval.timeout_secs" => eval.timeout_secs);
        flag!(export_formats, "--export-formats", "export.formats" => export.formats);
        flag!(merged_dtype, "--merged-dtype", "export.merged_dtype" => export.merged_dtype);
        flag!(adapter_name, "--adapter-name", "export.adapter_name" => export.adapter_name);
        flag!(force, "--force", "export.force" => export.force);
        for (key, flag) in set {
            resolved.set_by_flag(key, flag);
        }
    }
}
