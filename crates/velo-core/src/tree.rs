//! Trees: one directory each, entries sorted bytewise by name, and their canonical encoding.
//!
//! Encoding, version 1 (see docs/FORMAT.md):
//! `u8 version=1 · varint n · n × entry`, an entry being
//! `varint name_len · name · u8 kind · varint mode · i64le mtime_ns · payload`, where the
//! payload is `hash[32] · varint size` for a file, `hash[32]` for a directory and
//! `varint len · target` for a symlink. Entries are strictly ascending by name bytes.
//! Version 2 is the same with each entry followed by its extended attributes
//! (`varint count · count × (varint len · name · varint len · value)`); a tree is encoded
//! as version 2 exactly when some entry has one, so every tree without them keeps the
//! version-1 encoding and hash it always had.

use crate::codec::{put_varint, Reader};
use crate::{DecodeError, Hash, Name};

/// The version byte of a tree without extended attributes.
pub const TREE_FORMAT_VERSION: u8 = 1;
/// The version byte of a tree some entry of which has extended attributes.
pub const TREE_FORMAT_VERSION_XATTRS: u8 = 2;

/// The longest symlink target accepted (PATH_MAX - 1).
pub const MAX_SYMLINK_TARGET: usize = 4095;

/// Upper bound on entries in one directory, far above what file systems hold in practice,
/// so that a hostile count cannot make a reader allocate without bound.
const MAX_ENTRIES: u64 = 1 << 24;

/// Permission bits of an entry (including setuid, setgid and sticky): at most `0o7777`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Mode(u32);

impl Mode {
    /// Keeps the permission bits of a `st_mode`, dropping the file-type bits.
    pub fn from_st_mode(st_mode: u32) -> Mode {
        Mode(st_mode & 0o7777)
    }

    /// Validates a mode that must not have bits outside `0o7777`.
    pub fn new(bits: u32) -> Option<Mode> {
        (bits <= 0o7777).then_some(Mode(bits))
    }

    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether any execute bit is set (the store keeps a 0555 variant for such files).
    pub fn is_executable(self) -> bool {
        self.0 & 0o111 != 0
    }
}

/// What an entry is, with what each kind needs.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum EntryKind {
    /// A regular file: its content's blob hash and its size in bytes.
    File {
        /// BLAKE3 of the content.
        hash: Hash,
        /// Size in bytes.
        size: u64,
    },
    /// A directory: the hash of its tree.
    Dir {
        /// The child tree.
        hash: Hash,
    },
    /// A symbolic link and its target (never empty, no NUL, at most 4095 bytes).
    Symlink {
        /// The link target, kept byte for byte.
        target: Box<[u8]>,
    },
}

impl EntryKind {
    fn tag(&self) -> u8 {
        match self {
            EntryKind::File { .. } => 0,
            EntryKind::Dir { .. } => 1,
            EntryKind::Symlink { .. } => 2,
        }
    }

    /// `file`, `dir` or `symlink`.
    pub fn label(&self) -> &'static str {
        match self {
            EntryKind::File { .. } => "file",
            EntryKind::Dir { .. } => "dir",
            EntryKind::Symlink { .. } => "symlink",
        }
    }
}

/// One directory entry.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    /// The validated name.
    pub name: Name,
    /// Permission bits.
    pub mode: Mode,
    /// Modification time, nanoseconds since the Unix epoch (negative before 1970).
    pub mtime_ns: i64,
    /// Kind and payload.
    pub kind: EntryKind,
    /// Extended attributes (empty for almost every entry).
    pub xattrs: crate::Xattrs,
}

/// Why a set of entries cannot form a tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// Two entries with one name.
    #[error("two entries are named {0:?}")]
    DuplicateName(String),
    /// A symlink target that is empty, holds a NUL or is too long.
    #[error("symlink {0:?}: the target must be 1 to 4095 bytes without NUL")]
    BadSymlink(String),
}

/// One directory: entries strictly ascending by name bytes. Only valid trees can exist.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Tree {
    entries: Vec<Entry>,
}

fn symlink_target_problem(target: &[u8]) -> Option<&'static str> {
    if target.is_empty() {
        Some("it is empty")
    } else if target.len() > MAX_SYMLINK_TARGET {
        Some("it is longer than 4095 bytes")
    } else if target.contains(&0) {
        Some("it contains a NUL byte")
    } else {
        None
    }
}

impl Tree {
    /// Builds a tree from entries in any order; duplicate names are an error.
    pub fn new(mut entries: Vec<Entry>) -> Result<Tree, TreeError> {
        entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for pair in entries.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(TreeError::DuplicateName(pair[0].name.to_string()));
            }
        }
        for entry in &entries {
            if let EntryKind::Symlink { target } = &entry.kind {
                if symlink_target_problem(target).is_some() {
                    return Err(TreeError::BadSymlink(entry.name.to_string()));
                }
            }
        }
        Ok(Tree { entries })
    }

    /// The entries, ascending by name.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Consumes the tree, yielding its entries in order.
    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    /// The entry called `name`, by binary search.
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_bytes().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 64);
        let with_xattrs = self.entries.iter().any(|e| !e.xattrs.is_empty());
        out.push(if with_xattrs {
            TREE_FORMAT_VERSION_XATTRS
        } else {
            TREE_FORMAT_VERSION
        });
        put_varint(&mut out, self.entries.len() as u64);
        for e in &self.entries {
            let name = e.name.as_bytes();
            put_varint(&mut out, name.len() as u64);
            out.extend_from_slice(name);
            out.push(e.kind.tag());
            put_varint(&mut out, u64::from(e.mode.bits()));
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            match &e.kind {
                EntryKind::File { hash, size } => {
                    out.extend_from_slice(&hash.0);
                    put_varint(&mut out, *size);
                }
                EntryKind::Dir { hash } => out.extend_from_slice(&hash.0),
                EntryKind::Symlink { target } => {
                    put_varint(&mut out, target.len() as u64);
                    out.extend_from_slice(target);
                }
            }
            if with_xattrs {
                e.xattrs.encode(&mut out);
            }
        }
        out
    }

    /// The tree's identity: the domain-separated hash of its canonical encoding.
    pub fn hash(&self) -> Hash {
        Hash::of_tree_encoding(&self.encode())
    }

    /// Encodes and hashes in one go (the encoding is what the store writes).
    pub fn encode_with_hash(&self) -> (Vec<u8>, Hash) {
        let bytes = self.encode();
        let hash = Hash::of_tree_encoding(&bytes);
        (bytes, hash)
    }

    /// Decodes a tree object, accepting only the canonical encoding of a valid tree.
    pub fn decode(bytes: &[u8]) -> Result<Tree, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("tree version")?;
        if version != TREE_FORMAT_VERSION && version != TREE_FORMAT_VERSION_XATTRS {
            return Err(DecodeError::UnsupportedVersion {
                what: "tree object",
                found: u64::from(version),
                supported: u64::from(TREE_FORMAT_VERSION_XATTRS),
            });
        }
        let with_xattrs = version == TREE_FORMAT_VERSION_XATTRS;
        // The smallest entry is a one-byte-named symlink to a one-byte target:
        // name length, name, kind, mode, mtime (8), target length, target = 14 bytes.
        let count = r.bounded("entry count", MAX_ENTRIES)?;
        if count > (r.remaining() / 14) as u64 {
            return Err(DecodeError::Truncated {
                what: "tree entries",
            });
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name_len = r.bounded("name length", crate::name::MAX_NAME_LEN as u64 + 1)?;
            let name = Name::new(r.take(name_len as usize, "entry name")?)?;
            let shown = || name.to_string();
            let tag = r.u8("entry kind")?;
            let mode_bits = r.varint("entry mode")?;
            let mode = u32::try_from(mode_bits)
                .ok()
                .and_then(Mode::new)
                .ok_or_else(|| DecodeError::BadMode {
                    name: shown(),
                    mode: mode_bits,
                })?;
            let mtime_ns = r.i64_le("entry mtime")?;
            let kind = match tag {
                0 => EntryKind::File {
                    hash: Hash(r.array32("file hash")?),
                    size: r.varint("file size")?,
                },
                1 => EntryKind::Dir {
                    hash: Hash(r.array32("directory hash")?),
                },
                2 => {
                    let len = r.bounded("symlink target length", MAX_SYMLINK_TARGET as u64 + 1)?;
                    let target = r.take(len as usize, "symlink target")?;
                    if let Some(why) = symlink_target_problem(target) {
                        return Err(DecodeError::BadSymlink { name: shown(), why });
                    }
                    EntryKind::Symlink {
                        target: target.into(),
                    }
                }
                other => return Err(DecodeError::UnknownKind(other, shown())),
            };
            let xattrs = if with_xattrs {
                crate::Xattrs::decode(&mut r, &shown())?
            } else {
                crate::Xattrs::default()
            };
            if let Some(prev) = entries.last() {
                if prev.name >= name {
                    return Err(DecodeError::Unsorted {
                        before: prev.name.to_string(),
                        after: name.to_string(),
                    });
                }
            }
            entries.push(Entry {
                name,
                mode,
                mtime_ns,
                kind,
                xattrs,
            });
        }
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        if with_xattrs && entries.iter().all(|e| e.xattrs.is_empty()) {
            return Err(DecodeError::NotCanonical);
        }
        Ok(Tree { entries })
    }
}

/// How many levels of directories `root` holds (1 for a tree without subdirectories),
/// computed once per distinct subtree, iteratively: a hostile tree 100,000 levels deep, or
/// one whose every level names the same child twice (2^64 paths), costs one visit per
/// distinct tree and no recursion. `None` if `get` lacks a tree.
pub fn depth<'a>(root: Hash, get: impl Fn(&Hash) -> Option<&'a Tree>) -> Option<usize> {
    let mut known: std::collections::HashMap<Hash, usize> = std::collections::HashMap::new();
    let mut stack = vec![(root, false)];
    while let Some((hash, children_done)) = stack.pop() {
        if known.contains_key(&hash) {
            continue;
        }
        let tree = get(&hash)?;
        let children = tree.entries().iter().filter_map(|e| match &e.kind {
            EntryKind::Dir { hash } => Some(*hash),
            _ => None,
        });
        if children_done {
            let deepest = children
                .map(|c| known.get(&c).copied().unwrap_or(0))
                .max()
                .unwrap_or(0);
            known.insert(hash, deepest + 1);
        } else {
            stack.push((hash, true));
            stack.extend(
                children
                    .filter(|c| !known.contains_key(c))
                    .map(|c| (c, false)),
            );
        }
    }
    known.get(&root).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(name: &str, content: &[u8], mode: u32) -> Entry {
        Entry {
            xattrs: Default::default(),
            name: Name::try_from(name).unwrap(),
            mode: Mode::new(mode).unwrap(),
            mtime_ns: 1_700_000_000_123_456_789,
            kind: EntryKind::File {
                hash: Hash::of_blob(content),
                size: content.len() as u64,
            },
        }
    }

    #[test]
    fn order_of_construction_does_not_change_the_hash() {
        let a = Tree::new(vec![file("b", b"1", 0o644), file("a", b"2", 0o755)]).unwrap();
        let b = Tree::new(vec![file("a", b"2", 0o755), file("b", b"1", 0o644)]).unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.entries()[0].name.as_bytes(), b"a");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let err = Tree::new(vec![file("a", b"1", 0o644), file("a", b"2", 0o644)]).unwrap_err();
        assert_eq!(err, TreeError::DuplicateName("a".into()));
    }

    /// One hostile encoding per way a tree object can be invalid.
    #[test]
    fn decoder_rejects_each_invalid_encoding() {
        let good = Tree::new(vec![file("a", b"1", 0o644), file("b", b"2", 0o644)])
            .unwrap()
            .encode();
        let with_name = |name: &[u8]| {
            let mut out = vec![1, 1];
            put_varint(&mut out, name.len() as u64);
            out.extend_from_slice(name);
            out.push(0);
            put_varint(&mut out, 0o644);
            out.extend_from_slice(&0i64.to_le_bytes());
            out.extend_from_slice(&[7; 32]);
            put_varint(&mut out, 1);
            out
        };
        let mut bad_mode = with_name(b"x");
        bad_mode[5] = 0xff; // mode varint becomes a large value
        bad_mode.insert(6, 0x7f);
        let mut swapped = good.clone();
        // Put entry "b" first by swapping the single name bytes.
        let a_pos = swapped.iter().position(|&b| b == b'a').unwrap();
        let b_pos = swapped.iter().position(|&b| b == b'b').unwrap();
        swapped.swap(a_pos, b_pos);
        let mut unknown_kind = with_name(b"x");
        unknown_kind[4] = 9;
        let mut empty_link = vec![1, 1, 1, b'l', 2];
        put_varint(&mut empty_link, 0o777);
        empty_link.extend_from_slice(&0i64.to_le_bytes());
        empty_link.push(0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty input", vec![]),
            ("version 2 without its attribute fields", {
                let mut v = good.clone();
                v[0] = 2;
                v
            }),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("trailing byte", [good.clone(), vec![0]].concat()),
            ("absurd count", vec![1, 0xff, 0xff, 0xff, 0x7f]),
            ("name ..", with_name(b"..")),
            ("name .", with_name(b".")),
            ("name with slash", with_name(b"a/b")),
            ("empty name", with_name(b"")),
            ("name with NUL", with_name(b"a\0")),
            ("mode beyond 0o7777", bad_mode),
            ("unsorted", swapped),
            ("unknown kind", unknown_kind),
            ("empty symlink target", empty_link),
        ];
        for (what, bytes) in cases {
            assert!(Tree::decode(&bytes).is_err(), "{what} was accepted");
        }
        assert!(Tree::decode(&good).is_ok());
    }

    fn with_xattrs(mut entry: Entry, pairs: &[(&[u8], &[u8])]) -> Entry {
        entry.xattrs = crate::Xattrs::new(
            pairs
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect(),
        )
        .unwrap();
        entry
    }

    /// Version 2 only where some entry has attributes: every tree without keeps the
    /// encoding (and hash) of version 1.
    #[test]
    fn extended_attributes_make_version_2_and_round_trip() {
        let plain = Tree::new(vec![file("a", b"1", 0o644)]).unwrap();
        assert_eq!(plain.encode()[0], 1);
        let tree = Tree::new(vec![
            with_xattrs(
                file("a", b"1", 0o644),
                &[(b"user.b", b"2"), (b"security.capability", b"\x01\x00")],
            ),
            file("b", b"2", 0o644),
        ])
        .unwrap();
        let bytes = tree.encode();
        assert_eq!(bytes[0], 2);
        let decoded = Tree::decode(&bytes).unwrap();
        assert_eq!(decoded, tree);
        assert_eq!(decoded.entries()[0].xattrs.get(b"user.b"), Some(&b"2"[..]));
        assert_ne!(tree.hash(), plain.hash());

        // A version-2 encoding of a tree without attributes is not canonical.
        let mut v2 = plain.encode();
        v2[0] = 2;
        v2.push(0);
        assert_eq!(Tree::decode(&v2), Err(DecodeError::NotCanonical));
        // An attribute a tree does not keep, and names out of order, are refused.
        let one = Tree::new(vec![with_xattrs(
            file("a", b"1", 0o644),
            &[(b"user.x", b"1")],
        )])
        .unwrap()
        .encode();
        let renamed = |from: &[u8], to: &[u8]| {
            let at = one.windows(from.len()).position(|w| w == from).unwrap();
            let mut out = one.clone();
            out[at..at + from.len()].copy_from_slice(to);
            out
        };
        assert!(matches!(
            Tree::decode(&renamed(b"user.x", b"trustd")),
            Err(DecodeError::BadXattr { .. })
        ));
        let two = Tree::new(vec![with_xattrs(
            file("a", b"1", 0o644),
            &[(b"user.a", b"1"), (b"user.b", b"2")],
        )])
        .unwrap()
        .encode();
        let a = two.windows(6).position(|w| w == b"user.a").unwrap();
        let b = two.windows(6).position(|w| w == b"user.b").unwrap();
        let mut swapped = two.clone();
        swapped[a + 5] = b'b';
        swapped[b + 5] = b'a';
        assert!(matches!(
            Tree::decode(&swapped),
            Err(DecodeError::BadXattr { .. })
        ));
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let name = proptest::collection::vec(any::<u8>(), 1..20)
            .prop_filter_map("valid name", |b| Name::new(&b).ok());
        let kind = prop_oneof![
            (any::<[u8; 32]>(), any::<u64>()).prop_map(|(h, size)| EntryKind::File {
                hash: Hash(h),
                size
            }),
            any::<[u8; 32]>().prop_map(|h| EntryKind::Dir { hash: Hash(h) }),
            proptest::collection::vec(1u8..=255, 1..64)
                .prop_map(|t| EntryKind::Symlink { target: t.into() }),
        ];
        let xattrs = proptest::option::weighted(
            0.2,
            proptest::collection::btree_map(
                proptest::collection::vec(b'a'..=b'z', 1..8),
                proptest::collection::vec(any::<u8>(), 0..16),
                1..4,
            ),
        )
        .prop_map(|pairs| {
            crate::Xattrs::new(
                pairs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(n, v)| ([&b"user."[..], &n].concat(), v))
                    .collect(),
            )
            .unwrap()
        });
        (name, 0u32..=0o7777, any::<i64>(), kind, xattrs).prop_map(
            |(name, mode, mtime_ns, kind, xattrs)| Entry {
                xattrs,
                name,
                mode: Mode::new(mode).unwrap(),
                mtime_ns,
                kind,
            },
        )
    }

    proptest! {
        #[test]
        fn encode_decode_encode_is_identical(entries in proptest::collection::vec(arb_entry(), 0..40)) {
            let mut seen = std::collections::HashSet::new();
            let entries: Vec<Entry> = entries.into_iter().filter(|e| seen.insert(e.name.clone())).collect();
            let tree = Tree::new(entries.clone()).unwrap();
            let bytes = tree.encode();
            let decoded = Tree::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, &tree);
            prop_assert_eq!(decoded.encode(), bytes);
            let mut reversed = entries;
            reversed.reverse();
            prop_assert_eq!(Tree::new(reversed).unwrap().hash(), tree.hash());
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(tree) = Tree::decode(&bytes) {
                prop_assert_eq!(tree.encode(), bytes);
            }
        }
    }

    fn dir(name: &str, hash: Hash) -> Entry {
        Entry {
            xattrs: Default::default(),
            name: Name::try_from(name).unwrap(),
            mode: Mode::new(0o755).unwrap(),
            mtime_ns: 0,
            kind: EntryKind::Dir { hash },
        }
    }

    /// Depth is computed without recursion, once per distinct subtree: a 5,000-level chain
    /// and a 64-level tree whose every level names one child twice (2^64 paths) are cheap.
    #[test]
    fn depth_of_deep_and_exponential_trees() {
        let mut trees = std::collections::HashMap::new();
        let mut below = Tree::new(vec![file("f", b"x", 0o644)]).unwrap();
        for _ in 0..5000 {
            let hash = below.hash();
            trees.insert(hash, below);
            below = Tree::new(vec![dir("d", hash)]).unwrap();
        }
        let root = below.hash();
        trees.insert(root, below);
        assert_eq!(depth(root, |h| trees.get(h)), Some(5001));

        let mut wide = std::collections::HashMap::new();
        let mut below = Tree::new(Vec::new()).unwrap();
        for _ in 0..64 {
            let hash = below.hash();
            wide.insert(hash, below);
            below = Tree::new(vec![dir("a", hash), dir("b", hash)]).unwrap();
        }
        let root = below.hash();
        wide.insert(root, below);
        assert_eq!(depth(root, |h| wide.get(h)), Some(65));
        assert_eq!(depth(Hash::of_blob(b"absent"), |h| wide.get(h)), None);
    }
}
