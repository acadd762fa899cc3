//! The store's error type: what failed, on which path, and what to do.

use std::io;
use std::path::{Path, PathBuf};

use velo_core::{DecodeError, Hash};

/// Everything that can go wrong in the store. Messages are sentences a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No store exists at the path.
    #[error("no velo store at {0}: run `velo ingest DIR` to create one, or point --store / VR_THE_SOURCE at an existing store")]
    NoStore(PathBuf),
    /// The path exists but is not a store.
    #[error("{0} exists but is not a velo store (no VERSION file); choose an empty or new directory for --store")]
    NotAStore(PathBuf),
    /// A store of another format version.
    #[error("the store at {path} has format version {found}; this velo reads version {supported}. Use a velo release of that version, or start a new store")]
    Version {
        /// The store.
        path: PathBuf,
        /// What VERSION says.
        found: String,
        /// What this build reads.
        supported: u32,
    },
    /// The file system holding the store is full.
    #[error("the file system holding {0} is full (no space or no inodes left): free some space there (if it holds the store, `velo gc --run` frees what no root needs), or write elsewhere")]
    Full(PathBuf),
    /// Any other I/O failure.
    #[error("{op} {path}: {cause}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error (not a `source`: the message already says it).
        cause: io::Error,
    },
    /// An object is missing from the store.
    #[error("{kind} {hash} is missing from the store; run `velo fsck` to see the damage")]
    Missing {
        /// `tree` or `blob`.
        kind: &'static str,
        /// Which one.
        hash: Hash,
    },
    /// An object in the store is damaged.
    #[error("{kind} {hash} in the store is damaged: {detail}; run `velo fsck`")]
    Corrupt {
        /// `tree` or `blob`.
        kind: &'static str,
        /// Which one.
        hash: Hash,
        /// What is wrong.
        detail: String,
    },
    /// A `.velo` file that cannot be read.
    #[error("{path}: {cause}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Why (not a `source`: the message already says it).
        cause: DecodeError,
    },
    /// A ref name that is not allowed.
    #[error("{name:?} is not a valid root name: {why}")]
    BadName {
        /// The rejected name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// A TREE argument that names nothing.
    #[error("{0:?} is neither a root name, a tree hash (or unique prefix of at least 4 hex digits) in this store, nor a .velo file")]
    UnknownTree(String),
    /// A hash prefix matching several trees.
    #[error("{0:?} is ambiguous: it is the prefix of several trees; give more digits")]
    Ambiguous(String),
    /// A path that does not exist inside a tree.
    #[error("{path} does not exist in tree {root}")]
    NoSuchPath {
        /// The path asked for.
        path: String,
        /// The tree.
        root: Hash,
    },
    /// A path that goes through something other than a directory.
    #[error("{path} is not a directory in tree {root}")]
    NotADirectory {
        /// The path asked for.
        path: String,
        /// The tree.
        root: Hash,
    },
    /// An import whose blobs are neither in the manifest nor in the store.
    #[error("{count} blobs ({bytes} bytes) the manifest needs are not in this store: re-export with --with-blobs, or import with --partial to register the trees anyway")]
    MissingBlobs {
        /// How many.
        count: usize,
        /// Their total size.
        bytes: u64,
    },
    /// Something a user asked for that cannot be done.
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Wraps an I/O error with the operation and path, turning ENOSPC/EDQUOT into [`Full`].
    ///
    /// [`Full`]: StoreError::Full
    pub fn io(op: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.as_ref().to_path_buf();
        move |source| {
            if is_no_space(&source) {
                StoreError::Full(path)
            } else {
                StoreError::Io {
                    op,
                    path,
                    cause: source,
                }
            }
        }
    }
}

/// Whether an I/O error means the file system (or quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() || code == rustix::io::Errno::DQUOT.raw_os_error())
}

/// Shorthand.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
