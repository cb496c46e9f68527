//! Run directories: `<out>/runs/<id>/`, one per run, never reused.
//!
//! A run directory appears complete or not at all: it is assembled under a hidden temporary
//! name in `<out>/runs/` and renamed into place. The id is the UTC start time
//! (`YYYYMMDD-HHMMSS`), with `-2`, `-3`, … appended when that name is taken, so a second run
//! never overwrites the first.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the run's manifest inside its directory.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub id: String,
    pub path: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader sees the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

impl RunDir {
    /// Records in the manifest that `stage` finished (rewritten atomically).
    pub fn stage_completed(&self, stage: &str) -> Result<()> {
        let path = self.path.join(MANIFEST);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut manifest: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        match manifest["stages_completed"].as_array_mut() {
            Some(stages) => stages.push(stage.into()),
            None => manifest["stages_completed"] = serde_json::json!([stage]),
        }
        write_atomic(
            &path,
            (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes(),
        )
    }

    /// Creates `<out>/runs/<id>/` holding `manifest.json`, atomically. `manifest` gets the
    /// chosen `id` and `path` filled in.
    pub fn create(
        out: &Path,
        started: chrono::DateTime<chrono::Utc>,
        mut manifest: serde_json::Value,
    ) -> Result<RunDir> {
        let runs = out.join("runs");
        fs::create_dir_all(&runs)
            .with_context(|| format!("cannot create the run root {}", runs.display()))?;
        let base = started.format("%Y%m%d-%H%M%S").to_string();
        let tmp = runs.join(format!(
            ".tmp-{base}-{}-{}",
            std::process::id(),
            started.timestamp_subsec_nanos()
        ));
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let result = Self::fill_and_rename(&runs, &tmp, &base, &mut manifest);
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    fn fill_and_rename(
        runs: &Path,
        tmp: &Path,
        base: &str,
        manifest: &mut serde_json::Value,
    ) -> Result<RunDir> {
        for n in 1..=1000 {
            let id = if n == 1 {
                base.to_string()
            } else {
                format!("{base}-{n}")
            };
            let path = runs.join(&id);
            if path.exists() {
                continue;
            }
            manifest["id"] = id.clone().into();
            manifest["path"] = path.display().to_string().into();
            let text = serde_json::to_string_pretty(manifest)? + "\n";
            write_atomic(&tmp.join(MANIFEST), text.as_bytes())?;
            match fs::rename(tmp, &path) {
                Ok(()) => return Ok(RunDir { id, path }),
                // Taken between the check and the rename by a concurrent run: try the next id.
                // (rename(2) refuses to replace a non-empty directory.)
                Err(_) if path.exists() => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot move {} to {}", tmp.display(), path.display())
                    })
                }
            }
        }
        bail!(
            "{}: more than 1000 runs started in one second",
            runs.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_second_run_in_the_same_second_gets_its_own_directory() {
        let out = tempfile::tempdir().unwrap();
        let t = chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let a = RunDir::create(out.path(), t, serde_json::json!({"n": 1})).unwrap();
        let b = RunDir::create(out.path(), t, serde_json::json!({"n": 2})).unwrap();
        assert_eq!(a.id, "20260102-030405");
        assert_eq!(b.id, "20260102-030405-2");
        let read = |d: &RunDir| -> serde_json::Value {
            serde_json::from_str(&fs::read_to_string(d.path.join(MANIFEST)).unwrap()).unwrap()
        };
        assert_eq!(read(&a)["n"], 1);
        assert_eq!(read(&a)["id"], "20260102-030405");
        assert_eq!(read(&b)["n"], 2);
        // Nothing temporary is left behind.
        let names: Vec<_> = fs::read_dir(out.path().join("runs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn an_unwritable_out_dir_fails_naming_it() {
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("not-a-dir");
        fs::write(&file, "x").unwrap();
        let t = chrono::Utc::now();
        let err = RunDir::create(&file, t, serde_json::json!({})).unwrap_err();
        assert!(format!("{err:#}").contains("not-a-dir"), "{err:#}");
    }

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
