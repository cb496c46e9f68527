//! The `finetune` binary end to end: flags, recipes, exit codes, run directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn finetune(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("finetune runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn recipes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../recipes")
        .canonicalize()
        .unwrap()
}

/// A git repository with two commits, fixed author and dates.
fn git_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .env("GIT_AUTHOR_NAME", "Fixture Author")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_COMMITTER_NAME", "Fixture Author")
            .env("GIT_COMMITTER_EMAIL", "author@example.com")
            .env("GIT_AUTHOR_DATE", "2024-01-02T03:04:05Z")
            .env("GIT_COMMITTER_DATE", "2024-01-02T03:04:05Z")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(dir.path().join("lib.rs"), "fn a() {}\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "Add a"]);
    std::fs::write(dir.path().join("lib.rs"), "fn a() {}\nfn b() {}\n").unwrap();
    git(&["commit", "-q", "-am", "Add b"]);
    dir
}

fn head(repo: &Path) -> String {
    let o = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo)
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn run_dirs(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(out.join("runs")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn version_names_the_commit_and_cuda() {
    let o = finetune(Path::new("."), &["--version"]);
    assert!(o.status.success());
    let v = stdout(&o);
    assert!(
        v.starts_with(&format!("finetune {} (git ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(v.contains(", cuda: no)"), "{v}");
}

#[test]
fn help_documents_every_flag_of_every_command() {
    use clap::CommandFactory;
    let root = finetune::cli::Cli::command();
    let mut commands = vec![root.clone()];
    commands.extend(root.get_subcommands().cloned());
    for cmd in commands {
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                !help.trim().is_empty(),
                "`finetune {}` flag --{} has no help",
                cmd.get_name(),
                arg.get_id()
            );
        }
    }
    // And the rendered help really shows them.
    let o = finetune(Path::new("."), &["--help"]);
    let text = stdout(&o);
    for flag in [
        "--repo",
        "--rank",
        "--recipe",
        "--print-recipe",
        "--lr",
        "--out",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn main_job_mines_trains_evaluates_and_exports_in_its_run_directory() {
    let repo = git_fixture();
    let out = tempfile::tempdir().unwrap();
    let out_arg = out.path().to_str().unwrap();
    let o = finetune(
        repo.path(),
        &[
            "--repo",
            "./",
            "--rank",
            "16",
            "--out",
            out_arg,
            "--max-steps",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let dirs = run_dirs(out.path());
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dirs[0].join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["recipe"]["lora"]["r"], 16);
    assert_eq!(manifest["repo"]["commit"], head(repo.path()));
    assert_eq!(manifest["repo"]["reference"], "refs/heads/main");
    assert_eq!(manifest["tool"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(manifest["flag_overrides"]["lora.r"], "--rank");
    assert_eq!(
        manifest["stages_completed"],
        serde_json::json!(["mine", "train", "eval", "export"])
    );
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "train.json",
        "base/config.json",
        "base/model.safetensors",
        "base/tokenizer.json",
        "checkpoints/step-000002/trainer_state.json",
        "report.json",
        "report.md",
        "report.svg",
        "export/peft/adapter_config.json",
        "export/peft/adapter_model.safetensors",
    ] {
        assert!(dirs[0].join(file).is_file(), "{file} missing");
    }
    assert!(stdout(&o).contains("train: 2 steps"), "{}", stdout(&o));
    // The export's serve commands: vLLM's smallest --max-lora-rank >= 16 is 16.
    assert!(
        stdout(&o).contains("--enable-lora --lora-modules finetune=")
            && stdout(&o).contains("--max-lora-rank 16"),
        "{}",
        stdout(&o)
    );
    let data = dirs[0].join("data");
    let mined: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(mined["repo"]["commit"], head(repo.path()));
    assert_eq!(mined["counts"]["commits"], 2);
    let pairs = std::fs::read_to_string(data.join("train.jsonl")).unwrap()
        + &std::fs::read_to_string(data.join("heldout.jsonl")).unwrap();
    assert_eq!(pairs.lines().count(), 2, "{pairs}");
    assert!(manifest["host"]["name"].as_str().is_some());
    assert!(manifest["started_at"].as_str().unwrap().ends_with('Z'));
    let first = std::fs::read(dirs[0].join("manifest.json")).unwrap();

    // A second run gets its own directory and leaves the first untouched.
    let o = finetune(
        repo.path(),
        &[
            "--repo",
            "./",
            "--rank",
            "8",
            "--out",
            out_arg,
            "--max-steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dirs2 = run_dirs(out.path());
    assert_eq!(dirs2.len(), 2, "{dirs2:?}");
    assert_eq!(std::fs::read(dirs[0].join("manifest.json")).unwrap(), first);
    assert!(dirs2
        .iter()
        .all(|d| !d.file_name().unwrap().to_string_lossy().starts_with('.')));
}

#[test]
fn bad_repo_fails_before_anything_is_written() {
    let not_a_repo = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = finetune(
        not_a_repo.path(),
        &["--repo", "./", "--out", out.path().to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("flag --repo: mine.repo"), "{e}");
    assert!(e.contains("not a git repository"), "{e}");
    assert!(!out.path().join("runs").exists());

    let repo = git_fixture();
    let o = finetune(
        repo.path(),
        &["--rev", "nope", "--out", out.path().to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("flag --rev: mine.rev"),
        "{}",
        stderr(&o)
    );
    assert!(!out.path().join("runs").exists());
}

#[test]
fn print_recipe_applies_flags_over_the_file() {
    let recipe = recipes_dir().join("qwen3-coder-30b-a3b-1xh100.toml");
    let o = finetune(
        Path::new("."),
        &[
            "run",
            "--recipe",
            recipe.to_str().unwrap(),
            "--print-recipe",
            "--rank",
            "8",
            "--target-modules",
            "q_proj,v_proj",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let printed: toml::Value = toml::from_str(&stdout(&o)).unwrap();
    assert_eq!(printed["lora"]["r"].as_integer(), Some(8));
    assert_eq!(
        printed["lora"]["target_modules"],
        toml::Value::Array(vec!["q_proj".into(), "v_proj".into()])
    );
    // Everything else comes from the file.
    assert_eq!(printed["train"]["seq_len"].as_integer(), Some(4096));
    assert_eq!(
        printed["model"]["base"].as_str(),
        Some("models/Qwen3-Coder-30B-A3B-Instruct")
    );
}

#[test]
fn bad_recipes_name_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "[lora]\nrank = 8\n",
            "unknown.toml:2:1: lora.rank",
        ),
        (
            "type.toml",
            "[train]\nlr = \"high\"\n",
            "type.toml:2:6: train.lr",
        ),
        ("rank.toml", "[lora]\nr = 0\n", "rank.toml:2:1: lora.r"),
        (
            "lr.toml",
            "[train]\nseed = 1\nlr = -0.1\n",
            "lr.toml:3:1: train.lr",
        ),
        (
            "mb.toml",
            "[train]\nmicro_batch = 0\n",
            "mb.toml:2:1: train.micro_batch",
        ),
        (
            "model.toml",
            "[model]\nbase = \"no/such/dir\"\n",
            "model.toml:2:1: model.base",
        ),
    ];
    let repo = git_fixture();
    for (name, text, expected) in cases {
        std::fs::write(dir.path().join(name), text).unwrap();
        let o = finetune(
            dir.path(),
            &[
                "--recipe",
                name,
                "--repo",
                repo.path().to_str().unwrap(),
                "--out",
                "out",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{name}: {}", stderr(&o));
        assert!(!dir.path().join("out").exists(), "{name} wrote output");
    }
}

#[test]
fn bad_flag_values_name_the_flag() {
    for (args, expected) in [
        (&["--rank", "0"][..], "flag --rank: lora.r"),
        (&["--lr", "-1e-4"][..], "flag --lr: train.lr"),
        (
            &["--micro-batch", "0"][..],
            "flag --micro-batch: train.micro_batch",
        ),
        (
            &["--model", "/no/such/model"][..],
            "flag --model: model.base",
        ),
    ] {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        let o = finetune(Path::new("."), &all);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn plan_prints_the_budget_and_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let o = finetune(
        dir.path(),
        &[
            "plan",
            "--model",
            "qwen3-coder-30b-a3b",
            "--gpus",
            "1",
            "--gpu-mem",
            "80",
            "--seq-len",
            "4096",
            "--micro-batch",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // The hand calculation of finetune-train's plan test: 61.06e9 bytes of bf16 weights = 56.9 GiB.
    assert!(out.contains("| base weights | 56.9 GiB |"), "{out}");
    assert!(out.contains("recompute on; FITS"), "{out}");
    let o = finetune(
        dir.path(),
        &[
            "plan",
            "--model",
            "qwen3-coder-480b-a35b",
            "--gpus",
            "8",
            "--gpu-mem",
            "80",
            "--weights",
            "fp8",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("tensor parallel 8 × experts expert parallel 8"),
        "{}",
        stdout(&o)
    );
    assert!(
        !dir.path().join("finetune-out").exists(),
        "plan writes nothing"
    );
}

#[test]
fn stage_specific_format_aliases() {
    let o = finetune(
        Path::new("."),
        &["mine", "--format", "udiff", "--print-recipe"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("format = \"udiff\""), "{}", stdout(&o));
    let o = finetune(
        Path::new("."),
        &["export", "--format", "peft,merged", "--print-recipe"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("formats = [\"peft\", \"merged\"]"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn doctor_checks_the_cpu() {
    let o = finetune(Path::new("."), &["doctor"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("cpu: f32 matmul check ok"), "{text}");
    assert!(text.contains("cuda: not in this build"), "{text}");
    // The parallel step in f32 and, as GPU ranks compute, in bf16 (relative to the bf16 step).
    for dtype in ["F32", "BF16"] {
        for layout in ["single rank", "ep 2", "tp 2 × ep 2", "dp 2"] {
            let want = format!("cpu: parallel step {dtype}, {layout}: ok");
            assert!(text.contains(&want), "{want}\n{text}");
        }
    }
    assert!(text.contains("max relative diff"), "{text}");
}

#[test]
fn mine_writes_the_dataset_and_incremental_says_up_to_date() {
    let repo = git_fixture();
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("pairs");
    let data_arg = data.to_str().unwrap();
    let o = finetune(
        repo.path(),
        &[
            "mine", "--repo", ".", "--out", data_arg, "--format", "udiff",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("mine: 2 commits"), "{}", stdout(&o));
    let text = std::fs::read_to_string(data.join("train.jsonl")).unwrap()
        + &std::fs::read_to_string(data.join("heldout.jsonl")).unwrap();
    let pairs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(pairs.len(), 2);
    assert!(pairs.iter().all(|p| p["format"] == "udiff"));
    assert!(pairs.iter().any(
        |p| p["instruction"] == "Add b" && p["target"].as_str().unwrap().contains("+fn b() {}")
    ));

    let before = std::fs::read(data.join("manifest.json")).unwrap();
    let o = finetune(
        repo.path(),
        &[
            "mine",
            "--repo",
            ".",
            "--out",
            data_arg,
            "--format",
            "udiff",
            "--incremental",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("up to date"), "{}", stdout(&o));
    assert_eq!(std::fs::read(data.join("manifest.json")).unwrap(), before);

    let o = finetune(
        repo.path(),
        &["mine", "--repo", ".", "--out", data_arg, "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
}

/// `finetune score` on the transformers fixture: log-probabilities equal those of the reference
/// logits, with and without a PEFT adapter written from the reference LoRA tensors.
#[test]
fn score_matches_the_reference_logits_with_and_without_an_adapter() {
    use candle_core::{Device, Tensor};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/fixtures/tiny-qwen3-moe")
        .canonicalize()
        .unwrap();
    let r = candle_core::safetensors::load(fixtures.join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let pos: Vec<i64> = r["position_ids"].to_vec1().unwrap();
    let first_doc = pos.iter().skip(1).position(|&p| p == 0).unwrap() + 1;
    let ids: Vec<i64> = r["input_ids"].to_vec1::<i64>().unwrap()[..first_doc].to_vec();
    let doc_ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let expected = |logits: &Tensor| -> Vec<f64> {
        finetune_model::Qwen3Moe::token_logprobs(&logits.narrow(0, 0, first_doc).unwrap(), &doc_ids)
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        format!("{}\n", serde_json::json!({"ids": ids, "name": "doc1"})),
    )
    .unwrap();

    // A PEFT adapter directory made from the reference's LoRA tensors.
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in r
        .keys()
        .filter_map(|k| k.strip_prefix("lora.").and_then(|k| k.strip_suffix(".A")))
    {
        for which in ["A", "B"] {
            tensors.insert(
                format!("base_model.model.{name}.lora_{which}.weight"),
                r[&format!("lora.{name}.{which}")].clone(),
            );
        }
    }
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors")).unwrap();
    let scale = r["lora_scale"].to_vec1::<f32>().unwrap()[0] as f64;
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::json!({"r": 4, "lora_alpha": 4.0 * scale, "peft_type": "LORA"}).to_string(),
    )
    .unwrap();

    for (adapter_arg, logits) in [(None, &r["logits"]), (Some(&adapter), &r["logits_lora"])] {
        let out = dir.path().join("out.jsonl");
        let mut args = vec![
            "score".to_string(),
            "--model".into(),
            fixtures.join("bf16").display().to_string(),
            "--input".into(),
            input.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(a) = adapter_arg {
            args.extend(["--adapter".into(), a.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = finetune(dir.path(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
        assert_eq!(line["name"], "doc1");
        let got: Vec<Option<f64>> = serde_json::from_value(line["logprobs"].clone()).unwrap();
        assert_eq!(got[0], None);
        let want = expected(logits);
        let worst = got[1..]
            .iter()
            .zip(&want)
            .map(|(g, w)| (g.unwrap() - w).abs())
            .fold(0f64, f64::max);
        assert!(
            worst < 1e-4,
            "adapter {adapter_arg:?}: log-probs differ by {worst}"
        );
    }
}
