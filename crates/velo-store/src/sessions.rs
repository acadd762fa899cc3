//! Session directories (`sessions/<id>/`): where a run keeps what it needs on disk while
//! it is alive (an overlay upper and work directory, a private mount point).
//!
//! Liveness is a lock, not a guess: `sessions/<id>/lock` is held (flock, exclusive) by
//! the run and by every process of its sandbox, which inherit the descriptor. gc deletes
//! a session only when it can take that lock, i.e. when no process of the run is left,
//! and never one marked `kept` (a run that could not commit keeps its upper for the user).

use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use crate::{Result, Store, StoreError};

const LOCK: &str = "lock";
const KEPT: &str = "kept";

/// A live session: its directory and the held liveness lock.
pub struct Session {
    dir: PathBuf,
    lock: File,
}

impl Session {
    /// The session directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The descriptor of the liveness lock, for processes of the run to inherit.
    pub fn lock_fd(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }

    /// Marks the session as kept: gc leaves it alone after the run ends, and `reason`
    /// (what happened, how to recover) is written beside it for whoever finds it.
    pub fn keep(&self, reason: &str) -> Result<()> {
        let path = self.dir.join(KEPT);
        fs::write(&path, reason).map_err(StoreError::io("writing", &path))
    }

    /// Removes the session directory (unless kept).
    pub fn remove(self) {
        if !self.dir.join(KEPT).exists() {
            crate::remove_tree(&self.dir);
        }
    }
}

impl Store {
    /// Creates a new session directory, private to the caller (0700), holding its lock.
    pub fn new_session(&self) -> Result<Session> {
        let sessions = self.root.join("sessions");
        fs::create_dir_all(&sessions).map_err(StoreError::io("creating", &sessions))?;
        let stamp = crate::now_nanos();
        let dir = sessions.join(format!("{}-{stamp}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(StoreError::io("creating session", &dir))?;
        let lock_path = dir.join(LOCK);
        let lock = File::create(&lock_path).map_err(StoreError::io("creating", &lock_path))?;
        rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| StoreError::io("locking", &lock_path)(e.into()))?;
        Ok(Session { dir, lock })
    }

    /// Session directories that no live process holds and nobody asked to keep.
    pub(crate) fn dead_sessions(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let mut dead = Vec::new();
        let mut kept = Vec::new();
        let Ok(listing) = fs::read_dir(self.root.join("sessions")) else {
            return (dead, kept);
        };
        for entry in listing.flatten() {
            let dir = entry.path();
            if dir.join(KEPT).exists() {
                kept.push(dir);
                continue;
            }
            // A lock file that cannot be opened belongs to a session being created (or
            // one killed before its lock existed): only the latter is dead, and it is
            // recognisable by its age.
            match File::open(dir.join(LOCK)) {
                Ok(file) => {
                    if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
                        dead.push(dir);
                    }
                }
                Err(_) => {
                    let old = fs::symlink_metadata(&dir)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() > 60);
                    if old {
                        dead.push(dir);
                    }
                }
            }
        }
        (dead, kept)
    }
}
