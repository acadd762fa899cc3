//! Directory streams of tree directories: a fixed pool of slots whose addresses the shim
//! hands out as `DIR *`; anything else is a host stream, passed to libc's own functions.

use core::ffi::{c_char, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use velo_view::Kind;

use crate::config::Config;

/// Open tree directory streams at once; one more fails with `EMFILE`.
pub const STREAMS: usize = 256;

pub struct Stream {
    used: AtomicBool,
    /// The descriptor (of the placeholder directory) the stream stands on.
    pub fd: core::cell::Cell<i32>,
    pub node: core::cell::Cell<u32>,
    /// Entries returned so far (what telldir reports).
    pub pos: core::cell::Cell<u64>,
    pub entry: core::cell::UnsafeCell<libc::dirent64>,
    /// The upper directory merged into the listing, or -1: its entries come first
    /// (whiteouts left out), then the tree's that it does not hide.
    upper_fd: core::cell::Cell<i32>,
    /// What the stream lists next.
    phase: core::cell::Cell<Phase>,
    /// The next tree child, in the tree phase.
    child: core::cell::Cell<u32>,
    /// `getdents64` records of the upper directory, and how far they are read.
    buf: core::cell::UnsafeCell<[u8; 2048]>,
    buf_len: core::cell::Cell<usize>,
    buf_pos: core::cell::Cell<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Dot,
    DotDot,
    Upper,
    Tree,
}

// SAFETY: a slot's cells are used only by the holder of the `DIR *` its `used` flag was
// won for (as glibc's DIR, a stream is not meant for concurrent use by two threads).
unsafe impl Sync for Stream {}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Stream = Stream {
    used: AtomicBool::new(false),
    fd: core::cell::Cell::new(-1),
    node: core::cell::Cell::new(0),
    pos: core::cell::Cell::new(0),
    entry: core::cell::UnsafeCell::new(unsafe_zeroed_dirent()),
    upper_fd: core::cell::Cell::new(-1),
    phase: core::cell::Cell::new(Phase::Dot),
    child: core::cell::Cell::new(0),
    buf: core::cell::UnsafeCell::new([0; 2048]),
    buf_len: core::cell::Cell::new(0),
    buf_pos: core::cell::Cell::new(0),
};

const fn unsafe_zeroed_dirent() -> libc::dirent64 {
    libc::dirent64 {
        d_ino: 0,
        d_off: 0,
        d_reclen: 0,
        d_type: 0,
        d_name: [0; 256],
    }
}

static POOL: [Stream; STREAMS] = [FREE; STREAMS];

/// A new stream over tree directory `node`, standing on descriptor `fd`; `upper_fd`
/// (or -1) is the upper directory merged into it, which the stream then owns.
pub fn open(fd: i32, node: u32, upper_fd: i32) -> Option<*mut libc::DIR> {
    for slot in POOL.iter() {
        if slot
            .used
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            slot.fd.set(fd);
            slot.node.set(node);
            slot.upper_fd.set(upper_fd);
            rewind(slot);
            return Some(slot as *const Stream as *mut libc::DIR);
        }
    }
    None
}

/// The tree stream `dir` is, if it is one.
pub fn ours(dir: *mut libc::DIR) -> Option<&'static Stream> {
    let start = POOL.as_ptr() as usize;
    let end = start + core::mem::size_of_val(&POOL);
    let at = dir as usize;
    if at < start || at >= end || (at - start) % core::mem::size_of::<Stream>() != 0 {
        return None;
    }
    let slot = &POOL[(at - start) / core::mem::size_of::<Stream>()];
    slot.used.load(Ordering::Acquire).then_some(slot)
}

/// Frees a tree stream's slot.
pub fn release(stream: &Stream) {
    let upper = stream.upper_fd.replace(-1);
    if upper >= 0 {
        // SAFETY: the descriptor the stream owns (see `open`).
        unsafe { rustix::io::close(upper) };
    }
    stream.used.store(false, Ordering::Release);
}

/// Back to the first entry.
pub fn rewind(stream: &Stream) {
    stream.pos.set(0);
    stream.phase.set(Phase::Dot);
    stream.child.set(0);
    stream.buf_len.set(0);
    stream.buf_pos.set(0);
    let upper = stream.upper_fd.get();
    if upper >= 0 {
        // SAFETY: the stream's own descriptor, borrowed for one call.
        let fd = unsafe { rustix::fd::BorrowedFd::borrow_raw(upper) };
        let _ = rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0));
    }
}

/// To the entry `telldir` reported as `pos`: from the start, as many entries on.
pub fn seek(config: &Config, stream: &Stream, pos: u64) {
    rewind(stream);
    while stream.pos.get() < pos && !next(config, stream).is_null() {}
}

/// Whether the upper holds `name` (anything, a whiteout too) in directory `fd`.
fn upper_has(fd: i32, name: &[u8]) -> bool {
    let mut buf = [0u8; 256];
    if name.len() >= buf.len() {
        return false;
    }
    buf[..name.len()].copy_from_slice(name);
    let Ok(name) = CStr::from_bytes_until_nul(&buf) else {
        return false;
    };
    // SAFETY: the stream's own descriptor, borrowed for one call.
    let fd = unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) };
    rustix::fs::statat(fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

/// The next record of the upper directory that the listing shows (not `.`, `..` or a
/// whiteout): its inode, type and name.
fn next_upper(stream: &Stream) -> Option<(u64, u8, &[u8])> {
    let fd = stream.upper_fd.get();
    if fd < 0 {
        return None;
    }
    // SAFETY: the buffer belongs to this stream's holder (see `Stream`).
    let buf = unsafe { &mut *stream.buf.get() };
    loop {
        if stream.buf_pos.get() >= stream.buf_len.get() {
            // SAFETY: getdents64 into the stream's buffer, of its length.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
            if n <= 0 {
                return None;
            }
            stream.buf_len.set(n as usize);
            stream.buf_pos.set(0);
        }
        let at = stream.buf_pos.get();
        let record = &buf[at..stream.buf_len.get()];
        if record.len() < 20 {
            stream.buf_pos.set(stream.buf_len.get());
            continue;
        }
        let ino = u64::from_ne_bytes(record[0..8].try_into().unwrap_or([0; 8]));
        let reclen = u16::from_ne_bytes([record[16], record[17]]) as usize;
        let kind = record[18];
        if reclen < 20 || reclen > record.len() {
            stream.buf_pos.set(stream.buf_len.get());
            continue;
        }
        stream.buf_pos.set(at + reclen);
        let name_bytes = &record[19..reclen];
        let len = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let name = &name_bytes[..len];
        if name == b"." || name == b".." {
            continue;
        }
        if kind == libc::DT_CHR || kind == libc::DT_UNKNOWN {
            let mut nul = [0u8; 256];
            nul[..len.min(255)].copy_from_slice(&name[..len.min(255)]);
            if let Ok(c) = CStr::from_bytes_until_nul(&nul) {
                // SAFETY: the stream's own descriptor, borrowed for one call.
                let dir = unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) };
                if let Ok(st) = rustix::fs::statat(dir, c, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::CharacterDevice
                        && st.st_rdev == 0
                    {
                        continue;
                    }
                }
            }
        }
        // SAFETY: as above; the name lives in the stream's buffer until the next call.
        let buf = unsafe { &*stream.buf.get() };
        return Some((ino, kind, &buf[at + 19..at + 19 + len]));
    }
}

/// The next entry of a tree stream, or null at the end.
pub fn next(config: &Config, stream: &Stream) -> *mut libc::dirent64 {
    let view = &config.view;
    let Ok(dir) = view.node(stream.node.get()) else {
        return core::ptr::null_mut();
    };
    let (ino, d_type, name): (u64, u8, &[u8]) = loop {
        match stream.phase.get() {
            Phase::Dot => {
                stream.phase.set(Phase::DotDot);
                break (u64::from(dir.index) + 1, libc::DT_DIR, b".");
            }
            Phase::DotDot => {
                stream.phase.set(Phase::Upper);
                break (u64::from(dir.parent) + 1, libc::DT_DIR, b"..");
            }
            Phase::Upper => match next_upper(stream) {
                Some(found) => break found,
                None => stream.phase.set(Phase::Tree),
            },
            Phase::Tree => {
                let i = stream.child.get();
                if i >= dir.child_count {
                    return core::ptr::null_mut();
                }
                stream.child.set(i + 1);
                let Some((child, name)) = view
                    .node(dir.first_child + i)
                    .ok()
                    .and_then(|c| Some((c, view.name(&c).ok()?)))
                else {
                    return core::ptr::null_mut();
                };
                let upper = stream.upper_fd.get();
                if upper >= 0 && upper_has(upper, name) {
                    continue;
                }
                let d_type = match child.kind {
                    Kind::File => libc::DT_REG,
                    Kind::Dir => libc::DT_DIR,
                    Kind::Symlink => libc::DT_LNK,
                };
                break (u64::from(child.index) + 1, d_type, name);
            }
        }
    };
    let pos = stream.pos.get();
    stream.pos.set(pos + 1);
    // SAFETY: the slot belongs to this stream's holder (see `Stream`); the entry it
    // returns stays valid until the next call on the stream, as readdir promises.
    let entry = unsafe { &mut *stream.entry.get() };
    entry.d_ino = ino;
    entry.d_off = (pos + 1) as i64;
    entry.d_reclen = core::mem::size_of::<libc::dirent64>() as u16;
    entry.d_type = d_type;
    let n = name.len().min(255);
    for (dst, src) in entry.d_name.iter_mut().zip(&name[..n]) {
        *dst = *src as c_char;
    }
    entry.d_name[n] = 0;
    entry
}

/// libc's own function `name`, found once (`dlsym(RTLD_NEXT)`), for host streams.
pub fn real(cache: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let known = cache.load(Ordering::Relaxed);
    if !known.is_null() {
        return known;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; called only from calls on
    // host streams and other paths that run after libc is initialised.
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    cache.store(found, Ordering::Relaxed);
    found
}
