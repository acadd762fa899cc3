//! `workspace init --lower HOSTDIR`: a host directory as a workspace's base, not ingested.
//!
//! At init the directory is walked once, reading no file: every name, kind, mode, size,
//! mtime and symlink target goes into a view index (velo-view's format, the one the FUSE
//! server reads a tree from), and each file's identity on the host (device, inode, change
//! time, size) into the 32 bytes a tree's index holds a blob hash in. That index is the
//! lower's state at init: names made or removed on the host later never show, and a
//! file whose identity changed is refused on open (`EIO`, logged) instead of served as a
//! mix. A snapshot of the branch ingests the directory then, and refuses it if anything
//! differs from the index.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use velo_core::{EntryKind, Hash};
use velo_store::Store;
use velo_view::{IndexWriter, Kind, NodeSpec};

use crate::{io, Result, WorkspaceError};

/// The 32 bytes that stand for a host file's identity in a lower index.
pub fn fingerprint(meta: &std::fs::Metadata) -> [u8; 32] {
    let ctime_ns = meta
        .ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.ctime_nsec());
    velo_view::host_fingerprint(meta.dev(), meta.ino(), ctime_ns, meta.size())
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// The lower index of host directory `dir` (see the module's doc), and how many entries
/// it left out (sockets, fifos, devices: a tree holds none).
pub fn index_host_dir(dir: &Path) -> Result<(Vec<u8>, u64)> {
    let top = std::fs::metadata(dir).map_err(io("reading", dir))?;
    if !top.is_dir() {
        return Err(WorkspaceError::Refused(format!(
            "--lower {}: not a directory",
            dir.display()
        )));
    }
    let mut writer = IndexWriter::new(top.mode() & 0o7777, mtime_ns(&top));
    let mut queue = std::collections::VecDeque::from([(dir.to_path_buf(), 0u32)]);
    let mut left_out = 0;
    while let Some((path, index)) = queue.pop_front() {
        let mut entries: Vec<(Vec<u8>, std::fs::Metadata)> = Vec::new();
        for entry in std::fs::read_dir(&path).map_err(io("listing", &path))? {
            let entry = entry.map_err(io("listing", &path))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(io("reading", &entry.path()))?;
            entries.push((entry.file_name().into_encoded_bytes(), meta));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut children = Vec::with_capacity(entries.len());
        let mut subdirs = Vec::new();
        for (name, meta) in entries {
            let kind = meta.file_type();
            let child = path.join(std::ffi::OsStr::from_bytes(&name));
            let mut spec = NodeSpec {
                kind: Kind::File,
                name,
                mode: meta.mode() & 0o7777,
                mtime_ns: mtime_ns(&meta),
                size: meta.size(),
                hash: fingerprint(&meta),
                target: Vec::new(),
                flags: 0,
            };
            if kind.is_dir() {
                spec.kind = Kind::Dir;
                spec.size = 0;
                subdirs.push((children.len(), child));
            } else if kind.is_symlink() {
                spec.kind = Kind::Symlink;
                spec.target = std::fs::read_link(&child)
                    .map_err(io("reading", &child))?
                    .into_os_string()
                    .into_encoded_bytes();
            } else if !kind.is_file() {
                left_out += 1;
                continue;
            }
            children.push(spec);
        }
        let first = writer.add_children(index, &children).map_err(|_| {
            WorkspaceError::Refused(format!("--lower {}: too large for an index", dir.display()))
        })?;
        for (at, sub) in subdirs {
            queue.push_back((sub, first + at as u32));
        }
    }
    let body = writer.finish([0; 32], 0, 0);
    Ok((velo_store::views::seal_view(body), left_out))
}

/// Ingests host directory `dir` and checks the tree against its lower index `index`
/// (names, kinds, modes, sizes, mtimes, targets): the tree the branch's upper applies to.
pub fn ingest_checked(store: &Store, dir: &Path, index: &[u8]) -> Result<Hash> {
    let view = velo_view::View::new(index).ok_or_else(|| WorkspaceError::BadRecord {
        path: dir.to_path_buf(),
        why: "its lower index is damaged".into(),
    })?;
    let report = velo_ingest::ingest(
        store,
        dir,
        &velo_ingest::IngestOptions::default(),
        &velo_ingest::Progress::default(),
    )
    .map_err(|e| WorkspaceError::Refused(format!("ingesting --lower {}: {e}", dir.display())))?;
    let changed = |path: &str| {
        WorkspaceError::Refused(format!(
            "--lower {}: {path} changed since the workspace was made; the branch shows the directory as it was then, and cannot be sealed from what it is now (put it back, or make a new workspace)",
            dir.display()
        ))
    };
    let mut stack = vec![(0u32, report.root, String::new())];
    while let Some((index, tree, prefix)) = stack.pop() {
        let node = view.node(index).map_err(|_| changed(&prefix))?;
        let tree = store.get_tree(&tree)?;
        if tree.entries().len() != node.child_count as usize {
            return Err(changed(if prefix.is_empty() { "/" } else { &prefix }));
        }
        for (i, entry) in tree.entries().iter().enumerate() {
            let child = view
                .node(node.first_child + i as u32)
                .map_err(|_| changed(&prefix))?;
            let name = view.name(&child).map_err(|_| changed(&prefix))?;
            let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
            let same = name == entry.name.as_bytes()
                && child.mode & 0o7777 == entry.mode.bits() & 0o7777
                && match &entry.kind {
                    EntryKind::File { size, .. } => {
                        child.kind == Kind::File
                            && child.size == *size
                            && child.mtime_ns == entry.mtime_ns
                    }
                    EntryKind::Symlink { target } => {
                        child.kind == Kind::Symlink && view.target(&child).ok() == Some(&target[..])
                    }
                    EntryKind::Dir { hash } => {
                        stack.push((child.index, *hash, path.clone()));
                        child.kind == Kind::Dir
                    }
                };
            if !same {
                return Err(changed(&path));
            }
        }
    }
    Ok(report.root)
}
