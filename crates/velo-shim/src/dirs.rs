//! Directory streams of tree directories: a fixed pool of slots whose addresses the shim
//! hands out as `DIR *`; anything else is a host stream, passed to libc's own functions.

use core::ffi::{c_char, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use velo_view::Kind;

use crate::config::Config;

/// Open tree directory streams at once; one more fails with `EMFILE`.
const STREAMS: usize = 256;

pub struct Stream {
    used: AtomicBool,
    /// The descriptor (of the placeholder directory) the stream stands on.
    pub fd: core::cell::Cell<i32>,
    pub node: core::cell::Cell<u32>,
    /// Next position: 0 `.`, 1 `..`, 2.. the children.
    pub pos: core::cell::Cell<u64>,
    pub entry: core::cell::UnsafeCell<libc::dirent64>,
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

/// A new stream over tree directory `node`, standing on descriptor `fd`.
pub fn open(fd: i32, node: u32) -> Option<*mut libc::DIR> {
    for slot in POOL.iter() {
        if slot
            .used
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            slot.fd.set(fd);
            slot.node.set(node);
            slot.pos.set(0);
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
    stream.used.store(false, Ordering::Release);
}

/// The next entry of a tree stream, or null at the end.
pub fn next(config: &Config, stream: &Stream) -> *mut libc::dirent64 {
    let view = &config.view;
    let Ok(dir) = view.node(stream.node.get()) else {
        return core::ptr::null_mut();
    };
    let pos = stream.pos.get();
    let (ino, kind, name): (u32, Kind, &[u8]) = match pos {
        0 => (dir.index, Kind::Dir, b"."),
        1 => (dir.parent, Kind::Dir, b".."),
        _ => {
            let i = pos - 2;
            if i >= u64::from(dir.child_count) {
                return core::ptr::null_mut();
            }
            let index = dir.first_child + i as u32;
            let Some((child, name)) = view
                .node(index)
                .ok()
                .and_then(|c| Some((c, view.name(&c).ok()?)))
            else {
                return core::ptr::null_mut();
            };
            (child.index, child.kind, name)
        }
    };
    stream.pos.set(pos + 1);
    // SAFETY: the slot belongs to this stream's holder (see `Stream`); the entry it
    // returns stays valid until the next call on the stream, as readdir promises.
    let entry = unsafe { &mut *stream.entry.get() };
    entry.d_ino = u64::from(ino) + 1;
    entry.d_off = (pos + 1) as i64;
    entry.d_reclen = core::mem::size_of::<libc::dirent64>() as u16;
    entry.d_type = match kind {
        Kind::File => libc::DT_REG,
        Kind::Dir => libc::DT_DIR,
        Kind::Symlink => libc::DT_LNK,
    };
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
