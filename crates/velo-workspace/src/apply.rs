//! `branch apply`: a branch's changes written into a host directory (the user's checkout).
//!
//! What is written is exactly the difference between the branch's base and its state
//! (velo-store's tree diff: equal subtrees are not read). Before anything is written,
//! every path it touches is checked to be in the base's state on the host (or already
//! in the branch's): a file the user changed meanwhile is a conflict, and nothing is
//! written. Each file is written to a new name beside it and renamed over, so a reader
//! sees the old or the new bytes, never half.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use velo_core::{Entry, EntryKind, Hash};
use velo_store::treeops::{self, ChangeKind, Found};
use velo_store::Store;

use crate::{io, Result, WorkspaceError};

/// What an apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Paths written (made or replaced), relative to the directory.
    pub written: Vec<PathBuf>,
    /// Paths removed.
    pub removed: Vec<PathBuf>,
}

fn entry_at(store: &Store, root: Hash, path: &[u8]) -> Result<Option<Entry>> {
    match treeops::lookup(store, root, path) {
        Ok(Found::Entry(e)) => Ok(Some(e)),
        Ok(Found::Root(_)) => Ok(None),
        // A parent that is no directory there (a file that became one): no entry either.
        Err(
            velo_store::StoreError::NoSuchPath { .. }
            | velo_store::StoreError::NotADirectory { .. },
        ) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether the host object at `path` is what `entry` records (content, target, kind; a
/// missing entry: nothing there). With `whole`, a directory also holds no name its tree
/// does not: an apply that removes or replaces it must not take the host's own files
/// (untracked ones, build outputs) with it.
fn host_matches(store: &Store, path: &Path, entry: Option<&Entry>, whole: bool) -> Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Nothing there (its parent may be a file the apply replaces by a directory).
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::NotADirectory =>
        {
            return Ok(entry.is_none())
        }
        Err(e) => return Err(io("reading", path)(e)),
    };
    let Some(entry) = entry else {
        return Ok(false);
    };
    Ok(match &entry.kind {
        EntryKind::Dir { hash } => {
            if !meta.is_dir() {
                return Ok(false);
            }
            if !whole {
                return Ok(true);
            }
            let tree = store.get_tree(hash)?;
            for host in std::fs::read_dir(path).map_err(io("listing", path))? {
                let host = host.map_err(io("listing", path))?;
                if tree.get(host.file_name().as_bytes()).is_none() {
                    return Ok(false);
                }
            }
            true
        }
        EntryKind::Symlink { target } => {
            meta.file_type().is_symlink()
                && std::fs::read_link(path)
                    .map_err(io("reading", path))?
                    .as_os_str()
                    .as_bytes()
                    == &target[..]
        }
        EntryKind::File { hash, size } => {
            if !meta.is_file() || meta.len() != *size {
                return Ok(false);
            }
            let mut file = std::fs::File::open(path).map_err(io("reading", path))?;
            let mut hasher = blake3::Hasher::new();
            std::io::copy(&mut file, &mut hasher).map_err(io("reading", path))?;
            Hash(*hasher.finalize().as_bytes()) == *hash
        }
    })
}

/// A short name beside `path` for what replaces it (short: `path`'s own name may be as
/// long as a name can be).
fn staging_name(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".velo-apply.{}.{n}", std::process::id()))
}

/// The first directory above `rel` (below `dir`) that is a symbolic link on the host:
/// writing there would write somewhere else. `checked` holds the directories found sound;
/// below a path in `replaced` (a link the apply makes a directory first) all is new.
fn bad_parent(
    dir: &Path,
    rel: &[u8],
    replaced: &std::collections::HashSet<PathBuf>,
    checked: &mut std::collections::HashSet<PathBuf>,
) -> Option<PathBuf> {
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let mut at = dir.to_path_buf();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(std::ffi::OsStr::from_bytes(part));
        if replaced.contains(&at) {
            return None;
        }
        if checked.contains(&at) {
            continue;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => return Some(at),
            Ok(meta) if meta.is_dir() => {
                checked.insert(at.clone());
            }
            // Missing (the apply makes it) or a file (a conflict of its own path).
            _ => return None,
        }
    }
    None
}

fn remove_any(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io("removing", path))
}

fn write_entry(store: &Store, path: &Path, entry: &Entry) -> Result<()> {
    let mode = entry.mode.bits() & 0o7777;
    match &entry.kind {
        EntryKind::Dir { .. } => {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    remove_any(path)?;
                    std::fs::create_dir(path).map_err(io("creating", path))?;
                }
                Err(_) => std::fs::create_dir(path).map_err(io("creating", path))?,
            }
            for (name, value) in entry.xattrs.iter() {
                rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
                    .map_err(|e| io("setting extended attributes of", path)(e.into()))?;
            }
            // Its mode is set after its children are written (see `apply`).
        }
        EntryKind::Symlink { target } => {
            let staged = staging_name(path);
            let _ = std::fs::remove_file(&staged);
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &staged)
                .map_err(io("creating", &staged))?;
            let placed = rustix::fs::utimensat(
                rustix::fs::CWD,
                &staged,
                &velo_store::BlobForm::for_entry(0, entry.mtime_ns).timestamps(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io("setting the mtime of", &staged)(e.into()))
            .and_then(|()| place(&staged, path));
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        }
        EntryKind::File { hash, .. } => {
            let staged = staging_name(path);
            let _ = std::fs::remove_file(&staged);
            let written = (|| {
                let mut from = store.open_blob(hash)?;
                let mut to = std::fs::File::create(&staged).map_err(io("creating", &staged))?;
                std::io::copy(&mut from, &mut to).map_err(io("writing", &staged))?;
                to.flush().map_err(io("writing", &staged))?;
                to.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io("setting the mode of", &staged))?;
                let mtime = std::time::UNIX_EPOCH
                    + std::time::Duration::from_nanos(entry.mtime_ns.max(0) as u64);
                to.set_modified(mtime)
                    .map_err(io("setting the mtime of", &staged))?;
                // The entry's extended attributes too: the file replaces one that may
                // have had them, and the branch's are what is applied.
                for (name, value) in entry.xattrs.iter() {
                    rustix::fs::fsetxattr(&to, name, value, rustix::fs::XattrFlags::empty())
                        .map_err(|e| io("setting extended attributes of", &staged)(e.into()))?;
                }
                to.sync_all().map_err(io("writing", &staged))?;
                Ok::<_, WorkspaceError>(())
            })();
            if let Err(e) = written.and_then(|()| place(&staged, path)) {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Renames a staged file or symlink over `path` (a directory there is removed first).
fn place(staged: &Path, path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        remove_any(path)?;
    }
    std::fs::rename(staged, path).map_err(io("replacing", path))
}

/// Writes the changes from tree `base` to tree `new` into `dir`, which must show `base`
/// at every path that changes (or already `new`'s state there); with `force`, whatever
/// is there is replaced.
pub fn apply(store: &Store, base: Hash, new: Hash, dir: &Path, force: bool) -> Result<ApplyReport> {
    let dir_meta = std::fs::metadata(dir).map_err(io("opening", dir))?;
    if !dir_meta.is_dir() {
        return Err(WorkspaceError::Refused(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    let changes = treeops::diff(store, base, new)?;
    let host = |p: &[u8]| dir.join(std::ffi::OsStr::from_bytes(p));
    // Never through a symbolic link, even with --force: the file behind it is not the
    // checkout's.
    let mut checked = std::collections::HashSet::new();
    // A symlink that the apply itself replaces by a directory (the base had the link) is
    // removed, not followed, before anything is written below it.
    let mut replaced = std::collections::HashSet::new();
    for change in &changes {
        if change.change != ChangeKind::Removed
            && matches!(
                entry_at(store, new, &change.path)?.map(|e| e.kind),
                Some(EntryKind::Dir { .. })
            )
            && matches!(
                entry_at(store, base, &change.path)?.map(|e| e.kind),
                Some(EntryKind::Symlink { .. })
            )
        {
            replaced.insert(host(&change.path));
        }
    }
    for change in &changes {
        if let Some(link) = bad_parent(dir, &change.path, &replaced, &mut checked) {
            return Err(WorkspaceError::Refused(format!(
                "{}: beyond the symbolic link {} (nothing written); an apply writes only inside {}",
                String::from_utf8_lossy(&change.path),
                link.display(),
                dir.display()
            )));
        }
    }
    if !force {
        let mut conflicts = Vec::new();
        for change in &changes {
            let path = host(&change.path);
            let was = entry_at(store, base, &change.path)?;
            let now = entry_at(store, new, &change.path)?;
            // A directory that goes away (removed, or replaced by a file) must hold only
            // what the base had there.
            let goes = !matches!(now.as_ref().map(|e| &e.kind), Some(EntryKind::Dir { .. }));
            if host_matches(store, &path, was.as_ref(), goes)? {
                continue;
            }
            if host_matches(store, &path, now.as_ref(), false)? {
                continue;
            }
            conflicts.push(String::from_utf8_lossy(&change.path).into_owned());
        }
        if !conflicts.is_empty() {
            let shown: Vec<&str> = conflicts.iter().take(20).map(String::as_str).collect();
            return Err(WorkspaceError::Refused(format!(
                "{} path(s) of {} changed since the branch's base (nothing written): {}{}; bring them back, or apply with --force to overwrite them",
                conflicts.len(),
                dir.display(),
                shown.join(", "),
                if conflicts.len() > 20 { ", ..." } else { "" }
            )));
        }
    }
    let mut report = ApplyReport::default();
    let total = changes.len();
    let written = write_changes(store, new, dir, &changes, &mut report);
    if let Err(e) = written {
        let done = report.removed.len() + report.written.len();
        if done == 0 {
            return Err(e);
        }
        // The error's causes are named here, since it becomes a message of its own: a
        // bare "replacing PATH" said nothing of why.
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            cause.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        return Err(WorkspaceError::Refused(format!(
            "{cause}; {done} of {total} changes were written before this, the rest were not: fix the cause and apply again with --force (the paths already written now differ from the base)"
        )));
    }
    Ok(report)
}

/// The writing half of [`apply`]: what it wrote is in `report`, also when it fails.
fn write_changes(
    store: &Store,
    new: Hash,
    dir: &Path,
    changes: &[treeops::Change],
    report: &mut ApplyReport,
) -> Result<()> {
    let host = |p: &[u8]| dir.join(std::ffi::OsStr::from_bytes(p));
    // Removals deepest first, then what is made or replaced, parents first.
    for change in changes
        .iter()
        .rev()
        .filter(|c| c.change == ChangeKind::Removed)
    {
        let path = host(&change.path);
        remove_any(&path)?;
        report
            .removed
            .push(PathBuf::from(std::ffi::OsStr::from_bytes(&change.path)));
    }
    let mut dirs = Vec::new();
    for change in changes.iter().filter(|c| c.change != ChangeKind::Removed) {
        let Some(entry) = entry_at(store, new, &change.path)? else {
            continue;
        };
        let path = host(&change.path);
        write_entry(store, &path, &entry)?;
        if matches!(entry.kind, EntryKind::Dir { .. }) {
            dirs.push((path, entry.mode.bits() & 0o7777));
        }
        report
            .written
            .push(PathBuf::from(std::ffi::OsStr::from_bytes(&change.path)));
    }
    // Directories' modes last, deepest first: a read-only directory must still have
    // taken its children.
    for (path, mode) in dirs.iter().rev() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
            .map_err(io("setting the mode of", path))?;
    }
    Ok(())
}
