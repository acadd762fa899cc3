//! Sparse files keep their holes through ingest, the store and copy checkouts, and are
//! named by the hash of all their logical bytes.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::Env;

const SIZE: u64 = 2 << 30;
const DATA: &[u8] = b"a few bytes of data in the middle of 2 GiB of hole";

/// What `b3sum` would print for the file: BLAKE3 over a zero-filled stream with DATA at
/// SIZE / 2, computed here independently of the code under test.
fn expected_hash() -> String {
    let zeros = vec![0u8; 1 << 20];
    let mut hasher = blake3::Hasher::new();
    let feed_zeros = |hasher: &mut blake3::Hasher, mut len: u64| {
        while len > 0 {
            let n = len.min(zeros.len() as u64) as usize;
            hasher.update(&zeros[..n]);
            len -= n as u64;
        }
    };
    feed_zeros(&mut hasher, SIZE / 2);
    hasher.update(DATA);
    feed_zeros(&mut hasher, SIZE / 2 - DATA.len() as u64);
    hasher.finalize().to_hex().to_string()
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_two_gib_sparse_file_is_stored_and_checked_out_sparse() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let big = src.join("big");
    let file = fs::File::create(&big).unwrap();
    file.set_len(SIZE).unwrap();
    file.write_all_at(DATA, SIZE / 2).unwrap();
    drop(file);
    // Executable: its blob takes mode 0555.
    fs::set_permissions(&big, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(allocated(&big) < 1 << 20, "the test file itself is sparse");

    env.ingest(&src, &["--name", "t"]);
    let shown = env.json(&["show", "t", "big"]);
    assert_eq!(shown["size"].as_u64(), Some(SIZE));
    let hash = shown["hash"].as_str().unwrap().to_string();
    assert_eq!(
        hash,
        expected_hash(),
        "holes hash as the zeros they read as"
    );
    let blob = env.store.join("blobs").join(&hash[..2]).join(&hash);
    assert_eq!(fs::metadata(&blob).unwrap().len(), SIZE);
    assert!(
        allocated(&blob) < 1 << 20,
        "the blob keeps the holes: {} bytes allocated",
        allocated(&blob)
    );

    let copy = env.path("copy");
    env.ok(&["checkout", "t", copy.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(fs::metadata(copy.join("big")).unwrap().len(), SIZE);
    assert!(
        allocated(&copy.join("big")) < 1 << 20,
        "a copy checkout keeps the holes: {} bytes allocated",
        allocated(&copy.join("big"))
    );
    let mut middle = vec![0u8; DATA.len()];
    fs::File::open(copy.join("big"))
        .unwrap()
        .read_exact_at(&mut middle, SIZE / 2)
        .unwrap();
    assert_eq!(middle, DATA);

    // Another mtime for the same bytes: a hard-linked checkout makes a variant of it.
    common::touch_ns(&big, 1_000_000_000, 0);
    env.ingest(&src, &["--name", "t2"]);
    let farm = env.path("farm");
    let report = env.json(&["checkout", "t2", farm.to_str().unwrap()]);
    assert_eq!(report["variants_made"], 1, "{report}");
    let variant = blob.with_file_name(format!("{hash}.555.1000000000000000000"));
    assert!(
        allocated(&variant) < 1 << 20,
        "the variant keeps the holes: {} bytes allocated",
        allocated(&variant)
    );
    // fsck re-hashes the sparse blob and its variant (holes as zeros).
    env.fsck_ok();
}
