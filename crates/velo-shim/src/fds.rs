//! Descriptors that stand for tree nodes: fd → (node, and the inode the descriptor really
//! has, so an entry left behind by a close the shim did not see is never believed for
//! another file that got the same number).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rustix::fd::BorrowedFd;

/// Descriptors above this are not tracked (they show the blob's own metadata);
/// docs/COMPATIBILITY.md says so.
pub const SLOTS: usize = 1 << 16;

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

/// The slot value of a descriptor of a directory of the run's upper (not a node).
const UPPER_DIR: u32 = u32::MAX;

/// What `fd`'s slot holds, if it still is the descriptor the shim noted it for.
fn noted(fd: i32) -> Option<u32> {
    let slot = slot(fd)?;
    let value = slot.node.load(Ordering::Acquire);
    if value == 0 {
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
    Some(value)
}

/// The node `fd` stands for, if it still is the descriptor the shim opened for it.
pub fn node_of(fd: i32) -> Option<u32> {
    noted(fd).filter(|&v| v != UPPER_DIR).map(|v| v - 1)
}

/// `fd` (just opened) is a directory of the run's upper: paths relative to it are the
/// tree's (its `..` is the merged view's, not the host's).
pub fn remember_upper_dir(fd: i32) {
    remember(fd, UPPER_DIR - 1);
}

/// Whether `fd` is a directory of the upper the shim noted.
pub fn is_upper_dir(fd: i32) -> bool {
    noted(fd) == Some(UPPER_DIR)
}

/// `to` is a duplicate of `from`.
pub fn copy(from: i32, to: i32) {
    match noted(from) {
        Some(value) => remember(to, value - 1),
        None => forget(to),
    }
}

/// `VRIFT_FDS=fd:node,…`: the tracked descriptors an `exec` keeps (not close-on-exec), for
/// the new program's shim to track them too. `None` when there are none. In memory from
/// malloc (it goes into the new program's environment).
pub fn inherited_env() -> Option<*const core::ffi::c_char> {
    let mut text = [0u8; 4096];
    text[..10].copy_from_slice(b"VRIFT_FDS=");
    let mut len = 10;
    for (fd, slot) in TABLE.iter().enumerate() {
        if slot.node.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let fd = fd as i32;
        let Some(value) = noted(fd) else { continue };
        // SAFETY: a descriptor the table tracks, checked above; only its flags are read.
        let flags = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) });
        if !flags.is_ok_and(|f| !f.contains(rustix::io::FdFlags::CLOEXEC)) {
            continue;
        }
        let mut item = [0u8; 24];
        let n = if value == UPPER_DIR {
            // `fd:u`: a directory of the upper.
            let n = format_pair(&mut item, fd as u32, 0);
            item[n - 1] = b'u';
            n
        } else {
            format_pair(&mut item, fd as u32, value - 1)
        };
        if len + n + 1 >= text.len() {
            break;
        }
        if len > 10 {
            text[len] = b',';
            len += 1;
        }
        text[len..len + n].copy_from_slice(&item[..n]);
        len += n;
    }
    if len == 10 {
        return None;
    }
    // SAFETY: malloc of len + 1 bytes, filled and NUL-terminated below.
    let out = unsafe { libc::malloc(len + 1) } as *mut u8;
    if out.is_null() {
        return None;
    }
    // SAFETY: within the allocation.
    unsafe {
        core::ptr::copy_nonoverlapping(text.as_ptr(), out, len);
        *out.add(len) = 0;
    }
    Some(out as *const core::ffi::c_char)
}

fn format_pair(out: &mut [u8; 24], fd: u32, node: u32) -> usize {
    let mut len = 0;
    for (i, value) in [fd, node].into_iter().enumerate() {
        if i == 1 {
            out[len] = b':';
            len += 1;
        }
        let mut digits = [0u8; 10];
        let d = crate::config::decimal(value, &mut digits);
        out[len..len + d.len()].copy_from_slice(d);
        len += d.len();
    }
    len
}

/// Tracks what `VRIFT_FDS` (from the program that exec'd this one) lists, for nodes the
/// view has.
pub fn adopt(list: &[u8], nodes: u32) {
    for item in list.split(|&b| b == b',') {
        let mut parts = item.split(|&b| b == b':');
        let (Some(fd), Some(node)) = (parts.next(), parts.next()) else {
            continue;
        };
        let parse = |d: &[u8]| -> Option<u32> {
            if d.is_empty() || d.len() > 9 || !d.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(d.iter().fold(0u32, |n, c| n * 10 + u32::from(c - b'0')))
        };
        if node == b"u" {
            if let Some(fd) = parse(fd) {
                remember_upper_dir(fd as i32);
            }
            continue;
        }
        if let (Some(fd), Some(node)) = (parse(fd), parse(node)) {
            if node < nodes {
                remember(fd as i32, node);
            }
        }
    }
}
