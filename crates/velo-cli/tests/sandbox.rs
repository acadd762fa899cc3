//! `velo run --isolate`: the rootless sandbox over cached link farms, and its commits.
//! Needs user namespaces, overlayfs in them, and Debian's busybox-static (scripts/test.sh
//! installs it); under CI a missing piece fails the test with the reason.

mod common;
#[path = "common/sandbox_env.rs"]
mod sandbox_env;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use sandbox_env::{layers, run, sandbox_supported};

#[test]
fn the_usage_guide_example_prints_uid_0_and_exit_codes_propagate() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let out = run(&env, &busybox, &app, &[], "id -u");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    for code in [0, 1, 7, 42, 255] {
        let out = run(&env, &busybox, &app, &[], &format!("exit {code}"));
        assert_eq!(out.status.code(), Some(code));
    }
    // The layers are there, the host is not.
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        "cat /app/hello.sh; test -e /work && echo HOST; ls /dev; hostname",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hello from app"), "{text}");
    assert!(
        !text.contains("HOST"),
        "host paths leak into the sandbox: {text}"
    );
    for dev in ["null", "zero", "full", "random", "urandom", "tty"] {
        assert!(text.lines().any(|l| l == dev), "/dev/{dev} missing: {text}");
    }
    env.fsck_ok();
}

#[test]
fn commit_captures_new_changed_deleted_symlinked_chmodded_and_opaque() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let out_velo = env.path("out.velo");
    let script = "echo new > /app/new && echo changed > /app/hello.sh && rm /app/gone && ln -s hello.sh /app/link \
                  && chmod 700 /app/mode && rm -rf /app/dir && mkdir /app/dir && echo z > /app/dir/z && mkdir -p /opt/x";
    let out = run(
        &env,
        &busybox,
        &app,
        &["--commit", out_velo.to_str().unwrap(), "--name", "after"],
        script,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_velo.is_file());
    let cat = |path: &str| env.ok(&["cat", "after", path]);
    assert_eq!(cat("app/new"), "new\n");
    assert_eq!(cat("app/hello.sh"), "changed\n");
    assert_eq!(cat("app/dir/z"), "z\n");
    assert!(env
        .fails(&["show", "after", "app/gone"])
        .contains("does not exist"));
    assert!(
        env.fails(&["show", "after", "app/dir/old"])
            .contains("does not exist"),
        "an opaque dir hides the lower"
    );
    assert_eq!(
        env.json(&["show", "after", "app/link"])["target"],
        "hello.sh"
    );
    assert_eq!(env.json(&["show", "after", "app/mode"])["mode"], 0o700);
    assert_eq!(env.json(&["show", "after", "opt/x"])["kind"], "dir");
    let busybox_bytes = env.run(&["cat", "after", "bin/busybox"]).stdout;
    assert_eq!(
        busybox_bytes,
        fs::read("/bin/busybox").unwrap(),
        "the base layer is in the commit, unchanged"
    );
    // The committed manifest runs: the new tree is a layer like any other.
    let out = run(&env, &busybox, &out_velo, &[], "cat /app/new");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "new\n");
    env.fsck_ok();
}

#[test]
fn writes_stay_in_their_run_and_never_reach_the_store() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let before = fs::read("/bin/busybox").unwrap();
    // As root inside: overwrite the shell's own binary through a copy of it, append to a
    // layer file, chmod a farm file.
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        "cp /bin/busybox /tmp/busybox && exec /tmp/busybox sh -c 'echo x > /bin/busybox && echo more >> /app/hello.sh \
         && chmod 777 /app/gone && echo written > /app/leak && cat /bin/busybox'",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "x\n",
        "the write happened inside"
    );
    env.fsck_ok();
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        "test ! -e /app/leak && cat /app/hello.sh && /bin/busybox true && echo clean",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text, "echo hello from app\nclean\n",
        "a write leaked into the next run"
    );
    let hash = velo_core::Hash::of_blob(&before).to_hex();
    let blob = env.store.join("blobs").join(&hash[..2]).join(&hash);
    assert_eq!(fs::read(blob).unwrap(), before);
}

#[test]
fn sigterm_reaches_the_command_and_nothing_is_left_behind() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let marker = format!("velo-sigterm-test-{}", std::process::id());
    let mut child = env
        .cmd()
        .args(["run", "--isolate", "--base"])
        .arg(&busybox)
        .arg("--manifest")
        .arg(&app)
        .args(["--", "/bin/sh", "-c", &format!("trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 1; done # {marker}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"ready\n");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "velo run did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(
        rest.contains("got-term"),
        "the command did not see SIGTERM: {rest:?}"
    );
    assert_eq!(status.code(), Some(3));
    std::thread::sleep(Duration::from_millis(200));
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(&marker),
        "processes survived the run"
    );
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(env.store.to_str().unwrap()),
        "mounts survived the run"
    );
    let sessions = env.store.join("sessions");
    assert_eq!(
        fs::read_dir(&sessions).map(|d| d.count()).unwrap_or(0),
        0,
        "session left behind"
    );
}

#[test]
fn two_runs_share_the_cached_farms_at_once() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let first = env.json(&[
        "run",
        "--isolate",
        "--base",
        busybox.to_str().unwrap(),
        "--manifest",
        app.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert_eq!(
        first["farms_built"].as_array().unwrap().len(),
        2,
        "the first run builds both farms"
    );
    let spawn = || {
        env.cmd()
            .args(["--json", "run", "--isolate", "--base"])
            .arg(&busybox)
            .arg("--manifest")
            .arg(&app)
            .args([
                "--",
                "/bin/sh",
                "-c",
                "sleep 1; echo $$ > /tmp/pid; cat /app/hello.sh",
            ])
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    for out in [a, b] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(
            &out.stdout[out.stdout.iter().position(|&c| c == b'{').unwrap()..],
        )
        .unwrap();
        assert!(
            json["farms_built"].as_array().unwrap().is_empty(),
            "farms must be reused"
        );
    }
}

#[test]
fn escape_attempts_fail() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let store = env.store.to_str().unwrap().to_string();
    // The store is not there, mounting over /bin changes nothing outside, /proc shows only
    // the sandbox's processes.
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        &format!("test -e {store} && echo STORE; mount -t tmpfs none /bin 2>/dev/null; ls /proc | grep -c '^[0-9]'"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("STORE"), "{text}");
    let procs: u32 = text.trim().lines().last().unwrap().parse().unwrap();
    assert!(procs <= 4, "host processes visible: {procs}");
    let out = run(&env, &busybox, &app, &[], "/bin/busybox true && echo ok");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    env.fsck_ok();
    // `..` games with --bind and --workdir are refused before anything runs.
    let host = env.path("hostdir");
    fs::create_dir_all(&host).unwrap();
    for bad in [
        format!("{}:/../../etc", host.display()),
        format!("{}:relative", host.display()),
        format!("{}:/a/./b", host.display()),
    ] {
        let err = env.fails(&[
            "run",
            "--isolate",
            "--manifest",
            app.to_str().unwrap(),
            "--bind",
            &bad,
            "--",
            "/bin/true",
        ]);
        assert!(err.contains("--bind"), "{err}");
    }
    let err = env.fails(&[
        "run",
        "--isolate",
        "--manifest",
        app.to_str().unwrap(),
        "--workdir",
        "/../x",
        "--",
        "/bin/true",
    ]);
    assert!(err.contains("workdir"), "{err}");
    // A bind works, read-only when asked.
    fs::write(host.join("f"), b"from host").unwrap();
    let bind = format!("{}:/mnt/host:ro", host.display());
    let out = run(
        &env,
        &busybox,
        &app,
        &["--bind", &bind],
        "cat /mnt/host/f; echo x > /mnt/host/g 2>/dev/null || echo refused",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from hostrefused\n");
    assert!(!host.join("g").exists());
}

#[test]
fn an_unprivileged_user_runs_with_their_own_store() {
    if !sandbox_supported()
        || !common::require(
            common::is_root(),
            "root (to become another user with setpriv)",
        )
    {
        return;
    }
    let env = Env::new();
    let home = env.path("nobody-home");
    fs::create_dir_all(&home).unwrap();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(Command::new("chown")
        .arg("65534:65534")
        .arg(&home)
        .status()
        .unwrap()
        .success());
    let (busybox, app) = layers(&env);
    // The user's store starts empty: the app layer must carry its blobs.
    let app_full = env.path("app-full.velo");
    let root = env.json(&["show", app.to_str().unwrap(), "/"])["hash"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&[
        "export",
        &root,
        "-o",
        app_full.to_str().unwrap(),
        "--with-blobs",
    ]);
    let app = app_full;
    for f in [&busybox, &app] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = common::as_nobody()
        .arg(common::velo_bin())
        .args(["run", "--isolate", "--base"])
        .arg(&busybox)
        .arg("--manifest")
        .arg(&app)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "id -u; echo hi > /tmp/x; cat /app/hello.sh",
        ])
        .env("HOME", &home)
        .env_remove("VR_THE_SOURCE")
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0\necho hello from app\n"
    );
    assert!(
        home.join(".local/share/velo/VERSION").is_file(),
        "the user's own store was created"
    );
}

#[test]
fn without_user_namespaces_run_fails_with_the_reason_and_doctor_says_so() {
    if !sandbox_supported()
        || !common::require(
            common::find_tool("unshare").is_some(),
            "unshare (util-linux)",
        )
    {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    // Inside a user namespace of our own, forbid further ones: the machine stays untouched.
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && {velo} --store {store} run --isolate --base {bb} --manifest {app} -- /bin/true; \
         echo exit=$?; {velo} --store {store} doctor",
        velo = common::velo_bin().display(),
        store = env.store.display(),
        bb = busybox.display(),
        app = app.display()
    );
    let out = Command::new("unshare")
        .args(["-Ur", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("exit=125"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("user namespaces") && stderr.contains("velo doctor"),
        "{stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("no") && l.contains("user namespaces")),
        "{stdout}"
    );
}

#[test]
fn a_kept_upper_persists_across_runs_in_overlay_format_and_commits_later() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let upper = env.path("kept-upper");
    let upper_arg = upper.to_str().unwrap();
    let out = run(
        &env,
        &busybox,
        &app,
        &["--upper", upper_arg],
        "echo kept > /app/kept && rm /app/gone",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(upper.join("app/kept")).unwrap(), b"kept\n");
    let whiteout = fs::symlink_metadata(upper.join("app/gone")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(
        whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
        "a deletion is a 0/0 whiteout"
    );
    let leftovers: Vec<_> = fs::read_dir(env.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("velo-work"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the overlay work directory is removed after the run"
    );
    let out = run(
        &env,
        &busybox,
        &app,
        &["--upper", upper_arg, "--name", "later"],
        "cat /app/kept; test ! -e /app/gone && echo gone",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\ngone\n");
    assert_eq!(env.ok(&["cat", "later", "app/kept"]), "kept\n");
    assert!(env
        .fails(&["show", "later", "app/gone"])
        .contains("does not exist"));
}

/// The commit of a run's upper stages its new objects and flushes once before any of them
/// becomes visible in the store, as ingest does: a power cut can never leave a blob or
/// tree named after bytes that are not on disk.
#[test]
fn a_commit_flushes_before_its_objects_become_visible() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    env.ok(&["import", busybox.to_str().unwrap(), "--name", "bb"]);
    env.ok(&["import", app.to_str().unwrap(), "--name", "app"]);
    // A first run builds the farms (and their executable variants), so the traced run
    // publishes only what its commit makes.
    let warm = env
        .cmd()
        .args([
            "run",
            "--isolate",
            "--base",
            "bb",
            "--manifest",
            "app",
            "--",
            "/bin/true",
        ])
        .output()
        .unwrap();
    assert!(
        warm.status.success(),
        "{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    let Some(trace) = common::traced(
        &env,
        &[
            "run",
            "--isolate",
            "--base",
            "bb",
            "--manifest",
            "app",
            "--name",
            "after",
            "--",
            "/bin/sh",
            "-c",
            "echo brand new content > /app/new && mkdir -p /opt/y && echo more > /opt/y/z",
        ],
    ) else {
        return;
    };
    common::assert_flushed_before_published("run --name (commit)", &trace, &env.store);
    let out = env.ok(&["cat", "after", "opt/y/z"]);
    assert_eq!(out, "more\n");
    env.fsck_ok();
}

// The start-up of `velo run --isolate --manifest app.velo`: an unchanged `.velo` is
// verified and imported once, then not even opened; a change, a forgotten root or a
// damaged cache entry makes the next run verify it again, without failing.

/// Runs `/bin/true` over `manifest` with debug logs; returns stderr.
fn run_true(env: &Env, manifest: &std::path::Path) -> String {
    let out = env
        .cmd()
        .env("VRIFT_DEBUG", "debug")
        .args(["run", "--isolate", "--manifest"])
        .arg(manifest)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "velo run failed: {stderr}");
    stderr
}

fn verified(stderr: &str) -> bool {
    let verified = stderr.contains("verified and imported");
    assert_ne!(
        verified,
        stderr.contains("import cache hit"),
        "expected exactly one of a verification or a cache hit: {stderr}"
    );
    verified
}

/// Files changed less than 2 s before a run are never remembered (a second change within
/// the same timestamp tick would go unseen); wait that out.
fn age() {
    std::thread::sleep(Duration::from_millis(2100));
}

#[test]
fn an_unchanged_manifest_file_is_read_once_across_runs() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (manifest, _) = layers(&env);
    age();

    let first = run_true(&env, &manifest);
    assert!(verified(&first), "{first}");
    assert!(!verified(&run_true(&env, &manifest)));
    // Not opened at all: the file's stat is the whole cost.
    if let Some(strace) = common::find_tool("strace") {
        let log = env.path("open.log");
        let out = Command::new(strace)
            .args(["-f", "-qq", "-e", "trace=open,openat,openat2", "-o"])
            .arg(&log)
            .arg(common::velo_bin())
            .arg("--store")
            .arg(&env.store)
            .args(["run", "--isolate", "--manifest"])
            .arg(&manifest)
            .args(["--", "/bin/true"])
            .env_remove("VR_THE_SOURCE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace = fs::read_to_string(&log).unwrap();
        let name = manifest.to_str().unwrap();
        let opens: Vec<&str> = trace.lines().filter(|l| l.contains(name)).collect();
        assert!(opens.is_empty(), "the unchanged file was opened: {opens:?}");
    } else {
        common::require(false, "strace (scripts/test.sh installs it)");
    }

    // A damaged entry costs a verification, never a failed run.
    let cache = env.store.join("cache");
    let entries: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("import-")
        })
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    fs::write(&entries[0], b"not an entry").unwrap();
    assert!(verified(&run_true(&env, &manifest)));
    assert!(!verified(&run_true(&env, &manifest)));

    // A forgotten root (gc may take its objects): verified and registered again.
    let root = first
        .split("root=")
        .nth(1)
        .and_then(|rest| rest.get(..64))
        .expect("the debug log names the root");
    env.ok(&["forget", root]);
    assert!(verified(&run_true(&env, &manifest)));
    assert!(!verified(&run_true(&env, &manifest)));

    // The same bytes written again (same size, new mtime and ctime): verified again.
    let bytes = fs::read(&manifest).unwrap();
    fs::write(&manifest, &bytes).unwrap();
    assert!(verified(&run_true(&env, &manifest)));
    env.fsck_ok();
}

/// The commit of an upper hashes a file before it copies it, and copies only content the
/// store lacks: a file copied up unchanged (here by a chmod) commits even when the store's
/// file system has less room than the file (copy-first failed with ENOSPC).
#[test]
fn an_unchanged_copied_up_file_commits_without_room_for_a_copy() {
    if !sandbox_supported() {
        return;
    }
    let mut env = Env::new();
    let Some(mount) =
        common::LoopMount::new("ext4", &env.path("small.img"), &env.path("mnt"), 64, &[])
    else {
        return;
    };
    env.store = mount.point.join("store");
    let (busybox, _) = layers(&env);
    let big = env.path("big-src");
    fs::create_dir(&big).unwrap();
    let content: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(big.join("big"), &content).unwrap();
    // Layers by root name: a .velo file given to each run would be imported again (it
    // is too recent for the import cache), which needs room.
    env.ok(&["ingest", big.to_str().unwrap(), "--name", "big"]);
    env.ok(&["import", busybox.to_str().unwrap(), "--name", "bb"]);
    let (busybox, big_velo) = (std::path::Path::new("bb"), std::path::Path::new("big"));
    // A first run builds the farms while there is room.
    let warm = run(&env, busybox, big_velo, &[], "true");
    assert!(
        warm.status.success(),
        "{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    // Leave about 1 MiB free: room for trees, not for a 4 MiB copy.
    let vfs = rustix::fs::statvfs(&mount.point).unwrap();
    let free = vfs.f_bavail * vfs.f_frsize;
    let filler = fs::File::create(mount.point.join("filler")).unwrap();
    rustix::fs::fallocate(
        &filler,
        rustix::fs::FallocateFlags::empty(),
        0,
        free.saturating_sub(1 << 20),
    )
    .unwrap();
    drop(filler);
    let upper = env.path("upper");
    let out = run(
        &env,
        busybox,
        big_velo,
        &["--upper", upper.to_str().unwrap(), "--name", "chmodded"],
        "chmod 600 /big",
    );
    let _ = fs::remove_file(mount.point.join("filler"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = env.json(&["show", "chmodded", "big"]);
    assert_eq!(shown["mode"], 0o600, "{shown}");
    drop(mount);
}

/// The layers show every file's mtime as the tree records it, and its mode: less every
/// write bit with `--farm-modes read-only` (the store's shared inodes), with the owner's
/// write bit with `--farm-modes writable` (a variant per such file). Either way a commit
/// keeps the tree's mode of each file the command appended to without a chmod, and the
/// mode the command set where it did chmod.
#[test]
fn the_layers_show_tree_mtimes_and_modes_and_a_commit_keeps_the_modes_it_did_not_change() {
    use std::os::unix::fs::PermissionsExt;
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, _) = layers(&env);
    let app = env.path("modes");
    fs::create_dir_all(app.join("m/sub")).unwrap();
    let files = [
        ("secret", 0o600, 1_500_000_000),
        ("pub", 0o644, 1_500_000_100),
        ("script", 0o700, 1_500_000_200),
        ("chmodded", 0o644, 1_500_000_300),
    ];
    for (name, mode, secs) in files {
        let path = app.join("m").join(name);
        fs::write(&path, name).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        common::touch_ns(&path, secs, 0);
    }
    fs::set_permissions(app.join("m/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    common::touch_ns(&app.join("m/sub"), 1_400_000_000, 0);
    let manifest = env.path("modes.velo");
    env.ok(&[
        "ingest",
        app.to_str().unwrap(),
        "-o",
        manifest.to_str().unwrap(),
    ]);
    for (farm_modes, shown) in [
        ("read-only", [0o400, 0o444, 0o500, 0o444]),
        ("writable", [0o600, 0o644, 0o700, 0o644]),
    ] {
        let out = run(
            &env,
            &busybox,
            &manifest,
            &["--farm-modes", farm_modes],
            "cd /m && stat -c '%n %a %Y' secret pub script chmodded sub",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut want: Vec<String> = files
            .iter()
            .zip(shown)
            .map(|((name, _, secs), mode)| format!("{name} {mode:o} {secs}"))
            .collect();
        want.push("sub 750 1400000000".into());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .collect::<Vec<_>>(),
            want,
            "--farm-modes {farm_modes}"
        );
        let committed = env.path(&format!("after-{farm_modes}.velo"));
        let out = run(
            &env,
            &busybox,
            &manifest,
            &[
                "--farm-modes",
                farm_modes,
                "--commit",
                committed.to_str().unwrap(),
            ],
            "cd /m && for f in secret pub script chmodded; do echo more >> $f; done \
             && chmod 640 chmodded && touch sub/new",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = env.json(&["ls", "-R", committed.to_str().unwrap()]);
        let mode_of = |path: &str| {
            listing["entries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["path"] == path)
                .unwrap_or_else(|| panic!("{path} not in {listing}"))["mode"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(
            ["m/secret", "m/pub", "m/script", "m/chmodded", "m/sub"].map(mode_of),
            [0o600, 0o644, 0o700, 0o640, 0o750],
            "--farm-modes {farm_modes}"
        );
    }
    env.fsck_ok();
}

/// Where the store reflinks, a run's layers show owner write bits by default: each file
/// that has one links a variant of its own, a clone that shares the blob's blocks.
#[test]
fn on_a_reflink_store_the_layers_show_owner_write_bits_by_default() {
    if !sandbox_supported() {
        return;
    }
    let mut env = Env::new();
    let Some(mount) =
        common::LoopMount::new("xfs", &env.path("xfs.img"), &env.path("xfs"), 300, &[])
    else {
        return;
    };
    env.store = mount.point.join("store");
    let (busybox, manifest) = layers(&env);
    let out = env
        .cmd()
        .args(["--json", "run", "--isolate", "--base"])
        .arg(&busybox)
        .arg("--manifest")
        .arg(&manifest)
        .args(["--", "/bin/stat", "-c", "%a", "/app/hello.sh"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("644\n"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(text.trim_start_matches("644\n")).expect("JSON report");
    assert_eq!(report["farm_modes"], "writable", "{report}");
    let made: u64 = report["farms_built"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["variants_made"].as_u64().unwrap())
        .sum();
    let status = env.json(&["status"]);
    assert_eq!(status["variants"].as_u64(), Some(made), "{status}");
    assert!(made >= 4, "the app's four 0644 files at least: {report}");
    env.fsck_ok();
}
