//! Permission bits at the sandbox boundary: set-uid files never come out of a checkout
//! unasked.

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
