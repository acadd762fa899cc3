//! The view index of a tree for the `LD_PRELOAD` shim: `views/<root>.idx` (format in
//! velo-view), and `views/<root>.d/<node>`, a hard link per executable file to an inode
//! that shows it executable, so the shim can `execve` it and never writes to the store.
//! Built once per root, under the shared store lock, published by rename (the index
//! last: its presence means the view is complete); gc removes the views of trees no root
//! reaches.

use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Instant;

use velo_core::{EntryKind, Hash};
use velo_store::{BlobForm, Store, StoreError};
use velo_view::{IndexWriter, Kind, NodeSpec, FLAG_EXEC_LINK};

use crate::ProjectError;

/// The most nodes an index may hold (its offsets are 32-bit).
const MAX_NODES: u64 = u32::MAX as u64 - 1;

/// A built or found view.
#[derive(Clone, Debug)]
pub struct View {
    /// `views/<root>.idx`.
    pub index: PathBuf,
    /// `views/<root>.d`.
    pub exec_dir: PathBuf,
    /// Seconds spent building it; `None` when it was there already.
    pub built_seconds: Option<f64>,
}

/// The device number a view's files report: stable per root, and far from real devices.
pub fn device_of(root: &Hash) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&root.0[..8]);
    (u64::from_le_bytes(bytes) & 0x0000_ffff_ffff_ffff) | 0x7672_0000_0000_0000
}

/// The view of `root`, built if the store lacks it. The caller holds the shared lock.
pub fn ensure_view(store: &Store, root: Hash) -> Result<View, ProjectError> {
    let views = store.root().join("views");
    let hex = root.to_hex();
    let index = views.join(format!("{hex}.idx"));
    let exec_dir = views.join(format!("{hex}.d"));
    if index.is_file() {
        match velo_store::views::view_damage_cached(&views, &hex, &store.root().join("tmp")) {
            None => {
                return Ok(View {
                    index,
                    exec_dir,
                    built_seconds: None,
                })
            }
            Some(why) => {
                // Never hand a damaged view to the shim: build it again.
                tracing::warn!(view = %index.display(), %why, "building the view again");
                velo_store::remove_tree(&index);
                velo_store::remove_tree(&exec_dir);
                velo_store::remove_tree(&views.join(format!("{hex}.ok")));
            }
        }
    }
    store.ensure_private_dirs()?;
    let started = Instant::now();
    let stats = velo_store::treeops::stats(store, root)?;
    let nodes = stats
        .files
        .saturating_add(stats.dirs)
        .saturating_add(stats.symlinks);
    if nodes > MAX_NODES {
        return Err(StoreError::Invalid(format!(
            "the tree holds {nodes} entries, more than a view index can hold ({MAX_NODES}); run it with --isolate"
        ))
        .into());
    }
    let io = |op: &'static str, path: PathBuf| {
        move |cause: std::io::Error| ProjectError::Dest { op, path, cause }
    };
    std::fs::create_dir_all(&views).map_err(io("creating", views.clone()))?;
    let building = views.join(format!(".build-{}-{hex}", std::process::id()));
    velo_store::remove_tree(&building);
    std::fs::create_dir(&building).map_err(io("creating", building.clone()))?;
    // `e`: the empty directory that descriptors of tree directories really open, and the
    // kernel's working directory of a process working in the tree.
    let empty = building.join("e");
    std::fs::create_dir(&empty).map_err(io("creating", empty.clone()))?;
    let result = build(store, root, &building);
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(e) => {
            velo_store::remove_tree(&building);
            return Err(e);
        }
    };
    // The executable links first, then the index: a view with an index is complete.
    match std::fs::rename(&building, &exec_dir) {
        Ok(()) => {}
        // Another command built it meanwhile: theirs is as good.
        Err(_) if exec_dir.is_dir() => velo_store::remove_tree(&building),
        Err(e) => {
            velo_store::remove_tree(&building);
            return Err(io("publishing", exec_dir)(e));
        }
    }
    velo_store::replace_file(
        &index,
        &store.root().join("tmp"),
        &bytes,
        velo_store::Durability::Durable,
    )
    .map_err(io("writing", index.clone()))?;
    Ok(View {
        index,
        exec_dir,
        built_seconds: Some(started.elapsed().as_secs_f64()),
    })
}

/// The index's bytes; executables get their links in `exec_dir`.
fn build(store: &Store, root: Hash, exec_dir: &std::path::Path) -> Result<Vec<u8>, ProjectError> {
    let batch = store.begin_batch()?;
    let mut writer = IndexWriter::new(0o755, 0);
    let mut queue = VecDeque::from([(root, 0u32)]);
    let mut links = Vec::new();
    let mut view_flags = 0;
    while let Some((tree_hash, dir_index)) = queue.pop_front() {
        let tree = store.get_tree(&tree_hash)?;
        let first = writer.len();
        let mut children = Vec::with_capacity(tree.entries().len());
        for (i, entry) in tree.entries().iter().enumerate() {
            let index = first + i as u32;
            let mut spec = NodeSpec {
                kind: Kind::File,
                name: entry.name.as_bytes().to_vec(),
                mode: entry.mode.bits(),
                mtime_ns: entry.mtime_ns,
                size: 0,
                hash: [0; 32],
                target: Vec::new(),
                flags: if entry.xattrs.is_empty() {
                    0
                } else {
                    velo_view::FLAG_XATTRS
                },
            };
            match &entry.kind {
                EntryKind::File { hash, size } => {
                    let name = entry.name.as_bytes();
                    if name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.") {
                        view_flags |= velo_view::VIEW_HAS_LIBRARIES;
                    }
                    spec.size = *size;
                    spec.hash = hash.0;
                    if entry.mode.is_executable() {
                        spec.flags |= FLAG_EXEC_LINK;
                        links.push((index, *hash, entry.mode.bits(), entry.mtime_ns));
                    }
                }
                EntryKind::Dir { hash } => {
                    spec.kind = Kind::Dir;
                    spec.hash = hash.0;
                    queue.push_back((*hash, index));
                }
                EntryKind::Symlink { target } => {
                    spec.kind = Kind::Symlink;
                    spec.target = target.to_vec();
                }
            }
            children.push(spec);
        }
        writer
            .add_children(dir_index, &children)
            .map_err(|_| StoreError::Invalid("the tree is too large for a view index".into()))?;
    }
    for (index, hash, mode, mtime_ns) in links {
        let form = BlobForm::for_entry(mode, mtime_ns);
        let source = match store.blob_in_form(&hash, &form)? {
            Some(path) => path,
            None => batch.stage_variant(&hash, &form)?.0,
        };
        let link = exec_dir.join(index.to_string());
        std::fs::hard_link(&source, &link).map_err(|cause| ProjectError::Dest {
            op: "linking",
            path: link,
            cause,
        })?;
    }
    if !batch.is_empty() {
        store.sync()?;
        batch.publish()?;
    }
    Ok(velo_store::views::seal_view(writer.finish(
        root.0,
        device_of(&root),
        view_flags,
    )))
}

/// Writes the shared bitmap the shim keeps of tree directories the upper holds entries
/// in (one bit per node of `index`), for a run over an upper that may hold changes
/// already (`--upper DIR` of an earlier run): every directory of the upper that is a
/// directory of the tree gets its bit, so lookups there ask the upper.
pub fn write_touched(
    index: &velo_view::View<'_>,
    upper: &std::path::Path,
    out: &std::path::Path,
) -> Result<(), ProjectError> {
    let mut bits = vec![0u8; (index.len() as usize).div_ceil(8).max(1)];
    let damaged = || ProjectError::Store(StoreError::Invalid("the view index is damaged".into()));
    // (upper directory, tree node) pairs still to visit.
    let mut queue = VecDeque::from([(upper.to_path_buf(), 0u32)]);
    while let Some((dir, node)) = queue.pop_front() {
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(cause) => {
                return Err(ProjectError::Dest {
                    op: "reading upper",
                    path: dir,
                    cause,
                })
            }
        };
        let mut any = false;
        let tree_dir = index.node(node).map_err(|_| damaged())?;
        for entry in listing {
            let entry = entry.map_err(|cause| ProjectError::Dest {
                op: "reading upper",
                path: dir.clone(),
                cause,
            })?;
            any = true;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let child = index
                .child(
                    &tree_dir,
                    std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()),
                )
                .map_err(|_| damaged())?;
            if let Some(child) = child {
                if index.node(child).map_err(|_| damaged())?.kind == Kind::Dir {
                    queue.push_back((entry.path(), child));
                }
            }
        }
        // The top's copy is the upper itself: marked only when it holds something.
        if any || node != 0 {
            bits[node as usize / 8] |= 1 << (node % 8);
        }
    }
    std::fs::write(out, &bits).map_err(|cause| ProjectError::Dest {
        op: "writing",
        path: out.to_path_buf(),
        cause,
    })
}

/// An upper directory on disk as velo-view's resolver asks about it (what the shim sees
/// at start, for velo's own lookups of `--workdir` and the program before the run).
pub struct DirLayer<'a> {
    /// The upper directory.
    pub upper: &'a std::path::Path,
}

impl velo_view::Layer for DirLayer<'_> {
    fn touched(&self, _dir: u32) -> bool {
        true
    }

    fn entry(&self, rel: &[u8], target: &mut [u8; velo_view::PATH_MAX]) -> velo_view::UpperEntry {
        use std::os::unix::fs::FileTypeExt;
        use std::os::unix::fs::MetadataExt;
        use velo_view::UpperEntry;
        let path = self.upper.join(std::ffi::OsStr::from_bytes(rel));
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return UpperEntry::Absent;
        };
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            UpperEntry::Whiteout
        } else if kind.is_dir() {
            let opaque = xattr_is_y(&path, "user.overlay.opaque");
            UpperEntry::Dir { opaque }
        } else if kind.is_symlink() {
            match std::fs::read_link(&path) {
                Ok(t) if t.as_os_str().len() < velo_view::PATH_MAX => {
                    let bytes = t.as_os_str().as_bytes();
                    target[..bytes.len()].copy_from_slice(bytes);
                    UpperEntry::Symlink(bytes.len())
                }
                _ => UpperEntry::File,
            }
        } else {
            UpperEntry::File
        }
    }
}

fn xattr_is_y(path: &std::path::Path, name: &str) -> bool {
    let mut value = [0u8; 4];
    matches!(rustix::fs::lgetxattr(path, name, &mut value), Ok(n) if n >= 1 && value[0] == b'y')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_view_indexes_every_entry_and_links_executables_to_executable_inodes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::write(src.join("data"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("bin/tool", src.join("link")).unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let report = velo_ingest::ingest(
            &store,
            &src,
            &velo_ingest::IngestOptions::default(),
            &velo_ingest::Progress::default(),
        )
        .unwrap();
        let _lock = store.lock_shared().unwrap();
        let view = ensure_view(&store, report.root).unwrap();
        assert!(view.built_seconds.is_some());
        assert!(ensure_view(&store, report.root)
            .unwrap()
            .built_seconds
            .is_none());
        let bytes = std::fs::read(&view.index).unwrap();
        let index = velo_view::View::new(&bytes).unwrap();
        assert_eq!(index.root_hash(), report.root.0);
        let mut scratch = [0u8; velo_view::PATH_MAX];
        let found = |path: &str, follow: bool, scratch: &mut [u8; velo_view::PATH_MAX]| match index
            .resolve(b"/v", 0, path.as_bytes(), follow, scratch)
        {
            velo_view::Resolved::Node(i) => index.node(i).unwrap(),
            other => panic!("{path}: {other:?}"),
        };
        let tool = found("/v/link", true, &mut scratch);
        let meta = std::fs::metadata(src.join("bin/tool")).unwrap();
        assert_eq!(tool.mode, 0o750);
        assert_eq!(
            tool.mtime_ns,
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
        );
        assert_eq!(tool.size, meta.len());
        assert_eq!(tool.flags & FLAG_EXEC_LINK, FLAG_EXEC_LINK);
        let exec = std::fs::metadata(view.exec_dir.join(tool.index.to_string())).unwrap();
        assert_eq!(exec.mode() & 0o7777, 0o550, "executable, read-only");
        assert_eq!(exec.mtime(), meta.mtime());
        let data = found("/v/data", true, &mut scratch);
        assert_eq!(data.flags & FLAG_EXEC_LINK, 0);
        assert_eq!(data.hash, tool.hash);
        let link = found("/v/link", false, &mut scratch);
        assert_eq!(index.target(&link).unwrap(), b"bin/tool");
    }
}
