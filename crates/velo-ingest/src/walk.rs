//! The parallel, bottom-up directory walk.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use rustix::fs::{AtFlags, Dir, FileType, Mode as FsMode, OFlags, Stat};
use velo_core::{Entry, EntryKind, Hash, Mode, Name, Tree};
use velo_store::{Batch, RootStats, Store};

use crate::inserter::{Inserter, Job};
use crate::statcache::{Cached, StatCache};
use crate::{IngestError, IngestOptions, MtimePolicy, Progress, Skipped};

/// What the walk produced.
pub(crate) struct Walked {
    pub root: Hash,
    pub stats: RootStats,
    pub new_blobs: u64,
    pub new_bytes: u64,
    pub new_trees: u64,
    pub cached_files: u64,
    pub reflinked: bool,
    pub skipped: Vec<Skipped>,
    cache: StatCache,
    observed: HashMap<(u64, u64), Cached>,
    cache_changed: bool,
}

impl Walked {
    /// Writes the stat cache if anything in it changed.
    pub fn save_cache(&self, store: &Store) {
        if self.cache_changed
            || self.cache.verify_hits
            || self.cache.shards_changed()
            || self.observed.len() != self.cache.entries.len()
        {
            self.cache.save(store, &self.observed);
        }
    }
}

pub(crate) struct Ctx<'a> {
    pub store: &'a Store,
    /// New objects are staged here and published after the flush (see velo-store's batch).
    pub batch: &'a Batch<'a>,
    pub options: &'a IngestOptions,
    pub progress: &'a Progress,
    source: &'a Path,
    exclude_paths: GlobSet,
    exclude_names: GlobSet,
    pub cache: StatCache,
    pub observed: Mutex<HashMap<(u64, u64), Cached>>,
    pub cache_changed: AtomicBool,
    /// Files changed at or after this time (ns) are not cached: see statcache.rs.
    pub racy_after_ns: i64,
    known: Vec<Mutex<HashSet<Hash>>>,
    pub reflink_works: AtomicBool,
    pub reflinked: AtomicBool,
    pub new_blobs: AtomicU64,
    pub new_bytes: AtomicU64,
    new_trees: AtomicU64,
    pub cached_files: AtomicU64,
    skipped: Mutex<Vec<Skipped>>,
    /// (dev, ino) of the store's root: never ingest the store into itself.
    store_dir: Option<(u64, u64)>,
    /// The store held no blob when the ingest began: asking the file system whether a
    /// blob exists is then wasted work (what this run stored, it remembers; a blob a
    /// concurrent ingest stored meanwhile is merely written twice and linked once).
    pub store_was_empty: bool,
    /// Where new small blobs go when one thread makes them all (see inserter.rs).
    pub inserter: Option<&'a Inserter>,
}

/// `statfs` magic of btrfs: one B-tree per subvolume, so inserts serialise.
const BTRFS_MAGIC: i64 = 0x9123_683e;

/// Whether one inserter thread should make the blobs. `VELO_INGEST_PIPELINE=0|1` forces
/// the choice (for benchmarks); otherwise only btrfs uses it.
fn pipeline_inserts(store: &Store) -> bool {
    match std::env::var("VELO_INGEST_PIPELINE").as_deref() {
        Ok("1") => return true,
        Ok("0") => return false,
        _ => {}
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    rustix::fs::statfs(store.root()).is_ok_and(|fs| fs.f_type as i64 == BTRFS_MAGIC)
}

pub(crate) fn run<'a>(
    store: &'a Store,
    batch: &'a Batch<'a>,
    source: &'a Path,
    options: &'a IngestOptions,
    progress: &'a Progress,
) -> Result<Walked, IngestError> {
    let (exclude_paths, exclude_names) = build_excludes(&options.excludes)?;
    let mut cache = StatCache::load(store, source);
    if options.no_cache {
        // Every file is read; what is learnt is saved for the next run as usual.
        cache.entries.clear();
    }
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let inserter = pipeline_inserts(store).then(Inserter::new);
    let ctx = Ctx {
        store,
        batch,
        options,
        progress,
        source,
        exclude_paths,
        exclude_names,
        observed: Mutex::new(HashMap::with_capacity(cache.entries.len())),
        cache,
        cache_changed: AtomicBool::new(false),
        racy_after_ns: now_ns - 2_000_000_000,
        known: (0..64).map(|_| Mutex::new(HashSet::new())).collect(),
        reflink_works: AtomicBool::new(true),
        reflinked: AtomicBool::new(false),
        new_blobs: AtomicU64::new(0),
        new_bytes: AtomicU64::new(0),
        new_trees: AtomicU64::new(0),
        cached_files: AtomicU64::new(0),
        skipped: Mutex::new(Vec::new()),
        store_dir: rustix::fs::stat(store.root())
            .ok()
            .map(|st| (st.st_dev, st.st_ino)),
        store_was_empty: std::fs::read_dir(store.root().join("blobs"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(false),
        inserter: inserter.as_ref(),
    };
    // The walk recurses once per level: it runs in the walk pool, whose stacks hold that.
    let walked = velo_store::in_walk_pool(|| {
        std::thread::scope(|scope| {
            let drainer = ctx.inserter.map(|inserter| {
                let reflink_works = &ctx.reflink_works;
                scope.spawn(move || inserter.drain(batch, reflink_works))
            });
            // Closes the queue however the walk ends, a panic included, so the scope's join of
            // the inserter cannot wait forever.
            let _closer = ctx.inserter.map(Inserter::closer);
            let walked = rustix::fs::open(
                source,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                FsMode::empty(),
            )
            .map_err(|e| ctx.source_error("cannot open directory", b"", e))
            .and_then(|fd| ctx.dir(fd, Vec::new()));
            if let Some(inserter) = ctx.inserter {
                if walked.is_err() {
                    // The ingest fails anyway: skip what is still queued.
                    inserter.failed.store(true, Ordering::Relaxed);
                }
                inserter.close();
            }
            if let Some(drainer) = drainer {
                if let Err(panic) = drainer.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            walked
        })
    });
    if let Some(error) = inserter.as_ref().and_then(Inserter::take_error) {
        return Err(error.into());
    }
    let (root, stats) = walked?;
    if let Some(inserter) = &inserter {
        ctx.new_blobs.fetch_add(
            inserter.new_blobs.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        ctx.new_bytes.fetch_add(
            inserter.new_bytes.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        ctx.new_trees.fetch_add(
            inserter.new_trees.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if inserter.reflinked.load(Ordering::Relaxed) {
            ctx.reflinked.store(true, Ordering::Relaxed);
        }
    }
    let mut skipped = ctx.skipped.into_inner().expect("no panics hold this lock");
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Walked {
        root,
        stats,
        new_blobs: ctx.new_blobs.into_inner(),
        new_bytes: ctx.new_bytes.into_inner(),
        new_trees: ctx.new_trees.into_inner(),
        cached_files: ctx.cached_files.into_inner(),
        reflinked: ctx.reflinked.into_inner(),
        skipped,
        cache: ctx.cache,
        observed: ctx.observed.into_inner().expect("no panics hold this lock"),
        cache_changed: ctx.cache_changed.into_inner(),
    })
}

fn build_excludes(patterns: &[String]) -> Result<(GlobSet, GlobSet), IngestError> {
    let mut paths = GlobSetBuilder::new();
    let mut names = GlobSetBuilder::new();
    for pattern in patterns {
        let trimmed = pattern.trim_end_matches('/');
        let glob = GlobBuilder::new(trimmed)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| IngestError::BadExclude {
                pattern: pattern.clone(),
                message: e.kind().to_string(),
            })?;
        if trimmed.contains('/') {
            paths.add(glob);
        } else {
            names.add(glob);
        }
    }
    let build = |b: GlobSetBuilder| {
        b.build().map_err(|e| IngestError::BadExclude {
            pattern: patterns.join(" "),
            message: e.to_string(),
        })
    };
    Ok((build(paths)?, build(names)?))
}

use crate::UNREADABLE;

pub(crate) use velo_store::treeops::join;

// The casts are no-ops on x86_64 but not on every target's `struct stat`.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn mtime_ns(st: &Stat) -> i64 {
    velo_core::time_ns(st.st_mtime as i64, st.st_mtime_nsec as i64)
}

#[allow(clippy::unnecessary_cast)]
pub(crate) fn ctime_ns(st: &Stat) -> i64 {
    velo_core::time_ns(st.st_ctime as i64, st.st_ctime_nsec as i64)
}

impl Ctx<'_> {
    pub(crate) fn path_of(&self, rel: &[u8]) -> PathBuf {
        self.source.join(OsStr::from_bytes(rel))
    }

    /// Whether `error` is a permission refusal that `--skip-unreadable` turns into a skip
    /// (recorded here); false leaves it an error.
    fn skipped_unreadable(&self, rel: &[u8], error: &IngestError) -> bool {
        let denied = matches!(error, IngestError::Source { cause, .. }
            if cause.kind() == std::io::ErrorKind::PermissionDenied);
        if denied && self.options.skip_unreadable {
            self.skip(rel, UNREADABLE);
            return true;
        }
        false
    }

    pub(crate) fn source_error(
        &self,
        op: &'static str,
        rel: &[u8],
        e: rustix::io::Errno,
    ) -> IngestError {
        IngestError::Source {
            op,
            path: self.path_of(rel),
            cause: e.into(),
        }
    }

    fn excluded(&self, rel: &[u8], name: &[u8]) -> bool {
        (!self.exclude_names.is_empty()
            && self
                .exclude_names
                .is_match(Path::new(OsStr::from_bytes(name))))
            || (!self.exclude_paths.is_empty()
                && self
                    .exclude_paths
                    .is_match(Path::new(OsStr::from_bytes(rel))))
    }

    fn skip(&self, rel: &[u8], reason: &'static str) {
        if reason == "the velo store itself" {
            tracing::warn!(path = ?self.path_of(rel), "skipping the velo store inside the ingested directory");
        } else if reason == UNREADABLE {
            tracing::warn!(path = ?self.path_of(rel), "skipping what this user cannot read (--skip-unreadable)");
        } else if reason != "excluded" {
            tracing::warn!(path = ?self.path_of(rel), "skipping a {reason}: trees hold only files, directories and symlinks");
        }
        self.skipped
            .lock()
            .expect("no panics hold this lock")
            .push(Skipped {
                path: String::from_utf8_lossy(rel).into_owned(),
                reason,
            });
    }

    /// Records that the store holds `hash`; returns false if this run already knew.
    pub(crate) fn learn(&self, hash: &Hash) -> bool {
        self.known[usize::from(hash.0[0]) & 63]
            .lock()
            .expect("no panics hold this lock")
            .insert(*hash)
    }

    pub(crate) fn knows(&self, hash: &Hash) -> bool {
        self.known[usize::from(hash.0[0]) & 63]
            .lock()
            .expect("no panics hold this lock")
            .contains(hash)
    }

    fn mtime(&self, st: &Stat, rel: &[u8]) -> i64 {
        match self.options.mtime {
            MtimePolicy::Keep => {
                let ns = mtime_ns(st);
                // A tree records nanoseconds in an i64: 1677-09-21 to 2262-04-11.
                #[allow(clippy::unnecessary_cast)]
                let secs = st.st_mtime as i64;
                if !velo_core::time_ns_is_exact(secs, st.st_mtime_nsec as i64) {
                    tracing::warn!(
                        path = ?self.path_of(rel),
                        "mtime outside 1677..2262 cannot be recorded in nanoseconds; stored as the nearest representable time"
                    );
                }
                ns
            }
            MtimePolicy::Zero => 0,
        }
    }

    fn entry(
        &self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        name: &[u8],
        st: &Stat,
        kind: EntryKind,
    ) -> Result<Entry, IngestError> {
        // Linux allows no user attribute on a symlink: nothing to ask.
        let xattrs = match kind {
            EntryKind::Symlink { .. } => velo_core::Xattrs::default(),
            _ => crate::read_xattrs(dir, name).map_err(|e| IngestError::BadEntry {
                path: self.path_of(rel),
                message: format!("reading its extended attributes: {e}"),
            })?,
        };
        Ok(Entry {
            xattrs,
            name: Name::new(name).map_err(|e| IngestError::BadEntry {
                path: self.path_of(rel),
                message: e.to_string(),
            })?,
            mode: Mode::from_st_mode(st.st_mode),
            mtime_ns: self.mtime(st, rel),
            kind,
        })
    }

    /// Ingests one directory (given as an open fd) and returns its tree hash.
    fn dir(&self, fd: OwnedFd, rel: Vec<u8>) -> Result<(Hash, RootStats), IngestError> {
        let depth = if rel.is_empty() {
            1
        } else {
            2 + rel.iter().filter(|&&b| b == b'/').count()
        };
        if depth > velo_core::MAX_DEPTH {
            return Err(IngestError::BadEntry {
                path: self.path_of(&rel),
                message: format!(
                    "directories nest deeper than {} levels, more than a velo tree may hold",
                    velo_core::MAX_DEPTH
                ),
            });
        }
        let mut dir =
            Dir::new(fd).map_err(|e| self.source_error("cannot read directory", &rel, e))?;
        let mut files: Vec<(Vec<u8>, Stat)> = Vec::new();
        let mut dirs: Vec<(Vec<u8>, Stat)> = Vec::new();
        let mut entries: Vec<Entry> = Vec::new();
        let mut stats = RootStats::default();
        while let Some(item) = dir.read() {
            let item = item.map_err(|e| self.source_error("cannot read directory", &rel, e))?;
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let child = join(&rel, name);
            if self.excluded(&child, name) {
                self.skip(&child, "excluded");
                continue;
            }
            let dirfd = dir.fd().expect("Dir always has an fd");
            let st = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| self.source_error("cannot stat", &child, e))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => files.push((name.to_vec(), st)),
                FileType::Directory if Some((st.st_dev, st.st_ino)) == self.store_dir => {
                    self.skip(&child, "the velo store itself")
                }
                FileType::Directory => dirs.push((name.to_vec(), st)),
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(dirfd, name, Vec::new())
                        .map_err(|e| self.source_error("cannot read symlink", &child, e))?;
                    let kind = EntryKind::Symlink {
                        target: target.into_bytes().into(),
                    };
                    entries.push(self.entry(dirfd, &child, name, &st, kind)?);
                    stats.symlinks += 1;
                }
                FileType::Socket => self.skip(&child, "socket"),
                FileType::Fifo => self.skip(&child, "fifo"),
                FileType::BlockDevice => self.skip(&child, "block device"),
                FileType::CharacterDevice => self.skip(&child, "character device"),
                FileType::Unknown => self.skip(&child, "file of unknown type"),
            }
        }
        let dirfd: BorrowedFd<'_> = dir.fd().expect("Dir always has an fd");
        let (file_entries, dir_entries) = rayon::join(
            || {
                files
                    .par_iter()
                    .filter_map(|(name, st)| {
                        let child = join(&rel, name);
                        let (hash, size) = match self.file(dirfd, name, st, &child) {
                            Ok(stored) => stored,
                            Err(e) if self.skipped_unreadable(&child, &e) => return None,
                            Err(e) => return Some(Err(e)),
                        };
                        Some(self.entry(dirfd, &child, name, st, EntryKind::File { hash, size }))
                    })
                    .collect::<Result<Vec<Entry>, IngestError>>()
            },
            || {
                dirs.par_iter()
                    .filter_map(|(name, st)| {
                        let child = join(&rel, name);
                        let walked = rustix::fs::openat(
                            dirfd,
                            name.as_slice(),
                            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            FsMode::empty(),
                        )
                        .map_err(|e| self.source_error("cannot open directory", &child, e))
                        .and_then(|fd| self.dir(fd, child.clone()));
                        let (hash, sub) = match walked {
                            Ok(walked) => walked,
                            Err(e) if self.skipped_unreadable(&child, &e) => return None,
                            Err(e) => return Some(Err(e)),
                        };
                        Some(
                            self.entry(dirfd, &child, name, st, EntryKind::Dir { hash })
                                .map(|entry| (entry, sub)),
                        )
                    })
                    .collect::<Result<Vec<(Entry, RootStats)>, IngestError>>()
            },
        );
        for entry in file_entries? {
            if let EntryKind::File { size, .. } = entry.kind {
                stats.files += 1;
                stats.bytes += size;
            }
            entries.push(entry);
        }
        for (entry, sub) in dir_entries? {
            stats.dirs += 1 + sub.dirs;
            stats.files += sub.files;
            stats.symlinks += sub.symlinks;
            stats.bytes += sub.bytes;
            entries.push(entry);
        }
        let tree = Tree::new(entries).map_err(|e| IngestError::BadEntry {
            path: self.path_of(&rel),
            message: e.to_string(),
        })?;
        let (bytes, hash) = tree.encode_with_hash();
        let stored = !self.store_was_empty && self.store.has_tree(&hash);
        if !stored {
            match self.inserter {
                Some(inserter) => inserter.send(Job::Tree { hash, bytes }),
                None => {
                    if self.batch.insert_tree(&hash, &bytes)? {
                        self.new_trees.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok((hash, stats))
    }
}
