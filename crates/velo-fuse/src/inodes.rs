//! The mount's namespace: which object each inode number stands for, and where it lives
//! (the tree, the upper, or both).
//!
//! Inode numbers are stable for the life of the mount. A tree node `n` is inode `n + 1`
//! and needs no record while nothing in the upper touches it: a lookup in a tree
//! directory that the upper does not have is a binary search in the view index and no
//! system call. Anything the upper holds is recorded: its upper inode number (so hard
//! links share one inode), the names it has (parent inode, name), and the tree node it
//! came from. A tree file keeps its inode number when it is copied up; an object made on
//! the mount gets a fresh number from a range above every tree node, never reused, so the
//! kernel never mistakes a new file for a deleted one it still has open.
//!
//! Tree directories never move (renaming one is `EXDEV`, which `mv` handles by copying),
//! so a tree node's path is always its path in the tree; a recorded object's path is its
//! parent's path and its name.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use fuser::{Errno, FileType};
use rustix::fs::{AtFlags, OFlags, Stat};
use velo_view::{Kind, Node, View, PATH_MAX};

use crate::upper::{self, errno, Upper};

/// The first inode number of objects made on the mount, above the namespace's base
/// (tree nodes are numbered from 1 above it: a view holds fewer than 2^32 nodes).
const FIRST_NEW: u64 = 1 << 40;
/// The inode numbers a namespace may use: a server of several trees gives each its own
/// range (see [`crate::workspace`]), so no inode number is ever shared between them.
pub(crate) const SLOT_BITS: u32 = 44;
/// Deeper than any path the kernel can hand us (`PATH_MAX` / 2).
const MAX_DEPTH: usize = 2048;

/// A recorded inode.
pub(crate) struct Inode {
    pub kind: FileType,
    /// The tree node it shows (a directory: merges with; `None` for an opaque upper
    /// directory or an object made on the mount).
    pub lower: Option<u32>,
    /// Whether the upper has it.
    pub upper: bool,
    /// Its inode number in the upper.
    pub upper_ino: Option<u64>,
    /// Its names: (parent inode, name). Empty: deleted (possibly still open).
    pub links: Vec<(u64, Box<[u8]>)>,
    /// The kernel's references to it (lookups not yet forgotten).
    pub nlookup: u64,
}

/// What an inode is, in short.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Info {
    pub kind: FileType,
    pub lower: Option<u32>,
    pub upper: bool,
    /// It still has a name.
    pub linked: bool,
}

/// Every recorded inode.
pub(crate) struct State {
    pub inodes: HashMap<u64, Inode>,
    /// Upper inode number → our inode.
    pub by_upper: HashMap<u64, u64>,
    /// Tree nodes deleted or replaced during this mount: nothing new takes their number.
    pub dead: HashSet<u32>,
    next: u64,
}

impl State {
    /// The state of a namespace whose inode numbers start above `base`.
    pub(crate) fn new(has_upper: bool, base: u64) -> State {
        let mut inodes = HashMap::new();
        inodes.insert(
            base + 1,
            Inode {
                kind: FileType::Directory,
                lower: Some(0),
                upper: has_upper,
                upper_ino: None,
                links: Vec::new(),
                nlookup: 1,
            },
        );
        State {
            inodes,
            by_upper: HashMap::new(),
            dead: HashSet::new(),
            next: base + FIRST_NEW,
        }
    }

    fn fresh(&mut self) -> u64 {
        let ino = self.next;
        self.next += 1;
        ino
    }
}

pub(crate) fn kind_of(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

pub(crate) fn kind_of_mode(mode: u32) -> FileType {
    match rustix::fs::FileType::from_raw_mode(mode) {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The namespace: the tree's view, the upper, and the record of what the upper changed.
pub(crate) struct Namespace {
    pub view: View<'static>,
    pub upper: Option<Upper>,
    /// `<store>/blobs`.
    pub blobs: std::path::PathBuf,
    /// Its share of the process's descriptor cache: blob files open for reads by node
    /// (shared by every open of a node, so a warm `cat` costs the server no `open(2)`),
    /// upper directories by inode (see [`Namespace::dir_of`]) and upper files by inode.
    pub fds: FdCache,
    /// Where tree entries' extended attributes come from (the store's tree objects).
    pub tree_xattrs: Option<Box<crate::TreeXattrs>>,
    /// Where this namespace's inode numbers start: tree node `i` is `base + i + 1`.
    pub base: u64,
    /// The view is a lower index of this host directory (a workspace's `--lower`): file
    /// bytes come from it, each file checked to be the one indexed.
    pub host_lower: Option<OwnedFd>,
    /// Where blobs the store lacks come from (a remote), if anywhere.
    pub fetcher: Option<Arc<dyn crate::BlobFetcher>>,
}

/// Extended attributes as (name, value) pairs, ascending by name.
pub(crate) type XattrPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// What the descriptor cache keeps, in one namespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FdKey {
    /// An upper directory, by inode.
    Dir(u64),
    /// A blob (or a host lower's file), by tree node.
    Blob(u32),
    /// An upper file, by inode (see `TreeFs::open_inode_file`).
    File(u64),
}

#[derive(Clone)]
enum Cached {
    Dir(Arc<OwnedFd>),
    File(Arc<File>),
}

/// The descriptors kept open by the caches of every namespace of the process (a
/// workspace server has one per branch): (namespace, key) → (descriptor, last use).
/// One bound for all of them, so however many branches are used the server keeps
/// descriptors for the files programs hold, the requests in flight and its connections.
struct Fds {
    entries: HashMap<(u64, FdKey), (Cached, u64)>,
    clock: u64,
}

static FDS: LazyLock<Mutex<Fds>> = LazyLock::new(|| {
    Mutex::new(Fds {
        entries: HashMap::new(),
        clock: 0,
    })
});

static NEXT_FD_CACHE: AtomicU64 = AtomicU64::new(0);

/// Descriptors the caches keep at most, together: half the process's limit (read once,
/// at the first insert: the server raises its limit before it serves), at most 8,192.
static FD_CACHE_LIMIT: LazyLock<usize> =
    LazyLock::new(
        || match rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            Some(cur) => (cur / 2).clamp(16, 8192) as usize,
            None => 8192,
        },
    );

fn fds() -> std::sync::MutexGuard<'static, Fds> {
    FDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// One namespace's share of the process's descriptor cache (least recently used
/// first out, whichever namespace it belongs to). Its entries go with it.
pub(crate) struct FdCache(u64);

impl FdCache {
    pub(crate) fn new() -> FdCache {
        FdCache(NEXT_FD_CACHE.fetch_add(1, Ordering::Relaxed))
    }

    fn get(&self, key: FdKey) -> Option<Cached> {
        let mut fds = fds();
        fds.clock += 1;
        let now = fds.clock;
        let (fd, used) = fds.entries.get_mut(&(self.0, key))?;
        *used = now;
        Some(fd.clone())
    }

    pub(crate) fn dir(&self, key: FdKey) -> Option<Arc<OwnedFd>> {
        match self.get(key)? {
            Cached::Dir(fd) => Some(fd),
            Cached::File(_) => None,
        }
    }

    pub(crate) fn file(&self, key: FdKey) -> Option<Arc<File>> {
        match self.get(key)? {
            Cached::File(file) => Some(file),
            Cached::Dir(_) => None,
        }
    }

    fn keep(&self, key: FdKey, fd: Cached) {
        let mut fds = fds();
        let limit = *FD_CACHE_LIMIT;
        if fds.entries.len() >= limit {
            // The least recently used quarter goes (an open keeps its own Arc).
            let mut uses: Vec<u64> = fds.entries.values().map(|(_, used)| *used).collect();
            let (_, oldest, _) = uses.select_nth_unstable(limit / 4);
            let oldest = *oldest;
            fds.entries.retain(|_, (_, used)| *used > oldest);
        }
        fds.clock += 1;
        let now = fds.clock;
        fds.entries.insert((self.0, key), (fd, now));
    }

    pub(crate) fn keep_dir(&self, ino: u64, fd: Arc<OwnedFd>) {
        self.keep(FdKey::Dir(ino), Cached::Dir(fd));
    }

    pub(crate) fn keep_file(&self, key: FdKey, file: Arc<File>) {
        self.keep(key, Cached::File(file));
    }

    pub(crate) fn remove(&self, key: FdKey) {
        fds().entries.remove(&(self.0, key));
    }

    /// The process is out of descriptors: every cache lets go of its own (requests
    /// using one keep theirs).
    pub(crate) fn clear_all() {
        fds().entries.clear();
    }
}

impl Drop for FdCache {
    fn drop(&mut self) {
        fds().entries.retain(|(cache, _), _| *cache != self.0);
    }
}

impl Namespace {
    /// The root directory's inode.
    pub(crate) fn root(&self) -> u64 {
        self.base + 1
    }

    /// The inode of tree node `index`.
    pub(crate) fn ino_of(&self, index: u32) -> u64 {
        self.base + u64::from(index) + 1
    }

    pub(crate) fn blob_path(&self, node: &Node) -> std::path::PathBuf {
        let hex: String = node.hash.iter().map(|b| format!("{b:02x}")).collect();
        self.blobs.join(&hex[..2]).join(hex)
    }

    /// The extended attributes the tree records for `node` (name, value), ascending.
    /// (`EIO`: a host lower's entry that is not the indexed one any more.)
    pub(crate) fn lower_xattrs(&self, node: &Node) -> Result<XattrPairs, Errno> {
        if node.flags & velo_view::FLAG_XATTRS == 0 || node.index == 0 {
            return Ok(Vec::new());
        }
        if let Some(lower) = &self.host_lower {
            return self.host_xattrs(lower, node);
        }
        let (Some(source), Ok(parent), Ok(name)) = (
            &self.tree_xattrs,
            self.node(node.parent),
            self.view.name(node),
        ) else {
            return Ok(Vec::new());
        };
        let dir_tree = if parent.index == 0 {
            self.view.root_hash()
        } else {
            parent.hash
        };
        Ok(source(&dir_tree, name))
    }

    /// A tree file's blob, from the cache or opened now.
    pub(crate) fn cached_blob(&self, node: &Node) -> Result<Arc<File>, Errno> {
        if let Some(file) = self.fds.file(FdKey::Blob(node.index)) {
            // A host lower's file is checked again each time: one changed in place since
            // must not be read on.
            if self.host_lower.is_some() {
                self.check_host_file(&file, node, b"")?;
            }
            return Ok(file);
        }
        let file = Arc::new(self.blob_file(node)?);
        self.fds.keep_file(FdKey::Blob(node.index), file.clone());
        Ok(file)
    }

    /// A file of the host lower, opened now if it is still the one indexed: never
    /// through a symlink, never beside the directory, never a file changed since.
    fn host_file(&self, lower: &OwnedFd, node: &Node) -> Result<File, Errno> {
        let mut buf = [0u8; PATH_MAX];
        let n = self
            .view
            .path_of(b"", node.index, &mut buf)
            .ok_or(Errno::ENAMETOOLONG)?;
        let rel = buf[..n].strip_prefix(b"/").unwrap_or(&buf[..n]);
        let fd = rustix::fs::openat2(
            lower,
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            rustix::fs::ResolveFlags::BENEATH
                | rustix::fs::ResolveFlags::NO_SYMLINKS
                | rustix::fs::ResolveFlags::NO_MAGICLINKS,
        );
        let changed = |why: &str| {
            tracing::warn!(
                path = %String::from_utf8_lossy(rel),
                "a file of the workspace's host lower {why}: refused (EIO)"
            );
            Errno::EIO
        };
        let file = File::from(fd.map_err(|_| changed("is gone"))?);
        self.check_host_file(&file, node, rel)?;
        Ok(file)
    }

    /// After bytes of `file` (node `node`'s) were read: whether it is still the one the
    /// host lower indexed, so the bytes are; nothing to check for a blob of the store.
    pub(crate) fn recheck_host_file(&self, file: &File, node: &Node) -> Result<(), Errno> {
        if self.host_lower.is_none() {
            return Ok(());
        }
        self.check_host_file(file, node, b"")
    }

    /// The kept extended attributes of the host lower's file or directory `node`, read
    /// from the host (none if it is not the indexed one any more).
    fn host_xattrs(&self, lower: &OwnedFd, node: &Node) -> Result<XattrPairs, Errno> {
        let file = match node.kind {
            Kind::File => self.host_file(lower, node)?,
            Kind::Dir => {
                let mut buf = [0u8; PATH_MAX];
                let n = self
                    .view
                    .path_of(b"", node.index, &mut buf)
                    .ok_or(Errno::ENAMETOOLONG)?;
                let rel = buf[..n].strip_prefix(b"/").unwrap_or(&buf[..n]);
                let dir = File::from(
                    rustix::fs::openat2(
                        lower,
                        rel,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                        rustix::fs::ResolveFlags::BENEATH
                            | rustix::fs::ResolveFlags::NO_SYMLINKS
                            | rustix::fs::ResolveFlags::NO_MAGICLINKS,
                    )
                    .map_err(|_| Errno::EIO)?,
                );
                // A directory whose xattrs (or entries) changed since is not the indexed one.
                self.check_host_file(&dir, node, rel)?;
                dir
            }
            Kind::Symlink => return Ok(Vec::new()),
        };
        let mut names = vec![0u8; 64 * 1024];
        let n = rustix::fs::flistxattr(&file, &mut names).map_err(errno)?;
        let mut out = Vec::new();
        for name in names[..n]
            .split(|&b| b == 0)
            .filter(|n| velo_core::is_kept_xattr(n))
        {
            let mut value = vec![0u8; 64 * 1024];
            let len = rustix::fs::fgetxattr(&file, name, &mut value).map_err(errno)?;
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
        out.sort();
        Ok(out)
    }

    /// Whether `file` of the host lower is still the one node `node` indexed (`EIO`,
    /// logged, if not).
    fn check_host_file(&self, file: &File, node: &Node, rel: &[u8]) -> Result<(), Errno> {
        let same = rustix::fs::fstat(file).is_ok_and(|st| {
            let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
            let now = velo_view::host_fingerprint(
                st.st_dev,
                st.st_ino,
                ns(st.st_ctime, st.st_ctime_nsec as i64),
                st.st_size as u64,
            );
            now == node.hash && ns(st.st_mtime, st.st_mtime_nsec as i64) == node.mtime_ns
        });
        if !same {
            tracing::warn!(
                node = node.index,
                path = %String::from_utf8_lossy(rel),
                "a file of the workspace's host lower changed since the workspace was made: refused (EIO)"
            );
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// A tree file's blob, opened now.
    pub(crate) fn blob_file(&self, node: &Node) -> Result<File, Errno> {
        if let Some(lower) = &self.host_lower {
            return self.host_file(lower, node);
        }
        let path = self.blob_path(node);
        let opened = match (File::open(&path), &self.fetcher) {
            (Err(e), Some(fetcher)) if e.kind() == std::io::ErrorKind::NotFound => {
                fetcher.fetch(&node.hash, node.size).map_err(|e| {
                    tracing::warn!(error = %e, "fetching a blob of the served tree from its remote");
                    Errno::EIO
                })?;
                File::open(&path)
            }
            (opened, _) => opened,
        };
        opened.map_err(|e| match e.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::MFILE.raw_os_error()
                    || code == rustix::io::Errno::NFILE.raw_os_error() =>
            {
                // Out of descriptors for now: readers holding cached ones keep theirs.
                FdCache::clear_all();
                Errno::EAGAIN
            }
            _ => {
                tracing::warn!(error = %e, "a blob of the served tree is missing: velo fsck");
                Errno::EIO
            }
        })
    }

    pub(crate) fn node(&self, index: u32) -> Result<Node, Errno> {
        if index >= self.view.len() {
            return Err(Errno::ENOENT);
        }
        self.view.node(index).map_err(|_| Errno::EIO)
    }

    /// The tree node an unrecorded inode number stands for.
    pub(crate) fn tree_node(&self, ino: u64) -> Result<Node, Errno> {
        let index = ino
            .checked_sub(self.base + 1)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(Errno::ENOENT)?;
        self.node(index)
    }

    pub(crate) fn upper(&self) -> Result<&Upper, Errno> {
        self.upper.as_ref().ok_or(Errno::EROFS)
    }

    pub(crate) fn info(&self, st: &State, ino: u64) -> Result<Info, Errno> {
        if let Some(i) = st.inodes.get(&ino) {
            return Ok(Info {
                kind: i.kind,
                lower: i.lower,
                upper: i.upper,
                linked: ino == self.root() || !i.links.is_empty(),
            });
        }
        let node = self.tree_node(ino)?;
        Ok(Info {
            kind: kind_of(node.kind),
            lower: Some(node.index),
            upper: false,
            linked: true,
        })
    }

    /// The live tree node named `name` in the tree directory that `dir` merges with.
    pub(crate) fn lower_child(&self, st: &State, dir: &Info, name: &[u8]) -> Option<u32> {
        self.any_lower_child(dir, name)
            .filter(|c| !st.dead.contains(c))
    }

    /// The tree node of that name, deleted or not.
    pub(crate) fn any_lower_child(&self, dir: &Info, name: &[u8]) -> Option<u32> {
        let node = self.node(dir.lower?).ok()?;
        self.view.child(&node, name).ok().flatten()
    }

    /// A name of `ino`: (parent inode, name).
    pub(crate) fn link(&self, st: &State, ino: u64) -> Result<(u64, Vec<u8>), Errno> {
        if let Some(i) = st.inodes.get(&ino) {
            let (parent, name) = i.links.first().ok_or(Errno::ENOENT)?;
            return Ok((*parent, name.to_vec()));
        }
        let node = self.tree_node(ino)?;
        let name = self.view.name(&node).map_err(|_| Errno::EIO)?;
        Ok((self.ino_of(node.parent), name.to_vec()))
    }

    /// The path of `ino` relative to the top (empty for the root).
    pub(crate) fn rel(&self, st: &State, ino: u64) -> Result<Vec<u8>, Errno> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut prefix: Vec<u8> = Vec::new();
        let mut current = ino;
        while current != self.root() {
            if names.len() > MAX_DEPTH {
                return Err(Errno::ELOOP);
            }
            match st.inodes.get(&current) {
                Some(i) => {
                    let (parent, name) = i.links.first().ok_or(Errno::ENOENT)?;
                    names.push(name);
                    current = *parent;
                }
                None => {
                    // A tree node: its path in the tree (tree directories never move).
                    let node = self.tree_node(current)?;
                    let mut buf = [0u8; PATH_MAX];
                    let n = self
                        .view
                        .path_of(b"", node.index, &mut buf)
                        .ok_or(Errno::ENAMETOOLONG)?;
                    prefix = buf[..n].strip_prefix(b"/").unwrap_or(&buf[..n]).to_vec();
                    break;
                }
            }
        }
        let mut rel = prefix;
        for name in names.iter().rev() {
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name);
        }
        Ok(rel)
    }

    /// The upper directory of directory `ino`, made first (with its parents) if the
    /// upper lacks it.
    pub(crate) fn upper_dir(&self, st: &mut State, ino: u64) -> Result<Arc<OwnedFd>, Errno> {
        self.copy_up(st, ino, CopyUp::Whole)?;
        self.dir_of(st, ino)
    }

    /// The open upper directory of directory `ino`, which the upper has. Kept by inode: a
    /// descriptor names the directory itself, so it stays right when the directory or one
    /// above it is renamed, and opening it costs no walk from the top (a copy-up or a
    /// create made several). Dropped when the directory is removed ([`Self::forget_dir`]).
    pub(crate) fn dir_of(&self, st: &State, ino: u64) -> Result<Arc<OwnedFd>, Errno> {
        if let Some(fd) = self.fds.dir(FdKey::Dir(ino)) {
            return Ok(fd);
        }
        // Opened from the nearest open ancestor down, one name at a time: no path is
        // ever longer than a name (a deep directory's path may pass PATH_MAX).
        let mut below = Vec::new();
        let mut current = ino;
        let mut fd = loop {
            if current == self.root() {
                let fd = Arc::new(self.upper()?.dir(b"")?);
                self.fds.keep_dir(current, fd.clone());
                break fd;
            }
            if let Some(fd) = self.fds.dir(FdKey::Dir(current)) {
                break fd;
            }
            if below.len() > MAX_DEPTH {
                return Err(Errno::ELOOP);
            }
            let (parent, name) = self.link(st, current)?;
            below.push((current, name));
            current = parent;
        };
        for (dir, name) in below.into_iter().rev() {
            let opened = rustix::fs::openat(
                &*fd,
                name.as_slice(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(errno)?;
            fd = Arc::new(opened);
            self.fds.keep_dir(dir, fd.clone());
        }
        Ok(fd)
    }

    /// Directory `ino` is gone from the upper (removed, or replaced by a rename).
    pub(crate) fn forget_dir(&self, ino: u64) {
        self.fds.remove(FdKey::Dir(ino));
    }

    /// `ino`'s upper object as its parent's open directory and its name (the root: its
    /// own directory and `.`).
    pub(crate) fn parent_dir(
        &self,
        st: &State,
        ino: u64,
    ) -> Result<(Arc<OwnedFd>, Vec<u8>), Errno> {
        if ino == self.root() {
            return Ok((self.dir_of(st, ino)?, b".".to_vec()));
        }
        let (parent, name) = self.link(st, ino)?;
        Ok((self.dir_of(st, parent)?, name))
    }

    /// The child `name` of directory `parent`: its inode, and its upper `stat` if the
    /// upper has it. Records what it finds in the upper.
    pub(crate) fn find(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<(u64, Option<Stat>)>, Errno> {
        let p = self.info(st, parent)?;
        if p.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        if !p.linked {
            return Ok(None);
        }
        let lower = self.lower_child(st, &p, name);
        if !p.upper {
            return Ok(lower.map(|c| (self.ino_of(c), None)));
        }
        let dir = self.dir_of(st, parent)?;
        match upper::stat_at(&dir, name)? {
            Some(s) if upper::is_whiteout(&s) => Ok(None),
            Some(s) => {
                let ino = self.record(st, &dir, parent, name, &s, lower);
                Ok(Some((ino, Some(s))))
            }
            None => Ok(lower.map(|c| (self.ino_of(c), None))),
        }
    }

    /// Records the upper object `s` at `dir`/`name` (child of `parent`); `lower` is the
    /// live tree node of that name. Returns its inode.
    pub(crate) fn record(
        &self,
        st: &mut State,
        dir: &OwnedFd,
        parent: u64,
        name: &[u8],
        s: &Stat,
        lower: Option<u32>,
    ) -> u64 {
        let kind = kind_of_mode(s.st_mode);
        let ino = match st.by_upper.get(&s.st_ino) {
            Some(&ino) => ino,
            None => match lower {
                Some(c) => self.ino_of(c),
                None => st.fresh(),
            },
        };
        let known = st
            .inodes
            .get(&ino)
            .is_some_and(|i| i.upper && i.upper_ino == Some(s.st_ino));
        if !known {
            let shows = lower.filter(|&c| {
                let same_kind = self.node(c).is_ok_and(|n| kind_of(n.kind) == kind);
                same_kind
                    && (kind != FileType::Directory
                        || rustix::fs::openat(
                            dir,
                            name,
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            rustix::fs::Mode::empty(),
                        )
                        .is_ok_and(|d| !upper::is_opaque(&d)))
            });
            let entry = st.inodes.entry(ino).or_insert(Inode {
                kind,
                lower: shows,
                upper: true,
                upper_ino: Some(s.st_ino),
                links: Vec::new(),
                nlookup: 0,
            });
            entry.kind = kind;
            entry.upper = true;
            entry.upper_ino = Some(s.st_ino);
            if entry.lower.is_none() {
                entry.lower = shows;
            }
            st.by_upper.insert(s.st_ino, ino);
        }
        if let Some(i) = st.inodes.get_mut(&ino) {
            if !i.links.iter().any(|(p, n)| *p == parent && **n == *name) {
                i.links.push((parent, name.into()));
            }
        }
        ino
    }

    /// Records a new object the mount just made at `parent`/`name`.
    pub(crate) fn record_new(&self, st: &mut State, parent: u64, name: &[u8], s: &Stat) -> u64 {
        let ino = st.fresh();
        st.inodes.insert(
            ino,
            Inode {
                kind: kind_of_mode(s.st_mode),
                lower: None,
                upper: true,
                upper_ino: Some(s.st_ino),
                links: vec![(parent, name.into())],
                nlookup: 0,
            },
        );
        st.by_upper.insert(s.st_ino, ino);
        ino
    }

    /// `ino` lost its name `parent`/`name`.
    pub(crate) fn unlinked(&self, st: &mut State, ino: u64, parent: u64, name: &[u8]) {
        // A directory has one name: without it, it is gone from the upper.
        if st
            .inodes
            .get(&ino)
            .is_none_or(|i| i.kind == FileType::Directory)
        {
            self.forget_dir(ino);
        }
        let Some(i) = st.inodes.get_mut(&ino) else {
            // A tree node the upper never held: recorded now, with no name.
            if let Ok(node) = self.tree_node(ino) {
                st.inodes.insert(
                    ino,
                    Inode {
                        kind: kind_of(node.kind),
                        lower: Some(node.index),
                        upper: false,
                        upper_ino: None,
                        links: Vec::new(),
                        nlookup: 0,
                    },
                );
            }
            return;
        };
        i.links.retain(|(p, n)| !(*p == parent && **n == *name));
        if i.links.is_empty() {
            // The upper may reuse its number for a new file.
            if let Some(u) = i.upper_ino.take() {
                if st.by_upper.get(&u) == Some(&ino) {
                    st.by_upper.remove(&u);
                }
            }
        }
    }

    /// `ino` has a new name `parent`/`name` (a hard link).
    pub(crate) fn linked(&self, st: &mut State, ino: u64, parent: u64, name: &[u8]) {
        if let Some(i) = st.inodes.get_mut(&ino) {
            i.links.push((parent, name.into()));
        }
    }

    /// Moves `ino`'s name `from` to `to`.
    pub(crate) fn moved(&self, st: &mut State, ino: u64, from: (u64, &[u8]), to: (u64, &[u8])) {
        if let Some(i) = st.inodes.get_mut(&ino) {
            for link in &mut i.links {
                if link.0 == from.0 && *link.1 == *from.1 {
                    *link = (to.0, to.1.into());
                    return;
                }
            }
            i.links.push((to.0, to.1.into()));
        }
    }

    /// Gives `ino` an object in the upper (its parents first): a tree directory becomes
    /// an upper directory that merges with it, a tree file a copy of its blob (or an
    /// empty file, for `CopyUp::Empty`: it is about to be truncated). Returns the new
    /// file, open read-write, when one was made.
    /// Copies up a tree file that has no name left (deleted while a program may have it
    /// open) into a file with no name in the upper: the caller keeps it open by inode.
    pub(crate) fn copy_up_unlinked(&self, st: &mut State, ino: u64) -> Result<File, Errno> {
        let info = self.info(st, ino)?;
        if info.linked || info.upper || info.kind != FileType::RegularFile {
            return Err(Errno::EINVAL);
        }
        let node = self.node(info.lower.ok_or(Errno::EIO)?)?;
        let blob = self.blob_file(&node)?;
        let top = self.dir_of(st, self.root())?;
        let file = upper::anonymous_copy(&top, Some(&blob), node.mode, node.mtime_ns)?;
        self.recheck_host_file(&blob, &node)?;
        let i = st.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        i.upper = true;
        Ok(file)
    }

    pub(crate) fn copy_up(
        &self,
        st: &mut State,
        ino: u64,
        how: CopyUp,
    ) -> Result<Option<File>, Errno> {
        self.upper()?;
        let mut pending = Vec::new();
        let mut current = ino;
        loop {
            let info = self.info(st, current)?;
            if info.upper {
                break;
            }
            if !info.linked {
                return Err(Errno::ENOENT);
            }
            pending.push(current);
            if pending.len() > MAX_DEPTH {
                return Err(Errno::ELOOP);
            }
            current = self.link(st, current)?.0;
        }
        let mut made = None;
        for &ino in pending.iter().rev() {
            let info = self.info(st, ino)?;
            let node = self.node(info.lower.ok_or(Errno::EIO)?)?;
            let (parent, name) = self.link(st, ino)?;
            let dir = self.dir_of(st, parent)?;
            let file = upper::keeping_times(&dir, || match node.kind {
                Kind::Dir => {
                    rustix::fs::mkdirat(
                        &dir,
                        name.as_slice(),
                        rustix::fs::Mode::from_raw_mode(0o700),
                    )
                    .map_err(errno)?;
                    rustix::fs::chmodat(
                        &dir,
                        name.as_slice(),
                        rustix::fs::Mode::from_raw_mode(node.mode & 0o7777),
                        rustix::fs::AtFlags::empty(),
                    )
                    .map_err(errno)?;
                    upper::set_mtime(&dir, &name, node.mtime_ns)?;
                    Ok(None)
                }
                Kind::Symlink => {
                    let target = self.view.target(&node).map_err(|_| Errno::EIO)?;
                    rustix::fs::symlinkat(target, &dir, name.as_slice()).map_err(errno)?;
                    upper::set_mtime(&dir, &name, node.mtime_ns)?;
                    Ok(None)
                }
                Kind::File => {
                    let blob = match how {
                        CopyUp::Empty if ino == pending[0] => None,
                        CopyUp::Whole | CopyUp::Empty => Some(self.blob_file(&node)?),
                    };
                    let file =
                        upper::copy_file(&dir, &name, blob.as_ref(), node.mode, node.mtime_ns)?;
                    // A host file changed while it was copied: the copy may mix old and
                    // new bytes, so it is not kept.
                    if let Some(blob) = &blob {
                        if let Err(e) = self.recheck_host_file(blob, &node) {
                            let _ = rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty());
                            return Err(e);
                        }
                    }
                    Ok(Some(file))
                }
            })?;
            // The copy keeps what the tree records of the entry; if it cannot (a file
            // system with too little room for them), the copy is undone, not left half made.
            let kept = self.lower_xattrs(&node).and_then(|attrs| {
                let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
                path.extend_from_slice(&name);
                let path = std::ffi::OsString::from_vec(path);
                for (attr, value) in &attrs {
                    rustix::fs::lsetxattr(
                        &path,
                        attr.as_slice(),
                        value,
                        rustix::fs::XattrFlags::empty(),
                    )
                    .map_err(errno)?;
                }
                Ok(())
            });
            if let Err(e) = kept {
                let how = if node.kind == Kind::Dir {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                let _ = rustix::fs::unlinkat(&dir, name.as_slice(), how);
                return Err(e);
            }
            let s =
                rustix::fs::statat(&dir, name.as_slice(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(errno)?;
            let lower = Some(node.index);
            self.record(st, &dir, parent, &name, &s, lower);
            made = file;
        }
        Ok(made)
    }
}

/// How to copy a file up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyUp {
    /// With its bytes.
    Whole,
    /// Empty (it is being truncated).
    Empty,
}
