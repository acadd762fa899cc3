//! The `LD_PRELOAD` shim of `velo run --manifest M -- CMD`: a tree appears at a virtual
//! path (`--at`, default `/vrift`) to a dynamically linked program, without a mount, a
//! copy or a daemon.
//!
//! It owns the interposed libc entry points and their per-process state: the mapped view
//! index (velo-view), the table of descriptors that stand for tree nodes, the virtual
//! working directory and the directory streams of tree directories. It calls only
//! velo-view and the kernel (raw system calls through rustix, so it never recurses into
//! itself), and libc only for what libc must do (real `DIR` streams of host directories,
//! `malloc` for `getcwd(NULL, 0)`).
//!
//! What a program sees: reads of a tree file come from its blob file (the descriptor is
//! the blob's own, so `read`, `mmap`, `poll` and `/proc/self/fd` behave); `stat` and
//! `fstat` report the tree's metadata (size, mode, mtime, a stable inode per node, the
//! view's device number); directories list the tree; the working directory may be inside
//! the tree. The hot paths (`stat`, `open`, `readdir`) make no allocation, take no lock and
//! send no message: a lookup is a binary search per path component in the mapped index.
//!
//! This first slice is read-only: opening a tree file for writing, creating, removing or
//! renaming in the tree fails with `EROFS` (the copy-on-write upper comes next). Limits
//! are listed in docs/COMPATIBILITY.md.

#![allow(clippy::missing_safety_doc)]

/// libc's own function (see `dirs::real`), as a typed pointer; fails the call with
/// `ENOSYS` if libc lacks it.
macro_rules! real_fn {
    ($cache:expr, $name:expr, $ty:ty) => {
        real_fn!($cache, $name, $ty, or fail(Errno::NOSYS))
    };
    // `or`: what the caller returns when libc lacks the function.
    ($cache:expr, $name:expr, $ty:ty, or $missing:expr) => {{
        let f = dirs::real(&$cache, $name);
        if f.is_null() {
            return $missing;
        }
        // SAFETY: the symbol libc exports under this name has this C signature.
        unsafe { core::mem::transmute::<*mut c_void, $ty>(f) }
    }};
}

mod changes;
mod config;
mod dirs;
mod entry;
mod fds;
mod meta;
mod paths;
mod spellings;
mod upper;

pub use entry::*;
