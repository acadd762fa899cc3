//! `velo doctor`: what this machine supports, and what to do where it falls short.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use crate::{fmt, Ctx};

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    advice: &'static str,
}

/// Entry point of the hidden `__probe-userns` subcommand: can this process unshare a user
/// namespace? Run in a child so the probing process keeps its own namespaces.
pub fn probe_userns() -> Result<ExitCode> {
    // SAFETY: only NEWUSER is unshared (never FILES), in a single-threaded child process
    // that exits right after; no file descriptor table is split.
    let result = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER) };
    Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note!("{e}");
            ExitCode::FAILURE
        }
    })
}

/// Entry point of the hidden `__probe-overlay DIR` subcommand.
pub fn probe_overlay(dir: &Path) -> Result<ExitCode> {
    Ok(match velo_project::sandbox::probe_overlay(dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note!("{e}");
            ExitCode::FAILURE
        }
    })
}

fn check_userns() -> Check {
    let output = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("__probe-userns")
            .output()
    });
    let (ok, detail) = match output {
        Ok(o) if o.status.success() => (
            true,
            "unprivileged user namespaces can be created".to_string(),
        ),
        Ok(o) => (
            false,
            format!(
                "unshare(CLONE_NEWUSER) failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => (false, format!("could not run the probe: {e}")),
    };
    Check {
        name: "user namespaces",
        ok,
        detail,
        advice: "enable them: sysctl kernel.unprivileged_userns_clone=1 (Debian) or user.max_user_namespaces > 0; needed by velo run --isolate",
    }
}

fn check_overlay(store: &Path) -> Check {
    // Probe where sessions live: the store's file system (or the nearest existing parent).
    let dir = nearest_existing(store);
    let output = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("__probe-overlay")
            .arg(&dir)
            .output()
    });
    let (ok, detail) = match output {
        Ok(o) if o.status.success() => (
            true,
            format!(
                "an overlay mounts in a user namespace with its upper on {}",
                dir.display()
            ),
        ),
        Ok(o) => (false, String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => (false, format!("could not run the probe: {e}")),
    };
    Check {
        name: "overlayfs",
        ok,
        detail,
        advice: "velo run --isolate needs overlayfs in a user namespace (Linux 5.11+, user xattrs on the store's file system)",
    }
}

fn check_fuse() -> Check {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse");
    let helper = [
        "/bin/fusermount3",
        "/usr/bin/fusermount3",
        "/bin/fusermount",
        "/usr/bin/fusermount",
    ]
    .iter()
    .find(|p| Path::new(p).exists());
    let ok = device.is_ok();
    let mut detail = match (&device, helper) {
        (Ok(_), Some(h)) => format!("/dev/fuse opens; mount helper {h}"),
        (Ok(_), None) => "/dev/fuse opens; no fusermount3 helper (only root can mount)".to_string(),
        (Err(e), _) => format!("/dev/fuse: {e}"),
    };
    // FUSE passthrough (reads served by the kernel from the backing file) came in Linux
    // 6.9 and needs CAP_SYS_ADMIN.
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let passthrough = match (version >= (6, 9), rustix::process::geteuid().is_root()) {
        (true, true) => "passthrough available: `velo mount --passthrough` reads tree files straight from the store",
        (true, false) => "no passthrough for this user (it needs CAP_SYS_ADMIN: root)",
        (false, _) => "no passthrough (it came in Linux 6.9)",
    };
    detail.push_str(&format!("; Linux {release}: {passthrough}"));
    // FUSE over io_uring (Linux 6.14+) is a kernel module switch; velo's FUSE library
    // (fuser 0.17) reads requests from /dev/fuse and does not speak it yet.
    let uring = match std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring") {
        Ok(v) if v.trim() == "Y" => "the kernel offers FUSE over io_uring, which velo does not use yet (fuser 0.17 reads /dev/fuse)",
        Ok(_) => "FUSE over io_uring is off in this kernel (fuse.enable_uring=0); velo does not use it yet",
        Err(_) => "no FUSE over io_uring in this kernel (Linux 6.14+); velo does not use it yet",
    };
    detail.push_str(&format!("; {uring}"));
    Check { name: "FUSE", ok, detail, advice: "install fuse3 (apt-get install fuse3) and make /dev/fuse available; needed by velo mount" }
}

/// Where the LD_PRELOAD shim library is for `velo run` without `--isolate`.
fn check_shim() -> Check {
    let (ok, detail) = match crate::shim::library() {
        Ok(path) => (
            true,
            format!("{} (velo run without --isolate)", path.display()),
        ),
        Err(e) => (false, format!("{e:#}")),
    };
    Check {
        name: "LD_PRELOAD shim",
        ok,
        detail,
        advice: "cargo build --release -p velo-shim, and put target/release/libvelo_shim.so next to velo (or set VRIFT_SHIM_PATH)",
    }
}

/// The path itself, or its nearest ancestor that exists (a store not yet created).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut dir = path.to_path_buf();
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    dir
}

fn check_reflink(store: &Path) -> Check {
    let dir = nearest_existing(store);
    let probe = || -> std::io::Result<()> {
        let a = tempfile_in(&dir, "a")?;
        let b = tempfile_in(&dir, "b")?;
        std::fs::write(&a.0, b"velo reflink probe")?;
        let src = std::fs::File::open(&a.0)?;
        let dst = std::fs::OpenOptions::new().write(true).open(&b.0)?;
        rustix::fs::ioctl_ficlone(&dst, &src).map_err(std::io::Error::from)
    };
    let result = probe();
    Check {
        name: "reflink",
        ok: result.is_ok(),
        detail: match result {
            Ok(()) => format!("{} supports reflinks: ingest clones file extents instead of copying", dir.display()),
            Err(e) => format!("{} cannot reflink ({e}): ingest copies file contents", dir.display()),
        },
        advice: "optional: put the store on btrfs or xfs (reflink=1) to make ingest and writable checkouts nearly free",
    }
}

/// A temp file removed on drop.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tempfile_in(dir: &Path, tag: &str) -> std::io::Result<TempPath> {
    let path = dir.join(format!(".velo-doctor-{}-{tag}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok(TempPath(path))
}

/// Can other local users write into the store (or enter its farms and sessions)?
fn check_store_permissions(store: &velo_store::Store) -> Check {
    let problems = store.permission_problems();
    let detail = match problems.as_slice() {
        [] => "no other user can write into the store or enter its farms and sessions".to_string(),
        [one] => format!("{} {}", one.object, one.detail),
        [first, rest @ ..] => format!(
            "{} {} (and {} more: velo fsck lists them)",
            first.object,
            first.detail,
            rest.len()
        ),
    };
    Check {
        name: "store permissions",
        ok: problems.is_empty(),
        detail,
        advice:
            "run the fix above: a directory others can write lets them plant files that runs read",
    }
}

pub fn doctor(ctx: &Ctx) -> Result<ExitCode> {
    let store = velo_store::Store::open(&ctx.store_path);
    let store_state = match &store {
        Ok(s) => format!(
            "store at {} (format {})",
            s.root().display(),
            velo_store::STORE_FORMAT_VERSION
        ),
        Err(e) => format!("{e}"),
    };
    let mut checks = vec![
        check_reflink(&ctx.store_path),
        check_fuse(),
        check_userns(),
        check_overlay(&ctx.store_path),
        check_shim(),
    ];
    if let Ok(store) = &store {
        checks.push(check_store_permissions(store));
    }
    if ctx.json {
        let list: Vec<_> = checks.iter().map(|c| json!({"check": c.name, "ok": c.ok, "detail": c.detail, "advice": if c.ok { None } else { Some(c.advice) }})).collect();
        fmt::print_json(&json!({ "store": store_state, "checks": list }));
    } else {
        out!("{store_state}");
        for c in &checks {
            out!(
                "{:<4} {:<16} {}",
                if c.ok { "ok" } else { "no" },
                c.name,
                c.detail
            );
            if !c.ok {
                out!("     {:<16} -> {}", "", c.advice);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
