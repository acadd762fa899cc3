//! `velo mount` read-write: the same changes made on the mount and on a native copy of
//! the tree give the same files, modes, times and contents, before and after a commit;
//! descriptors, mappings, links and renames behave as on a local file system; the upper format is
//! defended against programs on the mount; `velo commit` and `velo umount --commit` seal
//! the state. Needs /dev/fuse and root or fusermount3: elsewhere the tests show as
//! skipped, and fail under CI.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fuse_available, mount_with, Env, Mounted};

/// Runs `python3 -c SCRIPT` in `dir` and asserts what it printed (its stderr in the
/// message otherwise).
fn python_prints(dir: &Path, script: &str, expected: &str) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether FUSE passthrough can be asked for (FUSE and root: it needs CAP_SYS_ADMIN).
fn passthrough_available() -> bool {
    fuse_available()
        && common::require(
            common::is_root(),
            "root (FUSE passthrough needs CAP_SYS_ADMIN)",
        )
}

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "in {}: {script}\nstdout: {}\nstderr: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every kind of change, made by ordinary tools. Times of what it changes are set at the
/// end (relative to MARKER, a file made just before), so both runs can be compared.
const CHANGES: &str = r#"set -e
echo appended >> plain.txt
printf new > created.txt
mkdir -p newdir/inner && echo deep > newdir/inner/f
chmod 0640 sub/private
chmod 0700 sub
rm sub/readonly
rm -r empty_dir
mkdir empty_dir && echo fresh > empty_dir/x
rm -r sub/deeper/deepest
mkdir sub/deeper/deepest
mv sub/exec.sh moved.sh
mv created.txt newdir/created.txt
ln newdir/created.txt hard2
ln plain.txt hard3
ln -s plain.txt newlink
rm dangling
truncate -s 3 .dotfile
mv -f hardlink-to-plain sub/deeper/big.bin
mv newdir/inner newdir/inner2
python3 - <<'EOF'
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, NOREPLACE, EXCHANGE = -100, 1, 2
def renameat2(a, b, flags):
    if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), flags) != 0:
        return ctypes.get_errno()
    return 0
def check(got, want, what):
    assert got == want, "%s: errno %d (%s), wanted %d" % (what, got, os.strerror(got), want)
check(renameat2("moved.sh", "abs-link", EXCHANGE), 0, "exchange a file and a symlink")
check(renameat2("plain.txt", "hard2", NOREPLACE), errno.EEXIST, "noreplace onto a file")
check(renameat2("newdir", "setgid_dir", EXCHANGE), 0, "exchange two directories")
check(renameat2("hard3", "brand-new", NOREPLACE), 0, "noreplace onto nothing")
os.utime("moved.sh", ns=(1_234_567_890_123_456_789, 1_234_567_890_123_456_789), follow_symlinks=False)
EOF
find . -newer "$MARKER" ! -type l -exec touch -d @1650000000.25 {} +
find . -newer "$MARKER" -type l -exec touch -h -d @1650000000.5 {} +
"#;

fn apply_changes(dir: &Path, marker: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(CHANGES)
        .env("MARKER", marker)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the changes failed in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn changes_on_the_mount_match_the_same_changes_natively_and_commit_exactly() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    common::awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let native = env.path("native");
    sh(
        &env.path(""),
        // The tree records no hard links: the native copy has none either.
        &format!(
            "cp -a --no-preserve=links {} {}",
            src.display(),
            native.display()
        ),
    );
    let marker = env.path("marker");
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&marker, b"").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));

    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &[]);
    let before = fs::metadata(at.join("plain.txt")).unwrap();
    apply_changes(&native, &marker);
    apply_changes(&at, &marker);
    let want = common::scan(&native);
    assert_eq!(common::scan(&at), want);

    // A tree file keeps its inode number when it is copied up; links share one.
    let after = fs::metadata(at.join("plain.txt")).unwrap();
    assert_eq!(before.ino(), after.ino());
    assert_eq!(after.nlink(), 2);
    assert_eq!(fs::metadata(at.join("hard2")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(at.join("hard2")).unwrap().ino(),
        fs::metadata(at.join("setgid_dir/created.txt"))
            .unwrap()
            .ino()
    );
    // The directory made where the tree had one shows none of the tree's entries.
    assert_eq!(
        fs::read_dir(at.join("sub/deeper/deepest")).unwrap().count(),
        0
    );
    // A directory's link count counts its subdirectories from both layers.
    assert_eq!(fs::metadata(at.join("sub")).unwrap().nlink(), 3);

    env.ok(&["commit", at.to_str().unwrap(), "--name", "changed"]);
    // Still serving after the commit, and the commit is what the mount showed.
    assert_eq!(common::scan(&at), want);
    let out = env.path("out");
    env.ok(&[
        "checkout",
        "changed",
        out.to_str().unwrap(),
        "--mode",
        "copy",
    ]);
    assert_eq!(common::scan(&out), want);
    // The original tree is untouched.
    assert_eq!(env.ok(&["cat", "t", "plain.txt"]), "plain\n");
    drop(mounted);
    env.fsck_ok();
}

/// Descriptors and mappings: an unlinked open file reads on; a mapping's writes, a
/// fallocate and a copy_file_range all give the size and bytes a local file system gives.
#[test]
fn open_descriptors_mappings_and_ranges_behave_as_on_a_local_file_system() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let big = vec![b'y'; 200_000];
    common::ingest_files(
        &env,
        "t",
        &[
            ("tree-file", b"from the tree\n"),
            ("existing-unlink", &big),
            ("existing-rename", &big),
            ("tree-unlinked", &big),
        ],
    );
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    let script = r#"
import mmap, os
def uncached_read(f):
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    f.seek(0)
    return f.read()
# A tree file opened, deleted, still readable; a second reader opened before a writer's
# copy-up sees the writer's bytes (one inode).
r = open("tree-file", "rb")
w = open("tree-file", "r+b")
w.write(b"FROM")
w.flush()
assert r.read() == b"FROM the tree\n", "reader after copy-up"
os.unlink("tree-file")
r.seek(0)
assert r.read() == b"FROM the tree\n", "reader after unlink"
assert os.fstat(w.fileno()).st_nlink == 0
w.close(); r.close()
assert not os.path.exists("tree-file")
# A file of the upper opened again (the kernel sends the server no open for it), then
# unlinked or renamed over while open: writes and reads go on, also past the kernel's
# page cache (dropped with fadvise, so every read asks the server).
# (Copied up by a chmod: no handle of the server ever had it open.)
for how in ("unlink", "rename"):
    os.chmod("existing-" + how, 0o644)
    g = open("existing-" + how, "r+b")
    if how == "unlink":
        os.unlink("existing-" + how)
    else:
        with open("other", "wb") as f:
            f.write(b"other")
        os.rename("other", "existing-" + how)
    g.seek(150000)
    g.write(b"z" * 10)
    g.flush()
    os.posix_fadvise(g.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    g.seek(0)
    data = g.read()
    assert len(data) == 200000 and data[150000:150010] == b"z" * 10, how
    os.fsync(g.fileno())
    assert os.fstat(g.fileno()).st_nlink == 0, how
    g.close()
assert open("existing-rename", "rb").read() == b"other"
os.unlink("existing-rename")
# A tree file never changed, opened for writing and then deleted: writes, truncation and
# chmod through the descriptor go on (to a copy with no name), reads see them.
g = open("tree-unlinked", "r+b")
os.unlink("tree-unlinked")
g.seek(5)
g.write(b"Q")
g.flush()
os.fchmod(g.fileno(), 0o600)
os.ftruncate(g.fileno(), 1000)
data = uncached_read(g)
assert data == b"y" * 5 + b"Q" + b"y" * 994, data[:10]
assert os.fstat(g.fileno()).st_mode & 0o777 == 0o600
assert os.fstat(g.fileno()).st_nlink == 0
g.close()
# A file whose mode no longer lets anyone read it reads on through a descriptor opened
# before the chmod.
with open("closed", "wb") as f:
    f.write(b"c" * 100000)
g = open("closed", "rb")
os.chmod("closed", 0)
os.posix_fadvise(g.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
assert g.read() == b"c" * 100000
g.close()
# A new file, unlinked while open: writes and reads go on.
f = open("scratch", "w+b")
os.unlink("scratch")
f.write(b"x" * 10000)
f.flush()
f.seek(0)
assert len(f.read()) == 10000
f.close()
# Shared mapping writes, after extending with ftruncate.
fd = os.open("mapped", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 8192)
m = mmap.mmap(fd, 8192)
m[4096:4101] = b"hello"
m.flush()
m.close()
os.close(fd)
assert os.stat("mapped").st_size == 8192
with open("mapped", "rb") as g:
    g.seek(4096)
    assert g.read(5) == b"hello"
# fallocate extends; punching a hole keeps the size and reads zeros.
fd = os.open("alloc", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"a" * 100)
os.posix_fallocate(fd, 0, 65536)
assert os.fstat(fd).st_size == 65536
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
assert libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(0), ctypes.c_long(50)) == 0, ctypes.get_errno()
os.close(fd)
with open("alloc", "rb") as g:
    data = g.read()
assert len(data) == 65536 and data[:50] == b"\0" * 50 and data[50:100] == b"a" * 50
# copy_file_range between two files of the mount.
src = os.open("alloc", os.O_RDONLY)
dst = os.open("copied", os.O_RDWR | os.O_CREAT, 0o644)
n = os.copy_file_range(src, dst, 100, 0, 1000)
assert n == 100, n
assert os.fstat(dst).st_size == 1100
os.close(src); os.close(dst)
# statfs answers.
st = os.statvfs(".")
assert st.f_bsize > 0 and st.f_blocks > 0
# A file lock and a record lock.
import fcntl
with open("locked", "w") as l:
    fcntl.flock(l, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.lockf(l, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("ok")
"#;
    python_prints(&at, script, "ok\n");
}

/// Programs on the mount cannot forge the upper format: no whiteout by mknod, no overlay
/// xattr; their own user xattrs work.
#[test]
fn programs_on_the_mount_cannot_forge_the_upper_format() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("dir/kept", b"kept\n")]);
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    let script = r#"
import errno, os
try:
    os.mknod("dir/kept2", 0o600 | 0o020000, os.makedev(0, 0))
    raise SystemExit("mknod of a 0/0 device succeeded")
except OSError as e:
    assert e.errno == errno.EPERM, e
for name in (b"user.overlay.opaque", b"trusted.overlay.opaque", b"user.overlay.whiteout"):
    try:
        os.setxattr("dir", name, b"y")
        raise SystemExit("setting %r succeeded" % name)
    except OSError as e:
        assert e.errno in (errno.EPERM, errno.ENOTSUP), e
os.setxattr("dir/kept", b"user.note", b"hello")
assert os.getxattr("dir/kept", b"user.note") == b"hello"
assert os.listxattr("dir/kept") == ["user.note"], os.listxattr("dir/kept")
os.mkdir("dir/new")
assert "user.overlay.opaque" not in os.listxattr("dir")
os.removexattr("dir/kept", b"user.note")
assert os.listxattr("dir/kept") == []
print("ok")
"#;
    python_prints(&at, script, "ok\n");
    assert_eq!(fs::read(at.join("dir/kept")).unwrap(), b"kept\n");
    // A tree directory moves (copied up whole), keeping its inode and its entries.
    let ino = fs::metadata(at.join("dir")).unwrap().ino();
    fs::rename(at.join("dir"), at.join("dir2")).unwrap();
    assert_eq!(fs::metadata(at.join("dir2")).unwrap().ino(), ino);
    assert_eq!(fs::read(at.join("dir2/kept")).unwrap(), b"kept\n");
    assert!(!at.join("dir").exists());
    fs::create_dir(at.join("dir")).unwrap();
    assert_eq!(fs::read_dir(at.join("dir")).unwrap().count(), 0);
}

/// `--upper` keeps the changes across unmounts and records its tree; `velo umount
/// --commit` seals what the mount showed; without an upper the changes go, and velo
/// says so.
#[test]
fn kept_uppers_and_commits_at_unmount() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = common::ingest_files(&env, "t", &[("a", b"a\n")]);
    fs::write(src.join("other"), b"other\n").unwrap();
    env.ingest(&src, &["--name", "t2"]);
    let at = env.path("mnt");
    let upper = env.path("upper");
    let mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    fs::write(at.join("b"), b"b\n").unwrap();
    fs::remove_file(at.join("a")).unwrap();
    drop(mounted);
    // Remounted: the state is there.
    let mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    assert_eq!(fs::read(at.join("b")).unwrap(), b"b\n");
    assert!(!at.join("a").exists());
    drop(mounted);
    // Over another tree: refused, nothing changed.
    let refused = env.fails(&[
        "mount",
        "t2",
        at.to_str().unwrap(),
        "--upper",
        upper.to_str().unwrap(),
    ]);
    assert!(refused.contains("holds changes to tree"), "{refused}");
    assert!(!velo_mounted(&at));
    // An upper inside the mount point: refused.
    let inside = at.join("up");
    let refused = env.fails(&[
        "mount",
        "t",
        at.to_str().unwrap(),
        "--upper",
        inside.to_str().unwrap(),
    ]);
    assert!(refused.contains("inside the mount point"), "{refused}");

    // umount --commit writes a .velo and registers the tree.
    let _mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    let sealed = env.path("sealed.velo");
    env.ok(&[
        "umount",
        at.to_str().unwrap(),
        "--commit",
        sealed.to_str().unwrap(),
        "--name",
        "sealed",
    ]);
    assert!(!velo_mounted(&at));
    assert!(sealed.is_file());
    assert_eq!(env.ok(&["ls", "sealed"]), "b\n");

    // No --upper: the changes go at umount, and velo says so; with the mount's --name
    // they are committed under it.
    let mounted = mount_with(&env, "t", &at, &[]);
    fs::write(at.join("c"), b"c\n").unwrap();
    let out = env.run(&["umount", at.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("discarded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::mem::forget(mounted);
    let _mounted = mount_with(&env, "t", &at, &["--name", "by-default"]);
    fs::write(at.join("d"), b"d\n").unwrap();
    env.ok(&["umount", at.to_str().unwrap()]);
    assert_eq!(env.ok(&["ls", "by-default"]), "a\nd\n");
    env.fsck_ok();
}

fn velo_mounted(at: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
}

/// fsx with every operation it has (mmap reads and writes, truncate, fallocate, punch
/// hole, copy_file_range, fsync) on a tree file of the mount, byte-identical to the same
/// run on a local file.
#[test]
fn fsx_on_a_tree_file_of_the_mount_matches_its_native_run() {
    if !fuse_available() {
        return;
    }
    let fsx = common::find_tool("fsx").or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from)?;
        Some(home.join(".cargo/bin/fsx")).filter(|p| p.is_file())
    });
    if !common::require(fsx.is_some(), "fsx (cargo install fsx)") {
        return;
    }
    let fsx = fsx.unwrap();
    let toml = "[weights]\nclose_open = 2\nread = 10\nwrite = 10\nmapread = 10\n\
                mapwrite = 10\ninvalidate = 1\ntruncate = 2\nfsync = 1\nfdatasync = 1\n\
                posix_fallocate = 1\npunch_hole = 1\nsendfile = 1\nposix_fadvise = 1\n\
                copy_file_range = 1\n";
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let original: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    fs::write(src.join("testfile"), &original).unwrap();
    env.ingest(&src, &["--name", "t"]);
    let run = |dir: &Path| {
        fs::write(env.path("fsx.toml"), toml).unwrap();
        let out = Command::new(&fsx)
            .args(["-f"])
            .arg(env.path("fsx.toml"))
            .args(["-S", "29", "-N", "10000", "-P"])
            .arg(env.path(""))
            .arg("testfile")
            .current_dir(dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("All operations completed A-OK!"), "{text}");
        fs::read(dir.join("testfile")).unwrap()
    };
    let host = env.path("host");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("testfile"), &original).unwrap();
    let expected = run(&host);
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    let got = run(&at);
    assert!(
        got == expected,
        "the mount's file differs from fsx's native run"
    );
    env.ok(&["commit", at.to_str().unwrap(), "--name", "exercised"]);
    let out = env.path("out");
    env.ok(&[
        "checkout",
        "exercised",
        out.to_str().unwrap(),
        "--mode",
        "copy",
    ]);
    assert!(fs::read(out.join("testfile")).unwrap() == expected);
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    rustix::fs::lgetxattr(path, name, &mut buf)
        .ok()
        .map(|n| buf[..n].to_vec())
}

/// Extended attributes (user.*, security.capability) go from ingest into the tree, show
/// in copy checkouts and on the mount, survive a copy-up, and what is set on the mount is
/// committed; the overlay format's own never is.
#[test]
fn extended_attributes_are_kept_from_ingest_to_checkout_mount_and_commit() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("dir/tagged"), b"tagged\n").unwrap();
    fs::write(src.join("plain"), b"plain\n").unwrap();
    let set = |path: &Path, name: &str, value: &[u8]| {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap()
    };
    set(&src.join("dir/tagged"), "user.origin", b"ingest");
    set(&src.join("dir"), "user.dir-note", b"a directory");
    // Not kept: a name outside user.* and security.capability.
    let _ = rustix::fs::lsetxattr(
        src.join("plain"),
        "trusted.private",
        b"x",
        rustix::fs::XattrFlags::empty(),
    );
    env.ingest(&src, &["--name", "t"]);

    let copy = env.path("copy");
    env.ok(&["checkout", "t", copy.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(
        xattr(&copy.join("dir/tagged"), "user.origin").as_deref(),
        Some(&b"ingest"[..])
    );
    assert_eq!(
        xattr(&copy.join("dir"), "user.dir-note").as_deref(),
        Some(&b"a directory"[..])
    );
    assert_eq!(xattr(&copy.join("plain"), "trusted.private"), None);
    // A hard-linked checkout cannot show them on shared inodes, and says so.
    let linked = env.path("linked");
    let out = env.run(&["checkout", "t", linked.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lack extended attributes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &[]);
    assert_eq!(
        xattr(&at.join("dir/tagged"), "user.origin").as_deref(),
        Some(&b"ingest"[..])
    );
    // A write copies the file up with its attributes; new ones are set on the mount.
    fs::OpenOptions::new()
        .append(true)
        .open(at.join("dir/tagged"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"more\n"))
        .unwrap();
    assert_eq!(
        xattr(&at.join("dir/tagged"), "user.origin").as_deref(),
        Some(&b"ingest"[..])
    );
    set(&at.join("plain"), "user.added", b"on the mount");
    fs::write(at.join("new"), b"new\n").unwrap();
    set(&at.join("new"), "user.fresh", b"1");
    env.ok(&["commit", at.to_str().unwrap(), "--name", "c"]);
    drop(mounted);

    let out = env.path("out");
    env.ok(&["checkout", "c", out.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(fs::read(out.join("dir/tagged")).unwrap(), b"tagged\nmore\n");
    assert_eq!(
        xattr(&out.join("dir/tagged"), "user.origin").as_deref(),
        Some(&b"ingest"[..])
    );
    assert_eq!(
        xattr(&out.join("dir"), "user.dir-note").as_deref(),
        Some(&b"a directory"[..])
    );
    assert_eq!(
        xattr(&out.join("plain"), "user.added").as_deref(),
        Some(&b"on the mount"[..])
    );
    assert_eq!(
        xattr(&out.join("new"), "user.fresh").as_deref(),
        Some(&b"1"[..])
    );
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(out.join("dir"), &mut names).unwrap();
    assert!(
        !names[..n].windows(8).any(|w| w == b"overlay."),
        "the upper format's attributes are never committed"
    );
    env.fsck_ok();
}

/// What pjdfstest's open::etxtbsy found: `open(O_RDONLY|O_TRUNC)` of a running program
/// was refused (ETXTBSY) only after the server had truncated it. Also: `>` on a tree file
/// copies nothing up before it truncates, and reads through an earlier descriptor see
/// the new bytes.
#[test]
fn a_running_program_is_never_truncated_and_truncating_opens_copy_nothing() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::copy("/bin/sleep", src.join("tree-exe")).unwrap();
    fs::write(src.join("big"), vec![7u8; 1 << 20]).unwrap();
    env.ingest(&src, &["--name", "t"]);
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    fs::copy("/bin/sleep", at.join("made-exe")).unwrap();
    let size = fs::metadata("/bin/sleep").unwrap().len();
    for exe in ["tree-exe", "made-exe"] {
        let mut child = Command::new(at.join(exe)).arg("30").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let err = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_TRUNC)
            .open(at.join(exe))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{exe}: {err}");
        assert_eq!(fs::metadata(at.join(exe)).unwrap().len(), size, "{exe}");
        assert!(child.try_wait().unwrap().is_none(), "{exe} still runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let reader = fs::File::open(at.join("big")).unwrap();
    sh(&at, "echo short > big");
    assert_eq!(fs::read(at.join("big")).unwrap(), b"short\n");
    let mut again = String::new();
    std::io::Read::read_to_string(&mut &reader, &mut again).unwrap();
    assert_eq!(again, "short\n");
}

/// `--passthrough` (root, Linux 6.9+): the kernel reads tree files from their blobs. It
/// keeps one way of reading per file, so a writer waits for passthrough readers to close
/// (ETXTBSY), never gets EIO, and no blob is ever written.
#[test]
fn passthrough_reads_tree_files_from_the_store_and_keeps_writers_apart() {
    if !passthrough_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"tree bytes\n").unwrap();
    fs::write(src.join("g"), vec![3u8; 300_000]).unwrap();
    env.ingest(&src, &["--name", "t"]);
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &["--passthrough"]);
    let script = r#"
import errno, mmap, os
r = open("f", "rb")
assert r.read() == b"tree bytes\n"
try:
    open("f", "ab")
    raise SystemExit("a writer opened while a passthrough reader had it open")
except OSError as e:
    assert e.errno == errno.ETXTBSY, e
try:
    os.truncate("f", 0)
    raise SystemExit("truncated while a passthrough reader had it open")
except OSError as e:
    assert e.errno == errno.ETXTBSY, e
r2 = open("f", "rb")
assert r2.read() == b"tree bytes\n"
# Copied up (a chmod) while the blob is read through passthrough: another reader opens it.
os.chmod("f", 0o640)
r3 = open("f", "rb")
assert r3.read() == b"tree bytes\n"
try:
    open("f", "ab")
    raise SystemExit("a writer opened while a reader of the copied-up file read the blob")
except OSError as e:
    assert e.errno == errno.ETXTBSY, e
r.close(); r2.close()
try:
    open("f", "ab")
    raise SystemExit("a writer opened while the last reader still read the blob")
except OSError as e:
    assert e.errno == errno.ETXTBSY, e
r3.close()
with open("f", "ab") as w:
    w.write(b"appended\n")
assert open("f", "rb").read() == b"tree bytes\nappended\n"
with open("g", "rb") as g:
    m = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
    assert m[:3] == b"\x03\x03\x03" and len(m) == 300000
    m.close()
os.rename("g", "g2")
assert open("g2", "rb").read() == b"\x03" * 300000
print("ok")
"#;
    python_prints(&at, script, "ok\n");
    env.ok(&["commit", at.to_str().unwrap(), "--name", "c"]);
    assert_eq!(env.ok(&["cat", "c", "f"]), "tree bytes\nappended\n");
    assert_eq!(env.ok(&["cat", "t", "f"]), "tree bytes\n");
    env.fsck_ok();
}

/// `--passthrough`: a tree file never changed, opened for writing and then deleted,
/// takes writes, and then chmod and truncation, through the open descriptor (to a copy
/// with no name), as without passthrough; the write failed with ENOENT (the copy-up
/// looked for its name).
#[test]
fn passthrough_writes_to_a_tree_file_deleted_while_open_go_on() {
    if !passthrough_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(
        &env,
        "t",
        &[("tree-unlinked", &[b'y'; 200_000]), ("kept", b"k\n")],
    );
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &["--passthrough"]);
    let script = r#"
import os
g = open("tree-unlinked", "r+b")
os.unlink("tree-unlinked")
g.seek(5)
g.write(b"Q")
g.flush()
os.fchmod(g.fileno(), 0o600)
os.ftruncate(g.fileno(), 1000)
g.seek(0)
data = g.read()
assert data == b"y" * 5 + b"Q" + b"y" * 994, data[:10]
assert os.fstat(g.fileno()).st_mode & 0o777 == 0o600
assert os.fstat(g.fileno()).st_nlink == 0
g.close()
assert not os.path.exists("tree-unlinked")
print("ok")
"#;
    python_prints(&at, script, "ok\n");
    env.ok(&["commit", at.to_str().unwrap(), "--name", "c"]);
    assert_eq!(env.ok(&["ls", "c"]).trim(), "kept");
    env.fsck_ok();
}

/// `--passthrough`: files of the upper (made on the mount, or copied up) are read and
/// written by the kernel straight, so their bytes never pass through the server (its
/// write count stays flat while 8 MiB are written), and everything the server still
/// answers for them (size, truncate, fallocate, fsync, a second open, mmap, commit)
/// agrees with what was written.
#[test]
fn passthrough_writes_upper_files_without_the_server() {
    if !passthrough_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("t", b"tree\n")]);
    let at = env.path("mnt");
    let upper = env.path("upper");
    let _mounted = mount_with(
        &env,
        "t",
        &at,
        &["--passthrough", "--upper", upper.to_str().unwrap()],
    );
    let pid = common::server_pid(&at).expect("the server's pid");
    let written_by_server = || {
        let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = written_by_server();
    let script = r#"
import mmap, os
chunk = bytes(range(256)) * 4096
with open("new", "wb") as w:
    for _ in range(8):
        w.write(chunk)
    w.flush()
    os.fsync(w.fileno())
    assert os.fstat(w.fileno()).st_size == 8 << 20
    with open("new", "rb") as r:
        assert r.read() == chunk * 8
with open("new", "r+b") as a, open("new", "r+b") as b:
    a.seek(10); a.write(b"AAAA"); a.flush()
    b.seek(10); assert b.read(4) == b"AAAA"
    os.ftruncate(b.fileno(), 1 << 20)
    os.posix_fallocate(a.fileno(), 0, 2 << 20)
    m = mmap.mmap(a.fileno(), 0)
    m[0:3] = b"MAP"
    m.flush(); m.close()
assert os.stat("new").st_size == 2 << 20
data = open("new", "rb").read()
assert data[:3] == b"MAP" and data[10:14] == b"AAAA" and data[(1 << 20):] == bytes(1 << 20)
with open("t", "ab") as t:
    t.write(b"more\n")
with open("t", "ab") as t:
    t.write(b"again\n")
assert open("t", "rb").read() == b"tree\nmore\nagain\n"
print("ok")
"#;
    python_prints(&at, script, "ok\n");
    let through_server = written_by_server() - before;
    assert!(
        through_server < 4 << 20,
        "{through_server} bytes went through the server for 8 MiB of passthrough writes"
    );
    assert_eq!(fs::metadata(upper.join("new")).unwrap().len(), 2 << 20);
    env.ok(&["commit", at.to_str().unwrap(), "--name", "c"]);
    let bytes = env.cmd().args(["cat", "c", "new"]).output().unwrap().stdout;
    assert_eq!(&bytes[..3], b"MAP");
    assert_eq!(&bytes[10..14], b"AAAA");
    assert_eq!(bytes.len(), 2 << 20);
    assert_eq!(env.ok(&["cat", "c", "t"]), "tree\nmore\nagain\n");
    env.fsck_ok();
}

/// Listings carry each entry's attributes (readdirplus), and the kernel takes a reference
/// on each entry listed, as for a lookup: entries listed, forgotten by the kernel (caches
/// dropped) and looked up again keep their inode numbers, links and bytes, whether they
/// are tree files, copied-up files, new files or hard links.
#[test]
fn inode_numbers_survive_listings_and_the_kernel_forgetting_them() {
    if !fuse_available() {
        return;
    }
    if !common::require(common::is_root(), "root (to drop the kernel's caches)") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("dir/tree-sub")).unwrap();
    for name in ["a", "b", "tree-sub/c"] {
        fs::write(src.join("dir").join(name), name).unwrap();
    }
    env.ingest(&src, &["--name", "t"]);
    let at = env.path("mnt");
    let upper = env.path("upper");
    let _mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    let dir = at.join("dir");
    for i in 0..40 {
        fs::write(dir.join(format!("new{i}")), format!("new {i}")).unwrap();
    }
    fs::create_dir(dir.join("made")).unwrap();
    fs::write(dir.join("made/inner"), "inner").unwrap();
    fs::set_permissions(
        dir.join("a"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::hard_link(dir.join("new0"), dir.join("link0")).unwrap();
    let drop_caches = || {
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    };
    let shown = |m: &fs::Metadata| {
        (
            m.ino(),
            m.nlink(),
            m.mode(),
            m.size(),
            m.mtime_nsec(),
            m.mtime(),
        )
    };
    type Attributes = (u64, u64, u32, u64, i64, i64);
    let walk = |root: &Path| -> Vec<(String, Attributes, Vec<u8>)> {
        let mut found = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let entry = entry.unwrap();
                let meta = entry.metadata().unwrap();
                assert_eq!(
                    entry.ino(),
                    meta.ino(),
                    "{:?}: listed and stat inode",
                    entry.path()
                );
                let bytes = if meta.is_dir() {
                    dirs.push(entry.path());
                    Vec::new()
                } else {
                    fs::read(entry.path()).unwrap()
                };
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .display()
                    .to_string();
                found.push((rel, shown(&meta), bytes));
            }
        }
        found.sort();
        found
    };
    use std::os::unix::fs::DirEntryExt;
    let first = walk(&at);
    assert_eq!(first.len(), 1 + 2 + 2 + 40 + 2 + 1, "{first:?}");
    for round in 0..3 {
        drop_caches();
        // Looked up by path first (no listing), then listed again.
        for (rel, attributes, _) in &first {
            let meta = fs::symlink_metadata(at.join(rel)).unwrap();
            assert_eq!(&shown(&meta), attributes, "round {round}: {rel}");
        }
        drop_caches();
        assert_eq!(
            walk(&at),
            first,
            "round {round}: listed after the kernel forgot"
        );
    }
    let link = first.iter().find(|e| e.0 == "dir/link0").unwrap();
    let new0 = first.iter().find(|e| e.0 == "dir/new0").unwrap();
    assert_eq!(
        (link.1 .0, link.1 .1),
        (new0.1 .0, 2),
        "a hard link shares the inode"
    );
}

/// A listing read in several requests continues from the state of its first, but the
/// entries it hands the kernel with their attributes (readdirplus) are the names as they
/// are now: names renamed away meanwhile do not come back as cached entries (found by
/// review: they did, for an hour, and `open(O_CREAT|O_EXCL)` of such a name failed).
#[test]
fn names_renamed_during_a_listing_do_not_come_back() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", "f".as_bytes())]);
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    let script = r#"
import os
d = "big"
os.mkdir(d)
n = 3000
for i in range(n):
    open(f"{d}/old-{i:05d}", "w").close()
it = os.scandir(d)
next(it)
for i in range(n):
    os.rename(f"{d}/old-{i:05d}", f"{d}/new-{i:05d}")
rest = [e.name for e in it]
stale = [i for i in range(n) if os.path.lexists(f"{d}/old-{i:05d}")]
assert not stale, f"{len(stale)} names renamed away still exist, e.g. old-{stale[0]:05d}"
os.close(os.open(f"{d}/old-00000", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
assert sorted(os.listdir(d)) == sorted([f"new-{i:05d}" for i in range(n)] + ["old-00000"])
print("ok", len(rest) > 0)
"#;
    python_prints(&at, script, "ok True\n");
}

/// What git's ref updates found (the real-software tests): a tree name renamed over and
/// then deleted, or deleted, made again and deleted again, came back in the commit (no
/// whiteout was left the second time).
#[test]
fn a_tree_name_deleted_after_another_change_stays_deleted_in_the_commit() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for name in ["a", "b", "d"] {
        fs::write(src.join(name), name).unwrap();
    }
    env.ingest(&src, &["--name", "t"]);
    let at = env.path("mnt");
    let upper = env.path("upper");
    let mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    sh(
        &at,
        "echo n > a.lock && mv a.lock a && rm a && echo n > b.lock && mv b.lock b && \
         mv b b-moved && rm d && echo x > d && rm d",
    );
    assert_eq!(sh(&at, "ls"), "b-moved\n");
    drop(mounted);
    // Remounted from the kept upper, and committed: the same.
    let _mounted = mount_with(&env, "t", &at, &["--upper", upper.to_str().unwrap()]);
    assert_eq!(sh(&at, "ls"), "b-moved\n");
    env.ok(&["umount", at.to_str().unwrap(), "--name", "after"]);
    assert_eq!(env.ok(&["ls", "after"]), "b-moved\n");
    assert_eq!(env.ok(&["cat", "after", "b-moved"]), "n\n");
}

/// What the hostile red-team run found: a program could nest directories deeper than a
/// tree holds (no commit could seal the mount again, and `rm -rf` failed), file
/// capabilities set on the mount survived into commits, and the control socket read past
/// its 64 KiB limit and lost requests sent together.
#[test]
fn a_hostile_program_cannot_make_the_mount_uncommittable_or_keep_privileges() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"f\n")]);
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    let script = r#"
import errno, os, socket, json, struct
fd = os.open(".", os.O_RDONLY)
depth = 0
while True:
    try:
        os.mkdir("a", dir_fd=fd)
    except OSError as e:
        assert e.errno == errno.ENAMETOOLONG, e
        break
    fd = os.open("a", os.O_RDONLY, dir_fd=fd)
    depth += 1
    assert depth < 5000
print("depth", depth)
if os.geteuid() == 0:
    # A version-2 file capability: cap_setuid permitted and effective.
    cap = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)
    with open("capable", "wb") as f:
        f.write(b"x")
    os.setxattr("capable", "security.capability", cap)
    os.chmod("capable", 0o4755)
# The control socket, found as velo finds it: the mount's source names it.
source = None
for line in open("/proc/self/mountinfo"):
    fields = line.split(" ")
    if fields[4] == os.getcwd():
        source = fields[fields.index("-") + 2]
assert source.startswith("velo-"), source
s = socket.socket(socket.AF_UNIX)
s.connect(b"\0velo-mount-" + source[5:].encode())
r = s.makefile("rb")
s.sendall(b'{"v":1,"op":"info"}\n{"v":1,"op":"info"}\n')
assert json.loads(r.readline())["ok"] and json.loads(r.readline())["ok"]
s.sendall(b'{"v":1,"op":"info"}' + b" " * 70000 + b"\n")
reply = json.loads(r.readline())
assert not reply["ok"] and "64 KiB" in reply["error"], reply
# Far longer, on a new connection: still an error reply, never a reset connection.
s = socket.socket(socket.AF_UNIX)
s.connect(b"\0velo-mount-" + source[5:].encode())
s.sendall(b'{"v":1,"op":"info","x":"' + b"y" * (4 << 20) + b'"}\n')
reply = json.loads(s.makefile("rb").readline())
assert not reply["ok"] and "64 KiB" in reply["error"], reply
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(&at)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("ok\n"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The top is one level: 1,023 directories below it at most.
    assert!(text.contains("depth 1023\n"), "{text}");
    let report = env.json(&["commit", at.to_str().unwrap(), "--name", "c"]);
    if common::is_root() {
        assert_eq!(report["setid_dropped"], serde_json::json!(["capable"]));
        let copy = env.path("copy");
        env.ok(&["checkout", "c", copy.to_str().unwrap(), "--mode", "copy"]);
        let mut buf = [0u8; 64];
        assert!(
            rustix::fs::getxattr(copy.join("capable"), "security.capability", &mut buf).is_err(),
            "the capability was committed"
        );
    }
    sh(&at, "rm -rf a");
    assert_eq!(
        env.ok(&["ls", "c"]).lines().count(),
        if common::is_root() { 3 } else { 2 }
    );
}

/// What the new-user red-team run found: a bad `--name` was refused only after the mount
/// and its changes were gone; a `velo umount --name` stopped after the unmount lost the
/// commit; a fifo made over a deleted tree file brought the file back in the commit;
/// `--json` with a non-UTF-8 mount point panicked; a refused `--upper` left a directory.
#[test]
fn mistakes_and_interruptions_at_unmount_lose_no_change() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    common::ingest_files(&env, "t", &[("old", b"old\n")]);
    // A non-UTF-8 mount point, with --json.
    let at = env.path("").join(std::ffi::OsStr::from_bytes(b"mnt-\xff"));
    fs::create_dir_all(&at).unwrap();
    let out = env.run(&["--json", "mount", "t", at.to_str().unwrap_or("")]);
    let out = if out.status.success() {
        out
    } else {
        env.cmd()
            .args(["--json", "mount", "t"])
            .arg(&at)
            .output()
            .unwrap()
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mounted = Mounted {
        env: &env,
        at: at.clone(),
    };
    fs::write(at.join("precious"), b"precious\n").unwrap();
    fs::remove_file(at.join("old")).unwrap();
    assert!(Command::new("mkfifo")
        .arg(at.join("old"))
        .status()
        .unwrap()
        .success());
    // A bad name: refused while the mount still serves.
    let refused = env
        .cmd()
        .args(["umount", "--name", "bad name"])
        .arg(&at)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bad name"));
    assert_eq!(fs::read(at.join("precious")).unwrap(), b"precious\n");
    // A commit asked for at unmount is made and registered by the server, even when the
    // client is gone by then: here the client says so over the socket and hangs up,
    // and the unmount is done by hand.
    let script = r#"
import json, os, socket, subprocess, sys
at = sys.argv[1].encode("utf-8", "surrogateescape")
source = None
for line in open("/proc/self/mountinfo", "rb"):
    f = line.split(b" ")
    if f[4] == at.replace(b"\\", b"\\134"):
        source = f[f.index(b"-") + 2].decode()
s = socket.socket(socket.AF_UNIX)
s.connect(b"\0velo-mount-" + source[5:].encode())
s.sendall(b'{"v":1,"op":"commit_at_exit","name":"kept"}\n')
assert json.loads(s.makefile("rb").readline())["ok"]
subprocess.run(["fusermount3", "-u", at], check=True)
s.close()
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&at)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::mem::forget(mounted);
    let registered = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        env.run(&["ls", "kept"]).status.success()
    });
    assert!(
        registered,
        "the commit asked for at unmount was not registered"
    );
    // The fifo hid the tree's file: neither is in the commit.
    assert_eq!(env.ok(&["ls", "kept"]), "precious\n");
    // A read-only mount: `umount --name` is refused before anything happens.
    let ro = env.path("ro");
    let _ro = mount_with(&env, "t", &ro, &["--read-only"]);
    let refused = env.fails(&["umount", ro.to_str().unwrap(), "--name", "x"]);
    assert!(refused.contains("read-only"), "{refused}");
    assert!(ro.join("old").exists());
    // A refused --upper leaves nothing behind.
    let other = env.path("other");
    let _other = mount_with(&env, "t", &other, &[]);
    let inside = other.join("up");
    let again = env.path("again");
    fs::create_dir_all(&again).unwrap();
    let refused = env.fails(&[
        "mount",
        "t",
        again.to_str().unwrap(),
        "--upper",
        again.join("up").to_str().unwrap(),
    ]);
    assert!(refused.contains("inside the mount point"), "{refused}");
    assert!(!again.join("up").exists() && !inside.exists());
    env.fsck_ok();
}

/// Restores /dev/fuse's mode when dropped.
/// An unprivileged server (as uid 65534, through fusermount3): the kernel opens files
/// without asking it, so a file whose mode was taken away after a program opened it must
/// still be read and written through that program's descriptor, also once unlinked.
#[test]
fn an_unprivileged_server_serves_descriptors_whose_file_mode_was_taken_away() {
    if !fuse_available()
        || !common::require(common::is_root(), "root (to become uid 65534 with setpriv)")
        || !common::require(common::find_tool("setpriv").is_some(), "setpriv")
        || !common::require(
            common::find_tool("fusermount3").is_some(),
            "fusermount3 (apt install fuse3)",
        )
    {
        return;
    }
    let _device = common::DevFuseOpenToAll::new();
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let work = env.path("work");
    fs::create_dir_all(work.join("src")).unwrap();
    fs::write(work.join("src/tree-file"), b"t").unwrap();
    let script = r#"
import os
def forget_cache():
    # More files than the server keeps open by inode: its descriptors are dropped.
    for i in range(1100):
        with open("pad-%d" % i, "wb") as f:
            f.write(b"p")
def uncached(f):
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    f.seek(0)
    return f.read()
with open("closed", "wb") as f:
    f.write(b"c" * 100000)
g = open("closed", "rb")
os.chmod("closed", 0)
forget_cache()
assert uncached(g) == b"c" * 100000, "read after chmod 0"
g.close()
assert os.stat("closed").st_mode & 0o7777 == 0, oct(os.stat("closed").st_mode)
os.chmod("closed", 0o644)
w = open("closed", "r+b")
os.chmod("closed", 0o200)
forget_cache()
w.seek(10)
w.write(b"W")
w.flush()
assert uncached(w)[:12] == b"c" * 10 + b"W" + b"c", "write then read after chmod 0200"
os.fchmod(w.fileno(), 0o444)
os.unlink("closed")
w.seek(20)
w.write(b"X")
w.flush()
data = uncached(w)
assert len(data) == 100000 and data[20:21] == b"X", "write after chmod 0444 and unlink"
w.close()
print("ok")
"#;
    fs::write(work.join("t.py"), script).unwrap();
    let velo = common::velo_bin();
    let run = format!(
        "set -e; w=\"$1\"; cd \"$w\"; v() {{ \"{}\" --store \"$w/store\" \"$@\"; }}; \
         mkdir m; v ingest src --name t >/dev/null; v mount t m --upper up >/dev/null; \
         (cd m && python3 ../t.py) > out 2>&1 || status=$?; v umount m; cat out; exit ${{status:-0}}",
        velo.display()
    );
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&work)
        .status()
        .unwrap();
    assert!(chown.success());
    let out = common::as_nobody()
        .args(["/bin/sh", "-c", &run, "sh"])
        .arg(&work)
        .env_remove("VR_THE_SOURCE")
        .env("HOME", &work)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy-up that cannot keep what the tree records of an entry (here a file capability,
/// which only CAP_SETFCAP may set) is undone: the change fails with that error, again on
/// every try (a half-made copy once made every later change EEXIST), and nothing of it
/// is left in the upper or in the commit.
#[test]
fn a_copy_up_that_cannot_keep_the_entrys_attributes_is_undone() {
    if !fuse_available()
        || !common::require(common::is_root(), "root (to become uid 65534 with setpriv)")
        || !common::require(common::find_tool("setpriv").is_some(), "setpriv")
        || !common::require(
            common::find_tool("fusermount3").is_some(),
            "fusermount3 (apt install fuse3)",
        )
    {
        return;
    }
    let _device = common::DevFuseOpenToAll::new();
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let work = env.path("work");
    fs::create_dir_all(work.join("src/d")).unwrap();
    fs::write(work.join("src/capable"), b"cap\n").unwrap();
    fs::write(work.join("src/plain"), b"plain\n").unwrap();
    // A version-2 file capability: cap_net_raw permitted and effective (as ping has).
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    rustix::fs::setxattr(
        work.join("src/capable"),
        "security.capability",
        &cap,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let store = work.join("store");
    let out = Command::new(common::velo_bin())
        .arg("--store")
        .arg(&store)
        .args(["ingest", "--name", "t"])
        .arg(work.join("src"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = r#"
import errno, os
for attempt in range(3):
    try:
        with open("capable", "ab") as f:
            f.write(b"more")
        raise SystemExit("a write kept a capability it could not set")
    except PermissionError as e:
        assert e.errno == errno.EPERM, e
assert open("capable", "rb").read() == b"cap\n"
with open("plain", "ab") as f:
    f.write(b"more\n")
os.mkdir("d/new")
print("ok")
"#;
    fs::write(work.join("t.py"), script).unwrap();
    let velo = common::velo_bin();
    let run = format!(
        "set -e; w=\"$1\"; cd \"$w\"; v() {{ \"{}\" --store \"$w/store\" \"$@\"; }}; \
         mkdir m; v mount t m --upper up >/dev/null; \
         (cd m && python3 ../t.py) > out 2>&1 || status=$?; v commit m --name c >/dev/null; \
         v umount m; cat out; ls -A up; exit ${{status:-0}}",
        velo.display()
    );
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&work)
        .status()
        .unwrap();
    assert!(chown.success());
    let out = common::as_nobody()
        .args(["/bin/sh", "-c", &run, "sh"])
        .arg(&work)
        .env_remove("VR_THE_SOURCE")
        .env("HOME", &work)
        .output()
        .unwrap();
    // The upper holds the changed file and directory only.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\nd\nplain\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cat = |path: &str| {
        Command::new(common::velo_bin())
            .arg("--store")
            .arg(&store)
            .args(["cat", "c", path])
            .output()
            .unwrap()
            .stdout
    };
    assert_eq!(cat("capable"), b"cap\n");
    assert_eq!(cat("plain"), b"plain\nmore\n");
}

/// A server out of descriptors cannot keep an unlinked open file: the unlink fails, and
/// no program loses the bytes of a file it has open.
#[test]
fn an_unlink_the_server_cannot_keep_open_fails_and_loses_nothing() {
    if !fuse_available()
        || !common::require(
            common::find_tool("prlimit").is_some(),
            "prlimit (util-linux)",
        )
    {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("kept", b"kept\n")]);
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let out = Command::new("prlimit")
        .args(["--nofile=300:300", "--"])
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(["mount", "t"])
        .arg(&at)
        .env_remove("VR_THE_SOURCE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mounted = Mounted {
        env: &env,
        at: at.clone(),
    };
    let script = r#"
import errno, os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = 600
fds = [os.open("f%d" % i, os.O_CREAT | os.O_RDWR, 0o644) for i in range(n)]
for i, fd in enumerate(fds):
    os.pwrite(fd, b"data-%d" % i, 0)
refused = []
for i in range(n):
    try:
        os.unlink("f%d" % i)
    except OSError as e:
        assert e.errno in (errno.EMFILE, errno.ENFILE), e
        refused.append(i)
assert refused, "the server kept 600 files open with 300 descriptors"
assert len(refused) < n, "no unlink succeeded"
for i, fd in enumerate(fds):
    os.pwrite(fd, b"more", 100)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    want = b"data-%d" % i
    assert os.pread(fd, len(want), 0) == want, i
    assert os.path.exists("f%d" % i) == (i in refused), i
    os.close(fd)
print("ok")
"#;
    python_prints(&at, script, "ok\n");
}
