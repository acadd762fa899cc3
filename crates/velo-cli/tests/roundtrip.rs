//! What goes in comes out: ingest → ls/cat/show/export/import equal the source, byte for
//! byte and bit for bit of metadata; dedup, the stat cache, diff and gc behave.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{awkward_tree, listed, owned, pairs, scan, touch_ns, Env};
use serde_json::Value;

#[test]
fn awkward_tree_round_trips_through_ls_cat_show() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    let root = env.ingest(&src, &["--name", "awk"]);
    assert_eq!(root.len(), 64);
    let want = scan(&src);
    assert_eq!(listed(&env, "awk"), want);
    for (path, meta) in &want {
        if meta.kind != "file" {
            continue;
        }
        let out = env
            .cmd()
            .arg("cat")
            .arg("awk")
            .arg(OsStr::from_bytes(path))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            out.stdout,
            fs::read(src.join(OsStr::from_bytes(path))).unwrap(),
            "{path:?}"
        );
    }
    let shown = env.json(&["show", "awk", "sub/rel-link"]);
    assert_eq!(shown["target"], "../plain.txt");
    assert_eq!(shown["mtime_ns"], 1_500_000_000_000_000_042i64);
    let exec = env.json(&["show", "awk", "sub/exec.sh"]);
    assert_eq!(exec["mode"], 0o755);
    assert_eq!(exec["mtime_ns"], -86_400i64 * 365 * 5 * 1_000_000_000 + 5);
    env.fsck_ok();
}

#[test]
fn source_is_never_linked_or_modified() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    let before = scan(&src);
    env.ingest(&src, &[]);
    assert_eq!(scan(&src), before, "ingest changed the source");
    let plain = src.join("sub/exec.sh");
    assert_eq!(
        fs::metadata(&plain).unwrap().nlink(),
        1,
        "the source file was hard-linked into the store"
    );
    fs::OpenOptions::new().append(true).open(&plain).unwrap();
    // Every blob is its own read-only inode (0555 for content stored from an executable).
    for shard in fs::read_dir(env.store.join("blobs")).unwrap() {
        for blob in fs::read_dir(shard.unwrap().path()).unwrap() {
            let meta = blob.unwrap().metadata().unwrap();
            assert!(
                [0o444, 0o555].contains(&(meta.mode() & 0o7777)),
                "{:o}",
                meta.mode()
            );
            assert_eq!(meta.nlink(), 1);
        }
    }
}

#[test]
fn real_tree_round_trips_and_same_tree_from_two_paths_gives_one_root() {
    let env = Env::new();
    // A real source tree: this workspace's crates plus the system's C headers when present.
    let src = env.path("real");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut sources = vec![workspace.join("crates"), workspace.join("samples")];
    if Path::new("/usr/include").is_dir() {
        sources.push(PathBuf::from("/usr/include"));
    }
    fs::create_dir_all(&src).unwrap();
    for s in &sources {
        common::cp("-a", s, &src);
    }
    let copy = env.path("elsewhere/deeper/real-copy");
    fs::create_dir_all(copy.parent().unwrap()).unwrap();
    common::cp("-a", &src, &copy);

    let a = env.ingest(&src, &["--name", "a"]);
    let b = env.ingest(&copy, &["--name", "b"]);
    assert_eq!(a, b, "the same tree at two paths must give one root");
    let want = scan(&src);
    assert!(
        want.len() > 100,
        "real tree unexpectedly small: {}",
        want.len()
    );
    assert_eq!(listed(&env, "a"), want);

    // A copy with fresh mtimes differs, unless mtimes are zeroed.
    let fresh = env.path("fresh");
    common::cp("-r", &src, &fresh);
    let z1 = env.ingest(&src, &["--mtime", "zero"]);
    let z2 = env.ingest(&fresh, &["--mtime", "zero"]);
    assert_eq!(z1, z2);
    assert_ne!(z1, a);
    env.fsck_ok();
}

#[test]
fn creation_order_does_not_change_the_root() {
    let env = Env::new();
    let names: Vec<String> = (0..300)
        .map(|i| format!("f{:03}", (i * 7919) % 300))
        .collect();
    let (x, y) = (env.path("x"), env.path("y"));
    for (dir, order) in [
        (&x, names.clone()),
        (&y, names.iter().rev().cloned().collect::<Vec<_>>()),
    ] {
        fs::create_dir_all(dir.join("d")).unwrap();
        for n in &order {
            fs::write(dir.join("d").join(n), n.as_bytes()).unwrap();
            touch_ns(&dir.join("d").join(n), 1_000_000_000, 0);
        }
        touch_ns(&dir.join("d"), 1_000_000_000, 0);
    }
    assert_eq!(env.ingest(&x, &[]), env.ingest(&y, &[]));
}

fn write_corpus(dir: &Path, files: usize, size: usize, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let mut state = seed;
    for i in 0..files {
        let mut data = vec![0u8; size];
        for chunk in data.chunks_mut(8) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        fs::write(dir.join(format!("file{i:04}.bin")), data).unwrap();
    }
}

#[test]
fn a_copy_with_one_percent_changed_grows_the_store_by_about_one_percent() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    write_corpus(&a, 200, 50_000, 1);
    common::cp("-a", &a, &b);
    // Change 2 of 200 files: 1% of the bytes.
    write_corpus(&env.path("changes"), 2, 50_000, 99);
    fs::copy(env.path("changes/file0000.bin"), b.join("file0007.bin")).unwrap();
    fs::copy(env.path("changes/file0001.bin"), b.join("file0150.bin")).unwrap();
    env.ingest(&a, &["--name", "a"]);
    let before = env.json(&["status"])["blob_bytes"].as_u64().unwrap();
    let second = env.json(&["ingest", b.to_str().unwrap(), "--name", "b"]);
    let after = env.json(&["status"]);
    let grown = after["blob_bytes"].as_u64().unwrap() - before;
    assert_eq!(grown, 100_000, "exactly the two changed files are new");
    assert_eq!(second["new_bytes"], 100_000);
    let ratio = after["dedup_ratio"].as_f64().unwrap();
    let expect = 20_000_000.0 / 10_100_000.0;
    assert!(
        (ratio - expect).abs() < 1e-9,
        "dedup ratio {ratio}, expected {expect}"
    );
    assert_eq!(after["logical_bytes"], 20_000_000);
}

#[test]
fn reingest_uses_the_stat_cache_and_notices_changes() {
    let env = Env::new();
    let src = env.path("src");
    write_corpus(&src, 50, 1000, 3);
    for e in fs::read_dir(&src).unwrap() {
        touch_ns(&e.unwrap().path(), 1_600_000_000, 0);
    }
    // Files whose ctime is under two seconds old are not cached (a change within the same
    // timestamp tick would go unseen); let them age.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let first = env.json(&["ingest", src.to_str().unwrap()]);
    assert_eq!(first["cached_files"], 0);
    let second = env.json(&["ingest", src.to_str().unwrap()]);
    assert_eq!(
        second["cached_files"], 50,
        "an unchanged tree must not be read again"
    );
    assert_eq!(second["new_bytes"], 0);
    assert_eq!(second["root"], first["root"]);

    // Same size, same mtime, new content: ctime still betrays the change.
    let victim = src.join("file0003.bin");
    let mut data = fs::read(&victim).unwrap();
    data[0] ^= 0xff;
    fs::write(&victim, &data).unwrap();
    touch_ns(&victim, 1_600_000_000, 0);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let third = env.json(&["ingest", src.to_str().unwrap()]);
    assert_eq!(third["cached_files"], 49);
    assert_ne!(third["root"], first["root"]);
    let root = third["root"].as_str().unwrap();
    let out = env
        .cmd()
        .args(["cat", root, "file0003.bin"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, data);
}

#[test]
fn stat_cache_is_not_trusted_by_a_new_or_collected_store() {
    let env = Env::new();
    let src = env.path("src");
    write_corpus(&src, 20, 5000, 5);
    for e in fs::read_dir(&src).unwrap() {
        touch_ns(&e.unwrap().path(), 1_600_000_000, 0);
    }
    env.ingest(&src, &["--name", "x"]);
    // gc frees everything once the root is forgotten; a re-ingest must store it all again.
    env.ok(&["forget", "x"]);
    env.ok(&["gc", "--run"]);
    assert_eq!(env.json(&["status"])["blobs"], 0);
    let again = env.json(&["ingest", src.to_str().unwrap(), "--name", "x"]);
    assert_eq!(again["new_bytes"], 100_000);
    env.fsck_ok();
    // A recreated store gets a new id: the old cache (left in place) must not be trusted.
    fs::remove_dir_all(env.store.join("blobs")).unwrap();
    fs::create_dir(env.store.join("blobs")).unwrap();
    let cache = env.store.join("cache");
    let saved = env.path("cache-copy");
    common::cp("-a", &cache, &saved);
    fs::remove_dir_all(&env.store).unwrap();
    env.ok(&["ingest", env.path("src").to_str().unwrap()]);
    fs::remove_dir_all(env.store.join("cache")).unwrap();
    common::cp("-a", &saved, &cache);
    let fresh = env.json(&["ingest", src.to_str().unwrap()]);
    assert_eq!(fresh["new_bytes"], 0);
    env.fsck_ok();
    for name in fs::read_dir(&src).unwrap() {
        let name = name.unwrap().file_name();
        let out = env
            .cmd()
            .arg("cat")
            .arg(fresh["root"].as_str().unwrap())
            .arg(&name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "blob for {name:?} missing after a cached re-ingest"
        );
    }
}

#[test]
fn excludes_and_special_files_are_reported() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("target/debug")).unwrap();
    fs::create_dir_all(src.join("src")).unwrap();
    fs::write(src.join("target/debug/app"), b"x").unwrap();
    fs::write(src.join("src/main.rs"), b"fn main() {}").unwrap();
    fs::write(src.join("src/notes.tmp"), b"tmp").unwrap();
    fs::write(src.join("keep.tmp.txt"), b"kept").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    assert!(Command::new("mkfifo")
        .arg(src.join("fifo"))
        .status()
        .unwrap()
        .success());
    let out = env
        .cmd()
        .args(["--json", "ingest"])
        .arg(&src)
        .args(["--exclude", "target", "--exclude", "*.tmp"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fifo") && stderr.contains("socket"),
        "special files must be warned about: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = pairs(&report["skipped"], "path", "reason");
    let expected = owned(&[
        ("fifo", "fifo"),
        ("sock", "socket"),
        ("src/notes.tmp", "excluded"),
        ("target", "excluded"),
    ]);
    assert_eq!(skipped, expected);
    let paths: Vec<String> = listed(&env, report["root"].as_str().unwrap())
        .keys()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(paths, ["keep.tmp.txt", "src", "src/main.rs"]);
}

#[test]
fn diff_lists_added_removed_and_modified_paths() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    awkward_tree(&a);
    common::cp("-a", &a, &b);
    fs::write(b.join("plain.txt"), b"changed\n").unwrap();
    fs::remove_dir_all(b.join("sub/deeper")).unwrap();
    fs::create_dir_all(b.join("new_dir")).unwrap();
    fs::write(b.join("new_dir/new_file"), b"n").unwrap();
    fs::set_permissions(b.join("sub/private"), fs::Permissions::from_mode(0o640)).unwrap();
    let (ra, rb) = (env.ingest(&a, &[]), env.ingest(&b, &[]));
    let d = env.json(&["diff", &ra, &rb]);
    let changes = pairs(&d["changes"], "path", "change");
    // cp -a keeps the hard link, so its second name changed too.
    let want = owned(&[
        ("hardlink-to-plain", "modified"),
        ("new_dir", "added"),
        ("new_dir/new_file", "added"),
        ("plain.txt", "modified"),
        ("sub/deeper", "removed"),
        ("sub/deeper/big.bin", "removed"),
        ("sub/deeper/deepest", "removed"),
        ("sub/deeper/deepest/same-as-plain", "removed"),
        ("sub/private", "modified"),
    ]);
    assert_eq!(changes, want);
    assert!(env.json(&["diff", &ra, &ra])["changes"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn export_import_round_trip_and_partial_imports() {
    let env = Env::new();
    let src = env.path("src");
    awkward_tree(&src);
    let root = env.ingest(
        &src,
        &[
            "--name",
            "t",
            "-o",
            env.path("trees.velo").to_str().unwrap(),
        ],
    );
    env.ok(&[
        "export",
        "t",
        "-o",
        env.path("full.velo").to_str().unwrap(),
        "--with-blobs",
    ]);
    // ls works straight from a .velo file, without a store.
    let bare = Env::new();
    let from_file = listed(&bare, env.path("trees.velo").to_str().unwrap());
    assert_eq!(from_file, scan(&src));

    // Into an empty store: blobs are required unless --partial.
    let other = Env::new();
    let err = other.fails(&["import", env.path("trees.velo").to_str().unwrap()]);
    assert!(err.contains("not in this store"), "{err}");
    assert!(other.json(&["roots"])["roots"]
        .as_array()
        .unwrap()
        .is_empty());
    let partial = other.json(&[
        "import",
        env.path("trees.velo").to_str().unwrap(),
        "--partial",
        "--name",
        "p",
    ]);
    assert!(partial["missing_blobs"].as_u64().unwrap() > 0);
    other.fsck_ok();
    let full = other.json(&[
        "import",
        env.path("full.velo").to_str().unwrap(),
        "--name",
        "t",
    ]);
    assert_eq!(full["root"], root.as_str());
    assert_eq!(listed(&other, "t"), scan(&src));
    other.fsck_ok();
    let again = other.json(&["import", env.path("full.velo").to_str().unwrap()]);
    assert_eq!(again["new_blobs"], 0);
    // All of it stored and registered already: a re-import flushes and renames nothing
    // (but the import cache's own entry, when the file is old enough to be remembered).
    let full = env.path("full.velo");
    if let Some(trace) = common::traced(&other, &["import", full.to_str().unwrap(), "--name", "t"])
    {
        let writes: Vec<&String> = trace
            .iter()
            .filter(|l| !l.contains("/cache/import-"))
            .collect();
        assert!(writes.is_empty(), "a re-import wrote: {writes:?}");
    }
    // A .velo file names its tree for export too, once the tree is in the store.
    let re = other.json(&[
        "export",
        env.path("trees.velo").to_str().unwrap(),
        "-o",
        other.path("re.velo").to_str().unwrap(),
    ]);
    assert_eq!(re["root"], root.as_str());
    assert_eq!(
        fs::read(other.path("re.velo")).unwrap(),
        fs::read(env.path("trees.velo")).unwrap(),
        "export is deterministic"
    );
    let err = bare.fails(&[
        "export",
        env.path("trees.velo").to_str().unwrap(),
        "-o",
        bare.path("x.velo").to_str().unwrap(),
    ]);
    assert!(err.contains("no velo store"), "{err}");
}

#[test]
fn gc_frees_only_what_no_root_reaches() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    write_corpus(&a, 10, 1000, 7);
    write_corpus(&b, 10, 1000, 8);
    fs::copy(a.join("file0000.bin"), b.join("shared.bin")).unwrap();
    env.ingest(&a, &["--name", "a"]);
    env.ingest(&b, &["--name", "b"]);
    let dry = env.json(&["gc"]);
    assert_eq!(dry["blobs"], 0);
    env.ok(&["forget", "b"]);
    let dry = env.json(&["gc"]);
    assert_eq!(
        dry["blobs"], 10,
        "b's own blobs, not the one it shares with a"
    );
    assert_eq!(dry["ran"], false);
    assert_eq!(
        env.json(&["status"])["blobs"],
        20,
        "a dry run deletes nothing"
    );
    let run = env.json(&["gc", "--run"]);
    assert_eq!(run["blobs"], 10);
    assert_eq!(run["bytes"], 10_000);
    assert_eq!(env.json(&["status"])["blobs"], 10);
    for i in 0..10 {
        let out = env.run(&["cat", "a", &format!("file{i:04}.bin")]);
        assert_eq!(
            out.stdout,
            fs::read(a.join(format!("file{i:04}.bin"))).unwrap()
        );
    }
    env.fsck_ok();
    // Shard directories the sweep emptied are gone; the others still hold objects.
    for kind in ["blobs", "trees"] {
        for shard in fs::read_dir(env.store.join(kind)).unwrap() {
            let shard = shard.unwrap().path();
            assert!(
                fs::read_dir(&shard).unwrap().next().is_some(),
                "gc left the empty shard {}",
                shard.display()
            );
        }
    }
    let err = env.fails(&["forget", "b"]);
    assert!(err.contains("no registered root"), "{err}");
}

#[test]
fn a_store_inside_the_ingested_directory_is_not_ingested_into_itself() {
    let env = Env::new();
    let home = env.path("home");
    fs::create_dir_all(home.join("project")).unwrap();
    fs::write(home.join("project/file"), b"data").unwrap();
    let store = home.join(".local/share/velo");
    let out = Command::new(common::velo_bin())
        .arg("--store")
        .arg(&store)
        .args(["--json", "ingest"])
        .arg(&home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"], 1);
    assert_eq!(report["skipped"][0]["path"], ".local/share/velo");
    assert_eq!(report["skipped"][0]["reason"], "the velo store itself");
}

/// A blob deleted by hand (no gc, so no new generation) is noticed by the next ingest of
/// the same tree through its shard directory's mtime: ingest stores it again instead of
/// registering a root whose blob is missing (issue 8 item 11).
#[test]
fn a_blob_deleted_by_hand_is_stored_again_by_a_cached_reingest() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    for i in 0..3 {
        fs::write(src.join(format!("f{i}")), format!("content {i}")).unwrap();
        touch_ns(&src.join(format!("f{i}")), 1_600_000_000, 0);
    }
    // Files changed in the last two seconds (ctime) are never cached: wait that out.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    env.ingest(&src, &[]);
    let cached = env.json(&["ingest", src.to_str().unwrap()]);
    assert_eq!(cached["cached_files"], 3, "{cached}");
    // --no-cache reads every file, every time (it used to read a cache of its own).
    for _ in 0..2 {
        let uncached = env.json(&["ingest", src.to_str().unwrap(), "--no-cache"]);
        assert_eq!(uncached["cached_files"], 0, "{uncached}");
    }
    let hash = velo_core::Hash::of_blob(b"content 0").to_hex();
    fs::remove_file(env.store.join("blobs").join(&hash[..2]).join(&hash)).unwrap();
    let again = env.json(&["ingest", src.to_str().unwrap(), "--name", "after"]);
    assert_eq!(again["new_blobs"], 1, "{again}");
    env.fsck_ok();
}
