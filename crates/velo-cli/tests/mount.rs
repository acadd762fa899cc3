//! `velo mount TREE MOUNTPOINT` / `velo umount`: the FUSE server, reading (its writes are
//! in mount_writes.rs). Needs /dev/fuse and either root or fusermount3: elsewhere the
//! tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{fuse_available, mount_with, server_pid, Env, Mounted};

fn mount<'a>(env: &'a Env, tree: &str, at: &Path) -> Mounted<'a> {
    mount_with(env, tree, at, &[])
}

#[test]
fn a_read_only_mount_shows_every_entry_exactly_and_refuses_changes() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    common::awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let want = common::scan(&src);
    let at = env.path("mnt");
    let mounted = mount_with(&env, "t", &at, &["--read-only"]);
    // Names, kinds, modes, sizes, mtimes (ns), contents and symlink targets.
    assert_eq!(common::scan(&at), want);
    let err = fs::write(at.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::remove_file(at.join("plain.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // Real tools read it as they read any directory.
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . | sort | wc -l && du -sb --apparent-size plain.txt")
        .current_dir(&at)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().next(),
        Some((want.len() + 1).to_string().as_str()),
        "{text}"
    );
    // gc runs beside the mount (no waiting for it) and keeps the tree it serves, even
    // with no root left that reaches it.
    env.ok(&["forget", "t"]);
    let gc = common::gc_within_a_minute(&env);
    assert_eq!(gc["serving"], 1, "{gc}");
    assert_eq!(gc["trees"], 0, "{gc}");
    assert_eq!(common::scan(&at), want);
    drop(mounted);
    // Unmounted: its pin is gone, and with it what kept the tree.
    let gc = common::gc_within_a_minute(&env);
    assert_eq!(gc["serving"], 0, "{gc}");
    assert!(gc["trees"].as_u64().unwrap() >= 1, "{gc}");
    assert!(gc["blobs"].as_u64().unwrap() >= 1, "{gc}");
    assert!(
        fs::read_dir(&at).unwrap().next().is_none(),
        "the mount point is empty again after velo umount"
    );
    env.fsck_ok();
}

#[test]
fn a_mount_whose_server_died_is_cleaned_up_and_bad_mount_points_are_refused() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"f\n")]);
    let at = env.path("mnt");
    let _mounted = mount(&env, "t", &at);
    assert_eq!(fs::read(at.join("f")).unwrap(), b"f\n");
    // Kill the server: the mount point is dead (ENOTCONN) until cleaned up.
    let out = Command::new("pkill")
        .args([
            "-9",
            "-f",
            &format!("mount [0-9a-f]+ {} --foreground", at.display()),
        ])
        .status()
        .unwrap();
    assert!(out.success(), "no server process found");
    let mut dead = false;
    for _ in 0..100 {
        if fs::read_dir(&at).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)) {
            dead = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(dead, "the mount did not die with its server");
    // Its pin stays behind, unlocked: gc removes it and keeps nothing for it.
    let gc = common::gc_within_a_minute(&env);
    assert_eq!(
        (gc["serving"].clone(), gc["dead_pins"].clone()),
        (0.into(), 1.into()),
        "{gc}"
    );
    // The next mount cleans it up, saying so.
    let out = env.run(&["mount", "t", at.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("server died"));
    assert_eq!(fs::read(at.join("f")).unwrap(), b"f\n");
    // A second mount on a live one, a mount point in the store, a missing one: refused.
    let again = env.fails(&["mount", "t", at.to_str().unwrap()]);
    assert!(again.contains("already a FUSE mount"), "{again}");
    let inside = env.store.join("views");
    let refused = env.fails(&["mount", "t", inside.to_str().unwrap()]);
    assert!(refused.contains("inside the store"), "{refused}");
    let missing = env.fails(&["mount", "t", env.path("nope").to_str().unwrap()]);
    assert!(missing.contains("make the directory first"), "{missing}");
    let not_mount = env.fails(&["umount", env.path("src").to_str().unwrap()]);
    assert!(not_mount.contains("not a velo mount"), "{not_mount}");
}

/// What the red-team run of the mount found: many readers at once ran the server out of
/// descriptors (EIO), and a server stopped by a signal left a dead mount.
#[test]
fn many_readers_at_once_and_a_signalled_server_leave_no_error_and_no_dead_mount() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("many")).unwrap();
    for i in 0..3000 {
        fs::write(src.join(format!("many/f{i}")), format!("{i}\n")).unwrap();
    }
    env.ingest(&src, &["--name", "t"]);
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let out = env.run(&["--json", "mount", "t", at.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mounted"], at.to_str().unwrap());
    let mounted = Mounted {
        env: &env,
        at: at.clone(),
    };
    // 24 readers over every file, each opening one file at a time.
    let out = Command::new("sh")
        .arg("-c")
        .arg("for i in $(seq 24); do (find many -type f | xargs -n 100 cat > /dev/null) & done; wait; echo done")
        .current_dir(&at)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "done\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGTERM to the server: it unmounts before it goes.
    let pid = server_pid(&at).expect("the server runs");
    assert!(Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success());
    let gone = (0..250).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(gone, "the server did not stop on SIGTERM");
    assert!(
        fs::read_dir(&at).unwrap().next().is_none(),
        "the mount point is an empty directory again, not a dead mount"
    );
    drop(mounted);
}
