//! Reading trees without knowing where they live: path lookup, walks, counts and diffs over
//! any [`TreeSource`] (the store, or the trees of a `.velo` file held in memory).
//!
//! Every walk is iterative: a hostile manifest may describe a directory chain far deeper
//! than any stack.

use std::collections::HashMap;
use std::sync::Arc;

use velo_core::{Entry, EntryKind, Hash, Tree};

use crate::{Result, RootStats, Store, StoreError};

/// Where trees come from.
pub trait TreeSource: Sync {
    /// The tree named `hash`, verified.
    fn tree(&self, hash: &Hash) -> Result<Tree>;
}

impl TreeSource for Store {
    fn tree(&self, hash: &Hash) -> Result<Tree> {
        self.get_tree(hash)
    }
}

/// Trees held in memory, e.g. those of a `.velo` file that was not imported.
pub struct MemoryTrees(pub HashMap<Hash, Tree>);

impl TreeSource for MemoryTrees {
    fn tree(&self, hash: &Hash) -> Result<Tree> {
        self.0.get(hash).cloned().ok_or(StoreError::Missing {
            kind: "tree",
            hash: *hash,
        })
    }
}

/// What a path inside a tree names.
#[derive(Debug, Clone)]
pub enum Found {
    /// The path is the root itself.
    Root(Hash),
    /// An entry.
    Entry(Entry),
}

/// Splits a path inside a tree into components; `.` and empty components are dropped.
fn components(path: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(StoreError::Invalid(
                    "paths inside a tree cannot contain '..'".into(),
                ))
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Finds `path` (slash-separated, relative to the root) without following symlinks.
pub fn lookup(src: &dyn TreeSource, root: Hash, path: &[u8]) -> Result<Found> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    let parts = components(path)?;
    let Some((last, parents)) = parts.split_last() else {
        return Ok(Found::Root(root));
    };
    let mut current = root;
    for part in parents {
        let tree = src.tree(&current)?;
        match tree.get(part).map(|e| &e.kind) {
            Some(EntryKind::Dir { hash }) => current = *hash,
            Some(_) => {
                return Err(StoreError::NotADirectory {
                    path: shown(),
                    root,
                })
            }
            None => {
                return Err(StoreError::NoSuchPath {
                    path: shown(),
                    root,
                })
            }
        }
    }
    let tree = src.tree(&current)?;
    tree.get(last)
        .cloned()
        .map(Found::Entry)
        .ok_or(StoreError::NoSuchPath {
            path: shown(),
            root,
        })
}

/// The tree a path names, which must be a directory (or the root).
pub fn dir_at(src: &dyn TreeSource, root: Hash, path: &[u8]) -> Result<Hash> {
    match lookup(src, root, path)? {
        Found::Root(h) => Ok(h),
        Found::Entry(Entry {
            kind: EntryKind::Dir { hash },
            ..
        }) => Ok(hash),
        Found::Entry(_) => Err(StoreError::NotADirectory {
            path: String::from_utf8_lossy(path).into_owned(),
            root,
        }),
    }
}

/// What [`walk_reachable`] calls for each tree: (hash, path) → the tree to walk below.
pub type TreeVisitor<'a> = dyn FnMut(&Hash, &[u8]) -> Result<Option<Tree>> + 'a;

/// Visits every distinct tree reachable from `root` once, depth-first, with the path of the
/// first directory that names it (empty for the root): the one reachability walk of the
/// store (gc's mark, export, fsck, repair). `seen` is shared by the walks of several roots:
/// a tree already seen is not visited again. `visit` loads the tree (or reports that it
/// cannot) and returns it to be walked below, or `None` to go no deeper there.
pub fn walk_reachable(
    root: Hash,
    seen: &mut std::collections::HashSet<Hash>,
    visit: &mut TreeVisitor<'_>,
) -> Result<()> {
    if !seen.insert(root) {
        return Ok(());
    }
    let mut stack = vec![(root, Vec::new())];
    while let Some((hash, dir)) = stack.pop() {
        let Some(tree) = visit(&hash, &dir)? else {
            continue;
        };
        for entry in tree.entries() {
            if let EntryKind::Dir { hash } = &entry.kind {
                if seen.insert(*hash) {
                    stack.push((*hash, join(&dir, entry.name.as_bytes())));
                }
            }
        }
    }
    Ok(())
}

/// `prefix/name` as tree paths are spelled (bytes; no leading `/`; `name` alone at the
/// root). The one join of tree paths the crates share.
pub fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(prefix.len() + 1 + name.len());
    if !prefix.is_empty() {
        p.extend_from_slice(prefix);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Visits every entry below `dir` in pre-order (a directory before its contents, names
/// ascending), with its path relative to `dir` prefixed by `prefix`. With `recursive` false
/// only the direct entries are visited.
pub fn walk(
    src: &dyn TreeSource,
    dir: Hash,
    prefix: &[u8],
    recursive: bool,
    visit: &mut dyn FnMut(&[u8], &Entry) -> Result<()>,
) -> Result<()> {
    let mut stack: Vec<(Arc<Tree>, usize, Vec<u8>)> =
        vec![(Arc::new(src.tree(&dir)?), 0, prefix.to_vec())];
    while let Some((tree, index, base)) = stack.last_mut() {
        let Some(entry) = tree.entries().get(*index) else {
            stack.pop();
            continue;
        };
        *index += 1;
        let entry = entry.clone();
        let path = join(base, entry.name.as_bytes());
        visit(&path, &entry)?;
        if let (true, EntryKind::Dir { hash }) = (recursive, &entry.kind) {
            let child = Arc::new(src.tree(hash)?);
            stack.push((child, 0, path));
        }
    }
    Ok(())
}

/// Counts files, directories, symlinks and logical bytes below `root`; each subtree is
/// read once however often it repeats.
pub fn stats(src: &dyn TreeSource, root: Hash) -> Result<RootStats> {
    let mut memo: HashMap<Hash, RootStats> = HashMap::new();
    let mut loaded: HashMap<Hash, Tree> = HashMap::new();
    let mut stack = vec![root];
    while let Some(&hash) = stack.last() {
        if memo.contains_key(&hash) {
            stack.pop();
            continue;
        }
        let tree = match loaded.entry(hash) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(src.tree(&hash)?),
        };
        let pending: Vec<Hash> = tree
            .entries()
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::Dir { hash } if !memo.contains_key(&hash) => Some(hash),
                _ => None,
            })
            .collect();
        if !pending.is_empty() {
            stack.extend(pending);
            continue;
        }
        // Saturating: a tree whose every level names one child twice holds 2^64 paths;
        // its totals are "at least u64::MAX", never a wrap to a small number.
        let mut total = RootStats::default();
        for entry in tree.entries() {
            match &entry.kind {
                EntryKind::File { size, .. } => {
                    total.files = total.files.saturating_add(1);
                    total.bytes = total.bytes.saturating_add(*size);
                }
                EntryKind::Symlink { .. } => total.symlinks = total.symlinks.saturating_add(1),
                EntryKind::Dir { hash } => {
                    let child = memo[hash];
                    total.dirs = total.dirs.saturating_add(child.dirs.saturating_add(1));
                    total.files = total.files.saturating_add(child.files);
                    total.symlinks = total.symlinks.saturating_add(child.symlinks);
                    total.bytes = total.bytes.saturating_add(child.bytes);
                }
            }
        }
        memo.insert(hash, total);
        loaded.remove(&hash);
        stack.pop();
    }
    Ok(memo[&root])
}

/// How a path differs between two trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Only in the second tree.
    Added,
    /// Only in the first tree.
    Removed,
    /// In both, different.
    Modified,
}

impl ChangeKind {
    /// `added`, `removed` or `modified`.
    pub fn label(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "modified",
        }
    }
}

/// One difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Path relative to the roots.
    pub path: Vec<u8>,
    /// Added, removed or modified.
    pub change: ChangeKind,
    /// The entry kind (the new one when it changed).
    pub kind: &'static str,
    /// For modifications: which of `kind`, `content`, `target`, `mode`, `mtime`, `xattrs`
    /// changed.
    pub what: Vec<&'static str>,
}

/// The most changes a diff lists: a real diff stays far below; a hostile tree naming one
/// subtree twice per level would list 2^64 paths.
pub const MAX_CHANGES: usize = 10_000_000;

fn too_many_changes(count: usize) -> Result<()> {
    if count >= MAX_CHANGES {
        return Err(StoreError::Invalid(format!(
            "the trees differ in more than {MAX_CHANGES} paths (a tree that names one subtree many times?); compare subdirectories instead"
        )));
    }
    Ok(())
}

/// How many changes `diff(a, b)` lists, computed once per distinct pair of subtrees (and
/// once per distinct whole subtree added or removed), without listing them: a tree that
/// names one subtree twice per level is counted in a few hundred steps.
fn change_count(
    src: &dyn TreeSource,
    a: Hash,
    b: Hash,
    pairs: &mut HashMap<(Hash, Hash), u64>,
    wholes: &mut HashMap<Hash, u64>,
) -> Result<u64> {
    if a == b {
        return Ok(0);
    }
    if let Some(&n) = pairs.get(&(a, b)) {
        return Ok(n);
    }
    let whole = |entry: &Entry, wholes: &mut HashMap<Hash, u64>| -> Result<u64> {
        Ok(match entry.kind {
            EntryKind::Dir { hash } => match wholes.get(&hash) {
                Some(&n) => n,
                None => {
                    let inside = stats(src, hash)?;
                    let n = inside
                        .files
                        .saturating_add(inside.dirs)
                        .saturating_add(inside.symlinks)
                        .saturating_add(1);
                    wholes.insert(hash, n);
                    n
                }
            },
            _ => 1,
        })
    };
    let (ta, tb) = (src.tree(&a)?, src.tree(&b)?);
    let (ea, eb) = (ta.entries(), tb.entries());
    let (mut i, mut j) = (0, 0);
    let mut total = 0u64;
    while i < ea.len() || j < eb.len() {
        let order = match (ea.get(i), eb.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        let n = match order {
            std::cmp::Ordering::Less => {
                i += 1;
                whole(&ea[i - 1], wholes)?
            }
            std::cmp::Ordering::Greater => {
                j += 1;
                whole(&eb[j - 1], wholes)?
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (&ea[i], &eb[j]);
                i += 1;
                j += 1;
                match (&x.kind, &y.kind) {
                    (EntryKind::Dir { hash: hx }, EntryKind::Dir { hash: hy }) => {
                        u64::from(x.mode != y.mode || x.xattrs != y.xattrs)
                            .saturating_add(change_count(src, *hx, *hy, pairs, wholes)?)
                    }
                    (EntryKind::Dir { .. }, _) | (_, EntryKind::Dir { .. }) => {
                        whole(x, wholes)?.saturating_add(whole(y, wholes)?)
                    }
                    (kx, ky) => u64::from(
                        kx != ky
                            || x.mode != y.mode
                            || x.mtime_ns != y.mtime_ns
                            || x.xattrs != y.xattrs,
                    ),
                }
            }
        };
        total = total.saturating_add(n);
    }
    pairs.insert((a, b), total);
    Ok(total)
}

/// Lists every path that differs between trees `a` and `b`. Subtrees with equal hashes
/// are skipped without being read, so the cost follows the change, not the tree. A
/// directory whose only difference is its mtime is not reported (its contents are).
pub fn diff(src: &dyn TreeSource, a: Hash, b: Hash) -> Result<Vec<Change>> {
    // Counted first: refused before anything is walked if too many, and pairs of
    // subtrees without a change (a directory whose only difference is its mtime, named
    // many times over) are skipped below without being read again.
    let mut pairs = HashMap::new();
    let mut wholes = HashMap::new();
    let count = change_count(src, a, b, &mut pairs, &mut wholes)?;
    too_many_changes(usize::try_from(count).unwrap_or(usize::MAX))?;
    let mut out = Vec::new();
    let mut stack = vec![(a, b, Vec::new())];
    while let Some((a, b, base)) = stack.pop() {
        if a == b || pairs.get(&(a, b)) == Some(&0) {
            continue;
        }
        too_many_changes(out.len())?;
        let (ta, tb) = (src.tree(&a)?, src.tree(&b)?);
        let (ea, eb) = (ta.entries(), tb.entries());
        let (mut i, mut j) = (0, 0);
        let mut subdirs = Vec::new();
        while i < ea.len() || j < eb.len() {
            let order = match (ea.get(i), eb.get(j)) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    whole(src, &base, &ea[i], ChangeKind::Removed, &mut out)?;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    whole(src, &base, &eb[j], ChangeKind::Added, &mut out)?;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (x, y) = (&ea[i], &eb[j]);
                    let path = join(&base, x.name.as_bytes());
                    match (&x.kind, &y.kind) {
                        (EntryKind::Dir { hash: hx }, EntryKind::Dir { hash: hy }) => {
                            let mut what = Vec::new();
                            if x.mode != y.mode {
                                what.push("mode");
                            }
                            if x.xattrs != y.xattrs {
                                what.push("xattrs");
                            }
                            if !what.is_empty() {
                                out.push(Change {
                                    path: path.clone(),
                                    change: ChangeKind::Modified,
                                    kind: "dir",
                                    what,
                                });
                            }
                            subdirs.push((*hx, *hy, path));
                        }
                        (EntryKind::Dir { .. }, _) | (_, EntryKind::Dir { .. }) => {
                            whole(src, &base, x, ChangeKind::Removed, &mut out)?;
                            whole(src, &base, y, ChangeKind::Added, &mut out)?;
                        }
                        (kx, ky) => {
                            let mut what = Vec::new();
                            match (kx, ky) {
                                (
                                    EntryKind::File { hash: hx, size: sx },
                                    EntryKind::File { hash: hy, size: sy },
                                ) => {
                                    if hx != hy || sx != sy {
                                        what.push("content");
                                    }
                                }
                                (
                                    EntryKind::Symlink { target: tx },
                                    EntryKind::Symlink { target: ty },
                                ) => {
                                    if tx != ty {
                                        what.push("target");
                                    }
                                }
                                _ => what.push("kind"),
                            }
                            if x.mode != y.mode {
                                what.push("mode");
                            }
                            if x.mtime_ns != y.mtime_ns {
                                what.push("mtime");
                            }
                            if x.xattrs != y.xattrs {
                                what.push("xattrs");
                            }
                            if !what.is_empty() {
                                out.push(Change {
                                    path,
                                    change: ChangeKind::Modified,
                                    kind: ky.label(),
                                    what,
                                });
                            }
                        }
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        // Reverse so the pop order visits subdirectories by ascending name.
        stack.extend(subdirs.into_iter().rev());
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

fn whole(
    src: &dyn TreeSource,
    base: &[u8],
    entry: &Entry,
    change: ChangeKind,
    out: &mut Vec<Change>,
) -> Result<()> {
    let path = join(base, entry.name.as_bytes());
    out.push(Change {
        path: path.clone(),
        change,
        kind: entry.kind.label(),
        what: Vec::new(),
    });
    if let EntryKind::Dir { hash } = entry.kind {
        // Counted first (once per distinct subtree): a subtree naming one child twice per
        // level is refused at once, not after millions of paths.
        let inside = stats(src, hash)?;
        let paths = inside
            .files
            .saturating_add(inside.dirs)
            .saturating_add(inside.symlinks);
        too_many_changes(
            usize::try_from(paths)
                .unwrap_or(usize::MAX)
                .saturating_add(out.len()),
        )?;
        walk(src, hash, &path, true, &mut |p, e| {
            too_many_changes(out.len())?;
            out.push(Change {
                path: p.to_vec(),
                change,
                kind: e.kind.label(),
                what: Vec::new(),
            });
            Ok(())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use velo_core::{Mode, Name, Xattrs};

    fn entry(name: &str, kind: EntryKind, xattrs: &[(&str, &str)]) -> Entry {
        Entry {
            name: Name::try_from(name).unwrap(),
            mode: Mode::new(if matches!(kind, EntryKind::Dir { .. }) {
                0o755
            } else {
                0o644
            })
            .unwrap(),
            mtime_ns: 1,
            kind,
            xattrs: Xattrs::new(
                xattrs
                    .iter()
                    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect(),
            )
            .unwrap(),
        }
    }

    #[test]
    fn a_change_of_extended_attributes_alone_is_a_change() {
        let file = EntryKind::File {
            hash: Hash::of_blob(b"x"),
            size: 1,
        };
        let mut trees = HashMap::new();
        let inner = Tree::new(vec![]).unwrap();
        let inner_hash = Hash::of_tree_encoding(&inner.encode());
        trees.insert(inner_hash, inner);
        let dir = EntryKind::Dir { hash: inner_hash };
        let mut root = |attrs: &[(&str, &str)]| {
            let tree = Tree::new(vec![
                entry("d", dir.clone(), attrs),
                entry("f", file.clone(), attrs),
            ])
            .unwrap();
            let hash = Hash::of_tree_encoding(&tree.encode());
            trees.insert(hash, tree);
            hash
        };
        let (a, b) = (root(&[]), root(&[("user.k", "v")]));
        let src = MemoryTrees(trees);
        let changes = diff(&src, a, b).unwrap();
        let what: Vec<(Vec<u8>, Vec<&str>)> =
            changes.into_iter().map(|c| (c.path, c.what)).collect();
        assert_eq!(
            what,
            vec![
                (b"d".to_vec(), vec!["xattrs"]),
                (b"f".to_vec(), vec!["xattrs"])
            ]
        );
    }
}
