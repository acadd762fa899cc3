//! Descriptors that stand for tree nodes: fd → (node, and the inode the descriptor really
//! has, so an entry left behind by a close the shim did not see is never believed for
//! another file that got the same number).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rustix::fd::BorrowedFd;

/// Descriptors above this are not tracked (they show the blob's own metadata);
/// docs/COMPATIBILITY.md says so.
const SLOTS: usize = 1 << 16;

struct Slot {
    /// Node index + 1; 0 for none.
    node: AtomicU32,
    dev: AtomicU64,
    ino: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            node: AtomicU32::new(0),
            dev: AtomicU64::new(0),
            ino: AtomicU64::new(0),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

fn slot(fd: i32) -> Option<&'static Slot> {
    usize::try_from(fd).ok().and_then(|i| TABLE.get(i))
}

fn identity(fd: i32) -> Option<(u64, u64)> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` (not negative) is only stat'ed; a closed or reused number gives an
    // error or another identity, both handled by the caller.
    let st = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// `fd` (just opened) stands for `node`.
pub fn remember(fd: i32, node: u32) {
    let (Some(slot), Some((dev, ino))) = (slot(fd), identity(fd)) else {
        return;
    };
    slot.node.store(0, Ordering::Release);
    slot.dev.store(dev, Ordering::Relaxed);
    slot.ino.store(ino, Ordering::Relaxed);
    slot.node.store(node + 1, Ordering::Release);
}

/// `fd` no longer stands for a node (closed, or reopened as a host file).
pub fn forget(fd: i32) {
    if let Some(slot) = slot(fd) {
        slot.node.store(0, Ordering::Release);
    }
}

/// The node `fd` stands for, if it still is the descriptor the shim opened for it.
pub fn node_of(fd: i32) -> Option<u32> {
    let slot = slot(fd)?;
    let node = slot.node.load(Ordering::Acquire);
    if node == 0 {
        return None;
    }
    let (dev, ino) = identity(fd)?;
    if (dev, ino)
        != (
            slot.dev.load(Ordering::Relaxed),
            slot.ino.load(Ordering::Relaxed),
        )
    {
        slot.node.store(0, Ordering::Release);
        return None;
    }
    Some(node - 1)
}

/// `to` is a duplicate of `from`.
pub fn copy(from: i32, to: i32) {
    match node_of(from) {
        Some(node) => remember(to, node),
        None => forget(to),
    }
}
