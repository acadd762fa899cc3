//! The rootless sandbox of `velo run --isolate`.
//!
//! Three processes, none of them needing privileges or a setuid helper:
//! 1. `velo` itself prepares farms and the session, spawns stage 1 and forwards signals;
//! 2. stage 1 (`velo __sandbox`, single-threaded, as unshare(2) requires) leads a new
//!    session (no controlling terminal), enters new user, mount, pid, ipc, uts (and net)
//!    namespaces, maps the caller's uid and gid to 0, and forks stage 2 (no second exec:
//!    each exec of velo costs about a millisecond of start-up);
//! 3. stage 2 is pid 1 of the new pid namespace: it builds the root (see [`mounts`]),
//!    pivots into it, limits the command's capabilities, runs the command, reaps orphans,
//!    forwards signals and exits with the command's status.
//!
//! The boundary, and what enforces each part:
//! - the configuration travels in a memfd at fd 3, never in the environment; every stage
//!   starts with an empty environment and the command gets only the one velo built;
//! - no descriptor of the caller reaches the command (only 0, 1, 2);
//! - each stage dies with its parent (parent-death signal), and the pid namespace dies
//!   with pid 1, so `kill -9` of `velo` leaves nothing running;
//! - the command keeps only the container runtimes' default capabilities: it cannot
//!   remount what the sandbox made read-only (`/proc/sys`, `--bind …:ro`, recursively);
//! - mount points the sandbox needs come from a skeleton layer on a tmpfs, so they never
//!   land in the upper or in a commit.

pub mod mounts;
pub mod pty;
pub mod spawn;
pub mod stdio;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

pub use spawn::Supervisor;
use spawn::CONFIG_FD;

/// Made in the session directory once the command has started: a run whose command never
/// ran (the sandbox failed, the command was not found) has nothing to commit.
pub const STARTED_MARKER: &str = "started";

/// A host path bound into the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bind {
    /// Host path (absolute).
    pub source: PathBuf,
    /// Path inside the sandbox (absolute, no `..`).
    pub dest: String,
    /// Read-only, recursively (submounts of the source too).
    pub read_only: bool,
}

/// Everything the stages need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// The upper and its work directory when the run's changes are kept. Without them
    /// the changes are thrown away: the upper lives on the scratch tmpfs.
    pub upper: Option<KeptUpper>,
    /// An empty private directory of the session: stage 2 mounts a tmpfs there (visible
    /// only in the sandbox's mount namespace) for the skeleton layer, the mount point of
    /// the overlay and, without a kept upper, the upper itself.
    pub scratch: PathBuf,
    /// The caller's uid and gid outside, mapped to 0 inside.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// A private network namespace (only loopback, brought up).
    pub isolate_net: bool,
    /// Host paths bound in.
    pub binds: Vec<Bind>,
    /// The descriptor of each bind's source in the stages (set by [`start`]).
    pub bind_fds: Vec<i32>,
    /// Descriptors the stages hold for the life of the run (locks), out of the
    /// command's reach (set by [`start`]).
    pub held_fds: Vec<i32>,
    /// Working directory inside.
    pub workdir: String,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    /// The command and its arguments (bytes: arguments need not be UTF-8).
    pub argv: Vec<Vec<u8>>,
    /// The command's stdin is a terminal of the sandbox's own (see [`pty`]), to become its
    /// controlling terminal.
    #[serde(default)]
    pub controlling_tty: bool,
    /// Which of fds 0–2 the caller gave as `/dev/null`: the command gets the sandbox's
    /// own `/dev/null` there (see [`stdio`]).
    #[serde(default)]
    pub null_stdio: [bool; 3],
    /// The caller's soft limit of open files, restored for the command (velo raises its
    /// own; a command that loops over every possible descriptor must not pay for that).
    pub nofile: Option<u64>,
}

/// A kept upper. velo opens it (and the work directory) without following symlinks and
/// checks what it opened; stage 2 opens the paths again in its own mount namespace (a
/// descriptor from the host's cannot be mounted there), again without symlinks, and
/// mounts them only if they are the very directories velo checked (same device and
/// inode): a path swapped meanwhile (a symlink into the store) cannot redirect them.
/// The descriptors are numbers valid in the stages, set by [`start`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptUpper {
    /// The upper's path (re-opened inside, and checked to be the same directory).
    pub path: PathBuf,
    /// The work directory's path (likewise).
    pub work_path: PathBuf,
    /// The upper directory.
    pub upper_fd: i32,
    /// The overlay work directory (same file system, empty).
    pub work_fd: i32,
}

/// Descriptors velo opened for a run, handed to the stages.
pub struct RunFds<'a> {
    /// The session's liveness lock.
    pub session_lock: std::os::fd::BorrowedFd<'a>,
    /// The upper and work directories of a kept upper, if any.
    pub upper: Option<(std::os::fd::BorrowedFd<'a>, std::os::fd::BorrowedFd<'a>)>,
    /// Each bind's source, in the order of `SandboxConfig::binds`.
    pub binds: Vec<std::os::fd::BorrowedFd<'a>>,
}

/// Why the sandbox could not be set up, or the command not started (reported by the
/// stage that failed, on stderr).
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
    /// The command could not be started (126) or was not found (127).
    #[error("{message}")]
    Command {
        /// 126 or 127, the shell's convention.
        code: u8,
        /// What failed.
        message: String,
    },
}

impl SandboxError {
    /// The exit status `velo run` reports for this failure: 126/127 for a command that
    /// cannot run, 125 for the sandbox itself.
    pub fn exit_code(&self) -> u8 {
        match self {
            SandboxError::Command { code, .. } => *code,
            _ => 125,
        }
    }
}

pub(crate) fn setup(
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

pub(crate) fn setup_io(
    step: impl Into<String>,
    hint: &'static str,
) -> impl FnOnce(std::io::Error) -> SandboxError {
    let step = step.into();
    move |cause| SandboxError::Setup { step, cause, hint }
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
    if path.contains('\0') {
        return Err(SandboxError::Config(format!(
            "{path:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Writes the configuration into a sealed memfd for [`spawn::CONFIG_FD`].
pub fn config_memfd(config: &SandboxConfig) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let json = serde_json::to_vec(config).map_err(std::io::Error::other)?;
    let fd = rustix::fs::memfd_create(
        "velo-sandbox-config",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut written = 0;
    while written < json.len() {
        written += rustix::io::write(&fd, &json[written..])?;
    }
    // Sealed: no stage can change what the next one reads.
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(fd)
}

fn read_config(keep: bool) -> Result<SandboxConfig, SandboxError> {
    let bytes = spawn::read_passed(CONFIG_FD, keep).map_err(|e| {
        SandboxError::Config(format!(
            "no sandbox configuration on fd {CONFIG_FD} ({e}): this command is internal to velo run --isolate"
        ))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| SandboxError::Config(format!("bad sandbox configuration: {e}")))
}

/// Maps `uid`/`gid` outside to 0 inside the user namespace this process just entered
/// (the one mapping an unprivileged process may write for itself).
fn map_to_root(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(setup_io(format!("writing {file}"), USERNS_HINT))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

/// Starts the sandbox for `config`, forwards signals to it and waits; returns the
/// command's exit code. The descriptors in `fds` reach the stages (the locks are held by
/// every process of the run). When this process is single-threaded (cached farms, the
/// common case), stage 1 is a fork of it, which saves an exec of velo (about a
/// millisecond); otherwise (rayon threads exist after a farm was built) stage 1 is
/// `velo __sandbox`, exec'd with the configuration in a sealed memfd.
pub fn start(config: &SandboxConfig, fds: &RunFds<'_>) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    // Every descriptor the stages need, in the order the exec path places them at 4, 5, …
    // (3 is the configuration).
    let mut handed = vec![fds.session_lock.as_raw_fd()];
    if let Some((upper, work)) = &fds.upper {
        handed.extend([upper.as_raw_fd(), work.as_raw_fd()]);
    }
    handed.extend(fds.binds.iter().map(|fd| fd.as_raw_fd()));
    let forked = spawn::single_threaded();
    let number = |i: usize| -> i32 {
        if forked {
            handed[i]
        } else {
            CONFIG_FD + 1 + i as i32
        }
    };
    let mut config = config.clone();
    config.held_fds = vec![number(0)];
    let mut next = 1;
    if let Some(kept) = &mut config.upper {
        kept.upper_fd = number(1);
        kept.work_fd = number(2);
        config.held_fds.push(number(1));
        next = 3;
    }
    config.bind_fds = (0..fds.binds.len()).map(|i| number(next + i)).collect();

    // Interactive runs get a terminal of their own; others may still share the caller's
    // (fd 0): whatever modes either leaves there (`stty -echo`, raw mode of a killed
    // editor, velo's own relay) are undone when the run is over.
    let pty = pty::Pty::open_if_interactive();
    config.controlling_tty = pty.is_some();
    let mut terminal_fds = vec![0, 1];
    if rustix::termios::isatty(std::io::stderr()) {
        terminal_fds.push(2);
    }
    let stdio = stdio::plan(
        pty.as_ref().map(|p| std::os::fd::AsFd::as_fd(p.slave())),
        &terminal_fds,
    )?;
    config.null_stdio = stdio.null;
    let stdin = std::io::stdin();
    let terminal = rustix::termios::tcgetattr(&stdin).ok();
    let window = rustix::termios::tcgetwinsize(&stdin).ok();
    let code = if forked {
        start_forked(&config, pty, stdio)
    } else {
        start_exec(&config, &handed, pty, stdio)
    };
    if let Some(modes) = terminal {
        // Modes, window size, output flow and exclusive mode: all the command could have
        // changed on a terminal it shared.
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &modes);
        if let Some(size) = window {
            let _ = rustix::termios::tcsetwinsize(&stdin, size);
        }
        let _ = rustix::termios::tcflow(&stdin, rustix::termios::Action::OOn);
        // SAFETY: TIOCNXCL takes no argument and only clears the terminal's exclusive mode.
        unsafe { libc::ioctl(0, libc::TIOCNXCL) };
    }
    code
}

fn start_exec(
    config: &SandboxConfig,
    handed: &[std::os::fd::RawFd],
    pty: Option<pty::Pty>,
    stdio: stdio::Plan,
) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    let config_fd = config_memfd(config)?;
    let mut pass = vec![config_fd.as_raw_fd()];
    pass.extend_from_slice(handed);
    let supervisor = Supervisor::new()?;
    let mut command = Command::new("/proc/self/exe");
    command.arg("__sandbox").env_clear();
    let [stdin, stdout, stderr] = &stdio.child;
    if let Some(fd) = stdin {
        command.stdin(fd.try_clone()?);
    }
    if let Some(fd) = stdout {
        command.stdout(fd.try_clone()?);
    }
    if let Some(fd) = stderr {
        command.stderr(fd.try_clone()?);
    }
    let child = spawn::spawn_tied(&mut command, &pass, true, false)?;
    drop(command);
    drop(config_fd);
    let relays = stdio.start();
    let relay = pty.map(pty::Pty::relay).transpose();
    let code = supervisor.wait(child.id(), false);
    if let Ok(Some(relay)) = relay {
        relay.finish();
    }
    if let Ok(relays) = relays {
        relays.finish();
    }
    code
}

fn start_forked(
    config: &SandboxConfig,
    pty: Option<pty::Pty>,
    stdio: stdio::Plan,
) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    let (alive_read, alive_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mask = spawn::block_signals();
    // SAFETY: the caller checked that this process is single-threaded, so the child is a
    // complete copy that may run any code; it never returns from this block.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let error = std::io::Error::last_os_error();
        spawn::restore_signals(&mask);
        return Err(error);
    }
    if pid == 0 {
        for (target, fd) in stdio.child.iter().enumerate() {
            if let Some(fd) = stdio::raw(fd) {
                // SAFETY: dup2 onto a standard descriptor of this (single-threaded) child.
                unsafe { libc::dup2(fd, target as i32) };
            }
        }
        drop(stdio);
        drop(pty);
        let started = spawn::die_with_parent(alive_read.as_raw_fd(), alive_write.as_raw_fd())
            .and_then(|()| rustix::process::setsid().map(drop).map_err(Into::into))
            .map_err(setup_io("starting the sandbox", ""));
        // This copy of velo carries the caller's command line and environment in its
        // memory: blank them so /proc/<pid>/{cmdline,environ} show nothing of them.
        spawn::scrub_process_strings();
        spawn::restore_signals(&mask);
        std::process::exit(exit_status(started.and_then(|()| enter(config))));
    }
    drop(alive_read);
    let supervisor = Supervisor::new();
    spawn::restore_signals(&mask);
    let relays = stdio.start();
    let relay = pty.map(pty::Pty::relay).transpose();
    let code = supervisor?.wait(pid as u32, false);
    drop(alive_write);
    if let Ok(Some(relay)) = relay {
        relay.finish();
    }
    if let Ok(relays) = relays {
        relays.finish();
    }
    code
}

/// The exit status of a stage's child: the command's, or the failure's (reported on
/// stderr, which may be closed: a failed report must not change the status).
fn exit_status(result: Result<i32, SandboxError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "velo: sandbox: {e}");
            i32::from(e.exit_code())
        }
    }
}

/// Stage 1 as its own process (`velo __sandbox`, exec'd by [`start`]): reads the
/// configuration from fd 3 and enters the sandbox. Returns the exit code.
pub fn stage1() -> Result<i32, SandboxError> {
    let config = read_config(false)?;
    enter(&config)
}

/// New namespaces, id maps, then stage 2 as pid 1. Returns the exit code.
fn enter(config: &SandboxConfig) -> Result<i32, SandboxError> {
    // A fresh anonymous session keyring: the caller's (Kerberos tickets, tokens) must be
    // neither readable nor writable inside. Kernels without keyrings answer ENOSYS.
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL) takes no memory from us.
    let joined = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if joined < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return Err(setup_io("leaving the caller's session keyring", "")(
            std::io::Error::last_os_error(),
        ));
    }
    use rustix::thread::UnshareFlags as U;
    let mut flags = U::NEWUSER | U::NEWNS | U::NEWPID | U::NEWIPC | U::NEWUTS | U::NEWCGROUP;
    if config.isolate_net {
        flags |= U::NEWNET;
    }
    // SAFETY: this process is single-threaded (a fresh `velo __sandbox`) and FILES is not
    // among the flags, so no thread can observe a split file descriptor table.
    unsafe { rustix::thread::unshare_unsafe(flags) }
        .map_err(setup("creating namespaces", USERNS_HINT))?;
    map_to_root(config.uid, config.gid)?;
    let (alive_read, alive_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(setup("creating a pipe", ""))?;
    let mask = spawn::block_signals();
    // SAFETY: this process is single-threaded, so the child is a complete copy that may
    // run any code; it never returns from this block.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let error = std::io::Error::last_os_error();
        spawn::restore_signals(&mask);
        return Err(setup_io("starting the sandbox's init", "")(error));
    }
    if pid == 0 {
        use std::os::fd::AsRawFd;
        std::process::exit(exit_status(
            spawn::die_with_parent(alive_read.as_raw_fd(), alive_write.as_raw_fd())
                .map_err(setup_io("tying the sandbox's init to its parent", ""))
                .and_then(|()| stage2(config, &mask)),
        ));
    }
    drop(alive_read);
    let supervisor = Supervisor::new().map_err(setup_io("installing signal handlers", ""));
    spawn::restore_signals(&mask);
    let code = supervisor?
        .wait(pid as u32, false)
        .map_err(setup_io("waiting for the sandbox", ""));
    drop(alive_write);
    code
}

/// Stage 2: pid 1 inside, forked by stage 1 with the forwarded signals blocked (`mask` is
/// the mask to restore). Mounts, pivots, runs the command. Returns its exit code.
fn stage2(config: &SandboxConfig, mask: &libc::sigset_t) -> Result<i32, SandboxError> {
    // The locks stay held by pid 1 for the life of the run, out of the command's reach.
    for &fd in &config.held_fds {
        spawn::keep_private(fd);
    }
    // Nothing inside may read this process's memory or /proc/1 files (ptrace access).
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    // The session directory, kept open across pivot_root to tell velo the command started.
    let session = config.scratch.parent().map(|dir| {
        rustix::fs::open(
            dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    });
    mounts::build_root(config)?;
    let workdir = if config.workdir.is_empty() {
        "/"
    } else {
        &config.workdir
    };
    rustix::process::chdir(workdir).map_err(setup(
        format!("--workdir {workdir}"),
        " (it must exist in the tree)",
    ))?;
    if let Some(soft) = config.nofile {
        let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        limit.current = Some(soft);
        let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    }
    spawn::limit_capabilities().map_err(setup_io("dropping capabilities", ""))?;

    let Some((program, args)) = config.argv.split_first() else {
        return Err(SandboxError::Config("no command given".into()));
    };
    let mut command = Command::new(OsString::from_vec(program.clone()));
    command
        .args(args.iter().map(|a| OsString::from_vec(a.clone())))
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    // The caller's /dev/null is the sandbox's own: opened through its read-only /dev, so
    // it cannot be chmod'ed, and no relay thread is needed.
    for (fd, &null) in config.null_stdio.iter().enumerate() {
        if !null {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(fd == 0)
            .write(fd != 0)
            .open("/dev/null")
            .map_err(setup_io("opening the sandbox's /dev/null", ""))?;
        match fd {
            0 => command.stdin(file),
            1 => command.stdout(file),
            _ => command.stderr(file),
        };
    }
    let supervisor = Supervisor::new().map_err(setup_io("installing signal handlers", ""))?;
    spawn::restore_signals(mask);
    let child = spawn::spawn_tied(
        &mut command,
        &[],
        config.controlling_tty,
        config.controlling_tty,
    )
    .map_err(|e| {
        let name = String::from_utf8_lossy(program);
        let not_found = e.kind() == std::io::ErrorKind::NotFound;
        let message = if !not_found {
            format!("{name}: cannot run it in the sandbox: {e}")
        } else if !program.contains(&b'/') {
            format!("{name}: command not found in the sandbox's PATH (does the tree contain it?)")
        } else if Path::new(&*name).exists() {
            format!("{name}: exists, but its interpreter (#!) or dynamic loader is missing from the tree")
        } else {
            format!("{name}: no such file in the sandbox")
        };
        SandboxError::Command {
            code: if not_found { 127 } else { 126 },
            message,
        }
    })?;
    if let Some(Ok(dir)) = &session {
        let _ = rustix::fs::openat(
            dir,
            STARTED_MARKER,
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        );
    }
    drop(session);
    // As pid 1, reap every orphan until the command itself exits.
    supervisor
        .wait(child.id(), true)
        .map_err(setup_io("waiting for the command", ""))
}

/// Whether a path is a plain existing directory (not a symlink).
pub fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.is_dir())
        .unwrap_or(false)
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
        .map_err(setup_io(format!("creating {}", base.display()), ""))
        .and_then(|()| {
            mounts::mount_overlay(
                &[base.join("lower")],
                &base.join("upper"),
                &base.join("work"),
                &base.join("merged"),
            )?;
            std::fs::write(base.join("merged/probe"), b"x")
                .map_err(setup_io("writing through the overlay", OVERLAY_HINT))?;
            let _ =
                rustix::mount::unmount(base.join("merged"), rustix::mount::UnmountFlags::DETACH);
            Ok(())
        });
    velo_store::remove_tree(&base);
    result
}
