//! Embeds the git commit and the CUDA feature into `finetune --version`, and deflates the
//! embedded tiny base (`datasets/tiny-base/`: FP8 weights and tokenizer) into OUT_DIR for
//! `src/tiny_base.rs` (3.1 MB → 2.4 MB inside the binary).
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// Raw deflate at the best level: the same input gives the same bytes.
fn deflate(from: &Path, to: &Path) {
    let bytes = std::fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&bytes).expect("deflate in memory");
    let out = enc.finish().expect("deflate in memory");
    std::fs::write(to, out).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    println!("cargo:rerun-if-changed={}", from.display());
}

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

    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let base = Path::new(&manifest).join("../../datasets/tiny-base");
    let out = std::env::var("OUT_DIR").expect("set by cargo");
    let out = Path::new(&out);
    deflate(
        &base.join("model.fp8.safetensors"),
        &out.join("model.fp8.safetensors.deflate"),
    );
    deflate(
        &base.join("tokenizer.json"),
        &out.join("tokenizer.json.deflate"),
    );
}
