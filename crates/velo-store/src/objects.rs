//! Blob and tree objects: staging, atomic insertion under the hash, reading, listing.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use rustix::fs::{AtFlags, Mode as FsMode, OFlags, CWD};
use rustix::io::Errno;
use velo_core::{Hash, Tree};

use crate::{Result, Store, StoreError};

/// A file being written in `tmp/`, not yet visible under any object name. Dropping it
/// discards it (an `O_TMPFILE` vanishes by itself; a named temp file is unlinked).
pub struct Staged<'s> {
    file: File,
    temp_name: Option<CString>,
    store: &'s Store,
}

impl Staged<'_> {
    /// The open file to write the content into.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    pub(crate) fn file_ref(&self) -> &File {
        &self.file
    }

    pub(crate) fn temp_name(&self) -> Option<&std::ffi::CStr> {
        self.temp_name.as_deref()
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.temp_name.take() {
            let _ = rustix::fs::unlinkat(&self.store.tmp_dir, name.as_c_str(), AtFlags::empty());
        }
    }
}

/// Which object directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum ObjectKind {
    Blob,
    Tree,
}

impl ObjectKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            ObjectKind::Blob => "blob",
            ObjectKind::Tree => "tree",
        }
    }
}

/// Object files found: (hash, is the executable variant), and names that are not objects.
pub(crate) type ObjectListing = (Vec<(Hash, bool)>, Vec<String>);

/// `ab/abcdef…` relative to the object directory.
pub(crate) fn relative_name(hash: &Hash) -> String {
    let hex = hash.to_hex();
    format!("{}/{}", &hex[..2], hex)
}

/// The name of a blob's file under `blobs/`: `ab/<hash>`, or `ab/<hash>.x` for its
/// executable (0555) variant. The one place that spells the variant's suffix.
pub(crate) fn relative_blob_name(hash: &Hash, exec: bool) -> String {
    let mut name = relative_name(hash);
    if exec {
        name.push_str(".x");
    }
    name
}

impl Store {
    /// The path of a blob's file, or of its executable variant with `exec`.
    pub fn blob_variant_path(&self, hash: &Hash, exec: bool) -> std::path::PathBuf {
        self.root.join("blobs").join(relative_blob_name(hash, exec))
    }

    pub(crate) fn dir(&self, kind: ObjectKind) -> BorrowedFd<'_> {
        match kind {
            ObjectKind::Blob => self.blobs_dir.as_fd(),
            ObjectKind::Tree => self.trees_dir.as_fd(),
        }
    }

    pub(crate) fn tmp_fd(&self) -> BorrowedFd<'_> {
        self.tmp_dir.as_fd()
    }

    /// The path of a blob's file (0444; never write to it).
    pub fn blob_path(&self, hash: &Hash) -> std::path::PathBuf {
        self.root.join("blobs").join(relative_name(hash))
    }

    /// The path of a tree object's file.
    pub fn tree_path(&self, hash: &Hash) -> std::path::PathBuf {
        self.root.join("trees").join(relative_name(hash))
    }

    pub(crate) fn has_object(&self, kind: ObjectKind, hash: &Hash) -> bool {
        rustix::fs::statat(
            self.dir(kind),
            relative_name(hash).as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok()
    }

    /// Whether the store holds this blob.
    pub fn has_blob(&self, hash: &Hash) -> bool {
        self.has_object(ObjectKind::Blob, hash)
    }

    /// Whether the store holds this tree.
    pub fn has_tree(&self, hash: &Hash) -> bool {
        self.has_object(ObjectKind::Tree, hash)
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, hash: &Hash) -> Result<File> {
        let file = self.open_object(ObjectKind::Blob, hash)?;
        // A blob is 0444 for life. Any write bit means someone made it writable, almost
        // always `chmod -R u+w` on a hard-linked checkout, which shares the blob's inode:
        // its bytes may no longer be what its name says. Said at once, not only by fsck.
        if let Ok(meta) = file.metadata() {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o222 != 0 {
                return Err(StoreError::Corrupt {
                    kind: "blob",
                    hash: *hash,
                    detail: format!(
                        "its file was made writable outside velo (mode {mode:o}, blobs are 444): a hard-linked checkout changed in place? `velo fsck` checks its bytes; `velo fsck --repair` sets it aside so an import or ingest of the right bytes can store it again"
                    ),
                });
            }
        }
        Ok(file)
    }

    fn open_object(&self, kind: ObjectKind, hash: &Hash) -> Result<File> {
        match rustix::fs::openat(
            self.dir(kind),
            relative_name(hash).as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            FsMode::empty(),
        ) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::NOENT) => Err(StoreError::Missing {
                kind: kind.label(),
                hash: *hash,
            }),
            Err(e) => Err(StoreError::io(
                "opening",
                self.root.join(relative_name(hash)),
            )(e.into())),
        }
    }

    /// Starts a new object file in `tmp/` on the store's file system.
    pub fn stage(&self) -> Result<Staged<'_>> {
        if self.tmpfile_supported.load(Ordering::Relaxed) {
            match rustix::fs::openat(
                &self.tmp_dir,
                ".",
                OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
                FsMode::from_raw_mode(0o600),
            ) {
                Ok(fd) => {
                    return Ok(Staged {
                        file: File::from(fd),
                        temp_name: None,
                        store: self,
                    })
                }
                Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOENT) => {
                    tracing::debug!("O_TMPFILE unsupported here; staging in named temp files");
                    self.tmpfile_supported.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(StoreError::io(
                        "creating a temp file in",
                        self.root.join("tmp"),
                    )(e.into()))
                }
            }
        }
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(format!("{}-{n}.tmp", std::process::id())).expect("no NUL");
        let fd = rustix::fs::openat(
            &self.tmp_dir,
            name.as_c_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
            FsMode::from_raw_mode(0o600),
        )
        .map_err(|e| StoreError::io("creating a temp file in", self.root.join("tmp"))(e.into()))?;
        Ok(Staged {
            file: File::from(fd),
            temp_name: Some(name),
            store: self,
        })
    }

    /// Treats a file the caller created at `tmp/<rel>` as staged.
    pub(crate) fn adopt_temp(&self, file: File, rel: &str) -> Staged<'_> {
        Staged {
            file,
            temp_name: Some(CString::new(rel).expect("temp names hold no NUL")),
            store: self,
        }
    }

    /// Makes a staged file visible as blob `hash` (read-only, 0444). Returns false when
    /// the store already had it (the staged copy is discarded). The caller vouches that
    /// the staged bytes hash to `hash`.
    pub fn commit_blob(&self, staged: Staged<'_>, hash: &Hash) -> Result<bool> {
        self.commit_object(ObjectKind::Blob, staged, hash)
    }

    fn commit_object(&self, kind: ObjectKind, staged: Staged<'_>, hash: &Hash) -> Result<bool> {
        self.link_staged(kind, staged, relative_name(hash), 0o444)
    }

    /// Flushes a staged file, sets its mode and links it at `rel` in the object directory.
    fn link_staged(
        &self,
        kind: ObjectKind,
        staged: Staged<'_>,
        rel: String,
        mode: u32,
    ) -> Result<bool> {
        let target_path = || {
            self.root
                .join(if kind == ObjectKind::Blob {
                    "blobs"
                } else {
                    "trees"
                })
                .join(&rel)
        };
        // One object, visible at once: its bytes must be on disk before its name is (a
        // power cut must never leave a name over other bytes). Bulk writers use a batch
        // and one flush instead.
        staged
            .file
            .sync_data()
            .map_err(StoreError::io("syncing", target_path()))?;
        rustix::fs::fchmod(&staged.file, FsMode::from_raw_mode(mode))
            .map_err(|e| StoreError::io("setting mode of", target_path())(e.into()))?;
        let link = || -> std::result::Result<(), Errno> {
            match &staged.temp_name {
                Some(name) => rustix::fs::linkat(
                    &self.tmp_dir,
                    name.as_c_str(),
                    self.dir(kind),
                    rel.as_str(),
                    AtFlags::empty(),
                ),
                None => {
                    let proc_path = format!("/proc/self/fd/{}", staged.file.as_raw_fd());
                    match rustix::fs::linkat(
                        CWD,
                        proc_path.as_str(),
                        self.dir(kind),
                        rel.as_str(),
                        AtFlags::SYMLINK_FOLLOW,
                    ) {
                        // Without /proc, AT_EMPTY_PATH works for holders of CAP_DAC_READ_SEARCH.
                        Err(Errno::NOENT) if self.shard_exists(kind, &rel) => rustix::fs::linkat(
                            &staged.file,
                            "",
                            self.dir(kind),
                            rel.as_str(),
                            AtFlags::EMPTY_PATH,
                        ),
                        other => other,
                    }
                }
            }
        };
        let mut result = link();
        if result == Err(Errno::NOENT) {
            match rustix::fs::mkdirat(self.dir(kind), &rel[..2], FsMode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => {
                    return Err(StoreError::io(
                        "creating shard directory for",
                        target_path(),
                    )(e.into()))
                }
            }
            result = link();
        }
        match result {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(StoreError::io("linking object into place", target_path())(
                e.into(),
            )),
        }
    }

    fn shard_exists(&self, kind: ObjectKind, rel: &str) -> bool {
        rustix::fs::statat(self.dir(kind), &rel[..2], AtFlags::empty()).is_ok()
    }

    /// The path of the executable (0555) variant of a blob if the store has one. It is a
    /// separate inode, so a tree that marks a file executable never changes the mode of
    /// the blob other trees link to; commands make missing ones in a batch
    /// ([`crate::Batch::stage_exec_variant`]).
    pub fn existing_exec_variant(&self, hash: &Hash) -> Option<std::path::PathBuf> {
        let rel = relative_blob_name(hash, true);
        rustix::fs::statat(&self.blobs_dir, rel.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .is_ok()
            .then(|| self.root.join("blobs").join(&rel))
    }

    /// Stores `bytes` as a blob; returns its hash and whether it was new.
    pub fn insert_blob(&self, bytes: &[u8]) -> Result<(Hash, bool)> {
        let hash = Hash::of_blob(bytes);
        if self.has_blob(&hash) {
            return Ok((hash, false));
        }
        let mut staged = self.stage()?;
        staged
            .file()
            .write_all(bytes)
            .map_err(StoreError::io("writing blob", self.blob_path(&hash)))?;
        let new = self.commit_blob(staged, &hash)?;
        Ok((hash, new))
    }

    /// Stores a tree object; returns its hash and whether it was new.
    pub fn put_tree(&self, tree: &Tree) -> Result<(Hash, bool)> {
        let (bytes, hash) = tree.encode_with_hash();
        Ok((hash, self.put_tree_encoded(&hash, &bytes)?))
    }

    /// Stores an already-encoded tree whose hash the caller has verified.
    pub fn put_tree_encoded(&self, hash: &Hash, bytes: &[u8]) -> Result<bool> {
        if self.has_tree(hash) {
            return Ok(false);
        }
        let mut staged = self.stage()?;
        staged
            .file()
            .write_all(bytes)
            .map_err(StoreError::io("writing tree", self.tree_path(hash)))?;
        self.commit_object(ObjectKind::Tree, staged, hash)
    }

    /// The verified encoding of a tree object.
    pub fn tree_bytes(&self, hash: &Hash) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_object(ObjectKind::Tree, hash)?
            .read_to_end(&mut bytes)
            .map_err(StoreError::io("reading", self.tree_path(hash)))?;
        let actual = Hash::of_tree_encoding(&bytes);
        if actual != *hash {
            return Err(StoreError::Corrupt {
                kind: "tree",
                hash: *hash,
                detail: format!("its content hashes to {actual}"),
            });
        }
        Ok(bytes)
    }

    /// Reads, verifies and decodes a tree.
    pub fn get_tree(&self, hash: &Hash) -> Result<Tree> {
        let bytes = self.tree_bytes(hash)?;
        Tree::decode(&bytes).map_err(|e| StoreError::Corrupt {
            kind: "tree",
            hash: *hash,
            detail: e.to_string(),
        })
    }

    /// Every object file in a directory: (hash, is the executable variant, file name).
    /// Names that are not object names are returned in the second list.
    pub(crate) fn list_objects(&self, kind: ObjectKind) -> Result<ObjectListing> {
        let base = self.root.join(if kind == ObjectKind::Blob {
            "blobs"
        } else {
            "trees"
        });
        let mut objects = Vec::new();
        let mut strays = Vec::new();
        let shards = std::fs::read_dir(&base).map_err(StoreError::io("listing", &base))?;
        for shard in shards {
            let shard = shard.map_err(StoreError::io("listing", &base))?;
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            if !shard.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                strays.push(shard_name);
                continue;
            }
            let dir = shard.path();
            for entry in std::fs::read_dir(&dir).map_err(StoreError::io("listing", &dir))? {
                let entry = entry.map_err(StoreError::io("listing", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let (hex, exec) = match name.strip_suffix(".x") {
                    Some(hex) if kind == ObjectKind::Blob => (hex, true),
                    _ => (name.as_str(), false),
                };
                match hex.parse::<Hash>() {
                    Ok(hash) if hex.starts_with(&shard_name) && hex == hash.to_hex() => {
                        objects.push((hash, exec))
                    }
                    _ => strays.push(format!("{shard_name}/{name}")),
                }
            }
        }
        Ok((objects, strays))
    }
}
