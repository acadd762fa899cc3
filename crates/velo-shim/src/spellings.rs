//! Other spellings of entry points `entry` and `changes` implement: `faccessat2`,
//! `close_range`, `execveat`, `fexecve`, `dlmopen`. glibc implements each with internal
//! calls the shim would not see, so each is mapped here onto the shim's own version. The
//! variadic `execl`, `execle` and `execlp` (which Rust cannot define) are in
//! `c/variadic.c`, which gathers their arguments and calls the shim's `execve`/`execvp`;
//! the exported symbols are naked functions here that jump there with the caller's
//! registers and stack untouched (a variadic call's frame, passed on as it is).

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::sync::atomic::AtomicPtr;

use rustix::io::Errno;

use crate::config::{self, PathBuf};
use crate::entry::{self, fail};
use crate::{dirs, fds, paths};

#[no_mangle]
pub unsafe extern "C" fn faccessat2(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    unsafe { entry::do_faccessat(dirfd, path, mode, flags) }
}

static REAL_CLOSE_RANGE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// close_range(2): the descriptor table forgets what it closes.
#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let real = real_fn!(
        REAL_CLOSE_RANGE,
        c"close_range",
        unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int
    );
    let result = unsafe { real(first, last, flags) };
    if result == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        let end = last.min(fds::SLOTS as c_uint - 1);
        for fd in first..=end {
            fds::forget(fd as c_int);
        }
    }
    result
}

/// The tree path `dirfd` + `path` stands for, into `out`, when `dirfd` is a descriptor of a
/// tree node (`path` empty with `AT_EMPTY_PATH`: the node itself).
fn tree_path_at(dirfd: c_int, path: &[u8], out: &mut PathBuf) -> bool {
    let (Some(config), Some(node)) = (config::get(), fds::node_of(dirfd)) else {
        return false;
    };
    let mut own = PathBuf::new();
    if !paths::path_of(config, node, &mut own) {
        return false;
    }
    if path.is_empty() {
        out.set(&[own.as_bytes()])
    } else {
        out.set(&[own.as_bytes(), b"/", path])
    }
}

static REAL_EXECVEAT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// execveat(2): a tree program (by a tree directory's descriptor and a relative path, or
/// by its own descriptor with `AT_EMPTY_PATH`) runs as `execve` of its tree path would.
#[no_mangle]
pub unsafe extern "C" fn execveat(
    dirfd: c_int,
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    flags: c_int,
) -> c_int {
    let Some(p) = (unsafe { entry::arg(path) }) else {
        return fail(Errno::FAULT);
    };
    let bytes = p.to_bytes();
    let mut joined = PathBuf::new();
    if bytes.first() == Some(&b'/') {
        return unsafe { entry::execve(path, argv, envp) };
    }
    if (!bytes.is_empty() || flags & libc::AT_EMPTY_PATH != 0)
        && tree_path_at(dirfd, bytes, &mut joined)
    {
        return unsafe { entry::execve(joined.as_cstr().as_ptr(), argv, envp) };
    }
    if dirfd == libc::AT_FDCWD {
        return unsafe { entry::execve(path, argv, envp) };
    }
    let real = real_fn!(
        REAL_EXECVEAT,
        c"execveat",
        unsafe extern "C" fn(
            c_int,
            *const c_char,
            *const *const c_char,
            *const *const c_char,
            c_int,
        ) -> c_int
    );
    unsafe { real(dirfd, path, argv, envp, flags) }
}

static REAL_FEXECVE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// fexecve(3) of a tree file's descriptor: `execve` of its tree path.
#[no_mangle]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let mut path = PathBuf::new();
    if tree_path_at(fd, b"", &mut path) {
        return unsafe { entry::execve(path.as_cstr().as_ptr(), argv, envp) };
    }
    let real = real_fn!(
        REAL_FEXECVE,
        c"fexecve",
        unsafe extern "C" fn(c_int, *const *const c_char, *const *const c_char) -> c_int
    );
    unsafe { real(fd, argv, envp) }
}

static REAL_DLMOPEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// dlmopen(3): as `dlopen`, into another link-map namespace.
#[no_mangle]
pub unsafe extern "C" fn dlmopen(
    lmid: libc::c_long,
    file: *const c_char,
    flags: c_int,
) -> *mut c_void {
    let real = real_fn!(
        REAL_DLMOPEN,
        c"dlmopen",
        unsafe extern "C" fn(libc::c_long, *const c_char, c_int) -> *mut c_void,
        or core::ptr::null_mut()
    );
    let (mut scratch, mut path) = (PathBuf::new(), PathBuf::new());
    match unsafe { entry::for_loader(file, &mut scratch, &mut path) } {
        Some(file) => unsafe { real(lmid, file, flags) },
        None => core::ptr::null_mut(),
    }
}

extern "C" {
    fn velo_execl();
    fn velo_execle();
    fn velo_execlp();
}

/// execl(3): see `c/variadic.c`.
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn execl() {
    core::arch::naked_asm!("jmp {f}", f = sym velo_execl)
}

/// execle(3): see `c/variadic.c`.
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn execle() {
    core::arch::naked_asm!("jmp {f}", f = sym velo_execle)
}

/// execlp(3): see `c/variadic.c`.
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn execlp() {
    core::arch::naked_asm!("jmp {f}", f = sym velo_execlp)
}
