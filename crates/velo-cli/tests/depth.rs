//! Deep trees (issue 8, item 2): velo holds directories nested up to `MAX_DEPTH` levels
//! and refuses deeper ones with a clear error, in ingest, import and checkout: never a
//! stack overflow (which used to kill ingest at about 3,000 levels).

mod common;

use std::fs;

use common::Env;
use velo_core::{Entry, EntryKind, Hash, Mode, Name, Tree, MAX_DEPTH};

/// Makes `levels` nested directories `d/d/…/d/f` under `root` (by descriptor: the path is
/// longer than PATH_MAX).
fn nest(root: &std::path::Path, levels: usize) {
    use rustix::fs::{Mode as FsMode, OFlags};
    fs::create_dir_all(root).unwrap();
    let mut fd =
        rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, FsMode::empty()).unwrap();
    for _ in 0..levels {
        rustix::fs::mkdirat(&fd, "d", FsMode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(
            &fd,
            "d",
            OFlags::RDONLY | OFlags::DIRECTORY,
            FsMode::empty(),
        )
        .unwrap();
    }
    let f = rustix::fs::openat(
        &fd,
        "f",
        OFlags::WRONLY | OFlags::CREATE,
        FsMode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"deep").unwrap();
}

fn remove(root: &std::path::Path) {
    let _ = std::process::Command::new("rm")
        .arg("-rf")
        .arg(root)
        .status();
}

#[test]
fn a_tree_as_deep_as_allowed_ingests_and_checks_out_and_a_deeper_one_is_refused() {
    let env = Env::new();
    let ok = env.path("ok");
    nest(&ok, MAX_DEPTH - 2);
    env.ok(&["ingest", ok.to_str().unwrap(), "--name", "deep"]);
    let co = env.path("co");
    env.ok(&["checkout", "deep", co.to_str().unwrap()]);
    remove(&co);
    remove(&ok);

    let too = env.path("too");
    nest(&too, MAX_DEPTH + 100);
    let out = env.run(&["ingest", too.to_str().unwrap()]);
    remove(&too);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("deeper than 1024 levels"), "{err}");
    env.fsck_ok();
}

fn dir_entry(hash: Hash) -> Entry {
    Entry {
        xattrs: Default::default(),
        name: Name::try_from("d").unwrap(),
        mode: Mode::new(0o755).unwrap(),
        mtime_ns: 0,
        kind: EntryKind::Dir { hash },
    }
}

/// A hostile `.velo` 5,000 levels deep is refused at import, before anything is stored.
#[test]
fn a_manifest_deeper_than_allowed_is_refused_at_import() {
    let env = Env::new();
    let mut trees: Vec<(Hash, Vec<u8>)> = Vec::new();
    let mut below = Tree::new(Vec::new()).unwrap();
    for _ in 0..5000 {
        let (bytes, hash) = below.encode_with_hash();
        trees.push((hash, bytes));
        below = Tree::new(vec![dir_entry(hash)]).unwrap();
    }
    let (bytes, root) = below.encode_with_hash();
    trees.push((root, bytes));
    let path = env.path("deep.velo");
    let file = fs::File::create(&path).unwrap();
    let writer = velo_core::manifest::ManifestWriter::new(file, root, &mut trees, Some(0)).unwrap();
    writer.finish().unwrap();
    let out = env.run(&["import", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tree depth of 5001 exceeds the limit of 1024"),
        "{err}"
    );
    assert!(
        !env.store.join("trees").exists()
            || fs::read_dir(env.store.join("trees")).unwrap().count() == 0
    );
}

/// Writes a 64-level manifest whose every tree names one child twice (`a` and `b`) over a
/// symlink leaf; `bottom_mtime` is the mtime of the lowest directory entries.
fn exponential_manifest(env: &Env, file: &str, bottom_mtime: i64) -> std::path::PathBuf {
    let mut trees: Vec<(Hash, Vec<u8>)> = Vec::new();
    let leaf = Entry {
        xattrs: Default::default(),
        name: Name::try_from("f").unwrap(),
        mode: Mode::new(0o644).unwrap(),
        mtime_ns: 0,
        kind: EntryKind::Symlink {
            target: b"t".to_vec().into(),
        },
    };
    let mut below = Tree::new(vec![leaf]).unwrap();
    for level in 0..64 {
        let (bytes, hash) = below.encode_with_hash();
        trees.push((hash, bytes));
        let twice = |name: &str| Entry {
            name: Name::try_from(name).unwrap(),
            mtime_ns: if level == 0 { bottom_mtime } else { 0 },
            ..dir_entry(hash)
        };
        below = Tree::new(vec![twice("a"), twice("b")]).unwrap();
    }
    let (bytes, root) = below.encode_with_hash();
    trees.push((root, bytes));
    let path = env.path(file);
    let out = fs::File::create(&path).unwrap();
    velo_core::manifest::ManifestWriter::new(out, root, &mut trees, Some(0))
        .unwrap()
        .finish()
        .unwrap();
    path
}

/// A 64-level manifest whose every tree names one child twice (2^64 paths, 65 objects):
/// it imports, its statistics saturate instead of wrapping, and a checkout refuses it
/// before writing anything (issue 8, item 3).
#[test]
fn an_exponential_tree_is_refused_before_anything_is_written() {
    let env = Env::new();
    let path = exponential_manifest(&env, "wide.velo", 0);
    env.ok(&["import", path.to_str().unwrap(), "--name", "wide"]);
    let roots = env.json(&["roots"]);
    assert!(
        roots.to_string().contains(&u64::MAX.to_string()),
        "statistics saturate: {roots}"
    );
    let err = env.fails(&["ls", "-R", "wide"]);
    assert!(err.contains("more than velo lists"), "{err}");
    let empty = env.path("empty");
    fs::create_dir(&empty).unwrap();
    env.ok(&["ingest", empty.to_str().unwrap(), "--name", "empty"]);
    // status sums saturated statistics without overflowing.
    env.ok(&["status"]);
    // Two such trees that differ only in a directory's mtime at the bottom: no change to
    // list, found without walking 2^64 pairs.
    let other = exponential_manifest(&env, "wide-mtime.velo", 1);
    env.ok(&["import", other.to_str().unwrap(), "--name", "wide2"]);
    assert_eq!(env.ok(&["diff", "wide", "wide2"]), "");
    let err = env.fails(&["diff", "empty", "wide"]);
    assert!(err.contains("differ in more than"), "{err}");
    let dest = env.path("co");
    let err = env.fails(&["checkout", "wide", dest.to_str().unwrap()]);
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!dest.exists(), "the checkout wrote something");
}
