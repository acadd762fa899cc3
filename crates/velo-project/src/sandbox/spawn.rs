//! Starting the stages and the command: what each child inherits, and how it dies.
//!
//! Every process of a run is tied to its parent: it gets SIGKILL when the parent dies
//! (`PR_SET_PDEATHSIG`), and a pipe closes the race of a parent that dies before that is
//! set. Descriptors are passed by number, never by accident: the caller's other open
//! files are marked close-on-exec before the stage's image starts, so an inherited
//! directory fd (`exec 9</home/u`) never reaches the command.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use rustix::process::{Pid, Signal, WaitOptions};

/// Where an exec'd stage 1 finds the sandbox configuration (a sealed memfd); the other
/// descriptors it needs follow at 4, 5, … (their numbers are in the configuration).
pub const CONFIG_FD: RawFd = 3;

/// How many descriptors [`spawn_tied`] can hand over (they are moved through a fixed
/// array: the child may not allocate between fork and exec).
const MAX_PASSED: usize = 64;

/// Spawns `command` tied to the calling thread: it is killed when this thread exits, and
/// it does not start at all if this thread is already gone. `pass` lists descriptors to
/// hand over, placed at 3, 4, … in order; every other descriptor above 2 is closed at exec.
/// With `new_session`, the child leads a new session with no controlling terminal (it can
/// neither push input into the caller's terminal with TIOCSTI nor receive the terminal's
/// signals directly: those reach `velo`, which forwards them once). With
/// `controlling_tty` as well, the child's stdin (a terminal) becomes its controlling
/// terminal, with its process group in the foreground.
pub fn spawn_tied(
    command: &mut Command,
    pass: &[RawFd],
    new_session: bool,
    controlling_tty: bool,
) -> io::Result<Child> {
    if pass.len() > MAX_PASSED {
        return Err(io::Error::other(format!(
            "at most {MAX_PASSED} descriptors can be passed to a stage (too many --bind?)"
        )));
    }
    let (alive_read, alive_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let alive_read_fd = alive_read.as_raw_fd();
    let alive_write_fd = alive_write.as_raw_fd();
    let pass: Vec<RawFd> = pass.to_vec();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes raw system calls only (prctl, close,
    // poll, setsid, fcntl, dup2, close_range) and allocates nothing (`pass` was built
    // before the fork and is only read).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent holds the write end; if it is gone, so is the parent.
            libc::close(alive_write_fd);
            let mut poll = libc::pollfd {
                fd: alive_read_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut poll, 1, 0) < 0 || poll.revents & libc::POLLHUP != 0 {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Move the passed descriptors out of the way first, so placing one at 3 cannot
            // clobber another that happens to be 3 already.
            let mut moved = [0 as RawFd; MAX_PASSED];
            for (slot, &fd) in moved.iter_mut().zip(&pass) {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
                if high < 0 {
                    return Err(io::Error::last_os_error());
                }
                *slot = high;
            }
            for (target, &high) in (3..).zip(moved.iter().take(pass.len())) {
                // dup2 leaves the new descriptor without close-on-exec: it is inherited.
                if libc::dup2(high, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let first_closed = 3 + pass.len() as libc::c_uint;
            if libc::close_range(
                first_closed,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as _,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(alive_read);
    // The write end must stay open while the child can still check it: until it has
    // exec'd, which `spawn` waits for.
    drop(alive_write);
    child
}

/// In a child between fork and exec (or a forked child that will not exec): arranges a
/// SIGKILL when the parent thread dies, then fails if the parent is already gone. The
/// parent holds `alive_write`; the child's copy is closed here, so the read end reports a
/// hang-up exactly when the parent has exited. Async-signal-safe.
pub(crate) fn die_with_parent(alive_read: RawFd, alive_write: RawFd) -> io::Result<()> {
    // SAFETY: raw system calls on descriptor numbers this child owns copies of.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        libc::close(alive_write);
        let mut poll = libc::pollfd {
            fd: alive_read,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut poll, 1, 0) < 0 || poll.revents & libc::POLLHUP != 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Blocks the signals a [`Supervisor`] handles, so none is lost (or handled by the wrong
/// process) between a fork and the moment each side has its own supervisor. Returns the
/// previous mask for [`restore_signals`].
pub(crate) fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the calls only
    // change this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// Restores a mask saved by [`block_signals`]; pending signals are delivered now.
pub(crate) fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: `old` came from pthread_sigmask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// Writes all of `bytes` to `fd`; false when the other end is gone (the relays of a run's
/// terminal and standard descriptors).
pub(crate) fn write_all(fd: impl std::os::fd::AsFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match rustix::io::write(&fd, bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Marks every descriptor above 2 close-on-exec, for a command started by code that did
/// not use [`spawn_tied`].
pub fn cloexec_above_stderr() -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on open descriptors.
    if unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads everything from a descriptor handed over by number (the configuration memfd),
/// from offset 0, and closes it unless `keep`.
pub fn read_passed(fd: RawFd, keep: bool) -> io::Result<Vec<u8>> {
    // SAFETY: by the stages' convention `fd` was placed by our parent; if it is not open
    // the reads below fail with EBADF, which is reported. It is borrowed, not owned,
    // unless we close it ourselves below.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rustix::io::pread(borrowed, &mut buf[..], out.len() as u64)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    if !keep {
        // SAFETY: nothing else in this process uses the descriptor.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    Ok(out)
}

/// Keeps a passed descriptor open here (a lock this process holds) but out of the
/// command's reach.
pub fn keep_private(fd: RawFd) {
    // SAFETY: setting FD_CLOEXEC on a descriptor number; harmless if it is not open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
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
    pub fn new() -> io::Result<Supervisor> {
        let mut wanted = FORWARDED.to_vec();
        wanted.push(signal_hook::consts::SIGCHLD);
        Ok(Supervisor {
            signals: signal_hook::iterator::Signals::new(wanted)?,
        })
    }

    /// Waits for `child` to exit, forwarding signals to it and, with `reap_all` (pid 1),
    /// reaping every other orphan. Single-threaded: after unshare(CLONE_NEWPID) a process
    /// cannot create threads. Returns the exit code (128 + signal when killed). Afterwards
    /// the forwarded signals have their default actions again: a Ctrl-C during what
    /// follows (a commit) stops this process instead of being swallowed.
    pub fn wait(mut self, child: u32, reap_all: bool) -> io::Result<i32> {
        let result = self.wait_inner(child, reap_all);
        drop(self);
        for sig in FORWARDED {
            // SAFETY: the Signals instance is dropped, so signal-hook no longer expects
            // its handler to run; restoring the default action is always valid.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        result
    }

    fn wait_inner(&mut self, child: u32, reap_all: bool) -> io::Result<i32> {
        let child_pid =
            Pid::from_raw(child as i32).ok_or_else(|| io::Error::other("invalid child pid"))?;
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

/// Capabilities a command keeps inside the sandbox: the default set of container
/// runtimes (podman, docker) less CAP_SETFCAP. Without CAP_SYS_ADMIN it cannot undo the
/// sandbox's mounts (remount `/proc/sys` or a read-only bind writable, unmount a mask);
/// without CAP_SYS_PTRACE it cannot reach pid 1; without CAP_SETFCAP it cannot give a
/// file capabilities (run by root, such a file in a kept upper or a writable bind would
/// carry them on the host).
const KEPT_CAPABILITIES: [u32; 11] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    29, // AUDIT_WRITE
];

/// Drops every other capability from the bounding set, so a command exec'd as uid 0 in
/// the sandbox gets only [`KEPT_CAPABILITIES`].
pub fn limit_capabilities() -> io::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        if KEPT_CAPABILITIES.contains(&cap) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP only changes this process's bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Whether this process has a single thread (then `fork` may be followed by any code).
pub fn single_threaded() -> bool {
    // Field 20 of /proc/self/stat, counted after the command name (which may hold spaces
    // but ends at the last ')').
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(17)?.parse::<u32>().ok()
        })
        == Some(1)
}

/// Overwrites this process's original command line and environment strings (what
/// /proc/<pid>/cmdline and /proc/<pid>/environ read) with zeros, leaving the name
/// `velo-sandbox` as the command line.
pub fn scrub_process_strings() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(close) = stat.rfind(')') else {
        return;
    };
    // After the name: fields 3.. ; arg_start..env_end are fields 48..51.
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.trim().parse::<usize>().ok())
    };
    let (Some(arg_start), Some(arg_end), Some(env_start), Some(env_end)) =
        (field(48), field(49), field(50), field(51))
    else {
        return;
    };
    for (start, end) in [(arg_start, arg_end), (env_start, env_end)] {
        if start == 0 || end <= start {
            continue;
        }
        // SAFETY: the kernel reports these ranges as this process's own argument and
        // environment strings, which live in writable memory of its initial stack; the
        // Rust runtime copied what it needed (std::env reads the live `environ` strings,
        // but nothing in this process reads the environment after this point).
        unsafe { std::ptr::write_bytes(start as *mut u8, 0, end - start) };
    }
    let name = b"velo-sandbox";
    if arg_end - arg_start > name.len() {
        // SAFETY: as above; the name and its NUL fit in the argument area.
        unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), arg_start as *mut u8, name.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process catches `signal` (from /proc/self/status, SigCgt).
    fn caught(signal: i32) -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .unwrap();
        mask & (1 << (signal - 1)) != 0
    }

    /// After the supervised child has exited, SIGINT and SIGTERM have their default
    /// actions again: a Ctrl-C during the commit that follows stops velo instead of being
    /// swallowed by a handler nobody reads (nextest runs each test in its own process).
    #[test]
    #[allow(clippy::zombie_processes, reason = "Supervisor::wait reaps the child")]
    fn signals_are_default_again_after_the_wait() {
        let supervisor = Supervisor::new().unwrap();
        assert!(caught(libc::SIGINT) && caught(libc::SIGTERM));
        let child = Command::new("true").spawn().unwrap();
        assert_eq!(supervisor.wait(child.id(), false).unwrap(), 0);
        assert!(!caught(libc::SIGINT), "SIGINT still caught");
        assert!(!caught(libc::SIGTERM), "SIGTERM still caught");
    }

    /// A child spawned tied to this thread sees only the descriptors passed to it.
    #[test]
    fn a_tied_child_gets_only_the_passed_descriptors() {
        let (keep, _keep_w) = rustix::pipe::pipe().unwrap();
        let (_leak, _leak_w) = rustix::pipe::pipe().unwrap();
        let out = {
            let mut command = Command::new("ls");
            command
                .arg("/proc/self/fd")
                .stdout(std::process::Stdio::piped());
            spawn_tied(&mut command, &[keep.as_raw_fd()], false, false)
                .unwrap()
                .wait_with_output()
                .unwrap()
        };
        let fds: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        // 0, 1, 2, the passed one at 3, and the one ls opens to list the directory.
        assert_eq!(fds, ["0", "1", "2", "3", "4"], "{fds:?}");
    }
}
