//! Scoring a generated edit against the real change.
//!
//! - applies cleanly: SEARCH/REPLACE — every block names a file the change touches (or a new
//!   file, empty SEARCH) and its SEARCH text occurs in that file as it was before the change
//!   (`git show <commit>^:<path>`); unified diff — `git apply --check` on those files.
//! - exact match: the generated target equals the real one, ignoring trailing whitespace on
//!   each line and at the end.
//! - similarity: line-level ratio 2·M / (a + b), M the lines the two texts share in their
//!   longest common subsequence (imara-diff's Myers), a and b their line counts (difflib's
//!   `SequenceMatcher.ratio` over lines; 1 for two empty texts).

use crate::EvalError;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// One SEARCH/REPLACE block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub path: String,
    pub search: String,
    pub replace: String,
}

/// The blocks in `text`; `None` when it is not well-formed (a block without its separator or
/// end marker, or without a path line before it).
pub fn parse_search_replace(text: &str) -> Option<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("<<<<<<< SEARCH\n") {
        let path = rest[..i].trim_end().rsplit('\n').next()?.trim().to_string();
        if path.is_empty() {
            return None;
        }
        rest = &rest[i + "<<<<<<< SEARCH\n".len()..];
        let (search, r) = rest.split_once("=======\n")?;
        let (replace, r) = r.split_once(">>>>>>> REPLACE")?;
        rest = r.strip_prefix('\n').unwrap_or(r);
        blocks.push(Block {
            path,
            search: search.to_string(),
            replace: replace.to_string(),
        });
    }
    (!blocks.is_empty()).then_some(blocks)
}

/// Applies `blocks` to `files` (path → content before the change); `None` when a SEARCH text
/// is not found.
pub fn apply_blocks(
    files: &HashMap<String, String>,
    blocks: &[Block],
) -> Option<HashMap<String, String>> {
    let mut out = files.clone();
    for b in blocks {
        if b.search.is_empty() {
            out.insert(b.path.clone(), b.replace.clone());
            continue;
        }
        let text = out.get_mut(&b.path)?;
        let at = text.find(&b.search)?;
        text.replace_range(at..at + b.search.len(), &b.replace);
    }
    Some(out)
}

fn normalize(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
}

/// Equal up to trailing whitespace.
pub fn exact_match(generated: &str, real: &str) -> bool {
    normalize(generated) == normalize(real)
}

/// Line-level similarity ratio in [0, 1] (see the module doc).
pub fn similarity(a: &str, b: &str) -> f64 {
    let input = imara_diff::InternedInput::new(a, b);
    let (na, nb) = (input.before.len(), input.after.len());
    if na + nb == 0 {
        return 1.0;
    }
    let diff = imara_diff::Diff::compute(imara_diff::Algorithm::Myers, &input);
    let removed = diff.count_removals() as usize;
    let common = na - removed;
    2.0 * common as f64 / (na + nb) as f64
}

/// Contents of `paths` at `rev` in the repository at `repo` (absent files are skipped: the
/// change added them).
pub fn files_at(
    repo: &Path,
    rev: &str,
    paths: &[String],
) -> Result<HashMap<String, String>, EvalError> {
    let mut out = HashMap::new();
    for p in paths {
        let o = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["show", &format!("{rev}:{p}")])
            .output()
            .map_err(|e| EvalError::Io {
                path: repo.to_path_buf(),
                message: format!("running git: {e}"),
            })?;
        if o.status.success() {
            out.insert(p.clone(), String::from_utf8_lossy(&o.stdout).into_owned());
        }
    }
    Ok(out)
}

/// Whether the generated `target` (in `format`) applies to `files` (the pre-change contents).
pub fn applies_cleanly(
    target: &str,
    format: &str,
    files: &HashMap<String, String>,
) -> Result<bool, EvalError> {
    if format != "udiff" {
        return Ok(parse_search_replace(target).is_some_and(|b| apply_blocks(files, &b).is_some()));
    }
    // `git apply --check` outside any repository, on the files written to a temp directory.
    let dir = tempfile::tempdir().map_err(|e| EvalError::Io {
        path: std::env::temp_dir(),
        message: e.to_string(),
    })?;
    for (path, text) in files {
        let p = dir.path().join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| EvalError::Io {
                path: parent.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        std::fs::write(&p, text).map_err(|e| EvalError::Io {
            path: p.clone(),
            message: e.to_string(),
        })?;
    }
    let patch = dir.path().join(".generated.patch");
    let mut body = target.to_string();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    std::fs::write(&patch, body).map_err(|e| EvalError::Io {
        path: patch.clone(),
        message: e.to_string(),
    })?;
    let status = Command::new("git")
        .args(["apply", "--check", ".generated.patch"])
        .current_dir(dir.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| EvalError::Io {
            path: dir.path().to_path_buf(),
            message: format!("running git apply: {e}"),
        })?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = "src/lib.rs\n<<<<<<< SEARCH\n    n - 1\n=======\n    n\n>>>>>>> REPLACE\n\nsrc/new.rs\n<<<<<<< SEARCH\n=======\nfn new() {}\n>>>>>>> REPLACE\n";

    fn files() -> HashMap<String, String> {
        HashMap::from([(
            "src/lib.rs".to_string(),
            "fn parse(n: usize) -> usize {\n    n - 1\n}\n".to_string(),
        )])
    }

    #[test]
    fn search_replace_blocks_parse_apply_and_fail_when_search_is_missing() {
        let blocks = parse_search_replace(TARGET).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].path, "src/lib.rs");
        let applied = apply_blocks(&files(), &blocks).unwrap();
        assert_eq!(
            applied["src/lib.rs"],
            "fn parse(n: usize) -> usize {\n    n\n}\n"
        );
        assert_eq!(applied["src/new.rs"], "fn new() {}\n");
        assert!(applies_cleanly(TARGET, "search-replace", &files()).unwrap());
        let wrong = TARGET.replace("n - 1", "n - 2");
        assert!(!applies_cleanly(&wrong, "search-replace", &files()).unwrap());
        assert!(!applies_cleanly("no blocks at all", "search-replace", &files()).unwrap());
        assert!(
            parse_search_replace("src/a.rs\n<<<<<<< SEARCH\nx\n").is_none(),
            "unterminated"
        );
    }

    #[test]
    fn unified_diffs_are_checked_by_git_apply() {
        let diff = "--- a/src/lib.rs\n+++ b/src/lib.rs\n@@ -1,3 +1,3 @@\n fn parse(n: usize) -> usize {\n-    n - 1\n+    n\n }\n";
        assert!(applies_cleanly(diff, "udiff", &files()).unwrap());
        assert!(
            !applies_cleanly(&diff.replace("-    n - 1", "-    n - 7"), "udiff", &files()).unwrap()
        );
        assert!(!applies_cleanly("garbage", "udiff", &files()).unwrap());
    }

    #[test]
    fn exact_match_and_similarity() {
        assert!(exact_match("a  \nb\n\n", "a\nb"));
        assert!(!exact_match("a\nb", "a\nc"));
        assert_eq!(similarity("a\nb\nc\nd\n", "a\nb\nc\nd\n"), 1.0);
        assert_eq!(similarity("", ""), 1.0);
        assert_eq!(similarity("a\nb\n", "c\nd\n"), 0.0);
        // difflib.SequenceMatcher(None, ["a","b","c","d"], ["a","x","c","d"]).ratio() = 0.75
        assert!((similarity("a\nb\nc\nd\n", "a\nx\nc\nd\n") - 0.75).abs() < 1e-12);
    }
}
