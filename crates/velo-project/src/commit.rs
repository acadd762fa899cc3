//! commit(base, upper) → tree: the one routine that turns copy-on-write changes into a new
//! sealed tree, for the sandbox now and for the shim and FUSE server later.
//!
//! The upper uses the kernel overlayfs format: a whiteout is a character device 0/0, an
//! opaque directory carries `user.overlay.opaque` (or `trusted.overlay.opaque`) = `y`.
//! Only the upper is read; unchanged subtrees of the base are reused by hash, so the cost
//! follows the changed set, not the tree.
//!
//! What was written inside a run is untrusted: a file committed from an upper loses its
//! set-user-ID and set-group-ID bits and its file capabilities (the report lists them), so `chmod 4755` inside a
//! sandbox can never become a set-uid file that root later checks out. Directories keep
//! theirs: on Linux set-uid means nothing on a directory, and set-gid only makes new
//! entries inherit the directory's group, which grants no one anything. Holes of sparse
//! files are kept (see velo-store's `sparse`).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, OFlags};

use velo_core::{Entry, EntryKind, Hash, Mode, Name, Tree};
use velo_store::{Batch, FarmModes, Store, StoreError};

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
    // Remembered per pair of subtrees: layers whose trees name one subtree many times (2^n
    // paths in n levels) are merged once per distinct pair, not once per path.
    let mut memo = std::collections::HashMap::new();
    for &upper in rest {
        merged = merge_two(store, merged, upper, 1, &mut memo)?;
    }
    Ok(merged)
}

fn merge_two(
    store: &Store,
    lower: Hash,
    upper: Hash,
    depth: usize,
    memo: &mut std::collections::HashMap<(Hash, Hash), Hash>,
) -> Result<Hash, ProjectError> {
    if lower == upper {
        return Ok(upper);
    }
    if let Some(&merged) = memo.get(&(lower, upper)) {
        return Ok(merged);
    }
    if depth > velo_core::MAX_DEPTH {
        return Err(too_deep("layers to merge"));
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
                    hash: merge_two(store, *low, *up, depth + 1, memo)?,
                },
                ..entry
            },
            _ => entry,
        };
        entries.insert(merged.name.clone(), merged);
    }
    let tree = Tree::new(entries.into_values().collect())
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    let merged = store.put_tree(&tree)?.0;
    memo.insert((lower, upper), merged);
    Ok(merged)
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let mut buf = [0u8; 8];
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|name| matches!(rustix::fs::fgetxattr(dir, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y'))
}

fn too_deep(what: &str) -> ProjectError {
    ProjectError::Store(StoreError::Invalid(format!(
        "{what} nest directories deeper than {} levels, more than a velo tree may hold",
        velo_core::MAX_DEPTH
    )))
}

fn read_error(path: &Path) -> impl FnOnce(rustix::io::Errno) -> ProjectError + '_ {
    move |e| ProjectError::Dest {
        op: "reading upper",
        path: path.to_path_buf(),
        cause: e.into(),
    }
}

/// What a commit made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitReport {
    /// The new root tree.
    pub root: Hash,
    /// Files of the upper (paths relative to the tree's root) whose set-user-ID or
    /// set-group-ID bits or file capabilities were dropped; callers should say so.
    pub setid_dropped: Vec<PathBuf>,
    /// Sockets, fifos and devices of the upper: a tree cannot hold them, so the new tree
    /// has nothing of their names (not the base's entry either); callers should say so.
    pub not_committed: Vec<PathBuf>,
}

/// The attribute of file capabilities.
const CAPABILITY: &[u8] = b"security.capability";

/// Applies an overlay-format upper directory to `base`; returns the new root and what was
/// dropped. The caller holds the store's shared lock. New objects are staged in a batch
/// and become visible only after one flush, so a power cut never leaves an object whose
/// bytes are not on disk (see velo-store's batch).
///
/// How a projection showed the base tree to the command, which says what an unchanged
/// attribute of a copied-up entry looks like in the upper.
#[derive(Clone, Copy, Debug)]
pub struct Shown {
    /// How modes showed: a file or directory whose mode in the upper is still the one
    /// shown of its base entry keeps the base entry's mode. `None`: every mode exactly
    /// (the shim, the FUSE mount), so the upper's mode is the one to record.
    pub modes: Option<FarmModes>,
    /// Whether the base's extended attributes showed (the FUSE mount copies them up).
    /// Where they did not (link farms, the shim), an upper entry without any keeps its
    /// base entry's: a copy-up there never had them, and dropping a file capability
    /// because a command appended to the file would lose data.
    pub xattrs: bool,
}

/// `shown` is how the lowers showed the base (see [`Shown`]).
pub fn commit_upper(
    store: &Store,
    base: Hash,
    upper: &Path,
    shown: Shown,
) -> Result<CommitReport, ProjectError> {
    let batch = store.begin_batch()?;
    let dir = rustix::fs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(read_error(upper))?;
    let base_tree = store.get_tree(&base)?;
    // One level of recursion per directory level: in the walk pool, whose stacks hold
    // velo_core::MAX_DEPTH of them.
    let mut walk = CommitWalk {
        store,
        batch: &batch,
        shown,
        setid_dropped: Vec::new(),
        not_committed: Vec::new(),
    };
    let tree = velo_store::in_walk_pool(|| walk.dir(Some(base_tree), &dir, upper, Path::new("")))?;
    let (setid_dropped, not_committed) = (walk.setid_dropped, walk.not_committed);
    let root = stage_tree(store, &batch, &tree)?;
    store.sync()?;
    batch.publish()?;
    Ok(CommitReport {
        root,
        setid_dropped,
        not_committed,
    })
}

/// The base entry's mode, if the upper's `mode` is what the lower showed of it: the
/// command did not chmod it, and the tree keeps the mode it records. A hard-link farm
/// shows a file's mode without some bits (its inode is shared; see
/// [`velo_store::BlobForm::in_farm`]) and a directory's without group and other write,
/// and a copy-up keeps what was shown; recording that would, say, make a 0600 file the
/// command appended to 0400. A chmod to another mode is the command's and is kept.
fn unchanged_mode(
    base: &Entry,
    kind_of: FileType,
    mode: Mode,
    modes: Option<FarmModes>,
) -> Option<Mode> {
    let modes = modes?;
    let shown = match (&base.kind, kind_of) {
        (EntryKind::File { .. }, FileType::RegularFile) => {
            velo_store::BlobForm::in_farm(base.mode.bits(), 0, modes).mode
        }
        (EntryKind::Dir { .. }, FileType::Directory) => {
            crate::farm::shown_dir_mode(base.mode.bits())
        }
        _ => return None,
    };
    (mode.bits() & 0o7777 == shown).then_some(base.mode)
}

/// Stages `tree` unless the store has it; returns its hash.
fn stage_tree(store: &Store, batch: &Batch<'_>, tree: &Tree) -> Result<Hash, ProjectError> {
    let (bytes, hash) = tree.encode_with_hash();
    if !store.has_tree(&hash) {
        batch.insert_tree(&hash, &bytes)?;
    }
    Ok(hash)
}

/// One commit's walk of an upper.
struct CommitWalk<'a, 'b> {
    store: &'a Store,
    batch: &'a Batch<'b>,
    /// How the lowers showed the base.
    shown: Shown,
    setid_dropped: Vec<PathBuf>,
    not_committed: Vec<PathBuf>,
}

impl CommitWalk<'_, '_> {
    /// The tree of the upper directory open at `dir` (shown as `display` in messages, at
    /// `rel` in the tree; empty for the root) over `base`. The walk goes from descriptor to
    /// descriptor without following any link, so it reads what is in the upper whatever is
    /// renamed around it, and has no path-length limit.
    fn dir(
        &mut self,
        base: Option<Tree>,
        dir: &OwnedFd,
        display: &Path,
        rel: &Path,
    ) -> Result<Tree, ProjectError> {
        let (store, batch) = (self.store, self.batch);
        let is_root = rel.as_os_str().is_empty();
        if rel.components().count() + 1 > velo_core::MAX_DEPTH {
            return Err(too_deep(&format!("the upper {}", display.display())));
        }
        let mut entries: BTreeMap<Name, Entry> = match base {
            Some(tree) if is_root || !is_opaque(dir) => tree
                .into_entries()
                .into_iter()
                .map(|e| (e.name.clone(), e))
                .collect(),
            _ => BTreeMap::new(),
        };
        let listing = rustix::fs::Dir::read_from(dir).map_err(read_error(display))?;
        for item in listing {
            let item = item.map_err(read_error(display))?;
            let file_name = item.file_name();
            if matches!(file_name.to_bytes(), b"." | b"..") {
                continue;
            }
            let os_name = std::ffi::OsStr::from_bytes(file_name.to_bytes());
            let path = display.join(os_name);
            let name = Name::new(file_name.to_bytes())
                .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
            let stat = rustix::fs::statat(dir, file_name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(read_error(&path))?;
            let kind_of = FileType::from_raw_mode(stat.st_mode);
            if kind_of == FileType::CharacterDevice && stat.st_rdev == 0 {
                entries.remove(&name);
                continue;
            }
            let mut mode = Mode::from_st_mode(stat.st_mode);
            if let Some(base_mode) = entries
                .get(&name)
                .and_then(|e| unchanged_mode(e, kind_of, mode, self.shown.modes))
            {
                mode = base_mode;
            }
            // Every file of the upper was written, created or chmod'ed by the command: it
            // never keeps a set-id bit, not even one its base entry had (the command may
            // have replaced the bytes of a set-uid program).
            if kind_of == FileType::RegularFile && mode.bits() & 0o6000 != 0 {
                mode = Mode::from_st_mode(mode.bits() & !0o6000);
                self.setid_dropped.push(rel.join(os_name));
            }
            let mtime_ns = velo_core::time_ns(stat.st_mtime as i64, stat.st_mtime_nsec as i64);
            let open = |flags: OFlags| {
                rustix::fs::openat(
                    dir,
                    file_name,
                    flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(read_error(&path))
            };
            let kind = match kind_of {
                FileType::Directory => {
                    let below = match entries.get(&name).map(|e| &e.kind) {
                        Some(EntryKind::Dir { hash }) => Some(store.get_tree(hash)?),
                        _ => None,
                    };
                    let sub_dir = open(OFlags::RDONLY | OFlags::DIRECTORY)?;
                    let sub = self.dir(below, &sub_dir, &path, &rel.join(os_name))?;
                    EntryKind::Dir {
                        hash: stage_tree(store, batch, &sub)?,
                    }
                }
                FileType::RegularFile => {
                    let file = std::fs::File::from(open(OFlags::RDONLY | OFlags::NONBLOCK)?);
                    let (hash, size) = velo_ingest::store_open_file(store, batch, &file, &path)
                        .map_err(|e| match e {
                            velo_ingest::IngestError::Store(s) => ProjectError::Store(s),
                            other => ProjectError::Store(StoreError::Invalid(other.to_string())),
                        })?;
                    EntryKind::File { hash, size }
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(dir, file_name, Vec::new())
                        .map_err(read_error(&path))?;
                    EntryKind::Symlink {
                        target: target.as_bytes().into(),
                    }
                }
                _ => {
                    // It replaced whatever the base had there: that must not come back.
                    entries.remove(&name);
                    self.not_committed.push(rel.join(os_name));
                    continue;
                }
            };
            let mut xattrs = match kind {
                EntryKind::Symlink { .. } => velo_core::Xattrs::default(),
                _ => velo_ingest::read_xattrs(dir.as_fd(), file_name.to_bytes()).map_err(|e| {
                    ProjectError::Dest {
                        op: "reading extended attributes in the upper",
                        path: path.clone(),
                        cause: e,
                    }
                })?,
            };
            if xattrs.is_empty() && !self.shown.xattrs {
                if let Some(base) = entries
                    .get(&name)
                    .filter(|b| b.kind.label() == kind.label())
                {
                    xattrs = base.xattrs.clone();
                }
            }
            // File capabilities are privileges, like set-id bits: a file of the upper was
            // written or made by the command, so it never keeps them.
            if xattrs.get(CAPABILITY).is_some() {
                xattrs = velo_core::Xattrs::new(
                    xattrs
                        .iter()
                        .filter(|(n, _)| *n != CAPABILITY)
                        .map(|(n, v)| (n.to_vec(), v.to_vec()))
                        .collect(),
                )
                .map_err(|e| ProjectError::Store(StoreError::Invalid(e.to_string())))?;
                if !self.setid_dropped.contains(&rel.join(os_name)) {
                    self.setid_dropped.push(rel.join(os_name));
                }
            }
            entries.insert(
                name.clone(),
                Entry {
                    xattrs,
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
        let report = commit_upper(
            &store,
            empty_base(&store),
            &upper,
            Shown {
                modes: Some(FarmModes::ReadOnly),
                xattrs: false,
            },
        )
        .unwrap();
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
        let report = commit_upper(
            &store,
            empty_base(&store),
            &upper,
            Shown {
                modes: Some(FarmModes::ReadOnly),
                xattrs: false,
            },
        )
        .unwrap();
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

    /// A farm shows a file without write bits and a directory without group/other write;
    /// copy-up keeps what was shown. What the command did not chmod keeps the tree's mode;
    /// what it chmod'ed (even to another read-only mode) gets the command's.
    #[test]
    fn modes_the_command_did_not_change_stay_as_the_tree_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let _lock = store.lock_shared().unwrap();
        let with_mode = |mut e: Entry, mode: u32| {
            e.mode = Mode::from_st_mode(mode);
            e
        };
        let tmp_dir = with_mode(dir_entry(&store, "tmp", vec![]), 0o1777);
        let base = Tree::new(vec![
            with_mode(file_entry(&store, "secret", b"s"), 0o600),
            with_mode(file_entry(&store, "pub", b"p"), 0o644),
            with_mode(file_entry(&store, "script", b"x"), 0o700),
            with_mode(file_entry(&store, "chmodded", b"c"), 0o644),
            with_mode(file_entry(&store, "narrowed", b"n"), 0o755),
            with_mode(file_entry(&store, "su", b"su"), 0o4755),
            tmp_dir,
        ])
        .unwrap();
        let (base, _) = store.put_tree(&base).unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("tmp")).unwrap();
        for (name, mode) in [
            ("secret", 0o400),   // shown, appended to
            ("pub", 0o444),      // shown
            ("script", 0o500),   // shown
            ("chmodded", 0o640), // the command's chmod
            ("narrowed", 0o444), // the command's chmod (shown was 0555)
            ("su", 0o555),       // shown (no set-uid bit), its bytes replaced
        ] {
            std::fs::write(upper.join(name), b"appended").unwrap();
            std::fs::set_permissions(upper.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        std::fs::write(upper.join("tmp/new"), b"n").unwrap();
        std::fs::set_permissions(upper.join("tmp"), std::fs::Permissions::from_mode(0o1755))
            .unwrap();
        let report = commit_upper(
            &store,
            base,
            &upper,
            Shown {
                modes: Some(FarmModes::ReadOnly),
                xattrs: false,
            },
        )
        .unwrap();
        let modes: Vec<(&str, u32)> = [
            "secret", "pub", "script", "chmodded", "narrowed", "su", "tmp",
        ]
        .into_iter()
        .map(|n| (n, mode_at(&store, report.root, n.as_bytes())))
        .collect();
        assert_eq!(
            modes,
            [
                ("secret", 0o600),
                ("pub", 0o644),
                ("script", 0o700),
                ("chmodded", 0o640),
                ("narrowed", 0o444),
                ("su", 0o755),
                ("tmp", 0o1777),
            ]
        );
        assert_eq!(
            report.setid_dropped,
            [PathBuf::from("su")],
            "a base set-uid file the command wrote loses the bit, and says so"
        );
    }

    fn file_entry(store: &Store, name: &str, content: &[u8]) -> Entry {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content).unwrap();
        let hash = Hash::of_blob(content);
        if !store.has_blob(&hash) {
            let batch = store.begin_batch().unwrap();
            let file = std::fs::File::open(&path).unwrap();
            velo_ingest::store_open_file(store, &batch, &file, &path).unwrap();
            store.sync().unwrap();
            batch.publish().unwrap();
        }
        Entry {
            xattrs: Default::default(),
            name: Name::new(name.as_bytes()).unwrap(),
            mode: Mode::from_st_mode(0o644),
            mtime_ns: 0,
            kind: EntryKind::File {
                hash,
                size: content.len() as u64,
            },
        }
    }

    fn dir_entry(store: &Store, name: &str, entries: Vec<Entry>) -> Entry {
        let (hash, _) = store.put_tree(&Tree::new(entries).unwrap()).unwrap();
        Entry {
            xattrs: Default::default(),
            name: Name::new(name.as_bytes()).unwrap(),
            mode: Mode::from_st_mode(0o755),
            mtime_ns: 0,
            kind: EntryKind::Dir { hash },
        }
    }

    /// Layers stack as overlayfs stacks them: directories present in several layers hold
    /// the union; anything else in a higher layer hides the lower one (a file over a
    /// directory too).
    #[test]
    fn merge_layers_unions_directories_and_higher_layers_win() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let _lock = store.lock_shared().unwrap();
        let bottom = vec![
            dir_entry(
                &store,
                "etc",
                vec![
                    file_entry(&store, "a", b"bottom a"),
                    file_entry(&store, "b", b"b"),
                ],
            ),
            dir_entry(&store, "opt", vec![file_entry(&store, "x", b"x")]),
        ];
        let top = vec![
            dir_entry(
                &store,
                "etc",
                vec![
                    file_entry(&store, "a", b"top a"),
                    file_entry(&store, "c", b"c"),
                ],
            ),
            file_entry(&store, "opt", b"a file hides the directory"),
        ];
        let bottom = store.put_tree(&Tree::new(bottom).unwrap()).unwrap().0;
        let top = store.put_tree(&Tree::new(top).unwrap()).unwrap().0;
        let merged = merge_layers(&store, &[bottom, top]).unwrap();
        let mut listed: Vec<(String, String)> = Vec::new();
        velo_store::treeops::walk(&store, merged, b"", true, &mut |path, entry| {
            listed.push((
                String::from_utf8_lossy(path).into_owned(),
                entry.kind.label().to_string(),
            ));
            Ok(())
        })
        .unwrap();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("etc".into(), "dir".into()),
                ("etc/a".into(), "file".into()),
                ("etc/b".into(), "file".into()),
                ("etc/c".into(), "file".into()),
                ("opt".into(), "file".into()),
            ]
        );
        let cat = |path: &[u8]| match velo_store::treeops::lookup(&store, merged, path).unwrap() {
            velo_store::treeops::Found::Entry(Entry {
                kind: EntryKind::File { hash, .. },
                ..
            }) => std::fs::read(store.blob_path(&hash)).unwrap(),
            _ => panic!("not a file"),
        };
        assert_eq!(cat(b"etc/a"), b"top a");
        assert_eq!(merge_layers(&store, &[bottom]).unwrap(), bottom);
        assert!(merge_layers(&store, &[]).is_err());
    }

    /// An upper deeper than PATH_MAX commits: the walk goes from descriptor to descriptor.
    #[test]
    fn an_upper_deeper_than_path_max_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let name = "d".repeat(200);
        let mut fd = rustix::fs::open(
            &upper,
            OFlags::RDONLY | OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        for _ in 0..30 {
            rustix::fs::mkdirat(&fd, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755))
                .unwrap();
            fd = rustix::fs::openat(
                &fd,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
        }
        let leaf = rustix::fs::openat(
            &fd,
            "leaf",
            OFlags::WRONLY | OFlags::CREATE,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&leaf, b"deep").unwrap();
        let _lock = store.lock_shared().unwrap();
        let report = commit_upper(
            &store,
            empty_base(&store),
            &upper,
            Shown {
                modes: Some(FarmModes::ReadOnly),
                xattrs: false,
            },
        )
        .unwrap();
        let deep: Vec<u8> = std::iter::repeat_n(format!("{name}/"), 30)
            .collect::<String>()
            .into_bytes();
        let leaf_path = [deep.as_slice(), b"leaf"].concat();
        assert!(leaf_path.len() > 4096);
        assert!(matches!(
            velo_store::treeops::lookup(&store, report.root, &leaf_path).unwrap(),
            velo_store::treeops::Found::Entry(Entry {
                kind: EntryKind::File { size: 4, .. },
                ..
            })
        ));
        // The test's own clean-up cannot remove a tree past PATH_MAX by path.
        let _ = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&upper)
            .status();
    }
}
