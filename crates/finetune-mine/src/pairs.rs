//! From commits to pairs: walk the first-parent history, read each change, filter, render.
//!
//! Commits are processed in contiguous chunks on a rayon pool, each worker with its own
//! `Repository` (git2 handles are not shareable) and a cache of the previous commit's blobs,
//! which are the next commit's old side whenever a file changes again.

use crate::edit::{self, FileEdit, FileStatus};
use crate::filters::{self, FileSkip, LinguistAttributes};
use crate::message::{self, ChangeKind};
use crate::secrets;
use crate::treediff::{self, Change, MODE_SUBMODULE, MODE_SYMLINK};
use crate::{MineError, MineOptions, PairFormat};
use git2::{Oid, Repository};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// A training pair, one line of `train.jsonl` / `heldout.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Stable id: the kind and the commit the change comes from.
    pub id: String,
    /// What to do: the cleaned commit or pull-request message.
    pub instruction: String,
    /// Pre-change content of each touched file under a `### path` header, windowed when long.
    pub context: String,
    /// The change, as SEARCH/REPLACE blocks or a unified diff (see `format`).
    pub target: String,
    pub format: PairFormat,
    pub meta: PairMeta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairMeta {
    /// The repository's directory name.
    pub repo: String,
    pub kind: ChangeKind,
    /// The commit on the mined history; for a merged PR also the PR's head (second parent).
    pub commits: Vec<String>,
    pub pr: Option<u64>,
    /// Author time, RFC 3339 in UTC, and as a Unix timestamp.
    pub author_time: String,
    pub author_timestamp: i64,
    pub files: Vec<String>,
    pub languages: Vec<String>,
    pub lines_added: usize,
    pub lines_removed: usize,
    /// "train" or "heldout".
    pub split: String,
}

/// Why a whole change produced no pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeSkip {
    BotAuthor,
    MergeWithoutPr,
    Boilerplate,
    TooManyFiles,
    TooManyLines,
    NoFilesLeft,
    OverTokenBudget,
    Unreadable,
    InternalError,
    ExactDuplicate,
    NearDuplicate,
}

impl ChangeSkip {
    pub fn name(self) -> &'static str {
        match self {
            ChangeSkip::BotAuthor => "bot-author",
            ChangeSkip::MergeWithoutPr => "merge-without-pr",
            ChangeSkip::Boilerplate => "boilerplate-message",
            ChangeSkip::TooManyFiles => "too-many-files",
            ChangeSkip::TooManyLines => "too-many-lines",
            ChangeSkip::NoFilesLeft => "no-files-left",
            ChangeSkip::OverTokenBudget => "over-token-budget",
            ChangeSkip::Unreadable => "unreadable-object",
            ChangeSkip::InternalError => "internal-error",
            ChangeSkip::ExactDuplicate => "exact-duplicate",
            ChangeSkip::NearDuplicate => "near-duplicate",
        }
    }
}

/// Counts of what was mined and what was left out, by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub commits: usize,
    pub pairs: usize,
    pub changes_skipped: BTreeMap<String, usize>,
    pub files_skipped: BTreeMap<String, usize>,
    pub secrets_redacted: usize,
    pub languages: BTreeMap<String, usize>,
    pub lines_added: usize,
    pub lines_removed: usize,
}

impl Counts {
    pub fn skip(&mut self, why: ChangeSkip) {
        *self.changes_skipped.entry(why.name().into()).or_default() += 1;
    }

    fn skip_file(&mut self, why: FileSkip) {
        *self.files_skipped.entry(why.name().into()).or_default() += 1;
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counts) {
        self.commits += other.commits;
        self.pairs += other.pairs;
        for (k, v) in &other.changes_skipped {
            *self.changes_skipped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.files_skipped {
            *self.files_skipped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.languages {
            *self.languages.entry(k.clone()).or_default() += v;
        }
        self.secrets_redacted += other.secrets_redacted;
        self.lines_added += other.lines_added;
        self.lines_removed += other.lines_removed;
    }
}

/// Reports progress of a long mining run (a progress bar in the binary).
pub trait Progress: Sync {
    fn start(&self, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// Estimated tokens of a text: one per 4 UTF-8 bytes, the usual rate of BPE on code. The data
/// stage counts exactly with the model's tokenizer.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

/// Settings compiled once per run.
pub(crate) struct Compiled {
    pub include: Option<globset::GlobSet>,
    pub exclude: globset::GlobSet,
    pub repo_name: String,
}

impl Compiled {
    pub fn new(opts: &MineOptions, repo_name: String) -> Result<Self, MineError> {
        let bad = |flag: &str, m: String| MineError::BadOption {
            option: flag.into(),
            message: m,
        };
        let include = if opts.paths.is_empty() {
            None
        } else {
            Some(filters::glob_set(&opts.paths).map_err(|m| bad("paths", m))?)
        };
        let exclude = filters::glob_set(&opts.exclude).map_err(|m| bad("exclude", m))?;
        Ok(Self {
            include,
            exclude,
            repo_name,
        })
    }
}

/// A blob's content, checked for UTF-8 once when it is read.
pub(crate) enum Blob {
    Text(String),
    Bytes(Vec<u8>),
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(t) => Blob::Text(t),
            Err(e) => Blob::Bytes(e.into_bytes()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Text(t) => t.as_bytes(),
            Blob::Bytes(b) => b,
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Blob::Text(t) => Some(t),
            Blob::Bytes(_) => None,
        }
    }
}

/// The text of one side of a change ("" for an absent side).
fn side_text(b: &Option<Arc<Blob>>) -> &str {
    b.as_deref().and_then(Blob::text).unwrap_or("")
}

/// One worker's state: its own repository handle and the blobs of the last commit.
pub(crate) struct Worker<'a> {
    repo: Repository,
    opts: &'a MineOptions,
    compiled: &'a Compiled,
    prev_blobs: HashMap<Oid, Arc<Blob>>,
    attributes: HashMap<Oid, Arc<LinguistAttributes>>,
}

/// The files of a change that survived the filters.
struct Kept {
    path: String,
    status: FileStatus,
    old: Option<Arc<Blob>>,
    new: Option<Arc<Blob>>,
    old_mode: u32,
    new_mode: u32,
}

impl Kept {
    fn edit(&self) -> FileEdit<'_> {
        FileEdit {
            path: &self.path,
            status: self.status,
            old: side_text(&self.old),
            new: side_text(&self.new),
            old_mode: self.old_mode,
            new_mode: self.new_mode,
        }
    }
}

impl<'a> Worker<'a> {
    pub fn new(
        path: &Path,
        opts: &'a MineOptions,
        compiled: &'a Compiled,
    ) -> Result<Self, MineError> {
        let repo = crate::open(path)?;
        Ok(Self {
            repo,
            opts,
            compiled,
            prev_blobs: HashMap::new(),
            attributes: HashMap::new(),
        })
    }

    fn blob(
        &self,
        odb: &git2::Odb,
        id: Oid,
        cur: &mut HashMap<Oid, Arc<Blob>>,
    ) -> Result<Arc<Blob>, git2::Error> {
        if let Some(b) = cur.get(&id).or_else(|| self.prev_blobs.get(&id)) {
            return Ok(b.clone());
        }
        let b = Arc::new(Blob::new(treediff::read_blob(odb, id)?));
        cur.insert(id, b.clone());
        Ok(b)
    }

    /// Mines one commit of the first-parent history into a pair, or says why not.
    pub fn commit(&mut self, id: Oid, counts: &mut Counts) -> Option<Pair> {
        counts.commits += 1;
        match self.try_commit(id, counts) {
            Ok(Ok(pair)) => {
                counts.pairs += 1;
                Some(pair)
            }
            Ok(Err(skip)) => {
                counts.skip(skip);
                None
            }
            Err(_) => {
                counts.skip(ChangeSkip::Unreadable);
                None
            }
        }
    }

    fn try_commit(
        &mut self,
        id: Oid,
        counts: &mut Counts,
    ) -> Result<Result<Pair, ChangeSkip>, git2::Error> {
        let opts = self.opts;
        let commit = self.repo.find_commit(id)?;
        let author = commit.author();
        if opts.skip_bots
            && filters::is_bot(
                &String::from_utf8_lossy(author.name_bytes()),
                &String::from_utf8_lossy(author.email_bytes()),
            )
        {
            return Ok(Err(ChangeSkip::BotAuthor));
        }
        let msg = String::from_utf8_lossy(commit.message_bytes()).into_owned();
        let parents = commit.parent_count();
        let Some(described) = message::describe(&msg, parents > 1) else {
            return Ok(Err(ChangeSkip::MergeWithoutPr));
        };
        if opts.skip_boilerplate && message::is_boilerplate(&described.instruction) {
            return Ok(Err(ChangeSkip::Boilerplate));
        }
        let old_tree = if parents > 0 {
            Some(self.repo.find_commit(commit.parent_id(0)?)?.tree_id())
        } else {
            None
        };
        let tree = commit.tree()?;
        let mut changes = Vec::new();
        treediff::diff_trees(&self.repo, old_tree, Some(tree.id()), b"", &mut changes)?;
        if changes.len() > opts.max_files {
            return Ok(Err(ChangeSkip::TooManyFiles));
        }
        let odb = self.repo.odb()?;
        let attrs = attributes_of(&mut self.attributes, &odb, &tree);
        let mut cur = HashMap::new();
        let kept = self.filter_files(&odb, &changes, attrs.as_deref(), counts, &mut cur)?;
        self.prev_blobs = cur;
        if kept.is_empty() {
            return Ok(Err(ChangeSkip::NoFilesLeft));
        }

        // Hunks and context first: when instruction + context alone (redacted, as they will
        // be written) are over the token budget, the pair is dropped before the costlier
        // target rendering.
        let hunks: Vec<Vec<edit::Hunk>> = kept
            .iter()
            .map(|k| edit::hunks(side_text(&k.old), side_text(&k.new)))
            .collect();
        let (mut added, mut removed) = (0, 0);
        for h in &hunks {
            let (a, r) = edit::line_counts(h);
            added += a;
            removed += r;
        }
        if added + removed > opts.max_lines {
            return Ok(Err(ChangeSkip::TooManyLines));
        }
        let mut context = String::new();
        for (k, h) in kept.iter().zip(&hunks) {
            edit::context(&k.edit(), h, &mut context);
        }
        let over_budget = |text_tokens: usize| text_tokens > opts.max_pair_tokens;
        let (instruction, s1) = secrets::redact(&described.instruction);
        let (context, s2) = secrets::redact(context.trim_end());
        if over_budget(estimate_tokens(&instruction) + estimate_tokens(&context)) {
            return Ok(Err(ChangeSkip::OverTokenBudget));
        }
        let mut target = String::new();
        let mut languages: Vec<String> = Vec::new();
        for (k, h) in kept.iter().zip(&hunks) {
            match opts.format {
                PairFormat::SearchReplace => edit::search_replace(&k.edit(), h, &mut target),
                PairFormat::Udiff => edit::unified_diff(&k.edit(), h, &mut target),
            }
            let lang = filters::language(&k.path).to_string();
            if !languages.contains(&lang) {
                languages.push(lang);
            }
        }
        let (target, s3) = secrets::redact(target.trim_end());
        if over_budget(
            estimate_tokens(&instruction) + estimate_tokens(&context) + estimate_tokens(&target),
        ) {
            return Ok(Err(ChangeSkip::OverTokenBudget));
        }
        counts.secrets_redacted += s1 + s2 + s3;
        counts.lines_added += added;
        counts.lines_removed += removed;
        for l in &languages {
            *counts.languages.entry(l.clone()).or_default() += 1;
        }

        let when = author.when();
        let ts = when.seconds();
        let mut commits = vec![id.to_string()];
        if parents > 1 {
            commits.push(commit.parent_id(1)?.to_string());
        }
        let kind_tag = match described.kind {
            ChangeKind::Commit => "commit",
            _ => "pr",
        };
        Ok(Ok(Pair {
            id: format!("{kind_tag}:{id}"),
            instruction,
            context,
            target,
            format: opts.format,
            meta: PairMeta {
                repo: self.compiled.repo_name.clone(),
                kind: described.kind,
                commits,
                pr: described.pr,
                author_time: chrono::DateTime::from_timestamp(ts, 0)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default(),
                author_timestamp: ts,
                files: kept.iter().map(|k| k.path.clone()).collect(),
                languages,
                lines_added: added,
                lines_removed: removed,
                split: String::new(),
            },
        }))
    }

    fn filter_files(
        &self,
        odb: &git2::Odb,
        changes: &[Change],
        attrs: Option<&LinguistAttributes>,
        counts: &mut Counts,
        cur: &mut HashMap<Oid, Arc<Blob>>,
    ) -> Result<Vec<Kept>, git2::Error> {
        let opts = self.opts;
        // Exact renames: a deleted blob that reappears under another path, content unchanged.
        let added_ids: HashMap<Oid, usize> = changes
            .iter()
            .filter(|c| c.old.is_none())
            .filter_map(|c| c.new.map(|n| (n.id, 0)))
            .collect();
        let deleted_ids: HashMap<Oid, usize> = changes
            .iter()
            .filter(|c| c.new.is_none())
            .filter_map(|c| c.old.map(|o| (o.id, 0)))
            .collect();
        let mut kept = Vec::new();
        for c in changes {
            let skip = |why: FileSkip, counts: &mut Counts| counts.skip_file(why);
            let Ok(path) = std::str::from_utf8(&c.path) else {
                skip(FileSkip::NonUtf8, counts);
                continue;
            };
            let old_mode = c.old.map_or(0, |s| s.mode);
            let new_mode = c.new.map_or(0, |s| s.mode);
            if old_mode == MODE_SUBMODULE || new_mode == MODE_SUBMODULE {
                skip(FileSkip::Submodule, counts);
                continue;
            }
            if old_mode == MODE_SYMLINK || new_mode == MODE_SYMLINK {
                skip(FileSkip::Symlink, counts);
                continue;
            }
            if let (Some(o), Some(n)) = (c.old, c.new) {
                if o.id == n.id {
                    skip(FileSkip::ModeOnly, counts);
                    continue;
                }
            }
            let renamed = match (c.old, c.new) {
                (None, Some(n)) => deleted_ids.contains_key(&n.id),
                (Some(o), None) => added_ids.contains_key(&o.id),
                _ => false,
            };
            if renamed {
                skip(FileSkip::RenameOnly, counts);
                continue;
            }
            if self
                .compiled
                .include
                .as_ref()
                .is_some_and(|s| !s.is_match(path))
                || self.compiled.exclude.is_match(path)
            {
                skip(FileSkip::PathFilter, counts);
                continue;
            }
            let generated =
                || filters::path_skip(path).or_else(|| attrs.and_then(|a| a.skip(path)));
            if let Some(why) = opts.skip_generated.then(generated).flatten() {
                skip(why, counts);
                continue;
            }
            // Sizes from the object headers first: a huge blob is never inflated.
            let mut too_large = false;
            for side in [c.old, c.new].into_iter().flatten() {
                if !cur.contains_key(&side.id) && !self.prev_blobs.contains_key(&side.id) {
                    let (size, _) = odb.read_header(side.id)?;
                    too_large |= size as u64 > opts.max_file_bytes;
                }
            }
            if too_large {
                skip(FileSkip::TooLarge, counts);
                continue;
            }
            let old = match c.old {
                Some(s) => Some(self.blob(odb, s.id, cur)?),
                None => None,
            };
            let new = match c.new {
                Some(s) => Some(self.blob(odb, s.id, cur)?),
                None => None,
            };
            let sides = [old.as_deref(), new.as_deref()];
            if sides
                .iter()
                .flatten()
                .any(|b| filters::is_binary(b.bytes()))
            {
                skip(FileSkip::Binary, counts);
                continue;
            }
            if sides
                .iter()
                .flatten()
                .any(|b| b.bytes().len() as u64 > opts.max_file_bytes)
            {
                skip(FileSkip::TooLarge, counts);
                continue;
            }
            if sides.iter().flatten().any(|b| b.text().is_none()) {
                skip(FileSkip::NonUtf8, counts);
                continue;
            }
            let texts = sides.iter().flatten().filter_map(|b| b.text());
            if texts
                .clone()
                .any(|t| filters::has_long_line(t, opts.max_line_chars))
            {
                skip(FileSkip::LongLines, counts);
                continue;
            }
            if opts.skip_generated && texts.clone().any(filters::has_generated_marker) {
                skip(FileSkip::Generated, counts);
                continue;
            }
            let status = match (c.old, c.new) {
                (None, _) => FileStatus::Added,
                (_, None) => FileStatus::Deleted,
                _ => FileStatus::Modified,
            };
            kept.push(Kept {
                path: path.to_string(),
                status,
                old,
                new,
                old_mode,
                new_mode,
            });
        }
        Ok(kept)
    }
}

/// The root `.gitattributes` of `tree`, parsed once per blob.
fn attributes_of(
    cache: &mut HashMap<Oid, Arc<LinguistAttributes>>,
    odb: &git2::Odb,
    tree: &git2::Tree,
) -> Option<Arc<LinguistAttributes>> {
    let id = tree.get_name(".gitattributes")?.id();
    if let Some(a) = cache.get(&id) {
        return Some(a.clone());
    }
    let bytes = treediff::read_blob(odb, id).ok()?;
    let attrs = Arc::new(LinguistAttributes::parse(&String::from_utf8_lossy(&bytes)));
    cache.insert(id, attrs.clone());
    Some(attrs)
}
