//! Helpers shared by the CLI integration tests: a private store per test and a way to
//! run the real `velo` binary against it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use velo_core::Hash;

pub fn velo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_velo"))
}

/// A temporary directory holding a store (`store/`) and whatever the test puts beside it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        Env { dir, store }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A `velo` command with `--store` set and a clean environment for the store.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(velo_bin());
        cmd.arg("--store").arg(&self.store);
        cmd.env_remove("VR_THE_SOURCE");
        cmd.env_remove("VRIFT_DEBUG");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("velo runs")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "velo {args:?} failed with {}:\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "velo {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).expect("valid JSON on stdout")
    }

    /// Ingests `dir` and returns the root hash.
    pub fn ingest(&self, dir: &Path, extra: &[&str]) -> String {
        let mut args = vec!["ingest", dir.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.ok(&args).trim().to_string()
    }

    pub fn fsck_ok(&self) {
        let out = self.run(&["fsck"]);
        assert!(
            out.status.success(),
            "fsck failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Whether the tests run as root (loop devices and mounts need it).
/// Writes `files` (relative path, bytes) under a fresh `src` directory of `env` and
/// ingests it as `name`; returns the directory.
pub fn ingest_files(env: &Env, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let src = env.path("src");
    for (path, bytes) in files {
        let path = src.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }
    env.ingest(&src, &["--name", name]);
    src
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A command that runs as uid/gid 65534 (nobody) with no supplementary groups (root
/// only): `setpriv ... --`, for the caller to add the program and its arguments.
pub fn as_nobody() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    cmd
}

/// Under CI a missing capability is a failure, elsewhere a skip with a message.
pub fn require(capability: bool, what: &str) -> bool {
    if capability {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {what}, which this CI machine lacks: install it or run as root");
    }
    eprintln!("skipping: this test needs {what}");
    // The test still shows as passed to the harness; scripts/test.sh lists these records
    // after the run as skipped, so a skip is never mistaken for a pass.
    if let Some(log) = std::env::var_os("VELO_SKIPPED_LOG") {
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        if let Ok(mut file) = fs::OpenOptions::new().append(true).create(true).open(log) {
            use std::io::Write as _;
            let _ = writeln!(file, "{test}: needs {what}");
        }
    }
    false
}

/// What the source says about one path: kind, mode, size, mtime, hash or target.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Meta {
    pub kind: String,
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub hash: Option<String>,
    pub target: Option<Vec<u8>>,
}

pub fn scan(root: &Path) -> BTreeMap<Vec<u8>, Meta> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel_child = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            let ft = meta.file_type();
            let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            let mode = meta.mode() & 0o7777;
            let m = if ft.is_file() {
                let bytes = fs::read(entry.path()).unwrap();
                Meta {
                    kind: "file".into(),
                    mode,
                    size: bytes.len() as u64,
                    mtime_ns,
                    hash: Some(Hash::of_blob(&bytes).to_hex()),
                    target: None,
                }
            } else if ft.is_dir() {
                stack.push(rel_child.clone());
                Meta {
                    kind: "dir".into(),
                    mode,
                    size: 0,
                    mtime_ns,
                    hash: None,
                    target: None,
                }
            } else if ft.is_symlink() {
                let t = fs::read_link(entry.path())
                    .unwrap()
                    .into_os_string()
                    .into_vec();
                Meta {
                    kind: "symlink".into(),
                    mode,
                    size: t.len() as u64,
                    mtime_ns,
                    hash: None,
                    target: Some(t),
                }
            } else {
                continue;
            };
            out.insert(rel_child.as_os_str().as_bytes().to_vec(), m);
        }
    }
    out
}

pub fn json_bytes(obj: &Value, key: &str) -> Option<Vec<u8>> {
    if let Some(raw) = obj.get(format!("{key}_bytes")) {
        return Some(
            raw.as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect(),
        );
    }
    obj.get(key)
        .and_then(|v| v.as_str())
        .map(|s| s.as_bytes().to_vec())
}

pub fn listed(env: &Env, tree: &str) -> BTreeMap<Vec<u8>, Meta> {
    let v = env.json(&["ls", tree, "-R"]);
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = e["kind"].as_str().unwrap().to_string();
            let m = Meta {
                hash: if kind == "file" {
                    e["hash"].as_str().map(String::from)
                } else {
                    None
                },
                target: if kind == "symlink" {
                    json_bytes(e, "target")
                } else {
                    None
                },
                kind,
                mode: e["mode"].as_u64().unwrap() as u32,
                size: e["size"].as_u64().unwrap(),
                mtime_ns: e["mtime_ns"].as_i64().unwrap(),
            };
            (json_bytes(e, "path").unwrap(), m)
        })
        .collect()
}

/// `[(obj[a], obj[b])]` of a JSON array of objects.
pub fn pairs(list: &Value, a: &str, b: &str) -> Vec<(String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o[a].as_str().unwrap().to_string(),
                o[b].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

pub fn touch_ns(path: &Path, secs: i64, nsec: u64) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nsec as _,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// A tree with every awkward thing a real one has.
pub fn awkward_tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub/deeper/deepest")).unwrap();
    fs::create_dir_all(dir.join("empty_dir")).unwrap();
    fs::write(dir.join("plain.txt"), b"plain\n").unwrap();
    fs::write(dir.join("empty_file"), b"").unwrap();
    fs::write(dir.join(".dotfile"), b"hidden but kept").unwrap();
    fs::write(dir.join("sub/exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("sub/exec.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("sub/private"), b"secret").unwrap();
    fs::set_permissions(dir.join("sub/private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join("sub/readonly"), b"ro").unwrap();
    fs::set_permissions(dir.join("sub/readonly"), fs::Permissions::from_mode(0o444)).unwrap();
    let big: Vec<u8> = (0..(9 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(dir.join("sub/deeper/big.bin"), &big).unwrap();
    fs::write(
        dir.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"not utf-8 name",
    )
    .unwrap();
    fs::write(dir.join("sub/deeper/deepest/same-as-plain"), b"plain\n").unwrap();
    std::os::unix::fs::symlink("../plain.txt", dir.join("sub/rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", dir.join("dangling")).unwrap();
    std::os::unix::fs::symlink(
        OsStr::from_bytes(b"\xff\xfe-target"),
        dir.join("bytes-link"),
    )
    .unwrap();
    fs::hard_link(dir.join("plain.txt"), dir.join("hardlink-to-plain")).unwrap();
    fs::create_dir(dir.join("setgid_dir")).unwrap();
    fs::set_permissions(dir.join("setgid_dir"), fs::Permissions::from_mode(0o2775)).unwrap();
    touch_ns(&dir.join("plain.txt"), 1_600_000_000, 123_456_789);
    touch_ns(&dir.join("sub/exec.sh"), -86_400 * 365 * 5, 5);
    touch_ns(&dir.join("sub/rel-link"), 1_500_000_000, 42);
}

/// A loop-mounted file system image, unmounted (and its loop device released) on drop,
/// also when the test fails.
pub struct LoopMount {
    pub point: PathBuf,
}

impl LoopMount {
    /// Makes a `fs_type` file system (`ext4`, `btrfs`, `xfs`) of `mib` MiB in `image` and
    /// mounts it at `point`; `None` (after `require`, which panics under CI) when this
    /// machine cannot.
    pub fn new(
        fs_type: &str,
        image: &Path,
        point: &Path,
        mib: u64,
        mkfs_args: &[&str],
    ) -> Option<LoopMount> {
        if !require(is_root(), "root (for loop mounts)") {
            return None;
        }
        let tool = format!("mkfs.{fs_type}");
        let Some(mkfs) = find_tool(&tool) else {
            require(false, &format!("{tool} (scripts/test.sh installs it)"));
            return None;
        };
        fs::File::create(image)
            .and_then(|f| f.set_len(mib << 20))
            .expect("create the image file");
        let quiet_force: &[&str] = match fs_type {
            "ext4" => &["-q", "-F", "-m", "0"],
            _ => &["-q", "-f"],
        };
        let made = Command::new(mkfs)
            .args(quiet_force)
            .args(mkfs_args)
            .arg(image)
            .output()
            .expect("run mkfs");
        assert!(
            made.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        fs::create_dir_all(point).expect("create the mount point");
        let mounted = Command::new(find_tool("mount").unwrap_or_else(|| "mount".into()))
            .args(["-o", "loop"])
            .arg(image)
            .arg(point)
            .output()
            .expect("run mount");
        if !mounted.status.success() {
            require(
                false,
                &format!(
                    "loop mounts (mount -o loop failed: {})",
                    String::from_utf8_lossy(&mounted.stderr).trim()
                ),
            );
            return None;
        }
        Some(LoopMount {
            point: point.to_path_buf(),
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let umount = find_tool("umount").unwrap_or_else(|| "umount".into());
        let done = Command::new(&umount)
            .arg(&self.point)
            .status()
            .is_ok_and(|s| s.success());
        if !done {
            // Something still uses it: detach lazily so the temp dir can go.
            let _ = Command::new(&umount).arg("-l").arg(&self.point).status();
        }
    }
}

/// A program from PATH or the sbin directories (which a non-login PATH may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `cp FLAG SRC DST` (e.g. `-a` to keep metadata, `-r` for fresh mtimes), asserting success.
pub fn cp(flag: &str, src: &Path, dst: &Path) {
    let status = Command::new("cp")
        .arg(flag)
        .arg(src)
        .arg(dst)
        .status()
        .expect("cp runs");
    assert!(status.success(), "cp {flag} {src:?} {dst:?} failed");
}

/// Runs `velo ARGS` on `env`'s store under `strace -f -y` and returns, in order, the
/// syscalls that flush (`syncfs`) or make a name visible (`link*`, `rename*`), one line
/// each, with the directories of their fds spelled out.
pub fn traced(env: &Env, args: &[&str]) -> Option<Vec<String>> {
    let Some(strace) = find_tool("strace") else {
        require(false, "strace (scripts/test.sh installs it)");
        return None;
    };
    let log = env.path(&format!("strace-{}.log", args[0]));
    let out = std::process::Command::new(strace)
        .args(["-f", "-y", "-qq", "-o"])
        .arg(&log)
        .args([
            "-e",
            "trace=syncfs,fdatasync,fsync,link,linkat,rename,renameat,renameat2",
        ])
        .arg(velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(args)
        .env_remove("VR_THE_SOURCE")
        .output()
        .expect("run strace");
    assert!(
        out.status.success(),
        "velo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        fs::read_to_string(&log)
            .expect("read the strace log")
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

/// Whether a traced call makes something visible under the store's `blobs/` or `trees/`:
/// a link or rename whose *destination* (directory fd and name) lies there.
fn publishes_object(line: &str, store: &Path) -> bool {
    let (blobs, trees) = (
        format!("{}/blobs", store.display()),
        format!("{}/trees", store.display()),
    );
    let Some(open) = line.find('(') else {
        return false;
    };
    let call = line[..open].rsplit(' ').next().unwrap_or("");
    let args: Vec<&str> = line[open + 1..].split(", ").collect();
    let destination = match call {
        "linkat" | "renameat" | "renameat2" => args.get(2..4).map(|a| a.join("/")),
        "link" | "rename" => args.get(1).map(|a| a.to_string()),
        _ => None,
    };
    destination.is_some_and(|d| d.contains(&blobs) || d.contains(&trees))
}

/// Whether the publishing call at `index` links an anonymous file (`/proc/self/fd/N`)
/// that the same process fdatasynced (or fsynced) before: a single object made on demand,
/// durable before it is named.
fn synced_single_object(trace: &[String], index: usize) -> bool {
    let line = &trace[index];
    let pid = line.split(' ').next().unwrap_or("");
    let Some(fd) = line
        .split("\"/proc/self/fd/")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
    else {
        return false;
    };
    trace[..index].iter().any(|earlier| {
        earlier.split(' ').next() == Some(pid)
            && (earlier.contains(&format!("fdatasync({fd}<"))
                || earlier.contains(&format!("fsync({fd}<")))
    })
}

/// In a `traced` run, no link or rename into `blobs/` or `trees/` comes before the first
/// `syncfs` (unless it names a single object synced on its own), and something was
/// published at all. Failed calls publish nothing.
pub fn assert_flushed_before_published(what: &str, trace: &[String], store: &Path) {
    let first_publish = (0..trace.len())
        .find(|&i| {
            let l = &trace[i];
            publishes_object(l, store) && !l.contains(" = -1 ") && !synced_single_object(trace, i)
        })
        .unwrap_or_else(|| panic!("{what}: nothing was published?\n{}", trace.join("\n")));
    let first_sync = trace
        .iter()
        .position(|l| l.contains("syncfs("))
        .unwrap_or_else(|| panic!("{what}: no syncfs at all\n{}", trace.join("\n")));
    assert!(
        first_sync < first_publish,
        "{what}: an object became visible before the flush:\n{}",
        trace[..=first_publish].join("\n")
    );
}

// The FUSE mount's tests (mount.rs, mount_writes.rs, mount_software.rs).

/// Whether `velo mount` can run here (after `require`, which fails under CI).
pub fn fuse_available() -> bool {
    let fusermount = ["fusermount3", "fusermount"]
        .iter()
        .any(|t| find_tool(t).is_some());
    require(
        Path::new("/dev/fuse").exists() && (is_root() || fusermount),
        "FUSE (/dev/fuse, and root or fusermount3: apt install fuse3)",
    )
}

/// A mount that is unmounted when the test ends, whatever happens (`velo umount` also
/// cleans up a mount whose server died).
pub struct Mounted<'a> {
    pub env: &'a Env,
    pub at: PathBuf,
}

impl Mounted<'_> {
    /// `velo umount MOUNTPOINT EXTRA`, asserting success (the guard is then spent).
    pub fn umount(self, extra: &[&str]) -> String {
        let mut args = vec!["umount", self.at.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.env.ok(&args);
        std::mem::forget(self);
        out
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["umount", self.at.to_str().unwrap()]);
    }
}

pub fn mount_with<'a>(env: &'a Env, tree: &str, at: &Path, extra: &[&str]) -> Mounted<'a> {
    fs::create_dir_all(at).unwrap();
    let mut args = vec!["mount", tree, at.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.ok(&args);
    Mounted {
        env,
        at: at.to_path_buf(),
    }
}

/// The pid of the server of the velo mount at `at`.
pub fn server_pid(at: &Path) -> Option<u32> {
    first_pid(&format!("mount [0-9a-f]+ {} --foreground", at.display()))
}

/// The pid of the first process whose command line matches `pattern` (`pgrep -f`).
pub fn first_pid(pattern: &str) -> Option<u32> {
    let out = Command::new("pgrep").args(["-f", pattern]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The C sources of the blake3 crate this workspace builds with (a real C project).
pub fn blake3_c_sources() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    let registry = home.join("registry/src");
    for index in fs::read_dir(registry).ok()?.flatten() {
        let mut found: Vec<PathBuf> = fs::read_dir(index.path())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().starts_with("blake3-1."))
                    .unwrap_or(false)
                    && p.join("c/blake3.c").is_file()
            })
            .collect();
        found.sort();
        if let Some(dir) = found.pop() {
            return Some(dir.join("c"));
        }
    }
    None
}

/// `/dev/fuse` at mode 0666 (what Debian's udev sets; an unprivileged mount cannot work
/// without it) while this lives, then its mode again. Tests that need it run one at a
/// time, across test binaries too (nextest runs those at once): each holds a lock.
pub struct DevFuseOpenToAll {
    mode: u32,
    _lock: fs::File,
}

impl DevFuseOpenToAll {
    pub fn new() -> DevFuseOpenToAll {
        let lock = fs::File::create("/tmp/velo-tests-dev-fuse.lock").unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
        DevFuseOpenToAll { mode, _lock: lock }
    }
}

impl Drop for DevFuseOpenToAll {
    fn drop(&mut self) {
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.mode));
    }
}

/// Every path below `root` (relative, directories walked, symlinks not followed).
pub fn listed_names(root: &Path) -> std::collections::BTreeSet<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.symlink_metadata().unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.insert(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    out
}

/// `velo gc --run --json`, failing the test (instead of hanging it) if gc waits.
pub fn gc_within_a_minute(env: &Env) -> serde_json::Value {
    let mut child = env
        .cmd()
        .args(["gc", "--run", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gc --run still waiting after a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
