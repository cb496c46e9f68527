//! Every recipe in recipes/ loads, validates, has its launch command in its header and a
//! comment on every knob; tiny-cpu.toml is exactly the built-in defaults.

use finetune::recipe::{Recipe, ResolvedRecipe};
use std::path::{Path, PathBuf};

fn recipe_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_recipe_loads_and_validates() {
    let files = recipe_files();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "tiny-cpu.toml",
        "qwen3-coder-30b-a3b-1xh100.toml",
        "qwen3-coder-480b-fp8-8xh100.toml",
        "qwen3-coder-480b-fp8-8xh200.toml",
    ] {
        assert!(names.iter().any(|n| n == expected), "missing {expected}");
    }
    for file in &files {
        let r = ResolvedRecipe::from_file(file).unwrap_or_else(|e| panic!("{e}"));
        r.validate().unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn every_recipe_header_has_its_launch_command() {
    for file in recipe_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with('#') || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let name = file.file_name().unwrap().to_string_lossy();
        let launch = format!("finetune --repo ./ --recipe recipes/{name}");
        assert!(header.contains(&launch), "{name}: header lacks `{launch}`");
    }
}

#[test]
fn every_knob_is_commented() {
    for file in recipe_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') || t.starts_with('[') {
                continue;
            }
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "{}:{}: `{t}` has no comment above it",
                file.display(),
                i + 1
            );
        }
    }
}

#[test]
fn tiny_cpu_is_the_builtin_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/tiny-cpu.toml");
    let r = ResolvedRecipe::from_file(&path).unwrap();
    assert_eq!(r.recipe, Recipe::default());
}
