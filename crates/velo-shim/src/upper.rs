//! The run's upper directory: where the program's changes to the tree go, in the kernel
//! overlayfs format that velo's commit reads and `velo run --isolate --upper` mounts
//! (a whiteout is a 0/0 character device, which Linux lets any user make since 5.8; an
//! opaque directory carries `user.overlay.opaque=y`).
//!
//! A tree file is copied up on its first change: into an `O_TMPFILE` in the upper
//! directory, then linked into place, so a process that races another to copy the same
//! file finds the other's complete copy (`EEXIST`), never half of one. Before the upper
//! first holds anything in a tree directory, that directory's bit is set in the run's
//! shared bitmap, which every lookup consults before it asks the upper.

use core::sync::atomic::Ordering;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use velo_view::{Kind, Layer, Node, UpperEntry, PATH_MAX};

use crate::config::{Config, PathBuf};

/// The xattr that makes an upper directory hide the tree's directory of its name.
const OPAQUE: &core::ffi::CStr = c"user.overlay.opaque";

/// The upper as the view's resolver asks about it.
pub struct ShimLayer<'c>(pub &'c Config);

impl Layer for ShimLayer<'_> {
    fn touched(&self, dir: u32) -> bool {
        is_touched(self.0, dir)
    }

    fn entry(&self, rel: &[u8], target: &mut [u8; PATH_MAX]) -> UpperEntry {
        let mut path = PathBuf::new();
        if !host_path(self.0, rel, &mut path) {
            return UpperEntry::Absent;
        }
        let Ok(st) = rustix::fs::statat(CWD, path.as_cstr(), AtFlags::SYMLINK_NOFOLLOW) else {
            return UpperEntry::Absent;
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::CharacterDevice if st.st_rdev == 0 => UpperEntry::Whiteout,
            FileType::Directory => UpperEntry::Dir {
                opaque: is_opaque(&path),
            },
            FileType::Symlink => {
                match rustix::fs::readlinkat_raw(CWD, path.as_cstr(), &mut target[..]) {
                    Ok(n) if n < PATH_MAX => UpperEntry::Symlink(n),
                    _ => UpperEntry::File,
                }
            }
            _ => UpperEntry::File,
        }
    }
}

/// Whether the run has an upper (else every change is refused).
pub fn writable(config: &Config) -> bool {
    !config.upper.as_bytes().is_empty()
}

fn is_touched(config: &Config, dir: u32) -> bool {
    config
        .touched
        .get(dir as usize / 8)
        .is_some_and(|byte| byte.load(Ordering::Acquire) & (1 << (dir % 8)) != 0)
}

/// Tree directory `dir` may now have entries in the upper, or a copy there: set before
/// they are made, so no process misses them.
pub fn mark(config: &Config, dir: Option<u32>) {
    if let Some(byte) = dir.and_then(|d| config.touched.get(d as usize / 8).map(|b| (b, d))) {
        byte.0.fetch_or(1 << (byte.1 % 8), Ordering::AcqRel);
    }
}

/// `<upper>/<rel>` (the upper itself for an empty `rel`).
pub fn host_path(config: &Config, rel: &[u8], out: &mut PathBuf) -> bool {
    if rel.is_empty() {
        out.set(&[config.upper.as_bytes()])
    } else {
        out.set(&[config.upper.as_bytes(), b"/", rel])
    }
}

fn is_opaque(path: &PathBuf) -> bool {
    let mut value = [0u8; 4];
    matches!(rustix::fs::lgetxattr(path.as_cstr(), OPAQUE, &mut value), Ok(n) if n >= 1 && value[0] == b'y')
}

/// Marks the upper directory at `path` opaque (it was made where the tree had an entry
/// the program deleted: nothing of the tree's may show through it).
pub fn make_opaque(path: &PathBuf) -> Result<(), Errno> {
    rustix::fs::lsetxattr(
        path.as_cstr(),
        OPAQUE,
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
}

/// The parent part and the name of `rel` (`a/b/c` → `a/b`, `c`).
pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&rel[..0], rel),
    }
}

/// Makes every directory of `rel` exist in the upper (copies of the tree's, with their
/// modes), and returns the tree directory `rel` stands on, if any (for [`mark`]).
pub fn ensure_dirs(config: &Config, rel: &[u8]) -> Result<Option<u32>, Errno> {
    let view = &config.view;
    let mut current = Some(0u32);
    let mut end = 0;
    let mut path = PathBuf::new();
    for name in rel.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
        end = rel[end..]
            .iter()
            .position(|&b| b != b'/')
            .map_or(rel.len(), |i| end + i)
            + name.len();
        let tree_dir = match current {
            Some(dir) => {
                let dir = view.node(dir).map_err(|_| Errno::IO)?;
                match view.child(&dir, name).map_err(|_| Errno::IO)? {
                    Some(c) if view.node(c).map_err(|_| Errno::IO)?.kind == Kind::Dir => Some(c),
                    _ => None,
                }
            }
            None => None,
        };
        if !host_path(config, &rel[..end], &mut path) {
            return Err(Errno::NAMETOOLONG);
        }
        match rustix::fs::statat(CWD, path.as_cstr(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                current = if is_opaque(&path) { None } else { tree_dir };
            }
            Ok(_) => return Err(Errno::NOTDIR),
            Err(Errno::NOENT) => {
                let Some(dir) = tree_dir else {
                    // A directory the tree lacks and the upper lacks: the lookup that led
                    // here saw it, so it was removed meanwhile.
                    return Err(Errno::NOENT);
                };
                let mode = view.node(dir).map_err(|_| Errno::IO)?.mode & 0o7777;
                mark(config, current);
                // The directory's own bit too: its metadata now comes from the upper.
                mark(config, Some(dir));
                match rustix::fs::mkdirat(CWD, path.as_cstr(), Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
                // The umask must not narrow the tree's mode.
                let _ = rustix::fs::chmodat(
                    CWD,
                    path.as_cstr(),
                    Mode::from_raw_mode(mode),
                    AtFlags::empty(),
                );
                current = Some(dir);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(current)
}

/// Copies tree node `node` (at `rel`) up into the upper unless a copy is there already;
/// afterwards `rel` in the upper is the program's to change.
pub fn copy_up(config: &Config, node: &Node, rel: &[u8]) -> Result<(), Errno> {
    let (parent, _) = split(rel);
    let mut path = PathBuf::new();
    if !host_path(config, rel, &mut path) {
        return Err(Errno::NAMETOOLONG);
    }
    if node.kind == Kind::Dir {
        ensure_dirs(config, rel)?;
        return Ok(());
    }
    let parent_dir = ensure_dirs(config, parent)?;
    match rustix::fs::statat(CWD, path.as_cstr(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st)
            if !(FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
                && st.st_rdev == 0) =>
        {
            return Ok(());
        }
        _ => {}
    }
    mark(config, parent_dir);
    let mtime = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: node.mtime_ns.div_euclid(1_000_000_000) as _,
            tv_nsec: node.mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    };
    if node.kind == Kind::Symlink {
        let target = config.view.target(node).map_err(|_| Errno::IO)?;
        let mut t = PathBuf::new();
        if !t.set(&[target]) {
            return Err(Errno::NAMETOOLONG);
        }
        match rustix::fs::symlinkat(t.as_cstr(), CWD, path.as_cstr()) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Ok(()),
            Err(e) => return Err(e),
        }
        let _ = rustix::fs::utimensat(CWD, path.as_cstr(), &mtime, AtFlags::SYMLINK_NOFOLLOW);
        return Ok(());
    }
    let mut dir = PathBuf::new();
    if !host_path(config, parent, &mut dir) {
        return Err(Errno::NAMETOOLONG);
    }
    let mode = Mode::from_raw_mode(node.mode & 0o777);
    let copy = rustix::fs::openat(
        CWD,
        dir.as_cstr(),
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        mode,
    )?;
    let mut blob = PathBuf::new();
    if !crate::entry::blob_path(config, node, &mut blob) {
        return Err(Errno::NAMETOOLONG);
    }
    let source = rustix::fs::openat(
        CWD,
        blob.as_cstr(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|_| Errno::IO)?;
    copy_bytes(&source, &copy, node.size)?;
    rustix::fs::fchmod(&copy, mode)?;
    rustix::fs::futimens(&copy, &mtime)?;
    // Linked into place only when whole: a racing copy-up finds one or the other.
    let mut proc_path = PathBuf::new();
    let mut digits = [0u8; 10];
    let fd_text = crate::config::decimal(rustix::fd::AsRawFd::as_raw_fd(&copy) as u32, &mut digits);
    proc_path.set(&[b"/proc/self/fd/", fd_text]);
    match rustix::fs::linkat(
        CWD,
        proc_path.as_cstr(),
        CWD,
        path.as_cstr(),
        AtFlags::SYMLINK_FOLLOW,
    ) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies `len` bytes: a reflink where the file system shares extents, else
/// `copy_file_range`, else reads and writes.
fn copy_bytes(
    source: &rustix::fd::OwnedFd,
    copy: &rustix::fd::OwnedFd,
    len: u64,
) -> Result<(), Errno> {
    if len == 0 || rustix::fs::ioctl_ficlone(copy, source).is_ok() {
        return Ok(());
    }
    let mut done = 0u64;
    while done < len {
        match rustix::fs::copy_file_range(source, None, copy, None, (len - done) as usize) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) if done == 0 => {
                let mut buf = [0u8; 16384];
                loop {
                    let n = rustix::io::read(source, &mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    let mut at = 0;
                    while at < n {
                        at += rustix::io::write(copy, &buf[at..n])?;
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes `rel` from the merged view where the tree has it: a whiteout in its place
/// (whatever the upper held there is removed first by the caller).
pub fn whiteout(config: &Config, rel: &[u8]) -> Result<(), Errno> {
    let (parent, _) = split(rel);
    let dir = ensure_dirs(config, parent)?;
    mark(config, dir);
    let mut path = PathBuf::new();
    if !host_path(config, rel, &mut path) {
        return Err(Errno::NAMETOOLONG);
    }
    match rustix::fs::mknodat(
        CWD,
        path.as_cstr(),
        FileType::CharacterDevice,
        Mode::empty(),
        0,
    ) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a whiteout at `path`, if one is there (before something is made in its
/// place); whether there was one.
pub fn clear_whiteout(path: &PathBuf) -> bool {
    match rustix::fs::statat(CWD, path.as_cstr(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st)
            if FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
                && st.st_rdev == 0 =>
        {
            rustix::fs::unlinkat(CWD, path.as_cstr(), AtFlags::empty()).is_ok()
        }
        _ => false,
    }
}

/// Whether merged tree directory `dir` (at `rel`) shows no entry: each tree child is
/// whited out and the upper directory holds only whiteouts.
pub fn merged_is_empty(config: &Config, dir: &Node, rel: &[u8]) -> Result<bool, Errno> {
    let view = &config.view;
    let layer = ShimLayer(config);
    let mut target = [0u8; PATH_MAX];
    let mut child_rel = PathBuf::new();
    for i in 0..dir.child_count {
        let child = view.node(dir.first_child + i).map_err(|_| Errno::IO)?;
        let name = view.name(&child).map_err(|_| Errno::IO)?;
        let parts: [&[u8]; 3] = if rel.is_empty() {
            [name, b"", b""]
        } else {
            [rel, b"/", name]
        };
        if !child_rel.set(&parts) {
            return Err(Errno::NAMETOOLONG);
        }
        if layer.entry(child_rel.as_bytes(), &mut target) != UpperEntry::Whiteout {
            return Ok(false);
        }
    }
    let mut path = PathBuf::new();
    if !host_path(config, rel, &mut path) {
        return Err(Errno::NAMETOOLONG);
    }
    let fd = match rustix::fs::openat(
        CWD,
        path.as_cstr(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(true),
        Err(e) => return Err(e),
    };
    let mut empty = true;
    for_each_entry(&fd, |name, st| {
        let whiteout = st.is_some_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
        });
        if !whiteout {
            let _ = name;
            empty = false;
        }
    })?;
    Ok(empty)
}

/// Calls `each` with the name and `lstat` of every entry of directory `fd` but `.` and
/// `..` (reading with raw `getdents64`: no allocation, no libc stream).
pub fn for_each_entry(
    fd: &rustix::fd::OwnedFd,
    mut each: impl FnMut(&core::ffi::CStr, Option<rustix::fs::Stat>),
) -> Result<(), Errno> {
    let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut entries = rustix::fs::RawDir::new(fd, &mut buf);
    while let Some(entry) = entries.next() {
        let entry = entry?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        each(
            name,
            rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW).ok(),
        );
    }
    Ok(())
}

/// Empties upper directory `rel` of whiteouts and removes it (a merged directory that
/// [`merged_is_empty`] found empty, before a whiteout takes its place).
pub fn remove_dir(config: &Config, rel: &[u8]) -> Result<(), Errno> {
    let mut path = PathBuf::new();
    if !host_path(config, rel, &mut path) {
        return Err(Errno::NAMETOOLONG);
    }
    if let Ok(fd) = rustix::fs::openat(
        CWD,
        path.as_cstr(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        let mut failed = None;
        for_each_entry(&fd, |name, _| {
            if let Err(e) = rustix::fs::unlinkat(&fd, name, AtFlags::empty()) {
                failed = Some(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    match rustix::fs::unlinkat(CWD, path.as_cstr(), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The upper directory of tree directory `dir`, opened for a merged listing, when the
/// upper may hold entries in it; else -1.
pub fn open_merged(config: &Config, dir: u32) -> i32 {
    if !writable(config) || !is_touched(config, dir) {
        return -1;
    }
    let mut buf = [0u8; PATH_MAX];
    let Some(len) = config.view.path_of(b"", dir, &mut buf) else {
        return -1;
    };
    let rel = buf[..len].strip_prefix(b"/").unwrap_or(&buf[..len]);
    let mut path = PathBuf::new();
    if !host_path(config, rel, &mut path) {
        return -1;
    }
    match rustix::fs::openat(
        CWD,
        path.as_cstr(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Ok(fd) => rustix::fd::IntoRawFd::into_raw_fd(fd),
        Err(_) => -1,
    }
}

/// The upper's copy of tree directory `dir`, if the command changed it (made entries in
/// it, chmod'ed it): its mode, owner and times are what `stat` reports.
pub fn dir_copy(config: &Config, dir: &Node) -> Option<rustix::fs::Stat> {
    // The top's copy is the upper itself, whose mode is velo's (0700), not the tree's.
    if dir.kind != Kind::Dir
        || dir.index == 0
        || !writable(config)
        || !is_touched(config, dir.index)
    {
        return None;
    }
    let mut buf = [0u8; PATH_MAX];
    let len = config.view.path_of(b"", dir.index, &mut buf)?;
    let rel = buf[..len].strip_prefix(b"/").unwrap_or(&buf[..len]);
    let mut path = PathBuf::new();
    if !host_path(config, rel, &mut path) {
        return None;
    }
    rustix::fs::statat(CWD, path.as_cstr(), AtFlags::SYMLINK_NOFOLLOW)
        .ok()
        .filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}
