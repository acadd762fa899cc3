//! `velo fsck --repair`: damaged objects are moved to `quarantine/`, bad modes restored,
//! what is then missing is named with the roots (and paths) that need it, and an import or
//! ingest of the right bytes heals the store.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::Env;
use serde_json::Value;
use velo_core::Hash;

const CONTENT: &[u8] = b"repair fixture: the file whose blob is damaged\n";

fn object_path(store: &Path, kind: &str, name: &str) -> PathBuf {
    store.join(kind).join(&name[..2]).join(name)
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

/// Writes other bytes into a read-only object, as a stray `chmod u+w; echo >` would.
fn overwrite(path: &Path, bytes: &[u8]) {
    set_mode(path, 0o644);
    fs::write(path, bytes).expect("write");
    set_mode(path, 0o444);
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A source with the damaged file three levels down, registered as `app`; and a second
/// root `other` holding the same content at another path.
fn fixture(env: &Env) -> (PathBuf, String) {
    let src = env.path("src");
    fs::create_dir_all(src.join("deep/er")).expect("mkdir");
    fs::write(src.join("deep/er/f1"), CONTENT).expect("write");
    fs::write(src.join("top.txt"), b"repair fixture: top\n").expect("write");
    env.ingest(&src, &["--name", "app"]);
    let other = env.path("other");
    fs::create_dir_all(other.join("copies")).expect("mkdir");
    fs::write(other.join("copies/same.txt"), CONTENT).expect("write");
    env.ingest(&other, &["--name", "other"]);
    env.fsck_ok();
    (src, Hash::of_blob(CONTENT).to_hex())
}

/// Runs `velo --json fsck --repair`, asserts its exit status, returns the report.
fn repair(env: &Env, sound: bool) -> Value {
    let out = env.run(&["--json", "fsck", "--repair"]);
    assert_eq!(
        out.status.code(),
        Some(if sound { 0 } else { 1 }),
        "fsck --repair:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["ok"], Value::Bool(sound), "{report}");
    report
}

fn gc_generation(env: &Env) -> u64 {
    fs::read_to_string(env.store.join("gc-generation"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_corrupt_blob_is_quarantined_named_with_its_roots_and_healed_by_import() {
    let env = Env::new();
    let (_src, blob) = fixture(&env);
    let good = env.path("good.velo");
    env.ok(&[
        "export",
        "app",
        "-o",
        good.to_str().unwrap(),
        "--with-blobs",
    ]);
    let blob_path = object_path(&env.store, "blobs", &blob);
    overwrite(&blob_path, b"not what the name says\n");

    // fsck names the kind, the root and the whole path inside it.
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("corrupt-blob: {blob}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"deep/er/f1\"") || stdout.contains("\"copies/same.txt\""),
        "fsck does not give the whole path:\n{stdout}"
    );

    let generation = gc_generation(&env);
    let report = repair(&env, false);
    let quarantined = report["quarantined"].as_array().expect("list");
    assert_eq!(quarantined.len(), 1, "{report}");
    assert_eq!(quarantined[0]["kind"], "blob");
    assert_eq!(quarantined[0]["object"], blob.as_str());
    let moved = PathBuf::from(quarantined[0]["moved_to"].as_str().unwrap());
    assert!(
        moved.starts_with(env.store.join("quarantine/blob")),
        "{moved:?}"
    );
    assert_eq!(fs::read(&moved).expect("kept"), b"not what the name says\n");
    assert!(
        !blob_path.exists(),
        "the damaged blob is still under its name"
    );
    assert!(gc_generation(&env) > generation, "caches were not told");
    // Missing now, with every root that needs it and where.
    let missing = report["missing"].as_array().expect("list");
    assert_eq!(missing.len(), 1, "{report}");
    assert_eq!(missing[0]["kind"], "blob");
    assert_eq!(missing[0]["object"], blob.as_str());
    let mut needers: Vec<(String, String)> = missing[0]["needed_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["root"].as_str().unwrap().into(),
                n["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    needers.sort();
    assert_eq!(
        needers,
        vec![
            ("app".to_string(), "deep/er/f1".to_string()),
            ("other".to_string(), "copies/same.txt".to_string())
        ]
    );
    // The text form says the same.
    let out = env.run(&["fsck", "--repair"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains(&format!("missing blob {blob}"))
            && text(&out.stdout).contains("root app (\"deep/er/f1\")"),
        "{}",
        text(&out.stdout)
    );

    let err = env.fails(&["cat", "app", "deep/er/f1"]);
    assert!(
        err.contains(&format!("(blob {blob}) is not in the store")),
        "{err}"
    );

    // The import of the good bytes stores the blob again (it is missing, not "0 new").
    let imported = env.json(&["import", good.to_str().unwrap(), "--name", "app"]);
    assert_eq!(imported["new_blobs"], 1, "{imported}");
    env.fsck_ok();
    assert_eq!(env.ok(&["cat", "app", "deep/er/f1"]).as_bytes(), CONTENT);
    assert_eq!(mode_of(&blob_path), 0o444);
}

#[test]
fn re_ingest_heals_a_quarantined_blob_even_with_a_stat_cache() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("deep/er")).expect("mkdir");
    fs::write(src.join("deep/er/f1"), CONTENT).expect("write");
    // Only files older than two seconds are cached.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    env.ingest(&src, &["--name", "app"]);
    let cached = fs::read_dir(env.store.join("cache"))
        .expect("cache dir")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("stat-"));
    assert!(
        cached,
        "the ingest wrote no stat cache: the test proves nothing"
    );
    let blob = Hash::of_blob(CONTENT).to_hex();
    overwrite(
        &object_path(&env.store, "blobs", &blob),
        b"damaged in place\n",
    );
    repair(&env, false);
    // The stat cache still says "f1 is stored": the bumped gc generation makes ingest
    // check, find it missing, and store it again.
    env.ingest(&src, &["--name", "app"]);
    env.fsck_ok();
    assert_eq!(env.ok(&["cat", "app", "deep/er/f1"]).as_bytes(), CONTENT);
}

#[test]
fn bad_modes_are_restored_and_the_store_passes() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("bin")).expect("mkdir");
    fs::write(src.join("bin/tool"), b"#!/bin/sh\necho repair\n").expect("write");
    set_mode(&src.join("bin/tool"), 0o755);
    fs::write(src.join("data"), CONTENT).expect("write");
    env.ingest(&src, &["--name", "app"]);
    // The tool's blob is 0555 (it was stored from an executable); dated otherwise in a
    // second tree, a checkout makes a variant of it.
    common::touch_ns(&src.join("bin/tool"), 1_000_000_000, 0);
    env.ingest(&src, &["--name", "app2"]);
    env.ok(&["checkout", "app2", env.path("co").to_str().unwrap()]);
    let tool = Hash::of_blob(b"#!/bin/sh\necho repair\n").to_hex();
    let suffix = ".555.1000000000000000000";
    let variant = object_path(&env.store, "blobs", &format!("{tool}{suffix}"));
    let data = object_path(&env.store, "blobs", &Hash::of_blob(CONTENT).to_hex());
    assert!(variant.is_file(), "no variant at {variant:?}");
    env.fsck_ok();
    set_mode(&data, 0o644);
    set_mode(&variant, 0o755);
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("bad-mode"),
        "{}",
        text(&out.stdout)
    );

    let report = repair(&env, true);
    let mut fixed: Vec<(String, String, String)> = report["modes_fixed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["object"].as_str().unwrap().into(),
                m["was"].as_str().unwrap().into(),
                m["now"].as_str().unwrap().into(),
            )
        })
        .collect();
    fixed.sort();
    let mut want = vec![
        (Hash::of_blob(CONTENT).to_hex(), "644".into(), "444".into()),
        (format!("{tool}{suffix}"), "755".into(), "555".into()),
    ];
    want.sort();
    assert_eq!(fixed, want, "{report}");
    assert!(report["quarantined"].as_array().unwrap().is_empty());
    assert_eq!(mode_of(&data), 0o444);
    assert_eq!(mode_of(&variant), 0o555);
    env.fsck_ok();
}

#[test]
fn a_corrupt_tree_is_quarantined_and_healed_by_import() {
    let env = Env::new();
    let (_src, _blob) = fixture(&env);
    let good = env.path("good.velo");
    env.ok(&["export", "app", "-o", good.to_str().unwrap()]);
    let sub = env.json(&["show", "app", "deep/er"])["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let tree_path = object_path(&env.store, "trees", &sub);
    let mut bytes = fs::read(&tree_path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    overwrite(&tree_path, &bytes);

    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("corrupt-tree: {sub}"))
            && stdout.contains("root app needs it (directory \"deep/er\")"),
        "{stdout}"
    );

    let report = repair(&env, false);
    let quarantined = report["quarantined"].as_array().expect("list");
    assert_eq!(quarantined.len(), 1, "{report}");
    assert_eq!(quarantined[0]["kind"], "tree");
    assert_eq!(quarantined[0]["object"], sub.as_str());
    let moved = PathBuf::from(quarantined[0]["moved_to"].as_str().unwrap());
    assert!(moved.starts_with(env.store.join("quarantine/tree")) && moved.is_file());
    assert!(!tree_path.exists());
    let missing = report["missing"].as_array().expect("list");
    assert_eq!(missing.len(), 1, "{report}");
    assert_eq!(missing[0]["kind"], "tree");
    assert_eq!(missing[0]["needed_by"][0]["root"], "app");
    assert_eq!(missing[0]["needed_by"][0]["path"], "deep/er");
    assert!(env.fails(&["cat", "app", "deep/er/f1"]).contains("missing"));

    // Trees only: the blobs are still in the store.
    env.ok(&["import", good.to_str().unwrap(), "--name", "app"]);
    env.fsck_ok();
    assert_eq!(env.ok(&["cat", "app", "deep/er/f1"]).as_bytes(), CONTENT);
}

#[test]
fn a_cached_farm_linking_a_quarantined_blob_is_removed() {
    let env = Env::new();
    let (_src, blob) = fixture(&env);
    let root = env.json(&["show", "app", "/"])["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    // A farm is hard links to blobs: damage through the blob shows through the farm.
    let farm = env.store.join("farms").join(format!("{root}.2"));
    fs::create_dir_all(farm.join("deep/er")).expect("mkdir");
    let blob_path = object_path(&env.store, "blobs", &blob);
    fs::hard_link(&blob_path, farm.join("deep/er/f1")).expect("link");
    overwrite(&blob_path, b"damaged, farm too\n");
    let report = repair(&env, false);
    assert_eq!(
        report["farms_removed"],
        serde_json::json!([format!("{root}.2")]),
        "{report}"
    );
    assert!(!farm.exists());
}

/// A variant whose mtime was changed (say by `touch` on a hard-linked checkout) shows the
/// wrong time in every tree that links it: fsck names it, repair sets its name's time back.
#[test]
fn a_variant_with_another_mtime_is_reported_and_restored() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("data"), CONTENT).expect("write");
    env.ingest(&src, &["--name", "app"]);
    common::touch_ns(&src.join("data"), 1_000_000_000, 5);
    env.ingest(&src, &["--name", "app2"]);
    let co = env.path("co");
    env.ok(&["checkout", "app2", co.to_str().unwrap()]);
    let name = format!(
        "{}.444.1000000000000000005",
        Hash::of_blob(CONTENT).to_hex()
    );
    let variant = object_path(&env.store, "blobs", &name);
    assert_eq!(
        fs::metadata(&variant).expect("variant").ino(),
        fs::metadata(co.join("data")).expect("checkout").ino()
    );
    env.fsck_ok();
    common::touch_ns(&co.join("data"), 2_000_000_000, 0);
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("bad-mtime") && stdout.contains(&name),
        "{stdout}"
    );
    let report = repair(&env, true);
    assert_eq!(
        report["modes_fixed"][0]["object"],
        name.as_str(),
        "{report}"
    );
    let shown = fs::metadata(co.join("data")).expect("checkout");
    assert_eq!((shown.mtime(), shown.mtime_nsec()), (1_000_000_000, 5));
    env.fsck_ok();
}

/// `touch` on a file of a hard-linked checkout changes the inode a cached farm shares with
/// it: fsck names the farm (its file shows another mtime than its tree), repair removes it.
#[test]
fn a_farm_showing_another_mtime_than_its_tree_is_reported_and_removed() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    fs::write(src.join("d/data"), CONTENT).expect("write");
    let root: Hash = env
        .ingest(&src, &["--name", "app"])
        .parse()
        .expect("root hash");
    let store = velo_store::Store::open(&env.store).expect("store");
    let farm = {
        let _lock = store.lock_shared().expect("lock");
        velo_project::session::ensure_farm(&store, root, velo_store::FarmModes::ReadOnly)
            .expect("farm")
            .0
    };
    let co = env.path("co");
    env.ok(&["checkout", "app", co.to_str().unwrap()]);
    env.fsck_ok();
    common::touch_ns(&co.join("d/data"), 2_000_000_000, 0);
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("stale-farm") && stdout.contains("d/data"),
        "{stdout}"
    );
    let report = repair(&env, true);
    let name = farm.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        report["farms_removed"],
        serde_json::json!([name]),
        "{report}"
    );
    assert!(!farm.exists());
    env.fsck_ok();
}

/// Two runs that build one farm at once both make its variants; the store keeps one of
/// each, so the farm that lands may link the other: an inode the store does not name,
/// which fsck's hashing would miss. fsck names such a farm; repair removes it.
#[test]
fn a_farm_linking_an_inode_the_store_does_not_name_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("private"), CONTENT).expect("write");
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let root: Hash = env.ingest(&src, &["--name", "app"]).parse().expect("root");
    let store = velo_store::Store::open(&env.store).expect("store");
    {
        let _lock = store.lock_shared().expect("lock");
        velo_project::session::ensure_farm(&store, root, velo_store::FarmModes::ReadOnly)
            .expect("farm");
    }
    env.fsck_ok();
    // What the losing run's publish leaves: the store's variant is another inode.
    let shard = env
        .store
        .join("blobs")
        .join(&Hash::of_blob(CONTENT).to_hex()[..2]);
    let variant = fs::read_dir(&shard)
        .expect("shard")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(".400."))
        .expect("a 0400 variant");
    let copy = variant.with_extension("copy");
    fs::copy(&variant, &copy).expect("copy");
    let mtime = fs::metadata(&variant)
        .expect("meta")
        .modified()
        .expect("mtime");
    fs::File::options()
        .write(true)
        .open(&copy)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    set_mode(&copy, 0o400);
    fs::rename(&copy, &variant).expect("rename");
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("stale-farm"), "{stdout}");
    repair(&env, true);
    env.fsck_ok();
}
