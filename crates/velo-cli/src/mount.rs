//! `velo mount TREE MOUNTPOINT` and `velo umount MOUNTPOINT`: the FUSE server of crate
//! velo-fuse, started in the background (or in the foreground with `--foreground`).
//! The server holds the store's shared lock for as long as it serves, so gc never takes
//! what it reads.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::Ctx;

pub struct MountArgs {
    pub tree: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
}

/// A mount point whose server is gone answers every request with `ENOTCONN` (a `stat`
/// may still be answered from the kernel's cache: listing it asks the server).
fn is_dead_mount(path: &Path) -> bool {
    let dead =
        |e: std::io::Error| e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error());
    match std::fs::read_dir(path) {
        Err(e) => dead(e),
        Ok(mut entries) => entries.next().is_some_and(|e| e.is_err_and(dead)),
    }
}

/// Unmounts `path`: `fusermount3 -u` (works for the user who mounted), else umount(2).
/// `lazy`: detach it now even if it is busy (the server's own stop on a signal).
fn unmount(path: &Path, lazy: bool) -> Result<()> {
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
    if std::fs::read_dir(&mountpoint).is_ok_and(|mut d| d.next().is_some()) {
        note!(
            "velo: {} is not empty: the mount hides what is there until `velo umount`",
            mountpoint.display()
        );
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
    let root = crate::run::layer(&store, &args.tree)?;
    let view = velo_project::view::ensure_view(&store, root)?;
    if !args.foreground {
        drop(lock);
        return start_in_background(ctx, args, &root.to_hex(), &mountpoint);
    }
    let bytes = crate::shim::map(&view.index)?;
    let index = velo_view::View::new(bytes)
        .with_context(|| format!("{}: not a view index", view.index.display()))?;
    // A signal (Ctrl-C, `kill`) unmounts before the server goes, so no dead mount is
    // left behind.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("catching signals")?;
    let watched = mountpoint.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            if let Err(e) = unmount(&watched, true) {
                note!("velo: {e:#}");
            }
        }
    });
    let fs = velo_fuse::TreeFs::new(
        index,
        store.root(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    velo_fuse::serve(
        fs,
        &mountpoint,
        &velo_fuse::MountOptions {
            allow_other: args.allow_other,
        },
    )?;
    drop(lock);
    Ok(ExitCode::SUCCESS)
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
        .arg("mount")
        .arg(root)
        .arg(mountpoint)
        .arg("--foreground")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    if args.allow_other {
        command.arg("--allow-other");
    }
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
            let _ = std::fs::remove_file(&log);
            if ctx.json {
                crate::fmt::try_print_json(&serde_json::json!({
                    "mounted": mountpoint,
                    "root": root,
                    "server_pid": child.id(),
                }))?;
                return Ok(ExitCode::SUCCESS);
            }
            note!(
                "velo: mounted {} at {} (server pid {}; `velo umount {}` to stop it)",
                &root[..16],
                mountpoint.display(),
                child.id(),
                mountpoint.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait()? {
            let message = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
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

pub fn umount(ctx: &Ctx, mountpoint: &Path) -> Result<ExitCode> {
    let path = std::path::absolute(mountpoint)?;
    if !velo_fuse::is_fuse_mount(&path) && !is_dead_mount(&path) {
        bail!("{}: not a velo mount", path.display());
    }
    unmount(&path, false)?;
    if ctx.json {
        crate::fmt::try_print_json(&serde_json::json!({ "unmounted": path }))?;
    }
    Ok(ExitCode::SUCCESS)
}
