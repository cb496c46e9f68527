//! The `pr-replay` suite: held-out commits/PRs replayed with the user's test command.
//!
//! For each held-out pair with its commit: a temporary detached worktree at the commit's
//! parent, the generated edit applied to it (SEARCH/REPLACE blocks, or `git apply` for a
//! unified diff), then `--test-cmd` run there by `run_test` (the sandbox, with a timeout). The
//! suite's metric is the first-try green rate: the share of replays whose test command exits 0
//! on the first try. The real change is replayed the same way first; commits whose own change
//! is not green are left out and counted (the test command cannot judge them).

use crate::edits;
use crate::EvalError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How one replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// The edit applied and the tests passed.
    Green,
    /// The edit applied and the tests failed (or timed out).
    Red,
    /// The edit did not apply.
    DidNotApply,
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output, EvalError> {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .map_err(|e| EvalError::Io {
            path: dir.to_path_buf(),
            message: format!("running git: {e}"),
        })
}

/// A detached worktree of `repo` at `rev`, removed (with `git worktree remove --force`) when
/// dropped.
pub struct Worktree {
    repo: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Worktree {
    pub fn new(repo: &Path, rev: &str) -> Result<Self, EvalError> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::Io {
            path: std::env::temp_dir(),
            message: e.to_string(),
        })?;
        let o = git(
            repo,
            &[
                "worktree",
                "add",
                "--detach",
                "--force",
                dir.path().to_str().unwrap_or_default(),
                rev,
            ],
        )?;
        if !o.status.success() {
            return Err(EvalError::Io {
                path: repo.to_path_buf(),
                message: format!(
                    "git worktree add {rev}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
        Ok(Self {
            repo: repo.to_path_buf(),
            dir,
        })
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let _ = git(
            &self.repo,
            &[
                "worktree",
                "remove",
                "--force",
                self.dir.path().to_str().unwrap_or_default(),
            ],
        );
        let _ = git(&self.repo, &["worktree", "prune"]);
    }
}

/// Applies `target` (in `format`) to the checkout in `dir`; false when it does not apply.
pub fn apply_edit(dir: &Path, target: &str, format: &str) -> Result<bool, EvalError> {
    let io = |p: &Path, e: std::io::Error| EvalError::Io {
        path: p.to_path_buf(),
        message: e.to_string(),
    };
    if format == "udiff" {
        let patch = dir.join(".finetune-replay.patch");
        let mut body = target.to_string();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        std::fs::write(&patch, body).map_err(|e| io(&patch, e))?;
        let ok = git(dir, &["apply", ".finetune-replay.patch"])?
            .status
            .success();
        let _ = std::fs::remove_file(&patch);
        return Ok(ok);
    }
    let Some(blocks) = edits::parse_search_replace(target) else {
        return Ok(false);
    };
    let mut paths: Vec<String> = blocks.iter().map(|b| b.path.clone()).collect();
    paths.sort();
    paths.dedup();
    let mut files = std::collections::HashMap::new();
    for p in &paths {
        // A path leaving the checkout never applies.
        if Path::new(p).is_absolute() || p.split('/').any(|c| c == "..") {
            return Ok(false);
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(p)) {
            files.insert(p.clone(), text);
        }
    }
    let Some(applied) = edits::apply_blocks(&files, &blocks) else {
        return Ok(false);
    };
    for (p, text) in applied {
        let path = dir.join(&p);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    }
    Ok(true)
}

/// Runs the user's test command `cmd` with `sh -c` in `dir`, in its own process group, killing
/// the whole group after `timeout`; true when it exits 0 in time. (The command is the user's
/// own and runs in a throw-away worktree, so it is not confined further than that: its
/// build and test steps need the toolchain, caches and network the user's CI has.)
pub fn run_test_command(
    dir: &Path,
    cmd: &str,
    timeout: std::time::Duration,
) -> Result<bool, EvalError> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| EvalError::Io {
            path: dir.to_path_buf(),
            message: format!("running the test command: {e}"),
        })?;
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| EvalError::Io {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })? {
            // Whatever the command left running in its group goes too.
            kill_group(child.id());
            return Ok(status.success());
        }
        if started.elapsed() >= timeout {
            kill_group(child.id());
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// SIGKILL to the process group `pgid` (the test command's own: it was started as a group
/// leader); never to group 0 or 1.
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        if pgid > 1 {
            // SAFETY: kill(2) with a negative pid signals that process group only.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Replays `target` on the parent of `commit`: worktree, apply, `run_test(dir)`.
pub fn replay(
    repo: &Path,
    commit: &str,
    target: &str,
    format: &str,
    run_test: &dyn Fn(&Path) -> Result<bool, EvalError>,
) -> Result<Replay, EvalError> {
    let wt = Worktree::new(repo, &format!("{commit}^"))?;
    if !apply_edit(wt.dir.path(), target, format)? {
        return Ok(Replay::DidNotApply);
    }
    Ok(if run_test(wt.dir.path())? {
        Replay::Green
    } else {
        Replay::Red
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let g = |args: &[&str]| {
            let o = Command::new("git")
                .args(args)
                .current_dir(dir.path())
                .env("GIT_AUTHOR_NAME", "A")
                .env("GIT_AUTHOR_EMAIL", "a@example.com")
                .env("GIT_COMMITTER_NAME", "A")
                .env("GIT_COMMITTER_EMAIL", "a@example.com")
                .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
                .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
            String::from_utf8(o.stdout).unwrap().trim().to_string()
        };
        g(&["init", "-q", "-b", "main"]);
        std::fs::write(dir.path().join("value.txt"), "1\n").unwrap();
        g(&["add", "."]);
        g(&["commit", "-q", "-m", "one"]);
        std::fs::write(dir.path().join("value.txt"), "2\n").unwrap();
        g(&["commit", "-q", "-am", "two"]);
        let head = g(&["rev-parse", "HEAD"]);
        (dir, head)
    }

    /// The "test command": value.txt must say 2.
    fn test_cmd(dir: &Path) -> Result<bool, EvalError> {
        Ok(std::fs::read_to_string(dir.join("value.txt")).unwrap() == "2\n")
    }

    #[test]
    fn test_commands_pass_fail_and_time_out_with_their_children() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::time::Duration::from_secs(5);
        assert!(run_test_command(dir.path(), "test -d .", t).unwrap());
        assert!(!run_test_command(dir.path(), "exit 3", t).unwrap());
        let started = std::time::Instant::now();
        let marker = dir.path().join("survivor");
        let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        assert!(
            !run_test_command(dir.path(), &cmd, std::time::Duration::from_millis(300)).unwrap()
        );
        assert!(started.elapsed().as_secs() < 5);
        std::thread::sleep(std::time::Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "a child of the timed-out command survived"
        );
    }

    #[test]
    fn the_real_edit_is_green_a_wrong_one_red_and_garbage_does_not_apply() {
        let (dir, head) = repo();
        let good = "value.txt\n<<<<<<< SEARCH\n1\n=======\n2\n>>>>>>> REPLACE\n";
        let wrong = "value.txt\n<<<<<<< SEARCH\n1\n=======\n3\n>>>>>>> REPLACE\n";
        let missing = "value.txt\n<<<<<<< SEARCH\n7\n=======\n2\n>>>>>>> REPLACE\n";
        let escape = "../value.txt\n<<<<<<< SEARCH\n=======\n2\n>>>>>>> REPLACE\n";
        assert_eq!(
            replay(dir.path(), &head, good, "search-replace", &test_cmd).unwrap(),
            Replay::Green
        );
        assert_eq!(
            replay(dir.path(), &head, wrong, "search-replace", &test_cmd).unwrap(),
            Replay::Red
        );
        assert_eq!(
            replay(dir.path(), &head, missing, "search-replace", &test_cmd).unwrap(),
            Replay::DidNotApply
        );
        assert_eq!(
            replay(dir.path(), &head, escape, "search-replace", &test_cmd).unwrap(),
            Replay::DidNotApply
        );
        let diff = "--- a/value.txt\n+++ b/value.txt\n@@ -1 +1 @@\n-1\n+2\n";
        assert_eq!(
            replay(dir.path(), &head, diff, "udiff", &test_cmd).unwrap(),
            Replay::Green
        );
        // Worktrees are cleaned up; the repository itself is untouched.
        let list = Command::new("git")
            .args(["worktree", "list"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 1);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("value.txt")).unwrap(),
            "2\n"
        );
    }
}
