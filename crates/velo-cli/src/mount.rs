//! `velo mount TREE MOUNTPOINT` and `velo umount MOUNTPOINT`: the FUSE server of crate
//! velo-fuse, started in the background (or in the foreground with `--foreground`).
//! The server pins the tree it serves (velo-store's pins), so gc keeps what it reads
//! without waiting for it to unmount.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::Ctx;

pub struct MountArgs {
    pub tree: String,
    pub mountpoint: PathBuf,
    pub upper: Option<PathBuf>,
    pub name: Option<String>,
    pub read_only: bool,
    pub passthrough: bool,
    pub foreground: bool,
    pub allow_other: bool,
    pub remote: Option<String>,
}

/// The xattr on a kept upper's top naming the tree its changes apply to.
const BASE_XATTR: &str = "user.velo.base";

/// A mount point whose server is gone answers every request with `ENOTCONN` (a `stat`
/// may still be answered from the kernel's cache: listing it asks the server).
pub(crate) fn is_dead_mount(path: &Path) -> bool {
    let dead =
        |e: std::io::Error| e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error());
    match std::fs::read_dir(path) {
        Err(e) => dead(e),
        Ok(mut entries) => entries.next().is_some_and(|e| e.is_err_and(dead)),
    }
}

/// Unmounts `path`: `fusermount3 -u` (works for the user who mounted), else umount(2).
/// `lazy`: detach it now even if it is busy (the server's own stop on a signal).
pub(crate) fn unmount(path: &Path, lazy: bool) -> Result<()> {
    let fusermount = ["fusermount3", "fusermount"].into_iter().find(|tool| {
        std::process::Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let busy_hint = |detail: &str| {
        anyhow::anyhow!(
            "unmounting {}: {detail}. A process has a file open there or works in it (`fuser -vm {}` lists them): end it, or detach the mount now with `fusermount3 -uz {}`",
            path.display(),
            path.display(),
            path.display()
        )
    };
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    if let Some(tool) = fusermount {
        let out = std::process::Command::new(tool)
            .arg(if lazy { "-uz" } else { "-u" })
            .arg(path)
            .output()
            .with_context(|| format!("running {tool} -u {}", path.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if rustix::process::geteuid().is_root() {
            return match rustix::mount::unmount(path, flags) {
                Ok(()) => Ok(()),
                Err(rustix::io::Errno::BUSY) => Err(busy_hint("it is busy")),
                Err(e) => Err(e).with_context(|| format!("unmounting {}", path.display())),
            };
        }
        if stderr.contains("busy") {
            return Err(busy_hint(&stderr));
        }
        bail!("{tool} -u {}: {stderr}", path.display());
    }
    match rustix::mount::unmount(path, flags) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => Err(busy_hint("it is busy")),
        Err(e) => Err(e).with_context(|| {
            format!(
                "unmounting {} (fusermount3 is not installed: apt install fuse3)",
                path.display()
            )
        }),
    }
}

pub fn mount(ctx: &Ctx, args: &MountArgs) -> Result<ExitCode> {
    let mountpoint = std::path::absolute(&args.mountpoint)
        .with_context(|| format!("{}", args.mountpoint.display()))?;
    if is_dead_mount(&mountpoint) {
        note!(
            "velo: {} is a mount whose server died; unmounting it first",
            mountpoint.display()
        );
        unmount(&mountpoint, false)?;
    }
    if velo_fuse::is_fuse_mount(&mountpoint) {
        bail!(
            "{}: already a FUSE mount; `velo umount {}` first",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    let meta = std::fs::metadata(&mountpoint).with_context(|| {
        format!(
            "mount point {}: make the directory first",
            mountpoint.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("mount point {}: not a directory", mountpoint.display());
    }
    let mountpoint = std::fs::canonicalize(&mountpoint)?;
    if args.upper.is_some() && args.read_only {
        bail!("--upper and --read-only exclude each other");
    }
    if args.passthrough && !rustix::process::geteuid().is_root() {
        bail!("--passthrough needs root (the kernel gives FUSE passthrough only to CAP_SYS_ADMIN)");
    }
    if let Some(name) = &args.name {
        velo_store::validate_root_name(name).with_context(|| format!("--name {name}"))?;
    }
    let store = ctx.store_or_create()?;
    let store_root = std::fs::canonicalize(store.root())?;
    if mountpoint.starts_with(&store_root) || store_root.starts_with(&mountpoint) {
        bail!(
            "mount point {}: inside the store {} (or containing it); a server serving into its own store would deadlock. Choose another directory",
            mountpoint.display(),
            store_root.display()
        );
    }
    let lock = store.lock_shared()?;
    let remote = match &args.remote {
        Some(name) => Some(crate::remote::connect(&store, name)?),
        None => None,
    };
    let root = match &remote {
        // Trees (and executables, which a view links) now; other files on first read.
        Some(remote) => crate::remote::fetch_for_use(
            &store,
            remote,
            &args.tree,
            velo_remote::Blobs::Executables,
        )?,
        None => crate::run::layer(&store, &args.tree)?,
    };
    let view = velo_project::view::ensure_view(&store, root)?;
    let kept_upper = match &args.upper {
        Some(dir) => Some(prepare_kept_upper(&store_root, dir, &mountpoint, root)?),
        None => None,
    };
    if std::fs::read_dir(&mountpoint).is_ok_and(|mut d| d.next().is_some()) {
        note!(
            "velo: {} is not empty: the mount hides what is there until `velo umount`",
            mountpoint.display()
        );
    }
    if !args.foreground {
        drop(kept_upper);
        drop(lock);
        return start_in_background(ctx, args, &root.to_hex(), &mountpoint);
    }
    let bytes = crate::shim::map(&view.index)?;
    let index = velo_view::View::new(bytes)
        .with_context(|| format!("{}: not a view index", view.index.display()))?;
    // Without --upper the changes live in a session of the store for as long as the
    // mount does.
    let session = match (&kept_upper, args.read_only) {
        (None, false) => Some(store.new_session()?),
        _ => None,
    };
    let upper_path = match (&kept_upper, &session) {
        (Some((path, _)), _) => Some(path.clone()),
        (None, Some(session)) => {
            let path = session.dir().join("upper");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Some(path)
        }
        (None, None) => None,
    };
    let signalled = unmount_on_signal(&mountpoint)?;
    let fs = velo_fuse::TreeFs::new(
        index,
        store.root(),
        upper_path.as_deref(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )?
    .with_passthrough(args.passthrough)
    .with_max_depth(velo_core::MAX_DEPTH);
    let fs = match remote {
        Some(remote) => fs.with_fetcher(Arc::new(crate::remote::LazyBlobs::new(remote, &store)?)),
        None => fs,
    };
    let fs = fs.with_tree_xattrs(tree_xattrs(&store_root)?);
    let server = Arc::new(MountServer {
        mountpoint: mountpoint.clone(),
        serving: std::sync::atomic::AtomicBool::new(true),
        signalled: signalled.clone(),
        store_root: store_root.clone(),
        root,
        upper: upper_path.clone(),
        temporary: session.is_some(),
        name: args.name.clone(),
        control: fs.control(),
    });
    let at_exit = Arc::new(crate::control::AtExit::default());
    let control = crate::control::new_name();
    crate::control::listen(&control, server.clone(), at_exit.clone())?;
    let kept = keep_served(&store, &[root], lock);
    velo_fuse::serve(
        fs,
        &mountpoint,
        &velo_fuse::MountOptions {
            allow_other: args.allow_other,
            source: Some(format!("velo-{control}")),
        },
    )?;
    server
        .serving
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The server made files with the caller's modes; what it writes now is its own.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Unmounted: nothing changes the upper any more. A `velo umount --commit` asked for
    // a commit: made and registered here, so it is kept even if that client went away.
    let mut keep_session = false;
    let mut kept_note = String::new();
    if let Some(pending) = at_exit.take() {
        let result = commit_at_exit(&server, &store, &pending, &mountpoint);
        if let (Err(e), Some(session)) = (&result, &session) {
            keep_session = true;
            kept_note = format!(
                "; the changes are kept in {} (overlay format: mount that tree with --upper {} to go on)",
                session.dir().join("upper").display(),
                session.dir().join("upper").display()
            );
            note!("velo: committing at unmount failed: {e:#}{kept_note}");
        }
        crate::control::answer_at_exit(
            pending.stream,
            result.map_err(|e| anyhow::anyhow!("{e:#}{kept_note}")),
        );
    } else if server.signalled.load(std::sync::atomic::Ordering::SeqCst)
        && session.is_some()
        && crate::control::Server::changed(&*server)
    {
        // Stopped by a signal: never throw changes away silently.
        keep_session = true;
        if let Some(session) = &session {
            note!(
                "velo: stopped by a signal; the changes are kept in {} (overlay format)",
                session.dir().join("upper").display()
            );
        }
    }
    if let Some(session) = session {
        if keep_session {
            let _ = session.keep(
                "velo mount could not commit its changes at unmount; upper/ holds them in overlay format. Remove this directory when done.\n",
            );
        }
        session.remove();
    }
    drop(kept_upper);
    drop(kept);
    Ok(ExitCode::SUCCESS)
}

/// Unmounts `mountpoint` (lazily) when the process gets SIGINT, SIGTERM or SIGHUP, so
/// no dead mount is left behind; the flag says whether that happened.
pub(crate) fn unmount_on_signal(mountpoint: &Path) -> Result<Arc<std::sync::atomic::AtomicBool>> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("catching signals")?;
    let watched = mountpoint.to_path_buf();
    let signalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = signalled.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = unmount(&watched, true) {
                note!("velo: {e:#}");
            }
        }
    });
    Ok(signalled)
}

/// Where a server reads tree entries' extended attributes: from their directory's tree,
/// on demand (the view marks the few entries that have any).
pub(crate) fn tree_xattrs(store_root: &Path) -> Result<Box<velo_fuse::TreeXattrs>> {
    let xattr_store = velo_store::Store::open(store_root)?;
    Ok(Box::new(move |dir_tree, name| {
        xattr_store
            .get_tree(&velo_core::Hash(*dir_tree))
            .ok()
            .and_then(|tree| {
                tree.get(name).map(|e| {
                    e.xattrs
                        .iter()
                        .map(|(n, v)| (n.to_vec(), v.to_vec()))
                        .collect()
                })
            })
            .unwrap_or_default()
    }))
}

/// Checks, locks and claims a kept `--upper` for tree `root`: its top records the tree
/// its changes apply to, so it is never remounted over another tree.
fn prepare_kept_upper(
    store_root: &Path,
    dir: &Path,
    mountpoint: &Path,
    root: velo_core::Hash,
) -> Result<(PathBuf, std::os::fd::OwnedFd)> {
    // Checked before anything is made: a refused upper leaves no directory behind.
    {
        let resolved = velo_store::resolve_existing(dir);
        if resolved.starts_with(mountpoint) || mountpoint.starts_with(&resolved) {
            bail!(
                "--upper {}: inside the mount point {} (or containing it); the server would wait on itself. Choose another directory",
                dir.display(),
                mountpoint.display()
            );
        }
    }
    let (path, lock) = velo_project::session::prepare_upper(store_root, dir)?;
    probe_upper(&lock, dir)?;
    if path.starts_with(mountpoint) || mountpoint.starts_with(&path) {
        bail!(
            "--upper {}: inside the mount point {} (or containing it); the server would wait on itself. Choose another directory",
            dir.display(),
            mountpoint.display()
        );
    }
    let mut recorded = [0u8; 64];
    match rustix::fs::fgetxattr(&lock, BASE_XATTR, &mut recorded) {
        Ok(64) if recorded == *root.to_hex().as_bytes() => {}
        Ok(n) => bail!(
            "--upper {}: it holds changes to tree {}, not to {}; mount that tree, or use a new directory",
            dir.display(),
            String::from_utf8_lossy(&recorded[..n.min(64)]),
            root
        ),
        Err(_) => {
            if std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some()) {
                note!(
                    "velo: --upper {} already holds changes (not made by velo mount); they now apply to tree {}",
                    dir.display(),
                    &root.to_hex()[..16]
                );
            }
            rustix::fs::fsetxattr(
                &lock,
                BASE_XATTR,
                root.to_hex().as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )
            .with_context(|| {
                format!(
                    "--upper {}: recording its tree in a user xattr (the upper's file system must support user xattrs, as the overlay format needs)",
                    dir.display()
                )
            })?;
        }
    }
    Ok((path, lock))
}

/// What keeps a server's trees from gc while it serves: a pin (gc runs meanwhile and
/// keeps the trees), or where no pin can be made, the shared lock (gc waits).
pub(crate) struct Kept {
    _pin: Option<velo_store::Pin>,
    _lock: Option<velo_store::StoreLock>,
}

/// Pins `trees` and lets `lock` go; keeps the lock instead if no pin can be made (a
/// store this user may only read). Call it holding `lock`, with the trees checked.
pub(crate) fn keep_served(
    store: &velo_store::Store,
    trees: &[velo_core::Hash],
    lock: velo_store::StoreLock,
) -> Kept {
    match store.pin(trees) {
        Ok(pin) => Kept {
            _pin: Some(pin),
            _lock: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "no pin: holding the store lock while serving (gc waits)");
            Kept {
                _pin: None,
                _lock: Some(lock),
            }
        }
    }
}

/// Commits the upper of a server that was just unmounted, writes and registers it as the
/// `velo umount` that asked said; the reply it gets.
fn commit_at_exit(
    server: &MountServer,
    store: &velo_store::Store,
    pending: &crate::control::Pending,
    mountpoint: &Path,
) -> Result<serde_json::Value> {
    // From the commit's first object until its root is registered.
    let _lock = store.lock_shared()?;
    let report = crate::control::Server::commit(server)?;
    let c = crate::run::record_commit(
        store,
        &report,
        pending.out.as_deref(),
        pending.name.as_deref(),
        format!("velo umount {}", mountpoint.display()),
    )?;
    Ok(serde_json::json!({
        "root": c.root.to_hex(),
        "name_moved_from": c.moved_from,
        "setid_dropped": c.setid_dropped,
        "not_committed": c.not_committed,
    }))
}

/// Refuses an upper on a file system that cannot hold the upper format: unnamed files
/// for whole copy-ups (`O_TMPFILE`) and 0/0 character devices for deletions.
fn probe_upper(dir: &std::os::fd::OwnedFd, shown: &Path) -> Result<()> {
    let hint = "choose a directory on ext4, xfs, btrfs or tmpfs";
    rustix::fs::openat(
        dir,
        ".",
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .with_context(|| {
        format!(
            "--upper {}: its file system has no unnamed files (O_TMPFILE), which copy-ups need; {hint}",
            shown.display()
        )
    })?;
    let probe = format!(".velo-probe-{}", std::process::id());
    rustix::fs::mknodat(
        dir,
        probe.as_str(),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .with_context(|| {
        format!(
            "--upper {}: its file system refuses 0/0 character devices, the upper format's deletions; {hint}",
            shown.display()
        )
    })?;
    let _ = rustix::fs::unlinkat(dir, probe.as_str(), rustix::fs::AtFlags::empty());
    Ok(())
}

/// The mount's side of the control endpoint.
struct MountServer {
    mountpoint: PathBuf,
    /// Cleared once the session ends (the mount is gone).
    serving: std::sync::atomic::AtomicBool,
    /// A signal stopped the server.
    signalled: Arc<std::sync::atomic::AtomicBool>,
    store_root: PathBuf,
    root: velo_core::Hash,
    upper: Option<PathBuf>,
    temporary: bool,
    name: Option<String>,
    control: velo_fuse::Control,
}

impl crate::control::Server for MountServer {
    fn info(&self) -> crate::control::ServerInfo {
        crate::control::ServerInfo {
            store: self.store_root.clone(),
            root: self.root.to_hex(),
            upper: self.upper.clone(),
            temporary: self.temporary,
            name: self.name.clone(),
            passthrough: self.control.passthrough(),
            workspace: None,
        }
    }

    fn mounted(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::SeqCst)
            && velo_fuse::is_fuse_mount(&self.mountpoint)
    }

    fn changed(&self) -> bool {
        self.upper
            .as_ref()
            .is_some_and(|u| std::fs::read_dir(u).is_ok_and(|mut d| d.next().is_some()))
    }

    fn commit(&self) -> Result<velo_project::commit::CommitReport> {
        let Some(upper) = &self.upper else {
            bail!("the mount is read-only: nothing to commit");
        };
        let store = velo_store::Store::open(&self.store_root)?;
        let _lock = store.lock_shared()?;
        let _quiet = self.control.quiesce();
        let report = velo_project::commit::commit_upper(
            &store,
            self.root,
            upper,
            velo_project::commit::Shown {
                modes: None,
                xattrs: true,
            },
        )
        .context("committing the mount's changes")?;
        store.sync()?;
        Ok(report)
    }
}

/// Marks every descriptor above stderr close-on-exec (velo opens its own that way; these
/// came from whoever started velo).
fn close_inherited_on_exec() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: a descriptor number this process has open (listed just now; velo runs
        // no other thread that closes descriptors meanwhile), borrowed only for this call.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = rustix::io::fcntl_getfd(borrowed) {
            let _ = rustix::io::fcntl_setfd(borrowed, flags | rustix::io::FdFlags::CLOEXEC);
        }
    }
}

/// Starts `velo mount --foreground` detached, and returns once the mount is live (or
/// with the server's own error when it could not mount).
fn start_in_background(
    ctx: &Ctx,
    args: &MountArgs,
    root: &str,
    mountpoint: &Path,
) -> Result<ExitCode> {
    let store = ctx.store_or_create()?;
    let (mut command, log) = server_command(&store)?;
    command
        .arg("mount")
        .arg(root)
        .arg(mountpoint)
        .arg("--foreground");
    if args.allow_other {
        command.arg("--allow-other");
    }
    if let Some(upper) = &args.upper {
        command.arg("--upper").arg(upper);
    }
    if let Some(name) = &args.name {
        command.arg("--name").arg(name);
    }
    if args.read_only {
        command.arg("--read-only");
    }
    if args.passthrough {
        command.arg("--passthrough");
    }
    if let Some(remote) = &args.remote {
        command.arg("--remote").arg(remote);
    }
    start_server(ctx, command, &log, root, mountpoint, true)
}

/// A `velo --store STORE` command for a server started in the background: no input, no
/// output, its errors to a log in the store's tmp/ (the path returned) that
/// [`start_server`] shows if it fails to mount.
pub(crate) fn server_command(
    store: &velo_store::Store,
) -> Result<(std::process::Command, PathBuf)> {
    let log = store
        .root()
        .join("tmp")
        .join(format!("mount-{}.log", std::process::id()));
    std::fs::create_dir_all(store.root().join("tmp"))?;
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("--store")
        .arg(store.root())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    Ok((command, log))
}

/// Starts `command` (a server that mounts `mountpoint`, logging to `log`) detached, and
/// returns once the mount is live, or with the server's own error when it could not
/// mount. `what` names what it serves in the messages; `report`: say that it mounted.
pub(crate) fn start_server(
    ctx: &Ctx,
    mut command: std::process::Command,
    log: &Path,
    what: &str,
    mountpoint: &Path,
    report: bool,
) -> Result<ExitCode> {
    // The server outlives this process: it must not keep what the caller handed velo (a
    // pipe whose reader waits for its end would wait as long as the mount lives).
    close_inherited_on_exec();
    // SAFETY: setsid between fork and exec: an async-signal-safe system call; the server
    // leaves the caller's session, so a terminal's hangup does not stop it.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the mount's server")?;
    let started = Instant::now();
    loop {
        if velo_fuse::is_fuse_mount(mountpoint) {
            let _ = std::fs::remove_file(log);
            if !report {
                return Ok(ExitCode::SUCCESS);
            }
            if ctx.json {
                crate::fmt::try_print_json(&serde_json::json!({
                    "mounted": mountpoint.to_string_lossy(),
                    "root": what,
                    "server_pid": child.id(),
                }))?;
                return Ok(ExitCode::SUCCESS);
            }
            note!(
                "velo: mounted {} at {} (server pid {}; `velo umount {}` to stop it)",
                &what[..what.len().min(16)],
                mountpoint.display(),
                child.id(),
                mountpoint.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait()? {
            let message = std::fs::read_to_string(log).unwrap_or_default();
            let _ = std::fs::remove_file(log);
            bail!(
                "the mount's server exited ({status}) before mounting: {}",
                message.trim()
            );
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!(
                "the mount's server did not mount {} within 20 s",
                mountpoint.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn umount(
    ctx: &Ctx,
    mountpoint: &Path,
    commit_to: Option<&Path>,
    name: Option<&str>,
) -> Result<ExitCode> {
    let path = std::path::absolute(mountpoint)?;
    if is_dead_mount(&path) {
        unmount(&path, false)?;
        note!(
            "velo: {} was a mount whose server died; unmounted{}",
            path.display(),
            if commit_to.is_some() || name.is_some() {
                ". Nothing committed: mount its --upper again and `velo commit`"
            } else {
                ""
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !velo_fuse::is_fuse_mount(&path) {
        bail!("{}: not a velo mount", path.display());
    }
    let path = std::fs::canonicalize(&path)?;
    let mut client = match crate::control::Client::connect(&path) {
        Ok(client) => Some(client),
        Err(e) if commit_to.is_none() && name.is_none() => {
            tracing::debug!("{e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    let info = match &mut client {
        Some(client) => Some(client.ask(&velo_control::Request::Info)?),
        None => None,
    };
    let field = |key: &str| {
        info.as_ref()
            .and_then(|i| i.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let name = name.map(str::to_string).or_else(|| field("name"));
    let wants_commit = commit_to.is_some() || name.is_some();
    let commit_to = commit_to.map(std::path::absolute).transpose()?;
    // Everything that could fail the commit's registration is checked before the mount
    // goes: a bad name or output path must not cost the changes.
    if wants_commit {
        if info
            .as_ref()
            .is_some_and(|i| i.get("workspace").is_some_and(|w| !w.is_null()))
        {
            bail!(
                "{} is a workspace: each branch keeps its changes in its own upper; `velo snapshot create` seals one (velo umount without --commit/--name unmounts it)",
                path.display()
            );
        }
        check_commit_target(name.as_deref(), commit_to.as_deref())?;
        if info
            .as_ref()
            .is_some_and(|i| i.get("upper").is_none_or(|u| u.is_null()))
        {
            bail!(
                "{} is a --read-only mount: nothing to commit (velo umount without --commit/--name unmounts it)",
                path.display()
            );
        }
    }
    if let (true, Some(client)) = (wants_commit, &mut client) {
        let out = match &commit_to {
            Some(out) => Some(out.to_str().with_context(|| {
                format!("--commit {}: velo umount takes a UTF-8 path", out.display())
            })?),
            None => None,
        };
        client.ask(&velo_control::Request::CommitAtExit {
            name: name.clone(),
            out: out.map(PathBuf::from),
        })?;
    }
    unmount(&path, false)?;
    let mut committed = None;
    if let (true, Some(client)) = (wants_commit, &mut client) {
        // The server commits and registers once the mount is gone; stopping velo now
        // loses nothing.
        let reply = client
            .reply()
            .context("the mount was unmounted, but its server did not commit")?;
        committed = Some(crate::run::Committed {
            root: crate::control::report_of(&reply)?.root,
            moved_from: reply
                .get("name_moved_from")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            setid_dropped: crate::control::strings(&reply, "setid_dropped"),
            not_committed: crate::control::strings(&reply, "not_committed"),
        });
    } else if info
        .as_ref()
        .is_some_and(|i| i.get("temporary") == Some(&serde_json::Value::Bool(true)))
        && info
            .as_ref()
            .is_some_and(|i| i.get("changed") == Some(&serde_json::Value::Bool(true)))
    {
        note!(
            "velo: the mount's changes are discarded (it had no --upper; `velo umount --commit OUT.velo` or --name keeps them)"
        );
    }
    // The server lets go of its uppers as it exits: waited for (a while), so that the
    // next `velo mount` or `velo workspace mount` of them finds them free.
    if let Some(client) = &mut client {
        client.wait_closed(Duration::from_secs(10));
    }
    print_committed(ctx, &path, committed.as_ref(), name.as_deref(), "unmounted")?;
    Ok(ExitCode::SUCCESS)
}

fn print_committed(
    ctx: &Ctx,
    path: &Path,
    committed: Option<&crate::run::Committed>,
    name: Option<&str>,
    what: &str,
) -> Result<()> {
    if ctx.json {
        crate::fmt::try_print_json(&serde_json::json!({
            what: path.to_string_lossy(),
            "committed": committed.map(|c| c.root.to_hex()),
            "name": committed.and(name),
            "name_moved_from": committed.and_then(|c| c.moved_from.clone()),
            "setid_dropped": committed.map(|c| c.setid_dropped.clone()).unwrap_or_default(),
            "not_committed": committed.map(|c| c.not_committed.clone()).unwrap_or_default(),
        }))?;
        return Ok(());
    }
    if let Some(c) = committed {
        for p in &c.setid_dropped {
            note!("velo: {p}: setuid/setgid bits and file capabilities dropped (a file written on the mount cannot grant privileges)");
        }
        for p in &c.not_committed {
            note!("velo: {p}: not committed (a socket, fifo or device: a tree holds files, directories and symlinks)");
        }
        note!("velo: committed {} as {}", path.display(), c.root);
        if let (Some(name), Some(previous)) = (name, &c.moved_from) {
            note!("velo: {name} moved from {previous} to {}", c.root);
        }
    }
    Ok(())
}

/// Has the kernel write back what it holds of the mount (its writeback cache), so the
/// server's upper has every write made before the commit was asked for.
pub(crate) fn sync_mount(path: &Path) -> Result<()> {
    let dir = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::syncfs(&dir).with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Refuses a commit whose name or output could not be registered or written.
fn check_commit_target(name: Option<&str>, out: Option<&Path>) -> Result<()> {
    if let Some(name) = name {
        velo_store::validate_root_name(name).with_context(|| format!("--name {name:?}"))?;
    }
    if let Some(out) = out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            if !parent.is_dir() {
                bail!(
                    "--commit {}: {} is not a directory",
                    out.display(),
                    parent.display()
                );
            }
        }
        if out.is_dir() {
            bail!("--commit {}: a directory, not a file", out.display());
        }
    }
    Ok(())
}

/// `velo commit MOUNTPOINT`: seals the mount's current state as a tree; the mount goes
/// on serving.
pub fn commit(
    ctx: &Ctx,
    mountpoint: &Path,
    output: Option<&Path>,
    name: Option<&str>,
) -> Result<ExitCode> {
    let path =
        std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let mut client = crate::control::Client::connect(&path)?;
    let info = client.ask(&velo_control::Request::Info)?;
    let name = name.map(str::to_string).or_else(|| {
        info.get("name")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    let store_path = info
        .get("store")
        .and_then(|v| v.as_str())
        .context("the server named no store")?;
    let store = velo_store::Store::open(Path::new(store_path))?;
    let _lock = store.lock_shared()?;
    let output = output.map(std::path::absolute).transpose()?;
    check_commit_target(name.as_deref(), output.as_deref())?;
    sync_mount(&path)?;
    let report = crate::control::report_of(&client.ask(&velo_control::Request::Commit)?)?;
    let c = crate::run::record_commit(
        &store,
        &report,
        output.as_deref(),
        name.as_deref(),
        format!("velo commit {}", path.display()),
    )?;
    if ctx.json {
        print_committed(ctx, &path, Some(&c), name.as_deref(), "mount")?;
    } else {
        print_committed(ctx, &path, Some(&c), name.as_deref(), "mount")?;
        out!("{}", c.root);
    }
    Ok(ExitCode::SUCCESS)
}
