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
use std::path::{Path, PathBuf};

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

/// Whether host path `path` has an extended attribute a tree keeps (so the index marks
/// it, and the server reads them from the host when asked).
fn has_kept_xattrs(path: &Path) -> bool {
    let mut names = vec![0u8; 64 * 1024];
    match rustix::fs::llistxattr(path, &mut names) {
        Ok(n) => names[..n].split(|&b| b == 0).any(velo_core::is_kept_xattr),
        // More names than fit: some may be kept ones; the server looks.
        Err(rustix::io::Errno::RANGE) => true,
        Err(_) => false,
    }
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
        let listing = std::fs::read_dir(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                // The whole host is indexed at init: a directory this user may not list
                // cannot be part of the branch it shows.
                WorkspaceError::Refused(format!(
                    "--lower {}: {}: this user may not list it ({e}); make it readable (chmod a+rx), or init as a user who can",
                    dir.display(),
                    path.display()
                ))
            } else {
                io("listing", &path)(e)
            }
        })?;
        for entry in listing {
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
            if (kind.is_dir() || kind.is_file()) && has_kept_xattrs(&child) {
                spec.flags = velo_view::FLAG_XATTRS;
            }
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

/// What the branch's upper does to the lower at a path: nothing (the lower shows
/// there), replaces it (an entry of its own, a whiteout, an opaque directory: the lower's
/// entry and all below it are not shown), or merges with it (a directory of its own that
/// is not opaque: the lower's entries below show where the upper has none).
enum Upper {
    Shows,
    Hides,
    Merges,
}

fn upper_at(upper: Option<&Path>, rel: &Path) -> Upper {
    let Some(upper) = upper else {
        return Upper::Shows;
    };
    let path = upper.join(rel);
    match std::fs::symlink_metadata(&path) {
        Err(_) => Upper::Shows,
        Ok(meta) if meta.is_dir() => {
            let opaque = ["user.overlay.opaque", "trusted.overlay.opaque"]
                .iter()
                .any(|name| {
                    let mut value = [0u8; 1];
                    rustix::fs::lgetxattr(&path, *name, &mut value)
                        .is_ok_and(|n| n == 1 && value[0] == b'y')
                });
            if opaque {
                Upper::Hides
            } else {
                Upper::Merges
            }
        }
        Ok(_) => Upper::Hides,
    }
}

/// Whether host file `rel` (below `dir`) is still the one node `node` indexed: its
/// identity and mtime, without following a symlink on the way.
fn host_file_unchanged(dir: &Path, rel: &Path, node: &velo_view::Node) -> bool {
    let path = dir.join(rel);
    // Each component checked: no symlink followed (the index had directories there).
    let mut at = dir.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            at.push(part);
            if !std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                return false;
            }
        }
    }
    std::fs::symlink_metadata(&path).is_ok_and(|meta| {
        let kind = match node.kind {
            Kind::Dir => meta.is_dir(),
            _ => meta.is_file(),
        };
        kind && fingerprint(&meta) == node.hash && mtime_ns(&meta) == node.mtime_ns
    })
}

/// Ingests host directory `dir` and checks the tree against its lower index `index`
/// where the branch still shows the lower (its upper `upper` neither replaced nor hid the
/// path): names, kinds, modes, sizes, mtimes and targets in the tree, and each file's
/// identity on the host before and after the ingest read it (a file rewritten with its
/// size and mtime kept is found by its change time). The tree the branch's upper applies
/// to.
pub fn ingest_checked(
    store: &Store,
    dir: &Path,
    index: &[u8],
    upper: Option<&Path>,
) -> Result<Hash> {
    let view = velo_view::View::new(index).ok_or_else(|| WorkspaceError::BadRecord {
        path: dir.to_path_buf(),
        why: "its lower index is damaged".into(),
    })?;
    // Paths are kept as bytes (a host name need not be UTF-8); shown escaped.
    let changed = |path: &Path| {
        WorkspaceError::Refused(format!(
            "--lower {}: /{} changed since the workspace was made; the branch shows the directory as it was then, and cannot be sealed from what it is now (put it back, or `velo branch reset main SNAPSHOT` while unmounted)",
            dir.display(),
            path.as_os_str().as_bytes().escape_ascii()
        ))
    };
    let join = |prefix: &Path, name: &[u8]| prefix.join(std::ffi::OsStr::from_bytes(name));
    // The files the branch shows from the host, as the index has them.
    let mut shown = Vec::new();
    let mut stack = vec![(0u32, PathBuf::new())];
    while let Some((index, prefix)) = stack.pop() {
        let node = view.node(index).map_err(|_| changed(&prefix))?;
        for i in 0..node.child_count {
            let child = view
                .node(node.first_child + i)
                .map_err(|_| changed(&prefix))?;
            let name = view.name(&child).map_err(|_| changed(&prefix))?;
            let path = join(&prefix, name);
            match upper_at(upper, &path) {
                Upper::Hides => continue,
                Upper::Merges | Upper::Shows if child.kind == Kind::Dir => {
                    // A directory whose xattrs main shows must still have them: its
                    // identity is checked like a file's.
                    if child.flags & velo_view::FLAG_XATTRS != 0 {
                        shown.push((child, path.clone()));
                    }
                    stack.push((child.index, path))
                }
                _ if child.kind == Kind::File => shown.push((child, path)),
                _ => {}
            }
        }
    }
    let check_files = || {
        shown
            .iter()
            .find(|(node, path)| !host_file_unchanged(dir, path, node))
            .map(|(_, path)| changed(path))
    };
    if let Some(e) = check_files() {
        return Err(e);
    }
    // No root of its own: the caller holds the store lock until the tree made over it
    // is registered (a root per seal would keep every version of the host forever).
    let report = velo_ingest::ingest(
        store,
        dir,
        &velo_ingest::IngestOptions {
            no_register: true,
            // What this user may not read is left out here, and refused below only
            // where the branch shows it (a file main deleted need not be readable).
            skip_unreadable: true,
            ..velo_ingest::IngestOptions::default()
        },
        &velo_ingest::Progress::default(),
    )
    .map_err(|e| WorkspaceError::Refused(format!("ingesting --lower {}: {e}", dir.display())))?;
    for skipped in &report.skipped {
        if skipped.reason != velo_ingest::UNREADABLE {
            continue;
        }
        let path = Path::new(&skipped.path);
        let hidden = path
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| matches!(upper_at(upper, a), Upper::Hides));
        if !hidden {
            return Err(WorkspaceError::Refused(format!(
                "--lower {}: /{}: this user may not read it, and the branch shows it, so the branch cannot be sealed; make it readable, or delete it in the branch",
                dir.display(),
                path.as_os_str().as_bytes().escape_ascii()
            )));
        }
    }
    if let Some(e) = check_files() {
        return Err(e);
    }
    // The tree against the index, where the branch shows the lower.
    let mut stack = vec![(0u32, report.root, PathBuf::new())];
    while let Some((index, tree, prefix)) = stack.pop() {
        let node = view.node(index).map_err(|_| changed(&prefix))?;
        let tree = store.get_tree(&tree)?;
        let mut listed = Vec::with_capacity(node.child_count as usize);
        for i in 0..node.child_count {
            let child = view
                .node(node.first_child + i)
                .map_err(|_| changed(&prefix))?;
            listed.push((view.name(&child).map_err(|_| changed(&prefix))?, child));
        }
        // Names only the host has now (made after init) show nowhere: each must be
        // hidden by the upper, or the tree holds something the branch never showed.
        for entry in tree.entries() {
            if !listed
                .iter()
                .any(|(name, _)| *name == entry.name.as_bytes())
            {
                let path = join(&prefix, entry.name.as_bytes());
                if !matches!(upper_at(upper, &path), Upper::Hides) {
                    return Err(changed(&path));
                }
            }
        }
        for (name, child) in listed {
            let path = join(&prefix, name);
            if matches!(upper_at(upper, &path), Upper::Hides) {
                continue;
            }
            let Some(entry) = tree.get(name) else {
                return Err(changed(&path));
            };
            let same = child.mode & 0o7777 == entry.mode.bits() & 0o7777
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
