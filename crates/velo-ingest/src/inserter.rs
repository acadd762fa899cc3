//! The insert pipeline: on file systems whose metadata updates serialise, one thread
//! makes every new blob while the workers read and hash.
//!
//! Why: btrfs keeps all inodes and directory entries of a subvolume in one B-tree, and
//! every create or clone takes that tree's upper locks. Two workers doing both hashing and
//! inserting spend their time waiting on each other inside the kernel (measured: two
//! workers no faster than one). Handing the inserts to one thread lets it run them back to
//! back, as `cp` does, while the workers' hashing overlaps with it on the other core.
//!
//! A job carries the bytes that were hashed, not only the open source file: the inserter
//! clones the source (no data written), then checks with `fstat` that the source is still
//! the version that was read. If it is not, it writes the hashed bytes instead, so a blob
//! always holds exactly what its name says and the walk never waits for the inserter.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use rustix::fs::Stat;
use velo_core::Hash;
use velo_store::{Batch, StoreError};

/// Jobs waiting at most (each holds an open source file; the inserter holds as many more).
const QUEUE: usize = 192;
/// Bytes of file contents waiting at most; a larger single file still passes alone.
const BYTE_BUDGET: u64 = 32 << 20;
/// Jobs that must wait before a sleeping inserter is woken: waking it for every job would
/// cost a context switch per file.
const WAKE_AT: usize = 16;

/// One new object to make.
pub(crate) enum Job {
    /// A blob, cloned from `source` where possible.
    Blob {
        /// The source, when it may be cloned (see `Ctx::clone_safe`); else `data` is
        /// written and the file is not kept open.
        source: Option<File>,
        /// The source's state when it was read.
        read_as: Stat,
        /// The form the new blob takes (crate::content::form_of).
        form: velo_store::BlobForm,
        hash: Hash,
        /// Exactly the bytes that hash to `hash`.
        data: Vec<u8>,
    },
    /// An encoded tree.
    Tree { hash: Hash, bytes: Vec<u8> },
}

impl Job {
    fn len(&self) -> u64 {
        match self {
            Job::Blob { data, .. } => data.len() as u64,
            Job::Tree { bytes, .. } => bytes.len() as u64,
        }
    }
}

#[derive(Default)]
struct Waiting {
    jobs: Vec<Job>,
    bytes: u64,
    closed: bool,
    inserter_asleep: bool,
    workers_asleep: usize,
}

/// The workers' end of the pipeline. Jobs are handed over in bulk (the inserter takes all
/// that wait at once) so that the handover costs few wake-ups.
pub(crate) struct Inserter {
    waiting: Mutex<Waiting>,
    work_ready: Condvar,
    room_ready: Condvar,
    /// Set when an insert failed: the walk stops early.
    pub failed: AtomicBool,
    error: Mutex<Option<StoreError>>,
    pub new_blobs: AtomicU64,
    pub new_bytes: AtomicU64,
    pub new_trees: AtomicU64,
    pub reflinked: AtomicBool,
}

/// Closes the queue on drop (see [`Inserter::closer`]).
pub(crate) struct Closer<'a>(&'a Inserter);

impl Drop for Closer<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Marks the pipeline failed and closed if the inserter thread unwinds.
struct StopOnPanic<'a>(&'a Inserter);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        self.0.failed.store(true, Ordering::Relaxed);
        self.0.close();
    }
}

pub(crate) fn same_version(a: &Stat, b: &Stat) -> bool {
    a.st_size == b.st_size
        && a.st_ino == b.st_ino
        && crate::walk::mtime_ns(a) == crate::walk::mtime_ns(b)
        && crate::walk::ctime_ns(a) == crate::walk::ctime_ns(b)
}

impl Inserter {
    /// Creates the pipeline; run [`Inserter::drain`] on a thread of its own.
    pub fn new() -> Self {
        Inserter {
            waiting: Mutex::new(Waiting::default()),
            work_ready: Condvar::new(),
            room_ready: Condvar::new(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            new_blobs: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            new_trees: AtomicU64::new(0),
            reflinked: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().expect("no panics hold this lock")
    }

    /// Queues a job; waits while the queue or the byte budget is full.
    pub fn send(&self, job: Job) {
        let len = job.len();
        let mut waiting = self.lock();
        while !waiting.closed
            && (waiting.jobs.len() >= QUEUE
                || (waiting.bytes > 0 && waiting.bytes + len > BYTE_BUDGET))
        {
            // What waits may be too little to have woken the inserter yet (a job bigger
            // than the room left): wake it, or nothing would ever make room.
            if waiting.inserter_asleep {
                self.work_ready.notify_one();
            }
            waiting.workers_asleep += 1;
            waiting = self
                .room_ready
                .wait(waiting)
                .expect("no panics hold this lock");
            waiting.workers_asleep -= 1;
        }
        if waiting.closed {
            return;
        }
        waiting.jobs.push(job);
        waiting.bytes += len;
        if waiting.inserter_asleep
            && (waiting.jobs.len() >= WAKE_AT || waiting.bytes >= BYTE_BUDGET / 2)
        {
            self.work_ready.notify_one();
        }
    }

    /// A guard that closes the queue when dropped, also while a panic unwinds: a worker
    /// waiting for room or an inserter waiting for work is never left waiting forever.
    pub fn closer(&self) -> Closer<'_> {
        Closer(self)
    }

    /// No more jobs will come: `drain` returns once the queued ones are done.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work_ready.notify_one();
        self.room_ready.notify_all();
    }

    /// The first error an insert hit, if any.
    pub fn take_error(&self) -> Option<StoreError> {
        self.error.lock().expect("no panics hold this lock").take()
    }

    /// Makes every queued blob, one after the other, until the queue is closed and empty.
    pub fn drain(&self, batch: &Batch<'_>, reflink_works: &AtomicBool) {
        // Should this thread panic, the workers must not wait for room forever.
        let stop_on_panic = StopOnPanic(self);
        self.drain_jobs(batch, reflink_works);
        std::mem::forget(stop_on_panic);
    }

    fn drain_jobs(&self, batch: &Batch<'_>, reflink_works: &AtomicBool) {
        loop {
            let jobs = {
                let mut waiting = self.lock();
                while waiting.jobs.is_empty() && !waiting.closed {
                    waiting.inserter_asleep = true;
                    waiting = self
                        .work_ready
                        .wait(waiting)
                        .expect("no panics hold this lock");
                    waiting.inserter_asleep = false;
                }
                if waiting.jobs.is_empty() {
                    return;
                }
                waiting.bytes = 0;
                if waiting.workers_asleep > 0 {
                    self.room_ready.notify_all();
                }
                std::mem::take(&mut waiting.jobs)
            };
            for job in jobs {
                if self.failed.load(Ordering::Relaxed) {
                    continue;
                }
                if let Err(e) = self.insert(&job, batch, reflink_works) {
                    self.error
                        .lock()
                        .expect("no panics hold this lock")
                        .get_or_insert(e);
                    self.failed.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    fn insert(
        &self,
        job: &Job,
        batch: &Batch<'_>,
        reflink_works: &AtomicBool,
    ) -> Result<(), StoreError> {
        let (source, read_as, form, hash, data) = match job {
            Job::Tree { hash, bytes } => {
                if batch.insert_tree(hash, bytes)? {
                    self.new_trees.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            Job::Blob {
                source,
                read_as,
                form,
                hash,
                data,
            } => (source.as_ref(), read_as, *form, hash, data),
        };
        let new = batch.insert_blob(hash, Some(form), &mut |dest: &mut File| {
            if let Some(source) = source.filter(|_| reflink_works.load(Ordering::Relaxed)) {
                match rustix::fs::ioctl_ficlone(&*dest, source) {
                    Ok(()) => {
                        // The clone copied the file as it is now: keep it only if that
                        // is the version that was hashed.
                        let now = rustix::fs::fstat(source)?;
                        if same_version(read_as, &now) {
                            self.reflinked.store(true, Ordering::Relaxed);
                            return Ok(());
                        }
                        tracing::debug!(
                            hash = %hash,
                            "the source changed after it was hashed: storing the hashed bytes"
                        );
                        dest.set_len(0)?;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reflink unavailable; copying blobs instead");
                        reflink_works.store(false, Ordering::Relaxed);
                        // A clone that failed part way may have left extents behind.
                        dest.set_len(0)?;
                    }
                }
            }
            if velo_store::sparse::has_holes(read_as.st_blocks as u64, data.len() as u64) {
                velo_store::sparse::write_skipping_zeros(dest, data)
            } else {
                dest.write_all(data)
            }
        })?;
        if new {
            self.new_blobs.fetch_add(1, Ordering::Relaxed);
            self.new_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_job(len: usize, tag: u8) -> Job {
        Job::Tree {
            hash: Hash::from(blake3::hash(&[tag])),
            bytes: vec![tag; len],
        }
    }

    /// A job that does not fit beside what waits, while what waits is too little to wake
    /// the inserter, must still get through (found in review: a tree over 16 MiB after a few
    /// small jobs would have hung the walk).
    #[test]
    fn a_job_bigger_than_the_room_left_wakes_the_inserter() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = velo_store::Store::open_or_create(dir.path().join("store")).expect("store");
        let batch = store.begin_batch().expect("batch");
        let inserter = Inserter::new();
        let reflink = AtomicBool::new(false);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| inserter.drain(&batch, &reflink));
            // Let the inserter fall asleep on an empty queue.
            std::thread::sleep(std::time::Duration::from_millis(50));
            scope.spawn(|| {
                inserter.send(tree_job(1 << 20, 1));
                inserter.send(tree_job(BYTE_BUDGET as usize, 2));
                done_tx.send(()).expect("report");
            });
            let finished = done_rx.recv_timeout(std::time::Duration::from_secs(20));
            inserter.close();
            assert!(
                finished.is_ok(),
                "the sender hung: the inserter was never woken"
            );
        });
        assert!(inserter.take_error().is_none());
        assert_eq!(inserter.new_trees.load(Ordering::Relaxed), 2);
    }
}
