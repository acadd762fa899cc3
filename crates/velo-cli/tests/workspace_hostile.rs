//! The agent workspace against hostile use: many branches at once on a server with few
//! descriptors, and programs in a branch trying to leave it. Needs /dev/fuse and either
//! root or fusermount3: elsewhere the tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fuse_available, Env, Mounted};

/// `velo workspace init WS --from TREE --mount MNT EXTRA` run by `sh -c 'PREFIX; exec
/// velo ...'` (the server inherits what PREFIX sets); unmounted when the guard goes.
fn workspace_with<'a>(
    env: &'a Env,
    tree: &str,
    prefix: &str,
    extra: &[&str],
) -> (PathBuf, Mounted<'a>) {
    let ws = env.path("ws");
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{prefix}; exec \"$@\""))
        .arg("sh")
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(["workspace", "init"])
        .arg(&ws)
        .args(["--from", tree, "--mount"])
        .arg(&at)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "workspace init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (ws, Mounted { env, at })
}

fn in_ws(env: &Env, ws: &Path, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.insert(1, "--workspace");
    all.insert(2, ws.to_str().unwrap());
    env.ok(&all)
}

fn branch_dir(at: &Path, name: &str) -> PathBuf {
    at.join(".velo/branches").join(name)
}

#[test]
fn many_branches_never_run_a_server_with_few_descriptors_out_of_them() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let files: Vec<(String, Vec<u8>)> = (0..150)
        .map(|i| (format!("t/f{i}"), format!("tree {i}\n").into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    common::ingest_files(&env, "t", &refs);
    // Each branch's caches once kept up to 4,096 directories and 1,024 blobs open: a
    // few branches ran a server with 256 descriptors out of them (EMFILE).
    let (ws, mounted) = workspace_with(&env, "t", "ulimit -n 256", &[]);
    let at = mounted.at.clone();
    let mut roots = vec![at.clone()];
    for b in 0..8 {
        let name = format!("b{b}");
        in_ws(&env, &ws, &["branch", "create", &name]);
        roots.push(branch_dir(&at, &name));
    }
    for (b, root) in roots.iter().enumerate() {
        for i in 0..40 {
            let dir = root.join(format!("d{i}/e"));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let file = dir.join("f");
            fs::write(&file, format!("{b} {i}\n"))
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
        for (path, bytes) in &files {
            let file = root.join(path);
            let read = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(&read, bytes, "{}", file.display());
        }
    }
    // Everything made is still there and each branch's own.
    for (b, root) in roots.iter().enumerate() {
        for i in 0..40 {
            let file = root.join(format!("d{i}/e/f"));
            let read = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(read, format!("{b} {i}\n").into_bytes());
        }
    }
    drop(mounted);
    env.fsck_ok();
}

fn sh(script: &str) -> std::process::Output {
    Command::new("sh").args(["-c", script]).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The shell words that run `velo` on this test's store and workspace `ws`.
fn velo_in(env: &Env, ws: &Path) -> String {
    format!(
        "{} --store {} branch -w {}",
        common::velo_bin().display(),
        env.store.display(),
        ws.display()
    )
}

#[test]
fn branch_exec_never_leaves_its_command_in_a_directory_of_another_branch() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace_with(&env, "t", "true", &[]);
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    in_ws(&env, &ws, &["branch", "create", "c"]);
    fs::create_dir(at.join("only-main")).unwrap();
    fs::write(at.join("only-main/f"), b"main's\n").unwrap();
    fs::create_dir(branch_dir(&at, "c").join("only-c")).unwrap();
    fs::write(branch_dir(&at, "c").join("only-c/f"), b"c's\n").unwrap();
    // Started in a directory branch b does not have (main's, or c's): the command must
    // not run on in that directory, reading and writing another branch as b.
    for dir in [at.join("only-main"), branch_dir(&at, "c").join("only-c")] {
        let out = Command::new(common::velo_bin())
            .arg("--store")
            .arg(&env.store)
            .args(["branch", "-w", ws.to_str().unwrap(), "exec", "b", "--"])
            .args(["sh", "-c", "cat f; echo leak > from-b"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            !text(&out.stdout).contains("'s"),
            "{}: read {}",
            dir.display(),
            text(&out.stdout)
        );
        assert!(!dir.join("from-b").exists(), "{}", dir.display());
        assert!(!out.status.success(), "{}", dir.display());
        assert!(
            text(&out.stderr).contains("working directory"),
            "{}",
            text(&out.stderr)
        );
    }
    // Started in a directory b has too (at the top, or under .velo/branches/b), it runs
    // there, in b.
    fs::write(branch_dir(&at, "b").join("f"), b"b's own\n").unwrap();
    for dir in [at.clone(), branch_dir(&at, "b")] {
        let out = Command::new(common::velo_bin())
            .arg("--store")
            .arg(&env.store)
            .args(["branch", "-w", ws.to_str().unwrap(), "exec", "b", "--"])
            .args(["sh", "-c", "cat f; pwd"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(
            text(&out.stdout),
            format!("b's own\n{}\n", at.display()),
            "{}",
            text(&out.stderr)
        );
    }
    drop(mounted);
}

#[test]
fn a_directory_renamed_into_itself_through_two_views_changes_nothing() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(
        &env,
        "t",
        &[("a/sub/x/gone", b"deleted\n"), ("a/keep", b"keep\n")],
    );
    let (ws, mounted) = workspace_with(&env, "t", "true", &["--bindable"]);
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    let b = branch_dir(&at, "b");
    fs::remove_file(b.join("a/sub/x/gone")).unwrap();
    // Bound to b, the shell reaches b's `a` at the top (alias numbers) and its `a/sub/x`
    // under .velo/branches/b: the kernel sees no ancestry between them.
    let out = sh(&format!(
        "{velo} bind b --pid $$ >/dev/null && python3 -c 'import os,sys; os.rename(sys.argv[1], sys.argv[2])' {at}/a {bx}",
        velo = velo_in(&env, &ws),
        at = at.display(),
        bx = b.join("a/sub/x").display(),
    ));
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Invalid argument"),
        "{}",
        text(&out.stderr)
    );
    // Nothing moved, and what b deleted stays deleted.
    assert_eq!(fs::read(b.join("a/keep")).unwrap(), b"keep\n");
    assert!(!b.join("a/sub/x/gone").exists());
    assert_eq!(fs::read_dir(b.join("a/sub/x")).unwrap().count(), 0);
    drop(mounted);
    env.fsck_ok();
}

/// A program holding every control connection of the server (64) makes the commands that
/// need the server wait a little, then say it is busy; before, they went on without it
/// and reported its upper as used by "another run".
#[test]
fn a_server_whose_control_connections_are_all_taken_is_reported_busy() {
    use std::os::linux::net::SocketAddrExt;
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("a", b"a\n")]);
    let (ws, mounted) = workspace_with(&env, "t", "true", &[]);
    // Something to seal: an empty upper is sealed without the server.
    fs::write(mounted.at.join("b"), "b\n").unwrap();
    // The server's socket is named after its mount's source, `velo-<name>`.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let at = mounted.at.to_str().unwrap().to_string();
    let source = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(at.as_str()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').nth(1))
        .expect("the mount is listed")
        .to_string();
    let name = source.strip_prefix("velo-").expect("a velo mount");
    let address =
        std::os::unix::net::SocketAddr::from_abstract_name(format!("velo-mount-{name}")).unwrap();
    let held: Vec<_> = (0..64)
        .map(|_| std::os::unix::net::UnixStream::connect_addr(&address).unwrap())
        .collect();
    let out = env
        .cmd()
        .args(["snapshot", "--workspace", ws.to_str().unwrap(), "create"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("busy"), "{said}");
    assert!(!said.contains("another run"), "{said}");
    drop(held);
    in_ws(&env, &ws, &["snapshot", "create"]);
    drop(mounted);
}

/// A workspace moved (`mv`) while its server runs: the commands say so and what to do;
/// before, `branch create` made a branch the server never served, and a snapshot said
/// the upper was used by another run.
#[test]
fn a_workspace_moved_while_served_is_reported_not_worked_around() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("a", b"a\n")]);
    let (ws, mounted) = workspace_with(&env, "t", "true", &[]);
    fs::write(mounted.at.join("b"), "b\n").unwrap();
    let moved = env.path("moved");
    fs::rename(&ws, &moved).unwrap();
    let w = moved.to_str().unwrap();
    for args in [
        &["branch", "--workspace", w, "create", "k2"][..],
        &["snapshot", "--workspace", w, "create"][..],
    ] {
        let said = env.fails(args);
        assert!(
            said.contains("was moved") && said.contains("velo umount"),
            "{said}"
        );
    }
    assert!(!moved.join("branches/k2").exists());
    env.ok(&["umount", mounted.at.to_str().unwrap()]);
    env.ok(&["workspace", "mount", w, mounted.at.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(mounted.at.join("b")).unwrap(), "b\n");
    in_ws(&env, &moved, &["snapshot", "create"]);
    drop(mounted);
}

/// A workspace made inside a velo mount (which refuses devices) could never record a
/// deletion: init refuses it up front; before, every later `rm` of a base file failed
/// with EPERM.
#[test]
fn a_workspace_on_a_file_system_without_whiteouts_is_refused_at_init() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("a", b"a\n")]);
    let at = env.path("outer");
    fs::create_dir_all(&at).unwrap();
    let outer = common::mount_with(&env, "t", &at, &[]);
    let inner = at.join("inner");
    let said = env.fails(&["workspace", "init", inner.to_str().unwrap(), "--from", "t"]);
    assert!(said.contains("whiteouts"), "{said}");
    assert!(!inner.exists(), "init left {}", inner.display());
    drop(outer);
}

/// Another user who may read the workspace but not its private branch directories sees
/// an error naming the one it cannot read; before, `branch list` called every branch
/// "interrupted" and told that user to delete it.
#[test]
fn branches_another_user_may_not_read_are_not_called_interrupted() {
    use std::os::unix::fs::PermissionsExt;
    if !common::require(common::is_root(), "root (to run a command as nobody)") {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("a", b"a\n")]);
    let ws = env.path("ws");
    env.ok(&["workspace", "init", ws.to_str().unwrap(), "--from", "t"]);
    in_ws(&env, &ws, &["branch", "create", "b1"]);
    // Everything readable but the branches' own (0700) directories.
    let status = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&env.store)
        .arg(ws.join("workspace.json"))
        .status()
        .unwrap();
    assert!(status.success());
    for dir in [
        env.path(""),
        ws.clone(),
        ws.join("branches"),
        ws.join("snapshots"),
    ] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = common::as_nobody()
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(["branch", "--workspace", ws.to_str().unwrap(), "list"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("Permission denied"), "{said}");
    assert!(!said.contains("interrupted"), "{said}");
}

/// What an init killed half-way leaves (its directories, no record) is named as such
/// when init runs again, with what to do.
#[test]
fn an_init_killed_half_way_is_named_when_init_runs_again() {
    let env = Env::new();
    common::ingest_files(&env, "t", &[("a", b"a\n")]);
    let ws = env.path("ws");
    fs::create_dir_all(ws.join("branches/main/upper")).unwrap();
    fs::create_dir_all(ws.join("snapshots")).unwrap();
    let said = env.fails(&["workspace", "init", ws.to_str().unwrap(), "--from", "t"]);
    assert!(said.contains("an init that was killed"), "{said}");
    fs::remove_dir_all(&ws).unwrap();
    env.ok(&["workspace", "init", ws.to_str().unwrap(), "--from", "t"]);
}
