//! Checkout: a tree as directories, links or copies, and symlinks.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode as FsMode, OFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;
use velo_core::{Entry, EntryKind, Hash};
use velo_store::treeops::TreeSource;
use velo_store::{Batch, FarmModes, Store, StoreError};

/// How files are materialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckoutMode {
    /// Hard links to the store's read-only blobs: no data copied, files not writable.
    Hardlink,
    /// Reflinks (copy-on-write clones): independent writable files, no data copied.
    /// Fails where the file system cannot reflink.
    Reflink,
    /// Plain copies: independent writable files.
    Copy,
}

/// How to check out: the file mode, and what to do with set-uid/set-gid bits.
#[derive(Clone, Copy, Debug)]
pub struct CheckoutOptions {
    /// How files are materialised.
    pub mode: CheckoutMode,
    /// Give copied and reflinked files the set-user-ID and set-group-ID bits their tree
    /// records. Off by default: a tree may come from anyone (a `.velo` file, a sandbox
    /// commit), and a set-uid file that root checks out would run as root. (Hard-linked
    /// files never have them: they are the store's read-only inodes.)
    pub preserve_setid: bool,
    /// Hard links: which modes the linked inodes show. Checkouts a user can write into
    /// keep [`FarmModes::ReadOnly`] (the default): an owner-writable inode shared with
    /// other trees would let an edit change them all.
    pub farm_modes: FarmModes,
}

impl CheckoutOptions {
    /// `mode`, without set-uid/set-gid bits.
    pub fn new(mode: CheckoutMode) -> CheckoutOptions {
        CheckoutOptions {
            mode,
            preserve_setid: false,
            farm_modes: FarmModes::ReadOnly,
        }
    }
}

/// The set-user-ID and set-group-ID bits.
const SETID_BITS: u32 = 0o6000;

/// Write permission for group and others: never given to a directory of a hard-linked
/// checkout (see [`checkout`]).
const GROUP_OTHER_WRITE: u32 = 0o022;

/// The mode a hard-linked checkout (and so every farm) gives a directory whose tree mode
/// is `bits`: no write for group and others (see [`checkout_with`]).
pub(crate) fn shown_dir_mode(bits: u32) -> u32 {
    bits & 0o7777 & !GROUP_OTHER_WRITE
}

/// What a checkout did.
#[derive(Clone, Debug, Default)]
pub struct CheckoutReport {
    /// Files materialised.
    pub files: u64,
    /// Directories created (the destination itself not counted).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Logical bytes of the files.
    pub bytes: u64,
    /// Files hard-linked to the store.
    pub linked: u64,
    /// Files reflinked.
    pub reflinked: u64,
    /// Files copied.
    pub copied: u64,
    /// Hard links refused for the link-count limit (EMLINK) and copied instead.
    pub link_limit_fallbacks: u64,
    /// The store is on another file system than the destination (EXDEV): hard links were
    /// impossible and files were reflinked or copied.
    pub cross_device: bool,
    /// Files whose set-uid/set-gid bits were left off (copy and reflink modes, without
    /// [`CheckoutOptions::preserve_setid`]).
    pub setid_dropped: u64,
    /// Hard-linked files whose tree mode a shared inode cannot show exactly (write bits
    /// in read-only mode, group/other write, set-id or sticky bits, no owner read): they
    /// show [`velo_store::BlobForm::in_farm`]'s mode. Their mtimes are exact.
    pub inexact_modes: u64,
    /// Variants made (a blob in another mode or mtime, for entries that show it so).
    pub variants_made: u64,
    /// Entries whose extended attributes the checkout could not show: hard-linked files
    /// (a shared inode keeps none), and attributes this user may not set
    /// (`security.capability` needs root).
    pub xattrs_not_shown: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Why a checkout failed.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// The store failed (missing or damaged object, …).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the destination failed.
    #[error("{op} {path}: {cause}")]
    Dest {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The destination exists and is not an empty directory.
    #[error("{0} exists and is not an empty directory; choose a new path")]
    NotEmpty(PathBuf),
    /// `--mode reflink` on a file system that cannot.
    #[error("the file system of {0} cannot reflink from the store ({1}); use --mode copy, or put both on btrfs/xfs")]
    ReflinkUnsupported(PathBuf, std::io::Error),
}

struct Ctx<'a> {
    progress: &'a velo_ingest::Progress,
    store: &'a Store,
    /// Variants the store lacks are made here and published at the end.
    batch: &'a Batch<'a>,
    trees: &'a dyn TreeSource,
    mode: CheckoutMode,
    preserve_setid: bool,
    farm_modes: FarmModes,
    dest: &'a Path,
    cross_device: AtomicBool,
    files: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    bytes: AtomicU64,
    linked: AtomicU64,
    reflinked: AtomicU64,
    copied: AtomicU64,
    link_limit: AtomicU64,
    setid_dropped: AtomicU64,
    inexact_modes: AtomicU64,
    variants_made: AtomicU64,
    xattrs_not_shown: AtomicU64,
}

fn timestamps(mtime_ns: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Materialises tree `root` at `dest` in `mode`, without set-uid/set-gid bits: see
/// [`checkout_with`].
pub fn checkout(
    store: &Store,
    trees: &dyn TreeSource,
    root: Hash,
    dest: &Path,
    mode: CheckoutMode,
    progress: &velo_ingest::Progress,
) -> Result<CheckoutReport, ProjectError> {
    checkout_with(
        store,
        trees,
        root,
        dest,
        CheckoutOptions::new(mode),
        progress,
    )
}

/// Refuses, before anything is written, a tree whose materialisation cannot fit where it
/// would go: more entries than free inodes, or (copying) more bytes than free space. A
/// hostile tree naming one subtree twice per level holds 2^64 paths in 64 levels; its
/// totals (computed once per distinct subtree) saturate and are refused here.
fn fits(
    trees: &dyn TreeSource,
    root: Hash,
    dest: &Path,
    mode: CheckoutMode,
) -> Result<(), ProjectError> {
    let stats = velo_store::treeops::stats(trees, root)?;
    let mut probe = dest;
    let vfs = loop {
        match rustix::fs::statvfs(probe) {
            Ok(vfs) => break Some(vfs),
            Err(_) => match probe.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => probe = parent,
                _ => break rustix::fs::statvfs(".").ok(),
            },
        }
    };
    let Some(vfs) = vfs else {
        return Ok(());
    };
    let inodes = stats
        .dirs
        .saturating_add(stats.symlinks)
        .saturating_add(if mode == CheckoutMode::Hardlink {
            0
        } else {
            stats.files
        })
        .saturating_add(1);
    // File systems without inode accounting (btrfs) report 0 files in total.
    if vfs.f_files > 0 && inodes > vfs.f_favail {
        return Err(ProjectError::Store(velo_store::StoreError::Invalid(format!(
            "the tree holds {} directories, {} files and {} symlinks: more than the {} free inodes of the file system of {}; nothing was written",
            stats.dirs, stats.files, stats.symlinks, vfs.f_favail, probe.display()
        ))));
    }
    let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    if mode == CheckoutMode::Copy && stats.bytes > free {
        return Err(ProjectError::Store(velo_store::StoreError::Invalid(format!(
            "the tree holds {} bytes: more than the {} bytes free on the file system of {}; nothing was written",
            stats.bytes, free, probe.display()
        ))));
    }
    Ok(())
}

/// Materialises tree `root` at `dest`, which must not exist or be an empty directory.
/// Trees come from `trees` (the store, or a manifest's trees); blobs from `store`.
///
/// A hard-linked checkout (and so every cached farm, which runs share) never gives a
/// directory group or other write permission: a world-writable directory of a tree
/// (`var/tmp`, 1777) would let any local user plant files that later runs read. Such a
/// directory gets 1755 there; copy and reflink checkouts, which belong to whoever made
/// them, keep the tree's modes.
pub fn checkout_with(
    store: &Store,
    trees: &dyn TreeSource,
    root: Hash,
    dest: &Path,
    options: CheckoutOptions,
    progress: &velo_ingest::Progress,
) -> Result<CheckoutReport, ProjectError> {
    let started = Instant::now();
    fits(trees, root, dest, options.mode)?;
    let mut created = false;
    // The mode of an existing empty destination, given back if the checkout fails.
    let original_mode = std::fs::symlink_metadata(dest)
        .ok()
        .map(|m| m.permissions());
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ProjectError::NotEmpty(dest.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            // A hard-linked checkout's root is no more writable by others than its
            // directories; a writable checkout's follows the umask like any mkdir.
            let root_mode = match options.mode {
                CheckoutMode::Hardlink => 0o755,
                _ => 0o777,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(root_mode)
                .create(dest)
                .map_err(|source| ProjectError::Dest {
                    op: "creating",
                    path: dest.to_path_buf(),
                    cause: source,
                })?;
            created = true;
        }
        Err(_) => return Err(ProjectError::NotEmpty(dest.to_path_buf())),
    }
    let result = checkout_into(store, trees, root, dest, options, progress);
    if result.is_err() {
        // Leave nothing half-made behind: the destination was new, or empty and as it was.
        if created {
            velo_store::remove_tree(dest);
        } else {
            for entry in std::fs::read_dir(dest).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    velo_store::remove_tree(&path);
                } else {
                    let _ = std::fs::remove_file(&path);
                }
            }
            if let Some(mode) = original_mode {
                let _ = std::fs::set_permissions(dest, mode);
            }
        }
    }
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn checkout_into(
    store: &Store,
    trees: &dyn TreeSource,
    root: Hash,
    dest: &Path,
    options: CheckoutOptions,
    progress: &velo_ingest::Progress,
) -> Result<CheckoutReport, ProjectError> {
    // Blobs a checkout links must not be collected under it.
    let _lock = store.lock_shared()?;
    let batch = store.begin_batch()?;
    let ctx = Ctx {
        progress,
        store,
        batch: &batch,
        trees,
        mode: options.mode,
        preserve_setid: options.preserve_setid,
        farm_modes: options.farm_modes,
        dest,
        cross_device: AtomicBool::new(false),
        files: AtomicU64::new(0),
        dirs: AtomicU64::new(0),
        symlinks: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        linked: AtomicU64::new(0),
        reflinked: AtomicU64::new(0),
        copied: AtomicU64::new(0),
        link_limit: AtomicU64::new(0),
        setid_dropped: AtomicU64::new(0),
        inexact_modes: AtomicU64::new(0),
        xattrs_not_shown: AtomicU64::new(0),
        variants_made: AtomicU64::new(0),
    };
    let fd = rustix::fs::open(
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(|e| ctx.dest_error("opening", b"", e))?;
    velo_store::in_walk_pool(|| ctx.dir(root, fd.as_fd(), Vec::new()))?;
    let report = CheckoutReport {
        files: ctx.files.into_inner(),
        dirs: ctx.dirs.into_inner(),
        symlinks: ctx.symlinks.into_inner(),
        bytes: ctx.bytes.into_inner(),
        linked: ctx.linked.into_inner(),
        reflinked: ctx.reflinked.into_inner(),
        copied: ctx.copied.into_inner(),
        link_limit_fallbacks: ctx.link_limit.into_inner(),
        cross_device: ctx.cross_device.into_inner(),
        setid_dropped: ctx.setid_dropped.into_inner(),
        inexact_modes: ctx.inexact_modes.into_inner(),
        xattrs_not_shown: ctx.xattrs_not_shown.into_inner(),
        variants_made: ctx.variants_made.into_inner(),
        seconds: 0.0,
    };
    if !batch.is_empty() {
        // New executable variants become visible in the store only once durable.
        store.sync()?;
        batch.publish()?;
    }
    Ok(report)
}

use velo_store::treeops::join;

impl Ctx<'_> {
    fn dest_error(&self, op: &'static str, rel: &[u8], e: Errno) -> ProjectError {
        use std::os::unix::ffi::OsStrExt;
        ProjectError::Dest {
            op,
            path: self.dest.join(std::ffi::OsStr::from_bytes(rel)),
            cause: e.into(),
        }
    }

    fn dir(&self, tree: Hash, fd: BorrowedFd<'_>, rel: Vec<u8>) -> Result<(), ProjectError> {
        let depth = if rel.is_empty() {
            1
        } else {
            2 + rel.iter().filter(|&&b| b == b'/').count()
        };
        if depth > velo_core::MAX_DEPTH {
            return Err(ProjectError::Store(velo_store::StoreError::Invalid(format!(
                "the tree nests directories deeper than {} levels (at {}); velo refuses to materialise it",
                velo_core::MAX_DEPTH,
                String::from_utf8_lossy(&rel)
            ))));
        }
        let tree = self.trees.tree(&tree)?;
        let entries = tree.entries();
        entries
            .par_iter()
            .try_for_each(|entry| self.entry(entry, fd, &rel))?;
        Ok(())
    }

    /// Gives `fd` the entry's extended attributes; counts the entry if some could not be
    /// set for want of privilege.
    fn xattrs(&self, entry: &Entry, fd: BorrowedFd<'_>, rel: &[u8]) -> Result<(), ProjectError> {
        let mut refused = false;
        for (name, value) in entry.xattrs.iter() {
            match rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::PERM | Errno::ACCESS | Errno::NOTSUP) => refused = true,
                Err(e) => return Err(self.dest_error("setting extended attributes of", rel, e)),
            }
        }
        if refused {
            self.xattrs_not_shown.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn entry(&self, entry: &Entry, parent: BorrowedFd<'_>, rel: &[u8]) -> Result<(), ProjectError> {
        let name = entry.name.as_bytes();
        let path = join(rel, name);
        match &entry.kind {
            EntryKind::Dir { hash } => {
                rustix::fs::mkdirat(parent, name, FsMode::from_raw_mode(0o700))
                    .map_err(|e| self.dest_error("creating directory", &path, e))?;
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    FsMode::empty(),
                )
                .map_err(|e| self.dest_error("opening", &path, e))?;
                self.dir(*hash, fd.as_fd(), path.clone())?;
                self.xattrs(entry, fd.as_fd(), &path)?;
                // Mode and mtime last: filling the directory would change its mtime, and a
                // read-only mode would stop the filling.
                let bits = match self.mode {
                    CheckoutMode::Hardlink => shown_dir_mode(entry.mode.bits()),
                    _ => entry.mode.bits(),
                };
                rustix::fs::fchmod(&fd, FsMode::from_raw_mode(bits))
                    .map_err(|e| self.dest_error("setting mode of", &path, e))?;
                rustix::fs::futimens(&fd, &timestamps(entry.mtime_ns))
                    .map_err(|e| self.dest_error("setting mtime of", &path, e))?;
                self.dirs.fetch_add(1, Ordering::Relaxed);
            }
            EntryKind::Symlink { target } => {
                rustix::fs::symlinkat(target.as_ref(), parent, name)
                    .map_err(|e| self.dest_error("creating symlink", &path, e))?;
                rustix::fs::utimensat(
                    parent,
                    name,
                    &timestamps(entry.mtime_ns),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| self.dest_error("setting mtime of", &path, e))?;
                self.symlinks.fetch_add(1, Ordering::Relaxed);
            }
            EntryKind::File { hash, size } => {
                self.file(entry, *hash, parent, &path)?;
                self.files.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(*size, Ordering::Relaxed);
                self.progress.files.fetch_add(1, Ordering::Relaxed);
                self.progress.bytes.fetch_add(*size, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn file(
        &self,
        entry: &Entry,
        hash: Hash,
        parent: BorrowedFd<'_>,
        path: &[u8],
    ) -> Result<(), ProjectError> {
        let name = entry.name.as_bytes();
        let form =
            velo_store::BlobForm::in_farm(entry.mode.bits(), entry.mtime_ns, self.farm_modes);
        if self.mode == CheckoutMode::Hardlink && form.mode != entry.mode.bits() & 0o7777 {
            self.inexact_modes.fetch_add(1, Ordering::Relaxed);
        }
        if self.mode == CheckoutMode::Hardlink && !self.cross_device.load(Ordering::Relaxed) {
            // The inode whose mode and mtime are the entry's: the blob's own file, else a
            // variant (made now if the store lacks it).
            let source = match self.store.blob_in_form(&hash, &form)? {
                Some(path) => path,
                None => {
                    let (path, made) = self.batch.stage_variant(&hash, &form)?;
                    if made {
                        self.variants_made.fetch_add(1, Ordering::Relaxed);
                    }
                    path
                }
            };
            match rustix::fs::linkat(CWD, &source, parent, name, AtFlags::empty()) {
                Ok(()) => {
                    self.linked.fetch_add(1, Ordering::Relaxed);
                    if !entry.xattrs.is_empty() {
                        // A shared inode keeps no attributes of one entry.
                        self.xattrs_not_shown.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(Errno::MLINK) => {
                    // Thousands of identical files (often empty) exhaust the inode's link
                    // count; this one gets its own read-only copy.
                    self.link_limit.fetch_add(1, Ordering::Relaxed);
                }
                Err(Errno::XDEV) => {
                    if !self.cross_device.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            store = %self.store.root().display(),
                            dest = %self.dest.display(),
                            "the store is on another file system: hard links are impossible, reflinking or copying instead"
                        );
                    }
                }
                Err(Errno::NOENT) if !source.exists() => {
                    return Err(StoreError::Missing { kind: "blob", hash }.into());
                }
                Err(e) => return Err(self.dest_error("linking", path, e)),
            }
        }
        // An independent file: reflink when possible, else copy; then the tree's metadata
        // (a farm fallback stays read-only like the blob it stands in for).
        let mode_bits = match self.mode {
            CheckoutMode::Hardlink => form.mode,
            _ if entry.mode.bits() & SETID_BITS != 0 && !self.preserve_setid => {
                self.setid_dropped.fetch_add(1, Ordering::Relaxed);
                entry.mode.bits() & !SETID_BITS
            }
            _ => entry.mode.bits(),
        };
        let source = self.store.open_blob(&hash)?;
        let dest: OwnedFd = rustix::fs::openat(
            parent,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            FsMode::from_raw_mode(0o600),
        )
        .map_err(|e| self.dest_error("creating", path, e))?;
        let dest = File::from(dest);
        let reflinked = match (self.mode, rustix::fs::ioctl_ficlone(&dest, &source)) {
            (_, Ok(())) => true,
            (CheckoutMode::Reflink, Err(e)) => {
                return Err(ProjectError::ReflinkUnsupported(
                    self.dest.to_path_buf(),
                    e.into(),
                ));
            }
            (_, Err(_)) => false,
        };
        if reflinked {
            self.reflinked.fetch_add(1, Ordering::Relaxed);
        } else {
            // Only data extents: a sparse blob gives a sparse file.
            velo_store::sparse::copy_sparse(&source, Some(&dest), None).map_err(|e| {
                let (op, cause) = match e {
                    velo_store::sparse::CopyError::Read(e) => ("reading blob for", e),
                    velo_store::sparse::CopyError::Write(e) => ("copying into", e),
                };
                ProjectError::Dest {
                    op,
                    path: self
                        .dest
                        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path)),
                    cause,
                }
            })?;
            self.copied.fetch_add(1, Ordering::Relaxed);
        }
        self.xattrs(entry, dest.as_fd(), path)?;
        rustix::fs::fchmod(&dest, FsMode::from_raw_mode(mode_bits))
            .map_err(|e| self.dest_error("setting mode of", path, e))?;
        rustix::fs::futimens(&dest, &timestamps(entry.mtime_ns))
            .map_err(|e| self.dest_error("setting mtime of", path, e))?;
        Ok(())
    }
}
