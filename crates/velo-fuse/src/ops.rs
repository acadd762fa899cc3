//! The FUSE requests: each one a lookup in the namespace ([`crate::inodes`]) and, for a
//! change, a copy-up and the matching call on the upper.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use velo_view::Kind;

use crate::inodes::{kind_of, kind_of_mode, CopyUp, FdKey, State};
use crate::upper::{self, errno, io_errno};
use crate::workspace::shown;
use crate::{Open, TreeFs};

/// The attributes of a negative entry: only its inode number, 0, counts.
const NO_ENTRY: FileAttr = FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: UNIX_EPOCH,
    mtime: UNIX_EPOCH,
    ctime: UNIX_EPOCH,
    crtime: UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

/// One entry of a directory listing.
pub(crate) struct DirEntry {
    ino: u64,
    kind: FileType,
    name: Box<[u8]>,
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn time_ns(ns: i64) -> SystemTime {
    time(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

fn timespec(t: Option<TimeOrNow>) -> rustix::fs::Timespec {
    const UTIME_NOW: i64 = (1 << 30) - 1;
    const UTIME_OMIT: i64 = (1 << 30) - 2;
    match t {
        None => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT as _,
        },
        Some(TimeOrNow::Now) => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW as _,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
                Err(e) => {
                    // fuser 0.17 turns the kernel's (seconds < 0, nanoseconds) into
                    // epoch - (|seconds| + nanoseconds): undone here, so a time before 1970
                    // is the one the program set.
                    let d = e.duration();
                    (-(d.as_secs() as i64), i64::from(d.subsec_nanos()))
                }
            };
            rustix::fs::Timespec {
                tv_sec: sec,
                tv_nsec: nsec as _,
            }
        }
    }
}

fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn is_overlay_xattr(name: &[u8]) -> bool {
    upper::OVERLAY_XATTR_PREFIXES
        .iter()
        .any(|p| name.starts_with(p.as_bytes()))
}

/// velo's own bookkeeping (`velo mount --upper` records the upper's tree in the upper
/// root's `user.velo.base`): a program that could set or remove one would decide which
/// tree the next mount applies the upper to.
fn is_velo_xattr(name: &[u8]) -> bool {
    name.starts_with(upper::VELO_XATTR_PREFIX.as_bytes())
}

/// Attributes a program on the mount never sees: the upper format's and velo's own.
fn is_hidden_xattr(name: &[u8]) -> bool {
    is_overlay_xattr(name) || is_velo_xattr(name)
}

fn proc_fd(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

impl TreeFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn opens(&self) -> MutexGuard<'_, crate::Opens> {
        self.opens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by every change; `EROFS` when the mount has no upper.
    fn change(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, Errno> {
        if self.ns.upper.is_none() {
            return Err(Errno::EROFS);
        }
        let gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Errno::ESTALE);
        }
        Ok(gate)
    }

    /// How long the kernel may keep an entry of directory `parent`: the top's entries
    /// only as long as [`TreeFs::with_shared_top`] says.
    fn entry_ttl(&self, parent: u64) -> Duration {
        if parent == self.ns.root() {
            self.top_ttl
        } else {
            self.ttl
        }
    }

    /// How long the kernel may keep the attributes of `ino` (the top's: see
    /// [`TreeFs::with_shared_top`]).
    fn attr_ttl(&self, ino: u64) -> Duration {
        self.entry_ttl(ino)
    }

    /// See `read`: `file` was read as inode `ino`'s; if that is still the host lower's
    /// file, it must still be the indexed one.
    fn recheck_lower_read(&self, ino: u64, file: &File) -> Result<(), Errno> {
        let info = self.ns.info(&self.state(), ino)?;
        match info.lower {
            Some(index) if !info.upper => self.ns.recheck_host_file(file, &self.ns.node(index)?),
            _ => Ok(()),
        }
    }

    /// Answers a lookup of this namespace's root from elsewhere (a workspace's
    /// `.velo/branches/NAME`), kept by the kernel for `ttl`.
    pub(crate) fn root_entry(&self, ttl: Duration, reply: ReplyEntry) {
        self.reply_entry(&mut self.state(), self.ns.root(), None, ttl, reply);
    }

    /// The attributes of this namespace's root (the kernel's references to a root are
    /// not counted: a root is never forgotten).
    pub(crate) fn root_attr(&self) -> Result<FileAttr, Errno> {
        self.attr(&mut self.state(), self.ns.root(), None)
    }

    fn tree_attr(&self, ino: u64, node: &velo_view::Node, linked: bool) -> FileAttr {
        let mtime = time_ns(node.mtime_ns);
        let (kind, nlink) = match node.kind {
            Kind::File => (FileType::RegularFile, 1),
            Kind::Dir => (FileType::Directory, 2 + self.tree_subdirs(node)),
            Kind::Symlink => (FileType::Symlink, 1),
        };
        FileAttr {
            ino: INodeNo(shown(ino, kind)),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (node.mode & 0o7777) as u16,
            nlink: if linked { nlink } else { 0 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    fn tree_subdirs(&self, dir: &velo_view::Node) -> u32 {
        (0..dir.child_count)
            .filter(|i| {
                self.ns
                    .view
                    .node(dir.first_child + i)
                    .is_ok_and(|c| c.kind == Kind::Dir)
            })
            .count() as u32
    }

    fn stat_attr(ino: u64, s: &Stat) -> FileAttr {
        let mtime = time(s.st_mtime, s.st_mtime_nsec as i64);
        FileAttr {
            ino: INodeNo(shown(ino, kind_of_mode(s.st_mode))),
            size: s.st_size as u64,
            blocks: s.st_blocks as u64,
            atime: time(s.st_atime, s.st_atime_nsec as i64),
            mtime,
            ctime: time(s.st_ctime, s.st_ctime_nsec as i64),
            crtime: mtime,
            kind: kind_of_mode(s.st_mode),
            perm: (s.st_mode & 0o7777) as u16,
            nlink: s.st_nlink as u32,
            uid: s.st_uid,
            gid: s.st_gid,
            rdev: s.st_rdev as u32,
            flags: 0,
            blksize: s.st_blksize as u32,
        }
    }

    /// The upper object of `ino`, `stat`ed (through an open handle when it has no name).
    fn upper_stat(&self, st: &State, ino: u64) -> Result<Stat, Errno> {
        match self.ns.parent_dir(st, ino) {
            Ok((dir, name)) => {
                rustix::fs::statat(&*dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
            }
            Err(e) => match self.open_file_of(ino) {
                Some(file) => rustix::fs::fstat(&*file).map_err(errno),
                None => Err(e),
            },
        }
    }

    /// An open file of `ino`, if any handle has one.
    fn open_file_of(&self, ino: u64) -> Option<Arc<File>> {
        if let Some(file) = self.kept_inode_file(ino) {
            return Some(file);
        }
        // Never a blob: what this is asked for may change the file.
        self.opens()
            .by_handle
            .values()
            .find(|o| o.ino == ino && !o.from_tree)
            .map(|o| o.file.clone())
    }

    /// Handle `fh`'s file if it is the upper file (a change may go to it), not a blob.
    fn upper_handle_file(&self, fh: FileHandle) -> Option<Arc<File>> {
        self.opens()
            .by_handle
            .get(&u64::from(fh))
            .filter(|o| !o.from_tree)
            .map(|o| o.file.clone())
    }

    fn attr(&self, st: &mut State, ino: u64, stat: Option<&Stat>) -> Result<FileAttr, Errno> {
        let info = self.ns.info(st, ino)?;
        if !info.upper {
            let node = self.ns.node(info.lower.ok_or(Errno::ENOENT)?)?;
            return Ok(self.tree_attr(ino, &node, info.linked));
        }
        let s = match stat {
            Some(s) => *s,
            None => self.upper_stat(st, ino)?,
        };
        let mut attr = Self::stat_attr(ino, &s);
        if ino == self.ns.root() {
            // The upper's top is a private directory of velo's; the root shows the
            // tree's mode and the mounting user, as before any change.
            let node = self.ns.node(0)?;
            attr.perm = (node.mode & 0o7777) as u16;
            attr.uid = self.uid;
            attr.gid = self.gid;
        }
        if info.kind == FileType::Directory && info.lower.is_some() && info.linked {
            // A merged directory: its subdirectories from both layers.
            let subdirs = self
                .listing(st, ino)?
                .iter()
                .filter(|e| e.kind == FileType::Directory)
                .count();
            attr.nlink = 2 + subdirs as u32;
        }
        if !info.linked {
            attr.nlink = 0;
        }
        Ok(attr)
    }

    /// The kernel took a reference to `ino` (an entry it was given); whether `ino` is
    /// recorded, so counted (tree nodes never recorded need no count).
    fn count_lookup(st: &mut State, ino: u64) -> bool {
        st.inodes.get_mut(&ino).map(|i| i.nlookup += 1).is_some()
    }

    /// The kernel dropped `n` references to `ino`: an object no name and no reference
    /// leads to any more is forgotten. Objects made on the mount are counted from birth;
    /// tree nodes stay recorded.
    fn drop_lookups(st: &mut State, ino: u64, n: u64) {
        let gone = st.inodes.get_mut(&ino).is_some_and(|i| {
            i.nlookup = i.nlookup.saturating_sub(n);
            i.nlookup == 0 && i.links.is_empty() && i.lower.is_none()
        });
        if gone {
            st.inodes.remove(&ino);
        }
    }

    /// Replies with `ino`'s entry, counting the kernel's new reference.
    fn reply_entry(
        &self,
        st: &mut State,
        ino: u64,
        stat: Option<&Stat>,
        ttl: Duration,
        reply: ReplyEntry,
    ) {
        match self.attr(st, ino, stat) {
            Ok(attr) => {
                Self::count_lookup(st, ino);
                reply.entry(&ttl, &attr, Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    /// The merged listing of directory `ino` (without `.` and `..`).
    fn listing(&self, st: &mut State, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let info = self.ns.info(st, ino)?;
        let mut out = Vec::new();
        if !info.linked {
            return Ok(out);
        }
        let mut in_upper = std::collections::HashSet::new();
        if info.upper {
            let dir = self.ns.dir_of(st, ino)?;
            for (name, upper_ino, whiteout) in upper::entries(&dir)? {
                in_upper.insert(name.clone());
                if whiteout {
                    continue;
                }
                let child = match st.by_upper.get(&upper_ino) {
                    Some(&child) => child,
                    None => {
                        let Some(s) = upper::stat_at(&dir, &name)? else {
                            continue;
                        };
                        let lower = self.ns.lower_child(st, &info, &name);
                        self.ns.record(st, &dir, ino, &name, &s, lower)
                    }
                };
                let kind = self.ns.info(st, child).map(|i| i.kind)?;
                out.push(DirEntry {
                    ino: child,
                    kind,
                    name: name.into(),
                });
            }
        }
        if let Some(lower) = info.lower {
            let dir = self.ns.node(lower)?;
            for index in dir.first_child..dir.first_child + dir.child_count {
                let child = self.ns.node(index)?;
                let name = self.ns.view.name(&child).map_err(|_| Errno::EIO)?;
                if st.dead.contains(&index) || in_upper.contains(name) {
                    continue;
                }
                out.push(DirEntry {
                    ino: self.ns.ino_of(index),
                    kind: kind_of(child.kind),
                    name: name.into(),
                });
            }
        }
        Ok(out)
    }

    /// The listing readdir serves for directory `ino` from `offset`: `None` for a tree
    /// directory the upper does not touch (read from the view, which never changes);
    /// else the merged listing, taken afresh at offset 0 and kept for the calls that
    /// continue it, so offsets stay stable while one reader goes through it.
    fn dir_listing(&self, ino: u64, offset: u64) -> Result<Option<Arc<Vec<DirEntry>>>, Errno> {
        let mut st = self.state();
        let info = self.ns.info(&st, ino)?;
        if info.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        if !info.upper && info.linked {
            return Ok(None);
        }
        if offset > 0 {
            if let Some(kept) = self.listings().get(&ino) {
                return Ok(Some(kept.clone()));
            }
        }
        let entries = Arc::new(self.listing(&mut st, ino)?);
        let mut listings = self.listings();
        if listings.len() >= 1024 {
            listings.clear();
        }
        listings.insert(ino, entries.clone());
        Ok(Some(entries))
    }

    /// Lists directory `ino` from `offset` into `emit` (the entry's inode, the offset of
    /// the entry after it, its kind and name) until `emit` says the reply is full.
    /// Offsets: 0 `.`, 1 `..`, 2 + i the i-th entry.
    fn list_from(
        &self,
        ino: u64,
        offset: u64,
        mut emit: impl FnMut(u64, u64, FileType, &OsStr) -> Result<bool, Errno>,
    ) -> Result<(), Errno> {
        let parent = {
            let st = self.state();
            if ino == self.ns.root() {
                ino
            } else {
                self.ns
                    .link(&st, ino)
                    .map(|l| l.0)
                    .unwrap_or(self.ns.root())
            }
        };
        let listed = self.dir_listing(ino, offset)?;
        let (count, tree_dir) = match &listed {
            Some(entries) => (entries.len() as u64, None),
            None => {
                let node = self.ns.tree_node(ino)?;
                if node.kind != Kind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                (u64::from(node.child_count), Some(node))
            }
        };
        let hidden = self.hidden_top_name.filter(|_| ino == self.ns.root());
        let mut emit = |entry, next, kind, name: &OsStr| {
            if hidden.is_some_and(|h| name.as_bytes() == h) {
                return Ok(false);
            }
            emit(entry, next, kind, name)
        };
        for position in offset..2 + count {
            let full = match position {
                0 => emit(ino, 1, FileType::Directory, OsStr::new("."))?,
                1 => emit(parent, 2, FileType::Directory, OsStr::new(".."))?,
                _ => {
                    let i = (position - 2) as usize;
                    if let Some(entries) = &listed {
                        let e = &entries[i];
                        emit(e.ino, position + 1, e.kind, OsStr::from_bytes(&e.name))?
                    } else {
                        let Some(dir) = &tree_dir else { break };
                        let index = dir.first_child + i as u32;
                        let child = self.ns.node(index).map_err(|_| Errno::EIO)?;
                        let name = self.ns.view.name(&child).map_err(|_| Errno::EIO)?;
                        emit(
                            self.ns.ino_of(index),
                            position + 1,
                            kind_of(child.kind),
                            OsStr::from_bytes(name),
                        )?
                    }
                }
            };
            if full {
                break;
            }
        }
        Ok(())
    }

    fn listings(&self) -> MutexGuard<'_, std::collections::HashMap<u64, Arc<Vec<DirEntry>>>> {
        self.listings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// As root, what the mount makes belongs to the caller (the kernel checked that the
    /// caller may make it).
    fn own(&self, req: &Request, dir: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
        if !self.as_root || (req.uid() == 0 && req.gid() == 0) {
            return Ok(());
        }
        let parent = rustix::fs::fstat(dir).map_err(errno)?;
        // A set-group-ID directory gives its group, as the file system already did.
        let gid = (parent.st_mode & 0o2000 == 0).then(|| rustix::fs::Gid::from_raw(req.gid()));
        let made = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(req.uid())),
            gid,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno)?;
        // chown drops set-id bits; the caller made its own file with them, as it may.
        let kind = rustix::fs::FileType::from_raw_mode(made.st_mode);
        if made.st_mode & 0o6000 != 0 && kind != rustix::fs::FileType::Symlink {
            rustix::fs::chmodat(
                dir,
                name,
                Mode::from_raw_mode(made.st_mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        Ok(())
    }

    /// Makes room for a new object `parent`/`name`: the parent in the upper, no whiteout
    /// in the way. Returns the parent's upper directory and whether a tree entry of that
    /// name existed (a new directory there must be opaque).
    fn prepare_name(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
    ) -> Result<(Arc<OwnedFd>, bool), Errno> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if self.ns.find(st, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let p = self.ns.info(st, parent)?;
        if !p.linked {
            return Err(Errno::ENOENT);
        }
        let dir = self.ns.upper_dir(st, parent)?;
        let cleared = upper::clear_whiteout(&dir, name)?;
        let over_tree = cleared || self.ns.any_lower_child(&p, name).is_some();
        if let Some(c) = self.ns.any_lower_child(&p, name) {
            st.dead.insert(c);
        }
        Ok((dir, over_tree))
    }

    /// Makes a new object with `make` after [`Self::prepare_name`]; a whiteout it had
    /// to remove is put back if the making fails.
    fn make(
        &self,
        req: &Request,
        parent: u64,
        name: &[u8],
        make: impl FnOnce(&OwnedFd) -> Result<Option<File>, Errno>,
    ) -> Result<(u64, Stat, Option<File>), Errno> {
        let mut st = self.state();
        let (dir, over_tree) = self.prepare_name(&mut st, parent, name)?;
        let file = match make(&dir) {
            Ok(file) => file,
            Err(e) => {
                if over_tree {
                    let _ = upper::whiteout(&dir, name);
                }
                return Err(e);
            }
        };
        self.own(req, &dir, name)?;
        let s = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        if over_tree && kind_of_mode(s.st_mode) == FileType::Directory {
            let sub = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            upper::make_opaque(&sub)?;
        }
        let ino = self.ns.record_new(&mut st, parent, name, &s);
        Self::count_lookup(&mut st, ino);
        Ok((ino, s, file))
    }

    /// Whether some open of `ino` reads its blob through passthrough: its bytes cannot
    /// change until they close (the kernel would go on reading the blob for them).
    fn read_through_passthrough(opens: &crate::Opens, ino: u64) -> bool {
        opens
            .by_handle
            .values()
            .any(|o| o.ino == ino && o.passthrough && o.from_tree)
    }

    /// Hands open `fh` of `ino` to the kernel for passthrough where it can be: a tree file
    /// opened for reading reads its blob (read-only, so nothing can write a blob); an
    /// upper file is read and written straight, so writes cost what they cost on the
    /// upper's file system. The kernel keeps one backing file per inode: while one open
    /// uses it, every other open of the inode must use the same one, so the first
    /// passthrough open makes it and the others share it. A tree file opened for writing
    /// stays with the server (its copy-up waits for the first change), and so does any
    /// open of an inode the server already serves another way.
    /// Returns the backing to reply with, or `None` for an open the server serves.
    fn passthrough_backing(
        &self,
        fh: u64,
        ino: u64,
        register: impl FnOnce(&File) -> std::io::Result<fuser::BackingId>,
    ) -> Option<Arc<fuser::BackingId>> {
        if !self.passthrough.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut opens = self.opens();
        let mut shared = None;
        let mut others = false;
        for (h, o) in &opens.by_handle {
            if *h != fh && o.ino == ino {
                others = true;
                if let Some(backing) = &o.backing {
                    shared = Some((o.file.clone(), backing.clone(), o.from_tree));
                }
            }
        }
        let o = opens.by_handle.get_mut(&fh)?;
        let backing = match shared {
            _ if o.pending => return None,
            Some((file, backing, blob)) => {
                // A reader of the blob reads through the same blob's descriptor (also
                // when the file was copied up since, for a chmod or a rename: its bytes
                // cannot have changed while the blob is read), and counts as a reader
                // of the blob; an upper file's opens keep their own (fsync, fallocate,
                // lseek use it).
                if blob {
                    if o.writable {
                        return None;
                    }
                    o.file = file;
                    o.from_tree = true;
                }
                backing
            }
            None if others => return None,
            None if o.from_tree && o.writable => return None,
            None => match register(&o.file) {
                Ok(backing) => Arc::new(backing),
                Err(e) => {
                    tracing::debug!(error = %e, "no passthrough for this open");
                    return None;
                }
            },
        };
        o.passthrough = true;
        o.backing = Some(backing.clone());
        Some(backing)
    }

    fn new_handle(&self, open: Open) -> u64 {
        let mut opens = self.opens();
        let fh = opens.next;
        opens.next += 1;
        opens.by_handle.insert(fh, open);
        fh
    }

    fn handle_file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.opens()
            .by_handle
            .get(&u64::from(fh))
            .map(|o| o.file.clone())
            .ok_or(Errno::EBADF)
    }

    /// Whether the kernel opens files without asking (no passthrough: see `open`).
    fn no_open(&self) -> bool {
        !self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The file a read of `ino` through handle `fh` reads: the handle's, or for the
    /// kernel's handle 0 (a file it opened without asking) the tree file's blob or the
    /// upper file, kept open by inode.
    fn file_of(&self, ino: u64, fh: FileHandle) -> Result<Arc<File>, Errno> {
        if u64::from(fh) != 0 {
            return self.handle_file(fh);
        }
        if let Some(file) = self.kept_inode_file(ino) {
            return Ok(file);
        }
        let first = self.open_inode_file(&self.state(), ino, false, false);
        match first {
            Err(e) if e.code() == Errno::EACCES.code() && !self.as_root => {
                // Lending the owner permission changes the mode for a moment: not while
                // a commit reads the upper. The gate before the state (the order of
                // every change).
                let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
                let st = self.state();
                let file = self.open_lending(&st, ino)?;
                Ok(self.keep_inode_file(ino, Arc::new(file), false))
            }
            other => other,
        }
    }

    /// `ino`'s upper file if it is kept open by inode.
    fn kept_inode_file(&self, ino: u64) -> Option<Arc<File>> {
        if let Some(file) = self.opens().held.get(&ino) {
            return Some(file.clone());
        }
        self.ns.fds.file(FdKey::File(ino))
    }

    /// `ino`'s file for a request without a handle, with the state held: kept or opened
    /// now (and kept; `held`: until the kernel forgets `ino`). A tree file is read from
    /// its blob (never for writing: the caller copies up first). `writable`: the caller
    /// holds the change gate, so the owner's permission may be lent; a read of a file
    /// its owner may not open gets `EACCES`, for the caller to retry with the gate.
    fn open_inode_file(
        &self,
        st: &State,
        ino: u64,
        writable: bool,
        held: bool,
    ) -> Result<Arc<File>, Errno> {
        if let Some(file) = self.kept_inode_file(ino) {
            return Ok(self.keep_inode_file(ino, file, held));
        }
        let info = self.ns.info(st, ino)?;
        if info.kind == FileType::Directory {
            return Err(Errno::EISDIR);
        }
        if !info.upper {
            if writable {
                return Err(Errno::EBADF);
            }
            let node = self.ns.node(info.lower.ok_or(Errno::ENOENT)?)?;
            return self.ns.cached_blob(&node);
        }
        let file = match self.reopen(st, ino, OFlags::RDWR | OFlags::NONBLOCK) {
            Err(e) if e.code() == Errno::EACCES.code() && writable && !self.as_root => {
                self.open_lending(st, ino)?
            }
            // Executed outside the mount (the upper file itself): reads still work.
            Err(e) if e.code() == Errno::ETXTBSY.code() && !writable => {
                self.reopen(st, ino, OFlags::RDONLY | OFlags::NONBLOCK)?
            }
            other => other?,
        };
        Ok(self.keep_inode_file(ino, Arc::new(file), held))
    }

    /// A tree file deleted while a program may have it open, copied up on its first
    /// change into a file with no name, kept as long as the kernel keeps the inode.
    fn copy_up_deleted(&self, st: &mut State, ino: u64) -> Result<Arc<File>, Errno> {
        let file = self.ns.copy_up_unlinked(st, ino)?;
        Ok(self.keep_inode_file(ino, Arc::new(file), true))
    }

    /// Keeps `file` as `ino`'s upper file: in the descriptor cache, or (`held`, or held
    /// before) until the kernel forgets `ino`.
    fn keep_inode_file(&self, ino: u64, file: Arc<File>, held: bool) -> Arc<File> {
        let mut opens = self.opens();
        if held || opens.held.contains_key(&ino) {
            opens.held.insert(ino, file.clone());
            self.ns.fds.remove(FdKey::File(ino));
        } else {
            self.ns.fds.keep_file(FdKey::File(ino), file.clone());
        }
        file
    }

    /// Opens `ino`'s upper file read-write although its mode does not let its owner (the
    /// server, not root) do so: what the kernel allowed when a program opened it, the
    /// server must do later, also after a chmod took the permission away. The owner's
    /// read and write are lent for the moment of the `open` (through an `O_PATH`
    /// descriptor, so a file with no name left works too); the file's ctime shows it.
    /// The caller holds the change gate.
    fn open_lending(&self, st: &State, ino: u64) -> Result<File, Errno> {
        let path = self.reopen(st, ino, OFlags::PATH)?;
        let s = rustix::fs::fstat(&path).map_err(errno)?;
        if kind_of_mode(s.st_mode) != FileType::RegularFile {
            return Err(Errno::EACCES);
        }
        let through = proc_fd(&path);
        let mode = Mode::from_raw_mode(s.st_mode & 0o7777);
        rustix::fs::chmod(through.as_str(), mode | Mode::RUSR | Mode::WUSR).map_err(errno)?;
        let file = rustix::fs::open(
            through.as_str(),
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        );
        rustix::fs::chmod(through.as_str(), mode).map_err(errno)?;
        file.map(File::from).map_err(errno)
    }

    /// Before the last name of `ino` goes: without opens, any reference the kernel has
    /// may be an open file that reads and writes on until it is closed, so its upper
    /// file stays open until the kernel forgets the inode. (A tree file's blob stays
    /// anyway.) The caller holds the change gate and the state. An error (the server is
    /// out of descriptors) fails the removal: a program that has the file open would
    /// lose its bytes.
    fn hold_before_unlink(&self, st: &State, ino: u64) -> Result<(), Errno> {
        if !self.no_open() {
            return Ok(());
        }
        let Some(i) = st.inodes.get(&ino) else {
            return Ok(());
        };
        // A copied-up tree file's references were not all counted: held too.
        if !i.upper || i.kind != FileType::RegularFile || (i.nlookup == 0 && i.lower.is_none()) {
            return Ok(());
        }
        if i.links.len() > 1 {
            return Ok(());
        }
        self.open_inode_file(st, ino, true, true)
            .map(drop)
            .inspect_err(|e| {
                tracing::warn!(ino, error = ?e, "a file to be removed cannot be kept open: not removed");
            })
    }

    /// The file a change of `ino` through handle `fh` goes to: a tree file is copied up
    /// now (`how`), on its first change.
    fn writable_file(&self, ino: u64, fh: FileHandle, how: CopyUp) -> Result<Arc<File>, Errno> {
        if u64::from(fh) == 0 {
            let mut st = self.state();
            let info = self.ns.info(&st, ino)?;
            if !info.upper && !info.linked {
                return self.copy_up_deleted(&mut st, ino);
            }
            if !info.upper {
                self.copy_up(&mut st, ino, how)?;
            }
            return self.open_inode_file(&st, ino, true, false);
        }
        let (ino, pending) = {
            let opens = self.opens();
            let open = opens.by_handle.get(&u64::from(fh)).ok_or(Errno::EBADF)?;
            if !open.pending {
                return Ok(open.file.clone());
            }
            (open.ino, open.pending)
        };
        if pending {
            let mut st = self.state();
            let info = self.ns.info(&st, ino)?;
            if !info.upper && !info.linked {
                // Deleted (or renamed over) while this handle had it open: its copy is a
                // file with no name, as without handles.
                let file = self.copy_up_deleted(&mut st, ino)?;
                self.point_handles_at(ino, &file);
            } else if !info.upper {
                self.copy_up(&mut st, ino, how)?;
            } else {
                // Copied up through another handle meanwhile: open the copy.
                let file = Arc::new(self.reopen(&st, ino, OFlags::RDWR | OFlags::NONBLOCK)?);
                if let Some(open) = self.opens().by_handle.get_mut(&u64::from(fh)) {
                    open.file = file;
                    open.pending = false;
                }
            }
        }
        self.handle_file(fh)
    }

    /// After a copy-up, reads of every open handle of `ino` come from the upper file.
    fn point_handles_at(&self, ino: u64, file: &Arc<File>) {
        for open in self.opens().by_handle.values_mut() {
            if open.ino == ino && !open.passthrough {
                open.file = file.clone();
                open.pending = false;
                open.from_tree = false;
            }
        }
    }

    /// Copies `ino` up and points its open handles at the copy.
    fn copy_up(&self, st: &mut State, ino: u64, how: CopyUp) -> Result<(), Errno> {
        if let Some(file) = self.ns.copy_up(st, ino, how)? {
            self.point_handles_at(ino, &Arc::new(file));
        }
        Ok(())
    }

    /// Copies up `ino` before it moves. A directory that shows tree entries is copied
    /// up whole, and made opaque: its entries live in the tree under its old path, so
    /// at the new one they must all be in the upper (as `mv` across file systems copies
    /// them; the cost follows the directory's size).
    fn copy_up_moving(&self, st: &mut State, ino: u64) -> Result<(), Errno> {
        let info = self.ns.info(st, ino)?;
        if info.kind != FileType::Directory || info.lower.is_none() {
            return self.copy_up(st, ino, CopyUp::Whole);
        }
        let mut dirs = vec![ino];
        let mut walked = Vec::new();
        while let Some(dir) = dirs.pop() {
            self.copy_up(st, dir, CopyUp::Whole)?;
            for entry in self.listing(st, dir)? {
                if entry.kind == FileType::Directory {
                    dirs.push(entry.ino);
                } else {
                    self.copy_up(st, entry.ino, CopyUp::Whole)?;
                }
            }
            walked.push(dir);
        }
        upper::make_opaque(&*self.ns.dir_of(st, ino)?)?;
        for dir in walked {
            if let Some(i) = st.inodes.get_mut(&dir) {
                i.lower = None;
            }
        }
        Ok(())
    }

    /// `ino`'s upper object as a parent directory and a name (after a copy-up).
    fn at(&self, st: &mut State, ino: u64) -> Result<(Arc<OwnedFd>, Vec<u8>), Errno> {
        self.copy_up(st, ino, CopyUp::Whole)?;
        self.ns.parent_dir(st, ino)
    }

    /// Refuses a directory `levels` deep under directory `parent` that would nest deeper
    /// than a tree may hold (a commit could never seal it).
    fn check_depth(&self, parent: u64, levels: usize) -> Result<(), Errno> {
        let st = self.state();
        self.check_depth_in(&st, parent, levels)
    }

    fn check_depth_in(&self, st: &State, parent: u64, levels: usize) -> Result<(), Errno> {
        if levels > self.room_below(st, parent)? {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(())
    }

    /// How many levels of directories may go under directory `parent`.
    fn room_below(&self, st: &State, parent: u64) -> Result<usize, Errno> {
        let rel = self.ns.rel(st, parent)?;
        let depth = if rel.is_empty() {
            0
        } else {
            1 + rel.iter().filter(|&&b| b == b'/').count()
        };
        // The top is a level of its own.
        Ok(self.max_depth.saturating_sub(depth + 1))
    }

    /// Whether directory `ino` shows no entry.
    fn is_empty_dir(&self, st: &mut State, ino: u64) -> Result<bool, Errno> {
        Ok(self.listing(st, ino)?.is_empty())
    }

    /// Removes the whiteouts of an upper directory that shows nothing, so it can be
    /// removed or replaced.
    fn clear_dir(dir: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
        let sub = match rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(sub) => sub,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(errno(e)),
        };
        for (child, _, whiteout) in upper::entries(&sub)? {
            if !whiteout {
                return Err(Errno::ENOTEMPTY);
            }
            rustix::fs::unlinkat(&sub, child.as_slice(), AtFlags::empty()).map_err(errno)?;
        }
        Ok(())
    }

    fn remove(&self, parent: u64, name: &[u8], dir_wanted: bool) -> Result<(), Errno> {
        let _gate = self.change()?;
        let mut st = self.state();
        let (ino, _) = self.ns.find(&mut st, parent, name)?.ok_or(Errno::ENOENT)?;
        let info = self.ns.info(&st, ino)?;
        let is_dir = info.kind == FileType::Directory;
        if dir_wanted && !is_dir {
            return Err(Errno::ENOTDIR);
        }
        if !dir_wanted && is_dir {
            return Err(Errno::EISDIR);
        }
        if is_dir && !self.is_empty_dir(&mut st, ino)? {
            return Err(Errno::ENOTEMPTY);
        }
        let p = self.ns.info(&st, parent)?;
        let dir = self.ns.upper_dir(&mut st, parent)?;
        self.hold_before_unlink(&st, ino)?;
        if upper::stat_at(&dir, name)?.is_some_and(|s| !upper::is_whiteout(&s)) {
            if is_dir {
                Self::clear_dir(&dir, name)?;
                rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(errno)?;
            } else {
                rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(errno)?;
            }
        }
        // Whiteout wherever the tree has the name, also when an earlier change already
        // hid it (a rename over it, a delete and re-create): without one, removing the
        // upper entry would show the tree's again.
        if let Some(c) = self.ns.any_lower_child(&p, name) {
            upper::whiteout(&dir, name)?;
            st.dead.insert(c);
        }
        self.ns.unlinked(&mut st, ino, parent, name);
        Ok(())
    }

    fn rename_in(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let _gate = self.change()?;
        if flags.contains(RenameFlags::RENAME_WHITEOUT) || newname.len() > 255 {
            return Err(if newname.len() > 255 {
                Errno::ENAMETOOLONG
            } else {
                Errno::EINVAL
            });
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let mut st = self.state();
        let (src, _) = self.ns.find(&mut st, parent, name)?.ok_or(Errno::ENOENT)?;
        let si = self.ns.info(&st, src)?;
        let dst = self.ns.find(&mut st, newparent, newname)?.map(|(i, _)| i);
        // A tree directory's entries live in the tree, under its path: it cannot move
        // (mv copies it instead, as it does across file systems).
        let di = dst.map(|d| self.ns.info(&st, d)).transpose()?;
        match (&di, exchange) {
            (None, true) => return Err(Errno::ENOENT),
            (Some(_), false) if noreplace => return Err(Errno::EEXIST),
            _ => {}
        }
        if dst == Some(src) {
            return Ok(());
        }
        if let (Some(d), false) = (&di, exchange) {
            let src_dir = si.kind == FileType::Directory;
            let dst_dir = d.kind == FileType::Directory;
            if src_dir && !dst_dir {
                return Err(Errno::ENOTDIR);
            }
            if !src_dir && dst_dir {
                return Err(Errno::EISDIR);
            }
            if dst_dir && !self.is_empty_dir(&mut st, dst.unwrap_or(0))? {
                return Err(Errno::ENOTEMPTY);
            }
        }
        self.copy_up_moving(&mut st, src)?;
        if si.kind == FileType::Directory && newparent != parent {
            let room = self.room_below(&st, newparent)?;
            let height = upper_height(&*self.ns.dir_of(&st, src)?, room)?;
            self.check_depth_in(&st, newparent, height)?;
        }
        if let (Some(d), true) = (dst, exchange) {
            self.copy_up_moving(&mut st, d)?;
        }
        let si = self.ns.info(&st, src)?;
        let pinfo = self.ns.info(&st, parent)?;
        let npinfo = self.ns.info(&st, newparent)?;
        let sdir = self.ns.upper_dir(&mut st, parent)?;
        let ddir = self.ns.upper_dir(&mut st, newparent)?;
        let src_tree_here = self.ns.any_lower_child(&pinfo, name);
        let tree_at_dst = self.ns.any_lower_child(&npinfo, newname);
        let open_dir = |dir: &OwnedFd, n: &[u8]| {
            rustix::fs::openat(
                dir,
                n,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)
        };
        // A directory that lands where the tree has an entry must hide the tree's.
        if si.kind == FileType::Directory && tree_at_dst.is_some() {
            upper::make_opaque(&open_dir(&sdir, name)?)?;
        }
        if exchange {
            if let Some(d) = &di {
                if d.kind == FileType::Directory && self.ns.any_lower_child(&pinfo, name).is_some()
                {
                    upper::make_opaque(&open_dir(&ddir, newname)?)?;
                }
            }
        }
        let mut restore_whiteout = false;
        if !exchange {
            match upper::stat_at(&ddir, newname)? {
                Some(s)
                    if upper::is_whiteout(&s) && (si.kind == FileType::Directory || noreplace) =>
                {
                    rustix::fs::unlinkat(&ddir, newname, AtFlags::empty()).map_err(errno)?;
                    restore_whiteout = true;
                }
                Some(s) if kind_of_mode(s.st_mode) == FileType::Directory => {
                    Self::clear_dir(&ddir, newname)?;
                }
                _ => {}
            }
        }
        if let (Some(d), false) = (dst, exchange) {
            self.hold_before_unlink(&st, d)?;
        }
        let mut how = rustix::fs::RenameFlags::empty();
        if exchange {
            how |= rustix::fs::RenameFlags::EXCHANGE;
        }
        if noreplace {
            how |= rustix::fs::RenameFlags::NOREPLACE;
        }
        if let Err(e) = rustix::fs::renameat_with(&sdir, name, &ddir, newname, how) {
            if restore_whiteout {
                let _ = upper::whiteout(&ddir, newname);
            }
            return Err(errno(e));
        }
        if !exchange {
            if let Some(c) = src_tree_here {
                upper::whiteout(&sdir, name)?;
                st.dead.insert(c);
            }
            if let Some(c) = self.ns.lower_child(&st, &npinfo, newname) {
                st.dead.insert(c);
            }
            if let Some(d) = dst {
                self.ns.unlinked(&mut st, d, newparent, newname);
            }
            self.ns
                .moved(&mut st, src, (parent, name), (newparent, newname));
        } else if let Some(d) = dst {
            self.ns
                .moved(&mut st, src, (parent, name), (newparent, newname));
            self.ns
                .moved(&mut st, d, (newparent, newname), (parent, name));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // setattr's own fields, one per argument
    fn set_attr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
        kill: bool,
    ) -> Result<FileAttr, Errno> {
        let _gate = self.change()?;
        if ino == self.ns.root() && (mode.is_some() || uid.is_some() || gid.is_some()) {
            // A tree records no mode or owner for its root, and the upper's top stays
            // private.
            return Err(Errno::EPERM);
        }
        let mut st = self.state();
        let info = self.ns.info(&st, ino)?;
        let handle = fh.and_then(|fh| self.upper_handle_file(fh));
        if !info.linked {
            if !info.upper {
                // A deleted tree file that is still open reads its blob, which nothing may
                // change: its changes go to a copy with no name (without opens; with
                // handles they have nowhere to go).
                if !self.no_open() {
                    return Err(Errno::EPERM);
                }
                self.copy_up_deleted(&mut st, ino)?;
            }
            // Deleted but open: only through the open file.
            let file = handle
                .clone()
                .or_else(|| self.open_file_of(ino))
                .ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                rustix::fs::fchmod(&*file, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                rustix::fs::fchown(
                    &*file,
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                )
                .map_err(errno)?;
            }
            if let Some(size) = size {
                rustix::fs::ftruncate(&*file, size).map_err(errno)?;
                if kill {
                    kill_privileges(&file)?;
                }
            }
            if atime.is_some() || mtime.is_some() {
                rustix::fs::futimens(
                    &*file,
                    &rustix::fs::Timestamps {
                        last_access: timespec(atime),
                        last_modification: timespec(mtime),
                    },
                )
                .map_err(errno)?;
            }
            let s = rustix::fs::fstat(&*file).map_err(errno)?;
            let mut attr = Self::stat_attr(ino, &s);
            attr.nlink = 0;
            return Ok(attr);
        }
        if size.is_some() && Self::read_through_passthrough(&self.opens(), ino) {
            return Err(Errno::ETXTBSY);
        }
        let how = if size == Some(0) && info.kind == FileType::RegularFile && !info.upper {
            CopyUp::Empty
        } else {
            CopyUp::Whole
        };
        self.copy_up(&mut st, ino, how)?;
        // After the copy-up: a handle opened for writing now has the copy.
        let handle = match fh {
            Some(fh) if u64::from(fh) != 0 => self.upper_handle_file(fh),
            Some(_) if size.is_some() => self.open_inode_file(&st, ino, true, false).ok(),
            _ => None,
        };
        let (dir, name) = self.at(&mut st, ino)?;
        if let Some(mode) = mode {
            rustix::fs::chmodat(
                &dir,
                name.as_slice(),
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(
                &dir,
                name.as_slice(),
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(size) = size {
            match &handle {
                Some(file) if rustix::fs::ftruncate(&**file, size).is_ok() => {}
                _ => {
                    let file = rustix::fs::openat(
                        &dir,
                        name.as_slice(),
                        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(errno)?;
                    rustix::fs::ftruncate(&file, size).map_err(errno)?;
                }
            }
            if kill {
                let file = rustix::fs::openat(
                    &*dir,
                    name.as_slice(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)?;
                kill_privileges(&File::from(file))?;
            }
        }
        if atime.is_some() || mtime.is_some() {
            rustix::fs::utimensat(
                &dir,
                name.as_slice(),
                &rustix::fs::Timestamps {
                    last_access: timespec(atime),
                    last_modification: timespec(mtime),
                },
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        let s =
            rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        self.attr(&mut st, ino, Some(&s))
    }

    fn open_file(&self, ino: u64, flags: i32) -> Result<(u64, FopenFlags), Errno> {
        let raw = OFlags::from_bits_retain(flags as u32);
        let accmode = raw & (OFlags::WRONLY | OFlags::RDWR);
        let writes = !accmode.is_empty();
        let st = self.state();
        let info = self.ns.info(&st, ino)?;
        if info.kind == FileType::Directory {
            return Err(Errno::EISDIR);
        }
        let lower_node = if info.upper {
            None
        } else {
            Some(self.ns.node(info.lower.ok_or(Errno::ENOENT)?)?)
        };
        drop(st);
        // No flush on close: writes are done when they are answered (no writeback
        // cache) and locks are the kernel's, so a flush would be a round trip for nothing.
        let flags = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH;
        if let Some(node) = lower_node {
            // A tree file, also when opened for writing: the copy-up waits for the first
            // change, which is often a truncation (`>`), and then copies nothing.
            if writes {
                drop(self.change()?);
            }
            let file = self.ns.cached_blob(&node)?;
            let mut opens = self.opens();
            if writes && Self::read_through_passthrough(&opens, ino) {
                return Err(Errno::ETXTBSY);
            }
            let fh = opens.next;
            opens.next += 1;
            opens.by_handle.insert(
                fh,
                Open {
                    ino,
                    file,
                    pending: writes,
                    writable: writes,
                    from_tree: true,
                    passthrough: false,
                    backing: None,
                },
            );
            return Ok((fh, flags));
        }
        let file = if writes {
            let _gate = self.change()?;
            let st = self.state();
            if Self::read_through_passthrough(&self.opens(), ino) {
                return Err(Errno::ETXTBSY);
            }
            // Offsets come with every write: O_APPEND would make the file system ignore
            // them (the kernel already placed appends at the end).
            // Read-write even when asked write-only, where the mode lets the server: the
            // kernel may read through any writable handle to fill a partly written page.
            let keep = OFlags::SYNC | OFlags::DSYNC;
            match self.reopen(&st, ino, OFlags::RDWR | (raw & keep) | OFlags::NONBLOCK) {
                Err(e) if e.code() == Errno::EACCES.code() => {
                    let access = raw & (OFlags::WRONLY | OFlags::RDWR);
                    self.reopen(&st, ino, access | (raw & keep) | OFlags::NONBLOCK)?
                }
                other => other?,
            }
        } else {
            let st = self.state();
            self.reopen(&st, ino, OFlags::RDONLY | OFlags::NONBLOCK)?
        };
        let fh = self.new_handle(Open {
            ino,
            file: Arc::new(file),
            pending: false,
            writable: writes,
            from_tree: false,
            passthrough: false,
            backing: None,
        });
        Ok((fh, flags))
    }

    /// Opens `ino`'s upper object with `flags` (through an open handle when it has no
    /// name left).
    fn reopen(&self, st: &State, ino: u64, flags: OFlags) -> Result<File, Errno> {
        match self.ns.parent_dir(st, ino) {
            Ok((dir, name)) => rustix::fs::openat(
                &*dir,
                name.as_slice(),
                flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map(File::from)
            .map_err(errno),
            Err(e) => {
                let open = self.open_file_of(ino).ok_or(e)?;
                rustix::fs::open(
                    proc_fd(&*open).as_str(),
                    flags | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map(File::from)
                .map_err(errno)
            }
        }
    }

    /// `ino`'s object for the xattr calls: an `O_PATH` descriptor reached through
    /// `/proc/self/fd` (which follows to the object itself, symlink or not).
    fn xattr_target(&self, st: &State, ino: u64) -> Result<OwnedFd, Errno> {
        let (dir, name) = self.ns.parent_dir(st, ino)?;
        rustix::fs::openat(
            &*dir,
            name.as_slice(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)
    }
}

/// How many levels of directories the upper directory `dir` holds (itself included), or
/// some number above `limit` once it is known to hold more: a rename needs no more.
///
/// A program on the mount chooses the shape of what it renames (tens of thousands of
/// subdirectories, chains a thousand deep), and the server's descriptors are shared with
/// every other user of it, so the walk holds at most three whatever the shape: it keeps
/// the directory it is in and the one it looks into, goes down by closing where it was and
/// comes back up through `..`. Whatever it cannot read fails the walk: a directory it
/// skipped could hide the level too many.
fn upper_height(dir: &OwnedFd, limit: usize) -> Result<usize, Errno> {
    let open = |at: &OwnedFd, name: &[u8]| {
        rustix::fs::openat(
            at,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)
    };
    if limit == 0 {
        return Ok(1);
    }
    let mut here = open(dir, b".")?;
    // The way down: each level's identity (to know `..` led back to it) and the
    // subdirectories it has left to walk.
    let mut path = vec![(dir_id(&here)?, subdirs(&here)?)];
    let mut deepest = 1;
    while let Some((_, left)) = path.last_mut() {
        let Some(name) = left.pop() else {
            path.pop();
            let Some((id, _)) = path.last() else {
                break;
            };
            let up = open(&here, b"..")?;
            // Only a change made beside the server (the upper is the server's while it
            // holds the state) could lead elsewhere; a count from there would mean nothing.
            if dir_id(&up)? != *id {
                return Err(Errno::ESTALE);
            }
            here = up;
            continue;
        };
        let level = path.len() + 1;
        deepest = deepest.max(level);
        if deepest > limit {
            return Ok(deepest);
        }
        let sub = open(&here, &name)?;
        let below = subdirs(&sub)?;
        // A directory with nothing below is counted without going into it (and back).
        if !below.is_empty() {
            path.push((dir_id(&sub)?, below));
            here = sub;
        }
    }
    Ok(deepest)
}

fn dir_id(dir: &OwnedFd) -> Result<(u64, u64), Errno> {
    let st = rustix::fs::fstat(dir).map_err(errno)?;
    Ok((st.st_dev, st.st_ino))
}

/// The names of upper directory `dir`'s subdirectories (whiteouts are devices).
fn subdirs(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let mut out = Vec::new();
    for item in rustix::fs::Dir::read_from(dir).map_err(errno)? {
        let item = item.map_err(errno)?;
        let name = item.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match item.file_type() {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::Unknown => upper::stat_at(dir, name)?.is_some_and(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
            }),
            _ => false,
        };
        if is_dir {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

/// What writing or truncating a file takes away (the kernel leaves it to the server:
/// FUSE_HANDLE_KILLPRIV_V2): the set-uid bit, the set-group-ID bit where group execute
/// is set, and file capabilities.
fn kill_privileges(file: &File) -> Result<(), Errno> {
    let st = rustix::fs::fstat(file).map_err(errno)?;
    let mut mode = st.st_mode & 0o7777;
    mode &= !0o4000;
    if mode & 0o010 != 0 {
        mode &= !0o2000;
    }
    if mode != st.st_mode & 0o7777 {
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode)).map_err(errno)?;
    }
    // Asked first: removing an absent capability is EPERM for a server that is not root.
    let mut probe = [0u8; 64];
    if rustix::fs::fgetxattr(file, "security.capability", &mut probe).is_ok() {
        match rustix::fs::fremovexattr(file, "security.capability") {
            Ok(()) | Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// Asks the kernel for what the server wants of it; whether it agreed to passthrough
/// (asked for when `want_passthrough`).
pub(crate) fn configure(config: &mut KernelConfig, want_passthrough: bool) -> bool {
    // Not FUSE_ATOMIC_O_TRUNC: with it, `open(O_RDONLY|O_TRUNC)` of a running program
    // would truncate in the server before the kernel refuses it (ETXTBSY); without
    // it, the truncation comes as a setattr after the kernel's checks.
    // FUSE_HANDLE_KILLPRIV_V2: the server drops set-uid/set-gid bits and file
    // capabilities when a file is written, truncated or chowned (the kernel says when,
    // in the request), so the kernel does not ask for `security.capability` before
    // every write (a round trip each, four per file of an untar).
    // Not FUSE_WRITEBACK_CACHE: the kernel would keep mtimes itself and write pages
    // back later, so the upper (and so a commit) would hold other mtimes than the mount
    // showed (found by git and make on the mount).
    // FUSE_DO_READDIRPLUS: listings carry every entry's attributes (`readdirplus`).
    let wanted = fuser::InitFlags::FUSE_PARALLEL_DIROPS
        | fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2
        | fuser::InitFlags::FUSE_DO_READDIRPLUS;
    for flag in wanted.iter() {
        let _ = config.add_capabilities(flag);
    }
    let _ = config.set_max_write(1 << 20);
    want_passthrough
        && config
            .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
            .is_ok()
        && config.set_max_stack_depth(1).is_ok()
}

impl Filesystem for TreeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if configure(config, self.want_passthrough) {
            self.passthrough
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == self.ns.root()
            && self.hidden_top_name.is_some_and(|h| name.as_bytes() == h)
        {
            return reply.error(Errno::ENOENT);
        }
        let mut st = self.state();
        match self.ns.find(&mut st, parent.into(), name.as_bytes()) {
            Ok(Some((ino, stat))) => {
                let ttl = self.entry_ttl(parent.into());
                self.reply_entry(&mut st, ino, stat.as_ref(), ttl, reply)
            }
            // A negative entry (inode 0) the kernel keeps as long as a positive one: every
            // name is made through it, so it never misses a change, and a compiler's
            // search of its include paths asks once per name, not once per file compiled.
            Ok(None) => reply.entry(&self.entry_ttl(parent.into()), &NO_ENTRY, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let ino = u64::from(ino);
        if ino == self.ns.root() {
            return;
        }
        let mut st = self.state();
        Self::drop_lookups(&mut st, ino, nlookup);
        if st.inodes.get(&ino).is_none_or(|i| i.nlookup == 0) {
            // The kernel has no file of it open any more.
            self.opens().held.remove(&ino);
            self.ns.fds.remove(FdKey::File(ino));
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = u64::from(ino);
        let attr = self.attr(&mut self.state(), ino, None);
        let result = match attr {
            Err(e) if e.code() == Errno::ENOENT.code() && fh.is_some() => fh
                .and_then(|fh| self.file_of(ino, fh).ok())
                .ok_or(Errno::ENOENT)
                .and_then(|f| rustix::fs::fstat(&*f).map_err(errno))
                .map(|s| {
                    let mut attr = Self::stat_attr(ino, &s);
                    attr.nlink = 0;
                    attr
                }),
            other => other,
        };
        match result {
            Ok(attr) => reply.attr(&self.attr_ttl(ino), &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Truncation by anyone but root drops set-id bits and capabilities (the kernel
        // leaves that to the server: FUSE_HANDLE_KILLPRIV_V2).
        let kill = size.is_some() && mode.is_none() && req.uid() != 0;
        match self.set_attr(ino.into(), mode, uid, gid, size, atime, mtime, fh, kill) {
            Ok(attr) => reply.attr(&self.attr_ttl(ino.into()), &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.state();
        let ino = u64::from(ino);
        let result = self.ns.info(&st, ino).and_then(|info| {
            if info.kind != FileType::Symlink {
                return Err(Errno::EINVAL);
            }
            if info.upper {
                let rel = self.ns.rel(&st, ino)?;
                let (parent, name) = split(&rel);
                let dir = self.ns.upper()?.dir(parent)?;
                rustix::fs::readlinkat(&dir, name, Vec::new())
                    .map(|t| t.into_bytes())
                    .map_err(errno)
            } else {
                let node = self.ns.node(info.lower.ok_or(Errno::ENOENT)?)?;
                self.ns
                    .view
                    .target(&node)
                    .map(|t| t.to_vec())
                    .map_err(|_| Errno::EIO)
            }
        });
        match result {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        // A 0/0 character device is the upper format's whiteout: it would delete the
        // name in the commit instead of making a device.
        if kind == rustix::fs::FileType::CharacterDevice && rdev == 0 {
            return reply.error(Errno::EPERM);
        }
        let result = self.change().and_then(|_gate| {
            self.make(req, parent.into(), name.as_bytes(), |dir| {
                if kind == rustix::fs::FileType::RegularFile {
                    rustix::fs::openat(
                        dir,
                        name.as_bytes(),
                        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                        Mode::from_raw_mode(mode & 0o7777),
                    )
                    .map(|_| None)
                    .map_err(errno)
                } else {
                    rustix::fs::mknodat(
                        dir,
                        name.as_bytes(),
                        kind,
                        Mode::from_raw_mode(mode & 0o7777),
                        u64::from(rdev),
                    )
                    .map(|_| None)
                    .map_err(errno)
                }
            })
        });
        match result {
            Ok((ino, s, _)) => reply.entry(
                &self.entry_ttl(parent.into()),
                &Self::stat_attr(ino, &s),
                Generation(0),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.change().and_then(|_gate| {
            self.check_depth(parent.into(), 1)?;
            self.make(req, parent.into(), name.as_bytes(), |dir| {
                rustix::fs::mkdirat(dir, name.as_bytes(), Mode::from_raw_mode(mode & 0o7777))
                    .map(|_| None)
                    .map_err(errno)
            })
        });
        match result {
            Ok((ino, s, _)) => reply.entry(
                &self.entry_ttl(parent.into()),
                &Self::stat_attr(ino, &s),
                Generation(0),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent.into(), name.as_bytes(), false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent.into(), name.as_bytes(), true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.change().and_then(|_gate| {
            self.make(req, parent.into(), link_name.as_bytes(), |dir| {
                rustix::fs::symlinkat(target, dir, link_name.as_bytes())
                    .map(|_| None)
                    .map_err(errno)
            })
        });
        match result {
            Ok((ino, s, _)) => reply.entry(
                &self.entry_ttl(parent.into()),
                &Self::stat_attr(ino, &s),
                Generation(0),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.rename_in(
            parent.into(),
            name.as_bytes(),
            newparent.into(),
            newname.as_bytes(),
            flags,
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let ino = u64::from(ino);
        let newparent = u64::from(newparent);
        let result = self.change().and_then(|_gate| {
            let mut st = self.state();
            let info = self.ns.info(&st, ino)?;
            if info.kind == FileType::Directory {
                return Err(Errno::EPERM);
            }
            let (src_dir, src_name) = self.at(&mut st, ino)?;
            let (dir, _) = self.prepare_name(&mut st, newparent, newname.as_bytes())?;
            rustix::fs::linkat(
                &src_dir,
                src_name.as_slice(),
                &dir,
                newname.as_bytes(),
                AtFlags::empty(),
            )
            .map_err(errno)?;
            let s = rustix::fs::statat(&dir, newname.as_bytes(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno)?;
            self.ns.linked(&mut st, ino, newparent, newname.as_bytes());
            Ok((st, s))
        });
        match result {
            Ok((mut st, s)) => {
                let ttl = self.entry_ttl(newparent);
                self.reply_entry(&mut st, ino, Some(&s), ttl, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open() {
            // Without passthrough an open needs nothing of the server: `ENOSYS` tells the
            // kernel to open every file itself from now on (handle 0, its page cache
            // kept) and send no release, which saves two round trips per open (a
            // compiler opens hundreds of headers per file compiled). What a handle held
            // is kept by inode instead (`file_of`, `hold_before_unlink`). Files made
            // through `create` still get handles.
            return reply.error(Errno::ENOSYS);
        }
        let (fh, flags) = match self.open_file(ino.into(), flags.0) {
            Ok(opened) => opened,
            Err(e) => return reply.error(e),
        };
        if let Some(backing) = self.passthrough_backing(fh, ino.into(), |f| reply.open_backing(f)) {
            // The kernel takes no caching flag with passthrough (EIO).
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &backing);
        }
        reply.opened(FileHandle(fh), flags)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.file_of(ino.into(), fh) {
            Ok(file) => file,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(io_errno(e)),
            }
        }
        // A file of a host lower may have changed while it was read: its bytes go out
        // only if it is still the indexed one (so no read mixes old and new).
        if self.ns.host_lower.is_some() {
            if let Err(e) = self.recheck_lower_read(ino.into(), &file) {
                return reply.error(e);
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.change().and_then(|_gate| {
            let file = self.writable_file(ino.into(), fh, CopyUp::Whole)?;
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                kill_privileges(&file)?;
            }
            file.write_all_at(data, offset).map_err(io_errno)
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are done when they are answered and locks are the kernel's: nothing to
        // do at a close. Handles say so (FOPEN_NOFLUSH); files the kernel opened itself
        // (see `open`) have no flags, so the kernel is told once never to ask.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.opens().by_handle.remove(&u64::from(fh));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.file_of(ino.into(), fh).and_then(|file| {
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
            .map_err(io_errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // No open round trip for directories: the kernel then keeps every listing it
        // has read (as FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE) until a change through it, and
        // sends no release. Listings are kept by inode instead (see `readdir`).
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.list_from(ino.into(), offset, |entry, next, kind, name| {
            Ok(reply.add(INodeNo(shown(entry, kind)), next, kind, name))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // Each entry with its attributes: a `find | xargs stat` or `ls -l` after the
        // listing asks nothing more. The kernel takes a reference on every entry but `.`
        // and `..` (whose attributes it ignores), as for a lookup, and keeps the entry as
        // long as a looked-up one: so an entry goes out only if its name still leads to
        // its inode now (a listing read in several requests continues from the state of
        // its first; a name renamed or removed since must not come back to the kernel).
        let dir = u64::from(ino);
        let ttl = self.entry_ttl(dir);
        let mut counted = Vec::new();
        let listed = self.list_from(dir, offset, |entry, next, kind, name| {
            if name == "." || name == ".." {
                let attr = FileAttr {
                    ino: INodeNo(shown(entry, kind)),
                    kind,
                    ..NO_ENTRY
                };
                return Ok(reply.add(
                    INodeNo(entry),
                    next,
                    name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                ));
            }
            let mut st = self.state();
            let stat = match self.ns.find(&mut st, dir, name.as_bytes()) {
                Ok(Some((now, stat))) if now == entry => stat,
                Ok(_) => return Ok(false),
                Err(e) => return Err(e),
            };
            let attr = match self.attr(&mut st, entry, stat.as_ref()) {
                Ok(attr) => attr,
                Err(e) if e.code() == Errno::ENOENT.code() => return Ok(false),
                Err(e) => return Err(e),
            };
            let full = reply.add(INodeNo(entry), next, name, &ttl, &attr, Generation(0));
            if !full && Self::count_lookup(&mut st, entry) {
                counted.push(entry);
            }
            Ok(full)
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => {
                // The kernel sees none of the entries of a failed reply.
                let mut st = self.state();
                for entry in counted {
                    Self::drop_lookups(&mut st, entry, 1);
                }
                reply.error(e)
            }
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.opens().by_handle.remove(&u64::from(fh));
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let st = self.state();
        let ino = u64::from(ino);
        let result = match self.ns.info(&st, ino) {
            Ok(info) if info.upper => self
                .ns
                .rel(&st, ino)
                .and_then(|rel| self.ns.upper()?.dir(&rel))
                .and_then(|dir| rustix::fs::fsync(&dir).map_err(errno)),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stats = match &self.ns.upper {
            Some(upper) => upper.statvfs(),
            None => rustix::fs::statvfs(&self.ns.blobs).map_err(errno),
        };
        match stats {
            Ok(st) => reply.statfs(
                st.f_blocks,
                if self.ns.upper.is_some() {
                    st.f_bfree
                } else {
                    0
                },
                if self.ns.upper.is_some() {
                    st.f_bavail
                } else {
                    0
                },
                st.f_files.max(u64::from(self.ns.view.len())),
                if self.ns.upper.is_some() {
                    st.f_ffree
                } else {
                    0
                },
                st.f_bsize as u32,
                255,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if is_hidden_xattr(name.as_bytes()) {
            return reply.error(Errno::EPERM);
        }
        let ino = u64::from(ino);
        let result = self.change().and_then(|_gate| {
            let mut st = self.state();
            self.copy_up(&mut st, ino, CopyUp::Whole)?;
            let fd = self.xattr_target(&st, ino)?;
            rustix::fs::setxattr(
                proc_fd(&fd).as_str(),
                name,
                value,
                rustix::fs::XattrFlags::from_bits_retain(flags as u32),
            )
            .map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if is_hidden_xattr(name.as_bytes()) {
            return reply.error(Errno::ENODATA);
        }
        let st = self.state();
        let ino = u64::from(ino);
        let result = self.ns.info(&st, ino).and_then(|info| {
            if !info.upper {
                let node = self.ns.node(info.lower.ok_or(Errno::ENODATA)?)?;
                return self
                    .ns
                    .lower_xattrs(&node)?
                    .into_iter()
                    .find(|(n, _)| n.as_slice() == name.as_bytes())
                    .map(|(_, v)| v)
                    .ok_or(Errno::ENODATA);
            }
            let fd = self.xattr_target(&st, ino)?;
            let path = proc_fd(&fd);
            let mut buf = vec![0u8; 64 * 1024];
            let n = rustix::fs::getxattr(path.as_str(), name, &mut buf[..]).map_err(errno)?;
            buf.truncate(n);
            Ok(buf)
        });
        match result {
            Ok(value) => reply_xattr(&value, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let st = self.state();
        let ino = u64::from(ino);
        let result = self.ns.info(&st, ino).and_then(|info| {
            if !info.upper {
                let node = self.ns.node(info.lower.ok_or(Errno::ENODATA)?)?;
                let mut out = Vec::new();
                for (name, _) in self.ns.lower_xattrs(&node)? {
                    out.extend_from_slice(&name);
                    out.push(0);
                }
                return Ok(out);
            }
            let fd = self.xattr_target(&st, ino)?;
            let path = proc_fd(&fd);
            let mut buf = vec![0u8; 64 * 1024];
            let n = rustix::fs::listxattr(path.as_str(), &mut buf[..]).map_err(errno)?;
            let mut out = Vec::new();
            for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
                if !is_hidden_xattr(name) {
                    out.extend_from_slice(name);
                    out.push(0);
                }
            }
            Ok(out)
        });
        match result {
            Ok(value) => reply_xattr(&value, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        // EPERM as for setxattr, not ENODATA: the upper root's user.velo.base is there
        // (only hidden), and taking it away is what is refused.
        if is_velo_xattr(name.as_bytes()) {
            return reply.error(Errno::EPERM);
        }
        if is_overlay_xattr(name.as_bytes()) {
            return reply.error(Errno::ENODATA);
        }
        let ino = u64::from(ino);
        let result = self.change().and_then(|_gate| {
            let mut st = self.state();
            self.copy_up(&mut st, ino, CopyUp::Whole)?;
            let fd = self.xattr_target(&st, ino)?;
            rustix::fs::removexattr(proc_fd(&fd).as_str(), name).map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let raw = OFlags::from_bits_retain(flags as u32);
        // A file kept by inode serves every writer of it: its synchronous writes are
        // the kernel's fsync after each (it sends one for O_SYNC and O_DSYNC files).
        let keep = if self.no_open() {
            OFlags::empty()
        } else {
            OFlags::SYNC | OFlags::DSYNC
        };
        let result = self.change().and_then(|_gate| {
            self.make(req, parent.into(), name.as_bytes(), |dir| {
                rustix::fs::openat(
                    dir,
                    name.as_bytes(),
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::RDWR
                        | OFlags::CLOEXEC
                        | OFlags::NOFOLLOW
                        | (raw & keep),
                    Mode::from_raw_mode(mode & 0o7777),
                )
                .map(|fd| Some(File::from(fd)))
                .map_err(errno)
            })
        });
        match result {
            Ok((ino, s, Some(file))) if self.no_open() => {
                // Kept by inode like every file the kernel opened itself, with handle 0:
                // kernels before 6.9 send no release for any file once opens are
                // refused, so a handle would never be given back.
                self.keep_inode_file(ino, Arc::new(file), false);
                reply.created(
                    &self.entry_ttl(parent.into()),
                    &Self::stat_attr(ino, &s),
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                );
            }
            Ok((ino, s, Some(file))) => {
                let fh = self.new_handle(Open {
                    ino,
                    file: Arc::new(file),
                    pending: false,
                    writable: true,
                    from_tree: false,
                    passthrough: false,
                    backing: None,
                });
                let attr = Self::stat_attr(ino, &s);
                if let Some(backing) = self.passthrough_backing(fh, ino, |f| reply.open_backing(f))
                {
                    return reply.created_passthrough(
                        &self.entry_ttl(parent.into()),
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_NOFLUSH,
                        &backing,
                    );
                }
                reply.created(
                    &self.entry_ttl(parent.into()),
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                );
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.change().and_then(|_gate| {
            let file = self.writable_file(ino.into(), fh, CopyUp::Whole)?;
            rustix::fs::fallocate(
                &*file,
                rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                offset,
                length,
            )
            .map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        const SEEK_DATA: i32 = 3;
        const SEEK_HOLE: i32 = 4;
        let result = self.file_of(ino.into(), fh).and_then(|file| {
            let to = match whence {
                SEEK_DATA => rustix::fs::SeekFrom::Data(offset.max(0) as u64),
                SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset.max(0) as u64),
                _ => return Err(Errno::EINVAL),
            };
            // The handle's own offset is never used (reads and writes carry theirs).
            rustix::fs::seek(&*file, to).map_err(errno)
        });
        match result {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The input first: a read, which may take the gate itself (see `file_of`).
        let input = self.file_of(ino_in.into(), fh_in);
        let result = input.and_then(|input| {
            let _gate = self.change()?;
            let output = self.writable_file(ino_out.into(), fh_out, CopyUp::Whole)?;
            let (mut off_in, mut off_out) = (offset_in, offset_out);
            rustix::fs::copy_file_range(
                &*input,
                Some(&mut off_in),
                &*output,
                Some(&mut off_out),
                len.min(u64::from(u32::MAX) & !0xfff) as usize,
            )
            .map_err(errno)
        });
        match result {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }
}
