//! Changed files between two trees, read straight from the object database.
//!
//! A merge-walk of the two sorted tree listings that skips every subtree whose id is the same
//! on both sides (most of a large repository, for most commits): this is what makes mining
//! faster than libgit2's general tree diff (DESIGN.md, "Mining speed").

use git2::{ObjectType, Oid, Repository};
use std::cmp::Ordering;

pub const MODE_TREE: u32 = 0o040000;
pub const MODE_SYMLINK: u32 = 0o120000;
pub const MODE_SUBMODULE: u32 = 0o160000;

/// One side of a changed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub id: Oid,
    pub mode: u32,
}

/// A changed path (full path from the root; bytes, as git stores them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: Vec<u8>,
    pub old: Option<Side>,
    pub new: Option<Side>,
}

struct Entry {
    name: Vec<u8>,
    id: Oid,
    mode: u32,
}

fn is_tree(mode: u32) -> bool {
    mode & 0o170000 == MODE_TREE
}

fn entries(repo: &Repository, id: Option<Oid>) -> Result<Vec<Entry>, git2::Error> {
    let Some(id) = id else {
        return Ok(Vec::new());
    };
    let tree = repo.find_tree(id)?;
    Ok(tree
        .iter()
        .map(|e| Entry {
            name: e.name_bytes().to_vec(),
            id: e.id(),
            mode: e.filemode() as u32,
        })
        .collect())
}

/// Git's tree order: names compared bytewise, a tree's name as if it ended in `/`.
fn git_order(a: &Entry, b: &Entry) -> Ordering {
    let key = |e: &Entry, i: usize| -> Option<u8> {
        match e.name.get(i) {
            Some(&c) => Some(c),
            None if is_tree(e.mode) && i == e.name.len() => Some(b'/'),
            None => None,
        }
    };
    let mut i = 0;
    loop {
        match (key(a, i), key(b, i)) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x != y => return x.cmp(&y),
            _ => i += 1,
        }
    }
}

/// Appends the files that differ between trees `old` and `new` (either may be absent: the
/// empty tree) to `out`, paths prefixed with `prefix`.
pub fn diff_trees(
    repo: &Repository,
    old: Option<Oid>,
    new: Option<Oid>,
    prefix: &[u8],
    out: &mut Vec<Change>,
) -> Result<(), git2::Error> {
    if old == new {
        return Ok(());
    }
    let a = entries(repo, old)?;
    let b = entries(repo, new)?;
    let (mut i, mut j) = (0, 0);
    let join = |name: &[u8]| -> Vec<u8> {
        let mut p = prefix.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        p
    };
    while i < a.len() || j < b.len() {
        let ord = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => git_order(x, y),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        match ord {
            Ordering::Less => {
                side_only(repo, &a[i], &join(&a[i].name), true, out)?;
                i += 1;
            }
            Ordering::Greater => {
                side_only(repo, &b[j], &join(&b[j].name), false, out)?;
                j += 1;
            }
            Ordering::Equal => {
                let (x, y) = (&a[i], &b[j]);
                if x.id != y.id || x.mode != y.mode {
                    let path = join(&x.name);
                    if is_tree(x.mode) && is_tree(y.mode) {
                        diff_trees(repo, Some(x.id), Some(y.id), &path, out)?;
                    } else {
                        out.push(Change {
                            path,
                            old: Some(Side {
                                id: x.id,
                                mode: x.mode,
                            }),
                            new: Some(Side {
                                id: y.id,
                                mode: y.mode,
                            }),
                        });
                    }
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

/// An entry present on one side only: a file, or every file of a subtree.
fn side_only(
    repo: &Repository,
    e: &Entry,
    path: &[u8],
    is_old: bool,
    out: &mut Vec<Change>,
) -> Result<(), git2::Error> {
    if is_tree(e.mode) {
        let (o, n) = if is_old {
            (Some(e.id), None)
        } else {
            (None, Some(e.id))
        };
        return diff_trees(repo, o, n, path, out);
    }
    let side = Some(Side {
        id: e.id,
        mode: e.mode,
    });
    out.push(Change {
        path: path.to_vec(),
        old: if is_old { side } else { None },
        new: if is_old { None } else { side },
    });
    Ok(())
}

/// Reads a blob's bytes through the object database (no object cache, no re-hashing).
pub fn read_blob(odb: &git2::Odb, id: Oid) -> Result<Vec<u8>, git2::Error> {
    let obj = odb.read(id)?;
    if obj.kind() != ObjectType::Blob {
        return Err(git2::Error::from_str(&format!("{id} is not a blob")));
    }
    Ok(obj.data().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, tree: bool) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            id: Oid::ZERO_SHA1,
            mode: if tree { MODE_TREE } else { 0o100644 },
        }
    }

    #[test]
    fn git_orders_trees_as_if_slash_terminated() {
        // "a.b" < "a/" (tree a) because '.' (0x2e) < '/' (0x2f); "a/" < "a0".
        assert_eq!(git_order(&e("a.b", false), &e("a", true)), Ordering::Less);
        assert_eq!(git_order(&e("a", true), &e("a0", false)), Ordering::Less);
        assert_eq!(git_order(&e("a", false), &e("a", true)), Ordering::Less);
        assert_eq!(git_order(&e("b", false), &e("b", false)), Ordering::Equal);
    }
}
