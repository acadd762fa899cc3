//! `velo checkout`: a tree as a link farm (or reflinks, or copies) equals its source.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{awkward_tree, scan, Env};

fn diff_r(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diff -r {a:?} {b:?}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn copy_checkout_equals_the_source_in_content_modes_and_mtimes() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let out = env.path("out");
    let report = env.json(&["checkout", "t", out.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(report["linked"], 0);
    diff_r(&src, &out);
    assert_eq!(
        scan(&out),
        scan(&src),
        "modes, sizes, mtimes, symlink targets"
    );
    // Independent files: writing one leaves the store sound.
    fs::write(out.join("plain.txt"), b"edited").unwrap();
    env.fsck_ok();
}

/// A hard-linked checkout shows every entry's mtime (ns) exactly and its mode less the
/// bits a shared read-only inode cannot have (write, set-id, sticky). A freshly ingested
/// tree links the blobs themselves (each took the mode class and mtime of the file it was
/// stored from); content that another entry shows in another form gets a variant, a
/// separate inode, which gc keeps while something links it.
#[test]
fn hardlink_checkout_shows_tree_mtimes_and_read_only_modes_through_blobs_and_variants() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let out = env.path("farm");
    let report = env.json(&["checkout", "t", out.to_str().unwrap()]);
    assert!(report["linked"].as_u64().unwrap() > 5);
    assert_eq!(report["copied"], 0);
    diff_r(&src, &out);
    let want = scan(&src);
    let got = scan(&out);
    for (path, meta) in &want {
        let farm = &got[path];
        match meta.kind.as_str() {
            "file" => assert_eq!(
                *farm,
                common::Meta {
                    mode: (meta.mode & 0o555) | 0o400,
                    ..meta.clone()
                },
                "{path:?}"
            ),
            // Directories of a hard-linked checkout never get group/other write (the
            // tree's 2775 setgid_dir shows as 2755); everything else is exact.
            "dir" => assert_eq!(
                *farm,
                common::Meta {
                    mode: meta.mode & !0o022,
                    ..meta.clone()
                },
                "{path:?}"
            ),
            _ => assert_eq!(farm, meta, "{path:?}"),
        }
    }
    let hash = want[&b"sub/exec.sh".to_vec()].hash.clone().unwrap();
    let shard = env.store.join("blobs").join(&hash[..2]);
    let exec_blob = fs::metadata(shard.join(&hash)).unwrap();
    assert_eq!(
        fs::metadata(out.join("sub/exec.sh")).unwrap().ino(),
        exec_blob.ino(),
        "the only file with this content links the blob itself"
    );
    assert_eq!(
        exec_blob.mode() & 0o7777,
        0o555,
        "the blob took the class of its file"
    );
    env.fsck_ok();

    // The same bytes, not executable and dated otherwise, in another tree: a variant.
    let other = env.path("other");
    fs::create_dir(&other).unwrap();
    fs::copy(src.join("sub/exec.sh"), other.join("copy.sh")).unwrap();
    fs::set_permissions(other.join("copy.sh"), fs::Permissions::from_mode(0o640)).unwrap();
    common::touch_ns(&other.join("copy.sh"), 1_000_000_000, 42);
    env.ingest(&other, &["--name", "other"]);
    let out2 = env.path("farm2");
    let report = env.json(&["checkout", "other", out2.to_str().unwrap()]);
    assert_eq!(report["variants_made"], 1, "{report}");
    assert_eq!(report["inexact_modes"], 1, "0640 shows as 0440: {report}");
    let copy = fs::metadata(out2.join("copy.sh")).unwrap();
    assert_eq!(copy.mode() & 0o7777, 0o440);
    assert_eq!((copy.mtime(), copy.mtime_nsec()), (1_000_000_000, 42));
    let variant = shard.join(format!("{hash}.440.1000000000000000042"));
    assert_eq!(fs::metadata(&variant).unwrap().ino(), copy.ino());
    assert_ne!(copy.ino(), exec_blob.ino(), "the variant is its own inode");
    let blob_now = fs::metadata(shard.join(&hash)).unwrap();
    assert_eq!(
        (blob_now.mode() & 0o7777, blob_now.mtime()),
        (0o555, exec_blob.mtime()),
        "the blob keeps its form"
    );
    env.fsck_ok();
    // gc keeps a variant while a checkout links it, and removes it when nothing does.
    env.ok(&["gc", "--run"]);
    assert!(variant.exists());
    env.ok(&["checkout", "--remove", out2.to_str().unwrap()]);
    let gc = env.json(&["gc", "--run"]);
    assert_eq!(gc["unused_variants"], 1, "{gc}");
    assert!(!variant.exists());
    assert!(shard.join(&hash).exists(), "the blob stays");
    env.fsck_ok();
}

#[test]
fn checkout_refuses_a_non_empty_destination_and_leaves_it_alone() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let busy = env.path("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("mine"), b"precious").unwrap();
    let err = env.fails(&["checkout", "t", busy.to_str().unwrap()]);
    assert!(err.contains("not an empty directory"), "{err}");
    assert_eq!(fs::read(busy.join("mine")).unwrap(), b"precious");
}

#[test]
fn reflink_checkout_fails_clearly_where_unsupported_and_leaves_nothing() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let out = env.path("reflinked");
    let result = env.run(&["checkout", "t", out.to_str().unwrap(), "--mode", "reflink"]);
    if result.status.success() {
        // A reflink-capable file system: the files are independent and equal.
        diff_r(&src, &out);
        return;
    }
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("cannot reflink") && err.contains("--mode copy"),
        "{err}"
    );
    assert!(!out.exists(), "a failed checkout left {out:?} behind");
}

#[test]
fn tens_of_thousands_of_identical_files_pass_the_link_count_limit() {
    let env = Env::new();
    let src = env.path("many");
    // ext4 allows 65000 links to one inode; every empty file is the same blob.
    for d in 0..66 {
        let dir = src.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            fs::File::create(dir.join(format!("e{f:03}"))).unwrap();
        }
    }
    env.ingest(&src, &["--name", "many"]);
    let out = env.path("farm");
    let report = env.json(&["checkout", "many", out.to_str().unwrap()]);
    assert_eq!(report["files"], 66_000);
    let fallbacks = report["link_limit_fallbacks"].as_u64().unwrap();
    let linked = report["linked"].as_u64().unwrap();
    assert_eq!(fallbacks + linked, 66_000);
    // On ext4 the limit is hit; on file systems without one, everything links.
    if fallbacks > 0 {
        assert!(linked >= 60_000, "linked only {linked}");
    }
    let sample = fs::metadata(out.join("d65/e999")).unwrap();
    assert_eq!(sample.len(), 0);
    assert_eq!(sample.permissions().mode() & 0o7777, 0o444);
    env.fsck_ok();
}

#[test]
fn a_store_on_another_file_system_falls_back_to_copies_once() {
    // /dev/shm is a tmpfs on Linux; the test tree lives on the temp dir's file system.
    let shm = Path::new("/dev/shm");
    let same_fs = fs::metadata(shm).map(|m| m.dev()).ok()
        == fs::metadata(std::env::temp_dir()).map(|m| m.dev()).ok();
    if !common::require(
        shm.is_dir() && !same_fs,
        "/dev/shm on a different file system than the temp dir",
    ) {
        return;
    }
    let store = tempfile::tempdir_in(shm).unwrap();
    let mut env = Env::new();
    env.store = store.path().join("store");
    let src = env.path("src");
    awkward_tree(&src);
    env.ingest(&src, &["--name", "t"]);
    let out = env.path("out");
    let cmd = env
        .cmd()
        .args(["--json", "checkout", "t"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(cmd.status.success());
    let stderr = String::from_utf8_lossy(&cmd.stderr);
    assert_eq!(
        stderr.matches("another file system").count(),
        1,
        "one notice: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&cmd.stdout).unwrap();
    assert_eq!(report["cross_device"], true);
    assert_eq!(report["linked"], 0);
    diff_r(&src, &out);
}

#[test]
fn a_real_tree_checks_out_equal_in_every_mode() {
    // The system's C headers: thousands of real files, symlinks and directories.
    let include = Path::new("/usr/include");
    if !common::require(include.is_dir(), "/usr/include (libc6-dev)") {
        return;
    }
    let env = Env::new();
    env.ingest(include, &["--name", "include"]);
    let want = scan(include);
    let copy = env.path("copy");
    env.ok(&[
        "checkout",
        "include",
        copy.to_str().unwrap(),
        "--mode",
        "copy",
    ]);
    diff_r(include, &copy);
    assert_eq!(
        scan(&copy),
        want,
        "modes, mtimes and symlink targets of a copy checkout"
    );
    let farm = env.path("farm");
    env.ok(&["checkout", "include", farm.to_str().unwrap()]);
    diff_r(include, &farm);
    let got = scan(&farm);
    assert_eq!(got.len(), want.len());
    for (path, meta) in &want {
        let farm_meta = &got[path];
        if meta.kind == "file" {
            assert_eq!(farm_meta.hash, meta.hash, "{path:?}");
        } else {
            assert_eq!(
                farm_meta, meta,
                "directories and symlinks keep modes and mtimes: {path:?}"
            );
        }
    }
    env.fsck_ok();
}

#[test]
fn on_a_reflink_file_system_ingest_and_checkout_clone_instead_of_copying() {
    let env = Env::new();
    let Some(mount) = common::LoopMount::new(
        "btrfs",
        &env.path("btrfs.img"),
        &env.path("btrfs"),
        300,
        &[],
    ) else {
        return;
    };
    let src = mount.point.join("src");
    awkward_tree(&src);
    // Files changed in the last two seconds are copied, never cloned (a racing write could
    // not be seen): let the tree age past that.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut on_btrfs = Env::new();
    on_btrfs.store = mount.point.join("store");
    let report = on_btrfs.json(&["ingest", src.to_str().unwrap(), "--name", "t"]);
    assert_eq!(
        report["reflinked"], true,
        "ingest must reflink on btrfs: {report}"
    );
    let out = mount.point.join("out");
    let co = on_btrfs.json(&["checkout", "t", out.to_str().unwrap(), "--mode", "reflink"]);
    assert_eq!(co["reflinked"], co["files"]);
    diff_r(&src, &out);
    assert_eq!(scan(&out), scan(&src));
    // A reflinked copy is independent: writing it leaves the store sound.
    fs::write(out.join("plain.txt"), b"edited").unwrap();
    on_btrfs.fsck_ok();
    drop(on_btrfs);
}

#[test]
fn gc_removes_the_farms_of_forgotten_roots() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    let root = env.ingest(&src, &["--name", "t"]);
    let farms = env.store.join("farms");
    // A farm is what run --isolate caches; building one through a run needs namespaces, so
    // build it the way the run does: a checkout, published under farms/<root>.2 (velo
    // refuses to check out into the store itself, so it is made beside it and moved in).
    fs::create_dir_all(&farms).unwrap();
    let beside = env.path("farm");
    env.ok(&["checkout", "t", beside.to_str().unwrap()]);
    let farm = farms.join(format!("{root}.2"));
    fs::rename(&beside, &farm).unwrap();
    env.ok(&["gc", "--run"]);
    assert!(farm.is_dir(), "a registered root keeps its farm");
    env.ok(&["forget", "t"]);
    let report = env.json(&["gc", "--run"]);
    assert_eq!(report["farms"], 1);
    assert!(!farm.exists(), "the farm of a forgotten root is removed");
    env.fsck_ok();
}

/// A failed checkout into an existing empty directory leaves it as it was: empty, with
/// its own mode (issue 8 item 15; the root's chmod used to stay behind).
#[test]
fn a_failed_checkout_leaves_an_existing_directory_as_it_was() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"content that goes missing").unwrap();
    env.ok(&["ingest", src.to_str().unwrap(), "--name", "t"]);
    // Lose the blob: the checkout fails half-way.
    let hash = velo_core::Hash::of_blob(b"content that goes missing").to_hex();
    for suffix in ["", ".x"] {
        let _ = fs::remove_file(
            env.store
                .join("blobs")
                .join(&hash[..2])
                .join(format!("{hash}{suffix}")),
        );
    }
    let dest = env.path("dest");
    fs::create_dir(&dest).unwrap();
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o711)).unwrap();
    for mode in ["hardlink", "copy"] {
        env.fails(&["checkout", "t", dest.to_str().unwrap(), "--mode", mode]);
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o711,
            "{mode}"
        );
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 0, "{mode}");
    }
}

/// A hard-linked checkout shares the store's inodes: `velo checkout --remove` takes one
/// away (a mode-000 directory included) without touching a blob, and a blob made
/// writable through one (`chmod -R u+w`) is reported by the next command that reads it,
/// not only by fsck (issue 8 item 13).
#[test]
fn a_hardlink_checkout_is_removed_safely_and_a_writable_blob_is_noticed() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("locked")).unwrap();
    fs::write(src.join("locked/f"), b"locked").unwrap();
    fs::write(src.join("g"), b"shared").unwrap();
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    env.ok(&["ingest", src.to_str().unwrap(), "--name", "t"]);
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    let co = env.path("co");
    env.ok(&["checkout", "t", co.to_str().unwrap()]);
    env.ok(&["checkout", "--remove", co.to_str().unwrap()]);
    assert!(!co.exists());
    env.fsck_ok();

    // What is not a hard-linked checkout is refused, and left as it was.
    let project = env.path("project");
    fs::create_dir_all(project.join("sub")).unwrap();
    fs::write(project.join("sub/notes.txt"), b"mine").unwrap();
    let err = env.fails(&["checkout", "--remove", project.to_str().unwrap()]);
    assert!(err.contains("is writable"), "{err}");
    assert_eq!(fs::read(project.join("sub/notes.txt")).unwrap(), b"mine");
    assert_eq!(
        fs::metadata(project.join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let err = env.fails(&["checkout", "--remove", "/"]);
    assert!(err.contains("not a checkout"), "{err}");
    let err = env.fails(&["checkout", "--remove", env.store.to_str().unwrap()]);
    assert!(err.contains("not a checkout"), "{err}");
    // Nor anything inside the store (its blobs are read-only files too), nor a directory
    // of the user's own read-only files.
    let blobs = env.store.join("blobs");
    let err = env.fails(&["checkout", "--remove", blobs.to_str().unwrap()]);
    assert!(err.contains("not a checkout"), "{err}");
    assert!(blobs.is_dir());
    let mine = env.path("mine");
    fs::create_dir_all(mine.join("sub")).unwrap();
    fs::write(mine.join("sub/f"), b"precious").unwrap();
    fs::set_permissions(mine.join("sub/f"), fs::Permissions::from_mode(0o444)).unwrap();
    let err = env.fails(&["checkout", "--remove", mine.to_str().unwrap()]);
    assert!(err.contains("linked nowhere else"), "{err}");
    assert_eq!(fs::read(mine.join("sub/f")).unwrap(), b"precious");
    env.fsck_ok();

    let co = env.path("co2");
    env.ok(&["checkout", "t", co.to_str().unwrap()]);
    // What a user does to edit a checkout in place: the shared blob becomes writable.
    fs::set_permissions(co.join("g"), fs::Permissions::from_mode(0o644)).unwrap();
    let err = env.fails(&["cat", "t", "g"]);
    assert!(err.contains("made writable outside velo"), "{err}");
}

/// A tree ingested with `--mtime zero` records 0 for every mtime, and its new blobs take
/// that time: its hard-linked checkout links them, no variant, and shows the epoch.
#[test]
fn a_tree_ingested_with_zero_mtimes_needs_no_variant() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/plain"), b"plain").unwrap();
    fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
    env.ingest(&src, &["--name", "z", "--mtime", "zero"]);
    let out = env.path("co");
    let report = env.json(&["checkout", "z", out.to_str().unwrap()]);
    assert_eq!(report["variants_made"], 0, "{report}");
    for (file, mode) in [("d/plain", 0o444), ("tool", 0o555)] {
        let meta = fs::metadata(out.join(file)).unwrap();
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (0, 0), "{file}");
        assert_eq!(meta.mode() & 0o7777, mode, "{file}");
    }
}

/// A time the store's file system cannot hold (ext4 begins in 1901; tmpfs and a tree's
/// nanoseconds reach back to 1677) is shown as the nearest it can, and fsck does not call
/// that damage.
#[test]
fn a_time_beyond_the_store_file_system_is_clamped_and_fsck_passes() {
    let env = Env::new();
    let shm = std::path::Path::new("/dev/shm");
    if !common::require(shm.is_dir(), "/dev/shm (a tmpfs, which holds any time)") {
        return;
    }
    let src = tempfile::tempdir_in(shm).unwrap();
    fs::write(src.path().join("old"), b"from the past").unwrap();
    // 1800-01-01.
    common::touch_ns(&src.path().join("old"), -5_364_662_400, 0);
    env.ingest(src.path(), &["--name", "f"]);
    let listed = env.json(&["show", "f", "old"]);
    assert_eq!(
        listed["mtime_ns"], -5_364_662_400_000_000_000i64,
        "{listed}"
    );
    let out = env.path("co");
    env.ok(&["checkout", "f", out.to_str().unwrap()]);
    let shown = fs::metadata(out.join("old")).unwrap().mtime();
    assert!(
        (-5_364_662_400..-2_000_000_000).contains(&shown),
        "close to the tree's time: {shown}"
    );
    env.fsck_ok();
    // A run's farm too (its check compares against what the file system can hold).
    let store = velo_store::Store::open(&env.store).unwrap();
    let root = store.resolve("f").unwrap();
    {
        let _lock = store.lock_shared().unwrap();
        velo_project::session::ensure_farm(&store, root, velo_store::FarmModes::ReadOnly).unwrap();
    }
    env.fsck_ok();
}
