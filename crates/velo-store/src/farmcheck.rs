//! Cached farms against their trees: every file of a farm must show the form its tree
//! entry needs (see [`crate::BlobForm`]).
//!
//! A farm shares its inodes with the blobs, the variants and any hard-linked checkout of
//! the same form. `touch` or `chmod` on a file of such a checkout (the owner may do both on
//! a read-only file) changes every farm that links the inode: a run would show another
//! mtime than its tree records. The blob's own form is recorded nowhere but in the farms
//! that link it, so this is where fsck finds the change; repair removes such a farm, and
//! the next run builds it again.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rayon::prelude::*;
use velo_core::{EntryKind, Hash, Tree};

use crate::fsck::{problem, Problem};
use crate::objects::parse_farm_name;
use crate::{BlobForm, FarmModes, Store};

/// The label of the problem: a farm shows another mode or mtime than its tree.
pub(crate) const STALE_FARM: &str = "stale-farm";

impl Store {
    /// One problem per cached farm whose files do not show their tree's forms. `trees`
    /// are the store's readable trees (a farm of a tree fsck could not read is not
    /// checked: that tree is reported already).
    pub(crate) fn farm_problems(&self, trees: &HashMap<Hash, Tree>) -> Vec<Problem> {
        let farms: Vec<(String, Hash, FarmModes)> = std::fs::read_dir(self.root.join("farms"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (root, modes) = parse_farm_name(&name)?;
                Some((name, root, modes))
            })
            .collect();
        farms
            .par_iter()
            .filter_map(|(name, root, modes)| {
                let dir = self.root.join("farms").join(name);
                let (count, first) = stale_entries(self, trees, *root, &dir, *modes);
                (count > 0).then(|| {
                    problem(
                        STALE_FARM,
                        name,
                        format!(
                            "{count} entries show another mode or mtime than the tree records, or are not the store's inode for their form (so fsck's hashing misses them), first {first}: a file of a hard-linked checkout that shares their inodes was touched or chmod'ed, or two runs raced to build the farm? `velo fsck --repair` removes the farm (the next run builds it again)"
                        ),
                    )
                })
            })
            .collect()
    }
}

/// How many entries of the farm at `dir` differ from tree `root`, and the first one.
fn stale_entries(
    store: &Store,
    trees: &HashMap<Hash, Tree>,
    root: Hash,
    dir: &Path,
    modes: FarmModes,
) -> (u64, String) {
    let mut count = 0u64;
    let mut first = String::new();
    let mut stack = vec![(root, dir.to_path_buf())];
    while let Some((hash, at)) = stack.pop() {
        let Some(tree) = trees.get(&hash) else {
            continue;
        };
        for entry in tree.entries() {
            let path = at.join(std::ffi::OsStr::from_bytes(entry.name.as_bytes()));
            let meta = std::fs::symlink_metadata(&path).ok();
            let shown = meta.as_ref().map(|m| {
                let mtime = velo_core::time_ns(m.mtime(), m.mtime_nsec());
                (m.mode() & 0o7777, mtime)
            });
            let want_mode = match &entry.kind {
                EntryKind::File { .. } => Some(BlobForm::in_farm(entry.mode.bits(), 0, modes).mode),
                EntryKind::Dir { hash } => {
                    stack.push((*hash, path.clone()));
                    None
                }
                EntryKind::Symlink { .. } => None,
            };
            let mut right = shown.is_some_and(|(mode, mtime)| {
                (mtime == entry.mtime_ns || mtime == store.representable_mtime(entry.mtime_ns))
                    && want_mode.is_none_or(|want| mode == want)
            });
            if let (true, EntryKind::File { hash, .. }, Some(meta)) = (right, &entry.kind, &meta) {
                right = is_store_inode(store, hash, entry, modes, meta);
            }
            if !right {
                if count == 0 {
                    first = format!("{}", path.strip_prefix(dir).unwrap_or(&path).display());
                }
                count += 1;
            }
        }
    }
    (count, first)
}

use std::os::unix::ffi::OsStrExt;

/// Whether a farm file is the store's own inode for its form (the blob's file or the
/// variant), so that fsck's hashing of the store covers it. A farm that lost a race to
/// publish a variant links an inode the store does not name; a file copied at the
/// link-count limit is its own inode too, and is accepted when the store's is near that
/// limit.
fn is_store_inode(
    store: &Store,
    hash: &Hash,
    entry: &velo_core::Entry,
    modes: FarmModes,
    meta: &std::fs::Metadata,
) -> bool {
    let form = BlobForm::in_farm(entry.mode.bits(), entry.mtime_ns, modes);
    let Ok(Some(path)) = store.blob_in_form(hash, &form) else {
        // No store file of that form (a time the file system clamps, or a missing
        // blob: fsck reports that itself).
        return true;
    };
    match std::fs::symlink_metadata(&path) {
        Ok(own) => (own.dev(), own.ino()) == (meta.dev(), meta.ino()) || own.nlink() >= 60_000,
        Err(_) => true,
    }
}
