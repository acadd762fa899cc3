//! Ingest: turn a directory into a tree in the store.
//!
//! This crate owns the parallel walk, the per-file "store this content once" step
//! (reflink when the file system can, else copy — never a hard link to the source, which
//! a later edit of the source would corrupt), the stat cache, and the summary. It calls
//! `velo-core` and `velo-store`; the CLI calls it.
//!
//! Key decision: **one pass, bottom-up, on rayon.** Each directory is read with its own
//! fd (`openat`/`fstatat` relative to it, no path re-walks); its files and subdirectories
//! are processed in parallel, and its tree is written as soon as its children are known,
//! so memory follows the number of entries, never the number of bytes. A file's bytes are
//! hashed from the same read that copies them, so a blob can never hold other bytes than
//! its name says even if the source changes meanwhile (a change is detected by `fstat`
//! before and after, and the file is read again).
//!
//! On btrfs, where creates and clones serialise on the subvolume's B-tree, the workers
//! only read and hash and one inserter thread makes every new object (inserter.rs).
#![deny(missing_docs)]

mod content;
mod inserter;
mod statcache;
mod walk;
mod xattrs;

pub use xattrs::read_xattrs;

#[cfg(test)]
mod race_tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use velo_core::Hash;
use velo_store::{RootRecord, RootStats, Store, StoreError};

/// What to do with modification times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MtimePolicy {
    /// Record each entry's mtime.
    #[default]
    Keep,
    /// Record 0 for every entry, so trees that differ only in times get one hash.
    Zero,
}

/// How to ingest.
#[derive(Clone, Debug, Default)]
pub struct IngestOptions {
    /// Glob patterns to leave out. A pattern with a `/` matches the path relative to the
    /// ingested directory; one without matches the entry's name at any depth.
    pub excludes: Vec<String>,
    /// mtime handling.
    pub mtime: MtimePolicy,
    /// Register the root under this name (else it is registered unnamed).
    pub name: Option<String>,
    /// Ignore the stat cache and read every file.
    pub no_cache: bool,
    /// Skip the final `syncfs` (faster, but a power loss may lose the newest objects).
    pub no_sync: bool,
    /// Leave out files and directories this user may not read (listed in the report's
    /// skipped entries) instead of failing the whole ingest.
    pub skip_unreadable: bool,
    /// Register no root: the caller holds the store's shared lock until it has made and
    /// registered what it needs the tree for (a workspace sealing its host lower).
    pub no_register: bool,
}

/// Counters a progress display can poll while an ingest runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Files done.
    pub files: AtomicU64,
    /// Bytes of files done.
    pub bytes: AtomicU64,
}

/// An entry that was not ingested.
#[derive(Clone, Debug)]
pub struct Skipped {
    /// Path relative to the ingested directory.
    pub path: String,
    /// Why: `socket`, `fifo`, `block device`, `character device`, `excluded`,
    /// `the velo store itself`, [`UNREADABLE`].
    pub reason: &'static str,
}

/// The reason [`Skipped`] gives for what `skip_unreadable` left out.
pub const UNREADABLE: &str = "unreadable (permission denied)";

/// The summary of an ingest.
#[derive(Clone, Debug)]
pub struct IngestReport {
    /// The root tree.
    pub root: Hash,
    /// Files, directories, symlinks and logical bytes of the tree.
    pub stats: RootStats,
    /// Blobs the store did not have before.
    pub new_blobs: u64,
    /// Bytes of those blobs.
    pub new_bytes: u64,
    /// Files whose hash came from the stat cache without reading them.
    pub cached_files: u64,
    /// Whether new blobs were reflinked rather than copied.
    pub reflinked: bool,
    /// Entries left out, with the reason.
    pub skipped: Vec<Skipped>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Why an ingest failed. Nothing is registered when it does.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store failed (full disk, damaged store, …).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the source failed.
    #[error("{op} {path}: {cause}")]
    Source {
        /// What was being done.
        op: &'static str,
        /// Which path.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The source is not a directory.
    #[error("{0} is not a directory: velo ingest takes a directory")]
    NotADirectory(PathBuf),
    /// A file kept changing while it was read.
    #[error("{0} changed while it was being read (three times in a row); ingest it again when it is quiet")]
    Changed(PathBuf),
    /// A bad `--exclude` pattern.
    #[error("--exclude {pattern:?}: {message}")]
    BadExclude {
        /// The pattern.
        pattern: String,
        /// Why.
        message: String,
    },
    /// The walk stopped because storing a blob failed; that failure is reported instead,
    /// so callers never see this variant.
    #[error("ingest stopped after an earlier error")]
    Aborted,
    /// A name from the file system that a tree cannot hold.
    #[error("{path}: {message}")]
    BadEntry {
        /// Which path.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Ingests `dir` into `store`: stores every content once, writes the trees, registers the
/// root. The source is only read.
pub fn ingest(
    store: &Store,
    dir: &Path,
    options: &IngestOptions,
    progress: &Progress,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    if let Some(name) = &options.name {
        velo_store::validate_root_name(name)?;
    }
    let source = std::fs::canonicalize(dir).map_err(|source| IngestError::Source {
        op: "cannot open",
        path: dir.to_path_buf(),
        cause: source,
    })?;
    if !source.is_dir() {
        return Err(IngestError::NotADirectory(dir.to_path_buf()));
    }
    let _lock = store.lock_shared()?;
    let batch = store.begin_batch()?;
    let walked = walk::run(store, &batch, &source, options, progress)?;
    let walk_seconds = started.elapsed().as_secs_f64();
    if walked.new_blobs > 0 || walked.new_trees > 0 {
        // Objects become visible only once their bytes are durable: flush, then publish.
        if options.no_sync {
            tracing::debug!("skipping syncfs (--no-sync)");
        } else {
            store.sync()?;
        }
    }
    let sync_seconds = started.elapsed().as_secs_f64() - walk_seconds;
    batch.publish()?;
    tracing::debug!(
        walk_seconds,
        sync_seconds,
        publish_seconds = started.elapsed().as_secs_f64() - walk_seconds - sync_seconds,
        "ingest phases"
    );
    if !options.no_register {
        store.register_root(&RootRecord {
            name: options.name.clone(),
            root: walked.root.to_hex(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            stats: walked.stats,
            partial: false,
            source: Some(source.display().to_string()),
        })?;
    }
    walked.save_cache(store);
    Ok(IngestReport {
        root: walked.root,
        stats: walked.stats,
        new_blobs: walked.new_blobs,
        new_bytes: walked.new_bytes,
        cached_files: walked.cached_files,
        reflinked: walked.reflinked,
        skipped: walked.skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Stores the content of an open regular file (copying it; it is only read) into
/// `batch` and returns its blob hash and size; `path` names it in messages. The caller
/// holds the store's shared lock, and flushes and publishes the batch. Used by commits of
/// overlay uppers, which open each file relative to its directory's descriptor, without
/// following links.
pub fn store_open_file(
    store: &Store,
    batch: &velo_store::Batch<'_>,
    file: &std::fs::File,
    path: &Path,
) -> Result<(Hash, u64), IngestError> {
    let read_error = |source| IngestError::Source {
        op: "cannot read",
        path: path.to_path_buf(),
        cause: source,
    };
    let stat = rustix::fs::fstat(file).map_err(|e| read_error(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(read_error(std::io::Error::other(
            "not a regular file (it changed while it was being read)",
        )));
    }
    let copy_error = |e| match e {
        velo_store::sparse::CopyError::Read(e) => read_error(e),
        velo_store::sparse::CopyError::Write(e) => IngestError::Store(StoreError::io(
            "writing a blob into",
            store.root().join("tmp"),
        )(e)),
    };
    // Hashed first, and copied only if the store lacks the content: a file copied up
    // unchanged (a chmod in a sandbox, a touch through FUSE) costs a read, not a write.
    // Holes stay holes either way: a `truncate -s 1T` inside a run must not fill the disk.
    let mut hasher = blake3::Hasher::new();
    let size =
        velo_store::sparse::copy_sparse(file, None, Some(&mut hasher)).map_err(copy_error)?;
    let hash = Hash::from(hasher.finalize());
    if store.has_blob(&hash) {
        return Ok((hash, size));
    }
    let mut staged = store.stage()?;
    let mut hasher = blake3::Hasher::new();
    let size = velo_store::sparse::copy_sparse(file, Some(staged.file()), Some(&mut hasher))
        .map_err(copy_error)?;
    // What is stored is what this second pass read (a live upper may change in between).
    let hash = Hash::from(hasher.finalize());
    if !store.has_blob(&hash) {
        batch.insert_staged_blob(
            staged,
            &hash,
            Some(content::form_of(&stat, MtimePolicy::Keep)),
        )?;
    }
    Ok((hash, size))
}
