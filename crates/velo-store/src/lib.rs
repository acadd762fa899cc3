//! The on-disk content-addressable store of Velo Rift.
//!
//! This crate owns the store directory: its layout and `VERSION`, blob and tree objects,
//! registered roots (`refs/roots`), the store lock, sessions of runs, and the maintenance
//! commands built on them (`gc`, `fsck` and `fsck --repair`, `status`, `.velo` export and
//! import with its cache), plus the shared pieces other crates lean on: the tree walks and
//! diff (`treeops`), sparse copies, the one atomic small-file write and the walk pool. It
//! calls only `velo-core`, `velo-view` (to check the shim's view files) and the OS; the
//! ingest, projection and CLI crates call it.
//!
//! Key decision: **safety from the file system, not from a daemon.** Every object is
//! written to an anonymous (`O_TMPFILE`) or temporary file in `tmp/` and appears under its
//! hash only when complete and flushed (a batch published after one `syncfs`, or a single
//! fdatasynced object linked into place), so a name always means complete bytes and a
//! `kill -9` leaves nothing half-written under an object name. Writers (ingest, import, commit) hold
//! a shared `flock` on `lock` from their first object to their root's registration; `gc`
//! sweeps only under the exclusive lock, so it can never delete an object that a running
//! writer has found in the store and is about to reference. See docs/ARCHITECTURE.md.
#![deny(missing_docs)]

mod batch;
mod error;
mod farmcheck;
mod fsck;
mod gc;
mod import_cache;
mod objects;
mod perms;
mod pins;
mod refs;
mod repair;
mod sessions;
pub mod sparse;
mod status;
mod transfer;
pub mod treeops;
pub mod views;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};

use rustix::fs::{Mode as FsMode, OFlags};

pub use batch::Batch;
pub use error::{is_no_space, Result, StoreError};
pub use fsck::{FsckOptions, FsckReport, Problem};
pub use gc::GcReport;
pub use objects::{BlobForm, FarmModes, Staged};
pub use pins::Pin;
pub use refs::{validate_root_name, DamagedRecord, RootRecord, RootStats};
pub use repair::{MissingObject, ModeFixed, NeededBy, Quarantined, RepairReport};
pub use sessions::Session;
pub use status::StatusReport;
pub use transfer::{first_forms, ExportReport, ImportOptions, ImportReport, RememberedImport};

/// The store format this build reads and writes.
pub const STORE_FORMAT_VERSION: u32 = 1;

/// An open store. Cheap to share between threads (`&Store` is all the API needs).
pub struct Store {
    root: PathBuf,
    id: String,
    blobs_dir: OwnedFd,
    trees_dir: OwnedFd,
    tmp_dir: OwnedFd,
    tmpfile_supported: AtomicBool,
    temp_counter: AtomicU64,
    reflinks: std::sync::OnceLock<bool>,
}

/// A held store lock; released on drop (or when the process dies).
pub struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// Keeps the lock in the program this process `exec`s (and its children): gc waits
    /// until they have all exited. The lock is on the open file description, so it lasts
    /// as long as any process holds it.
    pub fn keep_across_exec(&self) -> Result<()> {
        rustix::io::fcntl_setfd(&self._file, rustix::io::FdFlags::empty())
            .map_err(|e| StoreError::io("keeping the store lock across exec", "lock")(e.into()))
    }
}

const SUBDIRS: [&str; 6] = ["blobs", "trees", "refs", "refs/roots", "tmp", "cache"];

impl Store {
    /// Opens an existing store; fails clearly if there is none or it has another version.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        // Absolute: the paths velo hands to other processes (the shim's environment, the
        // sandbox's mounts) must not depend on a working directory that changes.
        let root =
            std::path::absolute(root.as_ref()).unwrap_or_else(|_| root.as_ref().to_path_buf());
        let version_path = root.join("VERSION");
        let text = match fs::read_to_string(&version_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = fs::read_dir(&root).map(|mut d| d.next().is_none());
                return Err(match empty {
                    Err(_) | Ok(true) => StoreError::NoStore(root),
                    Ok(false) => StoreError::NotAStore(root),
                });
            }
            Err(e) => return Err(StoreError::io("reading", &version_path)(e)),
        };
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("");
        let found = header.strip_prefix("velo-store ").unwrap_or(header).trim();
        if found != STORE_FORMAT_VERSION.to_string() {
            return Err(StoreError::Version {
                path: root,
                found: found.chars().take(40).collect(),
                supported: STORE_FORMAT_VERSION,
            });
        }
        let id = lines
            .find_map(|l| l.strip_prefix("id "))
            .unwrap_or("")
            .trim()
            .to_string();
        let open_dir = |name: &str| -> Result<OwnedFd> {
            let path = root.join(name);
            rustix::fs::open(
                &path,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                FsMode::empty(),
            )
            .map_err(|e| StoreError::io("opening store directory", &path)(e.into()))
        };
        Ok(Store {
            blobs_dir: open_dir("blobs")?,
            trees_dir: open_dir("trees")?,
            tmp_dir: open_dir("tmp")?,
            root,
            id,
            tmpfile_supported: AtomicBool::new(true),
            temp_counter: AtomicU64::new(0),
            reflinks: std::sync::OnceLock::new(),
        })
    }

    /// Opens the store at `root`, creating it (and its parents) if it does not exist yet.
    /// Shard directories are created lazily, on first use.
    pub fn open_or_create(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref();
        if root.join("VERSION").exists() {
            let store = Store::open(root)?;
            store.secure_private_dirs();
            return Ok(store);
        }
        // Never writable by group or others, whatever the umask (see perms.rs).
        let dir_builder = |recursive| {
            let mut b = fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(b.recursive(recursive), 0o755);
            b
        };
        dir_builder(true)
            .create(root)
            .map_err(StoreError::io("creating store directory", root))?;
        // Another command may be creating the store right now, or one was killed half-way:
        // a directory holding nothing but store entries is finished, anything else refused.
        for entry in fs::read_dir(root).map_err(StoreError::io("reading", root))? {
            let name = entry.map_err(StoreError::io("reading", root))?.file_name();
            let name = name.to_string_lossy();
            let ours = SUBDIRS.contains(&name.as_ref())
                || [
                    "lock",
                    "VERSION",
                    "farms",
                    "sessions",
                    "views",
                    "gc-generation",
                ]
                .contains(&name.as_ref())
                || (name.starts_with("VERSION.") && name.ends_with(".new"));
            if !ours {
                return Err(StoreError::NotAStore(root.to_path_buf()));
            }
        }
        for dir in SUBDIRS {
            let path = root.join(dir);
            match dir_builder(false).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("creating", &path)(e)),
            }
        }
        let mut random = [0u8; 16];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .map_err(StoreError::io("reading", "/dev/urandom"))?;
        let id: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let staged = root.join(format!("VERSION.{}.new", std::process::id()));
        let text = format!("velo-store {STORE_FORMAT_VERSION}\nid {id}\n");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&staged)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        };
        write().map_err(StoreError::io("writing", &staged))?;
        // link(2), not rename: when two commands create the store at once, the first wins
        // and both then read the same id.
        let linked = fs::hard_link(&staged, root.join("VERSION"));
        let _ = fs::remove_file(&staged);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io("creating", root.join("VERSION"))(e)),
        }
        sync_dir(root);
        tracing::info!(store = %root.display(), "created a new store");
        let store = Store::open(root)?;
        store.secure_private_dirs();
        Ok(store)
    }

    /// The mtime the store's file system keeps when `mtime_ns` is set: the same, or the
    /// nearest it can hold (ext4 clamps to 1901..2446, and 128-byte inodes to 1901..2038;
    /// sub-second parts may be cut). Asked of an unnamed temp file; `mtime_ns` when it
    /// cannot be asked. Checks of what a variant or farm shows compare against this.
    pub fn representable_mtime(&self, mtime_ns: i64) -> i64 {
        let Ok(probe) = rustix::fs::openat(
            &self.tmp_dir,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            FsMode::from_raw_mode(0o600),
        ) else {
            return mtime_ns;
        };
        let form = BlobForm {
            mode: 0o600,
            mtime_ns,
        };
        if rustix::fs::futimens(&probe, &form.timestamps()).is_err() {
            return mtime_ns;
        }
        rustix::fs::fstat(&probe).map_or(mtime_ns, |st| BlobForm::of_stat(&st).mtime_ns)
    }

    /// Whether the store's file system clones files (`FICLONE`: btrfs, xfs with
    /// reflink), so a variant costs an inode, not a copy of the bytes. Tried once per
    /// process, on two unnamed temp files.
    pub fn reflinks(&self) -> bool {
        *self.reflinks.get_or_init(|| {
            let temp = || {
                rustix::fs::openat(
                    &self.tmp_dir,
                    ".",
                    OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
                    FsMode::from_raw_mode(0o600),
                )
            };
            let (Ok(source), Ok(dest)) = (temp(), temp()) else {
                return false;
            };
            rustix::io::write(&source, b"probe").is_ok()
                && rustix::fs::ioctl_ficlone(&dest, &source).is_ok()
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A random id fixed when the store was created: caches keyed by it die with the store.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where caches private to this store live.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Takes the shared lock that every writer holds while it inserts and registers.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock(false)
    }

    /// Takes the exclusive lock gc holds while it sweeps; waits for running writers.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock(true)
    }

    /// Whether another velo process holds the store's lock now (a run, a mount, an
    /// ingest): an exclusive lock (gc, repair) would wait for it.
    pub fn in_use(&self) -> bool {
        let Ok(file) = File::open(self.root.join("lock")) else {
            return false;
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
    }

    fn lock(&self, exclusive: bool) -> Result<StoreLock> {
        use rustix::fs::FlockOperation as Op;
        let path = self.root.join("lock");
        // flock needs no write access: a user who may only read the store (another
        // user's fsck, checkout, ls) locks through a read-only descriptor.
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                    File::open(&path)
                }
                _ => Err(e),
            })
            .map_err(StoreError::io("opening lock file", &path))?;
        let (try_op, wait_op) = if exclusive {
            (Op::NonBlockingLockExclusive, Op::LockExclusive)
        } else {
            (Op::NonBlockingLockShared, Op::LockShared)
        };
        if rustix::fs::flock(&file, try_op).is_err() {
            tracing::info!("waiting for other velo commands on this store to finish");
            rustix::fs::flock(&file, wait_op)
                .map_err(|e| StoreError::io("locking", &path)(e.into()))?;
        }
        Ok(StoreLock { _file: file })
    }

    /// Flushes everything written to the store's file system to stable storage. Called
    /// once before a root is registered, instead of one fsync per object.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(&self.blobs_dir)
            .map_err(|e| StoreError::io("syncing", &self.root)(e.into()))
    }

    /// The number of `gc --run` passes that deleted something: caches that remember
    /// "this blob is in the store" must re-check when it changes.
    pub fn gc_generation(&self) -> u64 {
        fs::read_to_string(self.root.join("gc-generation"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// fsyncs a directory so a rename or link inside it is durable; failures only weaken
/// durability, never correctness, so they are logged, not raised.
pub(crate) fn sync_dir(path: &Path) {
    if let Err(e) = File::open(path).and_then(|d| d.sync_all()) {
        tracing::warn!(path = %path.display(), error = %e, "fsync of directory failed");
    }
}

/// Runs `work` on the thread pool of the parallel walks (ingest, checkout): threads with
/// stacks large enough for a walk that recurses once per level down to
/// [`velo_core::MAX_DEPTH`] (rayon's default 2 MiB overflowed at about 3,000 levels, and a
/// parallel iterator over one entry runs on the caller's own thread: the walk must start
/// inside the pool). The stacks are reserved address space; only what a walk touches is
/// memory. The pool is made on first use, not at start-up: a `velo run` on cached farms
/// must stay single-threaded (see velo-project's sandbox).
pub fn in_walk_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .stack_size(256 << 20)
            .thread_name(|i| format!("velo-walk-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// How much a small file replaced with [`replace_file`] must survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// A record of the store (a root, the gc generation): flushed, file and directory,
    /// before the call returns; a power cut leaves the old or the new version.
    Durable,
    /// A cache: the old or the new version, or none after a power cut; never flushed.
    Cache,
}

/// Replaces `target` with `bytes` atomically: written to a new file (created exclusively,
/// never through a link, under an unpredictable name) in `staging_dir`, which must be on
/// the same file system, then renamed over `target`. The one small-file write of the store
/// (root records, the gc generation, the stat and import caches).
pub fn replace_file(
    target: &Path,
    staging_dir: &Path,
    bytes: &[u8],
    durability: Durability,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let stem = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staged = staging_dir.join(format!(
        ".{stem}.{}.{:016x}.new",
        std::process::id(),
        transfer::unpredictable()
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(&staged)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            if durability == Durability::Durable {
                file.sync_all()?;
            }
            Ok(())
        })
        .and_then(|()| fs::rename(&staged, target));
    if written.is_err() {
        let _ = fs::remove_file(&staged);
    }
    written?;
    if durability == Durability::Durable {
        if let Some(dir) = target.parent() {
            sync_dir(dir);
        }
    }
    Ok(())
}

/// `path` made absolute with its longest existing ancestor resolved (symlinks, `..`): where
/// it is, or would be once made.
pub fn resolve_existing(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    absolute
        .ancestors()
        .find_map(|a| {
            let rest = absolute.strip_prefix(a).ok()?;
            Some(fs::canonicalize(a).ok()?.join(rest))
        })
        .unwrap_or(absolute)
}

/// Whether a file at `path` (existing or about to be written) would be inside `dir`: both
/// resolved, `path` by its nearest existing parent directory.
pub fn path_is_inside(path: &Path, dir: &Path) -> bool {
    let absolute = std::path::absolute(path).unwrap_or(path.to_path_buf());
    // The nearest existing directory above: what a path about to be made would be in.
    let mut existing = absolute.parent().unwrap_or(Path::new("/"));
    while fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(up) => existing = up,
            None => break,
        }
    }
    match (fs::canonicalize(existing), fs::canonicalize(dir)) {
        (Ok(parent), Ok(dir)) => parent.starts_with(dir),
        _ => false,
    }
}

/// Nanoseconds since the epoch: part of the names of sessions and pins.
pub(crate) fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Removes a file, or a directory tree that may hold read-only directories (farms, checkouts,
/// overlay work directories): directories are made writable first. Symlinks are never
/// followed. Failures are logged, not raised: callers use it to clean up.
pub fn remove_tree(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) {
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove");
        }
        return;
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !fs::symlink_metadata(&dir)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            continue;
        }
        // Through a descriptor opened without following a link: a directory swapped for a
        // symlink meanwhile must not lead to a chmod elsewhere.
        match rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FsMode::empty(),
        ) {
            Ok(fd) => {
                let _ = rustix::fs::fchmod(&fd, FsMode::from_raw_mode(0o700));
            }
            // Mode 000 (an overlay's work/work): not even openable by its owner. By path,
            // since lstat said a directory just above.
            Err(rustix::io::Errno::ACCESS) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
            }
            Err(_) => {}
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
    }
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove"),
    }
}
