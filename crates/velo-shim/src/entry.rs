//! The interposed entry points. Each one decides whether its path (or descriptor, or
//! stream) is the tree's; if not, the call goes to the kernel (raw system calls) or to
//! libc's own function, unchanged.

use core::ffi::{c_char, c_int, c_long, c_void, CStr};
use core::sync::atomic::AtomicPtr;

use rustix::fd::{BorrowedFd, IntoRawFd};
use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;
use velo_view::{Kind, Node, FLAG_EXEC_LINK};

use crate::config::{self, Config, PathBuf};
use crate::paths::{self, Target};
use crate::{changes, dirs, fds, meta, upper};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

pub(crate) fn fail<T: FailValue>(e: Errno) -> T {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e.raw_os_error() };
    T::FAILED
}

pub(crate) trait FailValue {
    const FAILED: Self;
}
impl FailValue for c_int {
    const FAILED: c_int = -1;
}
impl FailValue for isize {
    const FAILED: isize = -1;
}
impl FailValue for *mut c_char {
    const FAILED: *mut c_char = core::ptr::null_mut();
}
impl FailValue for *mut libc::DIR {
    const FAILED: *mut libc::DIR = core::ptr::null_mut();
}
impl FailValue for *mut libc::FILE {
    const FAILED: *mut libc::FILE = core::ptr::null_mut();
}

/// The path argument, or `None` for a null pointer.
pub(crate) unsafe fn arg<'a>(path: *const c_char) -> Option<&'a CStr> {
    if path.is_null() {
        None
    } else {
        // SAFETY: the caller passes a NUL-terminated string, as the C API requires.
        Some(unsafe { CStr::from_ptr(path) })
    }
}

/// The caller's descriptor for one call; `EBADF` for a negative one (which rustix
/// cannot hold).
fn borrowed<'a>(fd: c_int) -> Result<BorrowedFd<'a>, Errno> {
    if fd < 0 {
        return Err(Errno::BADF);
    }
    // SAFETY: the descriptor is the caller's; it is only used for this one call.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The directory a path is relative to: `AT_FDCWD`, or any descriptor for an absolute
/// path (the kernel ignores it, so a bad one must not fail the call).
pub(crate) fn at_fd<'a>(dirfd: c_int, path: &CStr) -> Result<BorrowedFd<'a>, Errno> {
    if dirfd == libc::AT_FDCWD || path.to_bytes().first() == Some(&b'/') {
        Ok(CWD)
    } else {
        borrowed(dirfd)
    }
}

/// A line on stderr when `VRIFT_DEBUG` is set: what was intercepted, for which path.
pub(crate) fn debug(config: &Config, what: &str, path: &[u8]) {
    if !config.debug {
        return;
    }
    let mut line = [0u8; 512];
    let mut len = 0;
    for part in [
        b"velo-shim: ".as_slice(),
        what.as_bytes(),
        b" ",
        path,
        b"\n",
    ] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: fd 2 is borrowed for one write; a failed write is ignored (debug output).
    let _ = rustix::io::write(unsafe { BorrowedFd::borrow_raw(2) }, &line[..len]);
}

/// `<store>/blobs/ab/<hash>` of a file node.
pub(crate) fn blob_path(config: &Config, node: &Node, out: &mut PathBuf) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 64];
    for (i, byte) in node.hash.iter().enumerate() {
        hex[2 * i] = HEX[(byte >> 4) as usize];
        hex[2 * i + 1] = HEX[(byte & 15) as usize];
    }
    out.set(&[config.store.as_bytes(), b"/blobs/", &hex[..2], b"/", &hex])
}

/// `views/<root>.d/<node>`: the executable inode of a file node.
fn exec_path(config: &Config, node: &Node, out: &mut PathBuf) -> bool {
    let mut digits = [0u8; 10];
    out.set(&[
        config.exec_dir.as_bytes(),
        b"/",
        config::decimal(node.index, &mut digits),
    ])
}

fn node(config: &Config, index: u32) -> Result<Node, Errno> {
    config.view.node(index).map_err(|_| Errno::IO)
}

// ---------------------------------------------------------------------------------------
// open
// ---------------------------------------------------------------------------------------

fn raw_openat(dirfd: c_int, path: &CStr, flags: c_int, mode: libc::mode_t) -> c_int {
    let dir = match at_fd(dirfd, path) {
        Ok(dir) => dir,
        Err(e) => return fail(e),
    };
    match rustix::fs::openat(
        dir,
        path,
        OFlags::from_bits_retain(flags as u32),
        Mode::from_raw_mode(mode),
    ) {
        Ok(fd) => {
            let fd = fd.into_raw_fd();
            fds::forget(fd);
            fd
        }
        Err(e) => fail(e),
    }
}

fn open_node(config: &Config, index: u32, flags: c_int) -> c_int {
    let n = match node(config, index) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let access = flags & libc::O_ACCMODE;
    let writes = access != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
    let exclusive = flags & (libc::O_CREAT | libc::O_EXCL) == libc::O_CREAT | libc::O_EXCL;
    let kept = flags & (libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_PATH | libc::O_NOCTTY);
    let mut real = PathBuf::new();
    let real_flags = match n.kind {
        Kind::File => {
            if flags & libc::O_DIRECTORY != 0 {
                return fail(Errno::NOTDIR);
            }
            if exclusive {
                return fail(Errno::EXIST);
            }
            if writes {
                return fail(Errno::ROFS);
            }
            if !blob_path(config, &n, &mut real) {
                return fail(Errno::NAMETOOLONG);
            }
            libc::O_RDONLY | kept
        }
        Kind::Dir => {
            if exclusive {
                return fail(Errno::EXIST);
            }
            if writes {
                return fail(Errno::ISDIR);
            }
            real.set(&[config.placeholder.as_bytes()]);
            libc::O_RDONLY | libc::O_DIRECTORY | kept
        }
        Kind::Symlink => {
            // Reached only with O_NOFOLLOW.
            if flags & libc::O_PATH == 0 {
                return fail(Errno::LOOP);
            }
            real.set(&[config.placeholder.as_bytes()]);
            libc::O_PATH | (flags & libc::O_CLOEXEC)
        }
    };
    let fd = match rustix::fs::openat(
        CWD,
        real.as_cstr(),
        OFlags::from_bits_retain(real_flags as u32),
        Mode::empty(),
    ) {
        Ok(fd) => fd.into_raw_fd(),
        Err(Errno::NOENT) => return fail(Errno::IO),
        Err(e) => return fail(e),
    };
    fds::remember(fd, index);
    fd
}

/// Notes a descriptor just opened on an upper entry if it is a directory, so paths
/// relative to it stay in the tree.
fn note_upper_dir(fd: c_int, flags: c_int) {
    if fd < 0 || (flags & libc::O_ACCMODE != libc::O_RDONLY && flags & libc::O_PATH == 0) {
        return;
    }
    // SAFETY: the descriptor this call just opened, only stat'ed.
    let is_dir = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
    });
    if is_dir {
        fds::remember_upper_dir(fd);
    }
}

unsafe fn do_openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    // SAFETY: the caller's path argument.
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let Some(config) = config::get() else {
        return raw_openat(dirfd, p, flags, mode);
    };
    let mut scratch = PathBuf::new();
    let follow = flags & libc::O_NOFOLLOW == 0;
    match paths::lookup(config, dirfd, p, follow, &mut scratch) {
        Target::Host => raw_openat(dirfd, p, flags, mode),
        Target::HostPath => raw_openat(libc::AT_FDCWD, scratch.as_cstr(), flags, mode),
        Target::Upper => {
            let fd = raw_openat(libc::AT_FDCWD, scratch.as_cstr(), flags, mode);
            note_upper_dir(fd, flags);
            fd
        }
        Target::Fail(e) => fail(e),
        Target::Missing { last, .. } => {
            debug(config, "open (missing)", p.to_bytes());
            if flags & libc::O_CREAT == 0 || !last {
                return fail(Errno::NOENT);
            }
            match changes::prepare_create(config, &scratch) {
                Ok(_) => raw_openat(libc::AT_FDCWD, scratch.as_cstr(), flags, mode),
                Err(e) => fail(e),
            }
        }
        Target::Node(n) if changes::open_writes(flags) => {
            debug(config, "open (copy-up)", p.to_bytes());
            match changes::copy_up_node(config, n, &mut scratch, true) {
                Ok(()) => raw_openat(libc::AT_FDCWD, scratch.as_cstr(), flags, mode),
                Err(e) => fail(e),
            }
        }
        Target::Node(n) => {
            debug(config, "open", p.to_bytes());
            open_node(config, n, flags)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    unsafe { do_openat(libc::AT_FDCWD, path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    unsafe { do_openat(libc::AT_FDCWD, path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    unsafe { do_openat(dirfd, path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    unsafe { do_openat(dirfd, path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    unsafe { do_openat(libc::AT_FDCWD, path, flags, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    unsafe { do_openat(libc::AT_FDCWD, path, flags, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    unsafe { do_openat(dirfd, path, flags, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    unsafe { do_openat(dirfd, path, flags, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn creat(path: *const c_char, mode: libc::mode_t) -> c_int {
    unsafe {
        do_openat(
            libc::AT_FDCWD,
            path,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            mode,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: libc::mode_t) -> c_int {
    unsafe { creat(path, mode) }
}

// ---------------------------------------------------------------------------------------
// Streams and canonical paths: libc implements these with internal calls the shim does
// not see, so they are done here for tree paths
// ---------------------------------------------------------------------------------------

/// open(2) flags for an fopen mode string ("r", "w+", "ab", "re", "rx", ...).
fn fopen_flags(mode: &[u8]) -> Option<c_int> {
    let mut flags = match mode.first()? {
        b'r' => libc::O_RDONLY,
        b'w' => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        b'a' => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        _ => return None,
    };
    for &c in &mode[1..] {
        match c {
            b'+' => flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR,
            b'e' => flags |= libc::O_CLOEXEC,
            b'x' => flags |= libc::O_EXCL,
            _ => {}
        }
    }
    Some(flags)
}

static REAL_FOPEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_FREOPEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// Whether `path` is the tree's (or leads out of it: then the host path is in `scratch`).
fn tree_path(path: *const c_char, scratch: &mut PathBuf) -> Option<Target> {
    let config = config::get()?;
    // SAFETY: the caller's path argument.
    let p = unsafe { arg(path) }?;
    match paths::lookup(config, libc::AT_FDCWD, p, true, scratch) {
        Target::Host => None,
        other => Some(other),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    let mut scratch = PathBuf::new();
    if tree_path(path, &mut scratch).is_some() {
        let Some(flags) = (unsafe { arg(mode) }).and_then(|m| fopen_flags(m.to_bytes())) else {
            unsafe { *libc::__errno_location() = libc::EINVAL };
            return core::ptr::null_mut();
        };
        let fd = unsafe { do_openat(libc::AT_FDCWD, path, flags, 0o666) };
        if fd < 0 {
            return core::ptr::null_mut();
        }
        // SAFETY: a descriptor this call opened, with a mode string fdopen accepts.
        let file = unsafe { libc::fdopen(fd, mode) };
        if file.is_null() {
            unsafe { close(fd) };
        }
        return file;
    }
    let real = real_fn!(REAL_FOPEN, c"fopen", unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE, or core::ptr::null_mut());
    unsafe { real(path, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    unsafe { fopen(path, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn freopen(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut libc::FILE,
) -> *mut libc::FILE {
    let mut scratch = PathBuf::new();
    if !path.is_null() && tree_path(path, &mut scratch).is_some() {
        let Some(flags) = (unsafe { arg(mode) }).and_then(|m| fopen_flags(m.to_bytes())) else {
            unsafe { *libc::__errno_location() = libc::EINVAL };
            return core::ptr::null_mut();
        };
        let fd = unsafe { do_openat(libc::AT_FDCWD, path, flags, 0o666) };
        if fd < 0 {
            return core::ptr::null_mut();
        }
        // The stream takes the new descriptor's place: flushed, then its descriptor
        // becomes a duplicate of the new one (as freopen keeps the stream's number).
        unsafe { libc::fflush(stream) };
        let target = unsafe { libc::fileno(stream) };
        if target < 0 || unsafe { dup2(fd, target) } < 0 {
            unsafe { close(fd) };
            return core::ptr::null_mut();
        }
        unsafe { close(fd) };
        unsafe { libc::clearerr(stream) };
        return stream;
    }
    let real = real_fn!(REAL_FREOPEN, c"freopen", unsafe extern "C" fn( *const c_char, *const c_char, *mut libc::FILE, ) -> *mut libc::FILE, or core::ptr::null_mut());
    unsafe { real(path, mode, stream) }
}

#[no_mangle]
pub unsafe extern "C" fn freopen64(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut libc::FILE,
) -> *mut libc::FILE {
    unsafe { freopen(path, mode, stream) }
}

static REAL_REALPATH: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// realpath(3) of a tree path: the node's virtual path, every symlink resolved.
#[no_mangle]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
    let mut scratch = PathBuf::new();
    let target = tree_path(path, &mut scratch);
    let host = match target {
        None | Some(Target::Host) => path,
        Some(Target::HostPath) => scratch.as_cstr().as_ptr(),
        Some(Target::Fail(e)) => return fail(e),
        Some(Target::Missing { .. }) => return fail(Errno::NOENT),
        Some(shown @ (Target::Node(_) | Target::Upper)) => {
            let Some(config) = config::get() else {
                return fail(Errno::IO);
            };
            let mut out = PathBuf::new();
            let fits = match shown {
                Target::Node(n) => paths::path_of(config, n, &mut out),
                _ => {
                    let rel = paths::rel_of(config, &scratch);
                    out.set(&[config.at.as_bytes(), b"/", rel])
                }
            };
            if !fits {
                return fail(Errno::NAMETOOLONG);
            }
            let bytes = out.as_bytes();
            let dest = if resolved.is_null() {
                // SAFETY: malloc of PATH_MAX bytes, as glibc's realpath gives.
                let p = unsafe { libc::malloc(libc::PATH_MAX as usize) } as *mut c_char;
                if p.is_null() {
                    return fail(Errno::NOMEM);
                }
                p
            } else {
                resolved
            };
            if bytes.len() + 1 > libc::PATH_MAX as usize {
                return fail(Errno::NAMETOOLONG);
            }
            // SAFETY: `dest` holds PATH_MAX bytes (the caller's buffer must, by contract).
            unsafe {
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), dest as *mut u8, bytes.len());
                *dest.add(bytes.len()) = 0;
            }
            return dest;
        }
    };
    let real = real_fn!(REAL_REALPATH, c"realpath", unsafe extern "C" fn(*const c_char, *mut c_char) -> *mut c_char, or fail(Errno::NOSYS));
    unsafe { real(host, resolved) }
}

#[no_mangle]
pub unsafe extern "C" fn __realpath_chk(
    path: *const c_char,
    resolved: *mut c_char,
    _resolved_len: usize,
) -> *mut c_char {
    unsafe { realpath(path, resolved) }
}

#[no_mangle]
pub unsafe extern "C" fn canonicalize_file_name(path: *const c_char) -> *mut c_char {
    unsafe { realpath(path, core::ptr::null_mut()) }
}

static REAL_STATFS: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// statfs of a tree path: the store's file system (where the tree's bytes are).
#[no_mangle]
pub unsafe extern "C" fn statfs(path: *const c_char, out: *mut libc::statfs) -> c_int {
    let mut scratch = PathBuf::new();
    let host = match tree_path(path, &mut scratch) {
        None | Some(Target::Host) => path,
        Some(Target::HostPath | Target::Upper) => scratch.as_cstr().as_ptr(),
        Some(Target::Fail(e)) => return fail(e),
        Some(Target::Missing { .. }) => return fail(Errno::NOENT),
        Some(Target::Node(_)) => match config::get() {
            Some(config) => config.store.as_cstr().as_ptr(),
            None => path,
        },
    };
    let real = real_fn!(
        REAL_STATFS,
        c"statfs",
        unsafe extern "C" fn(*const c_char, *mut libc::statfs) -> c_int
    );
    unsafe { real(host, out) }
}

#[no_mangle]
pub unsafe extern "C" fn statfs64(path: *const c_char, out: *mut libc::statfs) -> c_int {
    unsafe { statfs(path, out) }
}

// ---------------------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if fd < 0 {
        // rustix cannot hold a negative descriptor; dash closes -1 in every pipeline.
        return fail(Errno::BADF);
    }
    fds::forget(fd);
    // SAFETY: closing the caller's descriptor, as it asked.
    match unsafe { rustix::io::try_close(fd) } {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

static REAL_DUP: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_DUP2: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_DUP3: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_FCNTL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let real = real_fn!(REAL_DUP, c"dup", unsafe extern "C" fn(c_int) -> c_int);
    let new = unsafe { real(fd) };
    if new >= 0 {
        fds::copy(fd, new);
    }
    new
}

#[no_mangle]
pub unsafe extern "C" fn dup2(fd: c_int, new: c_int) -> c_int {
    let real = real_fn!(
        REAL_DUP2,
        c"dup2",
        unsafe extern "C" fn(c_int, c_int) -> c_int
    );
    let result = unsafe { real(fd, new) };
    if result >= 0 {
        fds::copy(fd, result);
    }
    result
}

#[no_mangle]
pub unsafe extern "C" fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int {
    let real = real_fn!(
        REAL_DUP3,
        c"dup3",
        unsafe extern "C" fn(c_int, c_int, c_int) -> c_int
    );
    let result = unsafe { real(fd, new, flags) };
    if result >= 0 {
        fds::copy(fd, result);
    }
    result
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    let real = real_fn!(
        REAL_FCNTL,
        c"fcntl",
        unsafe extern "C" fn(c_int, c_int, c_long) -> c_int
    );
    let result = unsafe { real(fd, cmd, arg) };
    if result >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        fds::copy(fd, result);
    }
    result
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    unsafe { fcntl(fd, cmd, arg) }
}

// ---------------------------------------------------------------------------------------
// stat
// ---------------------------------------------------------------------------------------

unsafe fn do_fstatat(
    dirfd: c_int,
    path: *const c_char,
    out: *mut libc::stat,
    flags: c_int,
) -> c_int {
    if out.is_null() {
        return fail(Errno::FAULT);
    }
    // SAFETY: the caller's buffer, checked non-null.
    let out = unsafe { &mut *out };
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let raw = |dirfd: c_int, p: &CStr, out: &mut libc::stat| match at_fd(dirfd, p)
        .and_then(|dir| rustix::fs::statat(dir, p, AtFlags::from_bits_retain(flags as u32)))
    {
        Ok(st) => {
            meta::from_kernel(&st, out);
            0
        }
        Err(e) => fail(e),
    };
    let Some(config) = config::get() else {
        return raw(dirfd, p, out);
    };
    if p.to_bytes().is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
        return do_fstat(config, dirfd, out);
    }
    let mut scratch = PathBuf::new();
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    match paths::lookup(config, dirfd, p, follow, &mut scratch) {
        Target::Host => raw(dirfd, p, out),
        Target::HostPath | Target::Upper => raw(libc::AT_FDCWD, scratch.as_cstr(), out),
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(n) => match node(config, n) {
            Ok(n) => {
                meta::fill_stat(config, &n, out);
                0
            }
            Err(e) => fail(e),
        },
    }
}

fn do_fstat(config: &Config, fd: c_int, out: &mut libc::stat) -> c_int {
    if let Some(index) = fds::node_of(fd) {
        return match node(config, index) {
            Ok(n) => {
                meta::fill_stat(config, &n, out);
                0
            }
            Err(e) => fail(e),
        };
    }
    let fd = match borrowed(fd) {
        Ok(fd) => fd,
        Err(e) => return fail(e),
    };
    match rustix::fs::fstat(fd) {
        Ok(st) => {
            meta::from_kernel(&st, out);
            0
        }
        Err(e) => fail(e),
    }
}

unsafe fn fstat_any(fd: c_int, out: *mut libc::stat) -> c_int {
    if out.is_null() {
        return fail(Errno::FAULT);
    }
    // SAFETY: the caller's buffer, checked non-null.
    let out = unsafe { &mut *out };
    match config::get() {
        Some(config) => do_fstat(config, fd, out),
        None => match borrowed(fd).and_then(rustix::fs::fstat) {
            Ok(st) => {
                meta::from_kernel(&st, out);
                0
            }
            Err(e) => fail(e),
        },
    }
}

#[no_mangle]
pub unsafe extern "C" fn stat(path: *const c_char, out: *mut libc::stat) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn stat64(path: *const c_char, out: *mut libc::stat) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn lstat(path: *const c_char, out: *mut libc::stat) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, libc::AT_SYMLINK_NOFOLLOW) }
}
#[no_mangle]
pub unsafe extern "C" fn lstat64(path: *const c_char, out: *mut libc::stat) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, libc::AT_SYMLINK_NOFOLLOW) }
}
#[no_mangle]
pub unsafe extern "C" fn fstat(fd: c_int, out: *mut libc::stat) -> c_int {
    unsafe { fstat_any(fd, out) }
}
#[no_mangle]
pub unsafe extern "C" fn fstat64(fd: c_int, out: *mut libc::stat) -> c_int {
    unsafe { fstat_any(fd, out) }
}
#[no_mangle]
pub unsafe extern "C" fn fstatat(
    dirfd: c_int,
    path: *const c_char,
    out: *mut libc::stat,
    flags: c_int,
) -> c_int {
    unsafe { do_fstatat(dirfd, path, out, flags) }
}
#[no_mangle]
pub unsafe extern "C" fn fstatat64(
    dirfd: c_int,
    path: *const c_char,
    out: *mut libc::stat,
    flags: c_int,
) -> c_int {
    unsafe { do_fstatat(dirfd, path, out, flags) }
}
#[no_mangle]
pub unsafe extern "C" fn __xstat(_ver: c_int, path: *const c_char, out: *mut libc::stat) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn __xstat64(
    _ver: c_int,
    path: *const c_char,
    out: *mut libc::stat,
) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn __lxstat(_ver: c_int, path: *const c_char, out: *mut libc::stat) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, libc::AT_SYMLINK_NOFOLLOW) }
}
#[no_mangle]
pub unsafe extern "C" fn __lxstat64(
    _ver: c_int,
    path: *const c_char,
    out: *mut libc::stat,
) -> c_int {
    unsafe { do_fstatat(libc::AT_FDCWD, path, out, libc::AT_SYMLINK_NOFOLLOW) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstat(_ver: c_int, fd: c_int, out: *mut libc::stat) -> c_int {
    unsafe { fstat_any(fd, out) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstat64(_ver: c_int, fd: c_int, out: *mut libc::stat) -> c_int {
    unsafe { fstat_any(fd, out) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstatat(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    out: *mut libc::stat,
    flags: c_int,
) -> c_int {
    unsafe { do_fstatat(dirfd, path, out, flags) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstatat64(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    out: *mut libc::stat,
    flags: c_int,
) -> c_int {
    unsafe { do_fstatat(dirfd, path, out, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: libc::c_uint,
    out: *mut libc::statx,
) -> c_int {
    if out.is_null() {
        return fail(Errno::FAULT);
    }
    // SAFETY: the caller's buffer, checked non-null.
    let out = unsafe { &mut *out };
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let raw = |dirfd: c_int, p: &CStr, out: &mut libc::statx| {
        let dir = match at_fd(dirfd, p) {
            Ok(dir) => dir,
            Err(e) => return fail(e),
        };
        match rustix::fs::statx(
            dir,
            p,
            AtFlags::from_bits_retain(flags as u32),
            rustix::fs::StatxFlags::from_bits_retain(mask),
        ) {
            Ok(st) => {
                const _: () = assert!(
                    core::mem::size_of::<rustix::fs::Statx>()
                        == core::mem::size_of::<libc::statx>()
                );
                // SAFETY: both are the kernel's `struct statx` (the sizes are checked
                // above), plain old data.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        &st as *const rustix::fs::Statx as *const u8,
                        out as *mut libc::statx as *mut u8,
                        core::mem::size_of::<libc::statx>(),
                    )
                };
                0
            }
            Err(e) => fail(e),
        }
    };
    let Some(config) = config::get() else {
        return raw(dirfd, p, out);
    };
    let index = if p.to_bytes().is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
        match fds::node_of(dirfd) {
            Some(n) => n,
            None => return raw(dirfd, p, out),
        }
    } else {
        let mut scratch = PathBuf::new();
        let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
        match paths::lookup(config, dirfd, p, follow, &mut scratch) {
            Target::Host => return raw(dirfd, p, out),
            Target::HostPath | Target::Upper => return raw(libc::AT_FDCWD, scratch.as_cstr(), out),
            Target::Fail(e) => return fail(e),
            Target::Missing { .. } => return fail(Errno::NOENT),
            Target::Node(n) => n,
        }
    };
    match node(config, index) {
        Ok(n) => {
            meta::fill_statx(config, &n, out);
            0
        }
        Err(e) => fail(e),
    }
}

// ---------------------------------------------------------------------------------------
// access, readlink
// ---------------------------------------------------------------------------------------

pub(crate) unsafe fn do_faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let raw = |dirfd: c_int, p: &CStr| match at_fd(dirfd, p).and_then(|dir| {
        rustix::fs::accessat(
            dir,
            p,
            rustix::fs::Access::from_bits_retain(mode as u32),
            AtFlags::from_bits_retain(flags as u32),
        )
    }) {
        Ok(()) => 0,
        Err(e) => fail(e),
    };
    let Some(config) = config::get() else {
        return raw(dirfd, p);
    };
    let mut scratch = PathBuf::new();
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    match paths::lookup(config, dirfd, p, follow, &mut scratch) {
        Target::Host => raw(dirfd, p),
        Target::HostPath | Target::Upper => raw(libc::AT_FDCWD, scratch.as_cstr()),
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(n) => {
            let Ok(n) = node(config, n) else {
                return fail(Errno::IO);
            };
            // The user owns every node of the tree; root may read and write anything,
            // and execute what has an execute bit.
            let owner = config.uid == 0;
            if mode & libc::W_OK != 0 {
                return fail(Errno::ROFS);
            }
            if mode & libc::R_OK != 0 && !owner && n.mode & 0o400 == 0 {
                return fail(Errno::ACCESS);
            }
            if mode & libc::X_OK != 0 && n.mode & 0o111 == 0 {
                return fail(Errno::ACCESS);
            }
            0
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    unsafe { do_faccessat(libc::AT_FDCWD, path, mode, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    unsafe { do_faccessat(dirfd, path, mode, flags) }
}
#[no_mangle]
pub unsafe extern "C" fn eaccess(path: *const c_char, mode: c_int) -> c_int {
    unsafe { do_faccessat(libc::AT_FDCWD, path, mode, libc::AT_EACCESS) }
}
#[no_mangle]
pub unsafe extern "C" fn euidaccess(path: *const c_char, mode: c_int) -> c_int {
    unsafe { do_faccessat(libc::AT_FDCWD, path, mode, libc::AT_EACCESS) }
}

unsafe fn do_readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: usize) -> isize {
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    if buf.is_null() {
        return fail(Errno::FAULT);
    }
    // SAFETY: the caller's buffer of `size` bytes.
    let out = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, size) };
    let raw = |dirfd: c_int, p: &CStr, out: &mut [u8]| match at_fd(dirfd, p)
        .and_then(|dir| rustix::fs::readlinkat_raw(dir, p, &mut *out))
    {
        Ok(n) => n as isize,
        Err(e) => fail(e),
    };
    let Some(config) = config::get() else {
        return raw(dirfd, p, out);
    };
    if !config.self_exe.as_bytes().is_empty() && paths::is_own_exe(p.to_bytes()) {
        let target = config.self_exe.as_bytes();
        let len = target.len().min(out.len());
        out[..len].copy_from_slice(&target[..len]);
        return len as isize;
    }
    let mut scratch = PathBuf::new();
    // `/proc/self/fd/N` of a descriptor of the tree names its tree path, as the kernel's
    // link would name a real file's.
    if paths::descriptor_path(config, p.to_bytes(), &mut scratch) {
        let target = scratch.as_bytes();
        let len = target.len().min(out.len());
        out[..len].copy_from_slice(&target[..len]);
        return len as isize;
    }
    match paths::lookup(config, dirfd, p, false, &mut scratch) {
        Target::Host => raw(dirfd, p, out),
        Target::HostPath | Target::Upper => raw(libc::AT_FDCWD, scratch.as_cstr(), out),
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(n) => {
            let Ok(n) = node(config, n) else {
                return fail(Errno::IO);
            };
            if n.kind != Kind::Symlink {
                return fail(Errno::INVAL);
            }
            let Ok(target) = config.view.target(&n) else {
                return fail(Errno::IO);
            };
            let len = target.len().min(out.len());
            out[..len].copy_from_slice(&target[..len]);
            len as isize
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: usize) -> isize {
    unsafe { do_readlinkat(libc::AT_FDCWD, path, buf, size) }
}
#[no_mangle]
pub unsafe extern "C" fn readlinkat(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    size: usize,
) -> isize {
    unsafe { do_readlinkat(dirfd, path, buf, size) }
}

// ---------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------

static REAL_OPENDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_FDOPENDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_READDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_READDIR64: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_CLOSEDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_REWINDDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_DIRFD: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_TELLDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_SEEKDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// A stream over tree directory `index`, or the error.
fn open_stream(config: &Config, index: u32) -> *mut libc::DIR {
    match node(config, index) {
        Ok(n) if n.kind == Kind::Dir => {}
        Ok(_) => return fail(Errno::NOTDIR),
        Err(e) => return fail(e),
    }
    let fd = open_node(
        config,
        index,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if fd < 0 {
        return core::ptr::null_mut();
    }
    let upper_fd = upper::open_merged(config, index);
    match dirs::open(fd, index, upper_fd) {
        Some(dir) => dir,
        None => {
            if upper_fd >= 0 {
                // SAFETY: the descriptor open_merged just opened.
                unsafe { rustix::io::close(upper_fd) };
            }
            fds::forget(fd);
            // SAFETY: the descriptor this call just opened.
            unsafe { rustix::io::close(fd) };
            fail(Errno::MFILE)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut libc::DIR {
    let real = |p: *const c_char| -> *mut libc::DIR {
        let real = real_fn!(
            REAL_OPENDIR,
            c"opendir",
            unsafe extern "C" fn(*const c_char) -> *mut libc::DIR
        );
        unsafe { real(p) }
    };
    let Some(config) = config::get() else {
        return real(path);
    };
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let mut scratch = PathBuf::new();
    match paths::lookup(config, libc::AT_FDCWD, p, true, &mut scratch) {
        Target::Host => real(path),
        Target::HostPath => real(scratch.as_cstr().as_ptr()),
        Target::Upper => {
            let dir = real(scratch.as_cstr().as_ptr());
            if !dir.is_null() {
                // SAFETY: the stream libc just opened.
                note_upper_dir(unsafe { libc::dirfd(dir) }, libc::O_RDONLY);
            }
            dir
        }
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(n) => {
            debug(config, "opendir", p.to_bytes());
            open_stream(config, n)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut libc::DIR {
    if let (Some(_), Some(index)) = (config::get(), fds::node_of(fd)) {
        let upper_fd = config::get().map_or(-1, |c| upper::open_merged(c, index));
        return match dirs::open(fd, index, upper_fd) {
            Some(dir) => dir,
            None => {
                if upper_fd >= 0 {
                    // SAFETY: the descriptor open_merged just opened.
                    unsafe { rustix::io::close(upper_fd) };
                }
                fail(Errno::MFILE)
            }
        };
    }
    let real = real_fn!(
        REAL_FDOPENDIR,
        c"fdopendir",
        unsafe extern "C" fn(c_int) -> *mut libc::DIR
    );
    unsafe { real(fd) }
}

unsafe fn readdir_any(
    dir: *mut libc::DIR,
    cache: &AtomicPtr<c_void>,
    name: &CStr,
) -> *mut libc::dirent64 {
    if let (Some(config), Some(stream)) = (config::get(), dirs::ours(dir)) {
        return dirs::next(config, stream);
    }
    let f = dirs::real(cache, name);
    if f.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: libc's readdir/readdir64, on the caller's host stream.
    let real: unsafe extern "C" fn(*mut libc::DIR) -> *mut libc::dirent64 =
        unsafe { core::mem::transmute(f) };
    unsafe { real(dir) }
}

#[no_mangle]
pub unsafe extern "C" fn readdir(dir: *mut libc::DIR) -> *mut libc::dirent64 {
    unsafe { readdir_any(dir, &REAL_READDIR, c"readdir") }
}

#[no_mangle]
pub unsafe extern "C" fn readdir64(dir: *mut libc::DIR) -> *mut libc::dirent64 {
    unsafe { readdir_any(dir, &REAL_READDIR64, c"readdir64") }
}

static REAL_READDIR_R: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// readdir_r(3) (deprecated, still used): the entry copied into the caller's buffer.
#[no_mangle]
pub unsafe extern "C" fn readdir_r(
    dir: *mut libc::DIR,
    entry: *mut libc::dirent64,
    result: *mut *mut libc::dirent64,
) -> c_int {
    if let (Some(config), Some(stream)) = (config::get(), dirs::ours(dir)) {
        if entry.is_null() || result.is_null() {
            return libc::EFAULT;
        }
        let next = dirs::next(config, stream);
        // SAFETY: the caller's buffers, checked non-null; `next` is valid until the next
        // call on the stream.
        unsafe {
            if next.is_null() {
                *result = core::ptr::null_mut();
            } else {
                core::ptr::copy_nonoverlapping(next, entry, 1);
                *result = entry;
            }
        }
        return 0;
    }
    let real = real_fn!(REAL_READDIR_R, c"readdir_r", unsafe extern "C" fn( *mut libc::DIR, *mut libc::dirent64, *mut *mut libc::dirent64, ) -> c_int, or libc::ENOSYS);
    unsafe { real(dir, entry, result) }
}

#[no_mangle]
pub unsafe extern "C" fn readdir64_r(
    dir: *mut libc::DIR,
    entry: *mut libc::dirent64,
    result: *mut *mut libc::dirent64,
) -> c_int {
    unsafe { readdir_r(dir, entry, result) }
}

#[no_mangle]
pub unsafe extern "C" fn closedir(dir: *mut libc::DIR) -> c_int {
    if let Some(stream) = dirs::ours(dir) {
        let fd = stream.fd.get();
        dirs::release(stream);
        return unsafe { close(fd) };
    }
    let real = real_fn!(
        REAL_CLOSEDIR,
        c"closedir",
        unsafe extern "C" fn(*mut libc::DIR) -> c_int
    );
    unsafe { real(dir) }
}

#[no_mangle]
pub unsafe extern "C" fn rewinddir(dir: *mut libc::DIR) {
    if let Some(stream) = dirs::ours(dir) {
        dirs::rewind(stream);
        return;
    }
    let f = dirs::real(&REAL_REWINDDIR, c"rewinddir");
    if !f.is_null() {
        // SAFETY: libc's rewinddir on the caller's host stream.
        let real: unsafe extern "C" fn(*mut libc::DIR) = unsafe { core::mem::transmute(f) };
        unsafe { real(dir) }
    }
}

#[no_mangle]
pub unsafe extern "C" fn dirfd(dir: *mut libc::DIR) -> c_int {
    if let Some(stream) = dirs::ours(dir) {
        return stream.fd.get();
    }
    let real = real_fn!(
        REAL_DIRFD,
        c"dirfd",
        unsafe extern "C" fn(*mut libc::DIR) -> c_int
    );
    unsafe { real(dir) }
}

#[no_mangle]
pub unsafe extern "C" fn telldir(dir: *mut libc::DIR) -> c_long {
    if let Some(stream) = dirs::ours(dir) {
        return stream.pos.get() as c_long;
    }
    let real = real_fn!(
        REAL_TELLDIR,
        c"telldir",
        unsafe extern "C" fn(*mut libc::DIR) -> c_long,
        or - 1
    );
    unsafe { real(dir) }
}

#[no_mangle]
pub unsafe extern "C" fn seekdir(dir: *mut libc::DIR, pos: c_long) {
    if let (Some(config), Some(stream)) = (config::get(), dirs::ours(dir)) {
        dirs::seek(config, stream, pos.max(0) as u64);
        return;
    }
    let f = dirs::real(&REAL_SEEKDIR, c"seekdir");
    if !f.is_null() {
        // SAFETY: libc's seekdir on the caller's host stream.
        let real: unsafe extern "C" fn(*mut libc::DIR, c_long) = unsafe { core::mem::transmute(f) };
        unsafe { real(dir, pos) }
    }
}

static REAL_SCANDIR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type Filter = Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>;
type Compare =
    Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>;

/// scandir(3): glibc's opens the directory with its internal opendir, so a tree
/// directory is listed here: every entry the filter keeps, copied into memory from
/// malloc (the caller frees each and the array), sorted with the caller's comparison.
#[no_mangle]
pub unsafe extern "C" fn scandir(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: Filter,
    compare: Compare,
) -> c_int {
    let mut scratch = PathBuf::new();
    let target = tree_path(path, &mut scratch);
    let index = match target {
        Some(Target::Node(n)) => n,
        Some(Target::Fail(e)) => return fail(e),
        Some(Target::Missing { .. }) => return fail(Errno::NOENT),
        other => {
            let host = if matches!(other, Some(Target::HostPath | Target::Upper)) {
                scratch.as_cstr().as_ptr()
            } else {
                path
            };
            let real = real_fn!(
                REAL_SCANDIR,
                c"scandir",
                unsafe extern "C" fn(
                    *const c_char,
                    *mut *mut *mut libc::dirent64,
                    Filter,
                    Compare,
                ) -> c_int
            );
            return unsafe { real(host, list, filter, compare) };
        }
    };
    let Some(config) = config::get() else {
        return fail(Errno::IO);
    };
    if list.is_null() {
        return fail(Errno::FAULT);
    }
    let dir = open_stream(config, index);
    if dir.is_null() {
        return -1;
    }
    let Some(stream) = dirs::ours(dir) else {
        return fail(Errno::IO);
    };
    let mut entries: *mut *mut libc::dirent64 = core::ptr::null_mut();
    let mut count = 0usize;
    let mut capacity = 0usize;
    let size = core::mem::size_of::<libc::dirent64>();
    let failed = loop {
        let entry = dirs::next(config, stream);
        if entry.is_null() {
            break false;
        }
        if let Some(keep) = filter {
            // SAFETY: the caller's filter, given an entry valid for this call.
            if unsafe { keep(entry) } == 0 {
                continue;
            }
        }
        if count == capacity {
            capacity = (capacity * 2).max(16);
            // SAFETY: growing the malloc'd array; a failure leaves the old one.
            let grown = unsafe {
                libc::realloc(
                    entries as *mut c_void,
                    capacity * core::mem::size_of::<*mut libc::dirent64>(),
                )
            } as *mut *mut libc::dirent64;
            if grown.is_null() {
                break true;
            }
            entries = grown;
        }
        // SAFETY: a malloc'd copy of the entry, as glibc's scandir hands out.
        let copy = unsafe { libc::malloc(size) } as *mut libc::dirent64;
        if copy.is_null() {
            break true;
        }
        unsafe {
            core::ptr::copy_nonoverlapping(entry, copy, 1);
            *entries.add(count) = copy;
        }
        count += 1;
    };
    unsafe { closedir(dir) };
    if failed {
        for i in 0..count {
            unsafe { libc::free(*entries.add(i) as *mut c_void) };
        }
        unsafe { libc::free(entries as *mut c_void) };
        return fail(Errno::NOMEM);
    }
    if let (Some(compare), true) = (compare, count > 1) {
        // SAFETY: qsort over `count` pointers with the caller's comparison, which takes
        // pointers to the elements, as scandir's contract says.
        unsafe {
            libc::qsort(
                entries as *mut c_void,
                count,
                core::mem::size_of::<*mut libc::dirent64>(),
                Some(core::mem::transmute::<
                    unsafe extern "C" fn(
                        *mut *const libc::dirent64,
                        *mut *const libc::dirent64,
                    ) -> c_int,
                    unsafe extern "C" fn(*const c_void, *const c_void) -> c_int,
                >(compare)),
            )
        };
    }
    // SAFETY: the caller's out pointer, checked non-null.
    unsafe { *list = entries };
    count as c_int
}

#[no_mangle]
pub unsafe extern "C" fn scandir64(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: Filter,
    compare: Compare,
) -> c_int {
    unsafe { scandir(path, list, filter, compare) }
}

static REAL_SYSCALL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// syscall(2) with the numbers libraries call raw on paths (libuv's statx, for node):
/// the shim's own function; every other number goes to libc's unchanged.
#[no_mangle]
pub unsafe extern "C" fn syscall(
    number: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    match number {
        libc::SYS_statx => {
            return c_long::from(unsafe {
                statx(
                    a1 as c_int,
                    a2 as *const c_char,
                    a3 as c_int,
                    a4 as libc::c_uint,
                    a5 as *mut libc::statx,
                )
            })
        }
        libc::SYS_openat => {
            return c_long::from(unsafe {
                do_openat(
                    a1 as c_int,
                    a2 as *const c_char,
                    a3 as c_int,
                    a4 as libc::mode_t,
                )
            })
        }
        libc::SYS_open => {
            return c_long::from(unsafe {
                do_openat(
                    libc::AT_FDCWD,
                    a1 as *const c_char,
                    a2 as c_int,
                    a3 as libc::mode_t,
                )
            })
        }
        libc::SYS_newfstatat => {
            return c_long::from(unsafe {
                do_fstatat(
                    a1 as c_int,
                    a2 as *const c_char,
                    a3 as *mut libc::stat,
                    a4 as c_int,
                )
            })
        }
        _ => {}
    }
    let f = dirs::real(&REAL_SYSCALL, c"syscall");
    if f.is_null() {
        return c_long::from(fail::<c_int>(Errno::NOSYS));
    }
    // SAFETY: libc's syscall, given the caller's number and six argument registers
    // (extra ones are ignored by the kernel for calls that take fewer).
    let real: unsafe extern "C" fn(
        c_long,
        c_long,
        c_long,
        c_long,
        c_long,
        c_long,
        c_long,
    ) -> c_long = unsafe { core::mem::transmute(f) };
    unsafe { real(number, a1, a2, a3, a4, a5, a6) }
}

// ---------------------------------------------------------------------------------------
// The working directory
// ---------------------------------------------------------------------------------------

static REAL_GETCWD: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

fn enter(config: &Config, index: u32) -> c_int {
    match node(config, index) {
        Ok(n) if n.kind == Kind::Dir => {}
        Ok(_) => return fail(Errno::NOTDIR),
        Err(e) => return fail(e),
    }
    // The kernel's working directory: an empty directory, so that nothing relative the
    // shim does not see lands on a host directory by chance.
    if let Err(e) = rustix::process::chdir(config.placeholder.as_cstr()) {
        return fail(e);
    }
    paths::set_cwd(Some(index));
    // Children started through the environment (system, popen, posix_spawn) start here.
    let mut path = PathBuf::new();
    if paths::path_of(config, index, &mut path) {
        // SAFETY: NUL-terminated strings; setenv copies them.
        unsafe { libc::setenv(c"VRIFT_CWD".as_ptr(), path.as_cstr().as_ptr(), 1) };
    }
    0
}

/// The process left the tree: its children start where the kernel says.
fn leave() {
    paths::set_cwd(None);
    if config::get().is_some() {
        // SAFETY: a NUL-terminated name.
        unsafe { libc::unsetenv(c"VRIFT_CWD".as_ptr()) };
    }
}

#[no_mangle]
pub unsafe extern "C" fn chdir(path: *const c_char) -> c_int {
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let host = |p: &CStr| match rustix::process::chdir(p) {
        Ok(()) => {
            leave();
            0
        }
        Err(e) => fail(e),
    };
    let Some(config) = config::get() else {
        return host(p);
    };
    let mut scratch = PathBuf::new();
    match paths::lookup(config, libc::AT_FDCWD, p, true, &mut scratch) {
        Target::Host => host(p),
        Target::HostPath | Target::Upper => host(scratch.as_cstr()),
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(n) => enter(config, n),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fchdir(fd: c_int) -> c_int {
    if let (Some(config), Some(index)) = (config::get(), fds::node_of(fd)) {
        return enter(config, index);
    }
    let dir = match borrowed(fd) {
        Ok(dir) => dir,
        Err(e) => return fail(e),
    };
    match rustix::process::fchdir(dir) {
        Ok(()) => {
            leave();
            0
        }
        Err(e) => fail(e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn getcwd(buf: *mut c_char, size: usize) -> *mut c_char {
    let real = |buf: *mut c_char, size: usize| -> *mut c_char {
        let real = real_fn!(
            REAL_GETCWD,
            c"getcwd",
            unsafe extern "C" fn(*mut c_char, usize) -> *mut c_char
        );
        unsafe { real(buf, size) }
    };
    let Some(config) = config::get() else {
        return real(buf, size);
    };
    let mut path = PathBuf::new();
    match paths::cwd(config) {
        Some(index) => {
            if !paths::path_of(config, index, &mut path) {
                return fail(Errno::NAMETOOLONG);
            }
        }
        None => match paths::cwd_in_upper(config) {
            // A directory the command made: its tree path, not the upper's.
            Some(virtual_cwd) => {
                path.set(&[virtual_cwd.as_bytes()]);
            }
            None => return real(buf, size),
        },
    }
    let bytes = path.as_bytes();
    let (out, len) = if buf.is_null() {
        // glibc's extension: allocate `size` bytes, or as many as needed when 0.
        let len = if size == 0 { bytes.len() + 1 } else { size };
        // SAFETY: malloc of a positive size; the caller frees it.
        let p = unsafe { libc::malloc(len) } as *mut c_char;
        if p.is_null() {
            return fail(Errno::NOMEM);
        }
        (p, len)
    } else {
        (buf, size)
    };
    if bytes.len() + 1 > len {
        if buf.is_null() {
            // SAFETY: the buffer this call allocated.
            unsafe { libc::free(out as *mut c_void) };
        }
        return fail(Errno::RANGE);
    }
    // SAFETY: `out` holds at least `bytes.len() + 1` bytes (checked above).
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), out as *mut u8, bytes.len());
        *out.add(bytes.len()) = 0;
    }
    out
}

#[no_mangle]
pub unsafe extern "C" fn get_current_dir_name() -> *mut c_char {
    unsafe { getcwd(core::ptr::null_mut(), 0) }
}

// ---------------------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------------------

static REAL_EXECVE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// A copy of `envp` (malloc'd, as the strings it adds) that carries the shim on: its
/// variables put back where the program dropped them (`env -i`), the library first in
/// `LD_PRELOAD`, and `VRIFT_CWD` saying where the process works now (a shell keeps its
/// own copy of the variable, stale after a `cd`). Null if memory runs out: the caller
/// then passes `envp` unchanged.
unsafe fn carried_env(config: &Config, envp: *const *const c_char) -> *const *const c_char {
    let mut n = 0;
    // SAFETY: the caller's NULL-terminated environment array.
    unsafe {
        if !envp.is_null() {
            while !(*envp.add(n)).is_null() {
                n += 1;
            }
        }
    }
    let slots = n + config::OWN_ENV.len() + 3;
    // SAFETY: malloc of a positive size; the array is handed to execve (and leaked if it
    // fails: the process is about to exit or report the error).
    let out = unsafe { libc::malloc(slots * core::mem::size_of::<*const c_char>()) }
        as *mut *const c_char;
    if out.is_null() {
        return core::ptr::null();
    }
    let mut k = 0;
    let mut have = [false; config::OWN_ENV.len()];
    let push = |k: &mut usize, p: *const c_char| {
        // SAFETY: `out` has `slots` entries; at most n + OWN_ENV + 1 are pushed.
        unsafe { *out.add(*k) = p };
        *k += 1;
    };
    for i in 0..n {
        // SAFETY: entry i of the caller's array, a NUL-terminated string.
        let entry = unsafe { *envp.add(i) };
        let bytes = unsafe { CStr::from_ptr(entry) }.to_bytes();
        if bytes.starts_with(b"VRIFT_CWD=") || bytes.starts_with(b"VRIFT_FDS=") {
            continue;
        }
        let mut entry = entry;
        for (j, key) in config::OWN_ENV.iter().enumerate() {
            if bytes.starts_with(key) {
                have[j] = true;
                if j == 0 && !bytes.windows(15).any(|w| w == b"libvelo_shim.so") {
                    // The program's own LD_PRELOAD: the shim goes first.
                    let ours = config.own_env[0].as_bytes();
                    let theirs = &bytes[key.len()..];
                    entry = malloc_cstr(&[ours, b":", theirs]).unwrap_or(entry);
                }
            }
        }
        push(&mut k, entry);
    }
    for (j, own) in config.own_env.iter().enumerate() {
        if !have[j] && !own.as_bytes().is_empty() {
            push(&mut k, own.as_cstr().as_ptr());
        }
    }
    if let Some(fds_var) = fds::inherited_env() {
        push(&mut k, fds_var);
    }
    if let Some(node) = paths::cwd(config) {
        let mut path = PathBuf::new();
        if paths::path_of(config, node, &mut path) {
            if let Some(var) = malloc_cstr(&[b"VRIFT_CWD=", path.as_bytes()]) {
                push(&mut k, var);
            }
        }
    }
    push(&mut k, core::ptr::null());
    out
}

/// The concatenation of `parts`, NUL-terminated, in memory from malloc.
fn malloc_cstr(parts: &[&[u8]]) -> Option<*const c_char> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // SAFETY: malloc of len + 1 bytes, filled below.
    let out = unsafe { libc::malloc(len + 1) } as *mut u8;
    if out.is_null() {
        return None;
    }
    let mut at = 0;
    for part in parts {
        // SAFETY: within the len + 1 bytes allocated.
        unsafe { core::ptr::copy_nonoverlapping(part.as_ptr(), out.add(at), part.len()) };
        at += part.len();
    }
    // SAFETY: the last byte allocated.
    unsafe { *out.add(len) = 0 };
    Some(out as *const c_char)
}

#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let real = real_fn!(
        REAL_EXECVE,
        c"execve",
        unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int
    );
    let Some(config) = config::get() else {
        return unsafe { real(path, argv, envp) };
    };
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let carried = unsafe { carried_env(config, envp) };
    let envp = if carried.is_null() { envp } else { carried };
    let mut scratch = PathBuf::new();
    match paths::lookup(config, libc::AT_FDCWD, p, true, &mut scratch) {
        Target::Host => unsafe { real(path, argv, envp) },
        Target::HostPath | Target::Upper => unsafe { real(scratch.as_cstr().as_ptr(), argv, envp) },
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(n) => {
            let Ok(n) = node(config, n) else {
                return fail(Errno::IO);
            };
            if n.kind != Kind::File || n.flags & FLAG_EXEC_LINK == 0 {
                return fail(Errno::ACCESS);
            }
            let mut exe = PathBuf::new();
            if !exec_path(config, &n, &mut exe) {
                return fail(Errno::NAMETOOLONG);
            }
            debug(config, "execve", p.to_bytes());
            // A `#!` script: the kernel would hand its interpreter the executable link's
            // path, so `$0` and `__file__` would name the store. The interpreter is run
            // here, with the tree path (it reads the script through the shim).
            let mut head = [0u8; 256];
            let read = rustix::fs::openat(
                CWD,
                exe.as_cstr(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .and_then(|fd| rustix::io::read(&fd, &mut head));
            if let Ok(len) = read {
                if let Some((interpreter, option)) = velo_view::shebang(&head[..len]) {
                    return unsafe { exec_script(path, interpreter, option, argv, envp) };
                }
            }
            unsafe { real(exe.as_cstr().as_ptr(), argv, envp) }
        }
    }
}

/// `interpreter [option] script argv[1..]`, through [`execve`] (the interpreter may be
/// in the tree too). The arrays and strings come from malloc: the process is replaced,
/// or reports the error and goes on with a little memory less.
unsafe fn exec_script(
    script: *const c_char,
    interpreter: &[u8],
    option: Option<&[u8]>,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let mut n = 0;
    // SAFETY: the caller's NULL-terminated argument array.
    unsafe {
        if !argv.is_null() {
            while !(*argv.add(n)).is_null() {
                n += 1;
            }
        }
    }
    let Some(interp) = malloc_cstr(&[interpreter]) else {
        return fail(Errno::NOMEM);
    };
    let option = match option.map(|o| malloc_cstr(&[o])) {
        Some(None) => return fail(Errno::NOMEM),
        Some(Some(o)) => Some(o),
        None => None,
    };
    let slots = n + 4;
    // SAFETY: malloc of `slots` pointers, filled below (at most n + 3 and the null).
    let out = unsafe { libc::malloc(slots * core::mem::size_of::<*const c_char>()) }
        as *mut *const c_char;
    if out.is_null() {
        return fail(Errno::NOMEM);
    }
    let mut k = 0;
    let mut push = |p: *const c_char| {
        // SAFETY: within `slots`.
        unsafe { *out.add(k) = p };
        k += 1;
    };
    push(interp);
    if let Some(option) = option {
        push(option);
    }
    push(script);
    for i in 1..n {
        // SAFETY: entry i of the caller's array.
        push(unsafe { *argv.add(i) });
    }
    push(core::ptr::null());
    // As the kernel: at most four interpreters deep (a script whose interpreter is itself
    // would recurse for ever).
    let depth = SCRIPT_DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    let result = if depth > 4 {
        fail(Errno::LOOP)
    } else {
        unsafe { execve(interp, out, envp) }
    };
    SCRIPT_DEPTH.with(|d| d.set(d.get() - 1));
    result
}

thread_local! {
    static SCRIPT_DEPTH: core::cell::Cell<u8> = const { core::cell::Cell::new(0) };
}

extern "C" {
    static environ: *const *const c_char;
}

#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: libc's environment of this process.
    unsafe { execve(path, argv, environ) }
}

#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: as execvpe, with this process's environment.
    unsafe { execvpe(file, argv, environ) }
}

/// glibc's execvp and execvpe search PATH and call its internal execve, which the shim
/// cannot see: the search is done here, each candidate through [`execve`] (so programs in
/// the tree run, and the shim's environment is carried on, as after `env -i`).
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(name) = (unsafe { arg(file) }) else {
        return fail(Errno::FAULT);
    };
    let name = name.to_bytes();
    if name.is_empty() {
        return fail(Errno::NOENT);
    }
    if name.contains(&b'/') {
        return unsafe { execve(file, argv, envp) };
    }
    // PATH of the process (not of `envp`), as glibc's execvpe does.
    let path_var = unsafe { libc::getenv(c"PATH".as_ptr()) };
    let search: &[u8] = if path_var.is_null() {
        b"/bin:/usr/bin"
    } else {
        // SAFETY: getenv's NUL-terminated value, read before anything changes it.
        unsafe { CStr::from_ptr(path_var) }.to_bytes()
    };
    let mut denied = false;
    for dir in search.split(|&b| b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut candidate = PathBuf::new();
        if !candidate.set(&[dir, b"/", name]) {
            continue;
        }
        unsafe { execve(candidate.as_cstr().as_ptr(), argv, envp) };
        // SAFETY: this thread's errno, as execve left it.
        match unsafe { *libc::__errno_location() } {
            libc::EACCES => denied = true,
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            _ => return -1,
        }
    }
    fail(if denied { Errno::ACCESS } else { Errno::NOENT })
}

static REAL_POSIX_SPAWN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_POSIX_SPAWNP: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type Spawn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *const c_char,
    *const *const c_char,
) -> c_int;

#[allow(clippy::too_many_arguments)] // posix_spawn's six, and which of the two it is.
/// posix_spawn(p) runs its child through glibc's internal execve: the program path is
/// translated here (a program in the tree runs from its executable link) and the shim's
/// environment carried on, before libc's own function runs.
unsafe fn spawn_any(
    real: &AtomicPtr<c_void>,
    name: &CStr,
    pid: *mut libc::pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let f = dirs::real(real, name);
    if f.is_null() {
        return libc::ENOSYS;
    }
    // SAFETY: libc's posix_spawn or posix_spawnp, which share this signature.
    let real: Spawn = unsafe { core::mem::transmute(f) };
    let Some(config) = config::get() else {
        return unsafe { real(pid, path, actions, attr, argv, envp) };
    };
    let carried = unsafe { carried_env(config, envp) };
    let envp = if carried.is_null() { envp } else { carried };
    let Some(p) = (unsafe { arg(path) }) else {
        return libc::EFAULT;
    };
    if !p.to_bytes().contains(&b'/') {
        // posix_spawnp of a bare name: PATH is searched here (libc's search would not see
        // the tree's directories), each candidate then spawned by its path.
        let name = p.to_bytes();
        if name.is_empty() {
            return libc::ENOENT;
        }
        let path_var = unsafe { libc::getenv(c"PATH".as_ptr()) };
        let search: &[u8] = if path_var.is_null() {
            b"/bin:/usr/bin"
        } else {
            // SAFETY: getenv's NUL-terminated value, read before anything changes it.
            unsafe { CStr::from_ptr(path_var) }.to_bytes()
        };
        for dir in search.split(|&b| b == b':') {
            let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
            let mut candidate = PathBuf::new();
            if !candidate.set(&[dir, b"/", name]) {
                continue;
            }
            let mut probe = PathBuf::new();
            let found = match paths::lookup(
                config,
                libc::AT_FDCWD,
                candidate.as_cstr(),
                true,
                &mut probe,
            ) {
                Target::Node(n) => node(config, n)
                    .is_ok_and(|n| n.kind == Kind::File && n.flags & FLAG_EXEC_LINK != 0),
                Target::Host => {
                    rustix::fs::access(candidate.as_cstr(), rustix::fs::Access::EXEC_OK).is_ok()
                        && rustix::fs::stat(candidate.as_cstr()).is_ok_and(|st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::RegularFile
                        })
                }
                Target::HostPath | Target::Upper => {
                    rustix::fs::access(probe.as_cstr(), rustix::fs::Access::EXEC_OK).is_ok()
                        && rustix::fs::stat(probe.as_cstr()).is_ok_and(|st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::RegularFile
                        })
                }
                _ => false,
            };
            if found {
                return unsafe {
                    spawn_any(
                        &REAL_POSIX_SPAWN,
                        c"posix_spawn",
                        pid,
                        candidate.as_cstr().as_ptr(),
                        actions,
                        attr,
                        argv,
                        envp,
                    )
                };
            }
        }
        return libc::ENOENT;
    }
    let mut scratch = PathBuf::new();
    let mut exe = PathBuf::new();
    let program = match paths::lookup(config, libc::AT_FDCWD, p, true, &mut scratch) {
        Target::Host => path,
        Target::HostPath | Target::Upper => scratch.as_cstr().as_ptr(),
        Target::Fail(e) => return e.raw_os_error(),
        Target::Missing { .. } => return libc::ENOENT,
        Target::Node(n) => {
            let Ok(n) = node(config, n) else {
                return libc::EIO;
            };
            if n.kind != Kind::File
                || n.flags & FLAG_EXEC_LINK == 0
                || !exec_path(config, &n, &mut exe)
            {
                return libc::EACCES;
            }
            exe.as_cstr().as_ptr()
        }
    };
    unsafe { real(pid, program, actions, attr, argv, envp) }
}

#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    unsafe {
        spawn_any(
            &REAL_POSIX_SPAWN,
            c"posix_spawn",
            pid,
            path,
            actions,
            attr,
            argv,
            envp,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    unsafe {
        spawn_any(
            &REAL_POSIX_SPAWNP,
            c"posix_spawnp",
            pid,
            file,
            actions,
            attr,
            argv,
            envp,
        )
    }
}

static REAL_DLOPEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// The dynamic loader opens libraries with its own internal calls: a library in the tree
/// is handed to it by its path in the tree's farm, whose directories hold its neighbours
/// (so `$ORIGIN` in its run path finds them), or by its blob file when there is no farm.
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, flags: c_int) -> *mut c_void {
    let real = real_fn!(REAL_DLOPEN, c"dlopen", unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void, or core::ptr::null_mut());
    let (mut scratch, mut path) = (PathBuf::new(), PathBuf::new());
    match unsafe { for_loader(file, &mut scratch, &mut path) } {
        Some(file) => unsafe { real(file, flags) },
        None => core::ptr::null_mut(),
    }
}

/// The path to hand the dynamic loader for `file`: a library in the tree by its path in
/// the tree's farm (so `$ORIGIN` finds its neighbours), else its blob; an upper file or a
/// host path as is. `None` when the tree's index is damaged.
pub(crate) unsafe fn for_loader(
    file: *const c_char,
    scratch: &mut PathBuf,
    path: &mut PathBuf,
) -> Option<*const c_char> {
    let Some(config) = config::get() else {
        return Some(file);
    };
    let Some(p) = (unsafe { arg(file) }) else {
        return Some(file);
    };
    if !p.to_bytes().contains(&b'/') {
        return Some(file);
    }
    match paths::lookup(config, libc::AT_FDCWD, p, true, scratch) {
        Target::Host => Some(file),
        Target::HostPath | Target::Upper => Some(scratch.as_cstr().as_ptr()),
        Target::Node(n) => {
            let node = node(config, n).ok()?;
            let mut virtual_path = PathBuf::new();
            let translated = if !config.farm.as_bytes().is_empty()
                && paths::path_of(config, n, &mut virtual_path)
            {
                let rel = &virtual_path.as_bytes()[config.at.as_bytes().len()..];
                path.set(&[config.farm.as_bytes(), rel])
            } else {
                blob_path(config, &node, path)
            };
            if !translated {
                return None;
            }
            debug(config, "dlopen", p.to_bytes());
            Some(path.as_cstr().as_ptr())
        }
        // The loader's own message names the path when it fails.
        _ => Some(file),
    }
}

// ---------------------------------------------------------------------------------------
// Extended attributes: tree nodes have none (the tree format keeps none yet)
// ---------------------------------------------------------------------------------------

/// For a tree path: the value an xattr query of it returns (none, or an error), else
/// `Err(true)` to query the host path now in `scratch`, `Err(false)` the caller's.
fn xattr_of_tree(
    path: *const c_char,
    follow: bool,
    listing: bool,
    scratch: &mut PathBuf,
) -> Result<isize, bool> {
    let Some(config) = config::get() else {
        return Err(false);
    };
    // SAFETY: the caller's path argument.
    let Some(p) = (unsafe { arg(path) }) else {
        return Err(false);
    };
    match paths::lookup(config, libc::AT_FDCWD, p, follow, scratch) {
        Target::Host => Err(false),
        Target::HostPath | Target::Upper => Err(true),
        Target::Fail(e) => Ok(fail(e)),
        Target::Missing { .. } => Ok(fail(Errno::NOENT)),
        Target::Node(_) if listing => Ok(0),
        Target::Node(_) => Ok(fail(Errno::NODATA)),
    }
}

macro_rules! xattr_query {
    ($name:ident, $real:ident, ($($arg:ident : $ty:ty),*), $path:ident, $follow:expr, $listing:expr) => {
        static $real: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> isize {
            let mut scratch = PathBuf::new();
            let $path = match xattr_of_tree($path, $follow, $listing, &mut scratch) {
                Ok(answer) => return answer,
                Err(true) => scratch.as_cstr().as_ptr(),
                Err(false) => $path,
            };
            let cname = concat!(stringify!($name), "\0");
            let cname = CStr::from_bytes_with_nul(cname.as_bytes()).unwrap_or(c"");
            let real = real_fn!($real, cname, unsafe extern "C" fn($($ty),*) -> isize);
            unsafe { real($($arg),*) }
        }
    };
}

xattr_query!(getxattr, REAL_GETXATTR, (path: *const c_char, name: *const c_char, value: *mut c_void, size: usize), path, true, false);
xattr_query!(lgetxattr, REAL_LGETXATTR, (path: *const c_char, name: *const c_char, value: *mut c_void, size: usize), path, false, false);
xattr_query!(listxattr, REAL_LISTXATTR, (path: *const c_char, list: *mut c_char, size: usize), path, true, true);
xattr_query!(llistxattr, REAL_LLISTXATTR, (path: *const c_char, list: *mut c_char, size: usize), path, false, true);

static REAL_FGETXATTR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_FLISTXATTR: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

#[no_mangle]
pub unsafe extern "C" fn fgetxattr(
    fd: c_int,
    name: *const c_char,
    value: *mut c_void,
    size: usize,
) -> isize {
    if config::get().is_some() && fds::node_of(fd).is_some() {
        return fail(Errno::NODATA);
    }
    let real = real_fn!(
        REAL_FGETXATTR,
        c"fgetxattr",
        unsafe extern "C" fn(c_int, *const c_char, *mut c_void, usize) -> isize
    );
    unsafe { real(fd, name, value, size) }
}

#[no_mangle]
pub unsafe extern "C" fn flistxattr(fd: c_int, list: *mut c_char, size: usize) -> isize {
    if config::get().is_some() && fds::node_of(fd).is_some() {
        return 0;
    }
    let real = real_fn!(
        REAL_FLISTXATTR,
        c"flistxattr",
        unsafe extern "C" fn(c_int, *mut c_char, usize) -> isize
    );
    unsafe { real(fd, list, size) }
}

/// Changes through a descriptor of a tree node: `EROFS` (the descriptor of a tree file is
/// the blob's own, which no program may change; a tree directory's is the shared empty
/// directory).
macro_rules! fd_read_only {
    ($name:ident, $real:ident, (fd: c_int $(, $arg:ident : $ty:ty)*)) => {
        static $real: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int $(, $arg: $ty)*) -> c_int {
            if config::get().is_some() && fds::node_of(fd).is_some() {
                return fail(Errno::ROFS);
            }
            let cname = concat!(stringify!($name), "\0");
            let cname = CStr::from_bytes_with_nul(cname.as_bytes()).unwrap_or(c"");
            let real = real_fn!($real, cname, unsafe extern "C" fn(c_int $(, $ty)*) -> c_int);
            unsafe { real(fd $(, $arg)*) }
        }
    };
}

fd_read_only!(ftruncate, REAL_FTRUNCATE, (fd: c_int, len: libc::off_t));
fd_read_only!(ftruncate64, REAL_FTRUNCATE64, (fd: c_int, len: libc::off_t));
fd_read_only!(fallocate, REAL_FALLOCATE, (fd: c_int, mode: c_int, offset: libc::off_t, len: libc::off_t));
fd_read_only!(fallocate64, REAL_FALLOCATE64, (fd: c_int, mode: c_int, offset: libc::off_t, len: libc::off_t));

// ---------------------------------------------------------------------------------------
// Temporary files: glibc's mkstemp family opens with internal calls
// ---------------------------------------------------------------------------------------

/// Runs `make` (libc's own function) on the template at `template`, whose last `tail`
/// bytes it fills in, on the host path a tree path leads to (in the upper, for a tree
/// directory), with the generated name copied back.
unsafe fn temp_in_host(
    template: *mut c_char,
    tail: usize,
    make: &dyn Fn(*mut c_char) -> c_int,
) -> c_int {
    let Some(config) = config::get() else {
        return make(template);
    };
    let Some(p) = (unsafe { arg(template) }) else {
        return fail(Errno::FAULT);
    };
    let original = p.to_bytes();
    let mut scratch = PathBuf::new();
    let target = match paths::lookup(config, libc::AT_FDCWD, p, false, &mut scratch) {
        // A new name in a tree directory: made in the upper.
        Target::Missing { last: true } => match changes::prepare_create(config, &scratch) {
            Ok(_) => Target::Upper,
            Err(e) => return fail(e),
        },
        other => other,
    };
    match target {
        Target::Host => make(template),
        Target::HostPath | Target::Upper => {
            let host = scratch.as_bytes();
            if host.len() < tail || original.len() < tail {
                return fail(Errno::INVAL);
            }
            let mut buf = PathBuf::new();
            buf.set(&[host]);
            let result = make(buf.as_cstr().as_ptr() as *mut c_char);
            if result >= 0 {
                let made = &buf.as_bytes()[host.len() - tail..];
                // SAFETY: the caller's template, whose last `tail` bytes are the ones
                // libc fills in; same length as `made`.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        made.as_ptr(),
                        (template as *mut u8).add(original.len() - tail),
                        tail,
                    )
                };
            }
            result
        }
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Node(_) => fail(Errno::EXIST),
    }
}

static REAL_MKSTEMP: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_MKOSTEMP: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_MKSTEMPS: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_MKOSTEMPS: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_MKDTEMP: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

#[no_mangle]
pub unsafe extern "C" fn mkstemp(template: *mut c_char) -> c_int {
    let real = real_fn!(
        REAL_MKSTEMP,
        c"mkstemp",
        unsafe extern "C" fn(*mut c_char) -> c_int
    );
    unsafe { temp_in_host(template, 6, &|t| real(t)) }
}

#[no_mangle]
pub unsafe extern "C" fn mkstemp64(template: *mut c_char) -> c_int {
    unsafe { mkstemp(template) }
}

#[no_mangle]
pub unsafe extern "C" fn mkostemp(template: *mut c_char, flags: c_int) -> c_int {
    let real = real_fn!(
        REAL_MKOSTEMP,
        c"mkostemp",
        unsafe extern "C" fn(*mut c_char, c_int) -> c_int
    );
    unsafe { temp_in_host(template, 6, &|t| real(t, flags)) }
}

#[no_mangle]
pub unsafe extern "C" fn mkstemps(template: *mut c_char, suffix: c_int) -> c_int {
    let real = real_fn!(
        REAL_MKSTEMPS,
        c"mkstemps",
        unsafe extern "C" fn(*mut c_char, c_int) -> c_int
    );
    unsafe { temp_in_host(template, 6 + suffix.max(0) as usize, &|t| real(t, suffix)) }
}

#[no_mangle]
pub unsafe extern "C" fn mkostemps(template: *mut c_char, suffix: c_int, flags: c_int) -> c_int {
    let real = real_fn!(
        REAL_MKOSTEMPS,
        c"mkostemps",
        unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int
    );
    unsafe {
        temp_in_host(template, 6 + suffix.max(0) as usize, &|t| {
            real(t, suffix, flags)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn mkdtemp(template: *mut c_char) -> *mut c_char {
    let real = real_fn!(REAL_MKDTEMP, c"mkdtemp", unsafe extern "C" fn(*mut c_char) -> *mut c_char, or fail(Errno::NOSYS));
    let made = unsafe { temp_in_host(template, 6, &|t| if real(t).is_null() { -1 } else { 0 }) };
    if made < 0 {
        core::ptr::null_mut()
    } else {
        template
    }
}
