//! The mined dataset on disk: `train.jsonl`, `heldout.jsonl`, `manifest.json`.
//!
//! Pairs are deduplicated oldest first (the older of two duplicates stays), then split by
//! author time: the newest `heldout` fraction goes to `heldout.jsonl`, so no held-out pair is
//! older than a training pair. All three files are written under temporary names and renamed
//! into place, the manifest last. `--incremental` mines only the commits after the manifest's
//! last mined commit, deduplicates them against the pairs already there and re-splits.

use crate::dedup::{Deduper, Duplicate};
use crate::pairs::{ChangeSkip, Counts, Pair, Progress};
use crate::{walk, MineError, MineOptions, RepoHead};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const TRAIN_FILE: &str = "train.jsonl";
pub const HELDOUT_FILE: &str = "heldout.jsonl";
pub const MANIFEST_FILE: &str = "manifest.json";

/// `manifest.json` of a mined dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Version of the tool that wrote it.
    pub tool: String,
    pub repo: RepoHead,
    /// The repository is a shallow clone: older history was not there to mine.
    pub shallow: bool,
    pub options: MineOptions,
    /// Last mined commit per revision (what `--incremental` continues from).
    pub last_commit: BTreeMap<String, String>,
    pub train: usize,
    pub heldout: usize,
    /// Totals over every mining run into this directory.
    pub counts: Counts,
    pub last_run: RunStats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub mined_at: String,
    pub incremental: bool,
    pub commits: usize,
    pub new_pairs: usize,
    pub elapsed_secs: f64,
    pub commits_per_sec: f64,
}

/// What `mine_to_dir` did.
#[derive(Debug, Clone)]
pub enum MineOutcome {
    Written(Box<Manifest>),
    /// `--incremental` found no new commit; nothing was touched.
    UpToDate(Box<Manifest>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MineError + '_ {
    move |source| MineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a JSONL file of pairs (absent file: none).
fn read_pairs(path: &Path) -> Result<Vec<Pair>, MineError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| MineError::BadManifest {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

fn read_manifest(dir: &Path) -> Result<Option<Manifest>, MineError> {
    let path = dir.join(MANIFEST_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| MineError::BadManifest {
                path,
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Sorts by author time (history order breaks ties) and marks the newest fraction held out.
fn split(pairs: &mut [Pair], heldout: f64) -> usize {
    pairs.sort_by_key(|p| p.meta.author_timestamp);
    let n = pairs.len();
    let mut k = (n as f64 * heldout).round() as usize;
    if heldout > 0.0 && k == 0 && n >= 2 {
        k = 1;
    }
    for (i, p) in pairs.iter_mut().enumerate() {
        p.meta.split = if i >= n - k { "heldout" } else { "train" }.into();
    }
    k
}

/// Writes `name` in `dir` through a temporary file; returns the temporary path to rename.
fn stage(dir: &Path, name: &str, bytes: &[u8]) -> Result<(PathBuf, PathBuf), MineError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    Ok((tmp, dir.join(name)))
}

fn jsonl(pairs: &[&Pair]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pairs {
        serde_json::to_writer(&mut out, p).expect("a Pair serializes");
        out.push(b'\n');
    }
    out
}

/// Mines `opts.repo` into `out`: `train.jsonl`, `heldout.jsonl`, `manifest.json`.
pub fn mine_to_dir(
    opts: &MineOptions,
    out: &Path,
    incremental: bool,
    tool: &str,
    progress: &dyn Progress,
) -> Result<MineOutcome, MineError> {
    let started = Instant::now();
    let previous = if incremental {
        read_manifest(out)?
    } else {
        None
    };
    let mut stop_at = None;
    if let Some(prev) = &previous {
        // Same repository (however its path was written) and the same selection options.
        let selection = |o: &MineOptions| MineOptions {
            repo: Default::default(),
            threads: 0,
            ..o.clone()
        };
        let here = crate::resolve_head(&opts.repo, &opts.rev)?;
        if here.path != prev.repo.path {
            return Err(MineError::NotIncremental {
                path: out.join(MANIFEST_FILE),
                message: format!(
                    "the dataset was mined from {}, not {}",
                    prev.repo.path.display(),
                    here.path.display()
                ),
            });
        }
        if selection(&prev.options) != selection(opts) {
            return Err(MineError::NotIncremental {
                path: out.join(MANIFEST_FILE),
                message: "the mining options differ from those recorded in the manifest".into(),
            });
        }
        if let Some(last) = prev.last_commit.get(&opts.rev) {
            stop_at = Some(
                git2::Oid::from_str(last).map_err(|e| MineError::BadManifest {
                    path: out.join(MANIFEST_FILE),
                    message: format!("last_commit `{last}`: {e}"),
                })?,
            );
        }
    }
    let history = walk(opts, stop_at)?;
    if let (Some(prev), true) = (&previous, history.commits.is_empty()) {
        return Ok(MineOutcome::UpToDate(Box::new(prev.clone())));
    }
    let (new_pairs, mut run_counts) = crate::mine_commits(opts, &history, progress)?;

    // Old pairs first, so that a new pair duplicating an old one is the one dropped.
    let mut old_pairs = Vec::new();
    if previous.is_some() {
        old_pairs.extend(read_pairs(&out.join(TRAIN_FILE))?);
        old_pairs.extend(read_pairs(&out.join(HELDOUT_FILE))?);
        old_pairs.sort_by_key(|p| p.meta.author_timestamp);
    }
    let mut deduper = Deduper::new(opts.dedup_threshold);
    for p in &old_pairs {
        deduper.check(&p.target);
    }
    let mut kept = old_pairs;
    let mut sorted_new = new_pairs;
    sorted_new.sort_by_key(|p| p.meta.author_timestamp);
    let mut added = 0;
    for p in sorted_new {
        match deduper.check(&p.target) {
            None => {
                kept.push(p);
                added += 1;
            }
            Some(Duplicate::Exact) => {
                run_counts.pairs -= 1;
                run_counts.skip(ChangeSkip::ExactDuplicate);
            }
            Some(Duplicate::Near) => {
                run_counts.pairs -= 1;
                run_counts.skip(ChangeSkip::NearDuplicate);
            }
        }
    }
    let heldout = split(&mut kept, opts.heldout);

    let mut counts = previous
        .as_ref()
        .map(|p| p.counts.clone())
        .unwrap_or_default();
    counts.add(&run_counts);
    let elapsed = started.elapsed().as_secs_f64();
    let mut last_commit = previous
        .as_ref()
        .map(|p| p.last_commit.clone())
        .unwrap_or_default();
    if let Some(last) = history.commits.last() {
        last_commit.insert(opts.rev.clone(), last.to_string());
    }
    let manifest = Manifest {
        format: 1,
        tool: tool.to_string(),
        repo: history.head.clone(),
        shallow: history.shallow,
        options: opts.clone(),
        last_commit,
        train: kept.len() - heldout,
        heldout,
        counts,
        last_run: RunStats {
            mined_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            incremental,
            commits: history.commits.len(),
            new_pairs: added,
            elapsed_secs: elapsed,
            commits_per_sec: history.commits.len() as f64 / elapsed.max(1e-9),
        },
    };

    std::fs::create_dir_all(out).map_err(io(out))?;
    let (train, held): (Vec<&Pair>, Vec<&Pair>) =
        kept.iter().partition(|p| p.meta.split == "train");
    let manifest_json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    let staged = [
        stage(out, TRAIN_FILE, &jsonl(&train)),
        stage(out, HELDOUT_FILE, &jsonl(&held)),
        stage(out, MANIFEST_FILE, &manifest_json),
    ];
    let mut renames = Vec::new();
    let mut failed = None;
    for s in staged {
        match s {
            Ok(r) => renames.push(r),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        for (tmp, _) in &renames {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, dest) in &renames {
        std::fs::rename(tmp, dest).map_err(io(dest))?;
    }
    Ok(MineOutcome::Written(Box::new(manifest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ChangeKind;
    use crate::pairs::PairMeta;
    use crate::PairFormat;

    fn pair(ts: i64) -> Pair {
        Pair {
            id: format!("commit:{ts}"),
            instruction: String::new(),
            context: String::new(),
            target: String::new(),
            format: PairFormat::SearchReplace,
            meta: PairMeta {
                repo: "r".into(),
                kind: ChangeKind::Commit,
                commits: vec![],
                pr: None,
                author_time: String::new(),
                author_timestamp: ts,
                files: vec![],
                languages: vec![],
                lines_added: 0,
                lines_removed: 0,
                split: String::new(),
            },
        }
    }

    #[test]
    fn newest_pairs_are_held_out() {
        let mut pairs: Vec<Pair> = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0].map(pair).to_vec();
        let k = split(&mut pairs, 0.2);
        assert_eq!(k, 2);
        let held: Vec<i64> = pairs
            .iter()
            .filter(|p| p.meta.split == "heldout")
            .map(|p| p.meta.author_timestamp)
            .collect();
        assert_eq!(held, vec![8, 9]);
        let newest_train = pairs
            .iter()
            .filter(|p| p.meta.split == "train")
            .map(|p| p.meta.author_timestamp)
            .max();
        assert_eq!(newest_train, Some(7));
    }

    #[test]
    fn a_small_fraction_still_holds_out_one_pair() {
        let mut pairs: Vec<Pair> = [1, 2, 3].map(pair).to_vec();
        assert_eq!(split(&mut pairs, 0.05), 1);
        let mut one = vec![pair(1)];
        assert_eq!(split(&mut one, 0.05), 0);
        assert_eq!(split(&mut pairs, 0.0), 0);
    }
}
