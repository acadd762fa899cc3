//! Bad input, one case per way to be invalid: hostile or corrupt `.velo` files given to
//! `velo import` and `velo ls`, a damaged store under `velo fsck`, and the user mistakes
//! every command must answer with a clear error (no store, no such path, no such tree, a
//! store of another version).
//!
//! Every rejected case must exit with status 1, say what is wrong (a key phrase of the
//! message is asserted), never panic, and write nothing: the store's `blobs/`, `trees/`,
//! `refs/roots/` and `tmp/` are snapshotted before and compared after.
//!
//! Manifests are written byte by byte following the layout in velo-core's manifest.rs,
//! with the checksum recomputed, so that the check behind the checksum is what rejects
//! them. All "random" data comes from a fixed-seed xorshift generator.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::Env;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use velo_core::manifest::{FLAG_BLOBS, MAGIC, MANIFEST_VERSION, MAX_TREE_OBJECT};
use velo_core::{Entry, EntryKind, Hash, Mode, Name, Tree};

// ---------------------------------------------------------------------------------------
// Encoding helpers
// ---------------------------------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// One hand-encoded tree entry: `varint name_len · name · u8 kind · varint mode ·
/// i64 mtime · payload`.
fn entry(name: &[u8], kind: u8, mode: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, name.len() as u64);
    out.extend_from_slice(name);
    out.push(kind);
    varint(&mut out, mode);
    out.extend_from_slice(&0i64.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn file_payload(hash: Hash, size: u64) -> Vec<u8> {
    let mut out = hash.0.to_vec();
    varint(&mut out, size);
    out
}

fn file_entry(name: &[u8], hash: Hash, size: u64) -> Vec<u8> {
    entry(name, 0, 0o644, &file_payload(hash, size))
}

fn symlink_payload(target: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, target.len() as u64);
    out.extend_from_slice(target);
    out
}

/// A hand-encoded tree object: `u8 version=1 · varint n · entries`.
fn tree_bytes(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![1];
    varint(&mut out, entries.len() as u64);
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

/// xorshift64*: deterministic bytes for "random" cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------
// A valid manifest, field by field, so each case changes exactly one thing
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct RawTree {
    hash: Hash,
    /// The length field; `None` writes the real length.
    len: Option<u32>,
    bytes: Vec<u8>,
}

#[derive(Clone)]
struct RawBlob {
    hash: Hash,
    /// The size field; `None` writes the real size.
    size: Option<u64>,
    bytes: Vec<u8>,
}

#[derive(Clone)]
struct Raw {
    magic: [u8; 8],
    version: u32,
    flags: u32,
    root: Hash,
    /// `None` writes the real number.
    tree_count: Option<u64>,
    trees: Vec<RawTree>,
    /// `None` writes the real number.
    blob_count: Option<u64>,
    blobs: Vec<RawBlob>,
    trailing: Vec<u8>,
}

impl Raw {
    /// The bytes, with the checksum that makes them pass the checksum check.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.root.0);
        let tree_count = self.tree_count.unwrap_or(self.trees.len() as u64);
        out.extend_from_slice(&tree_count.to_le_bytes());
        for t in &self.trees {
            out.extend_from_slice(&t.hash.0);
            let len = t.len.unwrap_or(t.bytes.len() as u32);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&t.bytes);
        }
        let blob_count = self.blob_count.unwrap_or(self.blobs.len() as u64);
        out.extend_from_slice(&blob_count.to_le_bytes());
        for b in &self.blobs {
            out.extend_from_slice(&b.hash.0);
            let size = b.size.unwrap_or(b.bytes.len() as u64);
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&b.bytes);
        }
        with_checksum(out, &self.trailing)
    }

    /// A manifest holding just this one tree object as its root (no blobs).
    fn single_tree(bytes: Vec<u8>) -> Raw {
        let hash = Hash::of_tree_encoding(&bytes);
        Raw {
            magic: MAGIC,
            version: MANIFEST_VERSION,
            flags: 0,
            root: hash,
            tree_count: None,
            trees: vec![RawTree {
                hash,
                len: None,
                bytes,
            }],
            blob_count: None,
            blobs: Vec::new(),
            trailing: Vec::new(),
        }
    }

    fn tree_index(&self, hash: Hash) -> usize {
        self.trees
            .iter()
            .position(|t| t.hash == hash)
            .expect("tree listed")
    }

    fn blob_index(&self, hash: Hash) -> usize {
        self.blobs
            .iter()
            .position(|b| b.hash == hash)
            .expect("blob listed")
    }
}

/// Appends the checksum (BLAKE3 of every byte before it), then `trailing`.
fn with_checksum(mut body: Vec<u8>, trailing: &[u8]) -> Vec<u8> {
    let sum = Hash::of_blob(&body);
    body.extend_from_slice(&sum.0);
    body.extend_from_slice(trailing);
    body
}

/// Recomputes the checksum of a whole manifest whose body was changed in place.
fn rechecksum(bytes: &[u8]) -> Vec<u8> {
    with_checksum(bytes[..bytes.len() - 32].to_vec(), &[])
}

/// The valid tree every structural case starts from: `a.txt`, `empty`, and `sub/` holding
/// `inner` and a symlink. Its contents are not in the test store, so a wrongly accepted
/// import would add objects as well as a root.
struct Fixture {
    child: Hash,
    hello: Hash,
    inner: Hash,
    valid_no_blobs: Raw,
    valid_with_blobs: Raw,
}

fn name(s: &str) -> Name {
    Name::try_from(s).expect("valid name")
}

fn fixture() -> Fixture {
    let contents: [&[u8]; 3] = [
        b"bad_input fixture: hello\n",
        b"bad_input fixture: inner file\n",
        b"",
    ];
    let [hello, inner, empty] = contents.map(Hash::of_blob);
    let file = |n: &str, hash: Hash, size: usize| Entry {
        xattrs: Default::default(),
        name: name(n),
        mode: Mode::new(0o644).expect("mode"),
        mtime_ns: 1_700_000_000_000_000_000,
        kind: EntryKind::File {
            hash,
            size: size as u64,
        },
    };
    let child_tree = Tree::new(vec![
        file("inner", inner, contents[1].len()),
        Entry {
            xattrs: Default::default(),
            name: name("link"),
            mode: Mode::new(0o777).expect("mode"),
            mtime_ns: 0,
            kind: EntryKind::Symlink {
                target: b"../a.txt".to_vec().into(),
            },
        },
    ])
    .expect("tree");
    let (child_bytes, child) = child_tree.encode_with_hash();
    let root_tree = Tree::new(vec![
        file("a.txt", hello, contents[0].len()),
        file("empty", empty, 0),
        Entry {
            xattrs: Default::default(),
            name: name("sub"),
            mode: Mode::new(0o755).expect("mode"),
            mtime_ns: -5,
            kind: EntryKind::Dir { hash: child },
        },
    ])
    .expect("tree");
    let (root_bytes, root) = root_tree.encode_with_hash();
    let mut trees = vec![
        RawTree {
            hash: root,
            len: None,
            bytes: root_bytes,
        },
        RawTree {
            hash: child,
            len: None,
            bytes: child_bytes,
        },
    ];
    trees.sort_by_key(|t| t.hash);
    let mut blobs: Vec<RawBlob> = contents
        .iter()
        .map(|c| RawBlob {
            hash: Hash::of_blob(c),
            size: None,
            bytes: c.to_vec(),
        })
        .collect();
    blobs.sort_by_key(|b| b.hash);
    let valid_no_blobs = Raw {
        magic: MAGIC,
        version: MANIFEST_VERSION,
        flags: 0,
        root,
        tree_count: None,
        trees,
        blob_count: None,
        blobs: Vec::new(),
        trailing: Vec::new(),
    };
    let valid_with_blobs = Raw {
        flags: FLAG_BLOBS,
        blobs,
        ..valid_no_blobs.clone()
    };
    Fixture {
        child,
        hello,
        inner,
        valid_no_blobs,
        valid_with_blobs,
    }
}

// ---------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------

/// Every file and directory under the store's object, root and temp directories, with
/// its mode and content, so any write shows up as a difference.
fn snapshot(store: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let e = e.expect("dir entry");
            let path = e.path();
            let rel = format!("{rel}/{}", e.file_name().to_string_lossy());
            let meta = fs::symlink_metadata(&path).expect("stat");
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                out.insert(rel.clone(), (mode, Vec::new()));
                walk(&path, &rel, out);
            } else {
                out.insert(rel, (mode, fs::read(&path).unwrap_or_default()));
            }
        }
    }
    let mut out = BTreeMap::new();
    for dir in ["blobs", "trees", "refs/roots", "tmp"] {
        walk(&store.join(dir), dir, &mut out);
    }
    out
}

/// A store holding one unrelated ingested tree, so snapshots compare real contents.
fn env_with_store() -> Env {
    let env = Env::new();
    let src = env.path("unrelated");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    fs::write(src.join("f"), b"an unrelated file\n").expect("write");
    fs::write(src.join("d/g"), b"another unrelated file\n").expect("write");
    env.ingest(&src, &["--name", "unrelated"]);
    env
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks one failed run: exit status 1, the phrase in stderr, no panic. Returns what is
/// wrong, if anything.
fn check_failure(what: &str, out: &Output, phrase: &str) -> Option<String> {
    let stderr = text(&out.stderr);
    if out.status.success() {
        return Some(format!(
            "{what}: accepted (exit 0)\nstdout: {}",
            text(&out.stdout)
        ));
    }
    if stderr.contains("panicked") || out.status.code() != Some(1) {
        return Some(format!("{what}: crashed ({}):\n{stderr}", out.status));
    }
    if !stderr.contains(phrase) {
        return Some(format!("{what}: stderr lacks {phrase:?}:\n{stderr}"));
    }
    None
}

/// Gives `bytes` to `velo import` and `velo ls`; both must fail with `phrase` and leave
/// the store as it was. Returns the problems found.
fn reject(env: &Env, label: &str, bytes: &[u8], phrase: &str) -> Vec<String> {
    let file = env.path("case.velo");
    fs::write(&file, bytes).expect("write case");
    let file = file.to_str().expect("utf-8 path");
    let mut problems = Vec::new();
    for args in [vec!["import", file], vec!["ls", file]] {
        let before = snapshot(&env.store);
        let out = env.run(&args);
        let what = format!("{label} / velo {}", args[0]);
        problems.extend(check_failure(&what, &out, phrase));
        let after = snapshot(&env.store);
        if before != after {
            let changed: Vec<&String> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            problems.push(format!("{what}: the store changed: {changed:?}"));
        }
    }
    problems
}

fn assert_no_problems(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n---\n")
    );
}

// ---------------------------------------------------------------------------------------
// Hostile manifests
// ---------------------------------------------------------------------------------------

/// Each case: a name, the file's bytes, and a phrase the error must contain.
fn hostile_cases(f: &Fixture) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let nb = &f.valid_no_blobs;
    let wb = &f.valid_with_blobs;
    let bad_magic = "not a .velo manifest";
    let mut rng = Rng(0x5eed_0bad_1dea_f00d);
    let with = |base: &Raw, change: &dyn Fn(&mut Raw)| {
        let mut raw = base.clone();
        change(&mut raw);
        raw.encode()
    };
    let one_entry = |e: Vec<u8>| Raw::single_tree(tree_bytes(&[e])).encode();
    let hello_file = |n: &[u8]| one_entry(file_entry(n, f.hello, 25));
    let (child, hello, inner) = (f.child, f.hello, f.inner);
    let unreachable = tree_bytes(&[file_entry(b"stray", hello, 25)]);

    vec![
        // The header.
        ("empty file", Vec::new(), bad_magic),
        ("random bytes", rng.bytes(4096), bad_magic),
        ("half a magic", b"VELO".to_vec(), bad_magic),
        (
            "magic then random bytes",
            [&MAGIC[..], &[0x7e, 0x31, 0xc4, 0x09], &rng.bytes(300)].concat(),
            "format version",
        ),
        (
            "wrong magic, valid rest",
            with(nb, &|r| r.magic = *b"VELO\0\n\r\x1a"),
            bad_magic,
        ),
        (
            "unknown version 2",
            with(nb, &|r| r.version = 2),
            ".velo manifest format version 2 is not supported",
        ),
        (
            "version 0",
            with(nb, &|r| r.version = 0),
            "format version 0 is not supported",
        ),
        (
            "version u32::MAX",
            with(nb, &|r| r.version = u32::MAX),
            "format version 4294967295 is not supported",
        ),
        (
            "unknown flag 0x2",
            with(nb, &|r| r.flags = 0x2),
            "unknown manifest flags 0x2",
        ),
        (
            "unknown high flag with blobs",
            with(wb, &|r| r.flags = 0x8000_0001),
            "unknown manifest flags 0x80000001",
        ),
        // Entry names.
        ("entry named ..", hello_file(b".."), "invalid entry name"),
        ("entry named .", hello_file(b"."), "invalid entry name"),
        (
            "entry named a/b",
            hello_file(b"a/b"),
            "cannot contain a slash",
        ),
        ("entry named /", hello_file(b"/"), "cannot contain a slash"),
        ("empty entry name", hello_file(b""), "cannot be empty"),
        (
            "entry name with NUL",
            hello_file(b"a\0b"),
            "cannot contain a NUL",
        ),
        (
            "entry name of 256 bytes",
            hello_file(&[b'n'; 256]),
            "longer than the 255 bytes",
        ),
        (
            "entry name length beyond the limit",
            hello_file(&[b'n'; 300]),
            "name length of 300 exceeds the limit",
        ),
        // Other entry fields.
        (
            "mode beyond 0o7777",
            one_entry(entry(b"f", 0, 0o10644, &file_payload(hello, 25))),
            "has bits outside the permission bits",
        ),
        (
            "mode beyond u32",
            one_entry(entry(b"f", 0, u64::MAX, &file_payload(hello, 25))),
            "has bits outside the permission bits",
        ),
        (
            "unknown entry kind 3",
            one_entry(entry(b"f", 3, 0o644, &file_payload(hello, 25))),
            "unknown entry kind 3",
        ),
        (
            "empty symlink target",
            one_entry(entry(b"l", 2, 0o777, &symlink_payload(b""))),
            "has an invalid target",
        ),
        (
            "symlink target with NUL",
            one_entry(entry(b"l", 2, 0o777, &symlink_payload(b"a\0b"))),
            "has an invalid target",
        ),
        (
            "symlink target of 4096 bytes",
            one_entry(entry(b"l", 2, 0o777, &symlink_payload(&[b't'; 4096]))),
            "has an invalid target",
        ),
        (
            "padded (non-canonical) varint",
            one_entry({
                let mut e = entry(b"f", 0, 0o644, &file_payload(hello, 25));
                // the mode 0o644 = 0xa4 0x03 becomes 0xa4 0x83 0x00
                let at = 3 + 1;
                assert_eq!(e[at], 0x03);
                e[at] = 0x83;
                e.insert(at + 1, 0);
                e
            }),
            "malformed integer while reading entry mode",
        ),
        (
            "entries unsorted",
            Raw::single_tree(tree_bytes(&[
                file_entry(b"b", hello, 25),
                file_entry(b"a", hello, 25),
            ]))
            .encode(),
            "not strictly sorted",
        ),
        (
            "duplicate entries",
            Raw::single_tree(tree_bytes(&[
                file_entry(b"a", hello, 25),
                file_entry(b"a", hello, 25),
            ]))
            .encode(),
            "not strictly sorted",
        ),
        (
            "one blob with two sizes",
            Raw::single_tree(tree_bytes(&[
                file_entry(b"a", hello, 25),
                file_entry(b"b", hello, 26),
            ]))
            .encode(),
            "entries give it two sizes",
        ),
        // Tree objects.
        (
            "tree format version 3",
            Raw::single_tree({
                let mut t = tree_bytes(&[file_entry(b"a", hello, 25)]);
                t[0] = 3;
                t
            })
            .encode(),
            "tree object format version 3",
        ),
        (
            "tree format version 2 without attributes",
            Raw::single_tree({
                let mut t = tree_bytes(&[file_entry(b"a", hello, 25)]);
                t[0] = 2;
                t.push(0);
                t
            })
            .encode(),
            "not canonical",
        ),
        (
            "tree with a trailing byte",
            Raw::single_tree([tree_bytes(&[file_entry(b"a", hello, 25)]), vec![0]].concat())
                .encode(),
            "1 unexpected bytes after the end",
        ),
        (
            "absurd entry count",
            Raw::single_tree({
                let mut t = vec![1];
                varint(&mut t, u64::MAX);
                t
            })
            .encode(),
            "entry count of 18446744073709551615 exceeds the limit",
        ),
        (
            "entry count beyond the data",
            Raw::single_tree({
                let mut t = vec![1];
                varint(&mut t, 1000);
                t.extend_from_slice(&file_entry(b"a", hello, 25));
                t
            })
            .encode(),
            "truncated",
        ),
        (
            "empty tree object",
            Raw::single_tree(Vec::new()).encode(),
            "truncated",
        ),
        // Counts and lengths.
        (
            "tree count u64::MAX",
            with(nb, &|r| r.tree_count = Some(u64::MAX)),
            "listed out of order or twice",
        ),
        (
            "tree count one too many",
            with(nb, &|r| r.tree_count = Some(3)),
            "listed out of order or twice",
        ),
        (
            "tree count one too few",
            with(nb, &|r| r.tree_count = Some(1)),
            "missing from the manifest",
        ),
        (
            "tree length u32::MAX",
            with(nb, &|r| r.trees[0].len = Some(u32::MAX)),
            "tree object length of 4294967295 exceeds the limit of 67108864",
        ),
        (
            "tree length at the limit, data short",
            with(nb, &|r| r.trees[0].len = Some(MAX_TREE_OBJECT)),
            "truncated",
        ),
        (
            "tree length one short",
            with(nb, &|r| {
                let len = r.trees[1].bytes.len() as u32;
                r.trees[1].len = Some(len - 1);
            }),
            "does not match its content",
        ),
        (
            "blob count u64::MAX",
            with(wb, &|r| r.blob_count = Some(u64::MAX)),
            "blob count of 18446744073709551615 exceeds the limit of 3",
        ),
        (
            "blob count one too many",
            with(wb, &|r| r.blob_count = Some(4)),
            "blob count of 4 exceeds the limit of 3",
        ),
        (
            "blob count one too few",
            with(wb, &|r| r.blob_count = Some(2)),
            "checksum mismatch",
        ),
        (
            "blob size u64::MAX",
            with(wb, &|r| {
                let i = r.blob_index(hello);
                r.blobs[i].size = Some(u64::MAX);
            }),
            "holds 18446744073709551615 bytes but the tree says 25",
        ),
        (
            "blob size u64::MAX, as the tree says",
            {
                let mut raw = Raw::single_tree(tree_bytes(&[file_entry(b"big", hello, u64::MAX)]));
                raw.flags = FLAG_BLOBS;
                raw.blobs = vec![RawBlob {
                    hash: hello,
                    size: Some(u64::MAX),
                    bytes: b"bad_input fixture: hello\n".to_vec(),
                }];
                raw.encode()
            },
            "truncated",
        ),
        // Trees that do not fit together.
        (
            "tree under a hash that is not its content's",
            {
                let mut raw = Raw::single_tree(tree_bytes(&[file_entry(b"a", hello, 25)]));
                let other = Hash::of_tree_encoding(&tree_bytes(&[file_entry(b"b", hello, 25)]));
                raw.root = other;
                raw.trees[0].hash = other;
                raw.encode()
            },
            "does not match its content",
        ),
        (
            "trees out of order",
            with(nb, &|r| r.trees.swap(0, 1)),
            "listed out of order or twice",
        ),
        (
            "tree listed twice",
            with(nb, &|r| {
                let t = r.trees[0].clone();
                r.trees.insert(0, t);
            }),
            "listed out of order or twice",
        ),
        (
            "unreachable extra tree",
            with(nb, &|r| {
                r.trees.push(RawTree {
                    hash: Hash::of_tree_encoding(&unreachable),
                    len: None,
                    bytes: unreachable.clone(),
                });
                r.trees.sort_by_key(|t| t.hash);
            }),
            "the root does not reach it",
        ),
        (
            "missing child tree",
            with(nb, &|r| {
                let i = r.tree_index(child);
                r.trees.remove(i);
            }),
            "is referenced but missing from the manifest",
        ),
        (
            "root not in the manifest",
            with(nb, &|r| r.root = Hash([0x42; 32])),
            "is referenced but missing from the manifest",
        ),
        (
            "no trees at all",
            with(nb, &|r| r.trees.clear()),
            "is referenced but missing from the manifest",
        ),
        (
            "root is the child",
            with(nb, &|r| r.root = child),
            "the root does not reach it",
        ),
        // Blobs.
        (
            "blob bytes do not match its hash",
            with(wb, &|r| {
                let i = r.blob_index(hello);
                r.blobs[i].bytes[0] ^= 0x20;
            }),
            "does not match its content",
        ),
        (
            "blob one byte longer",
            with(wb, &|r| {
                let i = r.blob_index(inner);
                r.blobs[i].bytes.push(b'!');
            }),
            "holds 31 bytes but the tree says 30",
        ),
        (
            "blob one byte shorter",
            with(wb, &|r| {
                let i = r.blob_index(inner);
                r.blobs[i].bytes.pop();
            }),
            "holds 29 bytes but the tree says 30",
        ),
        (
            "blob no entry references",
            with(wb, &|r| {
                let i = r.blob_index(hello);
                r.blobs.remove(i);
                let stray = b"no entry names this".to_vec();
                r.blobs.push(RawBlob {
                    hash: Hash::of_blob(&stray),
                    size: None,
                    bytes: stray,
                });
                r.blobs.sort_by_key(|b| b.hash);
            }),
            "no entry of the tree references it",
        ),
        (
            "blobs out of order",
            with(wb, &|r| r.blobs.swap(0, 1)),
            "listed out of order or twice",
        ),
        (
            "blob listed twice",
            with(wb, &|r| {
                r.blobs[1] = r.blobs[0].clone();
            }),
            "listed out of order or twice",
        ),
        (
            "blobs although the flags say none",
            with(wb, &|r| r.flags = 0),
            "the flags say there are no blobs",
        ),
        // The checksum and the end.
        (
            "checksum mismatch",
            {
                let mut bytes = nb.encode();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                bytes
            },
            "checksum mismatch",
        ),
        (
            "trailing bytes",
            with(wb, &|r| r.trailing = b"junk".to_vec()),
            "4 unexpected bytes after the end",
        ),
        (
            "checksum missing",
            {
                let bytes = nb.encode();
                bytes[..bytes.len() - 32].to_vec()
            },
            "truncated: the data ends while reading checksum",
        ),
    ]
}

#[test]
fn hostile_manifests_are_rejected_clearly_and_write_nothing() {
    let f = fixture();
    let env = env_with_store();
    // The valid fixtures themselves are accepted by `ls` (without touching the store), so
    // each case below fails because of its one change.
    for raw in [&f.valid_no_blobs, &f.valid_with_blobs] {
        let file = env.path("valid.velo");
        fs::write(&file, raw.encode()).expect("write");
        let listing = env.ok(&["ls", "-R", file.to_str().expect("utf-8")]);
        assert_eq!(listing, "a.txt\nempty\nsub\nsub/inner\nsub/link\n");
    }
    let mut problems = Vec::new();
    let cases = hostile_cases(&f);
    for (label, bytes, phrase) in &cases {
        problems.extend(reject(&env, label, bytes, phrase));
    }
    assert_no_problems(problems);
    env.fsck_ok();
}

/// Many positions in `0..len`: all of the first 64 bytes (the header and the first tree's
/// fields) and the last 48, every third in between; enough to hit every field.
fn positions(len: usize) -> impl Iterator<Item = usize> {
    (0..len).filter(move |&i| i < 64 || i + 48 >= len || i % 3 == 0)
}

#[test]
fn truncations_are_rejected() {
    let f = fixture();
    let env = env_with_store();
    let mut problems = Vec::new();
    for raw in [&f.valid_no_blobs, &f.valid_with_blobs] {
        let good = raw.encode();
        for cut in positions(good.len()) {
            let phrase = if cut < 8 {
                "not a .velo manifest"
            } else {
                "truncated"
            };
            let label = format!("{} bytes of {}", cut, good.len());
            problems.extend(reject(&env, &label, &good[..cut], phrase));
        }
    }
    assert_no_problems(problems);
}

#[test]
fn bit_flips_are_rejected() {
    let f = fixture();
    let env = env_with_store();
    let mut problems = Vec::new();
    let file = env.path("case.velo");
    let file = file.to_str().expect("utf-8");
    // Flips anywhere, checksum left as it is: the checksum (or an earlier check) rejects.
    let good = f.valid_no_blobs.encode();
    for at in positions(good.len()) {
        let mut bad = good.clone();
        bad[at] ^= 1 << (at % 8);
        problems.extend(reject(&env, &format!("no-blobs, flip at {at}"), &bad, file));
    }
    // Flips before the checksum with the checksum recomputed: the structural checks must
    // catch every one (in a manifest with all its blobs, no single flip stays valid).
    let good = f.valid_with_blobs.encode();
    for at in positions(good.len() - 32) {
        let mut bad = good.clone();
        bad[at] ^= 1 << (at % 8);
        let bad = rechecksum(&bad);
        problems.extend(reject(
            &env,
            &format!("with-blobs, flip at {at}, checksum fixed"),
            &bad,
            file,
        ));
    }
    assert_no_problems(problems);
}

#[test]
fn random_bytes_are_rejected() {
    let env = env_with_store();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut problems = Vec::new();
    for len in [1, 7, 8, 9, 64, 1000, 100_000] {
        let bytes = rng.bytes(len);
        problems.extend(reject(
            &env,
            &format!("{len} random bytes"),
            &bytes,
            "not a .velo manifest",
        ));
        // The same after a valid magic and version: the next field is what fails.
        let bytes = [&MAGIC[..], &1u32.to_le_bytes(), &bytes].concat();
        let file = env.path("case.velo");
        problems.extend(reject(
            &env,
            &format!("magic, version, {len} random bytes"),
            &bytes,
            file.to_str().expect("utf-8"),
        ));
    }
    assert_no_problems(problems);
}

/// One change to a manifest's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Delete),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, bit) => {
            let at = i.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        Mutation::Set(i, b) => {
            let at = i.index(bytes.len());
            bytes[at] = *b;
        }
        Mutation::Insert(i, b) => {
            let at = i.index(bytes.len() + 1);
            bytes.insert(at, *b);
        }
        Mutation::Delete(i) => {
            let at = i.index(bytes.len());
            bytes.remove(at);
        }
        Mutation::Truncate(i) => {
            let at = i.index(bytes.len());
            bytes.truncate(at);
        }
    }
}

#[test]
fn random_mutations_never_panic_and_never_corrupt_the_store() {
    let f = fixture();
    let env = env_with_store();
    let seeds = [f.valid_no_blobs.encode(), f.valid_with_blobs.encode()];
    let file = env.path("mutated.velo");
    let file_arg = file.to_str().expect("utf-8").to_string();
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(mutation(), 1..4),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(with_blobs, mutations, fix_checksum)| {
        let mut bytes = seeds[usize::from(with_blobs)].clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if fix_checksum && bytes.len() >= 32 {
            bytes = rechecksum(&bytes);
        }
        fs::write(&file, &bytes).expect("write");
        for cmd in ["ls", "import"] {
            let out = env.run(&[cmd, &file_arg]);
            let stderr = text(&out.stderr);
            prop_assert!(
                !stderr.contains("panicked") && matches!(out.status.code(), Some(0 | 1)),
                "velo {cmd} crashed ({}) on {mutations:?}:\n{stderr}",
                out.status
            );
            if !out.status.success() {
                prop_assert!(
                    stderr.contains("velo: error: "),
                    "no error message: {stderr}"
                );
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Whatever was accepted must have left a sound store.
    env.fsck_ok();
}

/// `velo import` of a bad file must not create a store where there was none (when there is
/// no store yet, `import` verifies the whole file before it creates one).
#[test]
fn a_rejected_import_creates_no_store() {
    let f = fixture();
    let env = Env::new();
    let file = env.path("bad.velo");
    let mut bytes = f.valid_with_blobs.encode();
    bytes.truncate(100);
    fs::write(&file, &bytes).expect("write");
    let stderr = env.fails(&["import", file.to_str().expect("utf-8")]);
    assert!(stderr.contains("truncated"), "{stderr}");
    assert!(
        !env.store.exists(),
        "a rejected import created a store at {}: {:?}",
        env.store.display(),
        fs::read_dir(&env.store).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}

/// A manifest error names the file and the problem once, not the problem twice.
#[test]
fn a_manifest_error_states_its_cause_once() {
    let f = fixture();
    let env = env_with_store();
    let file = env.path("cut.velo");
    let bytes = f.valid_no_blobs.encode();
    fs::write(&file, &bytes[..100]).expect("write");
    let file = file.to_str().expect("utf-8");
    for cmd in ["import", "ls"] {
        let stderr = env.fails(&[cmd, file]);
        assert_eq!(
            stderr.matches("truncated").count(),
            1,
            "velo {cmd}: the cause is repeated:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// fsck on a damaged store
// ---------------------------------------------------------------------------------------

fn object_path(store: &Path, kind: &str, hash: &str) -> PathBuf {
    store.join(kind).join(&hash[..2]).join(hash)
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn fsck_names_each_kind_of_damage() {
    type Damage = fn(&Path, &Path);
    let cases: [(&str, Damage, &str); 5] = [
        (
            "a byte of a blob flipped",
            |blob, _| {
                set_mode(blob, 0o644);
                let mut bytes = fs::read(blob).expect("read");
                bytes[3] ^= 0x01;
                fs::write(blob, bytes).expect("write");
                set_mode(blob, 0o444);
            },
            "corrupt-blob",
        ),
        (
            "a blob removed",
            |blob, _| fs::remove_file(blob).expect("rm"),
            "missing-blob",
        ),
        (
            "a tree removed",
            |_, tree| fs::remove_file(tree).expect("rm"),
            "missing-tree",
        ),
        (
            "a blob made writable",
            |blob, _| set_mode(blob, 0o644),
            "bad-mode",
        ),
        (
            "a byte of a tree flipped",
            |_, tree| {
                set_mode(tree, 0o644);
                let mut bytes = fs::read(tree).expect("read");
                let last = bytes.len() - 1;
                bytes[last] ^= 0x01;
                fs::write(tree, bytes).expect("write");
                set_mode(tree, 0o444);
            },
            "corrupt-tree",
        ),
    ];
    let content = b"fsck fixture: the file whose blob is damaged\n";
    let blob_hash = Hash::of_blob(content).to_hex();
    for (what, damage, kind) in cases {
        let env = Env::new();
        let src = env.path("src");
        fs::create_dir_all(src.join("sub")).expect("mkdir");
        fs::write(src.join("sub/damaged.txt"), content).expect("write");
        fs::write(src.join("top.txt"), b"fsck fixture: top\n").expect("write");
        let root = env.ingest(&src, &[]);
        env.fsck_ok();
        let sub = env.json(&["show", &root, "sub"]);
        let sub_hash = sub["hash"].as_str().expect("hash").to_string();
        let blob = object_path(&env.store, "blobs", &blob_hash);
        let tree = object_path(&env.store, "trees", &sub_hash);
        assert!(
            blob.is_file() && tree.is_file(),
            "objects at {blob:?}, {tree:?}"
        );
        damage(&blob, &tree);

        let out = env.run(&["--json", "fsck"]);
        assert!(!out.status.success(), "{what}: fsck passed");
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        assert_eq!(report["ok"], Value::Bool(false), "{what}: {report}");
        let problems = report["problems"].as_array().expect("problems");
        let object = if kind.ends_with("-tree") {
            &sub_hash
        } else {
            &blob_hash
        };
        assert!(
            problems
                .iter()
                .any(|p| p["kind"] == kind && p["object"].as_str() == Some(object)),
            "{what}: no {kind} problem for {object} in {report}"
        );
        // The text report names the kind too.
        let out = env.run(&["fsck"]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(
            text(&out.stdout).contains(&format!("{kind}: {object}")),
            "{what}: text report lacks {kind}:\n{}",
            text(&out.stdout)
        );
        assert!(!text(&out.stderr).contains("panicked"), "{what}");
    }
}

// ---------------------------------------------------------------------------------------
// Clear errors for user mistakes
// ---------------------------------------------------------------------------------------

#[test]
fn read_commands_on_a_missing_store_say_so_and_create_nothing() {
    let env = Env::new();
    let out_file = env.path("out.velo");
    let out_file = out_file.to_str().expect("utf-8");
    let some_hash = Hash([7; 32]).to_hex();
    let commands: Vec<Vec<&str>> = vec![
        vec!["ls", "abcd"],
        vec!["ls", &some_hash],
        vec!["cat", "abcd", "f"],
        vec!["show", "abcd", "f"],
        vec!["diff", "abcd", "dcba"],
        vec!["export", "abcd", "-o", out_file],
        vec!["roots"],
        vec!["forget", "abcd"],
        vec!["status"],
        vec!["gc"],
        vec!["gc", "--run"],
        vec!["fsck"],
    ];
    let mut problems = Vec::new();
    for args in commands {
        let out = env.run(&args);
        let what = format!("velo {}", args.join(" "));
        problems.extend(check_failure(
            &what,
            &out,
            &format!("no velo store at {}", env.store.display()),
        ));
        if env.store.exists() {
            problems.push(format!("{what}: created the store"));
            let _ = fs::remove_dir_all(&env.store);
        }
    }
    assert_no_problems(problems);
}

#[test]
fn ingest_of_a_path_that_does_not_exist_says_so() {
    let env = Env::new();
    let missing = env.path("no/such/dir");
    let stderr = env.fails(&["ingest", missing.to_str().expect("utf-8")]);
    assert!(
        stderr.contains(&format!("{} does not exist", missing.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!env.store.exists(), "a failed ingest created the store");

    let file = env.path("a-file");
    fs::write(&file, b"x").expect("write");
    let stderr = env.fails(&["ingest", file.to_str().expect("utf-8")]);
    assert!(stderr.contains("is not a directory"), "{stderr}");

    let env = env_with_store();
    let before = snapshot(&env.store);
    let stderr = env.fails(&["ingest", "/nonexistent/velo-bad-input"]);
    assert!(
        stderr.contains("/nonexistent/velo-bad-input does not exist"),
        "{stderr}"
    );
    assert_eq!(
        before,
        snapshot(&env.store),
        "a failed ingest wrote to the store"
    );
}

#[test]
fn a_tree_argument_that_names_nothing_says_so() {
    let env = env_with_store();
    let before = snapshot(&env.store);
    let out_file = env.path("out.velo");
    let out_file = out_file.to_str().expect("utf-8");
    let neither = "is neither a root name, a tree hash (or unique prefix of at least 4 hex digits) in this store, nor a .velo file";
    let missing_hash = Hash([7; 32]).to_hex();
    let missing_velo = env.path("missing.velo");
    let missing_velo = missing_velo.to_str().expect("utf-8");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["ls", "nosuchthing"],
            format!("\"nosuchthing\" {neither}"),
        ),
        (vec!["ls", "0000"], format!("\"0000\" {neither}")),
        (vec!["ls", "ab"], format!("\"ab\" {neither}")),
        (vec!["cat", "nosuchthing", "f"], neither.to_string()),
        (vec!["show", "nosuchthing", "f"], neither.to_string()),
        (
            vec!["diff", "nosuchthing", "unrelated"],
            neither.to_string(),
        ),
        (
            vec!["export", "nosuchthing", "-o", out_file],
            neither.to_string(),
        ),
        (
            vec!["ls", &missing_hash],
            format!("tree {missing_hash} is missing from the store"),
        ),
        (
            vec!["ls", missing_velo],
            format!("cannot open {missing_velo}"),
        ),
        (
            vec!["import", missing_velo],
            format!("{missing_velo} is not a file"),
        ),
    ];
    let mut problems = Vec::new();
    for (args, phrase) in &cases {
        let out = env.run(args);
        problems.extend(check_failure(
            &format!("velo {}", args.join(" ")),
            &out,
            phrase,
        ));
    }
    assert_no_problems(problems);
    assert!(!Path::new(out_file).exists(), "export wrote a file");
    assert_eq!(before, snapshot(&env.store), "the store changed");
}

#[test]
fn a_store_of_another_format_version_is_refused_untouched() {
    let env = env_with_store();
    let f = fixture();
    let valid = env.path("valid.velo");
    fs::write(&valid, f.valid_with_blobs.encode()).expect("write");
    let root = env.ok(&["roots"]);
    assert!(root.contains("unrelated"), "{root}");
    let version_path = env.store.join("VERSION");
    let text_before = fs::read_to_string(&version_path).expect("VERSION");
    let rest: String = text_before
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&version_path, format!("velo-store 99\n{rest}")).expect("write VERSION");
    let version_text = fs::read(&version_path).expect("VERSION");
    let before = snapshot(&env.store);

    let src = env.path("unrelated");
    let src = src.to_str().expect("utf-8");
    let valid = valid.to_str().expect("utf-8");
    let out_file = env.path("out.velo");
    let out_file = out_file.to_str().expect("utf-8");
    let commands: Vec<Vec<&str>> = vec![
        vec!["roots"],
        vec!["status"],
        vec!["fsck"],
        vec!["ls", "unrelated"],
        vec!["cat", "unrelated", "f"],
        vec!["export", "unrelated", "-o", out_file],
        vec!["ingest", src],
        vec!["import", valid],
        vec!["forget", "unrelated"],
        vec!["gc", "--run"],
    ];
    let phrase = format!(
        "the store at {} has format version 99; this velo reads version 1",
        env.store.display()
    );
    let mut problems = Vec::new();
    for args in commands {
        let out = env.run(&args);
        let what = format!("velo {}", args.join(" "));
        problems.extend(check_failure(&what, &out, &phrase));
        if snapshot(&env.store) != before
            || fs::read(&version_path).ok() != Some(version_text.clone())
        {
            problems.push(format!("{what}: changed the store"));
        }
    }
    assert_no_problems(problems);
    assert!(!Path::new(out_file).exists(), "export wrote a file");
}
