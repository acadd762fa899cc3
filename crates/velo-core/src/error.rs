//! Decoding errors of tree objects and `.velo` manifests.

use crate::{Hash, NameError};

/// Why bytes from outside are not a valid tree object or manifest. Every message says what
/// is wrong and where; none of these can be produced by a valid input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the structure did.
    #[error("truncated: the data ends while reading {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// Bytes after the end of the structure.
    #[error("{0} unexpected bytes after the end of the object")]
    TrailingBytes(usize),
    /// The file does not start with the `.velo` magic bytes.
    #[error("not a .velo manifest (the file does not start with the .velo magic bytes)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("{what} format version {found} is not supported (this velo reads version {supported}); upgrade velo or re-export with this version")]
    UnsupportedVersion {
        /// Which structure.
        what: &'static str,
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u64,
    },
    /// Flag bits this build does not know.
    #[error("unknown manifest flags {0:#x}")]
    UnknownFlags(u32),
    /// A variable-length integer that is overlong or overflows.
    #[error("malformed integer while reading {what}")]
    BadVarint {
        /// What was being read.
        what: &'static str,
    },
    /// A length or count beyond what this format allows.
    #[error("{what} of {value} exceeds the limit of {limit}")]
    TooLarge {
        /// What was being read.
        what: &'static str,
        /// The value found.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// An invalid entry name.
    #[error("invalid entry name: {0}")]
    Name(#[from] NameError),
    /// An entry kind byte that is not file, directory or symlink.
    #[error("unknown entry kind {0} for entry {1:?}")]
    UnknownKind(u8, String),
    /// Permission bits outside 0o7777.
    #[error("mode {mode:#o} of entry {name:?} has bits outside the permission bits (0o7777)")]
    BadMode {
        /// The entry name.
        name: String,
        /// The mode found.
        mode: u64,
    },
    /// A symlink target that is empty, too long or holds a NUL.
    #[error("symlink {name:?} has an invalid target: {why}")]
    BadSymlink {
        /// The entry name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An extended attribute a tree may not hold.
    #[error("entry {name:?}: extended attribute {xattr:?}: {why}")]
    BadXattr {
        /// The entry name.
        name: String,
        /// The attribute name.
        xattr: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A version-2 tree without any extended attribute (it has a version-1 encoding).
    #[error("a version-2 tree without extended attributes is not canonical")]
    NotCanonical,
    /// Entries not strictly sorted (duplicate or out of order).
    #[error("entries are not strictly sorted by name: {before:?} comes before {after:?}")]
    Unsorted {
        /// The earlier name.
        before: String,
        /// The later name.
        after: String,
    },
    /// An object whose bytes do not hash to the name it is stored under.
    #[error("{what} {claimed} does not match its content (content hashes to {actual})")]
    HashMismatch {
        /// Tree or blob.
        what: &'static str,
        /// The hash the container claims.
        claimed: Hash,
        /// The hash of the bytes.
        actual: Hash,
    },
    /// The manifest's own checksum does not match its bytes.
    #[error("manifest checksum mismatch: the file is corrupt")]
    ChecksumMismatch,
    /// A listed object appears twice or out of order.
    #[error("{what} {hash} is listed out of order or twice")]
    ObjectOrder {
        /// Tree or blob.
        what: &'static str,
        /// The offending hash.
        hash: Hash,
    },
    /// A tree that the root reaches is missing from the manifest.
    #[error("tree {0} is referenced but missing from the manifest")]
    MissingTree(Hash),
    /// A tree the root does not reach.
    #[error("tree {0} is in the manifest but the root does not reach it")]
    UnreachableTree(Hash),
    /// A blob that no entry references, or whose size disagrees with the entries.
    #[error("blob {hash}: {why}")]
    BadBlob {
        /// The blob.
        hash: Hash,
        /// What is wrong.
        why: String,
    },
    /// The manifest's blob section does not hold every blob the tree references.
    #[error("the manifest carries blobs but lacks {0} the tree references")]
    IncompleteBlobs(usize),
    /// An I/O error of the underlying reader (not a format problem).
    #[error("read error: {0}")]
    Io(String),
}
