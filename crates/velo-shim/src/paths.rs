//! Which paths are the tree's, and where they lead: the virtual working directory, the
//! descriptors of tree directories, lexical normalisation of absolute paths, and the view
//! index's resolver.

use core::ffi::CStr;
use core::sync::atomic::{AtomicU32, Ordering};

use rustix::io::Errno;
use velo_view::{Layered, PATH_MAX};

use crate::config::{Config, PathBuf};
use crate::{fds, upper};

/// The working directory when it is a tree directory (its node), [`HOST`] when it is the
/// host's, [`UNSET`] before the first look (then the configuration's start directory).
static CWD: AtomicU32 = AtomicU32::new(UNSET);
const HOST: u32 = u32::MAX;
const UNSET: u32 = u32::MAX - 1;

/// The tree directory the process works in, if any.
pub fn cwd(config: &Config) -> Option<u32> {
    match CWD.load(Ordering::Relaxed) {
        UNSET => {
            let start = config.start_cwd.unwrap_or(HOST);
            let _ = CWD.compare_exchange(UNSET, start, Ordering::Relaxed, Ordering::Relaxed);
            cwd(config)
        }
        HOST => None,
        node => Some(node),
    }
}

/// The process now works in tree directory `node`, or on the host.
pub fn set_cwd(node: Option<u32>) {
    CWD.store(node.unwrap_or(HOST), Ordering::Relaxed);
    HOST_CWD_KNOWN.store(false, Ordering::Relaxed);
}

/// The host working directory, when it is above `at` (so that a relative path such as
/// `vrift/x` from `/` leads into the tree); read again after every change of directory.
struct HostCwd(core::cell::UnsafeCell<PathBuf>);

// SAFETY: written only while HOST_CWD_KNOWN is false by the thread that set it to
// UPDATING; a racing reader sees KNOWN false and treats the path as the host's. A chdir
// racing a lookup in another thread is a race in the program itself.
unsafe impl Sync for HostCwd {}

static HOST_CWD: HostCwd = HostCwd(core::cell::UnsafeCell::new(PathBuf::new()));
static HOST_CWD_KNOWN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static HOST_CWD_UPDATING: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);
/// Whether the known host working directory is in the upper (`HOST_CWD` then holds the
/// tree path it stands for).
static HOST_CWD_IN_UPPER: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);
/// Whether the known host working directory is `at` or above it, or in the upper.
static HOST_CWD_ABOVE_AT: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// The host working directory if it is above `at`; if it is a directory of the run's
/// upper, the tree path it stands for (`<upper>/a/b` is `<at>/a/b`).
pub fn host_cwd_relevant(config: &Config) -> Option<&'static PathBuf> {
    if !HOST_CWD_KNOWN.load(Ordering::Acquire) {
        if HOST_CWD_UPDATING.swap(true, Ordering::Acquire) {
            return None;
        }
        let mut buf = [0u8; PATH_MAX];
        // SAFETY: the getcwd system call into a buffer of PATH_MAX bytes.
        let len = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
        // SAFETY: see `HostCwd`.
        let cwd = unsafe { &mut *HOST_CWD.0.get() };
        let relevant = if len > 1 {
            let path = &buf[..len as usize - 1];
            let at = config.at.as_bytes();
            let upper = config.upper.as_bytes();
            if !upper.is_empty() && is_under(path, upper) {
                HOST_CWD_IN_UPPER.store(true, Ordering::Relaxed);
                cwd.set(&[at, &path[upper.len()..]])
            } else {
                HOST_CWD_IN_UPPER.store(false, Ordering::Relaxed);
                cwd.set(&[path]);
                path == b"/"
                    || at
                        .strip_prefix(path)
                        .is_some_and(|rest| rest.first() == Some(&b'/'))
            }
        } else {
            false
        };
        HOST_CWD_ABOVE_AT.store(relevant, Ordering::Relaxed);
        HOST_CWD_KNOWN.store(true, Ordering::Release);
        HOST_CWD_UPDATING.store(false, Ordering::Release);
    }
    if HOST_CWD_ABOVE_AT.load(Ordering::Relaxed) {
        // SAFETY: KNOWN was seen true: the buffer is not being written.
        Some(unsafe { &*HOST_CWD.0.get() })
    } else {
        None
    }
}

/// The tree path of the descriptor a `/proc/self/fd/N`-style `path` names, when it is one
/// of a tree node or of a directory of the upper (into `out`).
pub fn descriptor_path(config: &Config, path: &[u8], out: &mut PathBuf) -> bool {
    let Some(fd) = proc_fd(path) else {
        return false;
    };
    if let Some(node) = fds::node_of(fd) {
        return path_of(config, node, out);
    }
    fds::is_upper_dir(fd) && upper_dir_path(config, fd, out)
}

/// Whether relative `path` could lead into the tree at `at` from a host directory: it
/// names `at`'s last component, or goes up (`..`). Others are the kernel's alone, and
/// cost no look at the directory they start from.
fn may_reach(path: &[u8], at: &[u8]) -> bool {
    let last = at.rsplit(|&b| b == b'/').next().unwrap_or(at);
    path.split(|&b| b == b'/')
        .any(|part| part == b".." || part == last)
}

/// The host path descriptor `fd` is open on, into `out`.
fn fd_path(fd: i32, out: &mut PathBuf) -> bool {
    if fd < 0 {
        return false;
    }
    let mut link = PathBuf::new();
    let mut digits = [0u8; 10];
    link.set(&[
        b"/proc/self/fd/",
        crate::config::decimal(fd as u32, &mut digits),
    ]);
    let mut buf = [0u8; PATH_MAX];
    match rustix::fs::readlinkat_raw(rustix::fs::CWD, link.as_cstr(), &mut buf[..]) {
        Ok(len) if len < PATH_MAX && len > 0 && buf[0] == b'/' => out.set(&[&buf[..len]]),
        _ => false,
    }
}

/// The tree path of upper directory descriptor `fd` into `out` (false if it is no longer
/// in the upper).
fn upper_dir_path(config: &Config, fd: i32, out: &mut PathBuf) -> bool {
    let mut host = PathBuf::new();
    if !fd_path(fd, &mut host) {
        return false;
    }
    let path = host.as_bytes();
    let upper = config.upper.as_bytes();
    !upper.is_empty()
        && is_under(path, upper)
        && out.set(&[config.at.as_bytes(), &path[upper.len()..]])
}

/// The tree path of the host working directory when it is a directory of the upper
/// (what `getcwd` reports there).
pub fn cwd_in_upper(config: &Config) -> Option<&'static PathBuf> {
    let cwd = host_cwd_relevant(config)?;
    HOST_CWD_IN_UPPER.load(Ordering::Relaxed).then_some(cwd)
}

/// Where a path argument leads.
pub enum Target {
    /// Not the tree's: pass the call through with its own arguments.
    Host,
    /// A tree path that leads out of the tree: use the host path in the scratch buffer.
    HostPath,
    /// An entry of the run's upper directory (a file or symlink the program made or
    /// changed, or a directory the tree lacks): its host path is in the scratch buffer,
    /// and the call goes to it.
    Upper,
    /// A node of the tree (a directory may be merged with an upper one).
    Node(u32),
    /// Nothing there; when `last` (the missing name was the path's last component), the
    /// scratch buffer holds the upper path where a create would make it (empty in a run
    /// without an upper).
    Missing { last: bool },
    /// The lookup fails with this error.
    Fail(Errno),
}

/// Where `path`, relative to `dirfd` (or the working directory for `AT_FDCWD`), leads.
pub fn lookup(
    config: &Config,
    dirfd: i32,
    path: &CStr,
    follow: bool,
    scratch: &mut PathBuf,
) -> Target {
    let bytes = path.to_bytes();
    let at = config.at.as_bytes();
    // `/proc/self/fd/N` (and `/dev/fd/N`) of a descriptor that stands for a node is that
    // node: reopening it must not reach the blob or the empty directory behind it.
    if let Some(fd) = proc_fd(bytes) {
        if let Some(node) = fds::node_of(fd) {
            return Target::Node(node);
        }
    }
    let mut target = if bytes.first() == Some(&b'/') {
        if is_under(bytes, at) {
            resolve(config, 0, bytes, follow, scratch)
        } else if needs_normalising(bytes) {
            let mut normal = PathBuf::new();
            if !normalise(bytes, &mut normal) || !is_under(normal.as_bytes(), at) {
                return Target::Host;
            }
            resolve(config, 0, normal.as_bytes(), follow, scratch)
        } else {
            return Target::Host;
        }
    } else {
        let start = if dirfd == libc::AT_FDCWD {
            cwd(config)
        } else {
            fds::node_of(dirfd)
        };
        let Some(start) = start else {
            if bytes.is_empty() {
                return Target::Host;
            }
            let mut base = PathBuf::new();
            let in_upper = if dirfd == libc::AT_FDCWD {
                match cwd_in_upper(config) {
                    Some(virtual_cwd) => base.set(&[virtual_cwd.as_bytes()]),
                    None => false,
                }
            } else if fds::is_upper_dir(dirfd) {
                // A directory of the upper: where it is in the tree.
                if !upper_dir_path(config, dirfd, &mut base) {
                    return Target::Fail(Errno::NOENT);
                }
                true
            } else {
                false
            };
            let mut joined = PathBuf::new();
            if in_upper {
                // From a directory of the upper, the walk goes through the merged view
                // (its `..` and symlinks too) and leaves the tree only above its top:
                // never by the kernel's path from the upper directory itself.
                if !joined.set(&[base.as_bytes(), b"/", bytes]) {
                    return Target::Fail(Errno::NAMETOOLONG);
                }
                return match resolve(config, 0, joined.as_bytes(), follow, scratch) {
                    Target::Host => Target::Fail(Errno::IO),
                    other => other,
                };
            }
            // From a host directory (the working directory, or a descriptor) above the
            // tree (`vrift/x` from `/`): joined and normalised, it may lead in.
            if !may_reach(bytes, at) {
                return Target::Host;
            }
            let host = if dirfd == libc::AT_FDCWD {
                match host_cwd_relevant(config) {
                    Some(host) => host,
                    None => return Target::Host,
                }
            } else {
                if !fd_path(dirfd, &mut base) {
                    return Target::Host;
                }
                &base
            };
            let mut normal = PathBuf::new();
            if !joined.set(&[host.as_bytes(), b"/", bytes])
                || !normalise(joined.as_bytes(), &mut normal)
                || !is_under(normal.as_bytes(), at)
            {
                return Target::Host;
            }
            return resolve(config, 0, normal.as_bytes(), follow, scratch);
        };
        if bytes.is_empty() {
            return Target::Fail(Errno::NOENT);
        }
        resolve(config, start, bytes, follow, scratch)
    };
    // A path that leaves the tree may come back into it (`../vrift/x` from the top).
    for _ in 0..8 {
        if !matches!(target, Target::HostPath) || !is_under(scratch.as_bytes(), at) {
            break;
        }
        let mut again = PathBuf::new();
        again.set(&[scratch.as_bytes()]);
        target = resolve(config, 0, again.as_bytes(), follow, scratch);
    }
    target
}

/// Resolves `path` from tree directory `start` through the run's upper.
fn resolve(
    config: &Config,
    start: u32,
    path: &[u8],
    follow: bool,
    scratch: &mut PathBuf,
) -> Target {
    let mut out = [0u8; PATH_MAX];
    let mut rel = [0u8; PATH_MAX];
    let mut rel_len = 0;
    let resolved = config.view.resolve_layered(
        config.at.as_bytes(),
        start,
        path,
        follow,
        &upper::ShimLayer(config),
        &mut out,
        &mut rel,
        &mut rel_len,
    );
    let in_upper = |scratch: &mut PathBuf| upper::host_path(config, &rel[..rel_len], scratch);
    match resolved {
        Layered::Tree(n) => Target::Node(n),
        Layered::Upper => {
            if in_upper(scratch) {
                Target::Upper
            } else {
                Target::Fail(Errno::NAMETOOLONG)
            }
        }
        Layered::Missing { last, .. } => {
            if !last || !upper::writable(config) {
                scratch.set(&[]);
            } else if !in_upper(scratch) {
                // The name fits the tree, but not under the upper's (longer) path.
                return Target::Fail(Errno::NAMETOOLONG);
            }
            Target::Missing { last }
        }
        Layered::NotDir => Target::Fail(Errno::NOTDIR),
        Layered::Loop => Target::Fail(Errno::LOOP),
        Layered::TooLong => Target::Fail(Errno::NAMETOOLONG),
        Layered::Damaged => Target::Fail(Errno::IO),
        Layered::Outside(n) => {
            if scratch.set(&[&out[..n]]) {
                Target::HostPath
            } else {
                Target::Fail(Errno::NAMETOOLONG)
            }
        }
    }
}

/// The path of upper entry `host` (a scratch buffer [`lookup`] filled) relative to the
/// tree's top.
pub fn rel_of<'p>(config: &Config, host: &'p PathBuf) -> &'p [u8] {
    let bytes = host.as_bytes();
    match bytes.strip_prefix(config.upper.as_bytes()) {
        Some(rest) => rest.strip_prefix(b"/").unwrap_or(rest),
        None => b"",
    }
}

/// Whether `path` is `/proc/self/exe` or `/proc/<own pid>/exe`.
pub fn is_own_exe(path: &[u8]) -> bool {
    if path == b"/proc/self/exe" {
        return true;
    }
    path.strip_prefix(b"/proc/")
        .and_then(|rest| rest.strip_suffix(b"/exe"))
        .and_then(parse_number)
        .is_some_and(|pid| pid == rustix::process::getpid().as_raw_nonzero().get())
}

/// The descriptor number of a path that names one of this process's descriptors:
/// `/proc/self/fd/N`, `/proc/thread-self/fd/N`, `/proc/<own pid or one of its
/// threads>/fd/N`, `/proc/self/task/<tid>/fd/N`, `/dev/fd/N`, `/dev/stdin`, `/dev/stdout`,
/// `/dev/stderr` (any of them with doubled slashes). Reopening one must reach what the
/// descriptor stands for, never the blob behind it.
fn proc_fd(path: &[u8]) -> Option<i32> {
    if !(path.starts_with(b"/proc/") || path.starts_with(b"/dev/") || path.starts_with(b"//")) {
        return None;
    }
    let mut normal = PathBuf::new();
    let path = if path.windows(2).any(|w| w == b"//") || path.ends_with(b"/") {
        if !normalise(path, &mut normal) {
            return None;
        }
        normal.as_bytes()
    } else {
        path
    };
    match path {
        b"/dev/stdin" => return Some(0),
        b"/dev/stdout" => return Some(1),
        b"/dev/stderr" => return Some(2),
        _ => {}
    }
    let own_task = |id: &[u8]| -> bool {
        let Some(n) = parse_number(id) else {
            return false;
        };
        if n == rustix::process::getpid().as_raw_nonzero().get() {
            return true;
        }
        // Another thread of this process.
        let mut task = PathBuf::new();
        task.set(&[b"/proc/self/task/", id]);
        rustix::fs::statat(
            rustix::fs::CWD,
            task.as_cstr(),
            rustix::fs::AtFlags::empty(),
        )
        .is_ok()
    };
    let rest = if let Some(rest) = path.strip_prefix(b"/dev/fd/") {
        rest
    } else {
        let after = path.strip_prefix(b"/proc/")?;
        let slash = after.iter().position(|&b| b == b'/')?;
        let (who, mut tail) = after.split_at(slash);
        match who {
            b"self" | b"thread-self" => {}
            id if own_task(id) => {}
            _ => return None,
        }
        if let Some(task) = tail.strip_prefix(b"/task/") {
            let slash = task.iter().position(|&b| b == b'/')?;
            if !own_task(&task[..slash]) {
                return None;
            }
            tail = &task[slash..];
        }
        tail.strip_prefix(b"/fd/")?
    };
    parse_number(rest)
}

fn parse_number(digits: &[u8]) -> Option<i32> {
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0i32, |n, d| n * 10 + i32::from(d - b'0')),
    )
}

/// `path` is `at` or below it.
fn is_under(path: &[u8], at: &[u8]) -> bool {
    path.strip_prefix(at)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}

/// Whether `path` holds `//`, `.` or `..` components (which may lead into the tree from
/// a path that does not begin with it).
fn needs_normalising(path: &[u8]) -> bool {
    path.windows(2).any(|w| w == b"//" || w == b"/.")
}

/// Lexical normalisation of an absolute path: `//` and `.` dropped, `..` removes the
/// component before it. False if it does not fit.
fn normalise(path: &[u8], out: &mut PathBuf) -> bool {
    let mut buf = [0u8; PATH_MAX];
    let mut len = 0;
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                len = buf[..len].iter().rposition(|&b| b == b'/').unwrap_or(0);
            }
            name => {
                if len + 1 + name.len() > PATH_MAX {
                    return false;
                }
                buf[len] = b'/';
                buf[len + 1..len + 1 + name.len()].copy_from_slice(name);
                len += 1 + name.len();
            }
        }
    }
    if len == 0 {
        return out.set(&[b"/"]);
    }
    out.set(&[&buf[..len]])
}

/// The virtual absolute path of `node` into `out`: `at` and the names from the root.
pub fn path_of(config: &Config, node: u32, out: &mut PathBuf) -> bool {
    let mut buf = [0u8; PATH_MAX];
    match config.view.path_of(config.at.as_bytes(), node, &mut buf) {
        Some(len) => out.set(&[&buf[..len]]),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_is_lexical() {
        let mut out = PathBuf::new();
        for (path, want) in [
            ("/a/../vrift/x", "/vrift/x"),
            ("//vrift/./x//y/", "/vrift/x/y"),
            ("/../..", "/"),
            ("/vrift/..", "/"),
        ] {
            assert!(normalise(path.as_bytes(), &mut out));
            assert_eq!(out.as_bytes(), want.as_bytes(), "{path}");
        }
        assert!(is_under(b"/vrift", b"/vrift"));
        assert!(is_under(b"/vrift/a", b"/vrift"));
        assert!(!is_under(b"/vriftx", b"/vrift"));
    }
}
