//! One server of several trees: the agent workspace's branches.
//!
//! Each branch is a [`TreeFs`] of its own (a tree and its own upper) with its own range
//! of inode numbers (a *slot*, [`SLOT_BITS`] wide): no inode number is shared between
//! branches, so the kernel's caches of names, attributes and pages can never show one
//! branch's object in another. [`WorkspaceFs`] routes every request to the branch its
//! inode belongs to. The branch in slot 0 shows at the top of the mount; every other
//! branch shows at `.velo/branches/NAME`, a directory the top answers to by name but
//! does not list, so tools that walk the tree (`git status`, `find`) never see it. (The
//! top's branch is not listed there: the kernel gives a directory one name only, and the
//! mount's root is its.)
//!
//! Branches come and go while the mount serves ([`Branches`]); a branch taken away keeps
//! its slot retired, so requests for its inodes fail with `ESTALE` and its numbers are
//! never given out again. The names under `.velo/branches` are answered with no cache
//! time: a branch replaced under the same name shows at once.
//!
//! A *bindable* server also shows a branch at the top to chosen processes and their
//! descendants ([`Branches::bind`]): a request on the top from such a process goes to
//! its branch's root instead. What the kernel keeps of the top itself could then show one
//! view's object in another, so a bindable server lets the kernel keep none of it (the
//! top's attributes and entries have no cache time, and its listing is read anew each
//! time), at the price of a lookup per walk through the top.
//!
//! Below the top, a bound process must not be given the directory inode numbers the
//! branch has under `.velo/branches/NAME`: the kernel gives a directory inode one dentry
//! only, so a bound walk of `MP/src` would *move* the dentry of `.velo/branches/NAME/src`
//! under the mount's top, where every other process (one whose working directory it is,
//! a `branch exec` view bind-mounted from `.velo/branches/NAME`) would then find the
//! top's branch, usually `main`, as its `..`. So a branch shown at the top of a bound
//! process gives its directories numbers in an *alias* range ([`ALIAS`] set in the slot):
//! every request on an alias number goes to the branch's own inode, and the directories
//! in its reply are numbered in the alias range again ([`shown`]). Files, symbolic links
//! and the like keep their one number in both views: the kernel lets a non-directory have
//! several names (as hard links), and one kernel inode keeps one page cache and one set
//! of attributes, so a write through either view is seen through the other, and no open
//! needs direct I/O. Each directory then has two kernel inodes, each with its own names,
//! attributes and listing, and a change through one is not seen in the other's: so on a
//! bindable mount the kernel keeps no entry or attribute of any branch but the one in
//! slot 0 (which has no alias: it shows at the top and nowhere else) and no listing of
//! them, a lookup per path component in those branches. A non-bindable mount has no
//! aliases and keeps everything for long.
//!
//! A binding names a branch's slot, not its name: when the branch is deleted or reset,
//! the bound processes' requests at the top fail with `ESTALE` like any other request
//! for the retired slot's inodes (never served by `main`, nor by a later branch of the
//! same name).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::inodes::SLOT_BITS;
use crate::{Control, TreeFs, TTL};

/// The slot of the directories `.velo` and `.velo/branches`.
const SYNTHETIC: u64 = (1 << (64 - SLOT_BITS)) - 1;
const VELO_DIR: u64 = (SYNTHETIC << SLOT_BITS) | 1;
const BRANCHES_DIR: u64 = (SYNTHETIC << SLOT_BITS) | 2;
/// The name the top answers with the branches.
pub const CONTROL_DIR: &str = ".velo";
/// Set in a slot: the alias range of the branch in the slot without it, the numbers its
/// directories have below the top of a process bound to it (see the module's doc). Real
/// slots stay below `ALIAS - 1`, so no alias is [`SYNTHETIC`].
const ALIAS: u64 = 1 << (63 - SLOT_BITS);

thread_local! {
    /// The slot whose directories the request this thread serves numbers in the alias
    /// range (set by [`WorkspaceFs::view`], which every request that replies with
    /// attributes goes through first).
    static SHOWN: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The number the kernel is given for inode `ino` of kind `kind` in the reply being made:
/// a directory of the branch served through its alias is numbered in the alias range.
pub(crate) fn shown(ino: u64, kind: FileType) -> u64 {
    match SHOWN.get() {
        Some(slot) if kind == FileType::Directory && ino >> SLOT_BITS == slot => {
            ino | (ALIAS << SLOT_BITS)
        }
        _ => ino,
    }
}

/// The branch's own number of `ino`, which may be in an alias range.
fn real(ino: INodeNo) -> INodeNo {
    let n = u64::from(ino);
    let slot = n >> SLOT_BITS;
    if slot != SYNTHETIC && slot & ALIAS != 0 {
        INodeNo(n & !(ALIAS << SLOT_BITS))
    } else {
        ino
    }
}

/// Asked to serve branch `name` (with [`Branches::add`]) when it is looked up and not
/// served, if the workspace has such a branch: a branch made, or reset, by a process that
/// died before telling the server still shows.
pub type BranchLoader = dyn Fn(&str) + Send + Sync;

/// The branches a workspace server serves, changed while it serves.
pub struct Branches {
    table: RwLock<Table>,
    loader: RwLock<Option<Box<BranchLoader>>>,
    /// The top shows other branches to bound processes (see the module's doc).
    bindable: bool,
    /// Bound processes: pid → (its start time, the slot of the branch it sees). A slot,
    /// not a name: a binding ends with its branch (a later one of that name has another
    /// slot), and the retired slot answers `ESTALE`.
    bindings: RwLock<HashMap<u32, (u64, u64)>>,
    /// Which branch's slot each requesting thread sees, worked out from its ancestors:
    /// (the thread's start time, the slot). Emptied when a binding changes; an entry
    /// counts only for the thread that started then (not for a later one given its pid).
    views: std::sync::Mutex<HashMap<u32, (u64, Option<u64>)>>,
    /// Counts changes of `bindings`: a view worked out while one changed is not kept
    /// (it may be of the bindings before).
    bindings_changed: std::sync::atomic::AtomicU64,
    uid: u32,
    gid: u32,
}

struct Table {
    by_slot: HashMap<u64, Arc<TreeFs>>,
    by_name: BTreeMap<String, u64>,
    next_slot: u64,
    /// When the list of branches last changed: the mtime of `.velo/branches`, so the
    /// kernel drops its cached listing of it.
    changed: SystemTime,
}

/// What a request's inode belongs to.
enum Target {
    Branch(Arc<TreeFs>),
    Synthetic(u64),
}

impl Branches {
    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `fs` as branch `name` (in a slot of its own) from now on; its control.
    /// Fails if a branch of that name is served.
    pub fn add(&self, name: &str, fs: TreeFs) -> Result<Control, std::io::Error> {
        let mut table = self.table_mut();
        if table.by_name.contains_key(name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("branch {name} is already served"),
            ));
        }
        if table.next_slot >= ALIAS - 1 {
            return Err(std::io::Error::other(
                "this server has given out every branch slot; remount the workspace",
            ));
        }
        let slot = table.next_slot;
        table.next_slot += 1;
        let mut fs = fs.in_slot(slot);
        if self.bindable {
            // Its directories may have two kernel inodes (see the module's doc).
            fs = fs.with_shared_tree();
        }
        let fs = Arc::new(fs);
        let control = fs.control();
        table.by_slot.insert(slot, fs);
        table.by_name.insert(name.to_string(), slot);
        table.changed = SystemTime::now();
        Ok(control)
    }

    /// Stops serving branch `name` (not the one at the top): waits for the changes in
    /// flight, then every later request for its inodes fails with `ESTALE`. Whether it
    /// was served.
    pub fn remove(&self, name: &str) -> bool {
        let fs = {
            let mut table = self.table_mut();
            let Some(&slot) = table.by_name.get(name) else {
                return false;
            };
            if slot == 0 {
                return false;
            }
            table.by_name.remove(name);
            table.changed = SystemTime::now();
            table.by_slot.remove(&slot)
        };
        if let Some(fs) = fs {
            fs.control().retire();
        }
        true
    }

    /// The control of branch `name`, if it is served.
    pub fn control(&self, name: &str) -> Option<Control> {
        let table = self.table();
        let slot = table.by_name.get(name)?;
        table.by_slot.get(slot).map(|fs| fs.control())
    }

    /// Shows branch `name` at the top to process `pid` and its descendants (those it
    /// starts later too, and those started before; not those reparented away from it).
    pub fn bind(&self, name: &str, pid: u32) -> Result<(), std::io::Error> {
        if !self.bindable {
            return Err(std::io::Error::other(
                "this workspace was mounted without --bindable: processes are bound to branches only on a bindable mount (`velo workspace mount --bindable`); `velo branch exec` needs no binding",
            ));
        }
        if self.table().by_name.get(name) != Some(&0) {
            self.find_or_load(name.as_bytes());
        }
        let slot = self.table().by_name.get(name).copied().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no branch {name} is served"),
            )
        })?;
        let (_, start) = proc_parent_and_start(pid).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no process {pid}"))
        })?;
        let mut bindings = self.bindings.write().unwrap_or_else(|e| e.into_inner());
        // Bindings of processes gone (or of retired branches, once their process is gone)
        // would otherwise pile up for the server's life.
        bindings.retain(|&p, (s, _)| proc_parent_and_start(p).is_some_and(|(_, now)| now == *s));
        bindings.insert(pid, (start, slot));
        drop(bindings);
        self.bindings_changed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.views.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    /// Takes process `pid`'s binding away; whether it had one.
    pub fn unbind(&self, pid: u32) -> bool {
        let had = self
            .bindings
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
            .is_some();
        self.bindings_changed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.views.lock().unwrap_or_else(|e| e.into_inner()).clear();
        had
    }

    /// The slot of the branch the requesting thread `tid` sees at the top, if it is
    /// bound.
    fn view_of(&self, tid: u32) -> Option<u64> {
        if self
            .bindings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return None;
        }
        let (_, started) = proc_parent_and_start(tid)?;
        if let Some((start, view)) = self
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tid)
        {
            if *start == started {
                return *view;
            }
        }
        let changes = self
            .bindings_changed
            .load(std::sync::atomic::Ordering::SeqCst);
        let view = self.resolve_view(tid);
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.len() > 4096 {
            views.clear();
        }
        // A bind or unbind since the walk: its answer may be of the bindings before.
        if self
            .bindings_changed
            .load(std::sync::atomic::Ordering::SeqCst)
            == changes
        {
            views.insert(tid, (started, view));
        }
        view
    }

    /// Walks from thread `tid`'s process up its ancestors to the first bound one.
    fn resolve_view(&self, tid: u32) -> Option<u64> {
        let bindings = self.bindings.read().unwrap_or_else(|e| e.into_inner());
        let mut pid = proc_tgid(tid)?;
        for _ in 0..256 {
            let (parent, start) = proc_parent_and_start(pid)?;
            if let Some(&(bound_start, slot)) = bindings.get(&pid) {
                if bound_start == start {
                    return Some(slot);
                }
            }
            if parent <= 1 {
                return None;
            }
            pid = parent;
        }
        None
    }

    /// The branch's own inode a request on `ino` is for, and the slot whose directories
    /// its reply numbers in the alias range: for a request on the top (`ino` 1), the root
    /// of the branch the requesting thread sees there (a retired branch's: `ESTALE`, never
    /// what it would see unbound); for an alias number, the branch's own.
    fn view(&self, req: &Request, ino: INodeNo) -> (INodeNo, Option<u64>) {
        if !self.bindable {
            return (ino, None);
        }
        let n = u64::from(ino);
        if n != 1 {
            let own = real(ino);
            return (own, (own != ino).then_some(u64::from(own) >> SLOT_BITS));
        }
        match self.view_of(req.pid()) {
            None | Some(0) => (ino, None),
            Some(slot) => (INodeNo((slot << SLOT_BITS) | 1), Some(slot)),
        }
    }

    /// Sets what is asked to serve a branch looked up and not served.
    pub fn set_loader(&self, loader: Box<BranchLoader>) {
        *self.loader.write().unwrap_or_else(|e| e.into_inner()) = Some(loader);
    }

    /// The server of branch `name` (not the top's), loaded if it is not served yet.
    fn find_or_load(&self, name: &[u8]) -> Option<Arc<TreeFs>> {
        let name = std::str::from_utf8(name).ok()?;
        let find = || {
            let table = self.table();
            let slot = table.by_name.get(name).filter(|&&slot| slot != 0)?;
            table.by_slot.get(slot).cloned()
        };
        if let Some(fs) = find() {
            return Some(fs);
        }
        if let Some(load) = &*self.loader.read().unwrap_or_else(|e| e.into_inner()) {
            load(name);
        }
        find()
    }

    /// The names of the branches served.
    pub fn names(&self) -> Vec<String> {
        self.table().by_name.keys().cloned().collect()
    }

    fn target(&self, ino: u64) -> Result<Target, Errno> {
        let slot = ino >> SLOT_BITS;
        if slot == SYNTHETIC {
            return match ino {
                VELO_DIR | BRANCHES_DIR => Ok(Target::Synthetic(ino)),
                _ => Err(Errno::ENOENT),
            };
        }
        self.table()
            .by_slot
            .get(&slot)
            .cloned()
            .map(Target::Branch)
            .ok_or(Errno::ESTALE)
    }

    fn synthetic_attr(&self, ino: u64) -> FileAttr {
        let changed = self.table().changed;
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: changed,
            mtime: changed,
            ctime: changed,
            crtime: changed,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The process (thread group) of thread `tid`.
fn proc_tgid(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Process `pid`'s parent and start time (clock ticks since boot: with the pid, it
/// names one process, never a later one given the same pid).
fn proc_parent_and_start(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let parent = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((parent, start))
}

/// The server of a workspace: its branches, routed by inode.
pub struct WorkspaceFs {
    branches: Arc<Branches>,
    /// The branch at the top (slot 0).
    top: Arc<TreeFs>,
}

impl WorkspaceFs {
    /// A server showing `top` (a server made with [`TreeFs::new`]) as branch `name` at the
    /// top of the mount. Synthetic directories show `uid`/`gid` as their owner.
    /// `bindable`: the top may show other branches to bound processes (see the module's
    /// doc).
    pub fn new(name: &str, top: TreeFs, uid: u32, gid: u32, bindable: bool) -> WorkspaceFs {
        let top = top.in_slot(0);
        let top = Arc::new(if bindable { top.with_shared_top() } else { top });
        let mut by_slot = HashMap::new();
        by_slot.insert(0, top.clone());
        let mut by_name = BTreeMap::new();
        by_name.insert(name.to_string(), 0);
        WorkspaceFs {
            branches: Arc::new(Branches {
                table: RwLock::new(Table {
                    by_slot,
                    by_name,
                    next_slot: 1,
                    changed: SystemTime::now(),
                }),
                loader: RwLock::new(None),
                bindable,
                bindings: RwLock::new(HashMap::new()),
                views: std::sync::Mutex::new(HashMap::new()),
                bindings_changed: std::sync::atomic::AtomicU64::new(0),
                uid,
                gid,
            }),
            top,
        }
    }

    /// The handle to add and remove branches while the server runs.
    pub fn branches(&self) -> Arc<Branches> {
        self.branches.clone()
    }

    /// The control of the branch at the top.
    pub fn control(&self) -> Control {
        self.top.control()
    }

    fn is_control_name(parent: INodeNo, name: &OsStr) -> bool {
        u64::from(parent) == 1 && name.as_bytes() == CONTROL_DIR.as_bytes()
    }

    /// Whether `name` in `parent` is the control directory's name at a branch's root
    /// (the top's, or another's: a branch may show at the top in some process's view).
    fn is_reserved_name(parent: INodeNo, name: &OsStr) -> bool {
        let ino = u64::from(parent);
        ino & ((1 << SLOT_BITS) - 1) == 1
            && ino >> SLOT_BITS != SYNTHETIC
            && name.as_bytes() == CONTROL_DIR.as_bytes()
    }

    /// Whether `ino` is one of the two synthetic directories.
    fn is_synthetic(ino: INodeNo) -> bool {
        u64::from(ino) >> SLOT_BITS == SYNTHETIC
    }

    /// The branch of `ino`, or the error to reply (`synthetic`: for the two synthetic
    /// directories).
    fn branch(&self, ino: INodeNo, synthetic: Errno) -> Result<Arc<TreeFs>, Errno> {
        match self.branches.target(ino.into())? {
            Target::Branch(fs) => Ok(fs),
            Target::Synthetic(_) => Err(synthetic),
        }
    }

    /// The branch of both `a` and `b`; `EXDEV` when they are in different ones.
    fn same_branch(&self, a: INodeNo, b: INodeNo) -> Result<Arc<TreeFs>, Errno> {
        if u64::from(a) >> SLOT_BITS != u64::from(b) >> SLOT_BITS {
            return Err(Errno::EXDEV);
        }
        self.branch(a, Errno::EPERM)
    }

    /// `ino` as the requesting process sees it (the top: its bound branch's root; an
    /// alias: the branch's own inode), and the reply this thread makes next numbered as
    /// that view shows it (see [`shown`]).
    fn view(&self, req: &Request, ino: INodeNo) -> INodeNo {
        let (ino, alias) = self.branches.view(req, ino);
        SHOWN.set(alias);
        ino
    }

    fn synthetic_listing(&self, ino: u64) -> Vec<(u64, FileType, Vec<u8>)> {
        let mut out = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (VELO_DIR, FileType::Directory, b"..".to_vec()),
        ];
        if ino == VELO_DIR {
            out[1].0 = 1;
            out.push((BRANCHES_DIR, FileType::Directory, b"branches".to_vec()));
        } else {
            let table = self.branches.table();
            for (name, slot) in table.by_name.iter().filter(|(_, &slot)| slot != 0) {
                out.push((
                    (slot << SLOT_BITS) | 1,
                    FileType::Directory,
                    name.clone().into(),
                ));
            }
        }
        out
    }
}

/// Routes `$call` on the branch of `$ino`, or replies `$synthetic` (or the routing
/// error) on `$reply`.
macro_rules! route {
    ($self:ident, $req:ident, $ino:ident, $synthetic:expr, $reply:ident, |$fs:ident| $call:expr) => {{
        let $ino = $self.view($req, $ino);
        match $self.branch($ino, $synthetic) {
            Ok($fs) => $call,
            Err(e) => $reply.error(e),
        }
    }};
}

/// Refuses a name-making request for `.velo` at a branch's root: at the top it exists
/// (the control directory), elsewhere it is reserved.
macro_rules! refuse_control_name {
    ($parent:expr, $name:expr, $reply:ident) => {
        if WorkspaceFs::is_control_name($parent, $name) {
            $reply.error(Errno::EEXIST);
            return;
        }
        if WorkspaceFs::is_reserved_name($parent, $name) {
            $reply.error(Errno::EPERM);
            return;
        }
    };
}

impl Filesystem for WorkspaceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        crate::ops::configure(config, false);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if Self::is_control_name(parent, name) {
            return reply.entry(&TTL, &self.branches.synthetic_attr(VELO_DIR), Generation(0));
        }
        let parent = self.view(req, parent);
        match self.branches.target(parent.into()) {
            Ok(Target::Branch(fs)) => fs.lookup(req, parent, name, reply),
            Ok(Target::Synthetic(VELO_DIR)) if name.as_bytes() == b"branches" => reply.entry(
                &TTL,
                &self.branches.synthetic_attr(BRANCHES_DIR),
                Generation(0),
            ),
            Ok(Target::Synthetic(BRANCHES_DIR)) => {
                match self.branches.find_or_load(name.as_bytes()) {
                    // No cache time: a branch replaced under this name shows at once.
                    Some(fs) => fs.root_entry(Duration::ZERO, reply),
                    None => reply.error(Errno::ENOENT),
                }
            }
            Ok(Target::Synthetic(_)) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        // The kernel's references through an alias are counted on the branch's own inode.
        let ino = real(ino);
        if let Ok(Target::Branch(fs)) = self.branches.target(ino.into()) {
            fs.forget(req, ino, nlookup);
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.getattr(req, ino, fh, reply),
            Ok(Target::Synthetic(ino)) => {
                reply.attr(&Duration::ZERO, &self.branches.synthetic_attr(ino))
            }
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
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        route!(self, req, ino, Errno::EPERM, reply, |fs| fs.setattr(
            req, ino, mode, uid, gid, size, atime, mtime, ctime, fh, crtime, chgtime, bkuptime,
            flags, reply
        ))
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        route!(self, req, ino, Errno::EINVAL, reply, |fs| fs
            .readlink(req, ino, reply))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        refuse_control_name!(parent, name, reply);
        route!(self, req, parent, Errno::EPERM, reply, |fs| fs
            .mknod(req, parent, name, mode, umask, rdev, reply))
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        refuse_control_name!(parent, name, reply);
        route!(self, req, parent, Errno::EPERM, reply, |fs| fs
            .mkdir(req, parent, name, mode, umask, reply))
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if Self::is_control_name(parent, name) {
            return reply.error(Errno::EBUSY);
        }
        route!(self, req, parent, Errno::EPERM, reply, |fs| fs
            .unlink(req, parent, name, reply))
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if Self::is_control_name(parent, name) {
            return reply.error(Errno::EBUSY);
        }
        route!(self, req, parent, Errno::EPERM, reply, |fs| fs
            .rmdir(req, parent, name, reply))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        refuse_control_name!(parent, link_name, reply);
        route!(self, req, parent, Errno::EPERM, reply, |fs| fs
            .symlink(req, parent, link_name, target, reply))
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if Self::is_control_name(parent, name) || Self::is_control_name(newparent, newname) {
            return reply.error(Errno::EBUSY);
        }
        // A branch's root is no entry to move (and not EXDEV: `mv` would copy the branch
        // and then empty it).
        if Self::is_synthetic(parent) || Self::is_synthetic(newparent) {
            return reply.error(Errno::EPERM);
        }
        if Self::is_reserved_name(newparent, newname) {
            return reply.error(Errno::EPERM);
        }
        let (parent, newparent) = (self.view(req, parent), self.view(req, newparent));
        match self.same_branch(parent, newparent) {
            Ok(fs) => fs.rename(req, parent, name, newparent, newname, flags, reply),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        refuse_control_name!(newparent, newname, reply);
        if Self::is_synthetic(newparent) {
            return reply.error(Errno::EPERM);
        }
        let newparent = self.view(req, newparent);
        let ino = real(ino);
        match self.same_branch(ino, newparent) {
            Ok(fs) => fs.link(req, ino, newparent, newname, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        route!(self, req, ino, Errno::EISDIR, reply, |fs| fs
            .open(req, ino, flags, reply))
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        route!(self, req, ino, Errno::EISDIR, reply, |fs| fs
            .read(req, ino, fh, offset, size, flags, lock_owner, reply))
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        route!(self, req, ino, Errno::EISDIR, reply, |fs| fs.write(
            req,
            ino,
            fh,
            offset,
            data,
            write_flags,
            flags,
            lock_owner,
            reply
        ))
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        route!(self, req, ino, Errno::ENOSYS, reply, |fs| fs
            .flush(req, ino, fh, lock_owner, reply))
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        let ino = real(ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.release(req, ino, fh, flags, lock_owner, flush, reply),
            _ => reply.ok(),
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        route!(self, req, ino, Errno::EINVAL, reply, |fs| fs
            .fsync(req, ino, fh, datasync, reply))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if !self.branches.bindable {
            // As every branch answers (see `TreeFs::opendir`): no open round trip for
            // directories, and the kernel keeps every listing.
            return reply.error(Errno::ENOSYS);
        }
        // Bindable: the top's listing differs by process, and any other branch's
        // directory has a second kernel inode in its alias range whose changes this one
        // would not see (see the module's doc), so the kernel keeps none of those
        // listings; the rest of the top's branch's it keeps, as without binding.
        let ino = u64::from(ino);
        let flags = if ino != 1 && ino >> SLOT_BITS == 0 {
            fuser::FopenFlags::FOPEN_CACHE_DIR | fuser::FopenFlags::FOPEN_KEEP_CACHE
        } else {
            fuser::FopenFlags::empty()
        };
        reply.opened(FileHandle(0), flags);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.readdir(req, ino, fh, offset, reply),
            Ok(Target::Synthetic(dir)) => {
                let listing = self.synthetic_listing(dir);
                for (i, (entry, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
                    if reply.add(
                        INodeNo(*entry),
                        i as u64 + 1,
                        *kind,
                        OsStr::from_bytes(name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.readdirplus(req, ino, fh, offset, reply),
            Ok(Target::Synthetic(dir)) => {
                // With no cache time, so a branch replaced under its name shows at once.
                let listing = self.synthetic_listing(dir);
                for (i, (entry, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
                    let attr = match self.branches.target(*entry) {
                        Ok(Target::Branch(fs)) => match fs.root_attr() {
                            Ok(attr) => attr,
                            Err(_) => continue,
                        },
                        _ => FileAttr {
                            kind: *kind,
                            ..self.branches.synthetic_attr(*entry)
                        },
                    };
                    if reply.add(
                        INodeNo(*entry),
                        i as u64 + 1,
                        OsStr::from_bytes(name),
                        &Duration::ZERO,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.releasedir(req, ino, fh, flags, reply),
            _ => reply.ok(),
        }
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.fsyncdir(req, ino, fh, datasync, reply),
            Ok(Target::Synthetic(_)) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let ino = real(ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.statfs(req, ino, reply),
            _ => self.top.statfs(req, INodeNo(1), reply),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        route!(self, req, ino, Errno::EPERM, reply, |fs| fs
            .setxattr(req, ino, name, value, flags, position, reply))
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        route!(self, req, ino, Errno::ENODATA, reply, |fs| fs
            .getxattr(req, ino, name, size, reply))
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.listxattr(req, ino, size, reply),
            Ok(Target::Synthetic(_)) if size == 0 => reply.size(0),
            Ok(Target::Synthetic(_)) => reply.data(&[]),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        route!(self, req, ino, Errno::EPERM, reply, |fs| fs
            .removexattr(req, ino, name, reply))
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let ino = self.view(req, ino);
        match self.branches.target(ino.into()) {
            Ok(Target::Branch(fs)) => fs.access(req, ino, mask, reply),
            Ok(Target::Synthetic(_)) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        refuse_control_name!(parent, name, reply);
        route!(self, req, parent, Errno::EPERM, reply, |fs| fs
            .create(req, parent, name, mode, umask, flags, reply))
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        route!(self, req, ino, Errno::EISDIR, reply, |fs| fs
            .fallocate(req, ino, fh, offset, length, mode, reply))
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        route!(self, req, ino, Errno::EINVAL, reply, |fs| fs
            .lseek(req, ino, fh, offset, whence, reply))
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (ino_in, ino_out) = (real(ino_in), real(ino_out));
        match self.same_branch(ino_in, ino_out) {
            Ok(fs) => fs.copy_file_range(
                req, ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len, flags, reply,
            ),
            Err(e) => reply.error(e),
        }
    }
}
