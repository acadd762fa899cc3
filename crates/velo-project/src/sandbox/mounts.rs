//! The sandbox's root, built by pid 1 in its own mount namespace.
//!
//! Layers, top to bottom: the upper (copy-on-write), the layers' cached link farms, and a
//! *skeleton*: a directory on a private tmpfs holding an empty directory (or file) for
//! every mount point the sandbox needs (`/proc`, `/dev`, `/tmp`, bind targets). Mount
//! points therefore exist without ever being created in the upper, so a commit holds what
//! the command changed and nothing the sandbox made for itself.
//!
//! On top of the overlay: `/proc` (with `/proc/sys` and the other host-wide knobs
//! read-only, and the kernel-memory files masked, as container runtimes do: when root runs
//! velo, uid 0 inside is uid 0 outside), a minimal `/dev`, a tmpfs `/tmp`, the binds
//! (read-only ones recursively so), then `pivot_root` and the host's root detached.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode as FsMode, OFlags, ResolveFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use super::{setup, setup_io, Bind, SandboxConfig, SandboxError, OVERLAY_HINT, USERNS_HINT};

/// Files under /proc that change the whole host: read-only inside.
const PROC_READ_ONLY: [&str; 6] = ["sys", "sysrq-trigger", "irq", "bus", "fs", "asound"];
/// Files under /proc that expose kernel memory or other users' secrets: masked.
const PROC_MASKED: [&str; 10] = [
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "slabinfo",
    "vmallocinfo",
];
/// Directories under /proc with host hardware knobs: hidden under an empty read-only tmpfs.
const PROC_MASKED_DIRS: [&str; 2] = ["acpi", "scsi"];

/// Builds the whole root and pivots into it. Called by stage 2 (pid 1).
pub fn build_root(config: &SandboxConfig) -> Result<(), SandboxError> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(setup("making mounts private", USERNS_HINT))?;
    rustix::mount::mount(
        "tmpfs",
        &config.scratch,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=700",
    )
    .map_err(setup("mounting the sandbox's scratch tmpfs", ""))?;
    let skeleton = config.scratch.join("skeleton");
    make_skeleton(&skeleton, config)?;
    let merged = config.scratch.join("merged");
    // Held until the overlay is mounted: its options name them through /proc/self/fd.
    let mut verified = Vec::new();
    let (upper, work) = match &config.upper {
        Some(kept) => {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY;
            verified.push(reopen_same(&kept.path, kept.upper_fd, flags)?);
            verified.push(reopen_same(&kept.work_path, kept.work_fd, flags)?);
            (fd_path(&verified[0]), fd_path(&verified[1]))
        }
        None => (config.scratch.join("upper"), config.scratch.join("work")),
    };
    for dir in [&merged, &upper, &work] {
        std::fs::create_dir_all(dir)
            .map_err(setup_io(format!("creating {}", dir.display()), ""))?;
    }
    let mut lowers = config.lowers.clone();
    lowers.push(skeleton);
    mount_overlay(&lowers, &upper, &work, &merged)?;
    drop(verified);

    // What masked /proc files show: an empty file of the sandbox's own, read-only (never
    // a host inode such as /dev/null, which uid 0 inside could chmod when root runs velo).
    let masked = config.scratch.join("masked");
    std::fs::File::create(&masked).map_err(setup_io("creating the mask file", ""))?;
    rustix::mount::mount_bind(&masked, &masked).map_err(setup("binding the mask file", ""))?;
    rustix::mount::mount_remount(
        &masked,
        MountFlags::BIND
            | MountFlags::RDONLY
            | MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC,
        "",
    )
    .map_err(setup("making the mask file read-only", ""))?;
    mount_proc(&merged, &masked)?;
    mount_dev(&merged, config.controlling_tty)?;
    mount_tmpfs_at(
        &merged,
        "/tmp",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=1777",
    )?;
    for (bind, &fd) in config.binds.iter().zip(&config.bind_fds) {
        mount_bind(&merged, bind, fd)?;
    }
    if config.isolate_net {
        loopback_up().map_err(setup_io("bringing up the loopback interface", ""))?;
    }
    let _ = rustix::system::sethostname(b"velo");

    // pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops it.
    rustix::process::chdir(&merged).map_err(setup("entering the overlay", ""))?;
    rustix::process::pivot_root(".", ".").map_err(setup("pivot_root into the overlay", ""))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)
        .map_err(setup("detaching the host root", ""))?;
    rustix::process::chdir("/").map_err(setup("entering /", ""))
}

/// The skeleton layer: every mount point, as an empty directory or file.
fn make_skeleton(skeleton: &Path, config: &SandboxConfig) -> Result<(), SandboxError> {
    let mkdir = |rel: &str| {
        let path = skeleton.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&path).map_err(setup_io(format!("creating {}", path.display()), ""))
    };
    for dir in ["proc", "dev", "tmp"] {
        mkdir(dir)?;
    }
    for (bind, &fd) in config.binds.iter().zip(&config.bind_fds) {
        super::validate_inside_path(&bind.dest)?;
        if fd_path(&fd_ref(fd)).is_dir() {
            mkdir(&bind.dest)?;
        } else {
            let (parent, _) = bind.dest.rsplit_once('/').unwrap_or(("", &bind.dest));
            mkdir(parent)?;
            let path = skeleton.join(bind.dest.trim_start_matches('/'));
            if !path.exists() {
                std::fs::File::create(&path)
                    .map_err(setup_io(format!("creating {}", path.display()), ""))?;
            }
        }
    }
    Ok(())
}

/// Mounts an overlay of `lowers` (topmost first) with `upper` at `merged`.
pub(crate) fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<(), SandboxError> {
    for path in lowers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let text = path.to_string_lossy();
        if text.contains([':', ',', '\\']) {
            return Err(SandboxError::Config(format!(
                "{text}: overlay layer paths cannot contain ':' ',' or '\\' (move the store)"
            )));
        }
    }
    let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
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
        merged,
        "overlay",
        MountFlags::empty(),
        options.as_c_str(),
    )
    .map_err(setup("mounting the overlay", OVERLAY_HINT))
}

fn mount_proc(merged: &Path, masked: &Path) -> Result<(), SandboxError> {
    let proc_dir = mount_point(merged, "/proc")?;
    let proc_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    rustix::mount::mount("proc", fd_path(&proc_dir), "proc", proc_flags, None)
        .map_err(setup("mounting /proc", ""))?;
    let proc = merged.join("proc");
    // No user namespaces below this one: a nested one would start with every capability
    // again (the bounding set is per namespace) and could mount cgroupfs and raise the
    // host's limits on the caller. The limit is per user namespace: the host's stays.
    std::fs::write(proc.join("sys/user/max_user_namespaces"), b"0")
        .map_err(setup_io("forbidding nested user namespaces", ""))?;
    for name in PROC_READ_ONLY {
        let path = proc.join(name);
        if !path.exists() {
            continue;
        }
        rustix::mount::mount_bind(&path, &path)
            .map_err(setup(format!("binding /proc/{name}"), ""))?;
        rustix::mount::mount_remount(
            &path,
            MountFlags::BIND | MountFlags::RDONLY | proc_flags,
            "",
        )
        .map_err(setup(format!("making /proc/{name} read-only"), ""))?;
    }
    for name in PROC_MASKED {
        let path = proc.join(name);
        if path.exists() {
            rustix::mount::mount_bind(masked, &path)
                .map_err(setup(format!("masking /proc/{name}"), ""))?;
        }
    }
    for name in PROC_MASKED_DIRS {
        let path = proc.join(name);
        if path.is_dir() {
            rustix::mount::mount(
                "tmpfs",
                &path,
                "tmpfs",
                MountFlags::RDONLY | proc_flags,
                c"size=0,mode=555",
            )
            .map_err(setup(format!("masking /proc/{name}"), ""))?;
        }
    }
    Ok(())
}

/// Mounts a tmpfs on the mount point `inside` (see [`mount_point`]).
fn mount_tmpfs_at(
    merged: &Path,
    inside: &str,
    flags: MountFlags,
    options: &std::ffi::CStr,
) -> Result<(), SandboxError> {
    let target = mount_point(merged, inside)?;
    rustix::mount::mount("tmpfs", fd_path(&target), "tmpfs", flags, options)
        .map_err(setup(format!("mounting {inside}"), ""))
}

fn mount_dev(merged: &Path, controlling_tty: bool) -> Result<(), SandboxError> {
    mount_tmpfs_at(
        merged,
        "/dev",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"mode=755,size=1m",
    )?;
    let dev = rustix::fs::open(
        merged.join("dev"),
        OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(setup("opening /dev", ""))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let node = rustix::fs::openat(
            &dev,
            name,
            OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            FsMode::from_raw_mode(0o644),
        )
        .map_err(setup(format!("creating /dev/{name}"), ""))?;
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
    if controlling_tty {
        // The run's own terminal (fd 0, a pty velo made) under the name it has on the
        // host, so ttyname() and `tty` work inside. Only that one node, read-write.
        let name = std::fs::read_link("/proc/self/fd/0")
            .map_err(setup_io("finding the run's terminal", ""))?;
        if let Some(number) = name
            .strip_prefix("/dev/pts")
            .ok()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            rustix::fs::mkdirat(&dev, "pts", FsMode::from_raw_mode(0o755))
                .map_err(setup("creating /dev/pts", ""))?;
            let node = rustix::fs::openat(
                &dev,
                format!("pts/{number}"),
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                FsMode::from_raw_mode(0o600),
            )
            .map_err(setup("creating the terminal's node", ""))?;
            rustix::mount::mount_bind(&name, fd_path(&node))
                .map_err(setup("binding the run's terminal", ""))?;
        }
    }
    rustix::fs::mkdirat(&dev, "shm", FsMode::from_raw_mode(0o1777))
        .map_err(setup("creating /dev/shm", ""))?;
    // All of /dev read-only in one call, the bound nodes with it: a device still reads
    // and writes, but its host inode cannot be chmod'ed or touched (as root, uid 0 inside
    // owns it). /dev/shm, mounted next, stays writable.
    set_attributes_recursively(
        &dev,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
    )
    .map_err(setup_io("making /dev read-only", ""))?;
    rustix::mount::mount(
        "tmpfs",
        merged.join("dev/shm"),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=1777",
    )
    .map_err(setup("mounting /dev/shm", ""))
}

fn mount_bind(merged: &Path, bind: &Bind, source_fd: i32) -> Result<(), SandboxError> {
    let target = mount_point(merged, &bind.dest)?;
    let what = format!("binding {} to {}", bind.source.display(), bind.dest);
    // The very directory (or file) velo opened and checked, not whatever the path names now.
    let source = reopen_same(&bind.source, source_fd, OFlags::PATH)?;
    rustix::mount::mount(
        fd_path(&source),
        fd_path(&target),
        "",
        MountFlags::BIND | MountFlags::REC,
        None,
    )
    .map_err(setup(what.clone(), ""))?;
    if bind.read_only {
        // The target now names the bind's root mount. Read-only applies to every mount
        // beneath it too (a tmpfs mounted under the source is not a way out); the flags
        // the host locked on each of them stay as they are.
        let mounted = rustix::fs::open(
            merged.join(bind.dest.trim_start_matches('/')),
            OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            FsMode::empty(),
        )
        .map_err(setup(what.clone(), ""))?;
        set_attributes_recursively(&mounted, MOUNT_ATTR_RDONLY)
            .map_err(setup_io(format!("making {} read-only", bind.dest), ""))?;
    }
    Ok(())
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, {attr_set: attributes})`: the
/// mount at `fd` and every mount beneath it.
fn set_attributes_recursively(fd: &OwnedFd, attributes: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let attr = MountAttr {
        attr_set: attributes,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the arguments follow mount_setattr(2): a valid descriptor, an empty
    // NUL-terminated path with AT_EMPTY_PATH, and a pointer to a live `mount_attr` of the
    // size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the mount point `inside` (absolute) in `root`, never following a symlink out of
/// it: a hostile tree cannot redirect a mount onto the host. The skeleton layer provides
/// every mount point; one is made here only if the upper deleted it (a kept `--upper`).
fn mount_point(root: &Path, inside: &str) -> Result<OwnedFd, SandboxError> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS;
    let mut fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(setup(format!("opening {}", root.display()), ""))?;
    for component in inside.split('/').filter(|c| !c.is_empty()) {
        let open = |dir: &OwnedFd| {
            rustix::fs::openat2(
                dir,
                component,
                OFlags::PATH | OFlags::CLOEXEC,
                FsMode::empty(),
                resolve,
            )
        };
        fd = match open(&fd) {
            Ok(next) => next,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&fd, component, FsMode::from_raw_mode(0o755))
                    .map_err(setup(format!("creating mount point {inside}"), ""))?;
                open(&fd).map_err(setup(format!("opening mount point {inside}"), ""))?
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

/// Opens `path` in this mount namespace with no symlink on the way and checks that it is
/// the same file as `checked` (a descriptor velo opened and checked in the host's).
fn reopen_same(path: &Path, checked: i32, flags: OFlags) -> Result<OwnedFd, SandboxError> {
    let fresh = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        flags | OFlags::CLOEXEC,
        FsMode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(setup(
        format!(
            "opening {} (no symlinks allowed on the way)",
            path.display()
        ),
        "",
    ))?;
    let same = match (
        rustix::fs::fstat(&fresh),
        rustix::fs::fstat(fd_ref(checked)),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    };
    if !same {
        return Err(SandboxError::Config(format!(
            "{} changed while the sandbox started (replaced or swapped for a link); nothing was mounted",
            path.display()
        )));
    }
    Ok(fresh)
}

/// A descriptor handed over by number (valid for the whole of stage 2).
fn fd_ref(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the number comes from the configuration velo wrote for this process, which
    // holds the descriptor open until it exits; nothing here closes it.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

fn fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Brings `lo` up in the sandbox's new network namespace, as bubblewrap does: a server
/// and a client on 127.0.0.1 inside one run then work.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a descriptor this function owns; `ifreq` is
    // zero-initialised (a valid value for this C struct) and its name is NUL-terminated.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}
