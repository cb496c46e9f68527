//! Commit messages: which changes are pull requests, and what the instruction is.
//!
//! A merged pull request is recognised by the message its host writes:
//! - GitHub merge commit: `Merge pull request #N from owner/branch` (title and description follow);
//! - squash merge: a subject ending in `(#N)`;
//! - bors / homu: `Auto merge of #N - owner:branch, r=reviewer` (title and description follow);
//! - GitLab: a body line `See merge request group/project!N`.
//!
//! The instruction is the message without the host's own lines and without trailers
//! (Signed-off-by, Co-authored-by, Change-Id, Reviewed-by, …).

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// What kind of change a pair comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// A plain commit.
    Commit,
    /// A GitHub "Merge pull request #N" merge commit (diff against the first parent).
    PrMerge,
    /// A squash-merged pull request, subject ending in "(#N)".
    PrSquash,
    /// A bors/homu "Auto merge of #N" merge.
    PrBors,
    /// A GitLab merge request ("See merge request !N").
    PrGitlab,
}

/// A commit message read as a change description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub kind: ChangeKind,
    pub pr: Option<u64>,
    pub instruction: String,
}

static GITHUB_MERGE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Merge pull request #(\d+) from \S+").unwrap());
static BORS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^Auto merge of #(\d+)\b").unwrap());
static GITLAB: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^See merge request \S*!(\d+)\s*$").unwrap());
static SQUASH: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s*\(#(\d+)\)\s*$").unwrap());
static TRAILER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^\s*(signed-off-by|co-authored-by|change-id|reviewed-by|reviewed-on|acked-by|tested-by|reported-by|suggested-by|helped-by|cc)\s*:",
    )
    .unwrap()
});

/// Reads `message`. `None` for a merge commit that is not a recognised pull request (a branch
/// merge): its changes are not a unit of work of their own.
pub fn describe(message: &str, is_merge: bool) -> Option<Described> {
    let message = message.replace("\r\n", "\n");
    let (subject, body) = match message.split_once('\n') {
        Some((s, b)) => (s.trim(), b),
        None => (message.trim(), ""),
    };
    let pr = |re: &Regex, text: &str| -> Option<u64> {
        re.captures(text).and_then(|c| c[1].parse().ok())
    };
    if let Some(n) = pr(&GITHUB_MERGE, subject) {
        return Some(Described {
            kind: ChangeKind::PrMerge,
            pr: Some(n),
            instruction: clean(body),
        });
    }
    if let Some(n) = pr(&BORS, subject) {
        return Some(Described {
            kind: ChangeKind::PrBors,
            pr: Some(n),
            instruction: clean(body),
        });
    }
    if let Some(n) = pr(&GITLAB, &message) {
        let body = GITLAB.replace_all(body, "");
        // A GitLab merge commit's subject is "Merge branch 'x' into 'y'": not an instruction.
        let instruction = if is_merge || subject.starts_with("Merge branch ") {
            clean(&body)
        } else {
            clean(&format!("{subject}\n{body}"))
        };
        return Some(Described {
            kind: ChangeKind::PrGitlab,
            pr: Some(n),
            instruction,
        });
    }
    if is_merge {
        return None;
    }
    if let Some(n) = pr(&SQUASH, subject) {
        let title = SQUASH.replace(subject, "");
        return Some(Described {
            kind: ChangeKind::PrSquash,
            pr: Some(n),
            instruction: clean(&format!("{title}\n{body}")),
        });
    }
    Some(Described {
        kind: ChangeKind::Commit,
        pr: None,
        instruction: clean(&message),
    })
}

/// Removes trailers, trailing whitespace and runs of blank lines.
pub fn clean(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut blank_run = 0;
    for line in message.lines() {
        if TRAILER.is_match(line) {
            continue;
        }
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(line);
    }
    out
}

/// Words that alone say nothing about a change.
const BOILERPLATE_WORDS: [&str; 22] = [
    "wip", "fix", "fixes", "fixed", "update", "updates", "updated", "merge", "typo", "typos",
    "cleanup", "minor", "changes", "change", "stuff", "tmp", "temp", "test", "tests", "misc",
    "commit", "save",
];

/// An empty instruction, or a subject of at most two words that starts with a boilerplate
/// word ("wip", "fix", "update", "fix typo", "minor changes"), with no body.
pub fn is_boilerplate(instruction: &str) -> bool {
    let text = instruction.trim();
    if text.is_empty() {
        return true;
    }
    if text.lines().count() > 1 {
        return false;
    }
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    match words.first() {
        None => true,
        Some(first) => words.len() <= 2 && BOILERPLATE_WORDS.contains(&first.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_merge_takes_title_and_description() {
        let d = describe(
            "Merge pull request #42 from alice/fix-parser\n\nFix the parser on empty input\n\nIt crashed.\nSigned-off-by: Alice <a@x>\n",
            true,
        )
        .unwrap();
        assert_eq!(d.kind, ChangeKind::PrMerge);
        assert_eq!(d.pr, Some(42));
        assert_eq!(
            d.instruction,
            "Fix the parser on empty input\n\nIt crashed."
        );
    }

    #[test]
    fn squash_bors_and_gitlab() {
        let d = describe("Add retries to the client (#1234)\n\nBody here.", false).unwrap();
        assert_eq!((d.kind, d.pr), (ChangeKind::PrSquash, Some(1234)));
        assert_eq!(d.instruction, "Add retries to the client\n\nBody here.");

        let d = describe(
            "Auto merge of #77 - bob:speedup, r=carol\n\nSpeed up the lexer\n\nBy 2x.",
            true,
        )
        .unwrap();
        assert_eq!((d.kind, d.pr), (ChangeKind::PrBors, Some(77)));
        assert_eq!(d.instruction, "Speed up the lexer\n\nBy 2x.");

        let d = describe(
            "Merge branch 'feat' into 'main'\n\nAdd the feature\n\nSee merge request group/proj!9",
            true,
        )
        .unwrap();
        assert_eq!((d.kind, d.pr), (ChangeKind::PrGitlab, Some(9)));
        assert_eq!(d.instruction, "Add the feature");
    }

    #[test]
    fn branch_merges_are_not_pairs() {
        assert_eq!(describe("Merge branch 'dev'\n", true), None);
        assert_eq!(
            describe("Merge remote-tracking branch 'origin/x'", true),
            None
        );
    }

    #[test]
    fn trailers_are_removed() {
        let d = describe(
            "Handle EOF\n\nDetails.\n\nSigned-off-by: A <a@x>\nCo-authored-by: B <b@x>\nChange-Id: I123\nReviewed-by: C\n",
            false,
        )
        .unwrap();
        assert_eq!(d.instruction, "Handle EOF\n\nDetails.");
    }

    #[test]
    fn boilerplate() {
        for m in [
            "",
            "wip",
            "WIP",
            "fix",
            "Update",
            "merge",
            "fix typo",
            "minor changes.",
        ] {
            assert!(is_boilerplate(m), "{m:?}");
        }
        for m in [
            "Fix crash when the config is empty",
            "Update the parser to accept tabs",
            "fix\n\nthe parser crashed on tabs",
            "Add retries",
        ] {
            assert!(!is_boilerplate(m), "{m:?}");
        }
    }
}
