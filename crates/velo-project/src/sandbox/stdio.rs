//! The command's stdin, stdout and stderr: never an inode it could change on the host.
//!
//! uid 0 inside is the caller outside, so a file the caller owns and hands over as fd 0,
//! 1 or 2 (a log file, the caller's terminal, `/dev/null` when root runs velo) could be
//! `chmod`ed through it: `chmod 4755 /proc/self/fd/1` on a `> build.log` made a set-uid
//! file, a terminal made world-writable outlived the run. Such a descriptor is relayed
//! through a pipe instead (velo copies in a thread); anonymous pipes, sockets and files of
//! other owners (which the sandbox cannot chmod) are handed over as they are, at no cost.
//!
//! Input is relayed only from what can be read without taking anything from someone else:
//! a file (whatever the command did not consume is given back: velo seeks the caller's
//! stdin back over it, so `while read l; do velo run …; done < list` sees every line), a
//! device or a named fifo. A terminal is never read unless the run is interactive (then
//! the command has a pty of its own): a non-interactive run with the caller's terminal as
//! stdin gets an empty stdin, as `docker run` without `-i` does, so keystrokes meant for
//! the shell, or for a pager reading `/dev/tty`, stay theirs.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags};

enum Pending {
    /// velo reads its own stdin and writes into the pipe the command reads (`reader` is a
    /// copy of the command's end, kept to count what it left unread).
    Input { pipe: OwnedFd, reader: OwnedFd },
    /// velo reads the pipe the command writes and copies to `to` (its own stdout/stderr).
    Output { pipe: OwnedFd, to: RawFd },
}

/// What the command gets as fds 0–2, decided before the sandbox starts.
pub struct Plan {
    /// The descriptor to put at 0, 1, 2 in the sandbox (`None`: inherit velo's).
    pub child: [Option<OwnedFd>; 3],
    /// Which of 0, 1, 2 are the caller's `/dev/null`: pid 1 gives the command the
    /// sandbox's own there (its `/dev` is read-only), with no relay.
    pub null: [bool; 3],
    pending: Vec<Pending>,
}

/// Relays running while the sandbox runs.
pub struct Running {
    wake: Option<OwnedFd>,
    outputs: Vec<JoinHandle<()>>,
    /// The input relay (it returns how many bytes it read but did not pass on) and a
    /// copy of the command's end of its pipe.
    input: Option<(JoinHandle<u64>, OwnedFd)>,
}

/// Whether the sandbox could change `fd`'s inode on the host: the caller owns it and it
/// is a file, a device or a directory.
fn exposed(fd: BorrowedFd<'_>) -> bool {
    let Ok(stat) = rustix::fs::fstat(fd) else {
        return false;
    };
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    use rustix::fs::FileType as T;
    if stat.st_uid != rustix::process::geteuid().as_raw() {
        return false;
    }
    match kind {
        T::RegularFile | T::CharacterDevice | T::BlockDevice | T::Directory => true,
        // A named fifo lives on a real file system (its mode outlives the run); an
        // anonymous pipe lives on pipefs, gone with its last descriptor.
        T::Fifo => !matches!(rustix::fs::fstatfs(fd), Ok(fs) if fs.f_type == PIPEFS_MAGIC),
        _ => false,
    }
}

const PIPEFS_MAGIC: i64 = 0x5049_5045;

/// Whether `fd` is the null device (character device 1:3).
fn is_dev_null(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
            && rustix::fs::major(st.st_rdev) == 1
            && rustix::fs::minor(st.st_rdev) == 3
    })
}

/// Whether two of the standard descriptors name the same file.
fn same_file(a: RawFd, b: RawFd) -> bool {
    // SAFETY: 0, 1 and 2 are open for the life of the process.
    let (a, b) = unsafe { (BorrowedFd::borrow_raw(a), BorrowedFd::borrow_raw(b)) };
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Decides fds 0–2: `terminal` (a pty of the run's own) for those that are the caller's
/// terminal when there is one, a relay pipe for exposed ones, velo's own otherwise.
pub fn plan(terminal: Option<BorrowedFd<'_>>, terminal_fds: &[RawFd]) -> io::Result<Plan> {
    let mut child: [Option<OwnedFd>; 3] = [None, None, None];
    let mut null = [false; 3];
    let mut pending = Vec::new();
    for fd in 0..3 {
        // SAFETY: 0, 1 and 2 are open for the life of the process (Rust's runtime opens
        // /dev/null on any that were closed at start).
        let own = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Some(pty) = terminal.filter(|_| terminal_fds.contains(&fd)) {
            child[fd as usize] = Some(pty.try_clone_to_owned()?);
        } else if is_dev_null(own) {
            null[fd as usize] = true;
        } else if fd == 2 && child[1].is_some() && same_file(1, 2) {
            // `2>&1`: one pipe for both keeps their order, as one file would.
            child[2] = child[1].as_ref().map(|f| f.try_clone()).transpose()?;
        } else if fd == 0 && rustix::termios::isatty(own) {
            // The caller's terminal, and the run is not interactive: an empty stdin.
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            drop(write);
            child[0] = Some(read);
        } else if exposed(own) {
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            if fd == 0 {
                pending.push(Pending::Input {
                    pipe: write,
                    reader: read.try_clone()?,
                });
                child[0] = Some(read);
            } else {
                child[fd as usize] = Some(write);
                pending.push(Pending::Output { pipe: read, to: fd });
            }
        }
    }
    Ok(Plan {
        child,
        null,
        pending,
    })
}

impl Plan {
    /// Starts the relays once the sandbox holds its ends, and closes velo's copies of
    /// them (so an output relay ends when the last process inside has gone).
    pub fn start(self) -> io::Result<Running> {
        let Plan { child, pending, .. } = self;
        drop(child);
        let mut outputs = Vec::new();
        let mut wake = None;
        let mut input = None;
        for relay in pending {
            match relay {
                Pending::Output { pipe, to } => outputs.push(
                    std::thread::Builder::new()
                        .name("velo-output".into())
                        .spawn(move || copy_out(&pipe, to))?,
                ),
                Pending::Input { pipe, reader } => {
                    let (wake_read, wake_write) =
                        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
                    wake = Some(wake_write);
                    let thread = std::thread::Builder::new()
                        .name("velo-input".into())
                        .spawn(move || copy_in(pipe, &wake_read))?;
                    input = Some((thread, reader));
                }
            }
        }
        Ok(Running {
            wake,
            outputs,
            input,
        })
    }
}

impl Running {
    /// Waits for the outputs to be passed on in full, stops reading input, and gives back
    /// to a seekable stdin what the command did not read.
    pub fn finish(self) {
        if let Some(wake) = &self.wake {
            let _ = rustix::io::write(wake, b"x");
        }
        for thread in self.outputs {
            let _ = thread.join();
        }
        if let Some((thread, reader)) = self.input {
            let held_back = thread.join().unwrap_or(0);
            let mut in_pipe: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int, the number of bytes waiting in the pipe.
            unsafe { libc::ioctl(reader.as_raw_fd(), libc::FIONREAD, &mut in_pipe) };
            let unread = held_back + in_pipe.max(0) as u64;
            if unread > 0 {
                let stdin = io::stdin();
                let _ = rustix::fs::seek(&stdin, rustix::fs::SeekFrom::Current(-(unread as i64)));
            }
        }
    }
}

fn copy_out(pipe: &OwnedFd, to: RawFd) {
    // SAFETY: 1 and 2 stay open for the life of the process.
    let to = unsafe { BorrowedFd::borrow_raw(to) };
    let mut buf = vec![0u8; 64 * 1024];
    let mut passing = true;
    loop {
        match rustix::io::read(pipe, &mut buf) {
            Ok(0) => return,
            // Once the destination fails, keep draining so the command never blocks on a
            // full pipe; what it writes is lost, as it would be natively.
            Ok(n) if passing => passing = super::spawn::write_all(to, &buf[..n]),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
    }
}

/// Copies velo's stdin into the command's pipe until stdin ends, the command stops
/// reading, or velo says the run is over (then nothing more is read). Never blocks on
/// either side without also watching for the end of the run. Returns how many bytes it
/// read from stdin but did not pass on.
fn copy_in(pipe: OwnedFd, wake: &OwnedFd) -> u64 {
    let stdin = io::stdin();
    let _ = rustix::io::ioctl_fionbio(&pipe, true);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        let pending = end - start;
        let mut fds = [
            PollFd::new(wake, PollFlags::IN),
            if pending > 0 {
                PollFd::new(&pipe, PollFlags::OUT)
            } else {
                PollFd::new(&stdin, PollFlags::IN)
            },
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return pending as u64,
        }
        if !fds[0].revents().is_empty() {
            return pending as u64;
        }
        let ready = fds[1].revents();
        if ready.is_empty() {
            continue;
        }
        if pending > 0 {
            match rustix::io::write(&pipe, &buf[start..end]) {
                Ok(n) => start += n,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                // The command closed its stdin: what is left was not consumed.
                Err(_) => return pending as u64,
            }
        } else {
            match rustix::io::read(&stdin, &mut buf) {
                Ok(0) => return 0,
                Ok(n) => (start, end) = (0, n),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => return 0,
            }
        }
    }
}

/// The raw number of a planned descriptor, for `dup2` in a forked child.
pub fn raw(fd: &Option<OwnedFd>) -> Option<RawFd> {
    fd.as_ref().map(|fd| fd.as_raw_fd())
}
