//! Git history and merged pull requests into training pairs.
//!
//! The miner walks the first-parent history of a ref with git2, turns every non-merge commit
//! and every merged pull request into a pair (instruction = cleaned message, context =
//! pre-change file content, target = the edit), filters bots, boilerplate, lock/vendored/
//! generated files, and splits train/held-out by time. It has no ML dependency.
//!
//! Today this crate resolves a repository's head ([`resolve_head`]) for the run manifest;
//! pair mining itself is the mining issue's work and not implemented yet.

use std::path::{Path, PathBuf};

/// Errors of the miner. Each names the repository path and, where relevant, the revision.
#[derive(Debug, thiserror::Error)]
pub enum MineError {
    #[error("{path}: not a git repository ({message})")]
    NotARepository { path: PathBuf, message: String },
    #[error("{path}: cannot resolve revision `{rev}`: {message}")]
    BadRevision {
        path: PathBuf,
        rev: String,
        message: String,
    },
}

/// The commit a run starts from, as recorded in the run manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoHead {
    /// The repository's working directory (or git dir for a bare repository), canonicalised.
    pub path: PathBuf,
    /// The revision as the user gave it (`HEAD`, a branch, a tag, a sha).
    pub rev: String,
    /// Full hex id of the commit `rev` resolves to.
    pub commit: String,
    /// The symbolic ref `rev` points through, e.g. `refs/heads/main`; `None` when detached.
    pub reference: Option<String>,
}

/// Opens the repository at `path` (exactly there, no search upwards, so `--repo` means what it
/// says) and resolves `rev` to a commit.
pub fn resolve_head(path: &Path, rev: &str) -> Result<RepoHead, MineError> {
    let repo = git2::Repository::open(path).map_err(|e| MineError::NotARepository {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })?;
    let bad_rev = |e: git2::Error| MineError::BadRevision {
        path: path.to_path_buf(),
        rev: rev.to_string(),
        message: e.message().to_string(),
    };
    let (object, reference) = repo.revparse_ext(rev).map_err(bad_rev)?;
    let commit = object.peel_to_commit().map_err(bad_rev)?;
    // `HEAD` itself comes back as a reference to HEAD; report the branch it points at.
    let reference = match reference {
        Some(r) if r.name().ok() == Some("HEAD") => repo
            .head()
            .ok()
            .filter(|h| h.is_branch())
            .and_then(|h| h.name().ok().map(str::to_string)),
        Some(r) => r.name().ok().map(str::to_string),
        None => None,
    };
    let workdir = repo.workdir().unwrap_or_else(|| repo.path());
    Ok(RepoHead {
        path: workdir
            .canonicalize()
            .unwrap_or_else(|_| workdir.to_path_buf()),
        rev: rev.to_string(),
        commit: commit.id().to_string(),
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `git` with a fixed identity and dates so that commit ids are reproducible.
    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "Fixture Author")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_COMMITTER_NAME", "Fixture Author")
            .env("GIT_COMMITTER_EMAIL", "author@example.com")
            .env("GIT_AUTHOR_DATE", "2024-01-02T03:04:05Z")
            .env("GIT_COMMITTER_DATE", "2024-01-02T03:04:05Z")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git runs");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        std::fs::write(dir.path().join("a.txt"), "one\n").unwrap();
        git(dir.path(), &["add", "a.txt"]);
        git(dir.path(), &["commit", "-q", "-m", "Add a.txt"]);
        std::fs::write(dir.path().join("a.txt"), "two\n").unwrap();
        git(dir.path(), &["commit", "-q", "-am", "Change a.txt"]);
        git(dir.path(), &["tag", "v1", "HEAD~1"]);
        dir
    }

    #[test]
    fn head_matches_git_rev_parse() {
        let dir = fixture();
        let head = resolve_head(dir.path(), "HEAD").unwrap();
        assert_eq!(head.commit, git(dir.path(), &["rev-parse", "HEAD"]));
        assert_eq!(head.reference.as_deref(), Some("refs/heads/main"));
        assert_eq!(head.path, dir.path().canonicalize().unwrap());
    }

    #[test]
    fn tags_and_relative_revisions_resolve_to_commits() {
        let dir = fixture();
        let tag = resolve_head(dir.path(), "v1").unwrap();
        assert_eq!(tag.commit, git(dir.path(), &["rev-parse", "HEAD~1"]));
        assert_eq!(tag.reference.as_deref(), Some("refs/tags/v1"));
        let parent = resolve_head(dir.path(), "HEAD~1").unwrap();
        assert_eq!(parent.commit, tag.commit);
        assert_eq!(parent.reference, None);
    }

    #[test]
    fn detached_head_has_no_branch() {
        let dir = fixture();
        git(dir.path(), &["checkout", "-q", "--detach", "HEAD~1"]);
        let head = resolve_head(dir.path(), "HEAD").unwrap();
        assert_eq!(head.commit, git(dir.path(), &["rev-parse", "HEAD"]));
        assert_eq!(head.reference, None);
    }

    #[test]
    fn errors_name_the_path_and_revision() {
        let dir = fixture();
        let err = resolve_head(dir.path(), "no-such-branch").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("no-such-branch"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");

        let plain = tempfile::tempdir().unwrap();
        let err = resolve_head(plain.path(), "HEAD").unwrap_err();
        assert!(matches!(err, MineError::NotARepository { .. }), "{err}");
        assert!(err.to_string().contains("not a git repository"), "{err}");
    }
}
