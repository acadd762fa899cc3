//! The rootless sandbox of `velo run --isolate`.
//!
//! Three processes, none of them needing privileges or a setuid helper:
//! 1. `velo` itself prepares farms and the session, spawns stage 1 and forwards signals;
//! 2. stage 1 (`velo __sandbox`, single-threaded, as unshare(2) requires) enters new user,
//!    mount, pid, ipc, uts (and net) namespaces, maps the caller's uid and gid to 0, and
//!    spawns stage 2;
//! 3. stage 2 (`velo __sandbox-init`) is pid 1 of the new pid namespace: it mounts the
//!    overlay (lowers = cached link farms, upper = the session's upper), /proc, a minimal
//!    /dev, a tmpfs /tmp and the binds, pivots into the overlay, detaches the old root,
//!    runs the command, reaps orphans, forwards signals and exits with the command's status.
//!
//! When pid 1 exits the kernel kills whatever is left in its pid namespace, and the mount
//! namespace (with every mount made in it) dies with its last process: nothing is left
//! mounted or running. The store is not reachable inside: only the merged view is, and a
//! write to a file from a farm copies it up into the upper.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode as FsMode, OFlags, ResolveFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Pid, Signal, WaitOptions};
use serde::{Deserialize, Serialize};

/// The environment variable carrying the sandbox description to the stages.
pub const CONFIG_VAR: &str = "VELO_SANDBOX_CONFIG";

/// A host path bound into the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bind {
    /// Host path (absolute).
    pub source: PathBuf,
    /// Path inside the sandbox (absolute, no `..`).
    pub dest: String,
    /// Read-only.
    pub read_only: bool,
}

/// Everything the stages need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// The overlay upper (copy-on-write layer).
    pub upper: PathBuf,
    /// The overlay work directory (same file system as the upper, empty).
    pub work: PathBuf,
    /// An empty directory to mount the overlay on.
    pub merged: PathBuf,
    /// The caller's uid and gid outside, mapped to 0 inside.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// A private network namespace (only loopback).
    pub isolate_net: bool,
    /// The run's changes are thrown away: upper, work and mount point live on a tmpfs in
    /// the sandbox's own mount namespace (`upper`, `work`, `merged` are then unused), so
    /// a run touches no disk and nothing is left to clean up.
    pub scratch_upper: Option<PathBuf>,
    /// Host paths bound in.
    pub binds: Vec<Bind>,
    /// Working directory inside.
    pub workdir: String,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    /// The command and its arguments (bytes: arguments need not be UTF-8).
    pub argv: Vec<Vec<u8>>,
}

/// Why the sandbox could not be set up (reported by the stage that failed, on stderr).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A setup step failed.
    #[error("{step}: {cause}{hint}")]
    Setup {
        /// What was being done.
        step: String,
        /// The OS error.
        cause: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
}

fn setup(
    step: impl Into<String>,
    hint: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    let step = step.into();
    move |e| SandboxError::Setup {
        step,
        cause: e.into(),
        hint,
    }
}

const USERNS_HINT: &str = " (user namespaces are disabled or exhausted here: sysctl user.max_user_namespaces must be above 0, and on Debian kernel.unprivileged_userns_clone=1; `velo doctor` checks)";
const OVERLAY_HINT: &str = " (overlayfs in a user namespace needs Linux 5.11 or newer and an upper on a file system with user xattrs; `velo doctor` checks)";

/// Checks a path inside the sandbox: absolute, no `.`/`..` components.
pub fn validate_inside_path(path: &str) -> Result<(), SandboxError> {
    if !path.starts_with('/') {
        return Err(SandboxError::Config(format!(
            "{path:?} must be an absolute path inside the sandbox"
        )));
    }
    if path.split('/').any(|c| c == ".." || c == ".") {
        return Err(SandboxError::Config(format!(
            "{path:?} must not contain '.' or '..' components"
        )));
    }
    Ok(())
}

fn config_from_env() -> Result<SandboxConfig, SandboxError> {
    let text = std::env::var(CONFIG_VAR).map_err(|_| {
        SandboxError::Config(format!(
            "{CONFIG_VAR} is not set: this command is internal to velo run --isolate"
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| SandboxError::Config(format!("bad sandbox configuration: {e}")))
}

const FORWARDED: [i32; 6] = [
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGQUIT,
    signal_hook::consts::SIGUSR1,
    signal_hook::consts::SIGUSR2,
];

/// Signal handling installed before a child is spawned, so none is missed.
pub struct Supervisor {
    signals: signal_hook::iterator::Signals,
}

impl Supervisor {
    /// Starts catching the forwarded signals and SIGCHLD.
    pub fn new() -> std::io::Result<Supervisor> {
        let mut wanted = FORWARDED.to_vec();
        wanted.push(signal_hook::consts::SIGCHLD);
        Ok(Supervisor {
            signals: signal_hook::iterator::Signals::new(wanted)?,
        })
    }

    /// Waits for `child` to exit, forwarding signals to it and, with `reap_all` (pid 1),
    /// reaping every other orphan. Single-threaded: after unshare(CLONE_NEWPID) a process
    /// cannot create threads. Returns the exit code (128 + signal when killed).
    pub fn wait(mut self, child: u32, reap_all: bool) -> std::io::Result<i32> {
        let child_pid = Pid::from_raw(child as i32)
            .ok_or_else(|| std::io::Error::other("invalid child pid"))?;
        loop {
            // Reap first: the child may have exited before the first SIGCHLD was caught.
            loop {
                let reaped = if reap_all {
                    rustix::process::wait(WaitOptions::NOHANG)
                } else {
                    rustix::process::waitpid(Some(child_pid), WaitOptions::NOHANG)
                        .map(|r| r.map(|(_, s)| (child_pid, s)))
                };
                match reaped {
                    Ok(Some((pid, status))) => {
                        if pid == child_pid {
                            let code = status
                                .exit_status()
                                .or_else(|| status.terminating_signal().map(|s| 128 + s))
                                .unwrap_or(1);
                            return Ok(code);
                        }
                    }
                    Ok(None) => break,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            for sig in self.signals.wait() {
                if sig == signal_hook::consts::SIGCHLD {
                    continue;
                }
                if let Some(signal) = Signal::from_named_raw(sig) {
                    let _ = rustix::process::kill_process(child_pid, signal);
                }
            }
        }
    }
}

/// Maps `uid`/`gid` outside to 0 inside the user namespace this process just entered
/// (the one mapping an unprivileged process may write for itself).
fn map_to_root(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|cause| SandboxError::Setup {
            step: format!("writing {file}"),
            cause,
            hint: USERNS_HINT,
        })
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

/// Stage 1: new namespaces, id maps, then stage 2 as pid 1. Returns the exit code.
pub fn stage1() -> Result<i32, SandboxError> {
    let config = config_from_env()?;
    use rustix::thread::UnshareFlags as U;
    let mut flags = U::NEWUSER | U::NEWNS | U::NEWPID | U::NEWIPC | U::NEWUTS;
    if config.isolate_net {
        flags |= U::NEWNET;
    }
    // SAFETY: this process is single-threaded (a fresh `velo __sandbox`) and FILES is not
    // among the flags, so no thread can observe a split file descriptor table.
    unsafe { rustix::thread::unshare_unsafe(flags) }
        .map_err(setup("creating namespaces", USERNS_HINT))?;
    map_to_root(config.uid, config.gid)?;
    let exe = std::env::current_exe().map_err(|source| SandboxError::Setup {
        step: "finding the velo executable".into(),
        cause: source,
        hint: "",
    })?;
    let supervisor = Supervisor::new().map_err(|source| SandboxError::Setup {
        step: "installing signal handlers".into(),
        cause: source,
        hint: "",
    })?;
    let child = Command::new(exe)
        .arg("__sandbox-init")
        .spawn()
        .map_err(|source| SandboxError::Setup {
            step: "starting the sandbox's init".into(),
            cause: source,
            hint: "",
        })?;
    supervisor
        .wait(child.id(), false)
        .map_err(|source| SandboxError::Setup {
            step: "waiting for the sandbox".into(),
            cause: source,
            hint: "",
        })
}

fn mkdir_all_inside(root: &Path, inside: &str) -> Result<std::os::fd::OwnedFd, SandboxError> {
    // Resolve every component beneath `root` (never following a symlink out of it), making
    // missing directories, so a hostile tree cannot redirect a mount point to the host.
    let mut fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(setup(format!("opening {}", root.display()), ""))?;
    for component in inside.split('/').filter(|c| !c.is_empty()) {
        let next = rustix::fs::openat2(
            &fd,
            component,
            OFlags::PATH | OFlags::CLOEXEC,
            FsMode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS,
        );
        fd = match next {
            Ok(next) => next,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&fd, component, FsMode::from_raw_mode(0o755))
                    .map_err(setup(format!("creating mount point {inside}"), ""))?;
                rustix::fs::openat2(
                    &fd,
                    component,
                    OFlags::PATH | OFlags::CLOEXEC,
                    FsMode::empty(),
                    ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
                )
                .map_err(setup(format!("opening mount point {inside}"), ""))?
            }
            Err(e) => {
                return Err(setup(
                    format!("mount point {inside} (a symlink is not allowed there)"),
                    "",
                )(e))
            }
        };
    }
    Ok(fd)
}

fn mount_tmpfs(
    target: &Path,
    flags: MountFlags,
    options: &std::ffi::CStr,
    what: &str,
) -> Result<(), SandboxError> {
    rustix::mount::mount("tmpfs", target, "tmpfs", flags, options)
        .map_err(setup(format!("mounting {what}"), ""))
}

fn fd_path(fd: &impl AsFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

fn make_file_inside(
    dir: &std::os::fd::OwnedFd,
    name: &str,
) -> Result<std::os::fd::OwnedFd, SandboxError> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        FsMode::from_raw_mode(0o644),
    )
    .map_err(setup(format!("creating /dev/{name}"), ""))
}

/// Stage 2: pid 1 inside. Mounts, pivots, runs the command. Returns its exit code.
pub fn stage2() -> Result<i32, SandboxError> {
    let config = config_from_env()?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(setup("making mounts private", USERNS_HINT))?;
    for path in config.lowers.iter().chain([&config.upper, &config.work]) {
        let text = path.to_string_lossy();
        if text.contains([':', ',', '\\']) {
            return Err(SandboxError::Config(format!(
                "{text}: overlay layer paths cannot contain ':' ',' or '\\'"
            )));
        }
    }
    let (upper, work, merged_dir) = match &config.scratch_upper {
        Some(mount_on) => {
            // Mounted over an existing directory of the store, visible only in this namespace.
            rustix::mount::mount(
                "tmpfs",
                mount_on,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                c"mode=700",
            )
            .map_err(setup("mounting the scratch upper", ""))?;
            for d in ["upper", "work", "merged"] {
                std::fs::create_dir(mount_on.join(d)).map_err(|source| SandboxError::Setup {
                    step: format!("creating scratch {d}"),
                    cause: source,
                    hint: "",
                })?;
            }
            (
                mount_on.join("upper"),
                mount_on.join("work"),
                mount_on.join("merged"),
            )
        }
        None => (
            config.upper.clone(),
            config.work.clone(),
            config.merged.clone(),
        ),
    };
    let lowers: Vec<String> = config
        .lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    let options = std::ffi::CString::new(options)
        .map_err(|_| SandboxError::Config("NUL in a layer path".into()))?;
    rustix::mount::mount(
        "overlay",
        &merged_dir,
        "overlay",
        MountFlags::empty(),
        options.as_c_str(),
    )
    .map_err(setup("mounting the overlay", OVERLAY_HINT))?;
    let merged = &merged_dir;

    let proc_dir = mkdir_all_inside(merged, "/proc")?;
    rustix::mount::mount(
        "proc",
        fd_path(&proc_dir),
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )
    .map_err(setup("mounting /proc", ""))?;
    let dev_dir = mkdir_all_inside(merged, "/dev")?;
    mount_tmpfs(
        &fd_path(&dev_dir),
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"mode=755",
        "/dev",
    )?;
    let dev = rustix::fs::open(
        merged.join("dev"),
        OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(setup("opening /dev", ""))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let node = make_file_inside(&dev, name)?;
        rustix::mount::mount_bind(format!("/dev/{name}"), fd_path(&node))
            .map_err(setup(format!("binding /dev/{name}"), ""))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        rustix::fs::symlinkat(target, &dev, link)
            .map_err(setup(format!("creating /dev/{link}"), ""))?;
    }
    rustix::fs::mkdirat(&dev, "shm", FsMode::from_raw_mode(0o1777))
        .map_err(setup("creating /dev/shm", ""))?;
    mount_tmpfs(
        &merged.join("dev/shm"),
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=1777",
        "/dev/shm",
    )?;
    let tmp_dir = mkdir_all_inside(merged, "/tmp")?;
    mount_tmpfs(
        &fd_path(&tmp_dir),
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=1777",
        "/tmp",
    )?;

    for bind in &config.binds {
        validate_inside_path(&bind.dest)?;
        let is_dir = bind.source.is_dir();
        let target = if is_dir {
            mkdir_all_inside(merged, &bind.dest)?
        } else {
            let (parent, name) = bind.dest.rsplit_once('/').unwrap_or(("", &bind.dest));
            let dir = mkdir_all_inside(merged, parent)?;
            let dir = rustix::fs::openat(
                &dir,
                ".",
                OFlags::DIRECTORY | OFlags::CLOEXEC,
                FsMode::empty(),
            )
            .map_err(setup(format!("opening {parent}"), ""))?;
            rustix::fs::openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                FsMode::from_raw_mode(0o644),
            )
            .map_err(setup(format!("creating bind target {}", bind.dest), ""))?
        };
        let target_path = fd_path(&target);
        rustix::mount::mount(
            &bind.source,
            &target_path,
            "",
            MountFlags::BIND | MountFlags::REC,
            None,
        )
        .map_err(setup(
            format!("binding {} to {}", bind.source.display(), bind.dest),
            "",
        ))?;
        if bind.read_only {
            // A remount in a user namespace must keep the flags the host locked on the source.
            let locked = rustix::fs::statvfs(&bind.source)
                .map(|s| s.f_flag)
                .map_err(setup(format!("inspecting {}", bind.source.display()), ""))?;
            let mut flags = MountFlags::BIND | MountFlags::RDONLY;
            for (st, ms) in [
                (rustix::fs::StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
                (rustix::fs::StatVfsMountFlags::NODEV, MountFlags::NODEV),
                (rustix::fs::StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
                (rustix::fs::StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
                (
                    rustix::fs::StatVfsMountFlags::NODIRATIME,
                    MountFlags::NODIRATIME,
                ),
                (
                    rustix::fs::StatVfsMountFlags::RELATIME,
                    MountFlags::RELATIME,
                ),
            ] {
                if locked.contains(st) {
                    flags |= ms;
                }
            }
            let inside = merged.join(bind.dest.trim_start_matches('/'));
            rustix::mount::mount_remount(&inside, flags, "")
                .map_err(setup(format!("making {} read-only", bind.dest), ""))?;
        }
    }
    let _ = rustix::system::sethostname(b"velo");

    // pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops it.
    rustix::process::chdir(merged).map_err(setup("entering the overlay", ""))?;
    rustix::process::pivot_root(".", ".").map_err(setup("pivot_root into the overlay", ""))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)
        .map_err(setup("detaching the host root", ""))?;
    rustix::process::chdir("/").map_err(setup("entering /", ""))?;
    let workdir = if config.workdir.is_empty() {
        "/"
    } else {
        &config.workdir
    };
    rustix::process::chdir(workdir).map_err(setup(
        format!("--workdir {workdir}"),
        " (it must exist in the tree)",
    ))?;

    let Some((program, args)) = config.argv.split_first() else {
        return Err(SandboxError::Config("no command given".into()));
    };
    let mut command = Command::new(OsString::from_vec(program.clone()));
    command
        .args(args.iter().map(|a| OsString::from_vec(a.clone())))
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    let supervisor = Supervisor::new().map_err(|source| SandboxError::Setup {
        step: "installing signal handlers".into(),
        cause: source,
        hint: "",
    })?;
    let child = command.spawn().map_err(|source| SandboxError::Setup {
        step: format!("running {}", String::from_utf8_lossy(program)),
        cause: source,
        hint: " (the path is looked up in the sandbox's PATH; does the tree contain it?)",
    })?;
    // As pid 1, reap every orphan until the command itself exits.
    supervisor
        .wait(child.id(), true)
        .map_err(|source| SandboxError::Setup {
            step: "waiting for the command".into(),
            cause: source,
            hint: "",
        })
}

/// Whether a path is a plain existing directory (not a symlink).
pub fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.is_dir())
        .unwrap_or(false)
}

/// Bytes of an argument, for the config.
pub fn arg_bytes(arg: &std::ffi::OsStr) -> Vec<u8> {
    arg.as_bytes().to_vec()
}

/// Checks that this process can create a user and mount namespace and mount an overlay
/// whose upper lives under `dir` (the store's file system, where sessions live). Run it in
/// a throwaway single-threaded process: it leaves that process in the new namespaces.
pub fn probe_overlay(dir: &Path) -> Result<(), SandboxError> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    use rustix::thread::UnshareFlags as U;
    // SAFETY: called only from the single-threaded `velo __probe-overlay`, without FILES.
    unsafe { rustix::thread::unshare_unsafe(U::NEWUSER | U::NEWNS) }
        .map_err(setup("creating namespaces", USERNS_HINT))?;
    map_to_root(uid, gid)?;
    let base = dir.join(format!(".velo-probe-{}", std::process::id()));
    let made = ["lower", "upper", "work", "merged"]
        .iter()
        .try_for_each(|d| std::fs::create_dir_all(base.join(d)));
    let result = made
        .map_err(|source| SandboxError::Setup {
            step: format!("creating {}", base.display()),
            cause: source,
            hint: "",
        })
        .and_then(|()| {
            let options = format!(
                "lowerdir={},upperdir={},workdir={},userxattr",
                base.join("lower").display(),
                base.join("upper").display(),
                base.join("work").display()
            );
            let options = std::ffi::CString::new(options)
                .map_err(|_| SandboxError::Config("NUL in a path".into()))?;
            rustix::mount::mount(
                "overlay",
                base.join("merged"),
                "overlay",
                MountFlags::empty(),
                options.as_c_str(),
            )
            .map_err(setup(
                "mounting an overlay in a user namespace",
                OVERLAY_HINT,
            ))?;
            std::fs::write(base.join("merged/probe"), b"x").map_err(|source| {
                SandboxError::Setup {
                    step: "writing through the overlay".into(),
                    cause: source,
                    hint: OVERLAY_HINT,
                }
            })?;
            let _ = rustix::mount::unmount(base.join("merged"), UnmountFlags::DETACH);
            Ok(())
        });
    velo_store::remove_tree(&base);
    result
}
