//! Changes to the tree: every call that creates, deletes, renames or modifies a tree path
//! acts on the run's upper directory (module `upper`), copy-on-write. A run without an
//! upper refuses them with `EROFS`. Paths outside the tree pass through unchanged.

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::AtomicPtr;

use rustix::fd::BorrowedFd;
use rustix::io::Errno;
use velo_view::Kind;

use crate::config::{self, Config, PathBuf};
use crate::entry::{arg, fail};
use crate::paths::{self, Target};
use crate::upper;
use crate::{dirs, fds};

/// Whether open flags can change the file (so a tree file must be copied up first).
pub fn open_writes(flags: c_int) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
        || flags & libc::O_TRUNC != 0
        || flags & libc::O_TMPFILE == libc::O_TMPFILE
}

/// The path of tree node `n` relative to the tree's top.
fn node_rel(config: &Config, n: u32, out: &mut PathBuf) -> bool {
    let mut buf = [0u8; velo_view::PATH_MAX];
    match config.view.path_of(b"", n, &mut buf) {
        Some(len) => out.set(&[buf[..len].strip_prefix(b"/").unwrap_or(&buf[..len])]),
        None => false,
    }
}

/// Copies tree node `n` up; `scratch` then holds its upper path. With `for_write`, a
/// file whose mode gives its owner no write permission is refused first, as the kernel
/// would refuse the open (root excepted), so no copy is made for nothing.
pub fn copy_up_node(
    config: &Config,
    n: u32,
    scratch: &mut PathBuf,
    for_write: bool,
) -> Result<(), Errno> {
    if !upper::writable(config) {
        return Err(Errno::ROFS);
    }
    let node = config.view.node(n).map_err(|_| Errno::IO)?;
    if for_write && node.kind == Kind::File && node.mode & 0o200 == 0 && config.uid != 0 {
        return Err(Errno::ACCESS);
    }
    let mut rel = PathBuf::new();
    if !node_rel(config, n, &mut rel) {
        return Err(Errno::NAMETOOLONG);
    }
    upper::copy_up(config, &node, rel.as_bytes())?;
    if !upper::host_path(config, rel.as_bytes(), scratch) {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(())
}

/// Readies the upper for a new entry at `host` (a [`Target::Missing`]'s scratch path):
/// its directories exist, its tree directory is marked, a whiteout in its place is
/// gone. Returns whether there was a whiteout (a directory made there must be opaque).
pub fn prepare_create(config: &Config, host: &PathBuf) -> Result<bool, Errno> {
    if !upper::writable(config) || host.as_bytes().is_empty() {
        return Err(Errno::ROFS);
    }
    let rel = paths::rel_of(config, host);
    let (parent, _) = upper::split(rel);
    let dir = upper::ensure_dirs(config, parent)?;
    upper::mark(config, dir);
    Ok(upper::clear_whiteout(host))
}

/// What a path-taking change needs of its path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// It changes an existing entry (chmod, utimes, truncate, xattrs...): a tree entry
    /// is copied up first.
    Existing { follow: bool },
    /// It makes a new entry (mkdir, symlink, mknod): the name must be free.
    New,
}

/// Where a change goes: `Err(result)` when it is decided here; `Ok(Some(opaque))` when
/// it goes to the path now in `scratch` (`opaque`: a directory made there must hide the
/// tree's); `Ok(None)` to pass the caller's own path on.
fn change_target(
    dirfd: c_int,
    path: *const c_char,
    need: Need,
    scratch: &mut PathBuf,
) -> Result<Option<bool>, c_int> {
    let Some(config) = config::get() else {
        return Ok(None);
    };
    // SAFETY: the caller's path argument.
    let Some(p) = (unsafe { arg(path) }) else {
        return Ok(None);
    };
    let follow = matches!(need, Need::Existing { follow: true });
    let target = paths::lookup(config, dirfd, p, follow, scratch);
    let result = match (target, need) {
        (Target::Host, _) => return Ok(None),
        (Target::HostPath, _) => return Ok(Some(false)),
        (Target::Fail(e), _) => Err(e),
        (Target::Upper, Need::Existing { .. }) => Ok(false),
        (Target::Upper | Target::Node(_), Need::New) => Err(Errno::EXIST),
        (Target::Node(n), Need::Existing { .. }) => {
            copy_up_node(config, n, scratch, false).map(|()| false)
        }
        (Target::Missing { last: true, .. }, Need::New) => prepare_create(config, scratch),
        (Target::Missing { .. }, _) => Err(Errno::NOENT),
    };
    crate::entry::debug(config, "change", p.to_bytes());
    result.map(Some).map_err(fail)
}

/// Whether an xattr name is overlayfs's own (`user.overlay.*`, `trusted.overlay.*`): the
/// upper keeps whiteouts and opaque marks in them, so a command may not set or remove
/// them on a tree path (overlayfs refuses them through a mount too).
fn overlay_xattr(name: *const c_char) -> bool {
    // SAFETY: the caller's xattr name argument, NUL-terminated as the C API requires.
    let Some(name) = (unsafe { arg(name) }) else {
        return false;
    };
    let name = name.to_bytes();
    name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.")
}

macro_rules! change {
    ($name:ident, $real:ident, $need:expr, ($($arg:ident : $ty:ty),*), $dirfd:expr, $path:ident) => {
        change!($name, $real, $need, ($($arg : $ty),*), $dirfd, $path, refuse_if false);
    };
    ($name:ident, $real:ident, $need:expr, ($($arg:ident : $ty:ty),*), $dirfd:expr, $path:ident, refuse_if $refuse:expr) => {
        static $real: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> c_int {
            let mut scratch = PathBuf::new();
            if $refuse {
                // Decided only for the tree's paths: the host's are the kernel's business.
                if let (Some(config), Some(p)) = (config::get(), unsafe { arg($path) }) {
                    let mut probe = PathBuf::new();
                    if !matches!(paths::lookup(config, $dirfd, p, false, &mut probe), Target::Host | Target::HostPath) {
                        return fail(Errno::PERM);
                    }
                }
            }
            let (opaque, $path) = match change_target($dirfd, $path, $need, &mut scratch) {
                Err(result) => return result,
                Ok(Some(opaque)) => (opaque, scratch.as_cstr().as_ptr()),
                Ok(None) => (false, $path),
            };
            let cname = concat!(stringify!($name), "\0");
            let cname = CStr::from_bytes_with_nul(cname.as_bytes()).unwrap_or(c"");
            let real = real_fn!($real, cname, unsafe extern "C" fn($($ty),*) -> c_int);
            let result = unsafe { real($($arg),*) };
            if result == 0 && opaque {
                // A directory made where a deleted tree entry was.
                let _ = upper::make_opaque(&scratch);
            }
            result
        }
    };
}

const EXISTING: Need = Need::Existing { follow: true };
const EXISTING_NOFOLLOW: Need = Need::Existing { follow: false };
fn existing_unless(flags: c_int, nofollow: c_int) -> Need {
    Need::Existing {
        follow: flags & nofollow == 0,
    }
}

change!(mkdir, REAL_MKDIR, Need::New, (path: *const c_char, mode: libc::mode_t), libc::AT_FDCWD, path);
change!(mkdirat, REAL_MKDIRAT, Need::New, (dirfd: c_int, path: *const c_char, mode: libc::mode_t), dirfd, path);
change!(symlink, REAL_SYMLINK, Need::New, (target: *const c_char, path: *const c_char), libc::AT_FDCWD, path);
change!(symlinkat, REAL_SYMLINKAT, Need::New, (target: *const c_char, dirfd: c_int, path: *const c_char), dirfd, path);
change!(mknod, REAL_MKNOD, Need::New, (path: *const c_char, mode: libc::mode_t, dev: libc::dev_t), libc::AT_FDCWD, path);
change!(mknodat, REAL_MKNODAT, Need::New, (dirfd: c_int, path: *const c_char, mode: libc::mode_t, dev: libc::dev_t), dirfd, path);
change!(mkfifo, REAL_MKFIFO, Need::New, (path: *const c_char, mode: libc::mode_t), libc::AT_FDCWD, path);
change!(mkfifoat, REAL_MKFIFOAT, Need::New, (dirfd: c_int, path: *const c_char, mode: libc::mode_t), dirfd, path);
change!(chmod, REAL_CHMOD, EXISTING, (path: *const c_char, mode: libc::mode_t), libc::AT_FDCWD, path);
change!(fchmodat, REAL_FCHMODAT, existing_unless(flags, libc::AT_SYMLINK_NOFOLLOW), (dirfd: c_int, path: *const c_char, mode: libc::mode_t, flags: c_int), dirfd, path);
change!(chown, REAL_CHOWN, EXISTING, (path: *const c_char, uid: libc::uid_t, gid: libc::gid_t), libc::AT_FDCWD, path);
change!(lchown, REAL_LCHOWN, EXISTING_NOFOLLOW, (path: *const c_char, uid: libc::uid_t, gid: libc::gid_t), libc::AT_FDCWD, path);
change!(fchownat, REAL_FCHOWNAT, existing_unless(flags, libc::AT_SYMLINK_NOFOLLOW), (dirfd: c_int, path: *const c_char, uid: libc::uid_t, gid: libc::gid_t, flags: c_int), dirfd, path);
change!(truncate, REAL_TRUNCATE, EXISTING, (path: *const c_char, len: libc::off_t), libc::AT_FDCWD, path);
change!(truncate64, REAL_TRUNCATE64, EXISTING, (path: *const c_char, len: libc::off_t), libc::AT_FDCWD, path);
change!(utimensat, REAL_UTIMENSAT, existing_unless(flags, libc::AT_SYMLINK_NOFOLLOW), (dirfd: c_int, path: *const c_char, times: *const libc::timespec, flags: c_int), dirfd, path);
change!(utimes, REAL_UTIMES, EXISTING, (path: *const c_char, times: *const libc::timeval), libc::AT_FDCWD, path);
change!(lutimes, REAL_LUTIMES, EXISTING_NOFOLLOW, (path: *const c_char, times: *const libc::timeval), libc::AT_FDCWD, path);
change!(utime, REAL_UTIME, EXISTING, (path: *const c_char, times: *const libc::utimbuf), libc::AT_FDCWD, path);
change!(setxattr, REAL_SETXATTR, EXISTING, (path: *const c_char, name: *const c_char, value: *const c_void, size: usize, flags: c_int), libc::AT_FDCWD, path, refuse_if overlay_xattr(name));
change!(lsetxattr, REAL_LSETXATTR, EXISTING_NOFOLLOW, (path: *const c_char, name: *const c_char, value: *const c_void, size: usize, flags: c_int), libc::AT_FDCWD, path, refuse_if overlay_xattr(name));
change!(removexattr, REAL_REMOVEXATTR, EXISTING, (path: *const c_char, name: *const c_char), libc::AT_FDCWD, path, refuse_if overlay_xattr(name));
change!(lremovexattr, REAL_LREMOVEXATTR, EXISTING_NOFOLLOW, (path: *const c_char, name: *const c_char), libc::AT_FDCWD, path, refuse_if overlay_xattr(name));

// ---------------------------------------------------------------------------------------
// Deletion: whiteouts where the tree has the name
// ---------------------------------------------------------------------------------------

/// After `host` (an upper entry of the tree path `p`) was removed or renamed away: if
/// the tree's entry of that name shows through now, a whiteout hides it.
fn hide_tree_entry(config: &Config, dirfd: c_int, p: &CStr, host: &PathBuf) -> Result<(), Errno> {
    let mut again = PathBuf::new();
    if let Target::Node(_) = paths::lookup(config, dirfd, p, false, &mut again) {
        upper::whiteout(config, paths::rel_of(config, host))?;
    }
    Ok(())
}

unsafe fn do_remove(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let real = |dirfd: c_int, path: &CStr| match rustix::fs::unlinkat(
        crate::entry::at_fd(dirfd, path).unwrap_or(rustix::fs::CWD),
        path,
        rustix::fs::AtFlags::from_bits_retain(flags as u32),
    ) {
        Ok(()) => 0,
        Err(e) => fail(e),
    };
    let Some(p) = (unsafe { arg(path) }) else {
        return fail(Errno::FAULT);
    };
    if dirfd != libc::AT_FDCWD && p.to_bytes().first() != Some(&b'/') && dirfd < 0 {
        return fail(Errno::BADF);
    }
    let Some(config) = config::get() else {
        return real(dirfd, p);
    };
    let dir = flags & libc::AT_REMOVEDIR != 0;
    let mut scratch = PathBuf::new();
    match paths::lookup(config, dirfd, p, false, &mut scratch) {
        Target::Host => real(dirfd, p),
        Target::HostPath => real(libc::AT_FDCWD, scratch.as_cstr()),
        Target::Fail(e) => fail(e),
        Target::Missing { .. } => fail(Errno::NOENT),
        Target::Upper => {
            crate::entry::debug(config, "remove (upper)", p.to_bytes());
            let done = real(libc::AT_FDCWD, scratch.as_cstr());
            if done != 0 {
                return done;
            }
            match hide_tree_entry(config, dirfd, p, &scratch) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
        Target::Node(n) => {
            crate::entry::debug(config, "remove (whiteout)", p.to_bytes());
            if !upper::writable(config) {
                return fail(Errno::ROFS);
            }
            let Ok(node) = config.view.node(n) else {
                return fail(Errno::IO);
            };
            match (dir, node.kind) {
                (true, Kind::Dir) | (false, Kind::File | Kind::Symlink) => {}
                (true, _) => return fail(Errno::NOTDIR),
                (false, Kind::Dir) => return fail(Errno::ISDIR),
            }
            if dir && last_component(p.to_bytes()) == b"." {
                return fail(Errno::INVAL);
            }
            if n == 0 {
                return fail(Errno::BUSY);
            }
            let mut rel = PathBuf::new();
            if !node_rel(config, n, &mut rel) {
                return fail(Errno::NAMETOOLONG);
            }
            let removed = (|| {
                if dir {
                    if !upper::merged_is_empty(config, &node, rel.as_bytes())? {
                        return Err(Errno::NOTEMPTY);
                    }
                    upper::remove_dir(config, rel.as_bytes())?;
                }
                upper::whiteout(config, rel.as_bytes())
            })();
            match removed {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    unsafe { do_remove(libc::AT_FDCWD, path, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    unsafe { do_remove(dirfd, path, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn rmdir(path: *const c_char) -> c_int {
    unsafe { do_remove(libc::AT_FDCWD, path, libc::AT_REMOVEDIR) }
}

/// remove(3): glibc calls its own unlink and rmdir inside, which the shim would not see.
#[no_mangle]
pub unsafe extern "C" fn remove(path: *const c_char) -> c_int {
    let result = unsafe { do_remove(libc::AT_FDCWD, path, 0) };
    // SAFETY: this thread's errno slot.
    if result != 0 && unsafe { *libc::__errno_location() } == libc::EISDIR {
        return unsafe { do_remove(libc::AT_FDCWD, path, libc::AT_REMOVEDIR) };
    }
    result
}

// ---------------------------------------------------------------------------------------
// Renames and links
// ---------------------------------------------------------------------------------------

/// A path's last component (`.` for `a/.` and `a/./`).
fn last_component(path: &[u8]) -> &[u8] {
    let trimmed = match path.iter().rposition(|&b| b != b'/') {
        Some(end) => &path[..=end],
        None => return path,
    };
    trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed)
}

/// What a rename would do natively where the tree's directories are concerned: the
/// error a rename of `source` (a tree or upper entry) onto `dest` gets before anything is
/// copied up. A tree directory itself cannot move (`EXDEV`, as overlayfs without
/// redirects), but the kernel's own checks come first.
fn rename_refusal(
    config: &Config,
    source: &Target,
    dest: &Target,
    dest_host: &PathBuf,
) -> Option<Errno> {
    let kind = |t: &Target, host: Option<&PathBuf>| -> Option<bool> {
        match t {
            Target::Node(n) => config.view.node(*n).ok().map(|n| n.kind == Kind::Dir),
            Target::Upper => host.and_then(|h| {
                rustix::fs::statat(
                    rustix::fs::CWD,
                    h.as_cstr(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .ok()
                .map(|st| {
                    rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory
                })
            }),
            _ => None,
        }
    };
    let source_dir = match source {
        Target::Node(_) => kind(source, None)?,
        _ => return None,
    };
    let dest_dir = kind(dest, Some(dest_host));
    match (source_dir, dest_dir) {
        (false, Some(true)) => Some(Errno::ISDIR),
        (true, Some(false)) => Some(Errno::NOTDIR),
        (true, Some(true)) => {
            let empty = match dest {
                Target::Node(n) => config.view.node(*n).ok().and_then(|node| {
                    let mut rel = PathBuf::new();
                    node_rel(config, *n, &mut rel).then_some(())?;
                    upper::merged_is_empty(config, &node, rel.as_bytes()).ok()
                }),
                _ => None,
            };
            Some(if empty == Some(false) {
                Errno::NOTEMPTY
            } else {
                Errno::XDEV
            })
        }
        (true, None) => Some(Errno::XDEV),
        (false, _) => None,
    }
}

/// One side of a rename or link, made ready in the upper.
enum Side {
    /// Not the tree's: the caller's own path.
    Host,
    /// The host path in the side's scratch buffer.
    At,
}

impl Side {
    /// The directory and path the kernel is given for this side.
    fn path<'a>(&self, fd: c_int, own: &'a CStr, scratch: &'a PathBuf) -> (c_int, &'a CStr) {
        match self {
            Side::Host => (fd, own),
            Side::At => (libc::AT_FDCWD, scratch.as_cstr()),
        }
    }
}

/// Runs a two-path call (`renameat2`, `linkat`) with the caller's descriptors checked.
fn two_paths(
    (fd1, from): (c_int, &CStr),
    (fd2, to): (c_int, &CStr),
    call: impl FnOnce(BorrowedFd<'_>, &CStr, BorrowedFd<'_>, &CStr) -> rustix::io::Result<()>,
) -> c_int {
    let (Ok(d1), Ok(d2)) = (crate::entry::at_fd(fd1, from), crate::entry::at_fd(fd2, to)) else {
        return fail(Errno::BADF);
    };
    match call(d1, from, d2, to) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// The source of a rename or link: a tree file or symlink is copied up; a tree directory
/// cannot move (`EXDEV`, as overlayfs without redirects: `mv` copies it instead).
fn source_side(
    config: &Config,
    dirfd: c_int,
    p: &CStr,
    follow: bool,
    scratch: &mut PathBuf,
) -> Result<(Side, bool), Errno> {
    match paths::lookup(config, dirfd, p, follow, scratch) {
        Target::Host => Ok((Side::Host, false)),
        Target::HostPath => Ok((Side::At, false)),
        Target::Upper => Ok((Side::At, true)),
        Target::Fail(e) => Err(e),
        Target::Missing { .. } => Err(Errno::NOENT),
        Target::Node(n) => {
            if config.view.node(n).map_err(|_| Errno::IO)?.kind == Kind::Dir {
                return Err(Errno::XDEV);
            }
            copy_up_node(config, n, scratch, false)?;
            Ok((Side::At, true))
        }
    }
}

/// The destination of a rename or link: returns whether it is the tree's, and whether
/// a whiteout was cleared for it.
fn dest_side(
    config: &Config,
    dirfd: c_int,
    p: &CStr,
    noreplace: bool,
    exchange: bool,
    scratch: &mut PathBuf,
) -> Result<(Side, bool, bool), Errno> {
    match paths::lookup(config, dirfd, p, false, scratch) {
        Target::Host => Ok((Side::Host, false, false)),
        Target::HostPath => Ok((Side::At, false, false)),
        Target::Fail(e) => Err(e),
        Target::Upper if noreplace => Err(Errno::EXIST),
        Target::Upper => Ok((Side::At, true, false)),
        Target::Missing { .. } if exchange => Err(Errno::NOENT),
        Target::Missing { last: true, .. } => {
            let cleared = prepare_create(config, scratch)?;
            Ok((Side::At, true, cleared))
        }
        Target::Missing { .. } => Err(Errno::NOENT),
        Target::Node(_) if noreplace => Err(Errno::EXIST),
        Target::Node(n) => {
            let node = config.view.node(n).map_err(|_| Errno::IO)?;
            if node.kind == Kind::Dir {
                return Err(Errno::XDEV);
            }
            if exchange {
                copy_up_node(config, n, scratch, false)?;
            } else {
                // Replaced, not changed: only its directory is needed in the upper.
                let mut rel = PathBuf::new();
                if !node_rel(config, n, &mut rel) {
                    return Err(Errno::NAMETOOLONG);
                }
                let (parent, _) = upper::split(rel.as_bytes());
                let dir = upper::ensure_dirs(config, parent)?;
                upper::mark(config, dir);
                if !upper::host_path(config, rel.as_bytes(), scratch) {
                    return Err(Errno::NAMETOOLONG);
                }
            }
            Ok((Side::At, true, false))
        }
    }
}

unsafe fn do_rename(
    fd1: c_int,
    from: *const c_char,
    fd2: c_int,
    to: *const c_char,
    flags: libc::c_uint,
) -> c_int {
    let real = |fd1: c_int, from: &CStr, fd2: c_int, to: &CStr| {
        two_paths((fd1, from), (fd2, to), |d1, from, d2, to| {
            rustix::fs::renameat_with(
                d1,
                from,
                d2,
                to,
                rustix::fs::RenameFlags::from_bits_retain(flags),
            )
        })
    };
    let (Some(p1), Some(p2)) = (unsafe { arg(from) }, unsafe { arg(to) }) else {
        return fail(Errno::FAULT);
    };
    let Some(config) = config::get() else {
        return real(fd1, p1, fd2, p2);
    };
    let (mut first, mut second) = (PathBuf::new(), PathBuf::new());
    let noreplace = flags & libc::RENAME_NOREPLACE != 0;
    let exchange = flags & libc::RENAME_EXCHANGE != 0;
    // Both sides are looked at first: a refused rename must not copy anything up.
    let mut probe = PathBuf::new();
    let dest_target = paths::lookup(config, fd2, p2, false, &mut probe);
    if let (Target::Node(_) | Target::Upper, true) = (&dest_target, noreplace) {
        return fail(Errno::EXIST);
    }
    let mut source_probe = PathBuf::new();
    let source_target = paths::lookup(config, fd1, p1, false, &mut source_probe);
    if !exchange {
        if let Some(e) = rename_refusal(config, &source_target, &dest_target, &probe) {
            return fail(e);
        }
    }
    let (source, source_in_tree) = match source_side(config, fd1, p1, false, &mut first) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let (dest, dest_in_tree, cleared) =
        match dest_side(config, fd2, p2, noreplace, exchange, &mut second) {
            Ok(d) => d,
            Err(e) => return fail(e),
        };
    if source_in_tree != dest_in_tree {
        // One side in the tree, the other on the host: no rename crosses that line.
        return fail(Errno::XDEV);
    }
    crate::entry::debug(config, "rename", p1.to_bytes());
    let (a, b) = (source.path(fd1, p1, &first), dest.path(fd2, p2, &second));
    let done = real(a.0, a.1, b.0, b.1);
    if done != 0 || !source_in_tree || exchange {
        return done;
    }
    if cleared {
        let moved_dir = rustix::fs::statat(
            rustix::fs::CWD,
            second.as_cstr(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        });
        if moved_dir {
            let _ = upper::make_opaque(&second);
        }
    }
    match hide_tree_entry(config, fd1, p1, &first) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn rename(from: *const c_char, to: *const c_char) -> c_int {
    unsafe { do_rename(libc::AT_FDCWD, from, libc::AT_FDCWD, to, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn renameat(
    fd1: c_int,
    from: *const c_char,
    fd2: c_int,
    to: *const c_char,
) -> c_int {
    unsafe { do_rename(fd1, from, fd2, to, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn renameat2(
    fd1: c_int,
    from: *const c_char,
    fd2: c_int,
    to: *const c_char,
    flags: libc::c_uint,
) -> c_int {
    unsafe { do_rename(fd1, from, fd2, to, flags) }
}

unsafe fn do_link(
    fd1: c_int,
    from: *const c_char,
    fd2: c_int,
    to: *const c_char,
    flags: c_int,
) -> c_int {
    let real = |fd1: c_int, from: &CStr, fd2: c_int, to: &CStr, flags: c_int| {
        two_paths((fd1, from), (fd2, to), |d1, from, d2, to| {
            rustix::fs::linkat(
                d1,
                from,
                d2,
                to,
                rustix::fs::AtFlags::from_bits_retain(flags as u32),
            )
        })
    };
    let (Some(p1), Some(p2)) = (unsafe { arg(from) }, unsafe { arg(to) }) else {
        return fail(Errno::FAULT);
    };
    let Some(config) = config::get() else {
        return real(fd1, p1, fd2, p2, flags);
    };
    let (mut first, mut second) = (PathBuf::new(), PathBuf::new());
    let follow = flags & libc::AT_SYMLINK_FOLLOW != 0;
    let mut probe = PathBuf::new();
    if let Target::Node(_) | Target::Upper = paths::lookup(config, fd2, p2, false, &mut probe) {
        return fail(Errno::EXIST);
    }
    let (source, source_in_tree) = match source_side(config, fd1, p1, follow, &mut first) {
        Ok(s) => s,
        Err(Errno::XDEV) => return fail(Errno::PERM),
        Err(e) => return fail(e),
    };
    let (dest, dest_in_tree, _) = match dest_side(config, fd2, p2, true, false, &mut second) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    if source_in_tree != dest_in_tree {
        return fail(Errno::XDEV);
    }
    let (a, b) = (source.path(fd1, p1, &first), dest.path(fd2, p2, &second));
    match source {
        // The source is resolved already: the kernel must not follow it again.
        Side::At => real(a.0, a.1, b.0, b.1, flags & !libc::AT_SYMLINK_FOLLOW),
        Side::Host => real(a.0, a.1, b.0, b.1, flags),
    }
}

#[no_mangle]
pub unsafe extern "C" fn link(from: *const c_char, to: *const c_char) -> c_int {
    unsafe { do_link(libc::AT_FDCWD, from, libc::AT_FDCWD, to, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn linkat(
    fd1: c_int,
    from: *const c_char,
    fd2: c_int,
    to: *const c_char,
    flags: c_int,
) -> c_int {
    unsafe { do_link(fd1, from, fd2, to, flags) }
}

// ---------------------------------------------------------------------------------------
// Changes through a descriptor of a tree node: the node is copied up and the change made
// to the copy by path (the descriptor itself still reads the tree's bytes, as a file
// opened read-only on overlayfs before a copy-up does)
// ---------------------------------------------------------------------------------------

/// For a descriptor of a tree node: its copy's upper path in `scratch` (`Ok(true)`),
/// or `Ok(false)` when the descriptor is not a node's.
fn fd_change_target(fd: c_int, scratch: &mut PathBuf) -> Result<bool, Errno> {
    let (Some(config), Some(n)) = (config::get(), fds::node_of(fd)) else {
        return Ok(false);
    };
    copy_up_node(config, n, scratch, false)?;
    Ok(true)
}

macro_rules! fd_change {
    ($name:ident, $real:ident, (fd: c_int $(, $arg:ident : $ty:ty)*), |$path:ident| $call:expr) => {
        fd_change!($name, $real, (fd: c_int $(, $arg : $ty)*), |$path| $call, refuse_if false);
    };
    ($name:ident, $real:ident, (fd: c_int $(, $arg:ident : $ty:ty)*), |$path:ident| $call:expr, refuse_if $refuse:expr) => {
        static $real: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int $(, $arg: $ty)*) -> c_int {
            let mut scratch = PathBuf::new();
            if $refuse && config::get().is_some() && (fds::node_of(fd).is_some() || fds::is_upper_dir(fd)) {
                return fail(Errno::PERM);
            }
            match fd_change_target(fd, &mut scratch) {
                Ok(true) => {
                    let $path = scratch.as_cstr().as_ptr();
                    return unsafe { $call };
                }
                Ok(false) => {}
                Err(e) => return fail(e),
            }
            let cname = concat!(stringify!($name), "\0");
            let cname = CStr::from_bytes_with_nul(cname.as_bytes()).unwrap_or(c"");
            let real = real_fn!($real, cname, unsafe extern "C" fn(c_int $(, $ty)*) -> c_int);
            unsafe { real(fd $(, $arg)*) }
        }
    };
}

fd_change!(fchmod, REAL_FCHMOD, (fd: c_int, mode: libc::mode_t), |p| chmod(p, mode));
fd_change!(fchown, REAL_FCHOWN, (fd: c_int, uid: libc::uid_t, gid: libc::gid_t), |p| chown(p, uid, gid));
fd_change!(futimens, REAL_FUTIMENS, (fd: c_int, times: *const libc::timespec), |p| utimensat(libc::AT_FDCWD, p, times, 0));
fd_change!(futimes, REAL_FUTIMES, (fd: c_int, times: *const libc::timeval), |p| utimes(p, times));
fd_change!(fsetxattr, REAL_FSETXATTR, (fd: c_int, name: *const c_char, value: *const c_void, size: usize, flags: c_int), |p| setxattr(p, name, value, size, flags), refuse_if overlay_xattr(name));
fd_change!(fremovexattr, REAL_FREMOVEXATTR, (fd: c_int, name: *const c_char), |p| removexattr(p, name), refuse_if overlay_xattr(name));

static REAL_FUTIMESAT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// futimesat(2): with a null path it changes the descriptor's own file.
#[no_mangle]
pub unsafe extern "C" fn futimesat(
    dirfd: c_int,
    path: *const c_char,
    times: *const libc::timeval,
) -> c_int {
    if path.is_null() {
        return unsafe { futimes(dirfd, times) };
    }
    let mut scratch = PathBuf::new();
    let path = match change_target(dirfd, path, EXISTING, &mut scratch) {
        Err(result) => return result,
        Ok(Some(_)) => scratch.as_cstr().as_ptr(),
        Ok(None) => path,
    };
    let real = real_fn!(
        REAL_FUTIMESAT,
        c"futimesat",
        unsafe extern "C" fn(c_int, *const c_char, *const libc::timeval) -> c_int
    );
    unsafe { real(dirfd, path, times) }
}
