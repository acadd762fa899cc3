//! A terminal of the sandbox's own, for interactive runs.
//!
//! When velo's stdin and stdout are the caller's terminal and velo is in its foreground,
//! the command gets a new pseudo-terminal as its controlling terminal: job control,
//! Ctrl-C and Ctrl-Z work inside as on any terminal, and nothing inside reaches the
//! caller's terminal (TIOCSTI pushes into the sandbox's own input; the modes it sets are
//! its own). velo relays bytes between the two with the caller's terminal in raw mode,
//! and passes window-size changes on. Otherwise (pipes, files, a background job) the
//! command runs in a new session with no controlling terminal at all.

use std::io;
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags};
use rustix::termios::{OptionalActions, Termios};

/// The pseudo-terminal of a run: velo keeps the master, the sandbox gets the slave.
pub struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

impl Pty {
    /// A new pseudo-terminal when the run is interactive (stdin and stdout are the
    /// caller's terminal and velo is its foreground job), with the caller's modes and
    /// window size; `None` otherwise, or when one cannot be had.
    pub fn open_if_interactive() -> Option<Pty> {
        let stdin = io::stdin();
        let stdout = io::stdout();
        if !rustix::termios::isatty(&stdin) || !rustix::termios::isatty(&stdout) {
            return None;
        }
        // A background job that touched the terminal's modes would be stopped (SIGTTOU).
        if rustix::termios::tcgetpgrp(&stdin).ok()? != rustix::process::getpgrp() {
            return None;
        }
        use rustix::pty::OpenptFlags as F;
        let master = rustix::pty::openpt(F::RDWR | F::NOCTTY | F::CLOEXEC).ok()?;
        rustix::pty::grantpt(&master).ok()?;
        rustix::pty::unlockpt(&master).ok()?;
        let slave =
            rustix::pty::ioctl_tiocgptpeer(&master, F::RDWR | F::NOCTTY | F::CLOEXEC).ok()?;
        if let Ok(modes) = rustix::termios::tcgetattr(&stdin) {
            let _ = rustix::termios::tcsetattr(&slave, OptionalActions::Now, &modes);
        }
        copy_window_size(&master);
        Some(Pty { master, slave })
    }

    /// The sandbox's end, to become the command's stdin, stdout (and stderr, when that is
    /// the terminal too) and controlling terminal.
    pub fn slave(&self) -> &OwnedFd {
        &self.slave
    }

    /// Puts the caller's terminal in raw mode and relays until [`Relay::finish`]. Call it
    /// once the sandbox holds the slave; velo's own copy is closed here, so the relay sees
    /// the end when the last process inside has gone.
    pub fn relay(self) -> io::Result<Relay> {
        let Pty { master, slave } = self;
        drop(slave);
        let stdin = io::stdin();
        let mut raw: Termios = rustix::termios::tcgetattr(&stdin)?;
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        let (wake_read, wake_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (winch_read, winch_write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        let winch =
            signal_hook::low_level::pipe::register(signal_hook::consts::SIGWINCH, winch_write)?;
        let thread = std::thread::Builder::new()
            .name("velo-pty".into())
            .spawn(move || relay_loop(&master, &wake_read, &winch_read))?;
        Ok(Relay {
            wake: wake_write,
            thread,
            winch,
        })
    }
}

/// A running relay.
pub struct Relay {
    wake: OwnedFd,
    thread: JoinHandle<()>,
    winch: signal_hook::SigId,
}

impl Relay {
    /// Stops relaying once what the sandbox wrote last has been passed on. The caller
    /// restores the terminal's modes.
    pub fn finish(self) {
        let _ = rustix::io::write(&self.wake, b"x");
        let _ = self.thread.join();
        signal_hook::low_level::unregister(self.winch);
    }
}

fn copy_window_size(master: &OwnedFd) {
    if let Ok(size) = rustix::termios::tcgetwinsize(io::stdout()) {
        let _ = rustix::termios::tcsetwinsize(master, size);
    }
}

fn relay_loop(master: &OwnedFd, wake: &OwnedFd, winch: &OwnedFd) {
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reading_stdin = true;
    let mut stopping = false;
    loop {
        let mut fds = vec![
            PollFd::new(master, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
            PollFd::new(winch, PollFlags::IN),
        ];
        if reading_stdin {
            fds.push(PollFd::new(&stdin, PollFlags::IN));
        }
        // Once asked to stop, only what the sandbox already wrote is left to pass on.
        let timeout = stopping.then_some(rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        });
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(0) if stopping => return,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
        let ready = |i: usize| {
            fds.get(i).is_some_and(|f| {
                f.revents()
                    .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
            })
        };
        let (from_master, woken, resized, from_stdin) = (ready(0), ready(1), ready(2), ready(3));
        drop(fds);
        if from_master {
            match rustix::io::read(master, &mut buf) {
                // EIO: every process inside has closed the terminal.
                Ok(0) | Err(rustix::io::Errno::IO) => return,
                Ok(n) => {
                    if !super::spawn::write_all(&stdout, &buf[..n]) {
                        return;
                    }
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => return,
            }
        }
        if woken {
            stopping = true;
            let _ = rustix::io::read(wake, &mut [0u8; 8]);
        }
        if resized {
            while matches!(rustix::io::read(winch, &mut [0u8; 64]), Ok(n) if n > 0) {}
            copy_window_size(master);
        }
        if from_stdin {
            match rustix::io::read(&stdin, &mut buf) {
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Ok(0) | Err(_) => reading_stdin = false,
                Ok(n) => {
                    if !super::spawn::write_all(master, &buf[..n]) {
                        reading_stdin = false;
                    }
                }
            }
        }
    }
}
