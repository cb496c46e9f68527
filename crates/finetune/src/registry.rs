//! Scheduled retraining: the lock that keeps runs from overlapping, and the adapter registry
//! that promotes a new adapter only when it beats the current one on the held-out suite.
//!
//! `<out>/registry.json` records the current adapter (run id, adapter path, its held-out loss)
//! and every candidate with the decision taken; `<out>/current` is a symbolic link to the
//! current adapter directory, replaced atomically (a new link renamed over the old one). A
//! candidate is promoted when there is no current adapter, or when its held-out loss (mean over
//! the held-out pairs of the mean target-token cross-entropy, the `repo-heldout` loss) is
//! strictly lower than the current adapter's on the same pairs. A failed or worse run leaves
//! the registry and the link as they were.

use crate::run_dir::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const REGISTRY: &str = "registry.json";
pub const CURRENT_LINK: &str = "current";
pub const LOCK: &str = ".finetune.lock";

/// The adapter a scheduled run judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub run: String,
    /// Relative to the output directory.
    pub adapter: String,
    pub heldout_loss: Option<f64>,
    /// The current adapter's loss on the same pairs when this one was judged.
    pub current_loss: Option<f64>,
    pub promoted: bool,
    pub reason: String,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Registry {
    pub current: Option<Entry>,
    pub history: Vec<Entry>,
}

impl Registry {
    pub fn load(out: &Path) -> Result<Self> {
        let path = out.join(REGISTRY);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a registry", path.display()))
    }

    /// The current adapter's directory.
    pub fn current_adapter(&self, out: &Path) -> Option<PathBuf> {
        self.current.as_ref().map(|e| out.join(&e.adapter))
    }

    /// Records `candidate`'s judgement and, if promoted, makes it current (registry file and
    /// `current` link, each replaced atomically).
    pub fn record(&mut self, out: &Path, candidate: Entry) -> Result<()> {
        if candidate.promoted {
            let link = out.join(CURRENT_LINK);
            let tmp = out.join(format!(".{CURRENT_LINK}.tmp-{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&candidate.adapter, &tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            std::fs::rename(&tmp, &link)
                .with_context(|| format!("cannot replace {}", link.display()))?;
            self.current = Some(candidate.clone());
        }
        self.history.push(candidate);
        write_atomic(
            &out.join(REGISTRY),
            (serde_json::to_string_pretty(self)? + "\n").as_bytes(),
        )
    }
}

/// The promotion rule (see the module doc): `(promoted, reason)`.
pub fn judge(candidate: Option<f64>, current: Option<f64>, has_current: bool) -> (bool, String) {
    match (candidate, current) {
        _ if !has_current => (true, "first adapter".into()),
        (Some(new), Some(cur)) if new < cur => {
            (true, format!("held-out loss {new:.4} < current {cur:.4}"))
        }
        (Some(new), Some(cur)) => (
            false,
            format!("held-out loss {new:.4} is not below the current adapter's {cur:.4}"),
        ),
        _ => (
            false,
            "no held-out loss to compare (no held-out pairs)".into(),
        ),
    }
}

/// An exclusive lock on an output directory: `<out>/.finetune.lock` created with O_EXCL,
/// holding the pid and host; removed on drop. A lock left by a process that no longer runs on
/// this host is taken over.
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    pub fn acquire(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let path = out.join(LOCK);
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    writeln!(
                        f,
                        "{} {host} {}",
                        std::process::id(),
                        chrono::Utc::now().to_rfc3339()
                    )
                    .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut parts = held.split_whitespace();
                    let pid: Option<u32> = parts.next().and_then(|p| p.parse().ok());
                    let same_host = parts.next() == Some(host.as_str());
                    let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
                    if same_host && !alive {
                        eprintln!(
                            "finetune: taking over the stale lock {} ({})",
                            path.display(),
                            held.trim()
                        );
                        std::fs::remove_file(&path)
                            .with_context(|| format!("cannot remove {}", path.display()))?;
                        continue;
                    }
                    bail!(
                        "{}: another finetune run holds this output directory ({}); it must finish first",
                        path.display(),
                        held.trim()
                    );
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        bail!("{}: cannot take the lock", path.display())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_needs_a_strictly_lower_loss_unless_there_is_none() {
        assert!(judge(Some(5.0), None, false).0);
        assert!(judge(Some(4.0), Some(4.5), true).0);
        assert!(!judge(Some(4.5), Some(4.5), true).0);
        assert!(!judge(Some(5.0), Some(4.5), true).0);
        assert!(!judge(None, Some(4.5), true).0);
    }

    #[test]
    fn lock_is_exclusive_and_stale_locks_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = Lock::acquire(dir.path()).unwrap();
        let e = Lock::acquire(dir.path()).err().expect("held").to_string();
        assert!(
            e.contains(".finetune.lock") && e.contains("another finetune run"),
            "{e}"
        );
        drop(lock);
        assert!(!dir.path().join(LOCK).exists());
        // A lock of a dead process on this host.
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        std::fs::write(dir.path().join(LOCK), format!("4000000000 {host} then\n")).unwrap();
        let _lock = Lock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn record_moves_the_current_link_only_on_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let entry = |run: &str, promoted: bool| Entry {
            run: run.into(),
            adapter: format!("runs/{run}/adapter"),
            heldout_loss: Some(1.0),
            current_loss: None,
            promoted,
            reason: String::new(),
            at: String::new(),
        };
        let mut r = Registry::default();
        r.record(out, entry("a", true)).unwrap();
        r.record(out, entry("b", false)).unwrap();
        let back = Registry::load(out).unwrap();
        assert_eq!(back.current.as_ref().unwrap().run, "a");
        assert_eq!(back.history.len(), 2);
        assert_eq!(
            std::fs::read_link(out.join(CURRENT_LINK)).unwrap(),
            Path::new("runs/a/adapter")
        );
        r.record(out, entry("c", true)).unwrap();
        assert_eq!(
            std::fs::read_link(out.join(CURRENT_LINK)).unwrap(),
            Path::new("runs/c/adapter")
        );
    }
}
