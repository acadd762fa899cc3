//! BLAKE3-256 identities of blobs and trees.

use std::fmt;
use std::str::FromStr;

/// The key-derivation context that separates tree hashes from blob hashes: a blob is hashed
/// with plain BLAKE3 (so `b3sum` agrees with the store), a tree with BLAKE3 in derive-key
/// mode under this context, so no byte string can be both a blob and a tree of the same hash.
pub const TREE_HASH_CONTEXT: &str = "velo-rift 2026-11 tree object v1";

/// A 32-byte BLAKE3 digest naming a blob or a tree.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash of a blob's bytes (plain BLAKE3, identical to `b3sum`).
    pub fn of_blob(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    /// The hash of an encoded tree object (domain-separated from blobs).
    pub fn of_tree_encoding(bytes: &[u8]) -> Hash {
        let mut hasher = blake3::Hasher::new_derive_key(TREE_HASH_CONTEXT);
        hasher.update(bytes);
        Hash(*hasher.finalize().as_bytes())
    }

    /// Lower-case hexadecimal, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(HEX[(byte >> 4) as usize] as char);
            out.push(HEX[(byte & 15) as usize] as char);
        }
        out
    }

    /// The first byte as two hex digits: the shard directory of the object in the store.
    pub fn shard(&self) -> String {
        self.to_hex()[..2].to_string()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

/// A string that is not 64 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a hash: a hash is 64 hexadecimal digits")]
pub struct HashParseError {
    /// The rejected text (cut to 80 characters).
    pub value: String,
}

impl FromStr for Hash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HashParseError {
            value: s.chars().take(80).collect(),
        };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(err)?;
            let lo = hex_value(pair[1]).ok_or_else(err)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Hash(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_hash_matches_b3sum_of_empty_input() {
        assert_eq!(
            Hash::of_blob(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn tree_and_blob_hashes_of_same_bytes_differ() {
        assert_ne!(Hash::of_blob(b"x"), Hash::of_tree_encoding(b"x"));
    }

    #[test]
    fn hex_round_trip_and_rejections() {
        let h = Hash::of_blob(b"hello");
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
            assert!(bad.parse::<Hash>().is_err(), "{bad:?} accepted");
        }
    }
}
