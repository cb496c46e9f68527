//! Embeds the git commit and the CUDA feature into `finetune --version`.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let hash = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FINETUNE_GIT_HASH={hash}");
    let cuda = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        "yes"
    } else {
        "no"
    };
    println!("cargo:rustc-env=FINETUNE_CUDA={cuda}");
    // Rebuild when HEAD moves: HEAD itself (branch switch) and the ref it points at (commit).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={git_dir}/{reference}");
        }
        println!("cargo:rerun-if-changed={git_dir}/packed-refs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
