//! Permission bits at the sandbox boundary: set-uid files never come out of a checkout
//! unasked, and nothing another local user can write reaches what a store's runs read.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::Env;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// A tree with a set-uid and a set-gid file, as a hostile `.velo` (or a run's commit
/// before the fix) could carry. An owner may set both bits on their own file, so this
/// needs no root.
fn setid_tree(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("rootsh"), b"#!/bin/sh\nexec /bin/sh -p\n").unwrap();
    chmod(&src.join("rootsh"), 0o4755);
    fs::write(src.join("bin/sgid"), b"#!/bin/sh\n").unwrap();
    chmod(&src.join("bin/sgid"), 0o2755);
    fs::write(src.join("plain"), b"plain").unwrap();
    assert_eq!(mode_of(&src.join("rootsh")), 0o4755, "chmod 4755 took");
    src
}

#[test]
fn a_copy_checkout_drops_setuid_bits_unless_asked_to_keep_them() {
    let env = Env::new();
    let src = setid_tree(&env);
    env.ingest(&src, &["--name", "t"]);
    // The tree itself records what it was given; the projection is what matters.
    assert_eq!(
        env.json(&["show", "t", "rootsh"])["mode"].as_u64(),
        Some(0o4755)
    );

    let copy = env.path("copy");
    let report = env.json(&["checkout", "t", copy.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(report["setid_dropped"], 2);
    assert_eq!(mode_of(&copy.join("rootsh")), 0o755);
    assert_eq!(mode_of(&copy.join("bin/sgid")), 0o755);
    assert_eq!(mode_of(&copy.join("plain")), 0o644);
    let text = env.run(&[
        "checkout",
        "t",
        env.path("copy2").to_str().unwrap(),
        "--mode",
        "copy",
    ]);
    assert!(
        String::from_utf8_lossy(&text.stderr).contains("--preserve-setuid"),
        "the text output says what was left off and how to keep it: {}",
        String::from_utf8_lossy(&text.stderr)
    );

    let kept = env.path("kept");
    let report = env.json(&[
        "checkout",
        "t",
        kept.to_str().unwrap(),
        "--mode",
        "copy",
        "--preserve-setuid",
    ]);
    assert_eq!(report["setid_dropped"], 0);
    assert_eq!(mode_of(&kept.join("rootsh")), 0o4755);
    assert_eq!(mode_of(&kept.join("bin/sgid")), 0o2755);

    // A hard-linked checkout never has them: its files are the store's 0555 inodes.
    let farm = env.path("farm");
    env.ok(&["checkout", "t", farm.to_str().unwrap()]);
    assert_eq!(mode_of(&farm.join("rootsh")), 0o555);
    env.fsck_ok();
}

#[test]
fn a_setuid_file_imported_from_a_velo_file_is_checked_out_without_the_bit() {
    let env = Env::new();
    let src = setid_tree(&env);
    let velo = env.path("hostile.velo");
    env.ingest(&src, &["--name", "t"]);
    env.ok(&["export", "t", "-o", velo.to_str().unwrap(), "--with-blobs"]);
    let other = Env::new();
    other.ok(&["import", velo.to_str().unwrap(), "--name", "imported"]);
    let out = other.path("out");
    other.ok(&[
        "checkout",
        "imported",
        out.to_str().unwrap(),
        "--mode",
        "copy",
    ]);
    assert_eq!(mode_of(&out.join("rootsh")), 0o755);
}

/// Runs `sh -c script` as uid/gid 65534 with no supplementary groups.
fn as_nobody(script: &str, arg: &Path) -> std::process::Output {
    common::as_nobody()
        .args(["/bin/sh", "-c", script, "sh"])
        .arg(arg)
        .output()
        .unwrap()
}

#[test]
fn another_user_cannot_plant_files_in_a_cached_farm() {
    if !common::require(
        common::is_root(),
        "root (to become another user with setpriv)",
    ) || !common::require(common::find_tool("setpriv").is_some(), "setpriv")
    {
        return;
    }
    let env = Env::new();
    // Others may traverse to the store, as they may to a home directory's ~/.local/share.
    chmod(env.dir.path(), 0o755);
    let src = env.path("base");
    fs::create_dir_all(src.join("var/tmp")).unwrap();
    chmod(&src.join("var/tmp"), 0o1777);
    fs::write(src.join("etc-profile"), b"export PATH=/bin\n").unwrap();
    let root: velo_core::Hash = env.ingest(&src, &["--name", "base"]).parse().unwrap();

    // The farm `velo run --isolate` builds and every later run of the user shares.
    let store = velo_store::Store::open_or_create(&env.store).unwrap();
    let farm = {
        let _lock = store.lock_shared().unwrap();
        velo_project::session::ensure_farm(&store, root, velo_store::FarmModes::Writable)
            .unwrap()
            .0
    };
    let target = farm.join("var/tmp/planted");
    let planted = as_nobody("echo evil > \"$1\"", &target);
    assert!(
        !planted.status.success() && !target.exists(),
        "uid 65534 wrote {} (farms/ is {:o}, the farm's var/tmp {:o})",
        target.display(),
        mode_of(&env.store.join("farms")),
        mode_of(&farm.join("var/tmp"))
    );
    assert_eq!(
        mode_of(&env.store.join("farms")),
        0o700,
        "others cannot enter farms/"
    );
    assert_eq!(mode_of(&env.store.join("sessions")), 0o700);

    // The second wall: even where others can traverse farms/, no farm directory is
    // writable by them (the tree's 1777 shows as 1755).
    assert_eq!(mode_of(&farm.join("var/tmp")), 0o1755);
    assert_eq!(mode_of(&farm) & 0o022, 0, "the farm's root");
    chmod(&env.store.join("farms"), 0o755);
    let planted = as_nobody("echo evil > \"$1\"", &target);
    assert!(
        !planted.status.success() && !target.exists(),
        "uid 65534 wrote into a farm through a traversable farms/"
    );
    // fsck says so, and the next command that opens the store to write fixes it.
    let out = env.run(&["fsck", "--quick"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("farms") && text.contains("chmod 700"),
        "fsck names farms/ and the fix: {text}"
    );
    env.ingest(&src, &[]);
    assert_eq!(mode_of(&env.store.join("farms")), 0o700);
    env.fsck_ok();
}

#[test]
fn fsck_and_doctor_flag_store_directories_others_can_write() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    env.ingest(&src, &["--name", "t"]);
    env.fsck_ok();
    for dir in ["blobs", "refs/roots"] {
        let path = env.store.join(dir);
        chmod(&path, 0o777);
        let out = env.run(&["--json", "fsck", "--quick"]);
        assert!(!out.status.success());
        let fsck: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(fsck["ok"], false, "{dir} 0777 is unsound");
        let problems = fsck["problems"].as_array().unwrap();
        assert!(
            problems.iter().any(|p| p["kind"] == "unsafe-permissions"
                && p["detail"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("chmod go-w {}", path.display()))),
            "{problems:?}"
        );
        let doctor = env.ok(&["doctor"]);
        assert!(
            doctor.contains("store permissions") && doctor.contains("chmod go-w"),
            "{doctor}"
        );
        chmod(&path, 0o755);
    }
    env.fsck_ok();
    assert!(env.ok(&["doctor"]).contains("ok   store permissions"));
}

/// A run reads its layers from `farms/`: it refuses a store whose `farms/` is a symlink
/// (to a directory someone else controls), or whose own directory others can write (they
/// could put another `farms/` in its place); a checkout or ingest is not stopped.
#[test]
fn a_run_refuses_a_store_whose_farms_others_could_replace() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"f").unwrap();
    env.ingest(&src, &["--name", "t"]);
    let store = velo_store::Store::open(&env.store).unwrap();
    store.ensure_private_dirs().unwrap();

    let elsewhere = env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::remove_dir(env.store.join("farms")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, env.store.join("farms")).unwrap();
    let err = store.ensure_private_dirs().unwrap_err().to_string();
    assert!(
        err.contains("farms") && err.contains("not a directory"),
        "{err}"
    );
    let out = env.run(&["run", "--isolate", "--manifest", "t", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("will not run from this store"), "{stderr}");
    fs::remove_file(env.store.join("farms")).unwrap();

    chmod(&env.store, 0o777);
    let err = store.ensure_private_dirs().unwrap_err().to_string();
    assert!(err.contains("other users can write the store"), "{err}");
    chmod(&env.store, 0o755);
    store.ensure_private_dirs().unwrap();
    assert_eq!(mode_of(&env.store.join("farms")), 0o700);
}
