//! Pins (`pins/<pid>-<stamp>-<n>`): trees a live process serves, kept by gc for as long
//! as that process lives, without holding the store lock meanwhile.
//!
//! A mount or a workspace serves for hours; holding the store's shared lock all that
//! time kept gc waiting for as long. A pin is a file naming the trees, flocked
//! (exclusive) by its holder; gc counts the trees of every pin it cannot lock as roots,
//! and deletes the pins it can (their process is gone). A pin is made under the shared
//! lock, after the caller has checked its trees are stored, so no gc sweeps between that
//! check and the pin being seen.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FlockOperation;
use velo_core::Hash;

use crate::{Result, Store, StoreError};

const PINS: &str = "pins";

/// A held pin: its trees stay for as long as this value (or its process) lives.
pub struct Pin {
    path: PathBuf,
    _lock: File,
}

impl Drop for Pin {
    fn drop(&mut self) {
        // The lock goes with the descriptor; a file left behind (we die first) is a dead
        // pin that the next gc removes.
        let _ = fs::remove_file(&self.path);
    }
}

/// Live pins: the trees they keep, and the files of dead ones.
pub(crate) struct PinScan {
    pub(crate) trees: Vec<Hash>,
    /// Processes holding live pins.
    pub(crate) live: usize,
    pub(crate) dead: Vec<PathBuf>,
}

impl Store {
    /// Keeps `trees` from gc while the returned pin lives. Call it holding the shared
    /// lock, after checking the trees are stored.
    pub fn pin(&self, trees: &[Hash]) -> Result<Pin> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = self.root.join(PINS);
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&dir)
            .map_err(StoreError::io("creating", &dir))?;
        let name = format!(
            "{}-{}-{}",
            std::process::id(),
            crate::now_nanos(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // Written under a hidden name and renamed once whole and locked, so a gc that only
        // reports (under the shared lock) never reads half a pin.
        let making = dir.join(format!(".{name}"));
        let path = dir.join(name);
        // Its own mode, whatever the umask (a server runs with 0 to make files with the
        // modes its callers ask for): a pin others could write would let them stop gc or
        // unpin what a server reads.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&making)
            .map_err(StoreError::io("creating pin", &making))?;
        let made = rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| StoreError::io("locking", &making)(e.into()))
            .and_then(|()| {
                let text: String = trees.iter().map(|t| format!("{}\n", t.to_hex())).collect();
                file.write_all(text.as_bytes())
                    .map_err(StoreError::io("writing", &making))
            })
            .and_then(|()| fs::rename(&making, &path).map_err(StoreError::io("naming pin", &path)));
        if let Err(e) = made {
            let _ = fs::remove_file(&making);
            return Err(e);
        }
        Ok(Pin { path, _lock: file })
    }

    /// Reads every pin. Under the exclusive lock no pin is being made, so a pin that can
    /// be locked belongs to a process that is gone.
    pub(crate) fn scan_pins(&self) -> Result<PinScan> {
        let mut scan = PinScan {
            trees: Vec::new(),
            live: 0,
            dead: Vec::new(),
        };
        let mut holders = std::collections::HashSet::new();
        let dir = self.root.join(PINS);
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
            Err(e) => return Err(StoreError::io("listing", &dir)(e)),
        };
        for entry in listing {
            let path = entry.map_err(StoreError::io("listing", &dir))?.path();
            let file = match File::open(&path) {
                Ok(file) => file,
                // Its holder let it go while we listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("opening pin", &path)(e)),
            };
            if rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared).is_ok() {
                scan.dead.push(path);
                continue;
            }
            if path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            {
                // Being made: its trees are checked and locked by the maker, who holds
                // the shared lock, so only a gc that does not delete can see it.
                continue;
            }
            let text = fs::read_to_string(&path).map_err(StoreError::io("reading pin", &path))?;
            for line in text.lines() {
                let hash = line.parse::<Hash>().map_err(|e| {
                    StoreError::Invalid(format!(
                        "pin {}: {e}; gc stopped without deleting anything (remove the file if no velo process of its pid runs)",
                        path.display()
                    ))
                })?;
                scan.trees.push(hash);
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            holders.insert(name.and_then(|n| n.split('-').next().map(str::to_string)));
        }
        scan.live = holders.len();
        Ok(scan)
    }
}

#[cfg(test)]
mod tests {
    use velo_core::{Entry, EntryKind, Mode, Name, Tree, Xattrs};

    use super::*;

    /// A store holding one tree of one file, which no root reaches.
    fn store_with_a_tree() -> (tempfile::TempDir, Store, Hash) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let (blob, _) = store.insert_blob(b"served bytes\n").unwrap();
        let tree = Tree::new(vec![Entry {
            name: Name::try_from("f").unwrap(),
            mode: Mode::new(0o644).unwrap(),
            mtime_ns: 0,
            kind: EntryKind::File {
                hash: blob,
                size: 13,
            },
            xattrs: Xattrs::default(),
        }])
        .unwrap();
        let (tree, _) = store.put_tree(&tree).unwrap();
        (dir, store, tree)
    }

    #[test]
    fn gc_keeps_what_a_live_pin_names_and_removes_dead_pins() {
        let (_dir, store, tree) = store_with_a_tree();
        let pin = {
            let _lock = store.lock_shared().unwrap();
            store.pin(&[tree]).unwrap()
        };
        // Held (by this process, through its own descriptor): kept.
        let report = store.gc(true).unwrap();
        assert_eq!((report.serving, report.trees, report.blobs), (1, 0, 0));
        assert!(store.get_tree(&tree).is_ok());
        // A pin whose process died leaves its file, unlocked: gc removes it, keeps nothing.
        std::mem::forget(pin);
        let lock_gone = fs::read_dir(store.root.join(PINS))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let copy = store.root.join(PINS).join("1-2-3");
        fs::copy(&lock_gone, &copy).unwrap();
        fs::remove_file(&lock_gone).unwrap();
        let report = store.gc(true).unwrap();
        assert_eq!((report.serving, report.dead_pins), (0, 1));
        assert_eq!((report.trees, report.blobs), (1, 1));
        assert!(!copy.exists());
        assert!(store.get_tree(&tree).is_err());
    }

    #[test]
    fn a_dropped_pin_leaves_nothing() {
        let (_dir, store, tree) = store_with_a_tree();
        let _lock = store.lock_shared().unwrap();
        drop(store.pin(&[tree]).unwrap());
        assert_eq!(fs::read_dir(store.root.join(PINS)).unwrap().count(), 0);
    }
}
