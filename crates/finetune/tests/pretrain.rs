//! `finetune pretrain` through the binary: reproducibility on a small committed corpus, and
//! the errors of bad corpora and outputs.

mod common;
use common::{finetune, stderr};
use std::path::{Path, PathBuf};

/// A small committed corpus: this repository's finetune-data sources.
fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../finetune-data/src")
}

/// Four steps of 2 × 64 tokens on a 512-token vocabulary.
fn pretrain(out: &Path, extra: &[&str]) -> std::process::Output {
    let corpus = corpus();
    let mut args = vec![
        "pretrain",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--tokens",
        "512",
        "--vocab",
        "512",
        "--seq-len",
        "64",
        "--micro-batch",
        "2",
        "--warmup",
        "1",
        "--heldout",
        "0.2",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--eval-sequences",
        "2",
        "-q",
    ];
    args.extend_from_slice(extra);
    finetune(&args)
}

#[test]
fn pretrain_is_reproducible_and_writes_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let o = pretrain(out, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for file in [
        "model/model.safetensors",
        "model/model.fp8.safetensors",
        "model/tokenizer.json",
        "model/config.json",
    ] {
        let x = std::fs::read(a.join(file)).unwrap();
        assert!(
            x == std::fs::read(b.join(file)).unwrap(),
            "{file} differs between two runs"
        );
    }
    // The model directory is a tied-embedding checkpoint that the pipeline loads.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["vocab_size"], 512);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("pretrain.json")).unwrap()).unwrap();
    assert_eq!(report["steps"], 4);
    let seen = report["tokens_seen"].as_u64().unwrap();
    assert!(seen > 4 * 64 && seen <= 4 * 2 * 64, "{report}");
    let (init, fp8) = (
        report["heldout_loss_init"].as_f64().unwrap(),
        report["heldout_loss_fp8"].as_f64().unwrap(),
    );
    assert!(
        fp8.is_finite() && init.is_finite() && fp8 < init,
        "{report}"
    );
    let corpus: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("corpus.json")).unwrap()).unwrap();
    assert!(corpus["train_files"].as_u64().unwrap() >= 2, "{corpus}");
    // Scoring with the written model works (same loader as `finetune train --model`).
    let score_in = dir.path().join("in.jsonl");
    std::fs::write(
        &score_in,
        "{\"text\": \"pub fn pack(x: u32) -> u32 { x }\"}\n",
    )
    .unwrap();
    let score_out = dir.path().join("out.jsonl");
    let o = finetune(&[
        "score",
        "--model",
        a.join("model").to_str().unwrap(),
        "--input",
        score_in.to_str().unwrap(),
        "--out",
        score_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A second run into the same directory without --resume is refused; --resume of a
    // finished run changes nothing.
    let o = pretrain(&a, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    let before = std::fs::read(a.join("model/model.safetensors")).unwrap();
    let o = pretrain(&a, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(before == std::fs::read(a.join("model/model.safetensors")).unwrap());
}

#[test]
fn resuming_from_a_checkpoint_gives_the_uninterrupted_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (full, part) = (dir.path().join("full"), dir.path().join("part"));
    let o = pretrain(&full, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same run, cut after step 2: drop the step-4 checkpoint and the outputs, resume.
    let o = pretrain(&part, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(part.join("checkpoints/step-000004")).unwrap();
    std::fs::remove_dir_all(part.join("model")).unwrap();
    let o = pretrain(&part, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    assert!(
        std::fs::read(full.join("model/model.safetensors")).unwrap()
            == std::fs::read(part.join("model/model.safetensors")).unwrap(),
        "resumed weights differ"
    );
}

#[test]
fn bad_corpora_and_flags_fail_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not code\n").unwrap();
    let out = dir.path().join("out");
    let run = |corpus: &Path, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--tokens",
            "100",
        ];
        args.extend_from_slice(extra);
        finetune(&args)
    };
    let o = run(&empty, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no usable file") && stderr(&o).contains("empty"),
        "{}",
        stderr(&o)
    );
    let missing = dir.path().join("missing");
    let o = run(&missing, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--corpus") && stderr(&o).contains("missing"),
        "{}",
        stderr(&o)
    );
    let o = run(&corpus(), &["--preset", "huge"]);
    assert!(stderr(&o).contains("--preset"), "{}", stderr(&o));
    let o = run(&corpus(), &["--vocab", "100"]);
    assert!(stderr(&o).contains("--vocab"), "{}", stderr(&o));
    // A package whose licence is not permissive is left out and recorded.
    let gpl = dir.path().join("gpl-crate");
    std::fs::create_dir_all(gpl.join("src")).unwrap();
    std::fs::write(
        gpl.join("Cargo.toml"),
        "[package]\nname = \"gpl-crate\"\nversion = \"0.1.0\"\nlicense = \"GPL-3.0\"\n",
    )
    .unwrap();
    std::fs::write(gpl.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    let o = run(&gpl, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no usable file"), "{}", stderr(&o));
    let with_gpl = dir.path().join("with-gpl");
    let o = pretrain(&with_gpl, &["--corpus", gpl.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(with_gpl.join("corpus.json")).unwrap()).unwrap();
    let why = record["skipped_roots"]["gpl-crate"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("GPL-3.0"), "{record}");
    assert!(record["roots"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["name"] != "gpl-crate"));
}
