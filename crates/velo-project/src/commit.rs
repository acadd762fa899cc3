//! commit(base, upper) → tree: the one routine that turns copy-on-write changes into a new
//! sealed tree, for the sandbox now and for the shim and FUSE server later.
//!
//! The upper uses the kernel overlayfs format: a whiteout is a character device 0/0, an
//! opaque directory carries `user.overlay.opaque` (or `trusted.overlay.opaque`) = `y`.
//! Only the upper is read; unchanged subtrees of the base are reused by hash, so the cost
//! follows the changed set, not the tree.
//!
//! What was written inside a run is untrusted: a file committed from an upper loses its
//! set-user-ID and set-group-ID bits (the report lists them), so `chmod 4755` inside a
//! sandbox can never become a set-uid file that root later checks out. Directories keep
//! theirs: on Linux set-uid means nothing on a directory, and set-gid only makes new
//! entries inherit the directory's group, which grants no one anything. Holes of sparse
//! files are kept (see velo-store's `sparse`).

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use velo_core::{Entry, EntryKind, Hash, Mode, Name, Tree};
use velo_store::{Batch, Store, StoreError};

use crate::ProjectError;

/// Merges layers (bottom first) the way overlayfs stacks them: a directory present in
/// several layers has the union of their entries; anything else in a higher layer hides
/// the lower one.
pub fn merge_layers(store: &Store, layers: &[Hash]) -> Result<Hash, ProjectError> {
    let Some((&first, rest)) = layers.split_first() else {
        return Err(ProjectError::Store(StoreError::Invalid(
            "no layers to merge".into(),
        )));
    };
    let mut merged = first;
    for &upper in rest {
        merged = merge_two(store, merged, upper)?;
    }
    Ok(merged)
}

fn merge_two(store: &Store, lower: Hash, upper: Hash) -> Result<Hash, ProjectError> {
    if lower == upper {
        return Ok(upper);
    }
    let mut entries: BTreeMap<Name, Entry> = store
        .get_tree(&lower)?
        .into_entries()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    for entry in store.get_tree(&upper)?.into_entries() {
        let merged = match (entries.get(&entry.name).map(|e| &e.kind), &entry.kind) {
            (Some(EntryKind::Dir { hash: low }), EntryKind::Dir { hash: up }) => Entry {
                kind: EntryKind::Dir {
                    hash: merge_two(store, *low, *up)?,
                },
                ..entry
            },
            _ => entry,
        };
        entries.insert(merged.name.clone(), merged);
    }
    let tree = Tree::new(entries.into_values().collect())
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    Ok(store.put_tree(&tree)?.0)
}

fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 8];
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|name| matches!(rustix::fs::lgetxattr(path, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y'))
}

fn dest_error(path: &Path) -> impl FnOnce(std::io::Error) -> ProjectError + '_ {
    move |source| ProjectError::Dest {
        op: "reading upper",
        path: path.to_path_buf(),
        cause: source,
    }
}

/// What a commit made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitReport {
    /// The new root tree.
    pub root: Hash,
    /// Files of the upper (paths relative to the tree's root) whose set-user-ID or
    /// set-group-ID bits were dropped; callers should say so.
    pub setid_dropped: Vec<PathBuf>,
}

/// Applies an overlay-format upper directory to `base`; returns the new root and what was
/// dropped. The caller holds the store's shared lock. New objects are staged in a batch
/// and become visible only after one flush, so a power cut never leaves an object whose
/// bytes are not on disk (see velo-store's batch).
pub fn commit_upper(store: &Store, base: Hash, upper: &Path) -> Result<CommitReport, ProjectError> {
    let batch = store.begin_batch()?;
    let mut setid_dropped = Vec::new();
    let tree = commit_dir(
        store,
        &batch,
        Some(store.get_tree(&base)?),
        upper,
        Path::new(""),
        &mut setid_dropped,
    )?;
    let root = stage_tree(store, &batch, &tree)?;
    store.sync()?;
    batch.publish()?;
    Ok(CommitReport {
        root,
        setid_dropped,
    })
}

/// Stages `tree` unless the store has it; returns its hash.
fn stage_tree(store: &Store, batch: &Batch<'_>, tree: &Tree) -> Result<Hash, ProjectError> {
    let (bytes, hash) = tree.encode_with_hash();
    if !store.has_tree(&hash) {
        batch.insert_tree(&hash, &bytes)?;
    }
    Ok(hash)
}

/// The tree of upper directory `dir` (at `rel` in the tree; empty for the root) over
/// `base`.
fn commit_dir(
    store: &Store,
    batch: &Batch<'_>,
    base: Option<Tree>,
    dir: &Path,
    rel: &Path,
    setid_dropped: &mut Vec<PathBuf>,
) -> Result<Tree, ProjectError> {
    let is_root = rel.as_os_str().is_empty();
    let mut entries: BTreeMap<Name, Entry> = match base {
        Some(tree) if is_root || !is_opaque(dir) => tree
            .into_entries()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
        _ => BTreeMap::new(),
    };
    for item in std::fs::read_dir(dir).map_err(dest_error(dir))? {
        let item = item.map_err(dest_error(dir))?;
        let path = item.path();
        let meta = std::fs::symlink_metadata(&path).map_err(dest_error(&path))?;
        let name = Name::new(item.file_name().as_bytes())
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            entries.remove(&name);
            continue;
        }
        let mut mode = Mode::from_st_mode(meta.mode());
        if ft.is_file() && mode.bits() & 0o6000 != 0 {
            mode = Mode::from_st_mode(mode.bits() & !0o6000);
            setid_dropped.push(rel.join(item.file_name()));
        }
        let mtime_ns = meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec());
        let kind = if ft.is_dir() {
            let below = match entries.get(&name).map(|e| &e.kind) {
                Some(EntryKind::Dir { hash }) => Some(store.get_tree(hash)?),
                _ => None,
            };
            let sub = commit_dir(
                store,
                batch,
                below,
                &path,
                &rel.join(item.file_name()),
                setid_dropped,
            )?;
            EntryKind::Dir {
                hash: stage_tree(store, batch, &sub)?,
            }
        } else if ft.is_file() {
            let (hash, size) =
                velo_ingest::store_file(store, batch, &path).map_err(|e| match e {
                    velo_ingest::IngestError::Store(s) => ProjectError::Store(s),
                    other => ProjectError::Store(StoreError::Invalid(other.to_string())),
                })?;
            EntryKind::File { hash, size }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(dest_error(&path))?;
            EntryKind::Symlink {
                target: target.as_os_str().as_bytes().into(),
            }
        } else {
            tracing::warn!(path = %path.display(), "not committing a socket, fifo or device");
            continue;
        };
        entries.insert(
            name.clone(),
            Entry {
                name,
                mode,
                mtime_ns,
                kind,
            },
        );
    }
    Tree::new(entries.into_values().collect())
        .map_err(|e| ProjectError::Store(StoreError::Invalid(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn empty_base(store: &Store) -> Hash {
        store.put_tree(&Tree::new(Vec::new()).unwrap()).unwrap().0
    }

    fn mode_at(store: &Store, root: Hash, path: &[u8]) -> u32 {
        match velo_store::treeops::lookup(store, root, path).unwrap() {
            velo_store::treeops::Found::Entry(e) => e.mode.bits(),
            velo_store::treeops::Found::Root(_) => panic!("{path:?} is the root"),
        }
    }

    #[test]
    fn files_lose_setuid_and_setgid_bits_and_the_report_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("sub")).unwrap();
        let chmod = |rel: &str, mode: u32| {
            std::fs::set_permissions(upper.join(rel), std::fs::Permissions::from_mode(mode))
                .unwrap()
        };
        std::fs::write(upper.join("rootsh"), b"#!/bin/sh\nexec sh\n").unwrap();
        chmod("rootsh", 0o4755);
        std::fs::write(upper.join("sub/sgid"), b"g").unwrap();
        chmod("sub/sgid", 0o2750);
        std::fs::write(upper.join("plain"), b"p").unwrap();
        chmod("plain", 0o755);
        chmod("sub", 0o2775);
        let _lock = store.lock_shared().unwrap();
        let report = commit_upper(&store, empty_base(&store), &upper).unwrap();
        let mut dropped = report.setid_dropped.clone();
        dropped.sort();
        assert_eq!(
            dropped,
            [PathBuf::from("rootsh"), PathBuf::from("sub/sgid")],
            "every file that lost a bit is listed, with its path in the tree"
        );
        assert_eq!(mode_at(&store, report.root, b"rootsh"), 0o755);
        assert_eq!(mode_at(&store, report.root, b"sub/sgid"), 0o750);
        assert_eq!(mode_at(&store, report.root, b"plain"), 0o755);
        assert_eq!(
            mode_at(&store, report.root, b"sub"),
            0o2775,
            "a directory keeps its set-gid bit (group inheritance grants nothing)"
        );
    }

    #[test]
    fn a_sparse_file_in_the_upper_becomes_a_sparse_blob_with_the_logical_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(&upper).unwrap();
        let size: u64 = 1 << 30;
        let file = std::fs::File::create(upper.join("big")).unwrap();
        file.set_len(size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"data in the middle", size / 2).unwrap();
        drop(file);
        let _lock = store.lock_shared().unwrap();
        let report = commit_upper(&store, empty_base(&store), &upper).unwrap();
        let velo_store::treeops::Found::Entry(entry) =
            velo_store::treeops::lookup(&store, report.root, b"big").unwrap()
        else {
            panic!("big is missing");
        };
        let EntryKind::File { hash, size: got } = entry.kind else {
            panic!("big is not a file");
        };
        assert_eq!(got, size);
        let mut want = blake3::Hasher::new();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(size / 2) >> 20 {
            want.update(&zeros);
        }
        want.update(b"data in the middle");
        let mut rest = size / 2 - b"data in the middle".len() as u64;
        while rest > 0 {
            let n = rest.min(zeros.len() as u64) as usize;
            want.update(&zeros[..n]);
            rest -= n as u64;
        }
        assert_eq!(hash, Hash::from(want.finalize()));
        let blob = std::fs::metadata(store.blob_path(&hash)).unwrap();
        assert_eq!(blob.len(), size);
        assert!(
            blob.blocks() * 512 < 1 << 20,
            "the blob keeps the holes: {} bytes allocated",
            blob.blocks() * 512
        );
    }
}
