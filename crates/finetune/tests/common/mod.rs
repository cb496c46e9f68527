//! Helpers shared by the integration tests that train: the binary, a mined git fixture, fast
//! training flags.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn finetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(args)
        .output()
        .expect("finetune runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Commits `add_{i}` for i in `range` to the repository at `repo` (created on first use):
/// each appends one small function to lib.rs, on day i + 2 of January 2024, fixed author.
pub fn add_commits(repo: &Path, range: std::ops::Range<usize>) {
    let git = |args: &[&str], date: &str| {
        let o = Command::new("git")
            .args(args)
            .current_dir(repo)
            .env("GIT_AUTHOR_NAME", "Fixture Author")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_COMMITTER_NAME", "Fixture Author")
            .env("GIT_COMMITTER_EMAIL", "author@example.com")
            .env("GIT_AUTHOR_DATE", date)
            .env("GIT_COMMITTER_DATE", date)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
    };
    if !repo.join(".git").exists() {
        std::fs::create_dir_all(repo).unwrap();
        git(&["init", "-q", "-b", "main"], "2024-01-01T00:00:00Z");
        std::fs::write(repo.join("lib.rs"), "pub fn base() -> u32 {\n    0\n}\n").unwrap();
    }
    let mut body = std::fs::read_to_string(repo.join("lib.rs")).unwrap();
    for i in range {
        body.push_str(&format!(
            "\n/// Adds {i} to x.\npub fn add_{i}(x: u32) -> u32 {{\n    x + {i}\n}}\n"
        ));
        std::fs::write(repo.join("lib.rs"), &body).unwrap();
        git(&["add", "."], "2024-01-01T00:00:00Z");
        let date = format!("2024-{:02}-{:02}T10:00:00Z", 1 + i / 28, 1 + i % 28);
        git(&["commit", "-q", "-m", &format!("Add add_{i}")], &date);
    }
}

/// A repository of 12 small commits (fixed author and dates), mined into `<dir>/data`.
pub fn mined(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    add_commits(&repo, 0..12);
    let data = dir.join("data");
    let o = finetune(&[
        "mine",
        "--repo",
        repo.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "-q",
        "--heldout",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    data
}

/// Small, fast training flags.
pub const FAST: &[&str] = &[
    "--rank",
    "4",
    "--seq-len",
    "384",
    "--micro-batch",
    "1",
    "--warmup",
    "1",
    "--lr",
    "1e-2",
    "-q",
];

/// `FAST` with the flags `extra` sets left out, then `extra`.
pub fn fast_with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < FAST.len() {
        let takes_value = FAST[i].starts_with("--")
            && FAST
                .get(i + 1)
                .is_some_and(|v| !v.starts_with('-') || v.parse::<f64>().is_ok());
        let n = if takes_value { 2 } else { 1 };
        if !extra.contains(&FAST[i]) {
            args.extend_from_slice(&FAST[i..i + n]);
        }
        i += n;
    }
    args.extend_from_slice(extra);
    args
}

pub fn train(data: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    args.extend(fast_with(extra));
    finetune(&args)
}

pub fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `finetune train --resume TARGET` with the fast flags, `extra` overriding them.
pub fn resume(target: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--resume", target.to_str().unwrap()];
    args.extend(fast_with(extra));
    finetune(&args)
}
