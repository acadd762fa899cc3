//! `velo mount`: a tree served as a FUSE file system at a mount point.
//!
//! This crate owns the FUSE server. It reads the tree from the view index (velo-view: the
//! same immutable, mapped file the shim reads, so a lookup is a binary search and no
//! store object is parsed per request) and file bytes from the store's blob files. It
//! depends on velo-view and fuser only; velo-cli builds the view, holds the store's lock
//! and starts the server.
//!
//! This slice serves a tree read-only: lookups, attributes (the tree's modes and mtimes,
//! exactly), directory listings, symlinks, reads straight from the blob file (the kernel
//! keeps the page cache across opens: the tree never changes under it). Every change is
//! refused with `EROFS`. The copy-on-write upper comes next (the shim's upper format, the
//! shared commit routine).
#![deny(missing_docs)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use velo_view::{Kind, Node, View};

/// What failed to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mount or the session failed.
    #[error("mounting {mountpoint}")]
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How long the kernel may keep names and attributes: the tree never changes while it is
/// served (nothing can write it in this slice).
const TTL: Duration = Duration::from_secs(3600);

/// Blob files kept open at most.
const OPEN_BLOBS: usize = 1024;

/// The server of one tree.
pub struct TreeFs {
    view: View<'static>,
    /// `<store>/blobs`.
    blobs: PathBuf,
    uid: u32,
    gid: u32,
    /// Blob files open for reads, by node: a bounded cache shared by every open of a
    /// node (the kernel's releases may lag far behind its opens under many readers: one
    /// descriptor per open ran the server out of them).
    files: Mutex<HashMap<u32, Arc<File>>>,
    /// The kernel agreed to FUSE_NO_OPEN_SUPPORT.
    no_open: std::sync::atomic::AtomicBool,
}

impl TreeFs {
    /// A server of `view`, reading file bytes from the store at `store`; files and
    /// directories show `uid`/`gid` as their owner (the user who mounts).
    pub fn new(view: View<'static>, store: &Path, uid: u32, gid: u32) -> TreeFs {
        TreeFs {
            view,
            blobs: store.join("blobs"),
            uid,
            gid,
            files: Mutex::new(HashMap::new()),
            no_open: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        let index = u64::from(ino)
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(Errno::ENOENT)?;
        if index >= self.view.len() {
            return Err(Errno::ENOENT);
        }
        self.view.node(index).map_err(|_| Errno::EIO)
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let mtime = if node.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(node.mtime_ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(node.mtime_ns.unsigned_abs())
        };
        let (kind, nlink) = match node.kind {
            Kind::File => (FileType::RegularFile, 1),
            Kind::Dir => (FileType::Directory, 2),
            Kind::Symlink => (FileType::Symlink, 1),
        };
        FileAttr {
            ino: INodeNo(u64::from(node.index) + 1),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (node.mode & 0o7777) as u16,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// The blob file of `node`, from the cache or opened now.
    fn blob(&self, node: &Node) -> Result<Arc<File>, Errno> {
        if let Some(file) = self
            .files
            .lock()
            .ok()
            .and_then(|f| f.get(&node.index).cloned())
        {
            return Ok(file);
        }
        let file = match File::open(self.blob_path(node)) {
            Ok(file) => Arc::new(file),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
                // Readers holding the cached descriptors keep theirs; new ones wait.
                if let Ok(mut files) = self.files.lock() {
                    files.clear();
                }
                return Err(Errno::EAGAIN);
            }
            Err(e) => {
                tracing::warn!(error = %e, "a blob of the served tree is missing: velo fsck");
                return Err(Errno::EIO);
            }
        };
        if let Ok(mut files) = self.files.lock() {
            if files.len() >= OPEN_BLOBS {
                // Dropped from the cache, not closed under a reader: each read holds its Arc.
                files.clear();
            }
            files.insert(node.index, file.clone());
        }
        Ok(file)
    }

    fn blob_path(&self, node: &Node) -> PathBuf {
        let hex: String = node.hash.iter().map(|b| format!("{b:02x}")).collect();
        self.blobs.join(&hex[..2]).join(hex)
    }
}

impl Filesystem for TreeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // A file's open needs no round trip: the server keeps nothing per open (reads
        // find the blob by inode), and the kernel then keeps the page cache across opens.
        // Directories stay opened, so their listings are cached (FOPEN_CACHE_DIR).
        let wanted =
            fuser::InitFlags::FUSE_NO_OPEN_SUPPORT | fuser::InitFlags::FUSE_PARALLEL_DIROPS;
        for flag in wanted.iter() {
            let granted = config.add_capabilities(flag).is_ok();
            if flag == fuser::InitFlags::FUSE_NO_OPEN_SUPPORT {
                self.no_open
                    .store(granted, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.node(parent).and_then(|dir| {
            if dir.kind != Kind::Dir {
                return Err(Errno::ENOTDIR);
            }
            let child = self
                .view
                .child(&dir, name.as_bytes())
                .map_err(|_| Errno::EIO)?
                .ok_or(Errno::ENOENT)?;
            self.view.node(child).map_err(|_| Errno::EIO)
        });
        match found {
            Ok(node) => reply.entry(&TTL, &self.attr(&node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(&node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Ok(node) if node.kind == Kind::Symlink => match self.view.target(&node) {
                Ok(target) => reply.data(target),
                Err(_) => reply.error(Errno::EIO),
            },
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let raw = flags.0;
        if raw & libc_accmode() != 0 || raw & (rustix::fs::OFlags::TRUNC.bits() as i32) != 0 {
            return reply.error(Errno::EROFS);
        }
        if node.kind != Kind::File {
            return reply.error(Errno::EISDIR);
        }
        // Opened now, so a missing blob fails the open, not a later read.
        if let Err(e) = self.blob(&node) {
            return reply.error(e);
        }
        // The tree never changes while served: the kernel may keep its page cache.
        reply.opened(
            FileHandle(u64::from(node.index)),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
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
        let _ = fh;
        let file = match u64::from(ino)
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| i < self.view.len())
            .and_then(|i| self.view.node(i).ok())
        {
            Some(node) => match self.blob(&node) {
                Ok(file) => file,
                Err(e) => return reply.error(e),
            },
            None => return reply.error(Errno::EBADF),
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        reply.data(&buf[..done]);
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
        let _ = fh;
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(node) if node.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.node(ino) {
            Ok(node) if node.kind == Kind::Dir => node,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        // Offsets: 0 `.`, 1 `..`, 2 + i the i-th child; each entry carries the next one.
        let total = 2 + u64::from(dir.child_count);
        for position in offset..total {
            let (ino, kind, name): (u64, FileType, &[u8]) = match position {
                0 => (u64::from(dir.index) + 1, FileType::Directory, b"."),
                1 => (u64::from(dir.parent) + 1, FileType::Directory, b".."),
                _ => {
                    let index = dir.first_child + (position - 2) as u32;
                    let Ok(child) = self.view.node(index) else {
                        return reply.error(Errno::EIO);
                    };
                    let Ok(name) = self.view.name(&child) else {
                        return reply.error(Errno::EIO);
                    };
                    let kind = match child.kind {
                        Kind::File => FileType::RegularFile,
                        Kind::Dir => FileType::Directory,
                        Kind::Symlink => FileType::Symlink,
                    };
                    (u64::from(child.index) + 1, kind, name)
                }
            };
            if reply.add(INodeNo(ino), position + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.blobs) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                0,
                0,
                u64::from(self.view.len()),
                0,
                st.f_bsize as u32,
                255,
                st.f_frsize as u32,
            ),
            Err(_) => reply.error(Errno::EIO),
        }
    }
}

fn libc_accmode() -> i32 {
    (rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::RDWR).bits() as i32
}

/// How to mount.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Let other users in (`allow_other`; needs root or `user_allow_other` in
    /// /etc/fuse.conf).
    pub allow_other: bool,
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted. Blocks.
pub fn serve(fs: TreeFs, mountpoint: &Path, options: &MountOptions) -> Result<(), FuseError> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("velo".into()),
        fuser::MountOption::Subtype("velo".into()),
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(4);
    fuser::mount2(fs, mountpoint, &config).map_err(|source| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })
}

/// Whether `path` is a FUSE mount (its file system's magic number).
pub fn is_fuse_mount(path: &Path) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == FUSE_SUPER_MAGIC)
}
