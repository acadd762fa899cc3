//! The mount's upper directory, in the one upper format (kernel overlayfs: a whiteout is a
//! 0/0 character device, an opaque directory carries `user.overlay.opaque=y`) that the
//! shim writes and velo-project's commit reads.
//!
//! Every path here is relative to the upper's top and is opened beneath it without
//! following a symlink on the way (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`),
//! so nothing a program makes on the mount can lead the server outside its upper.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use fuser::Errno;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};

/// The xattrs of the overlay format: programs on the mount may neither set nor see them.
pub(crate) const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["user.overlay.", "trusted.overlay."];
/// velo's bookkeeping xattrs (a tree never records them): programs on the mount may
/// neither set, remove nor see them.
pub(crate) const VELO_XATTR_PREFIX: &str = "user.velo.";
const OPAQUE: &str = "user.overlay.opaque";

/// The upper directory, open.
pub(crate) struct Upper {
    root: OwnedFd,
}

pub(crate) fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

pub(crate) fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc_eio()))
}

fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}

impl Upper {
    pub(crate) fn open(path: &Path) -> std::io::Result<Upper> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Upper { root })
    }

    /// Opens `rel` beneath the top, following no symlink.
    pub(crate) fn open_at(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
        let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        rustix::fs::openat2(
            &self.root,
            rel,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(errno)
    }

    /// The directory `rel`, open for `*at` calls.
    pub(crate) fn dir(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        self.open_at(rel, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// The file system statistics of the upper (where writes go).
    pub(crate) fn statvfs(&self) -> Result<rustix::fs::StatVfs, Errno> {
        rustix::fs::fstatvfs(&self.root).map_err(errno)
    }
}

/// What is at `name` in `dir`, not following a symlink; `None` if nothing.
pub(crate) fn stat_at(dir: &OwnedFd, name: &[u8]) -> Result<Option<Stat>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

pub(crate) fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

pub(crate) fn is_opaque(dir: &impl AsFd) -> bool {
    let mut buf = [0u8; 4];
    ["user.overlay.opaque", "trusted.overlay.opaque"].iter().any(
        |name| matches!(rustix::fs::fgetxattr(dir, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y'),
    )
}

pub(crate) fn make_opaque(dir: &impl AsFd) -> Result<(), Errno> {
    rustix::fs::fsetxattr(dir, OPAQUE, b"y", rustix::fs::XattrFlags::empty()).map_err(errno)
}

/// Deletes `name` for the layers below: a whiteout.
pub(crate) fn whiteout(dir: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
    rustix::fs::mknodat(dir, name, FileType::CharacterDevice, Mode::empty(), 0).map_err(errno)
}

/// Removes a whiteout at `name` (a name being made again); false if there was none.
pub(crate) fn clear_whiteout(dir: &OwnedFd, name: &[u8]) -> Result<bool, Errno> {
    match stat_at(dir, name)? {
        Some(st) if is_whiteout(&st) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(errno)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The entries of an upper directory: name, inode number, whether it is a whiteout.
pub(crate) fn entries(dir: &OwnedFd) -> Result<Vec<(Vec<u8>, u64, bool)>, Errno> {
    let mut out = Vec::new();
    let listing = rustix::fs::Dir::read_from(dir).map_err(errno)?;
    for item in listing {
        let item = item.map_err(errno)?;
        let name = item.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let whiteout = item.file_type() == FileType::CharacterDevice
            && stat_at(dir, name)?.is_some_and(|st| is_whiteout(&st));
        out.push((name.to_vec(), item.ino(), whiteout));
    }
    Ok(out)
}

fn timespec(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// Sets `name`'s modification time (and access time) to `mtime_ns`, not following it.
pub(crate) fn set_mtime(dir: &OwnedFd, name: &[u8], mtime_ns: i64) -> Result<(), Errno> {
    let t = timespec(mtime_ns);
    rustix::fs::utimensat(
        dir,
        name,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
}

/// Runs `op`, which changes directory `dir` only as a side effect of velo's own
/// bookkeeping (a copy-up), and puts the directory's times back.
pub(crate) fn keeping_times<T>(
    dir: &OwnedFd,
    op: impl FnOnce() -> Result<T, Errno>,
) -> Result<T, Errno> {
    let before = rustix::fs::fstat(dir).map_err(errno)?;
    let out = op()?;
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: before.st_atime,
            tv_nsec: before.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: before.st_mtime,
            tv_nsec: before.st_mtime_nsec as _,
        },
    };
    rustix::fs::futimens(dir, &times).map_err(errno)?;
    Ok(out)
}

/// Copies the blob `src` to a new file `name` in `dir` with `mode` and `mtime_ns`, whole
/// or not at all: written into an unnamed file, then linked into place. `empty`: only the
/// file is made (it is about to be truncated). Returns the new file, open read-write.
pub(crate) fn copy_file(
    dir: &OwnedFd,
    name: &[u8],
    src: Option<&File>,
    mode: u32,
    mtime_ns: i64,
) -> Result<File, Errno> {
    let file = anonymous_copy(dir, src, mode, mtime_ns)?;
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(errno)?;
    Ok(file)
}

/// A file with no name on `dir`'s file system holding `src`'s bytes (none: empty) with
/// `mode` and the mtime `mtime_ns`.
pub(crate) fn anonymous_copy(
    dir: &OwnedFd,
    src: Option<&File>,
    mode: u32,
    mtime_ns: i64,
) -> Result<File, Errno> {
    let tmp = rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(errno)?;
    let file = File::from(tmp);
    if let Some(src) = src {
        copy_bytes(src, &file)?;
    }
    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
    let t = timespec(mtime_ns);
    rustix::fs::futimens(
        &file,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    )
    .map_err(errno)?;
    Ok(file)
}

fn copy_bytes(src: &File, dst: &File) -> Result<(), Errno> {
    if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let len = src.metadata().map_err(io_errno)?.len();
    let mut copied = 0u64;
    while copied < len {
        let (mut off_in, mut off_out) = (copied, copied);
        match rustix::fs::copy_file_range(
            src,
            Some(&mut off_in),
            dst,
            Some(&mut off_out),
            (len - copied).min(1 << 30) as usize,
        ) {
            Ok(0) => break,
            Ok(n) => copied += n as u64,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => {
                return copy_by_reads(src, dst, copied, len);
            }
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

fn copy_by_reads(src: &File, dst: &File, mut at: u64, len: u64) -> Result<(), Errno> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let n = src.read_at(&mut buf, at).map_err(io_errno)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], at).map_err(io_errno)?;
        at += n as u64;
    }
    Ok(())
}
