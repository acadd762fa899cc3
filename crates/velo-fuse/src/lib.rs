//! `velo mount`: a tree served read-write as a FUSE file system at a mount point.
//!
//! This crate owns the FUSE server. It reads the tree from the view index (velo-view: the
//! same immutable, mapped file the shim reads, so a lookup is a binary search and no
//! store object is parsed per request), file bytes from the store's blob files, and
//! writes every change copy-on-write into an upper directory in the one upper format
//! (kernel overlayfs: whiteouts, opaque directories) that the shim also writes and
//! velo-project's commit routine reads. It depends on velo-view, velo-core (which extended
//! attributes a tree keeps), fuser and rustix only;
//! velo-cli builds the view, prepares the upper, holds the store's lock, starts the
//! server and commits.
//!
//! The server is the only writer of what it serves, so the kernel may cache names,
//! attributes, listings and file pages for long: every change goes through the kernel,
//! which updates its own caches. [`inodes`] keeps which object each inode number is.
//!
//! A commit while the mount serves ([`Control::quiesce`]) holds off every change until
//! the upper has been read, so it seals one state, never half of a write.
#![deny(missing_docs)]

mod inodes;
mod ops;
mod upper;
mod workspace;

pub use workspace::{BranchLoader, Branches, WorkspaceFs, CONTROL_DIR};

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};
use std::time::Duration;

use inodes::{Namespace, State};
use velo_view::View;

/// What failed to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mount or the session failed.
    #[error("mounting {mountpoint}")]
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The upper directory could not be opened.
    #[error("opening the upper {path}")]
    Upper {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where a tree entry's extended attributes come from: given the hash of the tree object
/// of its directory and its name, the (name, value) pairs the tree records, ascending.
pub type TreeXattrs = dyn Fn(&[u8; 32], &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> + Send + Sync;

/// How long the kernel may keep names and attributes: nothing changes what is served
/// except requests through the kernel, which updates its caches itself.
const TTL: Duration = Duration::from_secs(3600);

/// An open file of the mount: its inode and the file read and written (the blob until
/// it is copied up, then the upper file).
struct Open {
    ino: u64,
    file: Arc<File>,
    /// Opened for writing but not copied up yet: the first change copies it up (whole,
    /// or empty when the change is a truncation to nothing, as `O_TRUNC` sends it).
    pending: bool,
    /// Opened for writing.
    writable: bool,
    /// `file` is the blob of a tree file.
    from_tree: bool,
    /// The kernel reads (and for an upper file, writes) the backing file itself: the
    /// blob when `from_tree`, else the upper file.
    passthrough: bool,
    /// The kernel's handle of the backing file while this lives (shared by every
    /// passthrough open of the inode).
    backing: Option<Arc<fuser::BackingId>>,
}

/// Open files by handle, and upper files kept open by inode.
struct Opens {
    by_handle: HashMap<u64, Open>,
    /// Without passthrough the kernel sends no open or release for files (see
    /// `TreeFs::open`): its reads and writes come with no handle, and are served from
    /// upper files kept open by inode, in the descriptor cache (`FdKey::File`), but for
    /// these: files whose last name went while the kernel still had them (they may be
    /// open, so are kept until the kernel forgets them).
    held: HashMap<u64, Arc<File>>,
    next: u64,
}

/// Fetches blobs the store lacks (a mount with `--remote`): the server asks on a tree
/// file's first read.
pub trait BlobFetcher: Send + Sync {
    /// Makes blob `hash` (`size` bytes, verified) present in the store, once however many
    /// readers ask at the same time; an error is the reader's `EIO`.
    fn fetch(&self, hash: &[u8; 32], size: u64) -> std::io::Result<()>;
}

/// The server of one tree.
pub struct TreeFs {
    ns: Namespace,
    uid: u32,
    gid: u32,
    /// Whether the server runs as root: what it makes is then given to the caller.
    as_root: bool,
    state: Mutex<State>,
    opens: Mutex<Opens>,
    /// Merged listings of upper directories being read, by inode (see `readdir`).
    listings: Mutex<HashMap<u64, Arc<Vec<ops::DirEntry>>>>,
    /// Held shared by every change, exclusively by a commit.
    gate: Arc<RwLock<()>>,
    /// No longer served (a workspace's branch taken away): every change fails.
    retired: Arc<std::sync::atomic::AtomicBool>,
    /// Whether to ask the kernel for passthrough (it needs CAP_SYS_ADMIN).
    want_passthrough: bool,
    /// The kernel agreed to passthrough.
    passthrough: Arc<std::sync::atomic::AtomicBool>,
    /// The most levels of directories a tree holds (the top counts as one).
    max_depth: usize,
    /// How long the kernel may keep the root's attributes and entries (see
    /// [`TreeFs::with_shared_top`]).
    top_ttl: Duration,
    /// How long the kernel may keep every other attribute and entry (see
    /// [`TreeFs::with_shared_tree`]).
    ttl: Duration,
    /// A name the root neither lists nor finds (a workspace's control directory, which
    /// a tree's own entry of that name must not stand in for).
    hidden_top_name: Option<&'static [u8]>,
}

/// The handle of a running server that the CLI keeps: it seals the upper for a commit.
#[derive(Clone)]
pub struct Control {
    gate: Arc<RwLock<()>>,
    passthrough: Arc<std::sync::atomic::AtomicBool>,
    retired: Arc<std::sync::atomic::AtomicBool>,
}

impl Control {
    /// Whether the kernel reads tree files straight from their blobs (passthrough).
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for the changes in flight and holds off new ones while the guard lives.
    pub fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the changes in flight and fails every later one (`ESTALE`): the upper
    /// is no longer the server's to write.
    pub fn retire(&self) {
        let _quiet = self.quiesce();
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TreeFs {
    /// A server of `view`, reading file bytes from the store at `store` and writing
    /// changes to `upper` (`None`: read-only, every change is `EROFS`). Tree files and
    /// directories show `uid`/`gid` as their owner (the user who mounts).
    pub fn new(
        view: View<'static>,
        store: &Path,
        upper: Option<&Path>,
        uid: u32,
        gid: u32,
    ) -> Result<TreeFs, FuseError> {
        let upper = upper
            .map(|path| {
                upper::Upper::open(path).map_err(|source| FuseError::Upper {
                    path: path.to_path_buf(),
                    source,
                })
            })
            .transpose()?;
        let state = State::new(upper.is_some(), 0);
        Ok(TreeFs {
            ns: Namespace {
                view,
                upper,
                blobs: store.join("blobs"),
                fds: inodes::FdCache::new(),
                tree_xattrs: None,
                base: 0,
                host_lower: None,
                fetcher: None,
            },
            uid,
            gid,
            as_root: rustix::process::geteuid().is_root(),
            state: Mutex::new(state),
            listings: Mutex::new(HashMap::new()),
            opens: Mutex::new(Opens {
                by_handle: HashMap::new(),
                held: HashMap::new(),
                next: 1,
            }),
            gate: Arc::new(RwLock::new(())),
            retired: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            want_passthrough: false,
            passthrough: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            max_depth: usize::MAX,
            top_ttl: TTL,
            ttl: TTL,
            hidden_top_name: None,
        })
    }

    /// Serves the extended attributes tree entries record, read through `source`.
    pub fn with_tree_xattrs(mut self, source: Box<TreeXattrs>) -> TreeFs {
        self.ns.tree_xattrs = Some(source);
        self
    }

    /// Asks the kernel to read tree files opened for reading straight from their blobs
    /// (FUSE passthrough, Linux 6.9+, CAP_SYS_ADMIN). The kernel keeps one way of reading
    /// per inode, so while a tree file is open that way, opening it for writing (or
    /// truncating it) fails with ETXTBSY until it is closed.
    pub fn with_passthrough(mut self, wanted: bool) -> TreeFs {
        self.want_passthrough = wanted;
        self
    }

    /// Reads file bytes from host directory `dir` (open, `O_PATH` or not) instead of the
    /// store: the view is a lower index of it (a workspace's `--lower`).
    pub fn with_host_lower(mut self, dir: std::os::fd::OwnedFd) -> TreeFs {
        self.ns.host_lower = Some(dir);
        self
    }

    /// Fetches the blobs the store lacks through `fetcher`, when they are first read.
    pub fn with_fetcher(mut self, fetcher: Arc<dyn BlobFetcher>) -> TreeFs {
        self.ns.fetcher = Some(fetcher);
        self
    }

    /// Refuses directories nested deeper than `levels` (the top counts as one): what a
    /// tree may hold, so that every state of the mount can be committed.
    pub fn with_max_depth(mut self, levels: usize) -> TreeFs {
        self.max_depth = levels;
        self
    }

    /// The kernel keeps nothing of the root's attributes and entries: the mount's top
    /// shows different branches to different processes (a workspace's `bind --pid`), so
    /// each walk through it must ask.
    pub(crate) fn with_shared_top(mut self) -> TreeFs {
        self.top_ttl = Duration::ZERO;
        self
    }

    /// The kernel keeps none of this tree's attributes and entries: a bindable
    /// workspace's branch, whose directories the kernel may know under two numbers (see
    /// [`workspace`]), each with names and attributes of its own that a change through the
    /// other does not update.
    pub(crate) fn with_shared_tree(mut self) -> TreeFs {
        self.top_ttl = Duration::ZERO;
        self.ttl = Duration::ZERO;
        self
    }

    /// The handle the CLI keeps to commit while the server runs.
    pub fn control(&self) -> Control {
        Control {
            gate: self.gate.clone(),
            passthrough: self.passthrough.clone(),
            retired: self.retired.clone(),
        }
    }

    /// This server with its inode numbers in range `slot` (see [`workspace`]), hiding
    /// the control directory's name at its root.
    fn in_slot(mut self, slot: u64) -> TreeFs {
        self.hidden_top_name = Some(workspace::CONTROL_DIR.as_bytes());
        let base = slot << inodes::SLOT_BITS;
        self.ns.base = base;
        self.state = Mutex::new(State::new(self.ns.upper.is_some(), base));
        self
    }
}

/// How to mount.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Let other users in (`allow_other`; needs root or `user_allow_other` in
    /// /etc/fuse.conf).
    pub allow_other: bool,
    /// The mount's source name (`/proc/self/mountinfo`); default `velo`.
    pub source: Option<String>,
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted. Blocks.
pub fn serve(fs: TreeFs, mountpoint: &Path, options: &MountOptions) -> Result<(), FuseError> {
    raise_descriptor_limit();
    let read_only = fs.ns.upper.is_none();
    mount_and_serve(fs, read_only, mountpoint, options)
}

/// Mounts a workspace's server at `mountpoint` and serves it until it is unmounted.
/// Blocks.
pub fn serve_workspace(
    fs: WorkspaceFs,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<(), FuseError> {
    raise_descriptor_limit();
    mount_and_serve(fs, false, mountpoint, options)
}

/// Raises the server's descriptor limit as far as allowed (its caches take a share of
/// it: see `inodes::FdCache`).
fn raise_descriptor_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if limit
        .maximum
        .is_some_and(|max| limit.current.is_some_and(|cur| cur < max))
    {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

fn mount_and_serve(
    fs: impl fuser::Filesystem,
    read_only: bool,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<(), FuseError> {
    // The kernel has applied the caller's umask to every mode it sends; the server's own
    // must not take more away.
    rustix::process::umask(rustix::fs::Mode::empty());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(options.source.clone().unwrap_or_else(|| "velo".into())),
        fuser::MountOption::Subtype("velo".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(4);
    // fuser opens /dev/fuse first, and so does fusermount3 (as the calling user): with
    // the device at 0600 no unprivileged mount can work, so say what to change.
    let device = rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK;
    if !rustix::process::geteuid().is_root() && rustix::fs::access("/dev/fuse", device).is_err() {
        return Err(FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "/dev/fuse is not open to this user: unprivileged FUSE mounts need it \
                 readable and writable by everyone (mode 0666, what Debian's udev rule \
                 sets; as root: chmod 0666 /dev/fuse), or mount as root",
            ),
        });
    }
    fuser::mount2(fs, mountpoint, &config).map_err(|source| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })
}

/// Whether `path` is a FUSE mount (its file system's magic number).
pub fn is_fuse_mount(path: &Path) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == FUSE_SUPER_MAGIC)
}
