//! Real software on a read-write `velo mount`: tar unpacking a real source tree while
//! another process writes elsewhere on the mount (and times before 1970); git (init,
//! clone, commit, gc, fsck, and a repository that came with the tree); make of a real C
//! project (mtimes decide what is rebuilt); python's venv, compileall and `__pycache__`;
//! pip installing and uninstalling packages in a venv;
//! and a server killed with -9 over a kept `--upper`, whose fsynced writes and renames
//! survive. Each test commits what the mount shows and checks the committed tree, checked
//! out, against it.
//!
//! Every command that touches the mount runs with a deadline: a server that hangs (an
//! earlier FUSE file system deadlocked under tar and a concurrent writer) fails the test,
//! naming what its threads wait in, instead of hanging the run. Needs /dev/fuse and root
//! or fusermount3: elsewhere the tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{fuse_available, mount_with, server_pid, Env, Mounted};

/// Whether `at` is a mount whose server is gone: listing it fails with ENOTCONN (opening
/// it may still succeed, without a request to the server).
fn is_dead_mount(at: &Path) -> bool {
    let dead = |e: std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    match fs::read_dir(at) {
        Err(e) => dead(e),
        Ok(mut entries) => entries.next().is_some_and(|e| e.is_err_and(dead)),
    }
}

/// What each thread of the server at `at` waits in (its kernel stack where readable).
fn server_threads(at: &Path) -> String {
    let Some(pid) = server_pid(at) else {
        return "no server process".into();
    };
    let mut text = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("server {pid}: no /proc entry");
    };
    for task in tasks.flatten() {
        let p = task.path();
        let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
        text.push_str(&format!(
            "thread {} {} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("stack")
        ));
    }
    text
}

/// How long a command on the mount may take before the test calls the server hung.
/// Generous: every one of them takes seconds.
const DEADLINE: Duration = Duration::from_secs(240);

/// Runs `cmd` (stdin closed, output captured) and returns its output; when it outlives
/// [`DEADLINE`], kills the server of the mount at `at` (which ends the command: the mount
/// answers ENOTCONN) and fails, naming what the server's threads waited in. The command
/// is started on a thread of its own too: starting it waits for its exec, which waits for
/// its chdir into the mount.
fn bounded(mut cmd: Command, at: &Path) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.spawn().and_then(|child| child.wait_with_output()));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap_or_else(|e| panic!("running {what}: {e}")),
        Err(_) => {
            let threads = server_threads(at);
            if let Some(pid) = server_pid(at) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            panic!("{what} did not finish within {DEADLINE:?}: the server hung. Its threads:\n{threads}");
        }
    }
}

/// `sh -c SCRIPT` in `dir` as a `Command`, for callers that add to its environment.
fn shell(dir: &Path, script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir);
    cmd
}

/// Asserts that a command succeeded; returns its stdout.
fn stdout_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -c SCRIPT` in `dir` (on the mount at `at`), asserting success; returns stdout.
fn sh(at: &Path, dir: &Path, script: &str) -> String {
    stdout_ok(&bounded(shell(dir, script), at), script)
}

/// Runs `program args` natively (off the mount) in `dir`, asserting success.
fn native(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    stdout_ok(&out, &format!("{program} {args:?} in {}", dir.display()))
}

/// Two scans hold the same paths with the same kind, mode, size, mtime (ns), contents
/// and symlink targets; names the first few differences instead of printing both.
fn assert_same_entries(
    got: &std::collections::BTreeMap<Vec<u8>, common::Meta>,
    want: &std::collections::BTreeMap<Vec<u8>, common::Meta>,
    what: &str,
) {
    let mut differences = Vec::new();
    for (path, m) in want {
        match got.get(path) {
            None => differences.push(format!("missing {}", String::from_utf8_lossy(path))),
            Some(g) if g != m => differences.push(format!(
                "{}: {g:?}, want {m:?}",
                String::from_utf8_lossy(path)
            )),
            Some(_) => {}
        }
    }
    for path in got.keys().filter(|p| !want.contains_key(*p)) {
        differences.push(format!("extra {}", String::from_utf8_lossy(path)));
    }
    let n = differences.len();
    differences.truncate(10);
    assert!(
        n == 0,
        "{what}: {n} differences:\n{}",
        differences.join("\n")
    );
}

/// Bytes of `path` in `tree` (`velo cat`).
fn cat_bytes(env: &Env, tree: &str, path: &str) -> Vec<u8> {
    let out = env.run(&["cat", tree, path]);
    assert!(
        out.status.success(),
        "velo cat {tree} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `velo checkout TREE DIR --mode copy` (files with the tree's exact modes); returns DIR.
fn checkout_copy(env: &Env, tree: &str, name: &str) -> PathBuf {
    let dir = env.path(name);
    env.ok(&["checkout", tree, dir.to_str().unwrap(), "--mode", "copy"]);
    dir
}

/// `velo umount MOUNTPOINT --name NAME`, after scanning what the mount shows; the
/// committed tree, checked out with exact modes, shows the same entries (kinds, modes,
/// sizes, mtimes, bytes, symlink targets). Returns the checkout.
fn umount_committed(env: &Env, mounted: Mounted, name: &str) -> PathBuf {
    let shown = common::scan(&mounted.at);
    mounted.umount(&["--name", name]);
    let co = checkout_copy(env, name, &format!("co-{name}"));
    assert_same_entries(
        &common::scan(&co),
        &shown,
        &format!("the committed tree {name} against what the mount showed"),
    );
    co
}

/// A tree with one file, to mount and write into.
fn small_tree(env: &Env, name: &str) {
    let src = env.path(&format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("README"), "a mounted tree\n").unwrap();
    env.ingest(&src, &["--name", name]);
}

// ---------------------------------------------------------------------------------------
// 1. tar onto the mount while another process writes there.

/// A real source tree of well over a thousand files: the kernel's UAPI headers and
/// glibc's multiarch headers (linux-libc-dev and libc6-dev, which scripts/test.sh
/// installs with gcc), /usr/share/perl5 (libdpkg-perl, debconf), and what those lack: a
/// hard link, relative and dangling symlinks, an empty directory, an executable and a
/// read-only file, a file with nanoseconds in its mtime. (Times before 1970 are in
/// [`tar_and_touch_keep_times_before_1970_on_the_mount`].)
fn header_tree(dest: &Path) -> bool {
    let include = Path::new("/usr/include");
    if !common::require(
        include.join("linux/fs.h").is_file()
            && include.join("asm-generic/errno.h").is_file()
            && Path::new("/usr/share/perl5/Dpkg.pm").is_file(),
        "/usr/include/linux (libc6-dev) and /usr/share/perl5 (libdpkg-perl)",
    ) {
        return false;
    }
    fs::create_dir_all(dest.join("include")).unwrap();
    common::cp("-a", &include.join("linux"), &dest.join("include/linux"));
    common::cp(
        "-a",
        &include.join("asm-generic"),
        &dest.join("include/asm-generic"),
    );
    // The multiarch directory (x86_64-linux-gnu, aarch64-linux-gnu, ...): bits/, sys/,
    // gnu/, asm/.
    for entry in fs::read_dir(include).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains("-linux-gnu") && entry.path().join("bits").is_dir() {
            common::cp("-a", &entry.path(), &dest.join("include").join(&name));
        }
    }
    common::cp("-a", Path::new("/usr/share/perl5"), &dest.join("perl5"));
    let extra = dest.join("extra");
    fs::create_dir_all(extra.join("empty/dir")).unwrap();
    fs::write(extra.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(extra.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(extra.join("readonly"), "ro\n").unwrap();
    fs::set_permissions(extra.join("readonly"), fs::Permissions::from_mode(0o444)).unwrap();
    fs::write(extra.join("linked"), "two names\n").unwrap();
    fs::hard_link(extra.join("linked"), extra.join("linked-too")).unwrap();
    std::os::unix::fs::symlink("../include/linux/fs.h", extra.join("fs.h")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", extra.join("dangling")).unwrap();
    let big: Vec<u8> = (0..(3 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(extra.join("big.bin"), &big).unwrap();
    common::touch_ns(&extra.join("big.bin"), 1_600_000_000, 123_456_789);
    true
}

#[test]
fn tar_unpacks_a_real_source_tree_onto_the_mount_while_another_process_writes_there() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("headers");
    if !header_tree(&src) {
        return;
    }
    let want = common::scan(&src);
    let files = want.values().filter(|m| m.kind == "file").count();
    assert!(files > 1000, "well over a thousand files: {files}");
    // pax keeps mtimes to the nanosecond; sorted by name, so that two archives of equal
    // trees list the same members in the same order (and the same hard link first).
    let archive = env.path("headers.tar");
    native(
        &src,
        "tar",
        &[
            "--format=posix",
            "--sort=name",
            "-cf",
            archive.to_str().unwrap(),
            ".",
        ],
    );

    small_tree(&env, "t");
    let at = env.path("mnt");
    let _mounted = mount_with(&env, "t", &at, &[]);
    fs::create_dir_all(at.join("out")).unwrap();
    fs::create_dir_all(at.join("busy")).unwrap();
    // The writer: rewrites, reads back and deletes files and renames and removes a
    // directory in busy/, until tar is done (and at least 200 rounds); a reader lists
    // out/ (lookups and listings of the directories tar fills) until then. tar starts once
    // the writer has written; when it has reached include/linux (its largest directory),
    // `velo commit` seals the mount (holding off every change until the upper is read).
    let stop = env.path("stop");
    let rounds = env.path("rounds");
    let script = format!(
        r#"set -e
(
  i=0
  while [ ! -e '{stop}' ] || [ $i -lt 200 ]; do
    i=$((i + 1)); n=$((i % 64))
    echo "$i" > busy/f$n
    got=$(cat busy/f$n)
    [ "$got" = "$i" ] || {{ echo "busy/f$n holds $got, not $i" >&2; exit 1; }}
    if [ $((i % 3)) = 0 ]; then rm -f busy/f$(((i + 32) % 64)); fi
    if [ $((i % 5)) = 0 ]; then
      mkdir busy/d; echo "$i" > busy/d/x; mv busy/d busy/e; rm -r busy/e
    fi
  done
  echo $i > '{rounds}'
) &
writer=$!
(
  while [ ! -e '{stop}' ]; do ls -lR out > /dev/null; done
) &
reader=$!
while [ ! -e busy/f1 ]; do sleep 0.01; done
tar -C out -xf '{archive}' &
untar=$!
while [ ! -e out/include/linux ] && kill -0 $untar 2> /dev/null; do sleep 0.01; done
"$VELO" --store "$VELO_STORE" commit . --name midway > /dev/null
wait $untar
touch '{stop}'
wait $writer
wait $reader
"#,
        stop = stop.display(),
        rounds = rounds.display(),
        archive = archive.display(),
    );
    let mut cmd = shell(&at, &script);
    cmd.env("VELO", common::velo_bin())
        .env("VELO_STORE", &env.store)
        .env_remove("VR_THE_SOURCE")
        .env_remove("VRIFT_DEBUG");
    stdout_ok(
        &bounded(cmd, &at),
        "tar x with a writer, a reader and a commit",
    );
    let rounds: u64 = fs::read_to_string(&rounds).unwrap().trim().parse().unwrap();
    assert!(rounds >= 200, "{rounds}");

    // What tar unpacked is the source: names, kinds, modes, sizes, mtimes (ns), bytes,
    // symlink targets; the hard link is one inode with two names.
    assert_same_entries(
        &common::scan(&at.join("out")),
        &want,
        "tar x onto the mount",
    );
    let (a, b) = (
        fs::metadata(at.join("out/extra/linked")).unwrap(),
        fs::metadata(at.join("out/extra/linked-too")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "the hard link");
    // tar c of the mount lists the same members with the same types, modes, owners,
    // sizes, times and link targets as the source's archive; unpacked off the mount it
    // is the source, byte for byte.
    let back = env.path("back.tar");
    sh(
        &at,
        &at.join("out"),
        &format!("tar --format=posix --sort=name -cf '{}' .", back.display()),
    );
    let list = |tar: &Path| {
        native(
            &env.path(""),
            "tar",
            &["-tvf", tar.to_str().unwrap(), "--full-time"],
        )
    };
    let (got_list, want_list) = (list(&back), list(&archive));
    assert_eq!(
        got_list.lines().count(),
        want_list.lines().count(),
        "tar t line counts"
    );
    for (g, w) in got_list.lines().zip(want_list.lines()) {
        assert_eq!(g, w, "tar tv of the mount against the source's archive");
    }
    let unpacked = env.path("unpacked");
    fs::create_dir_all(&unpacked).unwrap();
    native(&unpacked, "tar", &["-xf", back.to_str().unwrap()]);
    native(
        &env.path(""),
        "diff",
        &["-r", "--no-dereference", "headers", "unpacked"],
    );
    assert_same_entries(
        &common::scan(&unpacked),
        &want,
        "tar x of tar c of the mount",
    );
    // The writer's files: each round number where it left it.
    let busy_now = common::scan(&at.join("busy"));
    assert!(!busy_now.is_empty());
    for (path, m) in &busy_now {
        let name = String::from_utf8_lossy(path).into_owned();
        let n: u64 = name.strip_prefix('f').unwrap().parse().unwrap();
        let text = fs::read_to_string(at.join("busy").join(&name)).unwrap();
        let i: u64 = text.trim().parse().unwrap();
        assert_eq!(i % 64, n, "busy/{name}: {text}");
        assert_eq!(m.kind, "file");
    }

    // velo commit seals it; the committed tree, checked out, is the source again, and
    // busy/ as the mount shows it.
    env.ok(&["commit", at.to_str().unwrap(), "--name", "unpacked"]);
    let co = checkout_copy(&env, "unpacked", "co");
    native(
        &env.path(""),
        "diff",
        &["-r", "--no-dereference", "headers", "co/out"],
    );
    assert_same_entries(&common::scan(&co.join("out")), &want, "the committed tree");
    assert_same_entries(
        &common::scan(&co.join("busy")),
        &busy_now,
        "the writer's files",
    );
    assert_eq!(fs::read(co.join("README")).unwrap(), b"a mounted tree\n");
    // The commit made while tar ran holds some of its files (a file tar was writing may
    // be partial), under the source's names only.
    let midway = common::listed(&env, "midway");
    let strange: Vec<String> = midway
        .keys()
        .filter_map(|p| p.strip_prefix(b"out/".as_slice()))
        .filter(|p| !want.contains_key(*p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(strange.is_empty(), "{strange:?}");
    assert!(midway.contains_key(b"busy".as_slice()) && midway.contains_key(b"README".as_slice()));
    // The mount goes on serving after the commit.
    assert_eq!(
        fs::read(at.join("out/include/linux/fs.h")).unwrap(),
        fs::read(src.join("include/linux/fs.h")).unwrap()
    );
    env.fsck_ok();
}

/// Times before 1970 with nanoseconds, as tar (from a pax archive), touch and python set
/// them on the mount, stat shows them, and the commit records them.
#[test]
fn tar_and_touch_keep_times_before_1970_on_the_mount() {
    if !fuse_available() {
        return;
    }
    let Some(python) = python_bin() else {
        return;
    };
    let env = Env::new();
    let src = env.path("old");
    fs::create_dir_all(&src).unwrap();
    // (seconds, nanoseconds) of each file's mtime.
    let times: [(&str, i64, u64); 4] = [
        ("a-year-before", -86_400 * 365, 5),
        ("just-before", -1, 999_999_999),
        ("whole-second", -86_400, 0),
        ("after", 86_400, 250_000_000),
    ];
    for (name, sec, nsec) in times {
        fs::write(src.join(name), name).unwrap();
        common::touch_ns(&src.join(name), sec, nsec);
    }
    let want = common::scan(&src);
    let archive = env.path("old.tar");
    native(
        &src,
        "tar",
        &["--format=posix", "-cf", archive.to_str().unwrap(), "."],
    );
    small_tree(&env, "t");
    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &[]);
    fs::create_dir_all(at.join("tar")).unwrap();
    sh(
        &at,
        &at.join("tar"),
        &format!("tar -xf '{}'", archive.display()),
    );
    // The same times set with touch -d and with os.utime (utimensat, as tar does).
    fs::create_dir_all(at.join("set")).unwrap();
    let mut script = String::from("import os\n");
    for (name, sec, nsec) in times {
        fs::write(at.join("set").join(name), name).unwrap();
        let ns = i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        script.push_str(&format!("os.utime('set/{name}', ns=({ns}, {ns}))\n"));
    }
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(&script).current_dir(&at);
    stdout_ok(&bounded(cmd, &at), "os.utime");
    let mtimes = |dir: &Path| -> Vec<(String, i64)> {
        times
            .iter()
            .map(|(name, _, _)| {
                let m = fs::symlink_metadata(dir.join(name)).unwrap();
                (name.to_string(), m.mtime() * 1_000_000_000 + m.mtime_nsec())
            })
            .collect()
    };
    let expected: Vec<(String, i64)> = times
        .iter()
        .map(|(name, sec, nsec)| (name.to_string(), sec * 1_000_000_000 + *nsec as i64))
        .collect();
    assert_eq!(mtimes(&src), expected, "the source's own times");
    assert_eq!(mtimes(&at.join("tar")), expected, "tar x onto the mount");
    assert_eq!(mtimes(&at.join("set")), expected, "os.utime on the mount");
    assert_same_entries(
        &common::scan(&at.join("tar")),
        &want,
        "tar x onto the mount",
    );
    let co = umount_committed(&env, mounted, "old");
    assert_eq!(mtimes(&co.join("tar")), expected, "the committed tree");
    assert_eq!(mtimes(&co.join("set")), expected, "the committed tree");
}

// ---------------------------------------------------------------------------------------
// 2. git on the mount.

fn git_bin() -> Option<PathBuf> {
    let found = common::find_tool("git");
    if !common::require(found.is_some(), "git (scripts/test.sh installs it)") {
        return None;
    }
    found
}

/// `sh -c SCRIPT` in `dir` with `$GIT` (git with a fixed identity, no system or user
/// configuration), asserting success; returns stdout.
fn git_sh(env: &Env, git: &Path, at: &Path, dir: &Path, script: &str) -> String {
    let home = env.path("home");
    fs::create_dir_all(&home).unwrap();
    let mut cmd = shell(dir, script);
    cmd.env(
        "GIT",
        format!(
            "{} -c user.name=Tester -c user.email=t@example.com -c init.defaultBranch=main",
            git.display()
        ),
    )
    .env("HOME", &home)
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env_remove("GIT_DIR")
    .env_remove("GIT_WORK_TREE");
    stdout_ok(&bounded(cmd, at), script)
}

#[test]
fn git_init_commit_clone_gc_and_fsck_all_on_the_mount() {
    if !fuse_available() {
        return;
    }
    let Some(git) = git_bin() else {
        return;
    };
    let env = Env::new();
    small_tree(&env, "t");
    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &[]);
    let run = |dir: &str, script: &str| git_sh(&env, &git, &at, &at.join(dir), script);

    // A repository made on the mount: files, an executable, a symlink, 300 small files
    // (loose objects in many fan-out directories).
    run(
        "",
        "set -e; mkdir repo; cd repo; $GIT init -q; mkdir -p src/deep many; \
         echo 'a repository' > README; echo 'int a(void) { return 1; }' > src/a.c; \
         echo 'int b(void) { return 2; }' > src/deep/b.c; \
         printf '#!/bin/sh\\necho run\\n' > run.sh; chmod +x run.sh; ln -s src/a.c a-link; \
         for i in $(seq 300); do echo \"file $i\" > many/f$i; done; \
         $GIT add -A; $GIT commit -qm one",
    );
    assert_eq!(run("repo", "$GIT status --porcelain"), "");
    assert_eq!(
        run(
            "repo",
            "$GIT count-objects -v | grep -E '^(count|in-pack):'"
        ),
        "count: 310\nin-pack: 0\n",
        "loose objects: 305 blobs, 4 trees, a commit"
    );
    // A clone on the mount (a local clone hard-links the objects), clean; edited and
    // committed there.
    run("", "$GIT clone -q repo clone");
    assert_eq!(run("clone", "$GIT status --porcelain"), "");
    assert_eq!(
        run("clone", "$GIT ls-files -s run.sh a-link | cut -c1-6"),
        "120000\n100755\n",
        "the symlink and the executable, as checked out on the mount"
    );
    assert_eq!(run("clone", "readlink a-link; ./run.sh"), "src/a.c\nrun\n");
    run(
        "clone",
        "set -e; echo 'int a(void) { return 10; }' > src/a.c; echo new > new.txt; \
         $GIT rm -q many/f1 many/f2; mv src/deep/b.c src/deep/c.c; \
         $GIT add -A; $GIT commit -qm two",
    );
    assert_eq!(run("clone", "$GIT status --porcelain"), "");
    // gc packs everything (writes the pack and its index under temporary names, renames
    // them, deletes the loose objects); fsck reads it all back.
    run("clone", "$GIT gc -q");
    assert_eq!(
        run("clone", "$GIT count-objects -v | grep -E '^(count|packs):'"),
        "count: 0\npacks: 1\n"
    );
    assert_eq!(
        run("clone", "$GIT fsck --full --strict --no-progress 2>&1"),
        ""
    );
    assert_eq!(
        run(
            "clone",
            "$GIT log --format=%s; $GIT show HEAD:src/a.c; $GIT diff --stat HEAD~1 | tail -1"
        ),
        "two\none\nint a(void) { return 10; }\n \
         5 files changed, 2 insertions(+), 3 deletions(-)\n"
    );
    // Back into the first repository: fetch from the clone, fast-forward, gc --aggressive,
    // fsck.
    run(
        "repo",
        "set -e; $GIT pull -q --ff-only ../clone main; $GIT gc -q --aggressive --prune=now",
    );
    assert_eq!(run("repo", "$GIT status --porcelain"), "");
    assert_eq!(
        run("repo", "$GIT fsck --full --strict --no-progress 2>&1"),
        ""
    );
    let head = run("repo", "$GIT rev-parse HEAD");
    assert_eq!(run("clone", "$GIT rev-parse HEAD"), head);
    assert_eq!(
        run("repo", "cat src/a.c; ls src/deep"),
        "int a(void) { return 10; }\nc.c\n"
    );

    // Committed with the unmount: both repositories, checked out, are sound and clean.
    let co = umount_committed(&env, mounted, "repos");
    let g = |dir: &str, script: &str| git_sh(&env, &git, &co, &co.join(dir), script);
    for dir in ["repo", "clone"] {
        assert_eq!(
            g(
                dir,
                "$GIT status --porcelain; $GIT log --format=%s; $GIT rev-parse HEAD"
            ),
            format!("two\none\n{head}"),
            "{dir}"
        );
        assert_eq!(
            g(dir, "$GIT fsck --full --strict --no-progress 2>&1"),
            "",
            "{dir}"
        );
    }
    env.fsck_ok();
}

#[test]
fn git_in_a_repository_that_came_with_the_tree_is_clean_on_the_mount_and_commits_there() {
    if !fuse_available() {
        return;
    }
    let Some(git) = git_bin() else {
        return;
    };
    let env = Env::new();
    // The repository is made natively, with packed and loose objects, and ingested with
    // its .git.
    let repo = env.path("repo");
    fs::create_dir_all(repo.join("src/deep")).unwrap();
    let native_git = |dir: &Path, script: &str| git_sh(&env, &git, dir, dir, script);
    native_git(
        &repo,
        "set -e; $GIT init -q; echo 'a repository' > README; \
         echo 'int a(void) { return 1; }' > src/a.c; echo 'int b(void) { return 2; }' > src/deep/b.c; \
         printf '#!/bin/sh\\necho run\\n' > run.sh; chmod +x run.sh; ln -s src/a.c a-link; \
         $GIT add -A; $GIT commit -qm one; echo 'int c(void) { return 3; }' > src/c.c; \
         $GIT add -A; $GIT commit -qm two; $GIT gc -q; echo more >> README; $GIT commit -qam three",
    );
    assert_eq!(native_git(&repo, "$GIT status --porcelain"), "");
    let head = native_git(&repo, "$GIT rev-parse HEAD");
    env.ingest(&repo, &["--name", "repo"]);

    let at = env.path("mnt");
    let mounted = mount_with(&env, "repo", &at, &[]);
    let run = |script: &str| git_sh(&env, &git, &at, &at, script);
    // The index's stat data (inode numbers, device, ctime) do not match the mount's: git
    // re-reads the files, finds them unchanged, and rewrites the index on the mount.
    assert_eq!(run("$GIT status --porcelain"), "");
    assert_eq!(run("$GIT status --porcelain"), "");
    assert_eq!(
        run("$GIT rev-parse HEAD; $GIT log --format=%s | tr '\\n' ' '"),
        format!("{head}three two one ")
    );
    assert_eq!(
        run("echo edit >> src/a.c; rm src/c.c; echo new > new.txt; $GIT status --porcelain"),
        " M src/a.c\n D src/c.c\n?? new.txt\n"
    );
    run("set -e; $GIT add -A; $GIT commit -qm four; $GIT gc -q --prune=now");
    assert_eq!(run("$GIT status --porcelain"), "");
    assert_eq!(run("$GIT fsck --full --strict --no-progress 2>&1"), "");
    assert_eq!(
        run("$GIT log --format=%s | tr '\\n' ' '; $GIT rev-parse HEAD~1"),
        format!("four three two one {head}")
    );

    // git rewrote refs/heads/main by renaming main.lock over the tree's file, and gc's
    // pack-refs then deleted it: the deletion must reach the upper as a whiteout, or the
    // commit brings back the tree's ref (commit "three") and HEAD moves back.
    let head = run("$GIT rev-parse HEAD");
    let co = umount_committed(&env, mounted, "committed");
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "committed", "src/a.c")).unwrap(),
        "int a(void) { return 1; }\nedit\n"
    );
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "committed", "new.txt")).unwrap(),
        "new\n"
    );
    assert!(!env.ok(&["ls", "committed", "src"]).contains("c.c"));
    // The committed repository, checked out, is sound and clean.
    let g = |script: &str| git_sh(&env, &git, &co, &co, script);
    assert_eq!(g("$GIT rev-parse HEAD"), head);
    assert_eq!(g("$GIT status --porcelain"), "");
    assert_eq!(g("$GIT fsck --full --strict --no-progress 2>&1"), "");
    assert_eq!(g("$GIT log --format=%s | head -1"), "four\n");
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// 3. make of a real C project on the mount.

/// The portable build (no assembly, no SIMD: the same on every architecture) as a
/// static library and the example program that hashes stdin.
const MAKEFILE: &str = "CFLAGS = -O1 -DBLAKE3_NO_SSE2 -DBLAKE3_NO_SSE41 -DBLAKE3_NO_AVX2 \
-DBLAKE3_NO_AVX512 -DBLAKE3_USE_NEON=0
LIB_OBJS = blake3.o blake3_dispatch.o blake3_portable.o

b3example: example.o libblake3.a
\t$(CC) -o $@ example.o libblake3.a

libblake3.a: $(LIB_OBJS)
\trm -f $@
\tar rcs $@ $(LIB_OBJS)

%.o: %.c blake3.h blake3_impl.h
\t$(CC) $(CFLAGS) -c -o $@ $<

clean:
\trm -f *.o libblake3.a b3example
";

#[test]
fn make_builds_a_real_c_project_on_the_mount_and_mtimes_decide_what_is_rebuilt() {
    if !fuse_available() {
        return;
    }
    let cc = common::find_tool("gcc").or_else(|| common::find_tool("cc"));
    let make = common::find_tool("make");
    let sources = common::blake3_c_sources();
    if !common::require(
        cc.is_some() && make.is_some() && sources.is_some(),
        "gcc, make (scripts/test.sh installs them) and the blake3 crate's C sources in the cargo registry",
    ) {
        return;
    }
    let sources = sources.unwrap();
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for name in [
        "blake3.c",
        "blake3.h",
        "blake3_impl.h",
        "blake3_dispatch.c",
        "blake3_portable.c",
        "example.c",
    ] {
        fs::copy(sources.join(name), src.join(name)).unwrap();
    }
    fs::write(src.join("Makefile"), MAKEFILE).unwrap();
    env.ingest(&src, &["--name", "src"]);
    let input = env.path("input");
    fs::write(&input, b"velo rift builds real software on its mount").unwrap();
    let want_hash = velo_core::Hash::of_blob(&fs::read(&input).unwrap()).to_hex();

    let at = env.path("mnt");
    let mounted = mount_with(&env, "src", &at, &[]);
    let make_q = |at: &Path| {
        bounded(
            {
                let mut c = Command::new("make");
                c.arg("-q").current_dir(at);
                c
            },
            at,
        )
        .status
        .code()
    };
    let built = sh(&at, &at, "make -j2 2>&1");
    assert!(built.contains("ar rcs libblake3.a"), "{built}");
    assert_eq!(
        sh(&at, &at, &format!("./b3example < '{}'", input.display())).trim(),
        want_hash,
        "the program built on the mount"
    );
    assert_eq!(make_q(&at), Some(0), "make -q: up to date after the build");
    // A touched source is newer than its object: make -q says so, and make rebuilds that
    // object, the library and the program, and nothing else.
    sh(&at, &at, "touch blake3_portable.c");
    assert_eq!(make_q(&at), Some(1), "make -q after touching a source");
    let rebuilt = sh(&at, &at, "make 2>&1");
    let compiled: Vec<&str> = rebuilt.lines().filter(|l| l.contains(" -c -o ")).collect();
    assert_eq!(compiled.len(), 1, "{rebuilt}");
    assert!(compiled[0].contains("blake3_portable.c"), "{rebuilt}");
    assert!(rebuilt.contains("-o b3example"), "{rebuilt}");
    assert_eq!(make_q(&at), Some(0), "make -q: up to date again");
    // A header every object depends on: all four are rebuilt.
    sh(&at, &at, "touch blake3.h");
    let rebuilt = sh(&at, &at, "make -j2 2>&1");
    assert_eq!(
        rebuilt.lines().filter(|l| l.contains(" -c -o ")).count(),
        4,
        "{rebuilt}"
    );
    assert_eq!(make_q(&at), Some(0));

    // Committed and mounted again: the times are the tree's, to the nanosecond, so the
    // build is still up to date there, and the program runs from the new mount.
    umount_committed(&env, mounted, "built");
    let shown = env.json(&["show", "built", "b3example"]);
    assert!(shown["mode"].as_u64().unwrap() & 0o111 != 0, "{shown}");
    let at2 = env.path("mnt2");
    let _mounted = mount_with(&env, "built", &at2, &[]);
    assert_eq!(make_q(&at2), Some(0), "make -q on the committed tree");
    assert_eq!(
        sh(&at2, &at2, &format!("./b3example < '{}'", input.display())).trim(),
        want_hash
    );
    assert_eq!(
        sh(
            &at2,
            &at2,
            "make -s clean && make -j2 >/dev/null 2>&1 && make -q && echo ok"
        ),
        "ok\n"
    );
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// 4. python: a venv, compileall and __pycache__ on the mount.

fn python_bin() -> Option<PathBuf> {
    // Debian's python (a pyenv shim on PATH may want a home of its own).
    let found = ["/usr/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| common::find_tool("python3"));
    if !common::require(found.is_some(), "python3 (scripts/test.sh installs it)") {
        return None;
    }
    found
}

const PY_FILES: &[(&str, &str)] = &[
    ("proj/pkg/__init__.py", "from .a import A\n"),
    ("proj/pkg/a.py", "A = 40\n"),
    ("proj/pkg/sub/__init__.py", ""),
    ("proj/pkg/sub/b.py", "from ..a import A\nB = A + 2\n"),
];

/// Imports pkg.sub.b with the venv's python (`-v`) in `at`; returns (stdout, the
/// modules loaded from `__pycache__`, the bytecode files written).
fn import_verbose(at: &Path) -> (String, Vec<String>, Vec<String>) {
    let mut cmd = Command::new(at.join("venv/bin/python"));
    cmd.args([
        "-v",
        "-c",
        "import os, sys; sys.path.insert(0, os.path.abspath('proj')); import pkg.sub.b; \
         print(pkg.sub.b.B, sys.prefix == sys.base_prefix, pkg.__file__)",
    ])
    .current_dir(at)
    .env_remove("PYTHONDONTWRITEBYTECODE")
    .env_remove("PYTHONPYCACHEPREFIX")
    .env_remove("PYTHONHOME")
    .env_remove("PYTHONPATH");
    let out = bounded(cmd, at);
    let stdout = stdout_ok(&out, "python -v import");
    let verbose = String::from_utf8_lossy(&out.stderr);
    let proj = format!("{}/proj/", at.display());
    let rel = |l: &str| -> Option<String> {
        let start = l.find(&proj)? + proj.len();
        Some(l[start..].trim_end_matches('\'').to_string())
    };
    let loaded: Vec<String> = verbose
        .lines()
        .filter(|l| l.starts_with("# code object from ") && l.ends_with(".pyc'"))
        .filter_map(rel)
        .collect();
    let written: Vec<String> = verbose
        .lines()
        .filter(|l| l.starts_with("# created "))
        .filter_map(rel)
        .collect();
    assert!(
        !verbose.contains("could not create"),
        "python could not write its bytecode:\n{verbose}"
    );
    (stdout, loaded, written)
}

#[test]
fn python_venv_compileall_and_pycache_work_on_the_mount() {
    if !fuse_available() {
        return;
    }
    let Some(python) = python_bin() else {
        return;
    };
    let env = Env::new();
    small_tree(&env, "t");
    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &[]);
    let mut venv = Command::new(&python);
    venv.args(["-m", "venv", "--without-pip", "venv"])
        .current_dir(&at);
    stdout_ok(&bounded(venv, &at), "python3 -m venv --without-pip");
    for (path, text) in PY_FILES {
        fs::create_dir_all(at.join(path).parent().unwrap()).unwrap();
        fs::write(at.join(path), text).unwrap();
    }
    let mut compile = Command::new(at.join("venv/bin/python"));
    compile
        .args(["-m", "compileall", "-q", "proj"])
        .current_dir(&at);
    stdout_ok(&bounded(compile, &at), "compileall");
    let tag = sh(
        &at,
        &at,
        "venv/bin/python -c 'import sys; print(sys.implementation.cache_tag)'",
    )
    .trim()
    .to_string();
    let pyc = |module: &str| -> String {
        let (dir, name) = module.rsplit_once('/').unwrap();
        format!("{dir}/__pycache__/{name}.{tag}.pyc")
    };
    let modules = ["pkg/__init__", "pkg/a", "pkg/sub/__init__", "pkg/sub/b"];
    for m in modules {
        assert!(at.join("proj").join(pyc(m)).is_file(), "{} missing", pyc(m));
    }
    // Every module comes from its bytecode; none is compiled again.
    let (out, loaded, written) = import_verbose(&at);
    assert_eq!(
        out,
        format!("42 False {}/proj/pkg/__init__.py\n", at.display()),
        "run in the venv"
    );
    let mut want: Vec<String> = modules.iter().map(|m| pyc(m)).collect();
    want.sort();
    let mut got = loaded.clone();
    got.sort();
    assert_eq!(got, want, "modules loaded from __pycache__");
    assert_eq!(written, Vec::<String>::new(), "nothing recompiled");
    // The bytecode records each source's mtime and size as the mount reports them.
    let check = "import importlib.util, os, struct, sys\n\
                 for src in sys.argv[1:]:\n\
                 \x20   pyc = importlib.util.cache_from_source(src)\n\
                 \x20   flags, mtime, size = struct.unpack('<4xIII', open(pyc, 'rb').read(16))\n\
                 \x20   st = os.stat(src)\n\
                 \x20   print(flags == 0, mtime == int(st.st_mtime) & 0xFFFFFFFF, size == st.st_size, \
                 os.stat(pyc).st_mtime_ns >= st.st_mtime_ns)\n";
    let mut cmd = Command::new(at.join("venv/bin/python"));
    cmd.arg("-c").arg(check).current_dir(&at);
    for m in modules {
        cmd.arg(format!("proj/{m}.py"));
    }
    assert_eq!(
        stdout_ok(&bounded(cmd, &at), "the pyc headers"),
        "True True True True\n".repeat(4)
    );
    // An edited source (its size changes) is stale: python recompiles that one module,
    // writes its bytecode, and loads the rest from __pycache__.
    fs::write(at.join("proj/pkg/a.py"), "A = 400\n").unwrap();
    let (out, loaded, written) = import_verbose(&at);
    assert!(out.starts_with("402 False"), "{out}");
    assert_eq!(written, vec![pyc("pkg/a")], "only the edited module");
    assert_eq!(loaded.len(), 3, "{loaded:?}");
    let (out, loaded, written) = import_verbose(&at);
    assert!(out.starts_with("402 False"), "{out}");
    assert_eq!(
        (loaded.len(), written.len()),
        (4, 0),
        "the new bytecode is used"
    );

    // Committed, and mounted again: the sources keep their mtimes, so the bytecode is
    // still valid there.
    umount_committed(&env, mounted, "py");
    let at2 = env.path("mnt2");
    let _mounted = mount_with(&env, "py", &at2, &[]);
    assert!(env.ok(&["ls", "py", "proj/pkg/__pycache__"]).contains(&tag));
    let (out, loaded, written) = import_verbose(&at2);
    assert_eq!(
        out,
        format!("402 False {}/proj/pkg/__init__.py\n", at2.display())
    );
    assert_eq!(
        (loaded.len(), written.len()),
        (4, 0),
        "{loaded:?} {written:?}"
    );
    env.fsck_ok();
}

/// Debian's wheels of pip and setuptools (python3-pip-whl, python3-setuptools-whl, which
/// python3-venv pulls in): what `python3 -m venv` installs pip from, offline.
const WHEELS: &str = "/usr/share/python-wheels";

/// The same pip session natively and on the mount: `python3 -m venv` (ensurepip: pip
/// installs itself, about a thousand files, and compiles them), `pip install` of the
/// setuptools wheel and of a local wheel with a console script, then `pip uninstall` of
/// setuptools (all offline).
const PIP_SESSION: &str = r#"set -e
"$PY" -m venv venv
venv/bin/python -m pip install -q --no-index --find-links "$WHEELS" --find-links "$LOCAL" setuptools mytool
venv/bin/mytool
venv/bin/python -m pip uninstall -q -y setuptools
venv/bin/python -c 'import importlib.util as u; print("setuptools gone:", u.find_spec("setuptools") is None)'
venv/bin/python -m pip list --format=freeze | sed 's/==.*//' | sort
"#;

/// Writes `mytool-1.0-py3-none-any.whl` (a module and a console script) into `dir`: a
/// wheel is a zip of the package and its `.dist-info`.
fn write_mytool_wheel(python: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let script = r#"
import sys, zipfile
files = {
    "mytool/__init__.py": "def main():\n    print('mytool 1.0 runs from', __file__.rsplit('/', 6)[-6])\n",
    "mytool-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: mytool\nVersion: 1.0\n",
    "mytool-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: velo-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    "mytool-1.0.dist-info/entry_points.txt": "[console_scripts]\nmytool = mytool:main\n",
}
files["mytool-1.0.dist-info/RECORD"] = "".join(f"{n},,\n" for n in files) + "mytool-1.0.dist-info/RECORD,,\n"
with zipfile.ZipFile(sys.argv[1] + "/mytool-1.0-py3-none-any.whl", "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    stdout_ok(&out, "making the mytool wheel");
}

/// What pip left under `venv/lib` (relative paths, bytecode aside: it records times).
fn installed(root: &Path) -> Vec<String> {
    let lib = root.join("venv/lib");
    let mut found: Vec<String> = common::scan(&lib)
        .into_keys()
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .filter(|p| !p.ends_with(".pyc"))
        .collect();
    found.sort();
    found
}

#[test]
fn pip_installs_and_uninstalls_packages_in_a_venv_on_the_mount() {
    if !fuse_available() {
        return;
    }
    let Some(python) = python_bin() else {
        return;
    };
    let has_wheels = fs::read_dir(WHEELS).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("setuptools-"))
    });
    if !common::require(
        has_wheels,
        "Debian's pip and setuptools wheels in /usr/share/python-wheels (python3-venv; scripts/test.sh installs it)",
    ) {
        return;
    }
    let env = Env::new();
    small_tree(&env, "t");
    let local = env.path("local-wheels");
    write_mytool_wheel(&python, &local);
    let session = |dir: &Path, at: &Path| -> String {
        let mut cmd = shell(dir, PIP_SESSION);
        cmd.env("PY", &python)
            .env("WHEELS", WHEELS)
            .env("LOCAL", &local)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("PIP_NO_CACHE_DIR", "1")
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env_remove("PYTHONDONTWRITEBYTECODE")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env_remove("VIRTUAL_ENV");
        stdout_ok(&bounded(cmd, at), "the pip session")
    };
    let native_dir = env.path("native");
    fs::create_dir_all(&native_dir).unwrap();
    let native_out = session(&native_dir, &native_dir);

    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &[]);
    let out = session(&at, &at);
    assert_eq!(
        out, "mytool 1.0 runs from venv\nsetuptools gone: True\nmytool\npip\n",
        "on the mount"
    );
    assert_eq!(out, native_out, "the same session natively");
    let on_mount = installed(&at);
    assert!(
        on_mount
            .iter()
            .any(|p| p.ends_with("site-packages/pip/__init__.py")),
        "{on_mount:?}"
    );
    assert_eq!(on_mount, installed(&native_dir), "what pip installed");

    // Committed: the checkout holds the same venv, and its python imports what pip put
    // there (a venv finds its packages relative to itself).
    let co = umount_committed(&env, mounted, "pip");
    assert_eq!(installed(&co), on_mount);
    let mut run = Command::new(co.join("venv/bin/python"));
    run.args(["-c", "import mytool, pip; mytool.main()"])
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME");
    assert_eq!(
        stdout_ok(&run.output().unwrap(), "the committed venv"),
        "mytool 1.0 runs from venv\n"
    );
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// 5. The server killed with -9: what was fsynced in the kept upper survives.

const CRASH_PY: &str = r#"
import os, sys
data = bytes((i * 2654435761 >> 13) & 0xFF for i in range(300_000))
fd = os.open('new.bin', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
os.write(fd, data)
os.fsync(fd)
os.close(fd)
with open('dir/appended', 'ab') as f:
    f.write(b'appended\n')
    f.flush()
    os.fsync(f.fileno())
os.rename('old-name', 'dir/new-name')
dfd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
os.close(dfd)
dfd = os.open('dir', os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
os.close(dfd)
print(len(data))
"#;

#[test]
fn fsynced_writes_and_renames_survive_a_server_killed_with_sigkill() {
    if !fuse_available() {
        return;
    }
    let Some(python) = python_bin() else {
        return;
    };
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("old-name"), "renamed file\n").unwrap();
    fs::write(src.join("dir/appended"), "tree line\n").unwrap();
    fs::write(src.join("keep"), "kept\n").unwrap();
    env.ingest(&src, &["--name", "t"]);
    let upper = env.path("upper");
    let at = env.path("mnt");
    let up = upper.to_str().unwrap();
    // (This guard cleans up if the test fails before the dead mount is unmounted.)
    let _first = mount_with(&env, "t", &at, &["--upper", up]);
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(CRASH_PY).current_dir(&at);
    assert_eq!(stdout_ok(&bounded(cmd, &at), "the writer"), "300000\n");
    let data: Vec<u8> = (0..300_000u64)
        .map(|i| ((i * 2654435761) >> 13) as u8)
        .collect();

    // SIGKILL: no unmount, no flush; the mount point is dead (ENOTCONN).
    let pid = server_pid(&at).expect("the server runs");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let dead = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        is_dead_mount(&at)
    });
    assert!(dead, "the mount did not die with its server");
    let out = env.run(&["umount", at.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "velo umount of the dead mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server died"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read_dir(&at).unwrap().next().is_none(),
        "the mount point is an empty directory again"
    );

    // Mounted again over the same upper: the fsynced bytes, the append and the rename.
    let mounted = mount_with(&env, "t", &at, &["--upper", up]);
    assert!(
        fs::read(at.join("new.bin")).unwrap() == data,
        "new.bin's bytes"
    );
    assert_eq!(
        fs::metadata(at.join("new.bin")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(
        fs::read_to_string(at.join("dir/appended")).unwrap(),
        "tree line\nappended\n"
    );
    assert_eq!(
        fs::read_to_string(at.join("dir/new-name")).unwrap(),
        "renamed file\n"
    );
    assert!(
        !at.join("old-name").exists(),
        "the rename's old name is gone"
    );
    assert_eq!(fs::read_to_string(at.join("keep")).unwrap(), "kept\n");
    let mut names: Vec<String> = fs::read_dir(&at)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["dir", "keep", "new.bin"]);
    env.fsck_ok();

    // Committed with the unmount.
    umount_committed(&env, mounted, "after");
    assert!(cat_bytes(&env, "after", "new.bin") == data);
    assert_eq!(cat_bytes(&env, "after", "dir/new-name"), b"renamed file\n");
    assert_eq!(
        cat_bytes(&env, "after", "dir/appended"),
        b"tree line\nappended\n"
    );
    assert_eq!(env.ok(&["ls", "after"]), "dir\nkeep\nnew.bin\n");
    assert_eq!(env.ok(&["ls", "after", "dir"]), "appended\nnew-name\n");
    env.fsck_ok();
}
