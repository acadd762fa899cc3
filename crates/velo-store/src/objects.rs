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

/// Object files found: (hash, the variant's name suffix for a blob variant), and names
/// that are not objects.
pub(crate) type ObjectListing = (Vec<(Hash, Option<Box<str>>)>, Vec<String>);

/// `ab/abcdef…` relative to the object directory.
pub(crate) fn relative_name(hash: &Hash) -> String {
    let hex = hash.to_hex();
    format!("{}/{}", &hex[..2], hex)
}

/// How a blob's file looks through a hard link: its mode and its mtime.
///
/// A tree entry is shown by an inode whose form matches it: the blob's own file (which
/// takes the form of the first file it was stored from) or a *variant*, a separate inode
/// with the same bytes under `blobs/ab/<hash>.<mode>.<mtime_ns>` (see docs/FORMAT.md).
/// A blob's own file is read-only (0444 or 0555). A variant is read-only when a
/// hard-linked checkout (which the user can write into) links it; the variants of farms
/// with [`FarmModes::Writable`] also keep the owner's write bit, since a farm is reached
/// only by the store's owner and, as a sandbox's lower, never written through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobForm {
    /// Permission bits: never a group or other write, set-id or sticky bit; always owner
    /// read.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl BlobForm {
    /// The form that shows a tree entry of `mode_bits` and `mtime_ns` through a shared
    /// read-only inode: its read and execute bits and owner read; write, set-id and
    /// sticky bits dropped.
    pub fn for_entry(mode_bits: u32, mtime_ns: i64) -> BlobForm {
        BlobForm {
            mode: (mode_bits & 0o555) | 0o400,
            mtime_ns,
        }
    }

    /// The form that shows a tree entry in a farm of `modes`.
    pub fn in_farm(mode_bits: u32, mtime_ns: i64, modes: FarmModes) -> BlobForm {
        match modes {
            FarmModes::ReadOnly => BlobForm::for_entry(mode_bits, mtime_ns),
            FarmModes::Writable => BlobForm {
                mode: (mode_bits & 0o755) | 0o400,
                mtime_ns,
            },
        }
    }

    /// The form a new blob's own file takes from the file it is stored from: 0555 if
    /// that is executable by its owner, else 0444, and its mtime. Readable by all, so a
    /// store another user may read stays readable.
    pub fn canonical(mode_bits: u32, mtime_ns: i64) -> BlobForm {
        BlobForm {
            mode: if mode_bits & 0o100 != 0 { 0o555 } else { 0o444 },
            mtime_ns,
        }
    }

    /// The form of a file from its `stat`.
    pub fn of_stat(st: &rustix::fs::Stat) -> BlobForm {
        BlobForm {
            mode: st.st_mode & 0o7777,
            mtime_ns: velo_core::time_ns(st.st_mtime, st.st_mtime_nsec as i64),
        }
    }

    /// The mode a blob's own file may have: 0444, or 0555 for content first stored from
    /// an executable.
    pub fn is_canonical_mode(mode: u32) -> bool {
        mode == 0o444 || mode == 0o555
    }

    /// `.<mode in octal>.<mtime_ns>`, the suffix of this variant's file name.
    pub(crate) fn suffix(&self) -> String {
        format!(".{:o}.{}", self.mode, self.mtime_ns)
    }

    /// The form a variant's suffix names; `None` for the legacy `.x` (0555, any mtime)
    /// and for names that are not variants.
    pub(crate) fn parse_suffix(suffix: &str) -> Option<BlobForm> {
        let (mode, mtime) = suffix.strip_prefix('.')?.split_once('.')?;
        let mode = u32::from_str_radix(mode, 8).ok()?;
        let mtime_ns: i64 = mtime.parse().ok()?;
        let form = BlobForm { mode, mtime_ns };
        // Only the one spelling and the modes a form can have: a name is a variant's
        // name, or a stray.
        let possible = mode & !0o755 == 0 && mode & 0o400 != 0;
        (form.suffix() == suffix && possible).then_some(form)
    }

    /// Timestamps for `futimens`: atime and mtime both the form's mtime.
    pub fn timestamps(&self) -> rustix::fs::Timestamps {
        let t = rustix::fs::Timespec {
            tv_sec: self.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: self.mtime_ns.rem_euclid(1_000_000_000) as _,
        };
        rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        }
    }
}

/// How a farm shows the modes of its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FarmModes {
    /// Less every write bit: files link blobs and read-only variants, so a tree just
    /// ingested needs no variant. The right choice where a variant is a copy (ext4).
    ReadOnly,
    /// With the owner's write bit too, so `rw-r--r--` shows as such: every file whose mode
    /// has it links a variant of its own (an inode each where the store reflinks, a copy
    /// elsewhere).
    Writable,
}

impl FarmModes {
    /// The suffix of such a farm's directory name (see [`Store::farm_path`]).
    fn suffix(self) -> &'static str {
        match self {
            FarmModes::ReadOnly => ".2",
            FarmModes::Writable => ".2w",
        }
    }
}

/// The tree and modes of the current farm (of either kind) with this directory name.
pub(crate) fn parse_farm_name(name: &str) -> Option<(Hash, FarmModes)> {
    [FarmModes::ReadOnly, FarmModes::Writable]
        .into_iter()
        .find_map(|m| Some((name.strip_suffix(m.suffix())?.parse().ok()?, m)))
}

/// The legacy suffix of an executable (0555) variant, from before variants had forms.
pub(crate) const LEGACY_EXEC_SUFFIX: &str = ".x";

/// Whether `suffix` (after the hash) names a blob variant file.
pub(crate) fn is_variant_suffix(suffix: &str) -> bool {
    suffix == LEGACY_EXEC_SUFFIX || BlobForm::parse_suffix(suffix).is_some()
}

/// The name of a blob's file under `blobs/`: `ab/<hash>`, or with a variant's suffix.
/// The one place that joins them.
pub(crate) fn relative_blob_name(hash: &Hash, variant: Option<&str>) -> String {
    let mut name = relative_name(hash);
    if let Some(suffix) = variant {
        name.push_str(suffix);
    }
    name
}

impl Store {
    /// The path of a blob's file, or of one of its variants (`variant` is the suffix of
    /// the file's name, as listed).
    pub fn blob_variant_path(&self, hash: &Hash, variant: Option<&str>) -> std::path::PathBuf {
        self.root
            .join("blobs")
            .join(relative_blob_name(hash, variant))
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

    /// Where the cached link farm of tree `root` lives: `farms/<hash>.2` (read-only
    /// modes) or `farms/<hash>.2w` (owner-writable modes). The `2` is the farm format:
    /// such farms show every entry's mtime ([`BlobForm`]); farms named by the bare hash
    /// came before and are gc's to remove.
    pub fn farm_path(&self, root: &Hash, modes: FarmModes) -> std::path::PathBuf {
        self.root
            .join("farms")
            .join(format!("{}{}", root.to_hex(), modes.suffix()))
    }

    /// The path of a blob's file (0444 or 0555; never write to it).
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
                        "its file was made writable outside velo (mode {mode:o}; blobs are 444 or 555): a hard-linked checkout changed in place? `velo fsck` checks its bytes; `velo fsck --repair` sets it aside so an import or ingest of the right bytes can store it again"
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

    /// The file that shows blob `hash` in `form`, if the store has one: the blob's own
    /// file when its mode and mtime are that form, else the variant of that form. A
    /// variant is a separate inode, so a tree never changes what another tree's links
    /// show; commands make missing ones in a batch ([`crate::Batch::stage_variant`]).
    /// `Missing` if the store lacks the blob itself.
    pub fn blob_in_form(&self, hash: &Hash, form: &BlobForm) -> Result<Option<std::path::PathBuf>> {
        let own = relative_name(hash);
        match rustix::fs::statat(&self.blobs_dir, own.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if BlobForm::of_stat(&st) == *form => {
                return Ok(Some(self.root.join("blobs").join(own)))
            }
            Ok(_) => {}
            Err(Errno::NOENT) => {
                return Err(StoreError::Missing {
                    kind: "blob",
                    hash: *hash,
                })
            }
            Err(e) => {
                return Err(StoreError::io(
                    "reading metadata of",
                    self.root.join("blobs").join(own),
                )(e.into()))
            }
        }
        let rel = relative_blob_name(hash, Some(&form.suffix()));
        Ok(
            rustix::fs::statat(&self.blobs_dir, rel.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok()
                .then(|| self.root.join("blobs").join(&rel)),
        )
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

    /// Every object file in a directory: (hash, the suffix of a blob variant's name).
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
                let (hex, variant) = match name.split_at_checked(64) {
                    Some((hex, suffix))
                        if kind == ObjectKind::Blob && is_variant_suffix(suffix) =>
                    {
                        (hex, Some(suffix.into()))
                    }
                    _ => (name.as_str(), None),
                };
                match hex.parse::<Hash>() {
                    Ok(hash) if hex.starts_with(&shard_name) && hex == hash.to_hex() => {
                        objects.push((hash, variant))
                    }
                    _ => strays.push(format!("{shard_name}/{name}")),
                }
            }
        }
        Ok((objects, strays))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_suffix_names_one_read_only_form_in_one_spelling() {
        for form in [
            BlobForm::for_entry(0o644, 1_700_000_000_123_456_789),
            BlobForm::for_entry(0o4755, -86_400_000_000_042),
            BlobForm::for_entry(0o000, 0),
            BlobForm::for_entry(0o600, i64::MIN),
        ] {
            assert_eq!(form.mode & 0o7222, 0, "{form:?} is read-only");
            assert_ne!(form.mode & 0o400, 0, "{form:?} keeps owner read");
            assert_eq!(BlobForm::parse_suffix(&form.suffix()), Some(form));
        }
        assert_eq!(BlobForm::for_entry(0o4755, 0).mode, 0o555);
        assert_eq!(BlobForm::for_entry(0o600, 0).mode, 0o400);
        // Other spellings, writable modes and garbage are strays, not variants.
        for stray in [
            ".0444.1", ".664.1", ".4555.1", ".1555.1", ".044.1", ".444.01", ".444.+1", ".444",
            ".444.1.", "444.1", ".x1", "",
        ] {
            assert_eq!(BlobForm::parse_suffix(stray), None, "{stray:?}");
        }
        assert!(is_variant_suffix(".x"));
        let writable = BlobForm::in_farm(0o6775, 3, FarmModes::Writable);
        assert_eq!(
            writable.mode, 0o755,
            "owner write kept, group write and set-id not"
        );
        assert_eq!(BlobForm::parse_suffix(&writable.suffix()), Some(writable));
        assert_eq!(BlobForm::in_farm(0o644, 3, FarmModes::ReadOnly).mode, 0o444);
        assert_eq!(
            BlobForm::canonical(0o700, 5),
            BlobForm {
                mode: 0o555,
                mtime_ns: 5
            }
        );
        assert_eq!(
            BlobForm::canonical(0o664, 5),
            BlobForm {
                mode: 0o444,
                mtime_ns: 5
            }
        );
    }
}
