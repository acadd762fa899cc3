//! Packs: many small objects in one remote object, found through an index.
//!
//! A kernel tree is 80,000 files; one PUT per file is slow and costs per request. A push
//! writes the objects the remote lacks into packs of about [`PACK_TARGET`] bytes:
//! `packs/<id>.pack` (the objects' bytes, one after another) and `packs/<id>.idx` (where
//! each is). The id is the BLAKE3 hash of the index, so an index read back (or cached) is
//! checked by its name, and two machines pushing the same pack write the same bytes.
//!
//! Index format, little-endian: `VELOPIDX`, version (u32, 1), entry count (u32), pack
//! length (u64), then per entry, sorted by hash with no hash twice: kind (u8: 0 blob,
//! 1 tree), hash (32 bytes), offset (u64), length (u64). [`PackIndex::decode`] checks
//! every field (an index comes from the remote, which may be hostile) and never panics.

use velo_core::Hash;

/// The size a push fills a pack to before it starts the next one.
pub const PACK_TARGET: u64 = 32 << 20;
/// Objects at least this large are stored alone (`objects/<hash>`), not packed.
pub const LOOSE_FROM: u64 = 8 << 20;
/// The most entries an index may hold.
pub const MAX_ENTRIES: u32 = 1 << 22;

const MAGIC: &[u8; 8] = b"VELOPIDX";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8;
const ENTRY: usize = 1 + 32 + 8 + 8;
/// The longest an index can be.
pub const MAX_INDEX_BYTES: u64 = (HEADER + ENTRY * MAX_ENTRIES as usize) as u64;

/// What an object is: its hash is computed differently for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// File content (plain BLAKE3).
    Blob,
    /// An encoded tree (BLAKE3 in derive-key mode).
    Tree,
}

impl Kind {
    /// The hash of `bytes` as an object of this kind.
    pub fn hash(self, bytes: &[u8]) -> Hash {
        match self {
            Kind::Blob => Hash::of_blob(bytes),
            Kind::Tree => Hash::of_tree_encoding(bytes),
        }
    }

    /// For messages.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Tree => "tree",
        }
    }
}

/// One object of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// Blob or tree.
    pub kind: Kind,
    /// Its hash.
    pub hash: Hash,
    /// Where its bytes start in the pack.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
}

/// A pack's index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackIndex {
    /// Sorted by hash, each hash once.
    pub entries: Vec<PackEntry>,
    /// The pack's length in bytes.
    pub pack_len: u64,
}

/// Why bytes are not a pack index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a velo pack index: {0}")]
pub struct IndexError(String);

impl PackIndex {
    /// The index's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.entries.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.pack_len.to_le_bytes());
        for e in &self.entries {
            out.push(match e.kind {
                Kind::Blob => 0,
                Kind::Tree => 1,
            });
            out.extend_from_slice(&e.hash.0);
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
        out
    }

    /// The pack id of these index bytes: the hex BLAKE3 hash.
    pub fn id_of(bytes: &[u8]) -> String {
        Hash::of_blob(bytes).to_hex()
    }

    /// Reads an index, checking every field.
    pub fn decode(bytes: &[u8]) -> Result<PackIndex, IndexError> {
        let bad = |why: &str| IndexError(why.to_string());
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("no VELOPIDX header"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        if u32_at(8) != VERSION {
            return Err(bad("another index version (a newer velo wrote it)"));
        }
        let count = u32_at(12);
        if count > MAX_ENTRIES {
            return Err(bad("too many entries"));
        }
        let pack_len = u64_at(16);
        if bytes.len() != HEADER + ENTRY * count as usize {
            return Err(bad("its length does not match its entry count"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = HEADER + i * ENTRY;
            let kind = match bytes[at] {
                0 => Kind::Blob,
                1 => Kind::Tree,
                _ => return Err(bad("an entry of unknown kind")),
            };
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&bytes[at + 1..at + 33]);
            let (offset, len) = (u64_at(at + 33), u64_at(at + 41));
            if offset.checked_add(len).is_none_or(|end| end > pack_len) {
                return Err(bad("an entry reaches past the end of the pack"));
            }
            let entry = PackEntry {
                kind,
                hash: Hash(hash),
                offset,
                len,
            };
            if entries
                .last()
                .is_some_and(|prev: &PackEntry| prev.hash >= entry.hash)
            {
                return Err(bad("entries out of order, or a hash twice"));
            }
            entries.push(entry);
        }
        Ok(PackIndex { entries, pack_len })
    }
}

/// A pack being filled: its bytes and entries.
#[derive(Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// Appends an object.
    pub fn add(&mut self, kind: Kind, hash: Hash, bytes: &[u8]) {
        self.entries.push(PackEntry {
            kind,
            hash,
            offset: self.bytes.len() as u64,
            len: bytes.len() as u64,
        });
        self.bytes.extend_from_slice(bytes);
    }

    /// Bytes so far.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack's bytes, its index's bytes, and its id. An object added twice is indexed
    /// once.
    pub fn finish(mut self) -> (Vec<u8>, Vec<u8>, String) {
        self.entries.sort_by_key(|a| a.hash);
        self.entries.dedup_by(|a, b| a.hash == b.hash);
        let index = PackIndex {
            entries: self.entries,
            pack_len: self.bytes.len() as u64,
        }
        .encode();
        let id = PackIndex::id_of(&index);
        (self.bytes, index, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_built_pack_reads_back() {
        let mut builder = PackBuilder::default();
        let objects: Vec<(Kind, &[u8])> = vec![
            (Kind::Blob, b"one"),
            (Kind::Tree, b"tree bytes"),
            (Kind::Blob, b""),
        ];
        for (kind, bytes) in &objects {
            builder.add(*kind, kind.hash(bytes), bytes);
        }
        let (pack, index, id) = builder.finish();
        assert_eq!(id, PackIndex::id_of(&index));
        let index = PackIndex::decode(&index).unwrap();
        assert_eq!(index.entries.len(), 3);
        for (kind, bytes) in objects {
            let e = index
                .entries
                .iter()
                .find(|e| e.hash == kind.hash(bytes))
                .unwrap();
            assert_eq!(e.kind, kind);
            assert_eq!(&pack[e.offset as usize..(e.offset + e.len) as usize], bytes);
        }
    }

    #[test]
    fn hostile_indexes_are_refused() {
        let mut builder = PackBuilder::default();
        builder.add(Kind::Blob, Hash([1; 32]), b"abc");
        builder.add(Kind::Blob, Hash([2; 32]), b"de");
        let (_, good, _) = builder.finish();
        let mut past_end = good.clone();
        past_end[HEADER + 33] = 200;
        let mut huge_len = good.clone();
        huge_len[HEADER + 41..HEADER + 49].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut unordered = good.clone();
        unordered[HEADER + ENTRY + 1..HEADER + ENTRY + 33].copy_from_slice(&[1; 32]);
        let mut many = good.clone();
        many[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        for (bytes, why) in [
            (&good[..good.len() - 1], "length"),
            (&past_end[..], "past the end"),
            (&huge_len[..], "past the end"),
            (&unordered[..], "out of order"),
            (&many[..], "too many"),
            (&b"VELOPIDX"[..], "header"),
        ] {
            let e = PackIndex::decode(bytes).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(index) = PackIndex::decode(&bytes) {
                prop_assert_eq!(index.encode(), bytes);
            }
        }
    }
}
