//! Compiles `kernels/*.cu` (workspace root) as C++ for the CPU, with `emu/cuda_emu.h`
//! force-included and `emu/include/` standing in for the CUDA headers the kernels use, plus
//! the fiber scheduler `emu/runtime.cpp`, into one static library.
//!
//! Two textual rewrites make CUDA's memory spaces C++ (applied to copies in `$OUT_DIR`, to
//! `.cu` and `.cuh` alike):
//! - `extern __shared__ [__align__(n)] T name[];` (dynamic shared memory) becomes
//!   `T* name = EMU_DYNAMIC_SHARED(T);`, this launch's buffer (which ends at a guard page);
//! - every other `__shared__` becomes `static thread_local`: one copy per OS thread, which the
//!   block's fibers share because a launch runs its blocks one after the other on one thread;
//!   each such declaration is followed (on the same line, so compiler messages keep the
//!   kernel's line numbers) by `EMU_POISON_SHARED(name);`, which fills the array with 0xff bytes
//!   (NaN as f32) the first time a thread of a new block passes it, as real shared memory starts
//!   with whatever the previous block left: a read before any write shows in the results.
//!
//! Compiled at -O2 whatever the profile (the tests run sizeable launches) with contraction off,
//! so a product is never fused into a sum the kernel did not write as `fmaf`.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let kernels = manifest.join("../../kernels");
    let emu = manifest.join("emu");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("kernels");
    std::fs::create_dir_all(&out).expect("create $OUT_DIR/kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", emu.display());

    let dynamic = regex::Regex::new(
        r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;",
    )
    .expect("valid regex");
    // A statement `__shared__ [__align__(n)] T a[N], b;` at the start of a line.
    let static_decl =
        regex::Regex::new(r"(?m)^([ \t]*)__shared__\s+((?:__align__\(\s*\d+\s*\)\s+)?)([^;]+);")
            .expect("valid regex");
    let mut sources = Vec::new();
    // The kernels, and the scheduler's own probes (emu/probes.cu, for tests/scheduler.rs).
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernels.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.push(emu.join("probes.cu"));
    entries.sort();
    for path in entries {
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if ext != "cu" && ext != "cuh" {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let text = dynamic.replace_all(&text, "$1* $2 = EMU_DYNAMIC_SHARED($1);");
        let text = static_decl.replace_all(&text, |c: &regex::Captures| {
            let poison: String = declared_names(&c[3])
                .iter()
                .map(|name| format!(" EMU_POISON_SHARED({name});"))
                .collect();
            format!("{}static thread_local {}{};{poison}", &c[1], &c[2], &c[3])
        });
        // What is left (comments) reads the same either way.
        let text = text.replace("__shared__", "static thread_local");
        let name = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        let copy = if ext == "cu" {
            out.join(format!("{}.cpp", name.trim_end_matches(".cu")))
        } else {
            out.join(&name)
        };
        write_if_changed(&copy, &text);
        if ext == "cu" {
            sources.push(copy);
        }
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-include")
        .flag(emu.join("cuda_emu.h").to_string_lossy().as_ref())
        .include(&out)
        .include(emu.join("include"))
        .include(&emu)
        .file(emu.join("runtime.cpp"));
    for src in &sources {
        build.file(src);
    }
    build.compile("finetune_kernel_emu");
}

/// Rewrites `path` only when its content changes, so that cc does not rebuild what is current.
fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// The names a declaration `T a[N], b, *c` declares (the identifier before each top-level
/// comma's `[` or end).
fn declared_names(declaration: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut part = String::new();
    let mut flush = |part: &mut String| {
        let head = part.split('[').next().unwrap_or("");
        let name: String = head
            .trim_end()
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !name.is_empty() {
            names.push(name);
        }
        part.clear();
    };
    for ch in declaration.chars() {
        match ch {
            '[' | '(' => depth += 1,
            ']' | ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                flush(&mut part);
                continue;
            }
            _ => {}
        }
        part.push(ch);
    }
    flush(&mut part);
    names
}
