//! Git history and merged pull requests into training pairs.
//!
//! The miner walks the first-parent history of a ref with git2, turns every non-merge commit
//! and every merged pull request into a pair (instruction = cleaned message, context =
//! pre-change file content, target = the edit), filters bots, boilerplate, lock/vendored/
//! generated files and secrets, removes duplicates and splits train/held-out by time
//! ([`mine_to_dir`]). It has no ML dependency: token budgets are estimated
//! ([`pairs::estimate_tokens`]).

mod dataset;
pub mod dedup;
pub mod edit;
pub mod filters;
pub mod message;
pub mod pairs;
pub mod secrets;
pub mod treediff;

pub use dataset::{mine_to_dir, Manifest, MineOutcome, HELDOUT_FILE, MANIFEST_FILE, TRAIN_FILE};
pub use pairs::{Counts, Pair, PairMeta, Progress, Quiet};

use git2::{Oid, Repository};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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
    #[error("{path}: the repository has no commits yet (HEAD is unborn)")]
    Empty { path: PathBuf },
    #[error("{path}: {message}")]
    Git { path: PathBuf, message: String },
    #[error("mine.{option}: {message}")]
    BadOption { option: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadManifest { path: PathBuf, message: String },
    #[error(
        "{path}: --incremental: {message}; mine again without --incremental (into a new or \
         emptied directory)"
    )]
    NotIncremental { path: PathBuf, message: String },
}

/// How a mined edit is written as the training target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PairFormat {
    /// SEARCH/REPLACE blocks (the Aider edit format).
    #[default]
    SearchReplace,
    /// Unified diff, as `git diff` prints it.
    Udiff,
}

/// Everything that decides which pairs are mined. Recorded in the manifest; `--incremental`
/// refuses to append pairs mined with other options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MineOptions {
    pub repo: PathBuf,
    pub rev: String,
    /// Only changes after this date (`YYYY-MM-DD` or RFC 3339) or revision (exclusive).
    pub since: Option<String>,
    /// Only changes up to this date or revision (inclusive).
    pub until: Option<String>,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub format: PairFormat,
    /// Newest fraction of pairs (by author time) held out.
    pub heldout: f64,
    pub max_files: usize,
    pub max_lines: usize,
    pub max_file_bytes: u64,
    pub max_line_chars: usize,
    pub max_pair_tokens: usize,
    pub skip_bots: bool,
    /// Skip changes whose message says nothing ("wip", "fix", "update", …).
    pub skip_boilerplate: bool,
    /// Skip lock files, vendored directories and generated files.
    pub skip_generated: bool,
    /// Jaccard similarity at or above which a pair is a near-duplicate (> 1 disables).
    pub dedup_threshold: f64,
    /// Worker threads (0: all cores). Does not change the result.
    #[serde(skip)]
    pub threads: usize,
}

impl Default for MineOptions {
    fn default() -> Self {
        Self {
            repo: PathBuf::from("."),
            rev: "HEAD".into(),
            since: None,
            until: None,
            paths: Vec::new(),
            exclude: Vec::new(),
            format: PairFormat::SearchReplace,
            heldout: 0.05,
            max_files: 20,
            max_lines: 800,
            max_file_bytes: 1_000_000,
            max_line_chars: 1000,
            max_pair_tokens: 16384,
            skip_bots: true,
            skip_boilerplate: true,
            skip_generated: true,
            dedup_threshold: 0.7,
            threads: 0,
        }
    }
}

/// The commit a run starts from, as recorded in the run manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Opens the repository at `path` exactly (no search upwards, so `--repo` means what it says).
pub(crate) fn open(path: &Path) -> Result<Repository, MineError> {
    // Object ids are verified by git itself when objects are written; re-hashing every object
    // on read costs more than a third of mining time (DESIGN.md, "Mining speed").
    git2::opts::strict_hash_verification(false);
    Repository::open(path).map_err(|e| MineError::NotARepository {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

fn resolve(repo: &Repository, path: &Path, rev: &str) -> Result<(Oid, Option<String>), MineError> {
    let bad_rev = |e: git2::Error| MineError::BadRevision {
        path: path.to_path_buf(),
        rev: rev.to_string(),
        message: e.message().to_string(),
    };
    if rev == "HEAD"
        && repo
            .head()
            .is_err_and(|e| e.code() == git2::ErrorCode::UnbornBranch)
    {
        return Err(MineError::Empty {
            path: path.to_path_buf(),
        });
    }
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
    Ok((commit.id(), reference))
}

/// Opens the repository at `path` and resolves `rev` to a commit.
pub fn resolve_head(path: &Path, rev: &str) -> Result<RepoHead, MineError> {
    let repo = open(path)?;
    let (id, reference) = resolve(&repo, path, rev)?;
    let workdir = repo.workdir().unwrap_or_else(|| repo.path());
    Ok(RepoHead {
        path: workdir
            .canonicalize()
            .unwrap_or_else(|_| workdir.to_path_buf()),
        rev: rev.to_string(),
        commit: id.to_string(),
        reference,
    })
}

/// The commits to mine, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    pub head: RepoHead,
    pub commits: Vec<Oid>,
    /// The repository is a shallow clone: history ends where the clone was cut.
    pub shallow: bool,
}

/// A bound given as a date or a revision.
enum Bound {
    /// A whole UTC day (`YYYY-MM-DD`), from its first second.
    Day(i64),
    /// An instant (RFC 3339).
    Time(i64),
    Commit(Oid),
}

impl Bound {
    /// The first second the bound covers (for `--since`).
    fn first_second(&self) -> Option<i64> {
        match *self {
            Bound::Day(t) | Bound::Time(t) => Some(t),
            Bound::Commit(_) => None,
        }
    }

    /// The last second the bound covers (for `--until`): a day includes all of it.
    fn last_second(&self) -> Option<i64> {
        match *self {
            Bound::Day(t) => Some(t + 86_399),
            Bound::Time(t) => Some(t),
            Bound::Commit(_) => None,
        }
    }
}

fn bound(repo: &Repository, path: &Path, option: &str, value: &str) -> Result<Bound, MineError> {
    if let Some(t) = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
    {
        return Ok(Bound::Day(t.and_utc().timestamp()));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(Bound::Time(t.timestamp()));
    }
    match resolve(repo, path, value) {
        Ok((id, _)) => Ok(Bound::Commit(id)),
        Err(e) => Err(MineError::BadOption {
            option: option.into(),
            message: format!("`{value}` is neither a date (YYYY-MM-DD) nor a revision: {e}"),
        }),
    }
}

/// Walks the first-parent history from `opts.rev` (or `--until REV`) back to the root, to
/// `--since`, or to `stop_at` (exclusive; an error if it is not on the way).
pub fn walk(opts: &MineOptions, stop_at: Option<Oid>) -> Result<History, MineError> {
    let path = opts.repo.as_path();
    let repo = open(path)?;
    let head = resolve_head(path, &opts.rev)?;
    let (mut start, _) = resolve(&repo, path, &opts.rev)?;
    let mut until_time = None;
    if let Some(u) = &opts.until {
        match bound(&repo, path, "until", u)? {
            Bound::Commit(id) => start = id,
            time => until_time = time.last_second(),
        }
    }
    let since = match &opts.since {
        Some(s) => Some(bound(&repo, path, "since", s)?),
        None => None,
    };
    let git = |e: git2::Error| MineError::Git {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    };
    let mut commits = Vec::new();
    let mut id = start;
    let mut found_stop = stop_at.is_none();
    loop {
        if Some(id) == stop_at {
            found_stop = true;
            break;
        }
        if let Some(Bound::Commit(s)) = since {
            if s == id {
                break;
            }
        }
        let commit = match repo.find_commit(id) {
            Ok(c) => c,
            // A shallow clone's boundary may name parents that are not there.
            Err(_) if repo.is_shallow() && !commits.is_empty() => break,
            Err(e) => return Err(git(e)),
        };
        let t = commit.author().when().seconds();
        let since_time = since.as_ref().and_then(Bound::first_second);
        let in_range = until_time.is_none_or(|u| t <= u) && since_time.is_none_or(|s| t >= s);
        if in_range {
            commits.push(id);
        }
        match commit.parent_ids().next() {
            Some(p) => id = p,
            None => break,
        }
    }
    if !found_stop {
        return Err(MineError::NotIncremental {
            path: path.to_path_buf(),
            message: format!(
                "the last mined commit {} is not in the first-parent history of `{}` any more \
                 (history rewritten?)",
                stop_at.map(|s| s.to_string()).unwrap_or_default(),
                opts.rev
            ),
        });
    }
    commits.reverse();
    Ok(History {
        head,
        commits,
        shallow: repo.is_shallow(),
    })
}

/// Locks a mutex, also after a panic elsewhere (the data is still consistent: each slot is
/// written whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Mines `history` into pairs (unsplit, not deduplicated), in history order, with counts.
pub fn mine_commits(
    opts: &MineOptions,
    history: &History,
    progress: &dyn Progress,
) -> Result<(Vec<Pair>, Counts), MineError> {
    let repo_name = history
        .head
        .path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".git").to_string())
        .unwrap_or_default();
    let compiled = pairs::Compiled::new(opts, repo_name)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    // Contiguous chunks keep the previous-commit blob cache useful. Every thread of the pool
    // takes chunks in history order from a shared counter, so at any time the threads work on
    // neighbouring parts of the history and share libgit2's (small, process-wide) cache of
    // delta bases instead of evicting each other's.
    const CHUNK: usize = 128;
    let chunks: Vec<&[Oid]> = history.commits.chunks(CHUNK).collect();
    let next = AtomicUsize::new(0);
    type Mined = (Vec<Pair>, Counts);
    let results: Mutex<Vec<Option<Mined>>> = Mutex::new((0..chunks.len()).map(|_| None).collect());
    let failed: Mutex<Option<MineError>> = Mutex::new(None);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| MineError::Git {
            path: opts.repo.clone(),
            message: format!("cannot start {threads} threads: {e}"),
        })?;
    progress.start(history.commits.len() as u64);
    pool.broadcast(|_| {
        let mut worker = match pairs::Worker::new(&opts.repo, opts, &compiled) {
            Ok(w) => w,
            Err(e) => {
                lock(&failed).get_or_insert(e);
                return;
            }
        };
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(index) else {
                break;
            };
            let mut counts = Counts::default();
            let mut out = Vec::new();
            for &id in chunk.iter() {
                // A bug in the miner must not end a long run: the commit is counted as an
                // internal error and the run goes on.
                let mined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker.commit(id, &mut counts)
                }));
                match mined {
                    Ok(Some(p)) => out.push(p),
                    Ok(None) => {}
                    Err(_) => counts.skip(pairs::ChangeSkip::InternalError),
                }
            }
            progress.advance(chunk.len() as u64);
            lock(&results)[index] = Some((out, counts));
        }
    });
    progress.finish();
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut all = Vec::new();
    let mut counts = Counts::default();
    for (p, c) in results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
    {
        all.extend(p);
        counts.add(&c);
    }
    Ok((all, counts))
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
