//! The import cache: a `.velo` verified once is not read again while it is unchanged and
//! its import is still registered; any change, a forgotten root, a gc that deleted objects
//! or a damaged entry makes the next use verify the file again, never fail.

use std::fs;
use std::path::Path;
use std::time::Duration;

use velo_core::{Entry, EntryKind, Hash, Mode, Name, Tree};
use velo_store::{ImportOptions, RootRecord, Store};

/// A one-file tree exported with its blobs from a scratch store.
fn manifest(dir: &Path) -> (std::path::PathBuf, Hash) {
    let source = Store::open_or_create(dir.join("source")).unwrap();
    let (blob, _) = source.insert_blob(b"hello, cache\n").unwrap();
    let tree = Tree::new(vec![Entry {
        xattrs: Default::default(),
        name: Name::new(b"hello.txt").unwrap(),
        mode: Mode::new(0o644).unwrap(),
        mtime_ns: 1_600_000_000_000_000_000,
        kind: EntryKind::File {
            hash: blob,
            size: 13,
        },
    }])
    .unwrap();
    let (root, _) = source.put_tree(&tree).unwrap();
    source
        .register_root(&RootRecord {
            name: None,
            root: root.to_hex(),
            created_unix: 0,
            stats: Default::default(),
            partial: false,
            source: None,
        })
        .unwrap();
    let out = dir.join("app.velo");
    source.export(root, &out, true).unwrap();
    (out, root)
}

/// Whether the file was read and verified (`false`: the cache answered).
fn verified(store: &Store, file: &Path, name: Option<&str>, root: Hash) -> bool {
    let options = ImportOptions {
        name: name.map(str::to_string),
        partial: false,
    };
    let imported = store.import_remembered(file, &options).unwrap();
    assert_eq!(imported.root, root);
    imported.report.is_some()
}

fn entries(store: &Store) -> Vec<std::path::PathBuf> {
    fs::read_dir(store.cache_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("import-")
        })
        .collect()
}

#[test]
fn an_unchanged_manifest_is_verified_once_and_any_doubt_verifies_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (file, root) = manifest(dir.path());
    let store = Store::open_or_create(dir.path().join("store")).unwrap();

    // A file changed within the last two seconds is never remembered (a change within
    // the same timestamp tick would go unseen).
    assert!(verified(&store, &file, None, root));
    assert!(
        verified(&store, &file, None, root),
        "a fresh file was trusted"
    );
    std::thread::sleep(Duration::from_millis(2100));

    assert!(verified(&store, &file, None, root));
    assert!(
        !verified(&store, &file, None, root),
        "an unchanged file was read again"
    );
    assert!(!verified(&store, &file, None, root));

    // A damaged entry is a miss, not an error; the import writes a good one again.
    let cached = entries(&store);
    assert_eq!(cached.len(), 1, "{cached:?}");
    for damage in [
        &b""[..],
        b"VIMPC01\n",
        b"garbage that is not an entry at all",
    ] {
        fs::write(&cached[0], damage).unwrap();
        assert!(verified(&store, &file, None, root));
        assert!(!verified(&store, &file, None, root));
    }
    let mut flipped = fs::read(&cached[0]).unwrap();
    let last = flipped.len() - 40;
    flipped[last] ^= 1;
    fs::write(&cached[0], &flipped).unwrap();
    assert!(verified(&store, &file, None, root));

    // A forgotten root may lose its objects to gc: verify and register again.
    assert_eq!(store.forget(&root.to_hex()).unwrap().len(), 1);
    assert!(verified(&store, &file, None, root));
    assert!(!verified(&store, &file, None, root));

    // A gc that deleted anything invalidates every entry.
    store.insert_blob(b"garbage no root reaches").unwrap();
    assert!(store.gc(true).unwrap().blobs > 0);
    assert!(verified(&store, &file, None, root));
    assert!(!verified(&store, &file, None, root));

    // An import asking for a name registers it; the entry then vouches for that record.
    assert!(verified(&store, &file, Some("app"), root));
    assert!(!verified(&store, &file, Some("app"), root));
    assert!(!verified(&store, &file, None, root));
    assert!(verified(&store, &file, Some("other"), root));
    // The record the entry names moved: verify again.
    store.forget("other").unwrap();
    assert!(verified(&store, &file, None, root));

    // Same size, new mtime: verified again (and not remembered, being fresh).
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes).unwrap();
    assert!(verified(&store, &file, None, root));
    assert!(verified(&store, &file, None, root));

    // A missing root tree (a store damaged by hand) is a miss as well.
    std::thread::sleep(Duration::from_millis(2100));
    assert!(verified(&store, &file, None, root));
    assert!(!verified(&store, &file, None, root));
    fs::remove_file(store.tree_path(&root)).unwrap();
    assert!(verified(&store, &file, None, root));
    assert!(store.has_tree(&root), "the import did not restore the tree");
}

#[test]
fn a_changed_file_under_an_old_entry_is_verified_and_a_bad_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (file, root) = manifest(dir.path());
    let store = Store::open_or_create(dir.path().join("store")).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert!(verified(&store, &file, None, root));
    assert!(!verified(&store, &file, None, root));
    // Damage the file in place, keeping its size: the entry must not vouch for it.
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    assert!(store
        .import_remembered(&file, &ImportOptions::default())
        .is_err());
}
