//! `velo mount` against hostile programs on the mount: a rename cannot exhaust the
//! server's descriptors (which other users of the server share) nor, by making a walk
//! fail, nest directories deeper than a tree holds; velo's own `user.velo.*` attributes
//! can be neither seen nor changed through the mount. Needs /dev/fuse and root or
//! fusermount3 (and prlimit): elsewhere the tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{fuse_available, mount_with, Env, Mounted};

/// Runs `python3 -c SCRIPT ARGS` in `dir` and asserts it printed `ok` (its output in the
/// message otherwise).
fn python_ok(dir: &Path, script: &str, args: &[&str]) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the test can run a server with few descriptors.
fn prlimit_available() -> bool {
    fuse_available()
        && common::require(
            common::find_tool("prlimit").is_some(),
            "prlimit (util-linux)",
        )
}

/// `velo mount TREE AT EXTRA` with a server that may open at most `nofile` descriptors.
fn mount_limited<'a>(
    env: &'a Env,
    tree: &str,
    at: &Path,
    nofile: u32,
    extra: &[&str],
) -> Mounted<'a> {
    fs::create_dir_all(at).unwrap();
    let out = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(["mount", tree])
        .arg(at)
        .args(extra)
        .env_remove("VR_THE_SOURCE")
        .env_remove("VRIFT_DEBUG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Mounted {
        env,
        at: at.to_path_buf(),
    }
}

/// Moving a directory of many subdirectories between parents (the server measures how
/// deep it goes) holds a few descriptors, never one per subdirectory: with 300, a
/// thousand subdirectories move back and forth while other programs create, open and list.
#[test]
fn renaming_a_directory_of_many_subdirectories_holds_few_descriptors() {
    if !prlimit_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("kept", b"kept\n")]);
    let at = env.path("mnt");
    let _mounted = mount_limited(&env, "t", &at, 300, &[]);
    let pid = common::server_pid(&at).expect("the server runs");
    let script = r#"
import errno, os, sys, threading
fds = "/proc/%s/fd" % sys.argv[1]
os.mkdir("big")
os.mkdir("x")
for i in range(1000):
    os.mkdir("big/s%d" % i)
baseline = len(os.listdir(fds))
peak = baseline
stop = False
errors = []
def sample():
    global peak
    while not stop:
        try:
            peak = max(peak, len(os.listdir(fds)))
        except OSError:
            pass
def others():
    i = 0
    while not stop:
        try:
            with open("other-%d" % (i % 10), "w") as f:
                f.write("x")
            with open("kept") as f:
                assert f.read() == "kept\n"
            os.listdir(".")
        except OSError as e:
            errors.append(e)
        i += 1
threads = [threading.Thread(target=sample), threading.Thread(target=others)]
for t in threads:
    t.start()
try:
    for n in range(30):
        os.rename("big", "x/big")
        os.rename("x/big", "big")
finally:
    stop = True
    for t in threads:
        t.join()
assert not errors, errors[:3]
assert peak < baseline + 20, "the server went from %d to %d descriptors" % (baseline, peak)
assert len(os.listdir("big")) == 1000
print("ok")
"#;
    python_ok(&at, script, &[&pid.to_string()]);
    let report = env.json(&["commit", at.to_str().unwrap(), "--name", "c"]);
    assert!(report.is_object(), "{report}");
    assert_eq!(env.ok(&["ls", "c", "big"]).lines().count(), 1000);
}

/// A level too many behind a subdirectory the server could not open: a directory of three
/// thousand subdirectories, the last one (in the upper's order) holding a chain to the
/// deepest level a tree holds, cannot move one level down, even when the server has
/// too few descriptors to open every subdirectory at once. The mount stays committable.
#[test]
fn a_rename_cannot_nest_deeper_than_a_tree_holds_behind_many_subdirectories() {
    if !prlimit_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("kept", b"kept\n")]);
    let at = env.path("mnt");
    let upper = env.path("upper");
    // Enough for the directories the server keeps open once the chain is made (one per
    // level) and for a commit (which holds two per level), too few to open three
    // thousand more at once.
    let _mounted = mount_limited(&env, "t", &at, 3600, &["--upper", upper.to_str().unwrap()]);
    let script = r#"
import errno, os, sys
upper = sys.argv[1]
os.mkdir("x")
os.mkdir("big")
for i in range(3000):
    os.mkdir("big/s%d" % i)
# The subdirectory a walk reaches last.
late = os.listdir(os.path.join(upper, "big"))[-1]
fd = os.open("big/" + late, os.O_RDONLY)
# The top, big and late are three levels: 1,021 more reach the deepest a tree holds.
for i in range(1021):
    os.mkdir("d", dir_fd=fd)
    below = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = below
try:
    os.mkdir("d", dir_fd=fd)
    raise SystemExit("a directory below the deepest level was made")
except OSError as e:
    assert e.errno == errno.ENAMETOOLONG, e
os.close(fd)
try:
    os.rename("big", "x/big")
    raise SystemExit("the rename one level down succeeded")
except OSError as e:
    assert e.errno == errno.ENAMETOOLONG, e
assert os.path.isdir("big/" + late) and os.listdir("x") == []
# Where it stays as deep, it moves.
os.rename("big", "big2")
os.rename("big2", "big")
print("ok")
"#;
    python_ok(&at, script, &[upper.to_str().unwrap()]);
    let report = env.json(&["commit", at.to_str().unwrap(), "--name", "c"]);
    assert!(report.is_object(), "{report}");
    assert_eq!(env.ok(&["ls", "c"]), "big\nkept\nx\n");
    assert_eq!(env.ok(&["ls", "c", "big"]).lines().count(), 3000);
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = rustix::fs::lgetxattr(path, name, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// `user.velo.*` is velo's bookkeeping (the upper root's `user.velo.base` names the tree
/// the upper applies to): through the mount no program sets, removes, reads or lists one,
/// on the top, a tree directory or file, or what it made; the upper's record stays, and
/// the upper mounts again over its tree.
#[test]
fn programs_on_the_mount_cannot_see_or_change_velos_own_attributes() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = common::ingest_files(&env, "t", &[("dir/kept", b"kept\n")]);
    fs::write(src.join("other"), b"other\n").unwrap();
    env.ingest(&src, &["--name", "t2"]);
    let at = env.path("mnt");
    let upper = env.path("upper");
    let mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    let base = xattr(&upper, "user.velo.base").expect("the upper records its tree");
    let script = r#"
import errno, os
os.mkdir("newdir")
with open("newfile", "w") as f:
    f.write("new\n")
os.setxattr("dir/kept", b"user.note", b"n")
for path in (".", "dir", "dir/kept", "newdir", "newfile"):
    for name in (b"user.velo.base", b"user.velo.other"):
        for what, call, want in (
            ("set", lambda: os.setxattr(path, name, b"0" * 64), errno.EPERM),
            ("create", lambda: os.setxattr(path, name, b"0", os.XATTR_CREATE), errno.EPERM),
            ("remove", lambda: os.removexattr(path, name), errno.EPERM),
            ("get", lambda: os.getxattr(path, name), errno.ENODATA),
        ):
            try:
                call()
                raise SystemExit("%s %r on %r succeeded" % (what, name, path))
            except OSError as e:
                assert e.errno == want, (what, name, path, e)
    listed = os.listxattr(path)
    assert not [n for n in listed if n.startswith("user.velo.")], (path, listed)
assert os.listxattr("dir/kept") == ["user.note"], os.listxattr("dir/kept")
print("ok")
"#;
    python_ok(&at, script, &[]);
    assert_eq!(xattr(&upper, "user.velo.base"), Some(base.clone()));
    for made in ["newdir", "newfile", "dir", "dir/kept"] {
        assert_eq!(xattr(&upper.join(made), "user.velo.other"), None, "{made}");
        assert_eq!(xattr(&upper.join(made), "user.velo.base"), None, "{made}");
    }
    drop(mounted);
    assert_eq!(xattr(&upper, "user.velo.base"), Some(base));
    // The upper still applies to its tree, and only to it.
    let refused = env.fails(&[
        "mount",
        "t2",
        at.to_str().unwrap(),
        "--upper",
        upper.to_str().unwrap(),
    ]);
    assert!(refused.contains("holds changes to tree"), "{refused}");
    let _mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    assert_eq!(fs::read(at.join("newfile")).unwrap(), b"new\n");
    assert_eq!(fs::read(at.join("dir/kept")).unwrap(), b"kept\n");
    assert!(at.join("newdir").is_dir());
}
