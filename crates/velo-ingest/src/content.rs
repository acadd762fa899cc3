//! One file: find its hash (stat cache, else read it), store its content once.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use rustix::fs::{Mode as FsMode, OFlags, Stat};
use velo_core::Hash;
use velo_store::sparse::{has_holes, write_skipping_zeros, CopyError};
use velo_store::{Staged, StoreError};

use crate::inserter::{same_version, Job};
use crate::statcache::Cached;
use crate::walk::{ctime_ns, mtime_ns, Ctx};
use crate::IngestError;

/// Files up to this size are read whole into a per-thread buffer, then written if new;
/// larger ones are streamed.
const WHOLE_FILE_LIMIT: u64 = 8 << 20;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

enum Outcome {
    Stored(Hash),
    /// The file changed while it was read; `Stat` is its newest state.
    Changed(Stat),
}

impl Ctx<'_> {
    /// Returns the file's blob hash and size, storing the content if the store lacks it.
    pub(crate) fn file(
        &self,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        st: &Stat,
        rel: &[u8],
    ) -> Result<(Hash, u64), IngestError> {
        let key = (st.st_dev, st.st_ino);
        let size = st.st_size as u64;
        if let Some(cached) = self.cache.entries.get(&key) {
            if cached.size == size
                && cached.mtime_ns == mtime_ns(st)
                && cached.ctime_ns == ctime_ns(st)
            {
                let usable = !self.cache.must_verify(&cached.hash)
                    || self.knows(&cached.hash)
                    || self.store.has_blob(&cached.hash);
                if usable {
                    self.cached_files.fetch_add(1, Ordering::Relaxed);
                    self.remember(key, *cached);
                    self.progress.files.fetch_add(1, Ordering::Relaxed);
                    self.progress.bytes.fetch_add(size, Ordering::Relaxed);
                    return Ok((cached.hash, size));
                }
            }
        }
        self.cache_changed.store(true, Ordering::Relaxed);
        if self
            .inserter
            .is_some_and(|inserter| inserter.failed.load(Ordering::Relaxed))
        {
            return Err(IngestError::Aborted);
        }
        let mut current = *st;
        for _attempt in 0..3 {
            let fd = rustix::fs::openat(
                dirfd,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
                FsMode::empty(),
            )
            .map_err(|e| self.source_error("cannot open", rel, e))?;
            match self.store_content(File::from(fd), &current, rel)? {
                Outcome::Stored(hash) => {
                    let (mtime, ctime) = (mtime_ns(&current), ctime_ns(&current));
                    if mtime < self.racy_after_ns && ctime < self.racy_after_ns {
                        self.remember(
                            key,
                            Cached {
                                size: current.st_size as u64,
                                mtime_ns: mtime,
                                ctime_ns: ctime,
                                hash,
                            },
                        );
                    }
                    self.progress.files.fetch_add(1, Ordering::Relaxed);
                    self.progress
                        .bytes
                        .fetch_add(current.st_size as u64, Ordering::Relaxed);
                    return Ok((hash, current.st_size as u64));
                }
                Outcome::Changed(newest) => current = newest,
            }
        }
        Err(IngestError::Changed(self.path_of(rel)))
    }

    fn remember(&self, key: (u64, u64), cached: Cached) {
        self.observed
            .lock()
            .expect("no panics hold this lock")
            .insert(key, cached);
    }

    fn fstat(&self, file: &File, rel: &[u8]) -> Result<Stat, IngestError> {
        rustix::fs::fstat(file).map_err(|e| self.source_error("cannot stat", rel, e))
    }

    fn read_error(&self, rel: &[u8]) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
        let path = self.path_of(rel);
        move |source| IngestError::Source {
            op: "cannot read",
            path,
            cause: source,
        }
    }

    fn write_error(&self) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
        move |e| StoreError::io("writing a blob into", self.store.root().join("tmp"))(e).into()
    }

    /// Whether the store has `hash` (asking the file system once per run and hash).
    fn stored(&self, hash: &Hash) -> bool {
        self.knows(hash) || (!self.store_was_empty && self.store.has_blob(hash))
    }

    fn store_content(
        &self,
        source: File,
        before: &Stat,
        rel: &[u8],
    ) -> Result<Outcome, IngestError> {
        let size = before.st_size as u64;
        if size <= WHOLE_FILE_LIMIT {
            return BUFFER.with(move |buffer| {
                let file = &source;
                let mut buf = buffer.borrow_mut();
                buf.clear();
                buf.reserve(size as usize + 1);
                // One byte more than expected, so a file that grew shows up as a size change.
                file.take(size + 1)
                    .read_to_end(&mut buf)
                    .map_err(self.read_error(rel))?;
                let hash = Hash::from(blake3::hash(&buf));
                let after = self.fstat(file, rel)?;
                if !same_version(before, &after) || buf.len() as u64 != size {
                    return Ok(Outcome::Changed(after));
                }
                race::at(race::Point::Hashed, rel);
                if self.stored(&hash) {
                    self.learn(&hash);
                    return Ok(Outcome::Stored(hash));
                }
                if let Some(inserter) = self.inserter {
                    // Only the first worker to meet this content queues it.
                    if self.learn(&hash) {
                        inserter.send(Job::Blob {
                            // Only a job that may be cloned keeps its source open.
                            source: (self.clone_safe(&after)
                                && self.reflink_works.load(Ordering::Relaxed))
                            .then_some(source),
                            read_as: after,
                            form: form_of(&after, self.options.mtime),
                            hash,
                            data: std::mem::take(&mut *buf),
                        });
                    }
                    return Ok(Outcome::Stored(hash));
                }
                let new = self.batch.insert_blob(
                    &hash,
                    Some(form_of(&after, self.options.mtime)),
                    &mut |dest: &mut File| {
                        // A clone copies the file as it is now, not as it was read: it is kept
                        // only if the file is still the version hashed. Otherwise the hashed
                        // bytes are written, before the blob is staged under its name, so
                        // another file with the same content that finds it staged can rely on
                        // it (a blob discarded after staging left such a file's root naming a
                        // blob never published).
                        if self.clone_safe(&after) && self.try_reflink(dest, file) {
                            match rustix::fs::fstat(file) {
                                Ok(now) if same_version(before, &now) => return Ok(()),
                                _ => dest.set_len(0)?,
                            }
                        }
                        if has_holes(after.st_blocks as u64, size) {
                            write_skipping_zeros(dest, &buf)
                        } else {
                            dest.write_all(&buf)
                        }
                    },
                )?;
                race::at(race::Point::Staged, rel);
                self.counted(new, hash, size);
                Ok(Outcome::Stored(hash))
            });
        }
        let file = &source;
        // Large file: one pass. Clone first where reflinks may work (the clone costs no
        // data and tells at once whether this file system can), then hash the source;
        // otherwise copy into the staged file while hashing.
        let mut staged = self.store.stage()?;
        let cloned = self.clone_safe(before) && self.try_reflink(staged.file(), file);
        let hash = self.stream(file, if cloned { None } else { Some(&mut staged) }, rel)?;
        let after = self.fstat(file, rel)?;
        if !same_version(before, &after) {
            return Ok(Outcome::Changed(after));
        }
        if self.stored(&hash) {
            self.learn(&hash);
            return Ok(Outcome::Stored(hash));
        }
        let new = self.batch.insert_staged_blob(
            staged,
            &hash,
            Some(form_of(&after, self.options.mtime)),
        )?;
        self.counted(new, hash, size);
        Ok(Outcome::Stored(hash))
    }

    /// Hashes the whole file, copying it into `staged` if given. Holes are neither read
    /// nor written (they hash as zeros), so a sparse file makes a sparse blob.
    fn stream(
        &self,
        file: &File,
        staged: Option<&mut Staged<'_>>,
        rel: &[u8],
    ) -> Result<Hash, IngestError> {
        let mut hasher = blake3::Hasher::new();
        velo_store::sparse::copy_sparse(file, staged.map(|s| &*s.file()), Some(&mut hasher))
            .map_err(|e| match e {
                CopyError::Read(e) => self.read_error(rel)(e),
                CopyError::Write(e) => self.write_error()(e),
            })?;
        Ok(Hash::from(hasher.finalize()))
    }

    /// Whether a clone taken after `read_as` was observed is sure to be that version when
    /// `fstat` says so. Only if the file's ctime (which no one can set back) is older than
    /// the walk's start minus two seconds: a write sets ctime when it *starts*, so a read
    /// racing an in-place, same-size write can see half-written bytes and the same ctime
    /// before and after, while the clone (which waits for the write) gets the finished
    /// bytes. Before Linux 6.13 a coarse clock hides same-tick changes as well. Recent
    /// files are written from the hashed bytes instead.
    pub(crate) fn clone_safe(&self, read_as: &Stat) -> bool {
        ctime_ns(read_as) < self.racy_after_ns
    }

    /// Clones the source's extents into the staged file; false when this file system
    /// cannot (after the first failure, no more attempts are made).
    fn try_reflink(&self, dest: &File, source: &File) -> bool {
        if !self.reflink_works.load(Ordering::Relaxed) {
            return false;
        }
        match rustix::fs::ioctl_ficlone(dest, source) {
            Ok(()) => {
                self.reflinked.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "reflink unavailable; copying blobs instead");
                self.reflink_works.store(false, Ordering::Relaxed);
                // A clone that failed part way may have left extents behind.
                let _ = dest.set_len(0);
                false
            }
        }
    }

    fn counted(&self, new: bool, hash: Hash, size: u64) {
        if new {
            self.new_blobs.fetch_add(1, Ordering::Relaxed);
            self.new_bytes.fetch_add(size, Ordering::Relaxed);
        }
        self.learn(&hash);
    }
}

/// The form a new blob takes from the file it is stored from (the mtime the tree records
/// of it, and 0555 if it is executable): a checkout of the tree just ingested then links
/// the blob itself, no variant needed.
pub(crate) fn form_of(st: &Stat, mtimes: crate::MtimePolicy) -> velo_store::BlobForm {
    let own = velo_store::BlobForm::of_stat(st);
    let mtime_ns = match mtimes {
        crate::MtimePolicy::Keep => own.mtime_ns,
        crate::MtimePolicy::Zero => 0,
    };
    velo_store::BlobForm::canonical(own.mode, mtime_ns)
}

/// Two points of the small-file path where a unit test interleaves two workers exactly,
/// to replay races that are too narrow to hit from outside. Nothing in other builds.
pub(crate) mod race {
    /// Where a worker is.
    #[cfg_attr(not(test), allow(dead_code))]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Point {
        /// The file was read and hashed, nothing stored yet.
        Hashed,
        /// Its blob was staged (new, or found staged by another worker).
        Staged,
    }

    #[cfg(test)]
    pub(crate) type Hook = std::sync::Arc<dyn Fn(Point, &[u8]) + Send + Sync>;

    #[cfg(test)]
    pub(crate) static HOOK: std::sync::Mutex<Option<Hook>> = std::sync::Mutex::new(None);

    #[cfg(test)]
    pub(crate) fn at(point: Point, rel: &[u8]) {
        let hook = HOOK.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(hook) = hook {
            hook(point, rel);
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn at(_point: Point, _rel: &[u8]) {}
}
