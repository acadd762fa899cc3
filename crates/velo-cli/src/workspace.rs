//! The agent workspace's commands: `velo workspace`, `velo branch`, `velo snapshot`, and
//! the names `velo diff` takes in a workspace.
//!
//! The records (branches, snapshots, what gc keeps) are crate velo-workspace's. This
//! module runs the workspace's one FUSE server (velo-fuse's `WorkspaceFs`: the top
//! branch at the mount point, every branch at `.velo/branches/NAME`) and talks to it
//! through the mount's control socket: a branch's upper is written only by that server
//! while it runs, so a snapshot of a served branch is sealed by the server (changes held
//! off while its upper is read), and branches made or deleted while it runs are added to
//! or taken from it. Without a running server the same operations work on the records
//! directly.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use velo_core::Hash;
use velo_project::commit::CommitReport;
use velo_store::Store;
use velo_workspace::{Named, Workspace, TOP_BRANCH};

use crate::Ctx;

/// The environment variable naming the workspace for commands run outside it.
const WORKSPACE_ENV: &str = "VELO_WORKSPACE";
/// Set by `branch exec` for the command: the branch it sees.
const BRANCH_ENV: &str = "VELO_BRANCH";

/// The workspace a command acts on: `--workspace`, else `$VELO_WORKSPACE`, else the one
/// the working directory is in (its directory, or its mount).
pub fn find(explicit: Option<&Path>) -> Result<Workspace> {
    if let Some(dir) = explicit {
        return Ok(Workspace::open(dir)?);
    }
    if let Some(dir) = std::env::var_os(WORKSPACE_ENV).filter(|v| !v.is_empty()) {
        return Workspace::open(Path::new(&dir))
            .with_context(|| format!("${WORKSPACE_ENV}={}", Path::new(&dir).display()));
    }
    let cwd = std::env::current_dir().context("the working directory")?;
    if let Some(dir) = velo_workspace::find_from(&cwd) {
        return Ok(Workspace::open(&dir)?);
    }
    for dir in cwd.ancestors() {
        if velo_fuse::is_fuse_mount(dir) {
            if let Some(ws) = crate::control::Client::connect(dir)
                .ok()
                .and_then(|mut c| c.ask(&velo_control::Request::Info).ok())
                .and_then(|info| info.get("workspace")?.as_str().map(PathBuf::from))
            {
                return Ok(Workspace::open(&ws)?);
            }
        }
    }
    bail!(
        "no workspace here: give --workspace DIR, set ${WORKSPACE_ENV}, or run inside a workspace or its mount"
    )
}

fn store_of(ws: &Workspace) -> Result<Store> {
    Store::open(&ws.config().store).with_context(|| {
        format!(
            "the store of workspace {} ({})",
            ws.dir().display(),
            ws.config().store.display()
        )
    })
}

/// A connection to the workspace's running server, if it runs. A server that answers
/// but turns the request away (all its connections taken) is an error: working on the
/// branches without it would meet its locks and say so misleadingly.
fn server(ws: &Workspace) -> Result<Option<crate::control::Client>> {
    let Some(mount) = ws.config().mount.as_ref() else {
        return Ok(None);
    };
    if !velo_fuse::is_fuse_mount(mount) {
        return Ok(None);
    }
    let Ok(mut client) = crate::control::Client::connect(mount) else {
        return Ok(None);
    };
    let mut tries = 0;
    let info = loop {
        match client.ask(&velo_control::Request::Info) {
            Ok(info) => break info,
            Err(e) if format!("{e:#}").contains(crate::control::BUSY) => {
                tries += 1;
                if tries == 20 {
                    return Err(e.context(format!(
                        "the server of {} is busy: every one of its control connections is taken (by other velo commands, or a program holding them); try again",
                        mount.display()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
                client = match crate::control::Client::connect(mount) {
                    Ok(client) => client,
                    Err(_) => return Ok(None),
                };
            }
            Err(_) => return Ok(None),
        }
    };
    let Some(served) = info
        .get("workspace")
        .and_then(Value::as_str)
        .map(PathBuf::from)
    else {
        return Ok(None);
    };
    if served == ws.dir() {
        return Ok(Some(client));
    }
    // The server at this workspace's mount point serves a workspace that is gone from
    // where it was: this one, moved while it ran. Working on without the server would
    // make branches it never serves.
    if !served.join("workspace.json").exists() {
        bail!(
            "workspace {} was moved from {} while its server ran, which still works there: unmount it (`velo umount {}`) and mount the workspace again (`velo workspace mount {} {}`)",
            ws.dir().display(),
            served.display(),
            mount.display(),
            ws.dir().display(),
            mount.display()
        );
    }
    Ok(None)
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

/// Branch `name`'s upper, locked, for a command that found no server answering (see
/// [`server`]): one may still run unreachable, serving a `branch exec` command that
/// entered the branch before the mount point was unmounted, until that command ends.
fn lock_upper(store: &Store, ws: &Workspace, name: &str) -> Result<(PathBuf, OwnedFd)> {
    let upper = ws.upper_of(name);
    velo_project::session::prepare_upper(store.root(), &upper).map_err(|e| {
        let held = std::fs::File::open(&upper).is_ok_and(|dir| {
            rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
        });
        if held {
            anyhow::anyhow!(
                "branch {name}: its upper {} is in use and no server answers at the workspace's mount point: a server unmounted while a `velo branch exec` command was in the branch serves that command until it ends (or another velo command holds the upper). End it, or wait, and try again",
                upper.display()
            )
        } else {
            e.into()
        }
    })
}

/// The shared commit routine on a branch's upper: the tree it shows.
fn commit_branch(store: &Store, base: Hash, upper: &Path) -> Result<CommitReport> {
    let report = velo_project::commit::commit_upper(
        store,
        base,
        upper,
        velo_project::commit::Shown {
            modes: None,
            xattrs: true,
        },
    )
    .with_context(|| format!("committing {}", upper.display()))?;
    store.sync()?;
    Ok(report)
}

/// The tree branch `name` shows now: its base when its upper is empty (nothing read),
/// else its base and upper committed (by its server when it runs).
fn branch_tree(ws: &Workspace, store: &Store, name: &str) -> Result<Hash> {
    Ok(branch_commit(ws, store, name)?.root)
}

/// [`branch_tree`], with what the commit could not keep.
fn branch_commit(ws: &Workspace, store: &Store, name: &str) -> Result<CommitReport> {
    let record = ws.branch(name)?;
    let upper = ws.upper_of(name);
    if is_empty_dir(&upper) {
        return Ok(CommitReport {
            root: ws.base_tree(store, &record)?,
            setid_dropped: Vec::new(),
            not_committed: Vec::new(),
        });
    }
    if let Some(mut client) = server(ws)? {
        if let Some(mount) = &ws.config().mount {
            crate::mount::sync_mount(mount)?;
        }
        let reply = client.ask(&velo_control::Request::Snapshot {
            branch: name.to_string(),
        })?;
        return crate::control::report_of(&reply);
    }
    // No server: take the upper's lock, so a server started meanwhile waits.
    let (path, _lock) = lock_upper(store, ws, name)?;
    commit_branch(store, ws.base_tree(store, &record)?, &path)
}

/// The tree a name shows: a snapshot's, a branch's current one, or a tree of the store.
pub fn tree_of(ws: &Workspace, store: &Store, spec: &str) -> Result<Hash> {
    Ok(match ws.resolve(store, spec)? {
        Named::Snapshot(s) => s.tree()?,
        Named::Branch(b) => branch_tree(ws, store, &b.name)?,
        Named::Tree(h) => h,
    })
}

fn print(ctx: &Ctx, value: Value, text: impl FnOnce()) -> Result<ExitCode> {
    if ctx.json {
        // As every command's output: a reader gone away ends velo quietly, another
        // failure (`> /dev/full`) is said as a failed write of the output.
        crate::fmt::print_json(&value);
    } else {
        text();
    }
    Ok(ExitCode::SUCCESS)
}

/// `velo workspace init DIR --from TREE [--mount MOUNTPOINT]`.
/// What a workspace is made over: a tree, or a host directory (`--lower`).
pub enum Over<'a> {
    Tree(&'a str),
    Lower(&'a Path),
}

pub fn init(
    ctx: &Ctx,
    dir: &Path,
    over: Over<'_>,
    mount: Option<&Path>,
    bindable: bool,
) -> Result<ExitCode> {
    let store = ctx.store_or_create()?;
    let _lock = store.lock_shared()?;
    let in_store = velo_store::resolve_existing(dir);
    let store_root = velo_store::resolve_existing(store.root());
    if in_store.starts_with(&store_root) || store_root.starts_with(&in_store) {
        bail!(
            "workspace {}: inside the store {} (or containing it); a branch's changes may not live among the store's objects. Choose another directory",
            dir.display(),
            store_root.display()
        );
    }
    let mountpoint =
        match mount {
            Some(m) => Some(std::fs::canonicalize(m).with_context(|| {
                format!("mount point {}: make the directory first", m.display())
            })?),
            None => None,
        };
    if let Some(mp) = &mountpoint {
        let lower = match &over {
            Over::Lower(lower) => Some(*lower),
            Over::Tree(_) => None,
        };
        check_mountpoint(dir, store.root(), mp, lower)?;
    }
    let (mut ws, base) = match over {
        Over::Tree(from) => {
            let base = crate::run::layer(&store, from)?;
            let ws = Workspace::init(dir, &store, base, mountpoint.as_deref())?;
            (ws, base.to_hex())
        }
        Over::Lower(lower) => {
            let (ws, left_out) = Workspace::init_lower(dir, &store, lower, mountpoint.as_deref())?;
            if left_out > 0 {
                note!(
                    "velo: --lower {}: {left_out} sockets, fifos or devices left out (a tree holds none)",
                    lower.display()
                );
            }
            (ws, "lower".to_string())
        }
    };
    let started = (|| {
        if bindable {
            ws.set_mount(mountpoint.as_deref(), true)?;
        }
        if let Some(mp) = &mountpoint {
            start(ctx, &ws, &store, mp)?;
        }
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(e) = started {
        // Nothing half-made stays: the command may simply be run again.
        if let Err(undo) = ws.remove(&store) {
            note!("velo: removing the workspace made before the failure: {undo:#}");
        }
        return Err(e);
    }
    print(
        ctx,
        json!({
            "workspace": ws.dir().to_string_lossy(),
            "base": base,
            "lower": ws.config().lower.as_ref().map(|l| l.to_string_lossy()),
            "branch": TOP_BRANCH,
            "mount": mountpoint.as_ref().map(|m| m.to_string_lossy()),
        }),
        || {
            note!(
                "velo: workspace {} over {} (branch {TOP_BRANCH}){}",
                ws.dir().display(),
                match &ws.config().lower {
                    Some(lower) => format!("host directory {}", lower.display()),
                    None => base[..16].to_string(),
                },
                match &mountpoint {
                    Some(m) => format!(", mounted at {}", m.display()),
                    None => String::new(),
                }
            );
        },
    )
}

/// `velo workspace mount DIR MOUNTPOINT`: serves an existing workspace.
pub fn mount(ctx: &Ctx, dir: &Path, mountpoint: &Path, bindable: bool) -> Result<ExitCode> {
    let mut ws = Workspace::open(dir)?;
    let store = store_of(&ws)?;
    let mp = std::fs::canonicalize(mountpoint).with_context(|| {
        format!(
            "mount point {}: make the directory first",
            mountpoint.display()
        )
    })?;
    if let (Some(at), Some(_)) = (&ws.config().mount, server(&ws)?) {
        bail!(
            "workspace {} is mounted already, at {} (`velo umount {}` first)",
            ws.dir().display(),
            at.display(),
            at.display()
        );
    }
    check_mountpoint(ws.dir(), store.root(), &mp, ws.config().lower.as_deref())?;
    let before = ws.config().clone();
    ws.set_mount(Some(&mp), bindable)?;
    if let Err(e) = start(ctx, &ws, &store, &mp) {
        let _ = ws.set_mount(before.mount.as_deref(), before.bindable);
        return Err(e);
    }
    print(
        ctx,
        json!({ "workspace": ws.dir().to_string_lossy(), "mount": mp.to_string_lossy() }),
        || {
            note!(
                "velo: workspace {} mounted at {}",
                ws.dir().display(),
                mp.display()
            )
        },
    )
}

/// Refuses mount point `mp` for workspace `dir` of the store at `store_root` before
/// anything is made or recorded; cleans up a dead mount there.
fn check_mountpoint(dir: &Path, store_root: &Path, mp: &Path, lower: Option<&Path>) -> Result<()> {
    if crate::mount::is_dead_mount(mp) {
        note!(
            "velo: {} is a mount whose server died; unmounting it first",
            mp.display()
        );
        crate::mount::unmount(mp, false)?;
    }
    if velo_fuse::is_fuse_mount(mp) {
        bail!(
            "{}: already a FUSE mount; `velo umount {}` first",
            mp.display(),
            mp.display()
        );
    }
    if !std::fs::metadata(mp).is_ok_and(|m| m.is_dir()) {
        bail!("mount point {}: not a directory", mp.display());
    }
    let (dir, store_root) = (
        velo_store::resolve_existing(dir),
        velo_store::resolve_existing(store_root),
    );
    let lower = lower.map(velo_store::resolve_existing);
    for of in [Some(&store_root), Some(&dir), lower.as_ref()]
        .into_iter()
        .flatten()
    {
        if mp.starts_with(of) || of.starts_with(mp) {
            bail!(
                "mount point {}: inside {} (or containing it); a server serving into its own files would deadlock. Choose another directory",
                mp.display(),
                of.display()
            );
        }
    }
    Ok(())
}

/// Starts the workspace's server in the background, mounted at `mp` (checked already).
fn start(ctx: &Ctx, ws: &Workspace, store: &Store, mp: &Path) -> Result<()> {
    let (mut command, log) = crate::mount::server_command(store)?;
    command.arg("__workspace-serve").arg(ws.dir()).arg(mp);
    // Quiet on success: the caller says what it made.
    crate::mount::start_server(ctx, command, &log, "workspace", mp, false)?;
    // Branches that could not be served are said, not hidden.
    if let Some(mut client) = server(ws)? {
        if let Ok(reply) = client.ask(&velo_control::Request::Branches) {
            if let Some(failed) = reply.get("failed").and_then(Value::as_object) {
                for (name, why) in failed {
                    note!(
                        "velo: branch {name} is not served: {} (`velo branch delete {name}` or `reset` it)",
                        why.as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

/// One served branch: what it was made from, the lock on its upper, and what keeps its
/// base from gc.
struct Served {
    /// `None`: the workspace's host lower.
    base: Option<Hash>,
    upper: PathBuf,
    _lock: OwnedFd,
    _kept: Option<crate::mount::Kept>,
}

/// The workspace server's side of the control socket.
struct WorkspaceServer {
    dir: PathBuf,
    mountpoint: PathBuf,
    store_root: PathBuf,
    serving: std::sync::atomic::AtomicBool,
    branches: Arc<velo_fuse::Branches>,
    served: Mutex<HashMap<String, Served>>,
    /// Branches that could not be served, and why.
    failed: Mutex<HashMap<String, String>>,
    /// One branch change at a time.
    admin: Mutex<()>,
}

/// A branch's server, and its upper's lock.
fn branch_fs(
    store: &Store,
    store_root: &Path,
    ws: &Workspace,
    name: &str,
) -> Result<(velo_fuse::TreeFs, Served)> {
    // Until the base is pinned: gc keeps its tree and view meanwhile, and waits.
    let lock = store.lock_shared()?;
    let record = ws.branch(name)?;
    let (base, index_path) = if record.lower {
        (None, ws.dir().join("lower.idx"))
    } else {
        let base = record.base()?;
        (
            Some(base),
            velo_project::view::ensure_view(store, base)?.index,
        )
    };
    let index = velo_view::View::new(crate::shim::map(&index_path)?)
        .with_context(|| format!("{}: not a view index", index_path.display()))?;
    let (upper, upper_lock) = velo_project::session::prepare_upper(store_root, &ws.upper_of(name))?;
    let fs = velo_fuse::TreeFs::new(
        index,
        store.root(),
        Some(&upper),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )?
    .with_max_depth(velo_core::MAX_DEPTH)
    .with_tree_xattrs(crate::mount::tree_xattrs(store_root)?);
    let fs = match (&ws.config().lower, record.lower) {
        (Some(lower), true) => {
            let dir = rustix::fs::open(
                lower,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .with_context(|| format!("opening the host lower {}", lower.display()))?;
            fs.with_host_lower(dir)
        }
        _ => fs,
    };
    let kept = base.map(|base| crate::mount::keep_served(store, &[base], lock));
    Ok((
        fs,
        Served {
            base,
            upper,
            _lock: upper_lock,
            _kept: kept,
        },
    ))
}

impl WorkspaceServer {
    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, name: &str) -> Result<Value> {
        let _one = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        self.add_locked(name)
    }

    /// Serves branch `name` as recorded (under the admin lock).
    fn add_locked(&self, name: &str) -> Result<Value> {
        if self.branches.control(name).is_some() {
            return Ok(json!({ "branch": name }));
        }
        let ws = Workspace::open(&self.dir)?;
        let store = Store::open(&self.store_root)?;
        ws.keep_base(&store, &ws.branch(name)?)?;
        let (fs, served) = branch_fs(&store, &self.store_root, &ws, name)?;
        self.branches.add(name, fs)?;
        self.served().insert(name.to_string(), served);
        self.failed().remove(name);
        Ok(json!({ "branch": name }))
    }

    /// Stops serving branch `name` (under the admin lock): its changes in flight end,
    /// its upper's lock is let go.
    fn retire_locked(&self, name: &str) -> Result<()> {
        if name == TOP_BRANCH {
            bail!(
                "branch {TOP_BRANCH} shows at the top of the mount while it is mounted: `velo umount` the workspace first"
            );
        }
        self.branches.remove(name);
        self.served().remove(name);
        Ok(())
    }

    /// Deletes branch `name` (under the admin lock, so a lookup meanwhile does not serve
    /// it again).
    fn delete(&self, name: &str) -> Result<Value> {
        let _one = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let ws = Workspace::open(&self.dir)?;
        // A damaged record (never served) is deleted too.
        match ws.branch(name) {
            Ok(_) | Err(velo_workspace::WorkspaceError::BadRecord { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.retire_locked(name)?;
        let store = Store::open(&self.store_root)?;
        let _lock = store.lock_shared()?;
        ws.delete_branch(&store, name)?;
        self.failed().remove(name);
        Ok(json!({ "deleted": name }))
    }

    /// Resets branch `name` to tree `base` and serves it again, all under the admin lock
    /// (a lookup meanwhile waits, and then sees the new state).
    fn reset(&self, name: &str, base: &str, from: &str) -> Result<Value> {
        let _one = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let ws = Workspace::open(&self.dir)?;
        ws.branch(name)?;
        let base: Hash = base
            .parse()
            .map_err(|e| anyhow::anyhow!("base {base}: {e}"))?;
        self.retire_locked(name)?;
        let store = Store::open(&self.store_root)?;
        let _lock = store.lock_shared()?;
        let reset = ws.reset_branch(&store, name, base, from);
        // Served again whether the reset was made or not.
        let served = self.add_locked(name);
        let record = reset?;
        served?;
        Ok(json!({ "branch": name, "base": record.base, "from": from }))
    }

    fn snapshot(&self, name: &str) -> Result<velo_project::commit::CommitReport> {
        // No reset or delete of the branch meanwhile: its base and upper stay a pair.
        let _one = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let (base, upper) = {
            let served = self.served();
            let s = served
                .get(name)
                .with_context(|| format!("branch {name} is not served"))?;
            (s.base, s.upper.clone())
        };
        let control = self
            .branches
            .control(name)
            .with_context(|| format!("branch {name} is not served"))?;
        let store = Store::open(&self.store_root)?;
        let _lock = store.lock_shared()?;
        let base = match base {
            Some(base) => base,
            // The host lower, ingested now and checked against its index.
            None => {
                let ws = Workspace::open(&self.dir)?;
                ws.base_tree(&store, &ws.branch(name)?)?
            }
        };
        let _quiet = control.quiesce();
        let report = velo_project::commit::commit_upper(
            &store,
            base,
            &upper,
            velo_project::commit::Shown {
                modes: None,
                xattrs: true,
            },
        )
        .with_context(|| format!("committing branch {name}"))?;
        store.sync()?;
        Ok(report)
    }
}

fn report_json(report: &velo_project::commit::CommitReport) -> Value {
    json!({
        "root": report.root.to_hex(),
        "setid_dropped": report.setid_dropped.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
        "not_committed": report.not_committed.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
    })
}

impl crate::control::Server for WorkspaceServer {
    fn info(&self) -> crate::control::ServerInfo {
        let top = self
            .served()
            .get(TOP_BRANCH)
            .map(|s| s.base.map_or_else(|| "lower".to_string(), |b| b.to_hex()));
        crate::control::ServerInfo {
            store: self.store_root.clone(),
            root: top.unwrap_or_default(),
            upper: None,
            temporary: false,
            name: None,
            passthrough: false,
            workspace: Some(self.dir.clone()),
        }
    }

    fn changed(&self) -> bool {
        false
    }

    fn commit(&self) -> Result<velo_project::commit::CommitReport> {
        self.snapshot(TOP_BRANCH)
    }

    fn mounted(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::SeqCst)
            && velo_fuse::is_fuse_mount(&self.mountpoint)
    }

    fn answer(&self, request: &velo_control::Request) -> Option<Result<Value>> {
        use velo_control::Request;
        Some(match request {
            Request::BranchAdd { branch } => self.add(branch),
            Request::BranchDelete { branch } => self.delete(branch),
            Request::BranchReset { branch, base, from } => self.reset(branch, base, from),
            Request::Snapshot { branch } => self.snapshot(branch).map(|r| report_json(&r)),
            Request::Branches => Ok(json!({
                "branches": self.branches.names(),
                "failed": *self.failed(),
            })),
            Request::BranchBind { branch, pid } => self
                .branches
                .bind(branch, *pid)
                .map(|()| json!({ "branch": branch, "pid": pid }))
                .map_err(anyhow::Error::from),
            Request::BranchUnbind { pid } => {
                Ok(json!({ "pid": pid, "was_bound": self.branches.unbind(*pid) }))
            }
            _ => return None,
        })
    }
}

/// `velo __workspace-serve DIR MOUNTPOINT`: the server, in the foreground.
pub fn serve(dir: &Path, mountpoint: &Path) -> Result<ExitCode> {
    let ws = Workspace::open(dir)?;
    let store = store_of(&ws)?;
    let store_root = std::fs::canonicalize(store.root())?;
    let (top, top_served) = branch_fs(&store, &store_root, &ws, TOP_BRANCH)?;
    let fs = velo_fuse::WorkspaceFs::new(
        TOP_BRANCH,
        top,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
        ws.config().bindable,
    );
    let server = Arc::new(WorkspaceServer {
        dir: ws.dir().to_path_buf(),
        mountpoint: mountpoint.to_path_buf(),
        store_root: store_root.clone(),
        serving: std::sync::atomic::AtomicBool::new(true),
        branches: fs.branches(),
        served: Mutex::new(HashMap::new()),
        failed: Mutex::new(HashMap::new()),
        admin: Mutex::new(()),
    });
    server.served().insert(TOP_BRANCH.to_string(), top_served);
    let (branches, damaged) = ws.branches_and_damage()?;
    for name in damaged {
        server.failed().insert(
            name.clone(),
            format!("its record branches/{name}/branch.json is damaged"),
        );
    }
    for record in branches {
        if record.name != TOP_BRANCH {
            // One broken branch (its base tree gone, its upper damaged) keeps the others
            // from nothing; `velo workspace mount` reports it.
            if let Err(e) = server.add(&record.name) {
                server
                    .failed()
                    .insert(record.name.clone(), format!("{e:#}"));
            }
        }
    }
    // A branch recorded since (by a `branch create` or `reset` that died before telling
    // the server) is served when it is looked up.
    let weak = Arc::downgrade(&server);
    server.branches.set_loader(Box::new(move |name| {
        let Some(server) = weak.upgrade() else {
            return;
        };
        let recorded = velo_workspace::validate_branch_name(name).is_ok()
            && server
                .dir
                .join("branches")
                .join(name)
                .join("branch.json")
                .is_file();
        if recorded {
            if let Err(e) = server.add(name) {
                tracing::warn!("serving branch {name}: {e:#}");
            }
        }
    }));
    crate::mount::unmount_on_signal(mountpoint)?;
    let at_exit = Arc::new(crate::control::AtExit::default());
    let control = crate::control::new_name();
    crate::control::listen(&control, server.clone(), at_exit.clone())?;
    velo_fuse::serve_workspace(
        fs,
        mountpoint,
        &velo_fuse::MountOptions {
            allow_other: false,
            source: Some(format!("velo-{control}")),
        },
    )?;
    server
        .serving
        .store(false, std::sync::atomic::Ordering::SeqCst);
    if let Some(pending) = at_exit.take() {
        crate::control::answer_at_exit(
            pending.stream,
            Err(anyhow::anyhow!(
                "a workspace keeps every branch's changes in its own upper; unmounted without a commit (`velo snapshot create` seals a branch)"
            )),
        );
    }
    // The control thread keeps the server alive to the end; its branches' pins and
    // upper locks go now.
    server.served().clear();
    Ok(ExitCode::SUCCESS)
}

/// `velo snapshot create [--branch B] [-m MSG]`.
pub fn snapshot_create(
    ctx: &Ctx,
    ws: &Workspace,
    branch: Option<&str>,
    message: Option<&str>,
) -> Result<ExitCode> {
    let from_env = std::env::var(BRANCH_ENV).ok().filter(|b| !b.is_empty());
    let branch = branch
        .map(str::to_string)
        .or(from_env)
        .or_else(|| branch_of_cwd(ws))
        .unwrap_or_else(|| TOP_BRANCH.to_string());
    let store = store_of(ws)?;
    let _lock = store.lock_shared()?;
    let committed = branch_commit(ws, &store, &branch)?;
    let record = ws.add_snapshot(&store, committed.root, &branch, message)?;
    let mut value = serde_json::to_value(&record)?;
    // Paths as text (lossy where not UTF-8), as the server's reply has them: `json!` of
    // a path that is not UTF-8 panics.
    let lossy = |paths: &[PathBuf]| -> Vec<String> {
        paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    };
    value["setid_dropped"] = json!(lossy(&committed.setid_dropped));
    value["not_committed"] = json!(lossy(&committed.not_committed));
    print(ctx, value, || {
        for p in &committed.setid_dropped {
            note!("velo: {}: setuid/setgid bits and file capabilities not kept (a file written in a branch cannot grant privileges)", p.display());
        }
        for p in &committed.not_committed {
            note!("velo: {}: not kept (a socket, fifo or device: a tree holds files, directories and symlinks)", p.display());
        }
        note!("velo: snapshot {} of branch {branch}", record.id);
        out!("{} {}", record.id, record.tree);
    })
}

/// The branch whose directory the working directory is in: under the mount's
/// `.velo/branches/NAME`, or the workspace's `branches/NAME`.
fn branch_of_cwd(ws: &Workspace) -> Option<String> {
    let cwd = std::env::current_dir().ok()?;
    let under = |top: PathBuf| {
        let rest = cwd.strip_prefix(&top).ok()?;
        let name = rest.components().next()?.as_os_str().to_str()?.to_string();
        ws.branch(&name).is_ok().then_some(name)
    };
    let from_mount = ws
        .config()
        .mount
        .as_ref()
        .and_then(|m| under(m.join(velo_fuse::CONTROL_DIR).join("branches")));
    from_mount.or_else(|| under(ws.dir().join("branches")))
}

/// `velo snapshot list`.
pub fn snapshot_list(ctx: &Ctx, ws: &Workspace) -> Result<ExitCode> {
    let (list, damaged) = ws.snapshots_and_damage()?;
    for path in &damaged {
        note!(
            "velo: {}: a damaged snapshot record (not listed; `velo snapshot delete ID` removes it)",
            path.display()
        );
    }
    let damaged: Vec<_> = damaged.iter().map(|p| p.to_string_lossy()).collect();
    print(
        ctx,
        json!({ "snapshots": list, "damaged": damaged }),
        || {
            for s in &list {
                out!(
                    "{}\t{}\t{}\t{}",
                    s.id,
                    s.tree.get(..16).unwrap_or(&s.tree),
                    s.branch,
                    // A message is the user's text: a newline in it must not forge a
                    // second line of the listing.
                    crate::fmt::shown(s.message.as_deref().unwrap_or("").as_bytes())
                );
            }
        },
    )
}

/// `velo snapshot show ID`.
pub fn snapshot_show(ctx: &Ctx, ws: &Workspace, id: &str) -> Result<ExitCode> {
    let s = ws.snapshot(id)?;
    print(ctx, serde_json::to_value(&s)?, || {
        out!(
            "snapshot {}\ntree     {}\nbranch   {}\ncreated  {}",
            s.id,
            s.tree,
            s.branch,
            s.created_unix
        );
        if let Some(m) = &s.message {
            out!("message  {}", crate::fmt::shown(m.as_bytes()));
        }
    })
}

/// `velo snapshot delete ID`.
pub fn snapshot_delete(ctx: &Ctx, ws: &Workspace, id: &str) -> Result<ExitCode> {
    let store = store_of(ws)?;
    let _lock = store.lock_shared()?;
    ws.delete_snapshot(&store, id)?;
    print(ctx, json!({ "deleted": id }), || {
        note!("velo: snapshot {id} deleted")
    })
}

/// `velo branch create NAME [--from SNAPSHOT|BRANCH|TREE]`.
pub fn branch_create(
    ctx: &Ctx,
    ws: &Workspace,
    name: &str,
    from: Option<&str>,
) -> Result<ExitCode> {
    velo_workspace::validate_branch_name(name)?;
    if ws.branch(name).is_ok() {
        bail!("branch {name} exists (`velo branch delete {name}` first, or choose another name)");
    }
    let store = store_of(ws)?;
    let _lock = store.lock_shared()?;
    let from = from.unwrap_or(TOP_BRANCH);
    let base = tree_of(ws, &store, from)?;
    let record = ws.create_branch(&store, name, base, Some(from))?;
    let mut served = false;
    if let Some(mut client) = server(ws)? {
        let added = client.ask(&velo_control::Request::BranchAdd {
            branch: name.to_string(),
        });
        if let Err(e) = added {
            // Not made, rather than made and not served.
            let _ = ws.delete_branch(&store, name);
            return Err(e.context(format!("serving the new branch {name}")));
        }
        served = true;
    }
    let path = ws
        .config()
        .mount
        .as_ref()
        .filter(|_| served)
        .map(|m| branch_path(m, name));
    print(
        ctx,
        json!({
            "branch": name, "base": record.base, "from": from,
            "path": path.as_ref().map(|p| p.to_string_lossy()),
        }),
        || match &path {
            Some(p) => note!("velo: branch {name} from {from} at {}", p.display()),
            None => note!("velo: branch {name} from {from}"),
        },
    )
}

/// Where branch `name` shows under the mount (the top branch: at the top itself).
fn branch_path(mount: &Path, name: &str) -> PathBuf {
    if name == TOP_BRANCH {
        return mount.to_path_buf();
    }
    mount
        .join(velo_fuse::CONTROL_DIR)
        .join("branches")
        .join(name)
}

/// `velo branch list`.
pub fn branch_list(ctx: &Ctx, ws: &Workspace) -> Result<ExitCode> {
    let (list, damaged) = ws.branches_and_damage()?;
    for name in &damaged {
        note!(
            "velo: branch {name}: its record branches/{name}/branch.json is damaged (not listed; `velo branch delete {name}` removes the branch)"
        );
    }
    let unfinished = ws.unfinished_branches(&store_of(ws)?)?;
    let rows: Vec<Value> = list
        .iter()
        .map(|b| {
            json!({
                "name": b.name, "base": b.base, "from": b.from,
                "changed": !is_empty_dir(&ws.upper_of(&b.name)),
            })
        })
        .collect();
    print(
        ctx,
        json!({ "branches": rows, "unfinished": unfinished, "damaged": damaged }),
        || {
            for name in &unfinished {
                note!(
                "velo: a create or delete of branch {name} was interrupted: `velo branch delete {name}` removes what it left, `velo branch create {name}` makes it"
            );
            }
            for b in &list {
                let changed = !is_empty_dir(&ws.upper_of(&b.name));
                out!(
                    "{}\t{}\t{}",
                    b.name,
                    b.base.get(..16).unwrap_or(&b.base),
                    if changed { "changed" } else { "clean" }
                );
            }
        },
    )
}

/// `velo branch delete NAME`.
pub fn branch_delete(ctx: &Ctx, ws: &Workspace, name: &str) -> Result<ExitCode> {
    if name == TOP_BRANCH {
        bail!("branch {TOP_BRANCH} is the workspace's own; it is not deleted");
    }
    let store = store_of(ws)?;
    let _lock = store.lock_shared()?;
    match ws.branch(name) {
        // A damaged record is deleted as a branch is (below).
        Ok(_) | Err(velo_workspace::WorkspaceError::BadRecord { .. }) => {}
        Err(e) => {
            // Not a branch, but maybe what a killed delete of one left.
            if ws.finish_delete(&store, name)? {
                return print(ctx, json!({ "deleted": name }), || {
                    note!(
                        "velo: removed what an interrupted create or delete of branch {name} left"
                    )
                });
            }
            return Err(e.into());
        }
    }
    match server(ws)? {
        Some(mut client) => {
            client.ask(&velo_control::Request::BranchDelete {
                branch: name.to_string(),
            })?;
        }
        None => {
            // No server: the upper's lock keeps one starting meanwhile off it.
            let (_, _upper) = lock_upper(&store, ws, name)?;
            ws.delete_branch(&store, name)?;
        }
    }
    print(ctx, json!({ "deleted": name }), || {
        note!("velo: branch {name} deleted")
    })
}

/// `velo branch reset NAME SNAPSHOT`: the branch shows that snapshot again, its changes
/// since are gone.
pub fn branch_reset(ctx: &Ctx, ws: &Workspace, name: &str, to: &str) -> Result<ExitCode> {
    ws.branch(name)?;
    let store = store_of(ws)?;
    let _lock = store.lock_shared()?;
    let tree = tree_of(ws, &store, to)?;
    let record = match server(ws)? {
        Some(mut client) => {
            client.ask(&velo_control::Request::BranchReset {
                branch: name.to_string(),
                base: tree.to_hex(),
                from: to.chars().take(200).collect(),
            })?;
            ws.branch(name)?
        }
        None => {
            let (_, _upper) = lock_upper(&store, ws, name)?;
            ws.reset_branch(&store, name, tree, to)?
        }
    };
    print(
        ctx,
        json!({ "branch": name, "base": record.base, "from": to }),
        || note!("velo: branch {name} reset to {to}"),
    )
}

/// `velo branch apply NAME DIR [--force]`: the branch's changes since its base, written
/// into DIR.
pub fn branch_apply(
    ctx: &Ctx,
    ws: &Workspace,
    name: &str,
    dir: &Path,
    force: bool,
) -> Result<ExitCode> {
    let record = ws.branch(name)?;
    // Never into velo's own files: with --force, a branch's `workspace.json` once
    // replaced the workspace's record, and every later command failed.
    let target = velo_store::resolve_existing(dir);
    for (what, own) in [
        ("the workspace's own directory", ws.dir()),
        ("the workspace's store", ws.config().store.as_path()),
    ] {
        if target.starts_with(velo_store::resolve_existing(own)) {
            bail!(
                "{}: inside {what} {}; an apply writes a branch's changes into a checkout. Choose another directory",
                dir.display(),
                own.display()
            );
        }
    }
    if let Some(lower) = &ws.config().lower {
        let (target, lower) = (
            velo_store::resolve_existing(dir),
            velo_store::resolve_existing(lower),
        );
        if target.starts_with(&lower) || lower.starts_with(&target) {
            bail!(
                "{}: this is the workspace's own --lower directory (or holds it); main shows it as it was when the workspace was made, and would see a changed host directory (EIO) afterwards. Apply to another checkout, or make a new workspace over it after applying",
                dir.display()
            );
        }
    }
    let store = store_of(ws)?;
    let _lock = store.lock_shared()?;
    let now = branch_tree(ws, &store, name)?;
    let report = velo_workspace::apply(&store, ws.base_tree(&store, &record)?, now, dir, force)?;
    let shown = |list: &[PathBuf]| {
        list.iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    print(
        ctx,
        json!({
            "branch": name, "dir": dir.to_string_lossy(), "tree": now.to_hex(),
            "written": shown(&report.written), "removed": shown(&report.removed),
        }),
        || {
            // Escaped as `velo diff` shows paths: a name holding a newline must not
            // forge a second line.
            use std::os::unix::ffi::OsStrExt;
            for p in &report.removed {
                out!("D {}", crate::fmt::shown(p.as_os_str().as_bytes()));
            }
            for p in &report.written {
                out!("W {}", crate::fmt::shown(p.as_os_str().as_bytes()));
            }
            note!(
                "velo: applied branch {name} to {}: {} written, {} removed",
                dir.display(),
                report.written.len(),
                report.removed.len()
            );
        },
    )
}

/// `velo branch bind NAME --pid PID` / `velo branch unbind --pid PID` (`name` None).
pub fn branch_bind(ctx: &Ctx, ws: &Workspace, name: Option<&str>, pid: u32) -> Result<ExitCode> {
    if let Some(name) = name {
        ws.branch(name)?;
    }
    let mut client = server(ws)?.with_context(|| {
        format!(
            "the workspace's server does not run: `velo workspace mount --bindable {} MOUNTPOINT` first",
            ws.dir().display()
        )
    })?;
    if let (Some(mount), Some(_)) = (&ws.config().mount, name) {
        if let Some(below) = mount_below(mount)? {
            bail!(
                "{} is mounted on below {}: a process bound to another branch would detach it (the kernel drops the entries of the mount's top such a process walks through). Unmount it, or run the command with `velo branch exec`",
                below.display(),
                mount.display()
            );
        }
    }
    let reply = match name {
        Some(name) => client.ask(&velo_control::Request::BranchBind {
            branch: name.to_string(),
            pid,
        })?,
        None => client.ask(&velo_control::Request::BranchUnbind { pid })?,
    };
    print(ctx, reply.clone(), || match name {
        Some(name) => note!("velo: process {pid} and its descendants see branch {name}"),
        None if reply.get("was_bound") == Some(&Value::Bool(true)) => {
            note!("velo: process {pid} sees the top branch again")
        }
        None => note!("velo: process {pid} was not bound"),
    })
}

/// A mount point below `mount` (not `mount` itself), as this process sees them.
fn mount_below(mount: &Path) -> Result<Option<PathBuf>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // Field 5 is the mount point, with spaces and the like as octal escapes.
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        let point = PathBuf::from(unescape_mountinfo(point));
        if point != mount && point.starts_with(mount) {
            return Ok(Some(point));
        }
    }
    Ok(None)
}

/// A mountinfo field with its `\NNN` octal escapes undone.
fn unescape_mountinfo(field: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// `velo branch exec NAME -- CMD...`: CMD runs in a mount namespace of its own where the
/// workspace's mount point shows branch NAME (and so do its children's).
/// `nofile`: the open-file limit velo started with (it raised its own), given back to
/// the command.
pub fn branch_exec(
    ws: &Workspace,
    name: &str,
    command: &[OsString],
    nofile: Option<u64>,
) -> Result<ExitCode> {
    ws.branch(name)?;
    let mount = ws
        .config()
        .mount
        .clone()
        .context("the workspace is not mounted: `velo workspace mount DIR MOUNTPOINT` first")?;
    // Asked of the mount itself (one lookup), not of its server: this runs before every
    // command an agent starts.
    let source = branch_path(&mount, name);
    let served = velo_fuse::is_fuse_mount(&mount) && std::fs::metadata(&source).is_ok();
    if !served {
        bail!(
            "branch {name} is not served at {} (is the workspace mounted? `velo workspace mount {} {}`)",
            source.display(),
            ws.dir().display(),
            mount.display()
        );
    }
    let (program, args) = command.split_first().context("no command given")?;
    // This process becomes the command (exec, no fork), so the view is entered here, with
    // each step's failure said as such.
    enter_view(&source, &mount).with_context(|| {
        format!(
            "entering branch {name}'s view (a private mount namespace where {} shows {})",
            mount.display(),
            source.display()
        )
    })?;
    if let Some(soft) = nofile {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(soft),
                maximum: limit.maximum,
            },
        )
        .context("giving the command back the open-file limit velo started with")?;
    }
    let e = std::process::Command::new(program)
        .args(args)
        .env(BRANCH_ENV, name)
        .env(WORKSPACE_ENV, ws.dir())
        .exec();
    // As a shell (and `velo run`) says it: 127 not found, 126 found but not runnable.
    use rustix::io::Errno;
    let code = match Errno::from_io_error(&e) {
        Some(Errno::NOENT | Errno::NOTDIR) => 127,
        Some(Errno::ACCESS | Errno::NOEXEC | Errno::ISDIR | Errno::PERM) => 126,
        _ => bail!(
            "running {} in branch {name}: {e}",
            Path::new(program).display()
        ),
    };
    note!(
        "velo: running {} in branch {name}: {e}",
        Path::new(program).display()
    );
    Ok(ExitCode::from(code))
}

/// Makes this process's mount namespace one of its own where `target` shows `source`.
/// Root gets only the mount namespace; anyone else (and root without CAP_SYS_ADMIN, as
/// in a container) also a user namespace that maps only their own ids.
fn enter_view(source: &Path, target: &Path) -> Result<()> {
    use rustix::thread::UnshareFlags;
    let cwd = std::env::current_dir().ok();
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    let with_user_namespace = || -> Result<()> {
        // SAFETY: this process is single-threaded here (branch exec starts no thread),
        // which unshare(CLONE_NEWUSER) requires; nothing caches the credentials it changes.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS | UnshareFlags::NEWUSER) }
            .context("unshare(CLONE_NEWNS | CLONE_NEWUSER): are user namespaces allowed here? (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces)")?;
        for (file, text) in [
            ("/proc/self/setgroups", "deny".to_string()),
            ("/proc/self/uid_map", format!("{0} {0} 1\n", uid.as_raw())),
            ("/proc/self/gid_map", format!("{0} {0} 1\n", gid.as_raw())),
        ] {
            std::fs::write(file, text).with_context(|| format!("writing {file}"))?;
        }
        Ok(())
    };
    if rustix::process::geteuid().is_root() {
        // SAFETY: as above; a mount namespace alone changes no credentials.
        match unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) } {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM) => with_user_namespace()?,
            Err(e) => return Err(e).context("unshare(CLONE_NEWNS)"),
        }
    } else {
        with_user_namespace()?;
    }
    // Mounts made outside still show here; this one stays here.
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::DOWNSTREAM
            | rustix::mount::MountPropagationFlags::REC,
    )
    .context("making / a downstream (slave) mount")?;
    rustix::mount::mount_bind(source, target)
        .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
    if let Some(cwd) = cwd {
        // The working directory was the top branch's (or, below `source`, this branch's),
        // if it was in the mount: it is entered again in this branch. One the view does
        // not have is refused: the command would run on in another branch's directory.
        let cwd = match cwd.strip_prefix(source) {
            Ok(rest) => target.join(rest),
            Err(_) => cwd,
        };
        if let Err(e) = std::env::set_current_dir(&cwd) {
            if cwd.starts_with(target) {
                bail!(
                    "the working directory {} is not in this branch's view ({e}): it is a directory only another branch has, or another branch's own. `cd` to the mount point, or outside it, first",
                    cwd.display()
                );
            }
        }
    }
    Ok(())
}

/// `velo diff A B`: in a workspace, A and B may also be snapshot ids or branch names.
pub fn diff(
    ctx: &Ctx,
    from: &str,
    to: &str,
    show: crate::read::DiffShow,
    explicit: Option<&Path>,
) -> Result<ExitCode> {
    let ws = match (explicit, find(None)) {
        (Some(dir), _) => Some(Workspace::open(dir)?),
        (None, found) => found.ok(),
    };
    // Held until the diff is made: a host lower's tree is made for it and kept by no root.
    let mut _lock = None;
    let (from, to) = match &ws {
        Some(ws) => {
            let store = store_of(ws)?;
            _lock = Some(store.lock_shared()?);
            let tree = |spec: &str| match ws.resolve(&store, spec) {
                // A tree of the store, or a .velo file: read as without a workspace.
                Ok(Named::Tree(_)) | Err(_) => Ok(spec.to_string()),
                Ok(_) => tree_of(ws, &store, spec).map(|h| h.to_hex()),
            };
            (tree(from)?, tree(to)?)
        }
        None => (from.to_string(), to.to_string()),
    };
    let store_ctx = match &ws {
        Some(ws) => Ctx {
            store_path: ws.config().store.clone(),
            json: ctx.json,
        },
        None => Ctx {
            store_path: ctx.store_path.clone(),
            json: ctx.json,
        },
    };
    crate::read::diff(&store_ctx, &from, &to, show)
}
