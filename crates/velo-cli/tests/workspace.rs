//! The agent workspace: `velo workspace`, `velo snapshot`, `velo branch`, and `velo diff`
//! of snapshots and branches, on the workspace's FUSE server. Needs /dev/fuse and either
//! root or fusermount3 (and for `branch exec` unprivileged, user namespaces): elsewhere
//! the tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fuse_available, Env, Mounted};

/// A workspace over tree `tree` at `ws`, mounted at `mnt`; unmounted when the guard goes.
fn workspace<'a>(env: &'a Env, tree: &str) -> (PathBuf, Mounted<'a>) {
    let ws = env.path("ws");
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    env.ok(&[
        "workspace",
        "init",
        ws.to_str().unwrap(),
        "--from",
        tree,
        "--mount",
        at.to_str().unwrap(),
    ]);
    (ws, Mounted { env, at })
}

/// `velo ARGS` with `--workspace WS` given to the subcommand.
fn in_ws(env: &Env, ws: &Path, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.insert(1, "--workspace");
    all.insert(2, ws.to_str().unwrap());
    env.ok(&all)
}

fn in_ws_json(env: &Env, ws: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = in_ws(env, ws, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn branch_dir(at: &Path, name: &str) -> PathBuf {
    at.join(".velo/branches").join(name)
}

/// `sh -c SCRIPT` in branch `name`, its stdout (asserting success).
fn exec_in(env: &Env, ws: &Path, name: &str, script: &str) -> String {
    let out = env
        .cmd()
        .args([
            "branch",
            "--workspace",
            ws.to_str().unwrap(),
            "exec",
            name,
            "--",
            "sh",
            "-c",
        ])
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "branch exec {name} {script}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_snapshot_is_sealed_and_a_branch_made_from_it_later_reads_the_old_bytes() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("doc.txt", b"v1\n"), ("d/keep", b"k\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    fs::write(at.join("doc.txt"), b"v2\n").unwrap();
    let snap = in_ws_json(&env, &ws, &["snapshot", "create", "-m", "two"]);
    let id = snap["id"].as_str().unwrap().to_string();
    // Writes after the snapshot: the same file again, a new one, a removal.
    fs::write(at.join("doc.txt"), b"v3\n").unwrap();
    fs::write(at.join("later"), b"later\n").unwrap();
    fs::remove_file(at.join("d/keep")).unwrap();
    // The branch is made from the snapshot only now, and reads what the snapshot sealed.
    in_ws(&env, &ws, &["branch", "create", "old", "--from", &id]);
    let old = branch_dir(&at, "old");
    assert_eq!(fs::read(old.join("doc.txt")).unwrap(), b"v2\n");
    assert_eq!(fs::read(old.join("d/keep")).unwrap(), b"k\n");
    assert!(!old.join("later").exists());
    // The top goes on with its own state; the snapshot's tree never changed.
    assert_eq!(fs::read(at.join("doc.txt")).unwrap(), b"v3\n");
    let tree = snap["tree"].as_str().unwrap();
    assert_eq!(env.ok(&["cat", tree, "doc.txt"]), "v2\n");
    let shown = in_ws_json(&env, &ws, &["snapshot", "show", &id]);
    assert_eq!(shown["message"], "two");
    assert_eq!(shown["branch"], "main");
    // The diff from the snapshot to the top lists exactly the later writes.
    let diff = in_ws_json(&env, &ws, &["diff", &id, "main"]);
    let mut listed: Vec<(String, String)> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["change"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        common::owned(&[
            ("d/keep", "removed"),
            ("doc.txt", "modified"),
            ("later", "added"),
        ])
    );
    // --patch: the lines of each changed file.
    let patch = in_ws(&env, &ws, &["diff", &id, "main", "--patch"]);
    for line in [
        "--- a/doc.txt",
        "+++ b/doc.txt",
        "-v2",
        "+v3",
        "--- a/d/keep",
        "+++ /dev/null",
        "-k",
        "+++ b/later",
        "+later",
    ] {
        assert!(
            patch.lines().any(|l| l == line),
            "{line:?} not in:\n{patch}"
        );
    }
    drop(mounted);
    env.fsck_ok();
}

#[test]
fn branch_views_never_leak_between_processes_reading_one_path_at_once() {
    if !fuse_available() || !common::require(can_unshare(), "user or mount namespaces") {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    for name in ["a", "b"] {
        in_ws(&env, &ws, &["branch", "create", name]);
        fs::write(branch_dir(&at, name).join("f"), format!("{name}\n")).unwrap();
    }
    // Both views read the same absolute path at once, over and over; the host (no
    // view) reads the top's bytes at the same path between them.
    let script = format!(
        "for i in $(seq 200); do cat {0}/f; stat -c %i {0}/f; done",
        at.display()
    );
    let spawn = |name: &str| {
        env.cmd()
            .args(["branch", "--workspace", ws.to_str().unwrap(), "exec", name])
            .args(["--", "sh", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    for _ in 0..200 {
        assert_eq!(fs::read(at.join("f")).unwrap(), b"base\n");
    }
    let mut inodes = Vec::new();
    for (name, child) in [("a", a), ("b", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 400);
        for pair in lines.chunks(2) {
            assert_eq!(pair[0], name, "a view showed another branch's bytes");
            assert_eq!(
                pair[1], lines[1],
                "the inode of the path changed within a view"
            );
        }
        inodes.push(lines[1].to_string());
    }
    let host_ino = fs::metadata(at.join("f")).unwrap().ino().to_string();
    assert!(
        inodes[0] != inodes[1] && inodes[0] != host_ino && inodes[1] != host_ino,
        "each branch has inode numbers of its own: {inodes:?} {host_ino}"
    );
    // A child started by the command sees the view too; the environment names it.
    let nested = exec_in(
        &env,
        &ws,
        "b",
        &format!("sh -c 'cat {}/f; echo $VELO_BRANCH'", at.display()),
    );
    assert_eq!(nested, "b\nb\n");
    drop(mounted);
    env.fsck_ok();
}

/// Whether this process may make a mount namespace (root) or a user namespace.
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(if common::is_root() {
            vec!["-m", "true"]
        } else {
            vec!["-rm", "true"]
        })
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn branches_are_written_at_once_and_each_keeps_only_its_own_changes() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(
        &env,
        "t",
        &[("shared.txt", b"same\n"), ("src/lib.c", b"int x;\n")],
    );
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    for name in ["one", "two"] {
        in_ws(&env, &ws, &["branch", "create", name]);
    }
    // Two writers, one per branch, at once: many files each, then a rename and a removal.
    std::thread::scope(|s| {
        for name in ["one", "two"] {
            let dir = branch_dir(&at, name);
            s.spawn(move || {
                for i in 0..300 {
                    let mut f = fs::File::create(dir.join(format!("{name}-{i}"))).unwrap();
                    writeln!(f, "{name} {i}").unwrap();
                }
                fs::rename(dir.join(format!("{name}-0")), dir.join("src/moved")).unwrap();
                fs::remove_file(dir.join("shared.txt")).unwrap();
            });
        }
    });
    // Across branches is another file system to rename and link.
    let err = fs::rename(
        branch_dir(&at, "one").join("one-1"),
        branch_dir(&at, "two").join("x"),
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
    let err = fs::hard_link(branch_dir(&at, "one").join("one-1"), at.join("x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
    // The top did not change; each branch lists exactly its writes.
    assert_eq!(fs::read(at.join("shared.txt")).unwrap(), b"same\n");
    for (name, other) in [("one", "two"), ("two", "one")] {
        let dir = branch_dir(&at, name);
        assert!(!dir.join(format!("{other}-5")).exists());
        assert_eq!(
            fs::read_to_string(dir.join("src/moved")).unwrap(),
            format!("{name} 0\n")
        );
        let stat = in_ws_json(&env, &ws, &["diff", "main", name, "--stat"]);
        assert_eq!(
            (
                stat["added"].as_u64(),
                stat["removed"].as_u64(),
                stat["modified"].as_u64()
            ),
            (Some(300), Some(1), Some(0)),
            "{name}: {stat}"
        );
    }
    let list = in_ws_json(&env, &ws, &["branch", "list"]);
    let changed: Vec<(String, bool)> = list["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["changed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changed,
        vec![
            ("main".into(), false),
            ("one".into(), true),
            ("two".into(), true)
        ]
    );
    drop(mounted);
    env.fsck_ok();
}

#[test]
fn gc_keeps_snapshots_and_branch_bases_and_their_deletion_frees_them() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "work"]);
    fs::write(
        branch_dir(&at, "work").join("only-in-snapshot"),
        b"unique bytes 1234\n",
    )
    .unwrap();
    let snap = in_ws_json(&env, &ws, &["snapshot", "create", "--branch", "work"]);
    let id = snap["id"].as_str().unwrap().to_string();
    in_ws(&env, &ws, &["branch", "reset", "work", "main"]);
    assert!(!branch_dir(&at, "work").join("only-in-snapshot").exists());
    // gc runs while the workspace is mounted (each served base is pinned: main and work
    // here) and takes nothing any branch shows.
    fs::write(at.join("new-on-main"), b"upper of main\n").unwrap();
    env.forget_all_but_workspace();
    let gc = common::gc_within_a_minute(&env);
    assert_eq!(gc["serving"], 1, "{gc}");
    assert_eq!(fs::read(at.join("f")).unwrap(), b"base\n");
    assert_eq!(
        fs::read(branch_dir(&at, "work").join("f")).unwrap(),
        b"base\n"
    );
    assert_eq!(
        fs::read(at.join("new-on-main")).unwrap(),
        b"upper of main\n"
    );
    let snap_after = in_ws_json(&env, &ws, &["snapshot", "create"]);
    assert_eq!(
        env.ok(&["cat", snap_after["tree"].as_str().unwrap(), "f"]),
        "base\n"
    );
    drop(mounted);
    // The snapshot is the only thing that reaches that blob: gc keeps it.
    env.ok(&["gc", "--run"]);
    let tree = snap["tree"].as_str().unwrap();
    assert_eq!(
        env.ok(&["cat", tree, "only-in-snapshot"]),
        "unique bytes 1234\n"
    );
    in_ws(&env, &ws, &["snapshot", "delete", &id]);
    let gc = env.json(&["gc", "--run"]);
    assert!(gc["blobs"].as_u64().unwrap() >= 1, "{gc}");
    assert!(env.run(&["cat", tree, "only-in-snapshot"]).status.code() != Some(0));
    // A branch is all that keeps its base: deleting it lets gc take what only it had.
    common::ingest_files(&env, "other", &[("only-other", b"other bytes 5678\n")]);
    let made = in_ws_json(&env, &ws, &["branch", "create", "o", "--from", "other"]);
    let base = made["base"].as_str().unwrap().to_string();
    env.ok(&["forget", "other"]);
    env.ok(&["gc", "--run"]);
    assert_eq!(env.ok(&["cat", &base, "only-other"]), "other bytes 5678\n");
    in_ws(&env, &ws, &["branch", "delete", "o"]);
    env.ok(&["gc", "--run"]);
    assert!(env.run(&["cat", &base, "only-other"]).status.code() != Some(0));
    env.fsck_ok();
}

trait ForgetAll {
    fn forget_all_but_workspace(&self);
}

impl ForgetAll for Env {
    /// Unregisters every root the test made itself, so only the workspace's keep trees.
    fn forget_all_but_workspace(&self) {
        self.ok(&["forget", "t"]);
    }
}

#[test]
fn a_killed_server_loses_no_branch_and_remounting_shows_every_upper() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    let mut f = fs::File::create(branch_dir(&at, "b").join("synced")).unwrap();
    f.write_all(b"kept\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::write(at.join("f"), b"top\n").unwrap();
    fs::File::open(at.join("f")).unwrap().sync_all().unwrap();
    let pid = workspace_server_pid(&at).expect("the workspace server runs");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The next mount cleans up the dead one and serves every branch's upper again.
    let said = env.run(&[
        "workspace",
        "mount",
        ws.to_str().unwrap(),
        at.to_str().unwrap(),
    ]);
    assert!(
        said.status.success(),
        "{}",
        String::from_utf8_lossy(&said.stderr)
    );
    assert!(
        String::from_utf8_lossy(&said.stderr).contains("server died"),
        "{}",
        String::from_utf8_lossy(&said.stderr)
    );
    assert_eq!(
        fs::read(branch_dir(&at, "b").join("synced")).unwrap(),
        b"kept\n"
    );
    assert_eq!(fs::read(at.join("f")).unwrap(), b"top\n");
    drop(mounted);
    env.fsck_ok();
}

fn workspace_server_pid(at: &Path) -> Option<u32> {
    common::first_pid(&format!("__workspace-serve .* {}$", at.display()))
}

#[test]
fn bad_names_and_the_control_directory_get_clear_errors() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    for bad in ["../up", "a/b", ".hidden", "", &"x".repeat(65)] {
        let said = env.fails(&["branch", "-w", w, "create", bad]);
        assert!(said.contains("branch name"), "{bad:?}: {said}");
    }
    let said = env.fails(&["branch", "-w", w, "create", "x", "--from", "nothing-such"]);
    assert!(said.contains("no snapshot or branch"), "{said}");
    let said = env.fails(&["snapshot", "-w", w, "show", "7"]);
    assert!(said.contains("no snapshot 7"), "{said}");
    let said = env.fails(&["branch", "-w", w, "delete", "main"]);
    assert!(said.contains("not deleted"), "{said}");
    let out = env.run(&["branch", "-w", w, "exec", "nope", "--", "true"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no branch nope"), "{said}");
    // velo's own failure is 125, never a status the command could return.
    assert_eq!(out.status.code(), Some(125));
    // A command that cannot run: as a shell says it, 127 not found, 126 not runnable.
    let out = env.run(&["branch", "-w", w, "exec", "main", "--", "no-such-command-x"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("running no-such-command-x in branch main") && !said.contains("entering"),
        "{said}"
    );
    assert_eq!(out.status.code(), Some(127));
    let out = env.run(&["branch", "-w", w, "exec", "main", "--", "/etc/passwd"]);
    assert_eq!(
        out.status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if common::is_root() && common::find_tool("setpriv").is_some() {
        // Root without CAP_SYS_ADMIN (as in a container) gets the view through a user
        // namespace, as any user does.
        let out = Command::new("setpriv")
            .args(["--bounding-set=-sys_admin", "--"])
            .arg(common::velo_bin())
            .args(["--store", env.store.to_str().unwrap()])
            .args(["branch", "-w", w, "exec", "main", "--", "cat"])
            .arg(at.join("f"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "base\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The control directory is not listed, and cannot be made, removed or renamed.
    let names: Vec<_> = fs::read_dir(&at)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    assert_eq!(
        fs::create_dir(at.join(".velo")).unwrap_err().raw_os_error(),
        Some(libc::EEXIST)
    );
    assert_eq!(
        fs::rename(at.join(".velo"), at.join("v"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EBUSY)
    );
    let err = fs::write(at.join(".velo/branches/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // A damaged record is named, and nothing else breaks.
    fs::write(ws.join("snapshots/9.json"), b"{").unwrap();
    let out = env.run(&["snapshot", "-w", w, "list"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("9.json: a damaged snapshot record"),
        "{said}"
    );
    fs::remove_file(ws.join("snapshots/9.json")).unwrap();
    // Not a workspace.
    let said = env.fails(&["branch", "-w", env.path("").to_str().unwrap(), "list"]);
    assert!(said.contains("not a velo workspace"), "{said}");
    drop(mounted);
}

#[test]
fn the_agent_flow_runs_on_a_git_repository() {
    if !fuse_available()
        || !common::require(common::find_tool("git").is_some(), "git")
        || !common::require(can_unshare(), "user or mount namespaces")
    {
        return;
    }
    let env = Env::new();
    // A git repository: the user's checkout.
    let repo = env.path("repo");
    fs::create_dir_all(repo.join("src")).unwrap();
    fs::write(repo.join("src/main.c"), b"int main(void) { return 0; }\n").unwrap();
    fs::write(repo.join("README"), b"demo\n").unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "safe.directory=*",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "start"]);
    env.ingest(&repo, &["--name", "repo"]);
    let (ws, mounted) = workspace(&env, "repo");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    let snap = in_ws_json(&env, &ws, &["snapshot", "create", "-m", "start"]);
    let id = snap["id"].as_str().unwrap().to_string();
    for task in ["fix", "docs", "bad"] {
        env.ok(&["branch", "-w", w, "create", task, "--from", &id]);
    }
    // Each task runs in its own branch at the same path, at once.
    let scripts = [
        ("fix", "sed -i 's/return 0/return 1/' src/main.c && git -c safe.directory='*' --no-optional-locks status --porcelain"),
        ("docs", "echo more >> README && git -c safe.directory='*' --no-optional-locks status --porcelain"),
        ("bad", "rm README && echo junk > junk && git -c safe.directory='*' --no-optional-locks status --porcelain"),
    ];
    let children: Vec<_> = scripts
        .iter()
        .map(|(task, script)| {
            env.cmd()
                .args(["branch", "-w", w, "exec", task, "--", "sh", "-c"])
                .arg(format!("cd {} && {script}", at.display()))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let statuses: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        })
        .collect();
    // git in each branch sees only that branch's edit.
    assert_eq!(statuses[0], " M src/main.c\n");
    assert_eq!(statuses[1], " M README\n");
    assert_eq!(statuses[2], " D README\n?? junk\n");
    let diff = in_ws_json(&env, &ws, &["diff", "fix", "docs"]);
    let paths: Vec<&str> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["README", "src/main.c"]);
    // Keep the winner: its change lands in the user's checkout; the others go.
    let applied = in_ws_json(
        &env,
        &ws,
        &["branch", "apply", "fix", repo.to_str().unwrap()],
    );
    assert_eq!(applied["written"], serde_json::json!(["src/main.c"]));
    assert_eq!(git(&["status", "--porcelain"]), " M src/main.c\n");
    assert_eq!(
        fs::read_to_string(repo.join("src/main.c")).unwrap(),
        "int main(void) { return 1; }\n"
    );
    for task in ["docs", "bad"] {
        env.ok(&["branch", "-w", w, "delete", task]);
    }
    let list = in_ws_json(&env, &ws, &["branch", "list"]);
    let names: Vec<&str> = list["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["fix", "main"]);
    // Applying again is refused where the checkout moved on from the base, and says so.
    fs::write(repo.join("src/main.c"), b"local edit\n").unwrap();
    let said = env.fails(&["branch", "-w", w, "apply", "fix", repo.to_str().unwrap()]);
    assert!(
        said.contains("src/main.c") && said.contains("changed since"),
        "{said}"
    );
    assert_eq!(fs::read(repo.join("src/main.c")).unwrap(), b"local edit\n");
    drop(mounted);
    env.fsck_ok();
}

#[test]
fn two_branches_of_a_real_c_project_build_at_once_each_with_its_own_edit() {
    if !fuse_available()
        || !common::require(common::find_tool("cc").is_some(), "a C compiler (cc)")
        || !common::require(common::find_tool("make").is_some(), "make")
        || !common::require(can_unshare(), "user or mount namespaces")
    {
        return;
    }
    let Some(c_sources) = common::blake3_c_sources() else {
        panic!("the blake3 crate's C sources are not in the cargo registry");
    };
    let env = Env::new();
    let project = env.path("project");
    fs::create_dir_all(&project).unwrap();
    for name in [
        "example.c",
        "blake3.c",
        "blake3.h",
        "blake3_impl.h",
        "blake3_dispatch.c",
        "blake3_portable.c",
    ] {
        fs::copy(c_sources.join(name), project.join(name)).unwrap();
    }
    fs::write(
        project.join("Makefile"),
        "b3example: example.c blake3.c blake3_dispatch.c blake3_portable.c\n\tcc -O1 \
         -DBLAKE3_NO_SSE2 -DBLAKE3_NO_SSE41 -DBLAKE3_NO_AVX2 -DBLAKE3_NO_AVX512 -o $@ $^\n",
    )
    .unwrap();
    env.ingest(&project, &["--name", "project"]);
    let (ws, mounted) = workspace(&env, "project");
    let at = mounted.at.clone();
    for name in ["a", "b"] {
        in_ws(&env, &ws, &["branch", "create", name]);
    }
    // Each branch edits the program's output its own way and builds it, both at once.
    let w = ws.to_str().unwrap();
    let builds: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let script = format!(
                "cd {} && sed -i 's/printf(\"\\\\n\")/printf(\" {name}\\\\n\")/' example.c && make -s && printf velo | ./b3example",
                at.display()
            );
            env.cmd()
                .args(["branch", "-w", w, "exec", name, "--", "sh", "-c", &script])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let builds: Vec<_> = builds
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    let want = velo_core::Hash::of_blob(b"velo").to_hex();
    for (name, out) in ["a", "b"].iter().zip(&builds) {
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{want} {name}\n")
        );
        // The diff from the base lists exactly the edit and the build's output.
        let diff = in_ws_json(&env, &ws, &["diff", "main", name]);
        let listed: Vec<(String, String)> = diff["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["path"].as_str().unwrap().to_string(),
                    c["change"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            common::owned(&[("b3example", "added"), ("example.c", "modified")])
        );
    }
    // The top never saw either build.
    assert!(!at.join("b3example").exists());
    drop(mounted);
    env.fsck_ok();
}

#[test]
fn kill_9_of_the_server_during_snapshots_loses_nothing_and_records_stay_whole() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    let dir = branch_dir(&at, "b");
    for i in 0..2000 {
        fs::write(dir.join(format!("file-{i}")), format!("{i}\n")).unwrap();
    }
    for delay_ms in [0u64, 15, 40, 120] {
        let snapshot = env
            .cmd()
            .args(["snapshot", "-w", w, "create", "--branch", "b"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let pid = workspace_server_pid(&at).expect("the workspace server runs");
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let _ = snapshot.wait_with_output().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        env.ok(&["workspace", "mount", w, at.to_str().unwrap()]);
        // Every file of the branch is there; every snapshot recorded names a whole tree.
        for i in [0, 999, 1999] {
            assert_eq!(
                fs::read_to_string(dir.join(format!("file-{i}"))).unwrap(),
                format!("{i}\n")
            );
        }
        let list = in_ws_json(&env, &ws, &["snapshot", "list"]);
        for s in list["snapshots"].as_array().unwrap() {
            let tree = s["tree"].as_str().unwrap();
            assert_eq!(env.ok(&["cat", tree, "file-1999"]), "1999\n");
        }
    }
    drop(mounted);
    env.fsck_ok();
}

/// A branch delete killed between its steps (record gone, directory and root left) is
/// listed as unfinished, and `branch delete` finishes it: nothing keeps the base then.
#[test]
fn what_a_killed_delete_leaves_is_listed_and_removed_by_the_next_delete() {
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    common::ingest_files(&env, "other", &[("only-other", b"only in other\n")]);
    let ws = env.path("ws");
    let w = ws.to_str().unwrap();
    env.ok(&["workspace", "init", w, "--from", "t"]);
    in_ws(&env, &ws, &["branch", "create", "b", "--from", "other"]);
    env.ok(&["forget", "other"]);
    // Killed right after its first step: the record is gone.
    fs::remove_file(ws.join("branches/b/branch.json")).unwrap();
    let list = in_ws_json(&env, &ws, &["branch", "list"]);
    assert_eq!(list["unfinished"], serde_json::json!(["b"]), "{list}");
    assert_eq!(list["branches"].as_array().unwrap().len(), 1, "{list}");
    let said = env.run(&["branch", "-w", w, "list"]);
    assert!(
        String::from_utf8_lossy(&said.stderr).contains("`velo branch delete b`"),
        "{}",
        String::from_utf8_lossy(&said.stderr)
    );
    // Its root still keeps the tree; the delete lets it go.
    let gc = env.json(&["gc", "--run"]);
    assert_eq!(gc["blobs"], 0, "{gc}");
    let said = env.run(&["branch", "-w", w, "delete", "b"]);
    assert!(
        said.status.success(),
        "{}",
        String::from_utf8_lossy(&said.stderr)
    );
    assert!(!ws.join("branches/b").exists());
    let list = in_ws_json(&env, &ws, &["branch", "list"]);
    assert_eq!(list["unfinished"], serde_json::json!([]), "{list}");
    let gc = env.json(&["gc", "--run"]);
    assert_eq!(gc["blobs"], 1, "{gc}");
    let said = env.fails(&["branch", "-w", w, "delete", "b"]);
    assert!(said.contains("no branch b"), "{said}");
    env.fsck_ok();
}

#[test]
fn kill_9_of_the_server_during_resets_leaves_each_branch_old_or_new() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    fs::write(branch_dir(&at, "b").join("f"), b"one\n").unwrap();
    let one = in_ws_json(&env, &ws, &["snapshot", "create", "--branch", "b"]);
    for (round, delay_ms) in [0u64, 3, 8, 20, 60].into_iter().enumerate() {
        // Changes of its own, then a reset to snapshot "one", and the server killed.
        for i in 0..300 {
            fs::write(branch_dir(&at, "b").join(format!("r{round}-{i}")), b"x").unwrap();
        }
        let reset = env
            .cmd()
            .args(["branch", "-w", w, "reset", "b", one["id"].as_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let pid = workspace_server_pid(&at).expect("the workspace server runs");
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let _ = reset.wait_with_output();
        std::thread::sleep(std::time::Duration::from_millis(100));
        env.ok(&["workspace", "mount", w, at.to_str().unwrap()]);
        // Old (with this round's files) or new (none of them): never a mix.
        let b = branch_dir(&at, "b");
        assert_eq!(fs::read(b.join("f")).unwrap(), b"one\n");
        let kept = (0..300)
            .filter(|i| b.join(format!("r{round}-{i}")).exists())
            .count();
        assert!(
            kept == 0 || kept == 300,
            "round {round}: {kept} of 300 files"
        );
        let list = in_ws_json(&env, &ws, &["branch", "list"]);
        assert_eq!(list["branches"].as_array().unwrap().len(), 2, "{list}");
    }
    drop(mounted);
    // Every base a record names is still there after gc.
    env.ok(&["gc", "--run"]);
    env.ok(&["workspace", "mount", w, at.to_str().unwrap()]);
    let _again = Mounted {
        env: &env,
        at: at.clone(),
    };
    assert_eq!(fs::read(branch_dir(&at, "b").join("f")).unwrap(), b"one\n");
    env.fsck_ok();
}

#[test]
fn a_branch_recorded_behind_the_servers_back_is_served_when_looked_up() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "made"]);
    fs::write(branch_dir(&at, "made").join("g"), b"g\n").unwrap();
    // What a `branch create` killed before it told the server leaves: the records.
    let from = ws.join("branches/made/branch.json");
    let record = fs::read_to_string(&from)
        .unwrap()
        .replace("\"made\"", "\"late\"");
    let late = ws.join("branches/late");
    fs::create_dir_all(late.join("upper")).unwrap();
    fs::set_permissions(&late, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(late.join("upper"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(late.join("branch.json"), record).unwrap();
    assert_eq!(
        fs::read(branch_dir(&at, "late").join("f")).unwrap(),
        b"base\n"
    );
    assert!(!branch_dir(&at, "late").join("g").exists());
    fs::write(branch_dir(&at, "late").join("h"), b"h\n").unwrap();
    assert_eq!(fs::read(late.join("upper/h")).unwrap(), b"h\n");
    // Reset and delete are the server's own while it runs: a lookup meanwhile waits.
    in_ws(&env, &ws, &["branch", "reset", "late", "made"]);
    assert_eq!(fs::read(branch_dir(&at, "late").join("g")).unwrap(), b"g\n");
    assert!(!branch_dir(&at, "late").join("h").exists());
    in_ws(&env, &ws, &["branch", "delete", "late"]);
    let err = fs::metadata(branch_dir(&at, "late")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert!(!late.exists());
    drop(mounted);
}

#[test]
fn a_trees_own_control_name_never_stands_in_for_the_control_directory() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(
        &env,
        "t",
        &[("f", b"base\n"), (".velo/branches/evil/x", b"fake\n")],
    );
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    // The top lists no .velo, and .velo there is the control directory.
    let names: Vec<_> = fs::read_dir(&at)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    let listed: Vec<_> = fs::read_dir(at.join(".velo/branches"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed, vec![std::ffi::OsString::from("b")]);
    // In a branch's root the name is neither shown nor made.
    let b = branch_dir(&at, "b");
    assert!(fs::read_dir(&b)
        .unwrap()
        .all(|e| e.unwrap().file_name() != ".velo"));
    assert_eq!(
        fs::metadata(b.join(".velo")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        fs::create_dir(b.join(".velo")).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    fs::write(b.join("g"), b"g").unwrap();
    assert_eq!(
        fs::rename(b.join("g"), b.join(".velo"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    // A branch's root is no entry to move: mv must not copy it and then empty it.
    let err = fs::rename(&b, at.join("moved")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let out = Command::new("mv")
        .arg(&b)
        .arg(at.join("moved"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(fs::read(b.join("g")).unwrap(), b"g");
    assert!(!at.join("moved").exists());
    drop(mounted);
}

#[test]
fn damaged_and_half_made_records_hide_nothing_else() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    in_ws(&env, &ws, &["snapshot", "create"]);
    // A record cut short (a full disk, a kill) is reported, and blocks nothing.
    fs::write(ws.join("snapshots/2.json"), b"").unwrap();
    let out = env.run(&["snapshot", "-w", w, "list"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2.json: a damaged snapshot record"));
    let made = in_ws_json(&env, &ws, &["snapshot", "create"]);
    assert_eq!(made["id"], "3");
    in_ws(&env, &ws, &["snapshot", "delete", "2"]);
    assert!(!ws.join("snapshots/2.json").exists());
    // A reset killed before its swap leaves a staged directory: no branch, and the next
    // reset of that branch clears it.
    in_ws(&env, &ws, &["branch", "create", "b"]);
    fs::create_dir_all(ws.join("branches/.b.reset/upper")).unwrap();
    let list = in_ws_json(&env, &ws, &["branch", "list"]);
    assert_eq!(list["branches"].as_array().unwrap().len(), 2, "{list}");
    fs::write(branch_dir(&at, "b").join("work"), b"w").unwrap();
    in_ws(&env, &ws, &["branch", "reset", "b", "1"]);
    assert!(!ws.join("branches/.b.reset").exists());
    assert!(!branch_dir(&at, "b").join("work").exists());
    // The store keeps exactly the branch's new base under its name.
    let roots = env.json(&["roots"]);
    let names: Vec<&str> = roots["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .filter(|n| n.contains(".reset."))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    // Names that read as snapshot ids are not branch names.
    let said = env.fails(&["branch", "-w", w, "create", "12"]);
    assert!(said.contains("snapshot id"), "{said}");
    // Run from inside a branch's directory, a snapshot is of that branch.
    let out = env
        .cmd()
        .args(["snapshot", "-w", w, "create", "--json"])
        .current_dir(branch_dir(&at, "b"))
        .output()
        .unwrap();
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["branch"], "b", "{made}");
    drop(mounted);
    env.fsck_ok();
}

#[test]
fn apply_never_writes_through_a_symbolic_link_and_init_leaves_nothing_when_it_fails() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("d/a", b"a\n"), ("top", b"t\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    in_ws(&env, &ws, &["branch", "create", "b"]);
    fs::remove_file(branch_dir(&at, "b").join("d/a")).unwrap();
    fs::write(branch_dir(&at, "b").join("d/n"), b"n\n").unwrap();
    // The host checkout's d is a link to a directory elsewhere.
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("a"), b"a\n").unwrap();
    let host = env.path("host");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("top"), b"t\n").unwrap();
    std::os::unix::fs::symlink(&outside, host.join("d")).unwrap();
    for extra in [None, Some("--force")] {
        let mut args = vec!["branch", "-w", w, "apply", "b", host.to_str().unwrap()];
        args.extend(extra);
        let said = env.fails(&args);
        assert!(said.contains("symbolic link"), "{said}");
        assert_eq!(fs::read(outside.join("a")).unwrap(), b"a\n");
        assert!(!outside.join("n").exists());
    }
    // A link the branch itself made a directory is replaced, not followed.
    let linked = env.path("linked");
    fs::create_dir_all(&linked).unwrap();
    fs::write(linked.join("top"), b"t\n").unwrap();
    std::os::unix::fs::symlink("top", linked.join("l")).unwrap();
    env.ingest(&linked, &["--name", "t2"]);
    in_ws(&env, &ws, &["branch", "create", "c", "--from", "t2"]);
    let c = branch_dir(&at, "c");
    fs::remove_file(c.join("l")).unwrap();
    fs::create_dir(c.join("l")).unwrap();
    fs::write(c.join("l/f"), b"f\n").unwrap();
    let checkout = env.path("checkout-c");
    fs::create_dir_all(&checkout).unwrap();
    fs::write(checkout.join("top"), b"t\n").unwrap();
    std::os::unix::fs::symlink("top", checkout.join("l")).unwrap();
    in_ws(
        &env,
        &ws,
        &["branch", "apply", "c", checkout.to_str().unwrap()],
    );
    assert_eq!(fs::read(checkout.join("l/f")).unwrap(), b"f\n");
    assert!(fs::symlink_metadata(checkout.join("l")).unwrap().is_dir());
    assert_eq!(fs::read(checkout.join("top")).unwrap(), b"t\n");
    drop(mounted);
    // A mount point inside the workspace's own directory: refused before anything is made.
    fs::create_dir_all(env.path("ws2")).unwrap();
    let inside = env.path("ws2/branches");
    let said = env.fails(&[
        "workspace",
        "init",
        env.path("ws2").to_str().unwrap(),
        "--from",
        "t",
        "--mount",
        env.path("ws2").to_str().unwrap(),
    ]);
    assert!(said.contains("inside"), "{said}");
    assert!(!inside.exists() && !env.path("ws2/workspace.json").exists());
    let roots = env.json(&["roots"]).to_string();
    let listed = roots.matches(".base.main").count();
    assert_eq!(listed, 1, "only the first workspace's main: {roots}");
}

#[test]
fn a_branch_whose_base_is_gone_is_reported_and_the_others_are_served() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    common::ingest_files(&env, "other", &[("f", b"base\n"), ("only-other", b"o\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    in_ws(&env, &ws, &["branch", "create", "good"]);
    in_ws(&env, &ws, &["branch", "create", "lost", "--from", "other"]);
    drop(mounted);
    // Everything that kept the second tree is forgotten, and gc takes it.
    let lost = in_ws_json(&env, &ws, &["branch", "list"])["branches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "lost")
        .unwrap()["base"]
        .as_str()
        .unwrap()
        .to_string();
    // A workspace's roots are not forgotten by accident: only "other" goes without
    // --force, and the branch's root keeps the tree.
    let out = env.run(&["forget", &lost]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("kept ws.") && said.contains(".base.lost"),
        "{said}"
    );
    let said = env.fails(&["forget", &lost]);
    assert!(said.contains("kept by a workspace"), "{said}");
    env.ok(&["forget", "--force", &lost]);
    env.ok(&["gc", "--run"]);
    let out = env.run(&["workspace", "mount", w, at.to_str().unwrap()]);
    let _remount = Mounted {
        env: &env,
        at: at.clone(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("branch lost is not served"), "{said}");
    assert_eq!(fs::read(at.join("f")).unwrap(), b"base\n");
    assert_eq!(
        fs::read(branch_dir(&at, "good").join("f")).unwrap(),
        b"base\n"
    );
}

#[test]
fn bound_processes_see_their_branch_at_the_top_and_nothing_leaks_between_them() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let ws = env.path("ws");
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    env.ok(&[
        "workspace",
        "init",
        ws.to_str().unwrap(),
        "--from",
        "t",
        "--mount",
        at.to_str().unwrap(),
        "--bindable",
    ]);
    let mounted = Mounted {
        env: &env,
        at: at.clone(),
    };
    let w = ws.to_str().unwrap();
    for name in ["x", "y"] {
        env.ok(&["branch", "-w", w, "create", name]);
        fs::write(branch_dir(&at, name).join("f"), format!("{name}\n")).unwrap();
        fs::write(branch_dir(&at, name).join(format!("only-{name}")), b"").unwrap();
    }
    // Two running shells, bound once they run; each then reads the top's f over and
    // over, at the same time, and a child of each does too.
    let go = env.path("go");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.01; done; for i in $(seq 100); do cat {at}/f; done; ls {at}; sh -c 'cat {at}/f'",
        go = go.display(),
        at = at.display()
    );
    let spawn = || {
        Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    env.ok(&["branch", "-w", w, "bind", "x", "--pid", &a.id().to_string()]);
    env.ok(&["branch", "-w", w, "bind", "y", "--pid", &b.id().to_string()]);
    fs::write(&go, b"").unwrap();
    for _ in 0..100 {
        assert_eq!(fs::read(at.join("f")).unwrap(), b"base\n");
    }
    for (name, child) in [("x", a), ("y", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        let last = lines.pop().unwrap();
        assert_eq!(last, name, "the child of a bound process sees its branch");
        let listing: Vec<&str> = lines.split_off(100);
        assert!(lines.iter().all(|l| *l == name), "{name}: {lines:?}");
        assert_eq!(listing, vec!["f".to_string(), format!("only-{name}")]);
    }
    // The host's view of the top is main's throughout.
    let names: Vec<_> = fs::read_dir(&at)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    // Unbinding: a process bound no more sees main again.
    let c = Command::new("sh")
        .args([
            "-c",
            &format!(
                "while [ ! -e {0}.2 ]; do sleep 0.01; done; cat {1}/f",
                go.display(),
                at.display()
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    env.ok(&["branch", "-w", w, "bind", "x", "--pid", &c.id().to_string()]);
    env.ok(&["branch", "-w", w, "unbind", "--pid", &c.id().to_string()]);
    fs::write(format!("{}.2", go.display()), b"").unwrap();
    assert_eq!(c.wait_with_output().unwrap().stdout, b"base\n");
    // A mount below the top would be detached by a bound process's walk: refused.
    if common::is_root() {
        fs::create_dir_all(at.join("sub")).unwrap();
        let sub = at.join("sub");
        let made = Command::new("mount")
            .args(["-t", "tmpfs", "velo-test", sub.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(made.success());
        let said = env.fails(&[
            "branch",
            "-w",
            w,
            "bind",
            "x",
            "--pid",
            &std::process::id().to_string(),
        ]);
        let _ = Command::new("umount").arg(&sub).status();
        assert!(said.contains("would detach it"), "{said}");
    }
    // A workspace commits no branch at unmount: said before anything is unmounted.
    let said = env.fails(&["umount", at.to_str().unwrap(), "--name", "all"]);
    assert!(said.contains("velo snapshot create"), "{said}");
    assert!(velo_fuse_mounted(&at));
    // A mount made without --bindable says how to get one.
    drop(mounted);
    env.ok(&["workspace", "mount", w, at.to_str().unwrap()]);
    let _again = Mounted {
        env: &env,
        at: at.clone(),
    };
    let said = env.fails(&[
        "branch",
        "-w",
        w,
        "bind",
        "x",
        "--pid",
        &std::process::id().to_string(),
    ]);
    assert!(said.contains("--bindable"), "{said}");
}

#[test]
fn an_unprivileged_user_runs_a_branch_in_a_user_namespace_of_its_own() {
    if !fuse_available()
        || !common::require(common::is_root(), "root (to become uid 65534 with setpriv)")
        || !common::require(common::find_tool("setpriv").is_some(), "setpriv")
        || !common::require(
            common::find_tool("fusermount3").is_some(),
            "fusermount3 (apt install fuse3)",
        )
        || !common::require(can_unshare(), "user namespaces")
    {
        return;
    }
    let _device = common::DevFuseOpenToAll::new();
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let work = env.path("work");
    fs::create_dir_all(work.join("src")).unwrap();
    fs::write(work.join("src/f"), b"base\n").unwrap();
    let run = format!(
        "set -e; w=\"$1\"; cd \"$w\"; v() {{ \"{}\" --store \"$w/store\" \"$@\"; }}; \
         mkdir m; v ingest src --name t >/dev/null 2>&1; v workspace init ws --from t --mount m 2>/dev/null; \
         v branch -w ws create b 2>/dev/null; echo b > m/.velo/branches/b/f; \
         v branch -w ws exec b -- sh -c 'cat \"$0\"/m/f; id -u; echo made > \"$0\"/m/new' \"$w\" > out 2>&1 || status=$?; \
         cat m/.velo/branches/b/new >> out 2>&1 || true; test -e m/new && echo leaked >> out; \
         v umount m; cat out; exit ${{status:-0}}",
        common::velo_bin().display()
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
        .env_remove("VELO_WORKSPACE")
        .env("HOME", &work)
        .output()
        .unwrap();
    // The branch's bytes, the caller's own uid (mapped to itself), the write in the branch.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "b\n65534\nmade\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn replies_longer_than_a_request_may_be_reach_the_client_whole() {
    if !fuse_available() || !common::require(common::find_tool("mkfifo").is_some(), "mkfifo") {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (_ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    // 2,000 fifos with long names: a commit lists each as not committed, a reply of
    // about 150 KB (a request may be 64 KiB at most).
    let names: Vec<String> = (0..2000)
        .map(|i| format!("a-fifo-with-a-rather-long-name-to-fill-the-reply-{i:05}"))
        .collect();
    let made = Command::new("mkfifo")
        .args(&names)
        .current_dir(&at)
        .status()
        .unwrap();
    assert!(made.success());
    let out = env.json(&["commit", at.to_str().unwrap()]);
    let listed = out["not_committed"].as_array().unwrap();
    assert_eq!(listed.len(), 2000, "{}", out.to_string().len());
    drop(mounted);
}

fn velo_fuse_mounted(at: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
}

/// A workspace over host directory `host` (`--lower`) at `ws`, mounted at `mnt`; what
/// `init --json` said.
fn lower_workspace<'a>(env: &'a Env, host: &Path) -> (PathBuf, Mounted<'a>, serde_json::Value) {
    let ws = env.path("ws");
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let made = env.json(&[
        "workspace",
        "init",
        ws.to_str().unwrap(),
        "--lower",
        host.to_str().unwrap(),
        "--mount",
        at.to_str().unwrap(),
    ]);
    (ws, Mounted { env, at }, made)
}

#[test]
fn a_host_directory_as_the_lower_is_shown_as_it_was_never_written_and_never_mixed() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let host = env.path("host");
    fs::create_dir_all(host.join("sub")).unwrap();
    fs::write(host.join("a"), b"a\n").unwrap();
    fs::write(host.join("sub/b"), b"b\n").unwrap();
    fs::write(host.join("sub/c"), b"c\n").unwrap();
    std::os::unix::fs::symlink("a", host.join("link")).unwrap();
    common::touch_ns(&host.join("a"), 1_600_000_000, 123);
    // Made before the workspace, never read through the mount before it changes.
    fs::create_dir_all(host.join("unread")).unwrap();
    fs::write(host.join("unread/u"), b"u\n").unwrap();
    let before = common::scan(&host);
    let (ws, mounted, made) = lower_workspace(&env, &host);
    let at = mounted.at.clone();
    assert_eq!(made["base"], "lower", "{made}");
    // Reads fall through, with the host's exact metadata (listed, not read: unread/);
    // nothing was ingested.
    let shown: std::collections::BTreeSet<_> = common::listed_names(&at);
    assert_eq!(shown, common::listed_names(&host));
    for name in ["a", "sub/b", "sub/c", "link"] {
        assert_eq!(
            fs::symlink_metadata(at.join(name)).unwrap().mtime(),
            fs::symlink_metadata(host.join(name)).unwrap().mtime()
        );
    }
    assert_eq!(fs::read(at.join("sub/c")).unwrap(), b"c\n");
    assert_eq!(fs::read_link(at.join("link")).unwrap(), Path::new("a"));
    assert_eq!(env.json(&["status"])["blobs"].as_u64(), Some(0));
    // Writes copy up, deletions are whiteouts, listings merge; the host is never written.
    fs::write(at.join("a"), b"changed\n").unwrap();
    fs::remove_file(at.join("sub/b")).unwrap();
    fs::write(at.join("sub/new"), b"new\n").unwrap();
    let names: Vec<_> = fs::read_dir(at.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, vec!["c", "new"]);
    assert_eq!(common::scan(&host), before);
    // A snapshot ingests the host directory then, checked against what was shown.
    let snap = in_ws_json(&env, &ws, &["snapshot", "create"]);
    let tree = snap["tree"].as_str().unwrap();
    assert_eq!(env.ok(&["cat", tree, "a"]), "changed\n");
    assert_eq!(env.ok(&["cat", tree, "sub/c"]), "c\n");
    assert!(env
        .fails(&["cat", tree, "sub/b"])
        .contains("does not exist"));
    in_ws(
        &env,
        &ws,
        &[
            "branch",
            "create",
            "t",
            "--from",
            snap["id"].as_str().unwrap(),
        ],
    );
    assert_eq!(
        fs::read(branch_dir(&at, "t").join("sub/new")).unwrap(),
        b"new\n"
    );
    // The host changes under the running workspace: names made later never show, a
    // changed file is refused instead of shown as a mix, and nothing seals it.
    fs::write(host.join("later"), b"l\n").unwrap();
    fs::write(host.join("sub/c"), b"C, longer now\n").unwrap();
    fs::write(host.join("unread/u"), b"U, longer now\n").unwrap();
    assert!(!at.join("later").exists());
    let err = fs::read(at.join("unread/u")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // What the kernel read before the change it may still show: the old bytes, whole.
    let c = fs::read(at.join("sub/c"));
    assert!(
        c.as_deref().ok() == Some(&b"c\n"[..]) || c.is_err(),
        "{c:?}"
    );
    let said = env.fails(&["snapshot", "-w", ws.to_str().unwrap(), "create"]);
    assert!(
        said.contains("changed since the workspace was made"),
        "{said}"
    );
    // The branch made from the snapshot is a tree of its own: the host is nothing to it.
    assert_eq!(
        fs::read(branch_dir(&at, "t").join("sub/c")).unwrap(),
        b"c\n"
    );
    // Bad lowers are refused before anything is made.
    let said = env.fails(&[
        "workspace",
        "init",
        env.path("ws2").to_str().unwrap(),
        "--lower",
        env.path("nowhere").to_str().unwrap(),
    ]);
    assert!(said.contains("nowhere"), "{said}");
    assert!(!env.path("ws2").exists());
    fs::create_dir_all(host.join("mnt")).unwrap();
    let said = env.fails(&[
        "workspace",
        "init",
        env.path("ws2").to_str().unwrap(),
        "--lower",
        host.to_str().unwrap(),
        "--mount",
        host.join("mnt").to_str().unwrap(),
    ]);
    assert!(said.contains("mount point"), "{said}");
    assert!(!env.path("ws2").exists());
    drop(mounted);
    env.fsck_ok();
}

#[test]
fn a_snapshot_over_a_host_lower_seals_only_what_was_shown() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let host = env.path("host");
    fs::create_dir_all(host.join("logs")).unwrap();
    fs::write(host.join("f"), b"original\n").unwrap();
    fs::write(host.join("logs/app.log"), b"log1\n").unwrap();
    fs::write(host.join("kept"), b"kept\n").unwrap();
    fs::create_dir_all(host.join("conf")).unwrap();
    for name in ["f", "kept", "conf"] {
        rustix::fs::setxattr(
            host.join(name),
            "user.origin",
            b"host",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    let (ws, mounted, _) = lower_workspace(&env, &host);
    let at = mounted.at.clone();
    // main shows the host's kept extended attributes, and its snapshots keep them, on
    // files it changed and on files it did not.
    let shown = |path: &Path| {
        let mut value = [0u8; 64];
        rustix::fs::getxattr(path, "user.origin", &mut value).map(|n| value[..n].to_vec())
    };
    assert_eq!(shown(&at.join("f")).unwrap(), b"host");
    assert_eq!(shown(&at.join("kept")).unwrap(), b"host");
    // What the branch removed or replaced may change on the host: it is not shown.
    fs::remove_dir_all(at.join("logs")).unwrap();
    fs::write(at.join("kept"), b"mine\n").unwrap();
    fs::write(host.join("logs/app.log"), b"log1\nlog2\n").unwrap();
    fs::write(host.join("kept"), b"theirs\n").unwrap();
    let snap = in_ws_json(&env, &ws, &["snapshot", "create"]);
    let tree = snap["tree"].as_str().unwrap();
    assert_eq!(env.ok(&["cat", tree, "kept"]), "mine\n");
    assert_eq!(env.ok(&["cat", tree, "f"]), "original\n");
    in_ws(
        &env,
        &ws,
        &[
            "branch",
            "create",
            "sealed",
            "--from",
            snap["id"].as_str().unwrap(),
        ],
    );
    for name in ["f", "kept"] {
        let path = branch_dir(&at, "sealed").join(name);
        assert_eq!(shown(&path).unwrap(), b"host", "{name}");
    }
    assert!(env
        .fails(&["cat", tree, "logs/app.log"])
        .contains("does not exist"));
    // A file rewritten with its size and mtime kept (`cp -p`, `rsync -a`) is found by
    // its identity, and nothing seals it.
    let mtime = fs::metadata(host.join("f")).unwrap().modified().unwrap();
    fs::write(host.join("f"), b"MODIFIED\n").unwrap();
    fs::File::options()
        .write(true)
        .open(host.join("f"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let said = env.fails(&["snapshot", "-w", ws.to_str().unwrap(), "create"]);
    assert!(
        said.contains("/f changed since the workspace was made"),
        "{said}"
    );
    let err = fs::read(at.join("f")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // A directory whose extended attributes changed on the host is not shown changed.
    assert_eq!(shown(&at.join("conf")).unwrap(), b"host");
    rustix::fs::setxattr(
        host.join("conf"),
        "user.origin",
        b"changed",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    assert_eq!(shown(&at.join("conf")).unwrap_err(), rustix::io::Errno::IO);
    // Nor can a copy-up take the changed bytes.
    let err = fs::OpenOptions::new()
        .append(true)
        .open(at.join("f"))
        .and_then(|mut f| f.write_all(b"x"));
    assert!(err.is_err());
    assert!(!ws.join("branches/main/upper/f").exists());
}

/// What the second red team of the workspace found, each fixed: two creates of one name
/// both succeeded (the record named one base, the server served the other); a snapshot id
/// was given out again after its snapshot was deleted; a snapshot said nothing of what it
/// could not keep; pins were writable by anyone (the server runs with umask 0) and stayed
/// after unmounting; a regular file was taken as a mount point, a workspace inside the
/// store was refused only at mount time, and a second mount was blamed on a "run".
#[test]
fn races_and_odd_places_of_the_second_red_team_are_refused_or_serialised() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    common::ingest_files(&env, "other", &[("f", b"other\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    // Eight creates of one name at once, from two bases: one wins, and what it recorded
    // is what is served.
    let children: Vec<_> = (0..8)
        .map(|i| {
            let from = if i % 2 == 0 { "t" } else { "other" };
            env.cmd()
                .args(["branch", "-w", w, "create", "race", "--from", from])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let won = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .filter(|o| o.status.success())
        .count();
    assert_eq!(won, 1, "creates that succeeded");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(ws.join("branches/race/branch.json")).unwrap()).unwrap();
    let served = fs::read(branch_dir(&at, "race").join("f")).unwrap();
    let want: &[u8] = if record["from"] == "t" {
        b"base\n"
    } else {
        b"other\n"
    };
    assert_eq!(served, want, "{record}");
    // Snapshot ids are never given out twice.
    let one = in_ws_json(&env, &ws, &["snapshot", "create"]);
    in_ws(
        &env,
        &ws,
        &["snapshot", "delete", one["id"].as_str().unwrap()],
    );
    let two = in_ws_json(&env, &ws, &["snapshot", "create"]);
    assert_ne!(one["id"], two["id"]);
    // What a snapshot cannot keep is said.
    let status = Command::new("mkfifo")
        .arg(at.join("fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let snap = in_ws_json(&env, &ws, &["snapshot", "create"]);
    assert_eq!(snap["not_committed"], serde_json::json!(["fifo"]), "{snap}");
    fs::remove_file(at.join("fifo")).unwrap();
    // Pins: the owner's alone, and none left once unmounted.
    let pins = env.store.join("pins");
    let modes: Vec<u32> = fs::read_dir(&pins)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().permissions().mode() & 0o777)
        .collect();
    assert!(
        !modes.is_empty() && modes.iter().all(|m| m & 0o022 == 0),
        "{modes:?}"
    );
    // A second mount of a mounted workspace names the first.
    let again = env.path("again");
    fs::create_dir_all(&again).unwrap();
    let said = env.fails(&["workspace", "mount", w, again.to_str().unwrap()]);
    assert!(said.contains("mounted already"), "{said}");
    drop(mounted);
    assert_eq!(
        fs::read_dir(&pins).unwrap().count(),
        0,
        "pins left after unmounting"
    );
    // A file as a mount point, a workspace inside the store: refused at once.
    let file = env.path("a-file");
    fs::write(&file, b"").unwrap();
    let said = env.fails(&["workspace", "mount", w, file.to_str().unwrap()]);
    assert!(said.contains("not a directory"), "{said}");
    let inside = env.store.join("ws-inside");
    let said = env.fails(&["workspace", "init", inside.to_str().unwrap(), "--from", "t"]);
    assert!(said.contains("inside the store"), "{said}");
    assert!(!inside.exists());
    env.fsck_ok();
}

/// A host lower with names that are not UTF-8 is sealed exactly (a lossy path once made
/// every snapshot fail, and let a host change go unchecked under a look-alike name), no
/// seal leaves a root behind, a symlink's time is applied, and an apply into the
/// workspace's own lower is refused.
#[test]
fn a_host_lower_with_non_utf8_names_seals_exactly_and_leaves_no_roots() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    let host = env.path("host");
    fs::create_dir_all(&host).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"a\xff");
    fs::write(host.join(odd), b"orig\n").unwrap();
    fs::write(host.join("plain"), b"plain\n").unwrap();
    let (ws, mounted, _) = lower_workspace(&env, &host);
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    let snap = in_ws_json(&env, &ws, &["snapshot", "create"]);
    let tree = snap["tree"].as_str().unwrap().to_string();
    let cat = env.cmd().args(["cat", &tree]).arg(odd).output().unwrap();
    assert_eq!(cat.stdout, b"orig\n");
    // Seals and diffs of the host make no roots of their own (each once left an unnamed
    // root keeping that version of the host for ever).
    let _ = env.run(&["diff", "-w", w, "main", &tree]);
    in_ws(&env, &ws, &["snapshot", "create"]);
    let roots = env.json(&["roots"]);
    let unnamed = roots["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"].is_null())
        .count();
    assert_eq!(unnamed, 0, "{roots}");
    // The look-alike name written in main, then the host's own file changed: refused.
    fs::write(at.join("a\u{fffd}"), b"mine\n").unwrap();
    fs::write(host.join(odd), b"HOSTNEW\n").unwrap();
    let said = env.fails(&["snapshot", "-w", w, "create"]);
    assert!(
        said.contains("changed since the workspace was made"),
        "{said}"
    );
    assert!(said.contains("a\\xff"), "{said}");
    // A branch's symlink is applied with its time; never into the lower itself.
    // (From the first snapshot: main cannot be sealed any more.)
    in_ws(&env, &ws, &["branch", "create", "fix", "--from", "1"]);
    let link = branch_dir(&at, "fix").join("link");
    std::os::unix::fs::symlink("plain", &link).unwrap();
    common::touch_ns(&link, 1_000_000_000, 5);
    let said = env.fails(&["branch", "-w", w, "apply", "fix", host.to_str().unwrap()]);
    assert!(said.contains("own --lower"), "{said}");
    let checkout = env.path("checkout");
    fs::create_dir_all(&checkout).unwrap();
    fs::write(checkout.join(odd), b"orig\n").unwrap();
    fs::write(checkout.join("plain"), b"plain\n").unwrap();
    in_ws(
        &env,
        &ws,
        &["branch", "apply", "fix", checkout.to_str().unwrap()],
    );
    let meta = fs::symlink_metadata(checkout.join("link")).unwrap();
    assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_000_000_000, 5));
    drop(mounted);
    env.fsck_ok();
}

/// Fills the file system at `dir` but `kib` KiB (what `df` says is free, after a sync).
fn fill_leaving(dir: &Path, kib: u64) {
    let path = dir.join("fill");
    let _ = fs::remove_file(&path);
    let _ = Command::new("sync").arg("-f").arg(dir).status();
    let df = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    let free: u64 = String::from_utf8_lossy(&df.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df {}: {df:?}", dir.display()));
    let mut left = free.saturating_sub(kib << 10);
    let mut file = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        match file.write(&chunk[..n]) {
            Ok(0) => break,
            Ok(n) => left -= n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    file.sync_all().unwrap();
}

/// The workspace roots (`ws.*`) the store lists.
fn workspace_roots(env: &Env) -> Vec<String> {
    env.json(&["roots"])["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .filter(|n| n.starts_with("ws."))
        .map(str::to_string)
        .collect()
}

/// A workspace init or branch create that fails on a full disk leaves nothing: once the
/// third red team found a half-made workspace directory (`init` again refused it as not
/// empty, and a root kept its base for good) and a half-made branch listed as an
/// interrupted create.
#[test]
fn an_init_or_a_branch_create_that_fails_on_a_full_disk_leaves_nothing() {
    let env = Env::new();
    let Some(disk) =
        common::LoopMount::new("ext4", &env.path("disk.img"), &env.path("disk"), 16, &[])
    else {
        return;
    };
    let env = Env {
        store: disk.point.join("store"),
        dir: tempfile::tempdir().unwrap(),
    };
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let kept = disk.point.join("kept");
    env.ok(&["workspace", "init", kept.to_str().unwrap(), "--from", "t"]);
    let first = workspace_roots(&env);
    let ws = disk.point.join("ws");
    let (mut inits_failed, mut creates_failed) = (0, 0);
    for kib in 0..16 {
        fill_leaving(&disk.point, kib);
        let out = env.run(&["workspace", "init", ws.to_str().unwrap(), "--from", "t"]);
        if out.status.success() {
            fs::remove_dir_all(&ws).unwrap();
            for root in workspace_roots(&env) {
                if !first.contains(&root) {
                    env.ok(&["forget", "--force", &root]);
                }
            }
        } else {
            inits_failed += 1;
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                !ws.exists() || fs::read_dir(&ws).unwrap().next().is_none(),
                "{kib} KiB free: {said}: left {:?}",
                common::listed_names(&ws)
            );
            assert_eq!(workspace_roots(&env), first, "{kib} KiB free: {said}");
        }
        let name = format!("b{kib}");
        let out = env.run(&["branch", "-w", kept.to_str().unwrap(), "create", &name]);
        if !out.status.success() {
            creates_failed += 1;
            let said = String::from_utf8_lossy(&out.stderr);
            let listed = env.json(&["branch", "-w", kept.to_str().unwrap(), "list"]);
            assert_eq!(
                listed["unfinished"],
                serde_json::json!([]),
                "{kib} KiB free: {said}"
            );
            assert_eq!(workspace_roots(&env), first, "{kib} KiB free: {said}");
        } else {
            env.ok(&["branch", "-w", kept.to_str().unwrap(), "delete", &name]);
        }
    }
    assert!(
        inits_failed > 0 && creates_failed > 0,
        "the disk never filled"
    );
    // With room again, the same init and create go through.
    fs::remove_file(disk.point.join("fill")).unwrap();
    env.ok(&["workspace", "init", ws.to_str().unwrap(), "--from", "t"]);
    env.ok(&["branch", "-w", kept.to_str().unwrap(), "create", "b0"]);
    env.fsck_ok();
}

/// Odd inputs of the third red team that need no mount; what each once did is said at it.
#[test]
fn odd_inputs_of_the_third_red_team_get_exact_output_and_clear_errors() {
    let env = Env::new();
    common::ingest_files(&env, "t", &[("a", b"1\n"), ("d/x", b"x\n")]);
    let ws = env.path("ws");
    let w = ws.to_str().unwrap();
    env.ok(&["workspace", "init", w, "--from", "t"]);
    // A message's newline does not make a second line of the listing (it once did).
    env.ok(&[
        "snapshot",
        "-w",
        w,
        "create",
        "-m",
        "one\n2\tforged\tmain\tline",
    ]);
    let list = env.ok(&["snapshot", "-w", w, "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.contains("one\\n2\\tforged"), "{list}");
    let shown = env.ok(&["snapshot", "-w", w, "show", "1"]);
    assert_eq!(shown.lines().count(), 5, "{shown}");
    // --json into a full stdout: said as a failed write of the output (once a bare "No
    // space left on device").
    let out = env
        .cmd()
        .args(["snapshot", "-w", w, "create", "--json"])
        .stdout(fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("writing the output"),
        "{said}"
    );
    // A file where a branch directory would be: listed as left over, and removable (once
    // neither `delete` nor `create` could remove it).
    fs::write(ws.join("branches/stray"), b"").unwrap();
    let listed = env.json(&["branch", "-w", w, "list"]);
    assert_eq!(listed["unfinished"], serde_json::json!(["stray"]));
    env.ok(&["branch", "-w", w, "delete", "stray"]);
    fs::write(ws.join("branches/stray"), b"").unwrap();
    env.ok(&["branch", "-w", w, "create", "stray"]);
    // An apply that fails after writing some of its changes says why it failed (once a
    // bare "creating PATH"). The branch's changes are written into its upper directly
    // (no server runs).
    env.ok(&["branch", "-w", w, "create", "b"]);
    let upper = ws.join("branches/b/upper");
    fs::write(upper.join("a"), b"2\n").unwrap();
    fs::create_dir(upper.join("d")).unwrap();
    fs::write(upper.join("d/z"), b"z\n").unwrap();
    let host = env.path("host");
    fs::create_dir_all(host.join("d")).unwrap();
    fs::write(host.join("a"), b"1\n").unwrap();
    fs::write(host.join("d/x"), b"x\n").unwrap();
    // Nothing can be made in the host's d (a is written first).
    let immutable = common::is_root()
        && Command::new("chattr")
            .arg("+i")
            .arg(host.join("d"))
            .status()
            .is_ok_and(|s| s.success());
    if !immutable {
        fs::set_permissions(host.join("d"), fs::Permissions::from_mode(0o555)).unwrap();
    }
    let said = env.fails(&["branch", "-w", w, "apply", "b", host.to_str().unwrap()]);
    if immutable {
        let _ = Command::new("chattr")
            .arg("-i")
            .arg(host.join("d"))
            .status();
    } else {
        fs::set_permissions(host.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(
        said.contains("1 of 2 changes were written before this") && said.contains("os error"),
        "{said}"
    );
    assert_eq!(fs::read(host.join("a")).unwrap(), b"2\n");
    // An applied name holding a newline is one line of the report, escaped as `velo
    // diff` shows it (it once forged a second "W" line).
    env.ok(&["branch", "-w", w, "create", "nl"]);
    fs::write(ws.join("branches/nl/upper/x\nW forged"), b"n\n").unwrap();
    let host = env.path("host-nl");
    fs::create_dir_all(host.join("d")).unwrap();
    fs::write(host.join("a"), b"1\n").unwrap();
    fs::write(host.join("d/x"), b"x\n").unwrap();
    let out = env.ok(&["branch", "-w", w, "apply", "nl", host.to_str().unwrap()]);
    assert_eq!(out, "W x\\nW forged\n");
    // Never into the workspace's own files or its store, even with --force (a branch's
    // workspace.json once replaced the workspace's record).
    fs::write(ws.join("branches/nl/upper/workspace.json"), b"{}").unwrap();
    for (target, extra) in [(ws.clone(), "--force"), (env.store.join("tmp"), "--force")] {
        let said = env.fails(&[
            "branch",
            "-w",
            w,
            "apply",
            "nl",
            target.to_str().unwrap(),
            extra,
        ]);
        assert!(said.contains("inside the workspace's"), "{said}");
    }
    env.ok(&["branch", "-w", w, "list"]);
    env.fsck_ok();
}

/// A host file its user may not read, in a `--lower` workspace: a snapshot of main is
/// refused while main shows it, naming it, and made once main deleted it (every snapshot
/// of main once failed for good, deleted or not: the seal's ingest read the whole host).
#[test]
fn a_host_file_the_user_may_not_read_blocks_a_snapshot_only_while_main_shows_it() {
    if !common::require(common::is_root(), "root (to become uid 65534 with setpriv)")
        || !common::require(common::find_tool("setpriv").is_some(), "setpriv")
    {
        return;
    }
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let work = env.path("work");
    fs::create_dir_all(&work).unwrap();
    let chown = Command::new("chown")
        .args(["65534:65534"])
        .arg(&work)
        .status()
        .unwrap();
    assert!(chown.success());
    let run = format!(
        "set -e; w=\"$1\"; cd \"$w\"; v() {{ \"{}\" --store \"$w/store\" \"$@\"; }}; \
         mkdir host; echo a > host/a; echo s > host/secret; chmod 000 host/secret; \
         v workspace init ws --lower host 2>/dev/null; \
         if v snapshot -w ws create >/dev/null 2>err; then echo sealed-while-shown; fi; \
         grep -q 'secret: this user may not read it' err && echo said; \
         mknod ws/branches/main/upper/secret c 0 0; \
         tree=$(v snapshot -w ws create 2>/dev/null | cut -d' ' -f2); \
         v ls \"$tree\"",
        common::velo_bin().display()
    );
    let out = common::as_nobody()
        .args(["/bin/sh", "-c", &run, "sh"])
        .arg(&work)
        .env_remove("VR_THE_SOURCE")
        .env_remove("VELO_WORKSPACE")
        .env("HOME", &work)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "said\na\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mount point unmounted by hand while a `branch exec` command still runs in its
/// view: the server keeps serving that command, and a snapshot meanwhile says so (it
/// once said "another run is using this upper ... two overlays"), and goes through once
/// the command ended.
#[test]
fn a_snapshot_while_an_unmounted_server_still_serves_a_branch_exec_says_so() {
    if !fuse_available() || !common::require(can_unshare(), "mount namespaces (unshare)") {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "k"]);
    fs::write(branch_dir(&at, "k").join("f"), b"k\n").unwrap();
    let mut child = env
        .cmd()
        .args(["branch", "-w", ws.to_str().unwrap(), "exec", "k", "--"])
        .args(["sh", "-c", "echo in; read _; true"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "in\n");
    let tool = common::find_tool("fusermount3").unwrap_or_else(|| "umount".into());
    let unmounted = Command::new(&tool).arg("-u").arg(&at).status().unwrap();
    assert!(unmounted.success());
    let said = env.fails(&[
        "snapshot",
        "-w",
        ws.to_str().unwrap(),
        "create",
        "--branch",
        "k",
    ]);
    assert!(said.contains("branch exec"), "{said}");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    // The server ends with the command's view; then the snapshot is made without it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = env.run(&[
            "snapshot",
            "-w",
            ws.to_str().unwrap(),
            "create",
            "--branch",
            "k",
        ]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(mounted);
}

/// A copy of a workspace directory (`cp -a ws ws2`) has the original's id, and so its
/// roots: a snapshot deleted in the copy once unregistered the original's, and gc freed a
/// tree the original's snapshot still named. A copy is refused while the original is
/// there; a moved workspace works.
#[test]
fn a_copied_workspace_is_refused_while_its_original_is_there_and_a_moved_one_works() {
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let ws = env.path("ws");
    let w = ws.to_str().unwrap();
    env.ok(&["workspace", "init", w, "--from", "t"]);
    // A change only the snapshot keeps (written into main's upper: no server runs).
    fs::write(
        ws.join("branches/main/upper/only"),
        b"only in the snapshot\n",
    )
    .unwrap();
    env.ok(&["snapshot", "-w", w, "create"]);
    fs::remove_file(ws.join("branches/main/upper/only")).unwrap();
    let copy = env.path("copy");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&ws)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(copied.success());
    let said = env.fails(&["snapshot", "-w", copy.to_str().unwrap(), "delete", "1"]);
    assert!(said.contains("a copy of workspace"), "{said}");
    env.ok(&["gc", "--run"]);
    env.ok(&["branch", "-w", w, "create", "b", "--from", "1"]);
    // Moved: the same workspace, at its new path.
    let moved = env.path("moved");
    fs::rename(&ws, &moved).unwrap();
    let list = env.ok(&["snapshot", "-w", moved.to_str().unwrap(), "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    env.fsck_ok();
}

/// `branch exec` from a working directory the branch's view does not have (one only main
/// has, or another branch's directory) is refused: the command once ran there, in the
/// other branch, with `$VELO_BRANCH` naming this one.
#[test]
fn branch_exec_from_a_directory_the_branch_does_not_have_is_refused() {
    if !fuse_available() || !common::require(can_unshare(), "mount namespaces (unshare)") {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = workspace(&env, "t");
    let at = mounted.at.clone();
    in_ws(&env, &ws, &["branch", "create", "k"]);
    in_ws(&env, &ws, &["branch", "create", "x"]);
    fs::create_dir(at.join("only-main")).unwrap();
    for cwd in [at.join("only-main"), branch_dir(&at, "x")] {
        let out = env
            .cmd()
            .args(["branch", "-w", ws.to_str().unwrap(), "exec", "k", "--"])
            .args(["sh", "-c", "echo made > here"])
            .current_dir(&cwd)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{}: {said}", cwd.display());
        assert!(said.contains("working directory"), "{said}");
        assert!(!cwd.join("here").exists(), "{}", cwd.display());
    }
    // From the mount point itself, or outside it, as before.
    exec_in(
        &env,
        &ws,
        "k",
        &format!("cd {} && echo ok > here", at.display()),
    );
    assert!(branch_dir(&at, "k").join("here").exists());
    // From the branch's own directory under .velo/branches: there, as the mount point.
    fs::create_dir(branch_dir(&at, "k").join("sub")).unwrap();
    let out = env
        .cmd()
        .args(["branch", "-w", ws.to_str().unwrap(), "exec", "k", "--"])
        .args(["sh", "-c", "echo own > here-too; pwd"])
        .current_dir(branch_dir(&at, "k").join("sub"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        at.join("sub").to_str().unwrap()
    );
    assert!(branch_dir(&at, "k").join("sub/here-too").exists());
    drop(mounted);
}

/// A damaged branch record (emptied by hand, or by a disk) hides no other branch and can
/// be deleted: it once made `branch list` and `workspace mount` fail outright, and
/// `branch delete` of it fail too, while `branch create` of its name said it exists.
#[test]
fn a_damaged_branch_record_hides_no_other_branch_and_can_be_deleted() {
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let ws = env.path("ws");
    let w = ws.to_str().unwrap();
    env.ok(&["workspace", "init", w, "--from", "t"]);
    env.ok(&["branch", "-w", w, "create", "good"]);
    env.ok(&["branch", "-w", w, "create", "bad"]);
    // One naming a branch other than its directory's (edited by hand) is damaged too.
    let good = fs::read_to_string(ws.join("branches/good/branch.json")).unwrap();
    fs::write(
        ws.join("branches/bad/branch.json"),
        good.replace("\"good\"", "\"../../elsewhere\""),
    )
    .unwrap();
    let said = env.fails(&["branch", "-w", w, "reset", "bad", "main"]);
    assert!(said.contains("names branch"), "{said}");
    let list = env.json(&["branch", "-w", w, "list"]);
    assert_eq!(list["damaged"], serde_json::json!(["bad"]), "{list}");
    fs::write(ws.join("branches/bad/branch.json"), b"").unwrap();
    let out = env.run(&["branch", "-w", w, "list", "--json"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("bad") && said.contains("damaged"), "{said}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["damaged"], serde_json::json!(["bad"]), "{list}");
    assert_eq!(list["branches"].as_array().unwrap().len(), 2, "{list}");
    if fuse_available() {
        let at = env.path("mnt");
        fs::create_dir_all(&at).unwrap();
        let out = env.run(&["workspace", "mount", w, at.to_str().unwrap()]);
        let mounted = Mounted {
            env: &env,
            at: at.clone(),
        };
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("branch bad is not served"), "{said}");
        assert_eq!(
            fs::read(branch_dir(&at, "good").join("f")).unwrap(),
            b"base\n"
        );
        env.ok(&["branch", "-w", w, "delete", "bad"]);
        drop(mounted);
    } else {
        env.ok(&["branch", "-w", w, "delete", "bad"]);
    }
    assert!(!ws.join("branches/bad").exists());
    env.ok(&["branch", "-w", w, "create", "bad"]);
    env.fsck_ok();
}

/// A fifo whose name is not UTF-8, in a branch sealed without a server: the snapshot
/// names it as not kept (it once panicked making the JSON of that list, after the
/// snapshot was recorded).
#[test]
fn a_snapshot_names_a_fifo_whose_name_is_not_utf8_without_panicking() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let ws = env.path("ws");
    let w = ws.to_str().unwrap();
    env.ok(&["workspace", "init", w, "--from", "t"]);
    let fifo = ws
        .join("branches/main/upper")
        .join(std::ffi::OsStr::from_bytes(b"fifo\xff"));
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for json in [false, true] {
        let mut args = vec!["snapshot", "-w", w, "create"];
        args.extend(json.then_some("--json"));
        let out = env.run(&args);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        if json {
            let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(made["not_committed"], serde_json::json!(["fifo\u{fffd}"]));
        } else {
            assert!(said.contains("not kept"), "{said}");
        }
    }
}

/// A snapshot record whose tree is no hash (edited by hand) is reported as damaged, as
/// one that is no JSON is: `snapshot list` once panicked on it.
#[test]
fn a_snapshot_record_naming_no_tree_is_reported_as_damaged() {
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let ws = env.path("ws");
    let w = ws.to_str().unwrap();
    env.ok(&["workspace", "init", w, "--from", "t"]);
    env.ok(&["snapshot", "-w", w, "create"]);
    env.ok(&["snapshot", "-w", w, "create"]);
    let path = ws.join("snapshots/1.json");
    let mut record: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    record["tree"] = "abc".into();
    fs::write(&path, record.to_string()).unwrap();
    let out = env.run(&["snapshot", "-w", w, "list"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1.json: a damaged snapshot record"), "{said}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    env.ok(&["snapshot", "-w", w, "delete", "1"]);
}

/// `init --lower` over a host directory holding a subdirectory this user may not list:
/// refused, naming it and what to do (it said a bare "listing ...: Permission denied").
#[test]
fn init_lower_over_a_directory_this_user_may_not_list_says_what_to_do() {
    if !common::require(common::is_root(), "root (to run velo as nobody)")
        || !common::require(common::find_tool("setpriv").is_some(), "setpriv")
    {
        return;
    }
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let work = env.path("work");
    fs::create_dir_all(&work).unwrap();
    let chown = Command::new("chown")
        .args(["65534:65534"])
        .arg(&work)
        .status()
        .unwrap();
    assert!(chown.success());
    let run = format!(
        "w=\"$1\"; cd \"$w\"; mkdir -p host/closed; echo a > host/a; chmod 000 host/closed; \
         \"{}\" --store \"$w/store\" workspace init ws --lower host",
        common::velo_bin().display()
    );
    let out = common::as_nobody()
        .args(["/bin/sh", "-c", &run, "sh"])
        .arg(&work)
        .env_remove("VR_THE_SOURCE")
        .env_remove("VELO_WORKSPACE")
        .env("HOME", &work)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("closed") && said.contains("may not list it"),
        "{said}"
    );
}
