//! `velo fsck --repair`: moves damaged objects aside, restores bad modes, and says what is
//! now missing and which roots need it.
//!
//! A damaged object is never deleted: it is renamed into `quarantine/<kind>/` (same file
//! system, so nothing is copied), where its name is free again. After that it is simply
//! missing, and every writer that finds an object missing stores it again: `velo import`
//! of a `.velo` that carries it, or `velo ingest` of the source. The gc generation is
//! bumped before anything moves, so stat caches and import caches that remember "this
//! object is stored" check again.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{RenameFlags, CWD};
use rustix::io::Errno;
use serde::Serialize;
use velo_core::{EntryKind, Hash};

use crate::fsck::{FsckOptions, Problem};
use crate::objects::ObjectKind;
use crate::{sync_dir, Result, Store, StoreError};

/// A damaged object moved aside.
#[derive(Debug, Clone, Serialize)]
pub struct Quarantined {
    /// `blob` or `tree`.
    pub kind: &'static str,
    /// The object's file name (`<hash>`, or `<hash>.x` for an executable variant).
    pub object: String,
    /// Where it is now.
    pub moved_to: String,
    /// Why it was moved.
    pub reason: String,
}

/// An object whose mode was restored.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFixed {
    /// `blob` or `tree`.
    pub kind: &'static str,
    /// The object's file name.
    pub object: String,
    /// Its mode before (octal).
    pub was: String,
    /// Its mode now (octal).
    pub now: String,
}

/// A root that needs a missing object, and where in its tree.
#[derive(Debug, Clone, Serialize)]
pub struct NeededBy {
    /// The root's name, or `@<hash>` for an unnamed one.
    pub root: String,
    /// The path inside the root (empty: the root directory itself).
    pub path: String,
}

/// An object a registered root needs and the store lacks after the repair.
#[derive(Debug, Clone, Serialize)]
pub struct MissingObject {
    /// `blob` or `tree`.
    pub kind: &'static str,
    /// Its hash.
    pub object: String,
    /// Every root that reaches it (the first path found in each).
    pub needed_by: Vec<NeededBy>,
}

/// What `fsck --repair` did and what is left.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// True iff the store is sound after the repair (`problems` is empty).
    pub ok: bool,
    /// Problems found before the repair.
    pub found: Vec<Problem>,
    /// Damaged objects moved to `quarantine/`.
    pub quarantined: Vec<Quarantined>,
    /// Modes restored.
    pub modes_fixed: Vec<ModeFixed>,
    /// Cached link farms removed because they hard-linked a quarantined blob (a later run
    /// builds them again from sound blobs).
    pub farms_removed: Vec<String>,
    /// Objects now missing, with the roots they hurt.
    pub missing: Vec<MissingObject>,
    /// What is still wrong (the missing objects included); repair failures are
    /// `repair-failed`.
    pub problems: Vec<Problem>,
}

fn failed(object: &str, detail: impl ToString) -> Problem {
    Problem {
        kind: "repair-failed",
        object: object.to_string(),
        detail: detail.to_string(),
    }
}

impl Store {
    /// Checks the store under the exclusive lock (like `gc --run`, since it removes
    /// objects), quarantines objects whose content does not match their name, restores
    /// the mode of objects that are not read-only, then checks again and reports what
    /// is missing and which roots need it.
    pub fn repair(&self, options: FsckOptions) -> Result<RepairReport> {
        let _lock = self.lock_exclusive()?;
        let before = self.fsck_locked(options)?;
        let mut failures = Vec::new();
        let mut modes_fixed = Vec::new();
        // (kind, file name, reason)
        let mut to_move: Vec<(ObjectKind, String, String)> = Vec::new();
        for p in &before.problems {
            match p.kind {
                "corrupt-blob" => {
                    to_move.push((ObjectKind::Blob, p.object.clone(), p.detail.clone()))
                }
                "corrupt-tree" => {
                    to_move.push((ObjectKind::Tree, p.object.clone(), p.detail.clone()))
                }
                _ => {}
            }
        }
        let moving: HashSet<&str> = to_move.iter().map(|(_, n, _)| n.as_str()).collect();
        let mut more = Vec::new();
        for p in before.problems.iter().filter(|p| p.kind == "bad-mode") {
            if moving.contains(p.object.as_str()) {
                continue; // moved aside as it is
            }
            let (hex, suffix) = p.object.split_at_checked(64).unwrap_or((&p.object, ""));
            let Ok(hash) = hex.parse::<Hash>() else {
                continue;
            };
            let is_variant = !suffix.is_empty();
            let kind = if !is_variant && self.has_tree(&hash) {
                ObjectKind::Tree
            } else {
                ObjectKind::Blob
            };
            // A variant's name says its mode; a blob's own file keeps its class (555 if it
            // was executable); a tree is 444.
            let want = |was: u32| match crate::BlobForm::parse_suffix(suffix) {
                Some(form) => form.mode,
                None if is_variant => 0o555,
                None if kind == ObjectKind::Blob && was & 0o100 != 0 => 0o555,
                None => 0o444,
            };
            let path = object_path(self, kind, &p.object);
            match restore_mode(&path, want) {
                Ok((was, now)) => modes_fixed.push(ModeFixed {
                    kind: kind.label(),
                    object: p.object.clone(),
                    was: format!("{was:o}"),
                    now: format!("{now:o}"),
                }),
                Err(e) => failures.push(failed(
                    &p.object,
                    format!("cannot restore mode of {}: {e}", path.display()),
                )),
            }
            // fsck reports a tree's mode before reading it: read it now.
            if kind == ObjectKind::Tree {
                if let Err(e) = self.get_tree(&hash) {
                    more.push((kind, p.object.clone(), e.to_string()));
                }
            }
        }
        for p in before.problems.iter().filter(|p| p.kind == "bad-mtime") {
            let Some((hex, suffix)) = p.object.split_at_checked(64) else {
                continue;
            };
            let (Some(form), Ok(hash)) =
                (crate::BlobForm::parse_suffix(suffix), hex.parse::<Hash>())
            else {
                continue;
            };
            let path = self.blob_variant_path(&hash, Some(suffix));
            match rustix::fs::utimensat(
                rustix::fs::CWD,
                &path,
                &form.timestamps(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            ) {
                Ok(()) => modes_fixed.push(ModeFixed {
                    kind: "blob",
                    object: p.object.clone(),
                    was: "another mtime".into(),
                    now: format!("mtime {} ns", form.mtime_ns),
                }),
                Err(e) => failures.push(failed(
                    &p.object,
                    format!("cannot restore mtime of {}: {e}", path.display()),
                )),
            }
        }
        to_move.extend(more);

        let mut quarantined = Vec::new();
        let mut linked_elsewhere = HashSet::new();
        if !to_move.is_empty() {
            // Before anything moves (as gc does): caches that vouch for these objects
            // must check the store again.
            self.bump_gc_generation()?;
            let now = crate::transfer::now_unix();
            for (kind, name, reason) in to_move {
                match self.quarantine(kind, &name, now) {
                    Ok(Some((dest, meta))) => {
                        if kind == ObjectKind::Blob && meta.nlink() > 1 {
                            linked_elsewhere.insert((meta.dev(), meta.ino()));
                        }
                        quarantined.push(Quarantined {
                            kind: kind.label(),
                            object: name,
                            moved_to: dest.display().to_string(),
                            reason,
                        });
                    }
                    Ok(None) => {}
                    Err(e) => failures.push(failed(&name, e)),
                }
            }
        }
        let mut farms_removed = if linked_elsewhere.is_empty() {
            Vec::new()
        } else {
            self.remove_farms_linking(&linked_elsewhere)
        };
        // A damaged view: built again by the next run.
        for p in before
            .problems
            .iter()
            .filter(|p| p.kind == crate::views::BAD_VIEW)
        {
            if let Some(hex) = p.object.strip_suffix(".idx") {
                let views = self.root.join("views");
                crate::remove_tree(&views.join(&p.object));
                crate::remove_tree(&views.join(format!("{hex}.d")));
                farms_removed.push(format!("views/{}", p.object));
            }
        }
        // A farm that shows other forms than its tree: built again by the next run.
        for p in before
            .problems
            .iter()
            .filter(|p| p.kind == crate::farmcheck::STALE_FARM)
        {
            if !farms_removed.contains(&p.object) {
                crate::remove_tree(&self.root.join("farms").join(&p.object));
                farms_removed.push(p.object.clone());
            }
        }

        let after = self.fsck_locked(FsckOptions {
            verify_content: false,
        })?;
        let mut missing_trees = HashSet::new();
        let mut missing_blobs = HashSet::new();
        for p in &after.problems {
            let set = match p.kind {
                "missing-tree" => &mut missing_trees,
                "missing-blob" => &mut missing_blobs,
                _ => continue,
            };
            if let Ok(hash) = p.object.parse::<Hash>() {
                set.insert(hash);
            }
        }
        let missing = self.needers(&missing_trees, &missing_blobs)?;
        let mut problems = after.problems;
        problems.extend(failures);
        Ok(RepairReport {
            ok: problems.is_empty(),
            found: before.problems,
            quarantined,
            modes_fixed,
            farms_removed,
            missing,
            problems,
        })
    }

    /// Renames `name` out of its object directory into `quarantine/<kind>/<name>.<now>`.
    /// None when it is already gone.
    fn quarantine(
        &self,
        kind: ObjectKind,
        name: &str,
        now: u64,
    ) -> Result<Option<(PathBuf, fs::Metadata)>> {
        let source = object_path(self, kind, name);
        let meta = match fs::symlink_metadata(&source) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("reading", &source)(e)),
        };
        let dir = self.root.join("quarantine").join(kind.label());
        let mut builder = fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(builder.recursive(true), 0o755);
        builder
            .create(&dir)
            .map_err(StoreError::io("creating", &dir))?;
        for n in 0u32.. {
            let dest = dir.join(if n == 0 {
                format!("{name}.{now}")
            } else {
                format!("{name}.{now}.{n}")
            });
            match rustix::fs::renameat_with(CWD, &source, CWD, &dest, RenameFlags::NOREPLACE) {
                Ok(()) => {
                    if let Some(shard) = source.parent() {
                        sync_dir(shard);
                    }
                    sync_dir(&dir);
                    return Ok(Some((dest, meta)));
                }
                Err(Errno::EXIST) => continue,
                Err(Errno::NOENT) => return Ok(None),
                Err(e) => return Err(StoreError::io("moving aside", &source)(e.into())),
            }
        }
        unreachable!("some suffix is free")
    }

    /// Removes every cached farm holding a hard link to one of these inodes: its file
    /// shows the damaged bytes whatever the blob's name now holds.
    fn remove_farms_linking(&self, inodes: &HashSet<(u64, u64)>) -> Vec<String> {
        let mut removed = Vec::new();
        let farms = fs::read_dir(self.root.join("farms"))
            .into_iter()
            .flatten()
            .flatten();
        for farm in farms {
            let mut stack = vec![farm.path()];
            let mut hit = false;
            while let Some(dir) = stack.pop() {
                for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.is_dir() {
                        stack.push(entry.path());
                    } else if meta.is_file() && inodes.contains(&(meta.dev(), meta.ino())) {
                        hit = true;
                        break;
                    }
                }
                if hit {
                    break;
                }
            }
            if hit {
                crate::remove_tree(&farm.path());
                removed.push(farm.file_name().to_string_lossy().into_owned());
            }
        }
        removed
    }

    /// For each missing object, every root that reaches it and the first path to it in
    /// that root. Partial roots do not count for blobs (they may lack them).
    fn needers(
        &self,
        missing_trees: &HashSet<Hash>,
        missing_blobs: &HashSet<Hash>,
    ) -> Result<Vec<MissingObject>> {
        let mut found: HashMap<Hash, (&'static str, Vec<NeededBy>)> = HashMap::new();
        for hash in missing_trees {
            found.insert(*hash, ("tree", Vec::new()));
        }
        for hash in missing_blobs {
            found.insert(*hash, ("blob", Vec::new()));
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        for record in self.roots().unwrap_or_default() {
            let Ok(root) = record.hash() else { continue };
            let label = record
                .name
                .clone()
                .unwrap_or_else(|| format!("@{}", record.root));
            let mut seen_trees = HashSet::new();
            let mut seen_here = HashSet::new();
            let mut note = |hash: &Hash, path: &[u8], found: &mut HashMap<_, (_, Vec<_>)>| {
                if let Some((_, list)) = found.get_mut(hash) {
                    if seen_here.insert(*hash) {
                        list.push(NeededBy {
                            root: label.clone(),
                            path: String::from_utf8_lossy(path).into_owned(),
                        });
                    }
                }
            };
            crate::treeops::walk_reachable(root, &mut seen_trees, &mut |hash, dir| {
                if missing_trees.contains(hash) {
                    note(hash, dir, &mut found);
                    return Ok(None);
                }
                let Ok(tree) = self.get_tree(hash) else {
                    return Ok(None);
                };
                if !record.partial {
                    for entry in tree.entries() {
                        if let EntryKind::File { hash, .. } = &entry.kind {
                            note(
                                hash,
                                &crate::treeops::join(dir, entry.name.as_bytes()),
                                &mut found,
                            );
                        }
                    }
                }
                Ok(Some(tree))
            })?;
        }
        let mut list: Vec<MissingObject> = found
            .into_iter()
            .map(|(hash, (kind, needed_by))| MissingObject {
                kind,
                object: hash.to_hex(),
                needed_by,
            })
            .collect();
        list.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
        Ok(list)
    }
}

/// `blobs/ab/<name>` or `trees/ab/<name>` (`name` is a hash, or a hash and `.x`).
fn object_path(store: &Store, kind: ObjectKind, name: &str) -> PathBuf {
    let dir = if kind == ObjectKind::Blob {
        "blobs"
    } else {
        "trees"
    };
    store
        .root()
        .join(dir)
        .join(&name[..2.min(name.len())])
        .join(name)
}

/// Sets the mode of the regular file at `path` without following a symlink; returns the
/// mode it had.
fn restore_mode(path: &Path, want: impl Fn(u32) -> u32) -> std::io::Result<(u32, u32)> {
    use rustix::fs::{Mode as FsMode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FsMode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mode = want(st.st_mode & 0o7777);
    // fchmod refuses an O_PATH descriptor; its /proc link names exactly this inode.
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    fs::set_permissions(&proc, std::os::unix::fs::PermissionsExt::from_mode(mode)).or_else(
        |_| {
            // No /proc: the store's directories are the owner's alone (fsck checks), and
            // the exclusive lock keeps velo out; the type was checked just above.
            fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        },
    )?;
    Ok((st.st_mode & 0o7777, mode))
}
