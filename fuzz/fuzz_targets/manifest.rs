//! Fuzz target `manifest`: the `.velo` reader and the tree decoder on hostile input.
//!
//! Every input is used up to three ways:
//! 1. raw: given to `ManifestReader::open` (then every blob streamed into a sink, then
//!    `finish`) and to `Tree::decode`;
//! 2. as the choices of a generator that builds a manifest with correct hashes and
//!    checksum and, by choice, one or more known defects (bad names, unsorted entries,
//!    missing or unreachable trees, wrong blob sizes, ...), so the checks behind the hashes
//!    and the checksum are reached without any seed corpus;
//! 3. as byte patches to one of the real manifests in `seeds/` (made with `velo export`),
//!    with the checksum recomputed.
//!
//! Oracles: nothing panics; an accepted manifest is canonical (the writer reproduces it
//! byte for byte), and so is a decoded tree; a generated manifest is accepted exactly when
//! the generator made no defect, and a generated tree object decodes exactly when it has
//! no defect of its own.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run manifest -- -max_total_time=60`
//! (add `corpus/manifest seeds` after `manifest` to start from the seed files too).
#![no_main]

use std::collections::{BTreeMap, HashMap, HashSet};

use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use velo_core::manifest::{ManifestReader, ManifestWriter, FLAG_BLOBS, MAGIC, MANIFEST_VERSION};
use velo_core::{Hash, Tree};

/// Real manifests made with `velo export --mtime zero` (see seeds/).
const SEEDS: [&[u8]; 3] = [
    include_bytes!("../seeds/empty.velo"),
    include_bytes!("../seeds/tree.velo"),
    include_bytes!("../seeds/with-blobs.velo"),
];

fuzz_target!(|data: &[u8]| {
    check_tree(data);
    let _ = read_manifest(data);
    if let Some((&mode, rest)) = data.split_first() {
        let mut u = Unstructured::new(rest);
        match mode % 4 {
            0 | 1 => {
                let _ = generated(&mut u);
            }
            2 => {
                let _ = patched(&mut u);
            }
            _ => {}
        }
    }
});

/// A decoded tree re-encodes to exactly its input.
fn check_tree(bytes: &[u8]) -> bool {
    match Tree::decode(bytes) {
        Ok(tree) => {
            assert!(
                tree.encode() == bytes,
                "decoded tree does not re-encode to its input"
            );
            true
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

/// Reads a whole manifest; if it is accepted, checks what the reader yields and that the
/// writer reproduces the input exactly.
fn read_manifest(bytes: &[u8]) -> Result<(), String> {
    let mut reader = ManifestReader::open(bytes).map_err(|e| e.to_string())?;
    let root = reader.root();
    let has_blobs = reader.has_blobs();
    let referenced = reader.referenced_blobs().clone();
    let mut trees: Vec<(Hash, Vec<u8>)> = reader
        .trees()
        .iter()
        .map(|(h, t)| (*h, t.encode()))
        .collect();
    assert!(
        trees.iter().any(|(h, _)| *h == root),
        "root tree not among the trees"
    );
    for (hash, encoded) in &trees {
        assert!(
            Hash::of_tree_encoding(encoded) == *hash,
            "tree under a wrong hash"
        );
    }
    let mut blobs = Vec::new();
    loop {
        let mut sink = Vec::new();
        match reader.next_blob(&mut sink) {
            Ok(Some((hash, size))) => {
                assert!(sink.len() as u64 == size, "blob yielded with a wrong size");
                assert!(
                    Hash::of_blob(&sink) == hash,
                    "blob yielded with a wrong hash"
                );
                assert!(
                    referenced.get(&hash) == Some(&size),
                    "unreferenced blob yielded"
                );
                blobs.push((hash, sink));
            }
            Ok(None) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    reader.finish().map_err(|e| e.to_string())?;
    let count = has_blobs.then_some(blobs.len() as u64);
    let mut writer = ManifestWriter::new(Vec::new(), root, &mut trees, count)
        .expect("writing an accepted manifest's trees");
    for (hash, content) in &blobs {
        writer
            .blob(*hash, content.len() as u64, &mut &content[..])
            .expect("writing an accepted manifest's blobs");
    }
    let rewritten = writer.finish().expect("finishing an accepted manifest");
    assert!(
        rewritten == bytes,
        "an accepted manifest is not canonical: the writer produces other bytes"
    );
    Ok(())
}

/// True about once in `n` times, never once the input is used up (so a short input
/// yields a manifest without defects).
fn rare(u: &mut Unstructured, n: u8) -> bool {
    matches!(u.arbitrary::<u8>(), Ok(b) if b % n == n - 1)
}

/// Up to `len` bytes of the input (fewer once it runs out).
fn take(u: &mut Unstructured, len: usize) -> AResult<Vec<u8>> {
    let n = len.min(u.len());
    Ok(u.bytes(n)?.to_vec())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && name.len() <= 255
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// What the generator did: known defects, and whether validity is unknown (raw bytes).
#[derive(Default)]
struct Gen {
    defects: Vec<String>,
    unknown: bool,
}

impl Gen {
    fn defect(&mut self, what: impl Into<String>) {
        self.defects.push(what.into());
    }
}

/// One generated tree object.
struct GenTree {
    hash: Hash,
    bytes: Vec<u8>,
    /// Why the object itself is invalid (empty if it is valid).
    bad: Vec<&'static str>,
    /// Arbitrary bytes: validity and contents unknown.
    raw: bool,
    children: Vec<Hash>,
    files: Vec<(Hash, u64)>,
}

/// One generated entry: its name, its encoding after the name, and what it refers to.
#[derive(Clone)]
struct GenEntry {
    name: Vec<u8>,
    rest: Vec<u8>,
    /// The entry's own defects.
    bad: Vec<&'static str>,
    child: Option<Hash>,
    file: Option<(Hash, u64)>,
}

const GOOD_NAMES: [&[u8]; 9] = [
    b"a", b"b", b"c", b"dir", b"...", b".hidden", b"caf\xe9", b"x y", b"z",
];
const BAD_NAMES: [&[u8]; 6] = [b"", b".", b"..", b"a/b", b"/", b"a\0b"];

fn gen_name(u: &mut Unstructured) -> AResult<Vec<u8>> {
    Ok(if rare(u, 16) {
        let i = u.int_in_range(0..=BAD_NAMES.len())?;
        BAD_NAMES
            .get(i)
            .map_or_else(|| vec![b'n'; 256], |n| n.to_vec())
    } else if rare(u, 8) {
        let len = u.int_in_range(0..=12)?;
        (0..len)
            .map(|_| u.arbitrary::<u8>())
            .collect::<AResult<_>>()?
    } else {
        GOOD_NAMES[u.choose_index(GOOD_NAMES.len())?].to_vec()
    })
}

fn gen_tree(
    u: &mut Unstructured,
    blobs: &[(Hash, Vec<u8>)],
    earlier: &[GenTree],
) -> AResult<GenTree> {
    if rare(u, 32) {
        let len = u.int_in_range(0..=48)?;
        let bytes = take(u, len)?;
        return Ok(GenTree {
            hash: Hash::of_tree_encoding(&bytes),
            bytes,
            bad: Vec::new(),
            raw: true,
            children: Vec::new(),
            files: Vec::new(),
        });
    }
    let mut bad = Vec::new();
    let n = u.int_in_range(0..=6)?;
    let mut entries: Vec<GenEntry> = Vec::new();
    for _ in 0..n {
        let mut bad = Vec::new();
        let (mut child, mut file) = (None, None);
        let name = gen_name(u)?;
        if !valid_name(&name) {
            bad.push("invalid entry name");
        }
        let mut rest = Vec::new();
        let tag: u8 = if rare(u, 32) {
            bad.push("unknown entry kind");
            u.int_in_range(3..=255)?
        } else {
            u.int_in_range(0..=2)?
        };
        rest.push(tag);
        let mode: u64 = if rare(u, 32) {
            bad.push("mode beyond 0o7777");
            u.int_in_range(0o10000..=u64::MAX)?
        } else {
            u.int_in_range(0..=0o7777)?
        };
        put_varint(&mut rest, mode);
        if rare(u, 32) {
            bad.push("padded mode varint");
            *rest.last_mut().expect("varint") |= 0x80;
            rest.push(0);
        }
        rest.extend_from_slice(&u.arbitrary::<i64>()?.to_le_bytes());
        match tag {
            0 => {
                let (hash, size) = if blobs.is_empty() || rare(u, 4) {
                    (Hash(u.arbitrary()?), u.arbitrary::<u64>()?)
                } else {
                    let (hash, content) = &blobs[u.choose_index(blobs.len())?];
                    (*hash, content.len() as u64)
                };
                rest.extend_from_slice(&hash.0);
                put_varint(&mut rest, size);
                file = Some((hash, size));
            }
            1 => {
                let hash = if earlier.is_empty() || rare(u, 16) {
                    Hash(u.arbitrary()?)
                } else {
                    earlier[u.choose_index(earlier.len())?].hash
                };
                rest.extend_from_slice(&hash.0);
                child = Some(hash);
            }
            2 => {
                let target: Vec<u8> = if rare(u, 16) {
                    bad.push("invalid symlink target");
                    match u.int_in_range(0..=2)? {
                        0 => Vec::new(),
                        1 => b"a\0b".to_vec(),
                        _ => vec![b'a'; 4096],
                    }
                } else {
                    let len = u.int_in_range(1..=12)?;
                    (0..len)
                        .map(|_| u.arbitrary::<u8>().map(|b| b.max(1)))
                        .collect::<AResult<_>>()?
                };
                put_varint(&mut rest, target.len() as u64);
                rest.extend_from_slice(&target);
            }
            _ => {}
        }
        entries.push(GenEntry {
            name,
            rest,
            bad,
            child,
            file,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    if rare(u, 16) {
        if entries.windows(2).any(|w| w[0].name == w[1].name) {
            bad.push("duplicate names");
        }
    } else {
        entries.dedup_by(|a, b| a.name == b.name);
    }
    // Only the entries that are kept count.
    bad.extend(entries.iter().flat_map(|e| e.bad.iter().copied()));
    let children = entries.iter().filter_map(|e| e.child).collect();
    let files = entries.iter().filter_map(|e| e.file).collect();
    if entries.len() >= 2 && rare(u, 16) {
        bad.push("entries not sorted");
        entries.reverse();
    }
    if !entries.is_empty() && rare(u, 32) {
        bad.push("duplicate entry");
        let i = u.choose_index(entries.len())?;
        let copy = entries[i].clone();
        entries.insert(i, copy);
    }
    let mut bytes = Vec::new();
    if rare(u, 32) {
        bad.push("tree format version");
        bytes.push(u.int_in_range(2..=255)?);
    } else {
        bytes.push(1);
    }
    let mut count = entries.len() as u64;
    if rare(u, 32) {
        bad.push("entry count too high");
        count += 1;
    }
    put_varint(&mut bytes, count);
    for e in &entries {
        put_varint(&mut bytes, e.name.len() as u64);
        bytes.extend_from_slice(&e.name);
        bytes.extend_from_slice(&e.rest);
    }
    if rare(u, 32) {
        bad.push("trailing byte in tree");
        bytes.push(u.arbitrary()?);
    }
    Ok(GenTree {
        hash: Hash::of_tree_encoding(&bytes),
        bytes,
        bad,
        raw: false,
        children,
        files,
    })
}

/// Builds a manifest from the input's choices and checks the reader's verdict.
fn generated(u: &mut Unstructured) -> AResult<()> {
    let mut g = Gen::default();
    let blob_count = u.int_in_range(0..=4)?;
    let mut blobs: Vec<(Hash, Vec<u8>)> = Vec::new();
    for _ in 0..blob_count {
        let len = u.int_in_range(0..=40)?;
        let content = take(u, len)?;
        blobs.push((Hash::of_blob(&content), content));
    }
    let tree_count = u.int_in_range(1..=5)?;
    let mut trees: Vec<GenTree> = Vec::new();
    for _ in 0..tree_count {
        let tree = gen_tree(u, &blobs, &trees)?;
        // The tree decoder alone must agree with the generator.
        let decodes = check_tree(&tree.bytes);
        if !tree.raw {
            assert!(
                decodes == tree.bad.is_empty(),
                "tree decoder says {decodes} for a tree with defects {:?}",
                tree.bad
            );
        }
        trees.push(tree);
    }
    let by_hash: HashMap<Hash, &GenTree> = trees.iter().rev().map(|t| (t.hash, t)).collect();

    let root = if rare(u, 32) {
        let random = Hash(u.arbitrary()?);
        if !by_hash.contains_key(&random) {
            g.defect("root is not in the manifest");
        }
        random
    } else if rare(u, 8) {
        trees[u.choose_index(trees.len())?].hash
    } else {
        trees.last().expect("at least one tree").hash
    };

    // The trees the root reaches, and the blobs they reference.
    let mut reachable: HashSet<Hash> = HashSet::new();
    let mut referenced: HashMap<Hash, u64> = HashMap::new();
    let mut stack = vec![root];
    while let Some(hash) = stack.pop() {
        if !reachable.insert(hash) {
            continue;
        }
        let Some(tree) = by_hash.get(&hash) else {
            g.defect("a reachable tree is missing");
            continue;
        };
        if tree.raw {
            g.unknown = true;
        }
        if !tree.bad.is_empty() {
            g.defect(format!("listed tree has defects {:?}", tree.bad));
        }
        stack.extend(tree.children.iter().copied());
        for (hash, size) in &tree.files {
            if let Some(prev) = referenced.insert(*hash, *size) {
                if prev != *size {
                    g.defect("one blob with two sizes");
                }
            }
        }
    }
    let mut listed: Vec<&GenTree> = reachable
        .iter()
        .filter_map(|h| by_hash.get(h).copied())
        .collect();
    listed.sort_by_key(|t| t.hash);
    if !listed.is_empty() && rare(u, 32) {
        g.defect("a reachable tree left out");
        listed.remove(u.choose_index(listed.len())?);
    }
    if rare(u, 16) {
        let extra: Vec<&GenTree> = trees
            .iter()
            .filter(|t| !reachable.contains(&t.hash))
            .collect();
        if !extra.is_empty() {
            g.defect("an unreachable tree listed");
            let t = extra[u.choose_index(extra.len())?];
            let at = listed.partition_point(|l| l.hash < t.hash);
            listed.insert(at, t);
        }
    }
    if !listed.is_empty() && rare(u, 32) {
        g.defect("a tree listed twice");
        let i = u.choose_index(listed.len())?;
        let copy = listed[i];
        listed.insert(i, copy);
    }
    if listed.len() >= 2 && rare(u, 32) {
        g.defect("trees out of order");
        let i = u.choose_index(listed.len() - 1)?;
        listed.swap(i, i + 1);
    }

    let with_blobs = u.arbitrary::<bool>()?;
    let mut flags = if with_blobs { FLAG_BLOBS } else { 0 };
    if rare(u, 32) {
        g.defect("unknown flag");
        flags |= 1 << u.int_in_range(1..=31)?;
    }
    // Blob section: a subset of the referenced blobs whose content we know, ascending.
    let contents: BTreeMap<Hash, &Vec<u8>> = blobs.iter().map(|(h, c)| (*h, c)).collect();
    let mut section: Vec<(Hash, u64, Vec<u8>)> = Vec::new();
    if with_blobs {
        for (hash, content) in &contents {
            if referenced.contains_key(hash) && !rare(u, 4) {
                section.push((*hash, content.len() as u64, content.to_vec()));
            }
        }
    } else if rare(u, 32) {
        if let Some((hash, content)) = contents.iter().find(|(h, _)| referenced.contains_key(*h)) {
            g.defect("blobs without the blob flag");
            section.push((*hash, content.len() as u64, content.to_vec()));
        }
    }
    if rare(u, 32) {
        let len = u.int_in_range(0..=16)?;
        let content = take(u, len)?;
        let hash = Hash::of_blob(&content);
        if !referenced.contains_key(&hash) {
            g.defect("an unreferenced blob");
            let at = section.partition_point(|b| b.0 < hash);
            section.insert(at, (hash, content.len() as u64, content));
        }
    }
    if !section.is_empty() && rare(u, 32) {
        let i = u.choose_index(section.len())?;
        if !section[i].2.is_empty() {
            g.defect("a blob's content changed");
            let at = u.choose_index(section[i].2.len())?;
            section[i].2[at] ^= u.int_in_range(1..=255)?;
        }
    }
    if !section.is_empty() && rare(u, 32) {
        g.defect("a blob's size is wrong");
        let i = u.choose_index(section.len())?;
        let size = section[i].1;
        section[i].1 = if size > 0 && u.arbitrary()? {
            size - 1
        } else {
            size + 1
        };
        let new = section[i].1 as usize;
        section[i].2.resize(new, b'x');
    }
    if section.len() >= 2 && rare(u, 32) {
        g.defect("blobs out of order");
        let i = u.choose_index(section.len() - 1)?;
        section.swap(i, i + 1);
    }

    // Serialise, with the checksum right unless a defect says otherwise.
    let mut out = Vec::new();
    if rare(u, 64) {
        g.defect("bad magic");
        let mut magic = MAGIC;
        magic[u.choose_index(8)?] ^= u.int_in_range(1..=255)?;
        out.extend_from_slice(&magic);
    } else {
        out.extend_from_slice(&MAGIC);
    }
    let mut version = MANIFEST_VERSION;
    if rare(u, 64) {
        g.defect("unknown version");
        version = u.int_in_range(2..=u32::MAX)?;
    }
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&root.0);
    let mut count = listed.len() as u64;
    if rare(u, 32) {
        g.defect("wrong tree count");
        count = if count > 0 && u.arbitrary()? {
            count - 1
        } else {
            count + 1
        };
    }
    out.extend_from_slice(&count.to_le_bytes());
    for tree in &listed {
        let mut hash = tree.hash;
        if rare(u, 64) {
            g.defect("a tree listed under a wrong hash");
            hash.0[u.choose_index(32)?] ^= u.int_in_range(1..=255)?;
        }
        out.extend_from_slice(&hash.0);
        let mut len = tree.bytes.len() as u32;
        if rare(u, 64) {
            g.defect("a wrong tree length");
            len = match u.int_in_range(0..=2)? {
                0 => len + 1,
                1 => len.saturating_sub(1),
                _ => u32::MAX,
            };
        }
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&tree.bytes);
    }
    let mut nblobs = section.len() as u64;
    if rare(u, 32) {
        g.defect("wrong blob count");
        nblobs = if nblobs > 0 && u.arbitrary()? {
            nblobs - 1
        } else {
            nblobs + 1
        };
    }
    out.extend_from_slice(&nblobs.to_le_bytes());
    for (hash, size, content) in &section {
        out.extend_from_slice(&hash.0);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(content);
    }
    let mut sum = Hash::of_blob(&out).0;
    if rare(u, 32) {
        g.defect("bad checksum");
        sum[u.choose_index(32)?] ^= u.int_in_range(1..=255)?;
    }
    out.extend_from_slice(&sum);
    let whole = out.len();
    if rare(u, 32) {
        g.defect("trailing bytes");
        let n = u.int_in_range(1..=4)?;
        out.extend(std::iter::repeat_n(0u8, n));
    }
    if rare(u, 32) {
        g.defect("truncated");
        // Into the manifest itself: cutting off exactly the trailing bytes would leave a
        // valid file.
        let cut = u.choose_index(whole)?;
        out.truncate(cut);
    }

    let verdict = read_manifest(&out);
    if !g.unknown {
        match (&verdict, g.defects.is_empty()) {
            (Err(e), true) => panic!("a valid generated manifest was rejected: {e}"),
            (Ok(()), false) => panic!("a manifest with defects {:?} was accepted", g.defects),
            _ => {}
        }
    }
    Ok(())
}

/// Patches bytes of a real manifest, recomputes its checksum, and reads it.
fn patched(u: &mut Unstructured) -> AResult<()> {
    let mut bytes = SEEDS[u.choose_index(SEEDS.len())?].to_vec();
    bytes.truncate(bytes.len() - 32);
    for _ in 0..u.int_in_range(1..=4)? {
        let at = u.choose_index(bytes.len())?;
        bytes[at] ^= u.arbitrary::<u8>()?;
    }
    if rare(u, 8) {
        let at = u.int_in_range(0..=bytes.len())?;
        bytes.insert(at, u.arbitrary()?);
    }
    if rare(u, 8) {
        let at = u.choose_index(bytes.len())?;
        bytes.remove(at);
    }
    let sum = Hash::of_blob(&bytes).0;
    bytes.extend_from_slice(&sum);
    let _ = read_manifest(&bytes);
    Ok(())
}
