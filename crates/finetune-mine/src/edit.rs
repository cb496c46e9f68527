//! One file's change as text: line hunks (imara-diff, Myers as git uses by default), the edit
//! as SEARCH/REPLACE blocks or as a git-style unified diff, and the pre-change context.
//!
//! SEARCH/REPLACE blocks (the Aider edit format) are applied by finding the SEARCH text in the
//! file and replacing it: each block is widened with unchanged lines until its SEARCH text
//! occurs exactly once in the old file (up to 8 lines each side), and a pure insertion always
//! carries at least one line of context. A new file is one block with an empty SEARCH.

use imara_diff::{Algorithm, Diff, InternedInput};
use std::fmt::Write;
use std::ops::Range;

/// Whether the file was added, deleted or modified by the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    Added,
    Deleted,
    Modified,
}

/// One file's change with its text on both sides.
#[derive(Debug, Clone)]
pub struct FileEdit<'a> {
    pub path: &'a str,
    pub status: FileStatus,
    pub old: &'a str,
    pub new: &'a str,
    pub old_mode: u32,
    pub new_mode: u32,
}

/// Line ranges that differ; `before` indexes the old lines, `after` the new lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    pub before: Range<usize>,
    pub after: Range<usize>,
}

/// Splits text into lines that keep their `\n` (the last one may lack it).
pub fn lines(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / 32 + 1);
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', text.as_bytes()) {
        out.push(&text[start..=nl]);
        start = nl + 1;
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// The differing line ranges of `old` → `new`.
pub fn hunks(old: &str, new: &str) -> Vec<Hunk> {
    let input = InternedInput::new(old, new);
    let mut diff = Diff::compute(Algorithm::Myers, &input);
    diff.postprocess_lines(&input);
    diff.hunks()
        .map(|h| Hunk {
            before: h.before.start as usize..h.before.end as usize,
            after: h.after.start as usize..h.after.end as usize,
        })
        .collect()
}

/// Lines added and removed.
pub fn line_counts(hunks: &[Hunk]) -> (usize, usize) {
    hunks
        .iter()
        .fold((0, 0), |(a, r), h| (a + h.after.len(), r + h.before.len()))
}

/// The edit as SEARCH/REPLACE blocks, each preceded by the file path.
pub fn search_replace(edit: &FileEdit, hunks: &[Hunk], out: &mut String) {
    let old_lines = lines(edit.old);
    let new_lines = lines(edit.new);
    let mut block = |search: &str, replace: &str| {
        let _ = write!(out, "{}\n<<<<<<< SEARCH\n", edit.path);
        push_text(out, search);
        out.push_str("=======\n");
        push_text(out, replace);
        out.push_str(">>>>>>> REPLACE\n\n");
    };
    if edit.status == FileStatus::Added || edit.old.is_empty() {
        block("", edit.new);
        return;
    }
    let unique = |b: &Range<usize>| -> bool {
        let want = &old_lines[b.clone()];
        let aligned = old_lines
            .windows(want.len())
            .filter(|w| w[0] == want[0] && *w == want)
            .take(2)
            .count();
        // Line-aligned uniqueness first (cheap); then the exact text search an editor does,
        // which also sees matches that start or end mid-line.
        aligned == 1 && occurs_once(edit.old, &want.concat())
    };
    // Grow each group of hunks by unchanged lines on both sides until its SEARCH text occurs
    // once in the old file. Context never reaches into another hunk: when it would, that
    // hunk (or the previous block) joins the group, so the lines around a group are the same
    // on both sides.
    struct Block {
        first: usize,
        b: Range<usize>,
        a: Range<usize>,
    }
    let mut blocks: Vec<Block> = Vec::new();
    let mut i = 0;
    while i < hunks.len() {
        let (mut first, mut j) = (i, i);
        let mut c = usize::from(hunks[i].before.is_empty());
        let (b, a) = loop {
            let prev_end = blocks.last().map_or(0, |blk| blk.b.end);
            let room_before = hunks[first].before.start - prev_end;
            if c > room_before && !blocks.is_empty() {
                first = blocks.pop().map_or(first, |blk| blk.first);
                continue;
            }
            let next_start = hunks.get(j + 1).map_or(old_lines.len(), |h| h.before.start);
            let room_after = next_start - hunks[j].before.end;
            if c > room_after && j + 1 < hunks.len() {
                j += 1;
                continue;
            }
            let (lead, trail) = (c.min(room_before), c.min(room_after));
            let b = hunks[first].before.start - lead..hunks[j].before.end + trail;
            let a = hunks[first].after.start - lead..hunks[j].after.end + trail;
            let whole = b.start == 0 && b.end == old_lines.len();
            if whole || c >= 8 || (!b.is_empty() && unique(&b)) {
                break (b, a);
            }
            c += 1;
        };
        blocks.push(Block { first, b, a });
        i = j + 1;
    }
    for blk in blocks {
        block(&old_lines[blk.b].concat(), &new_lines[blk.a].concat());
    }
}

/// Whether `needle` (non-empty) occurs exactly once in `haystack`, overlapping occurrences
/// included (`"a\na\n"` occurs twice in `"a\na\na\n"`): an editor applying the block
/// must find one place only.
fn occurs_once(haystack: &str, needle: &str) -> bool {
    let Some(first) = haystack.find(needle) else {
        return false;
    };
    let step = haystack[first..].chars().next().map_or(1, char::len_utf8);
    !needle.is_empty() && !haystack[first + step..].contains(needle)
}

fn push_text(out: &mut String, text: &str) {
    out.push_str(text);
    if !text.is_empty() && !text.ends_with('\n') {
        out.push('\n');
    }
}

/// Lines of context around each hunk of a unified diff (git's default).
const UDIFF_CONTEXT: usize = 3;

/// The edit as `git diff` would print it (`git apply` reads it back).
pub fn unified_diff(edit: &FileEdit, hunks: &[Hunk], out: &mut String) {
    let p = edit.path;
    let _ = writeln!(out, "diff --git a/{p} b/{p}");
    match edit.status {
        FileStatus::Added => {
            let _ = writeln!(out, "new file mode {:o}", edit.new_mode);
            let _ = writeln!(out, "--- /dev/null\n+++ b/{p}");
        }
        FileStatus::Deleted => {
            let _ = writeln!(out, "deleted file mode {:o}", edit.old_mode);
            let _ = writeln!(out, "--- a/{p}\n+++ /dev/null");
        }
        FileStatus::Modified => {
            if edit.old_mode != edit.new_mode {
                let _ = writeln!(
                    out,
                    "old mode {:o}\nnew mode {:o}",
                    edit.old_mode, edit.new_mode
                );
            }
            let _ = writeln!(out, "--- a/{p}\n+++ b/{p}");
        }
    }
    let old_lines = lines(edit.old);
    let new_lines = lines(edit.new);
    // Group hunks whose context would overlap, as git does.
    let mut i = 0;
    while i < hunks.len() {
        let mut j = i;
        while j + 1 < hunks.len()
            && hunks[j + 1].before.start - hunks[j].before.end <= 2 * UDIFF_CONTEXT
        {
            j += 1;
        }
        let lead = hunks[i].before.start.min(UDIFF_CONTEXT);
        let b_lo = hunks[i].before.start - lead;
        let a_lo = hunks[i].after.start - lead;
        let trail = (old_lines.len() - hunks[j].before.end).min(UDIFF_CONTEXT);
        let b_hi = hunks[j].before.end + trail;
        let a_hi = hunks[j].after.end + trail;
        let range = |lo: usize, hi: usize| {
            let n = hi - lo;
            let start = if n == 0 { lo } else { lo + 1 };
            if n == 1 {
                format!("{start}")
            } else {
                format!("{start},{n}")
            }
        };
        let _ = writeln!(out, "@@ -{} +{} @@", range(b_lo, b_hi), range(a_lo, a_hi));
        let mut pos = b_lo;
        for h in &hunks[i..=j] {
            for l in &old_lines[pos..h.before.start] {
                diff_line(out, ' ', l);
            }
            for l in &old_lines[h.before.clone()] {
                diff_line(out, '-', l);
            }
            for l in &new_lines[h.after.clone()] {
                diff_line(out, '+', l);
            }
            pos = h.before.end;
        }
        for l in &old_lines[pos..b_hi] {
            diff_line(out, ' ', l);
        }
        i = j + 1;
    }
}

fn diff_line(out: &mut String, sign: char, line: &str) {
    out.push(sign);
    out.push_str(line);
    if !line.ends_with('\n') {
        out.push_str("\n\\ No newline at end of file\n");
    }
}

/// Files up to this many lines go into the context whole; longer ones are windowed.
pub const CONTEXT_WHOLE_FILE_LINES: usize = 200;
/// Lines kept on each side of a hunk in a windowed context.
pub const CONTEXT_WINDOW_LINES: usize = 40;

/// The pre-change content of the file, under a `### path` header; windows around the hunks
/// (with `⋮` where lines are left out) when the file is long.
pub fn context(edit: &FileEdit, hunks: &[Hunk], out: &mut String) {
    match edit.status {
        FileStatus::Added => {
            let _ = writeln!(out, "### {} (new file)\n", edit.path);
            return;
        }
        FileStatus::Deleted => {
            let _ = writeln!(out, "### {} (deleted)", edit.path);
        }
        FileStatus::Modified => {
            let _ = writeln!(out, "### {}", edit.path);
        }
    }
    let old_lines = lines(edit.old);
    if old_lines.len() <= CONTEXT_WHOLE_FILE_LINES {
        push_text(out, edit.old);
        out.push('\n');
        return;
    }
    let mut windows: Vec<Range<usize>> = Vec::new();
    for h in hunks {
        let lo = h.before.start.saturating_sub(CONTEXT_WINDOW_LINES);
        let hi = (h.before.end + CONTEXT_WINDOW_LINES).min(old_lines.len());
        match windows.last_mut() {
            Some(w) if lo <= w.end => w.end = w.end.max(hi),
            _ => windows.push(lo..hi),
        }
    }
    let mut pos = 0;
    for w in windows {
        if w.start > pos {
            out.push_str("⋮\n");
        }
        push_text(out, &old_lines[w.clone()].concat());
        pos = w.end;
    }
    if pos < old_lines.len() {
        out.push_str("⋮\n");
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit<'a>(status: FileStatus, old: &'a str, new: &'a str) -> FileEdit<'a> {
        FileEdit {
            path: "src/a.rs",
            status,
            old,
            new,
            old_mode: 0o100644,
            new_mode: 0o100644,
        }
    }

    /// Applies SEARCH/REPLACE blocks the way an editor agent does: find, replace once.
    fn apply_search_replace(old: &str, blocks: &str) -> String {
        let mut text = old.to_string();
        let mut rest = blocks;
        while let Some(i) = rest.find("<<<<<<< SEARCH\n") {
            rest = &rest[i + 15..];
            let (search, r) = rest.split_once("=======\n").unwrap();
            let (replace, r) = r.split_once(">>>>>>> REPLACE\n").unwrap();
            rest = r;
            if search.is_empty() {
                text = replace.to_string();
            } else {
                assert_eq!(
                    text.matches(search).count(),
                    1,
                    "SEARCH not unique: {search:?}"
                );
                text = text.replacen(search, replace, 1);
            }
        }
        text
    }

    #[test]
    fn search_replace_blocks_apply_back_to_the_new_file() {
        let old = "fn a() {}\n\nfn b() {}\n\nfn a() {}\nfn c() {}\n";
        for new in [
            "fn a() {}\n\nfn b() { 1 }\n\nfn a() {}\nfn c() {}\n",
            "fn a() {}\n\nfn b() {}\n\nfn a() {}\nfn d() {}\nfn c() {}\n",
            "fn z() {}\nfn a() {}\n\nfn b() {}\n\nfn a() {}\nfn c() {}\n",
            "fn a() {}\n\nfn b() {}\n\nfn c() {}\n",
            "",
        ] {
            let h = hunks(old, new);
            let mut out = String::new();
            search_replace(&edit(FileStatus::Modified, old, new), &h, &mut out);
            assert_eq!(apply_search_replace(old, &out), new, "blocks:\n{out}");
        }
    }

    /// Random line edits on texts with many repeated lines (the hard case for uniqueness):
    /// the blocks always apply back to the new text.
    #[test]
    fn random_edits_round_trip() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for case in 0..2000 {
            let n = 1 + next(40) as usize;
            let old: Vec<String> = (0..n).map(|_| format!("l{}\n", next(6))).collect();
            let mut new = old.clone();
            for _ in 0..1 + next(6) {
                let at = next(new.len() as u64 + 1) as usize;
                match next(3) {
                    0 if at < new.len() => {
                        new.remove(at);
                    }
                    1 if at < new.len() => new[at] = format!("x{}\n", next(4)),
                    _ => new.insert(at, format!("y{}\n", next(4))),
                }
            }
            let (old, new) = (old.concat(), new.concat());
            let h = hunks(&old, &new);
            let mut out = String::new();
            search_replace(&edit(FileStatus::Modified, &old, &new), &h, &mut out);
            let got = apply_blocks_lenient(&old, &out);
            assert_eq!(got, new, "case {case}: old {old:?}\nblocks:\n{out}");
        }
    }

    /// Applies blocks in order, each replacing the first match after the previous one (how
    /// a block that is not unique within 8 lines of context is still applied correctly).
    fn apply_blocks_lenient(old: &str, blocks: &str) -> String {
        let mut text = old.to_string();
        let mut from = 0;
        let mut rest = blocks;
        while let Some(i) = rest.find("<<<<<<< SEARCH\n") {
            rest = &rest[i + 15..];
            let (search, r) = rest.split_once("=======\n").unwrap();
            let (replace, r) = r.split_once(">>>>>>> REPLACE\n").unwrap();
            rest = r;
            let at = from + text[from..].find(search).expect("SEARCH found");
            text.replace_range(at..at + search.len(), replace);
            from = at + replace.len();
        }
        text
    }

    #[test]
    fn new_file_is_one_block_with_empty_search() {
        let mut out = String::new();
        search_replace(&edit(FileStatus::Added, "", "x\n"), &[], &mut out);
        assert_eq!(
            out,
            "src/a.rs\n<<<<<<< SEARCH\n=======\nx\n>>>>>>> REPLACE\n\n"
        );
    }

    #[test]
    fn unified_diff_matches_git_format() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n";
        let new = "1\n2\n3\nfour\n5\n6\n7\n8\n9\n10\n11";
        let h = hunks(old, new);
        let mut out = String::new();
        unified_diff(&edit(FileStatus::Modified, old, new), &h, &mut out);
        assert_eq!(
            out,
            "diff --git a/src/a.rs b/src/a.rs\n--- a/src/a.rs\n+++ b/src/a.rs\n\
             @@ -1,10 +1,11 @@\n 1\n 2\n 3\n-4\n+four\n 5\n 6\n 7\n 8\n 9\n 10\n+11\n\\ No newline at end of file\n"
        );
        assert_eq!(line_counts(&h), (2, 1));
    }

    #[test]
    fn long_files_are_windowed() {
        let old: String = (0..500).map(|i| format!("line {i}\n")).collect();
        let new = old.replace("line 250\n", "line 250!\n");
        let h = hunks(&old, &new);
        let mut out = String::new();
        context(&edit(FileStatus::Modified, &old, &new), &h, &mut out);
        assert!(out.starts_with("### src/a.rs\n⋮\nline 210\n"), "{out}");
        assert!(out.contains("line 290\n⋮\n"), "{out}");
        assert!(!out.contains("line 209\n"));
    }
}
