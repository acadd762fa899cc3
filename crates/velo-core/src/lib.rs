//! The object model of Velo Rift: what a tree *is*, independent of where it is stored.
//!
//! This crate owns the [`Hash`] of blobs and trees, the validated [`Name`] of a directory
//! entry, the [`Tree`] (one directory: entries sorted bytewise by name), its canonical
//! encoding, and the `.velo` manifest codec ([`manifest`]). It performs no file-system I/O
//! and depends on nothing of the project; every other crate depends on it.
//!
//! Key decision: **validate at the boundary, then trust the type.** A [`Name`] cannot hold
//! an empty name, `.`, `..`, a slash or a NUL; a [`Tree`] cannot hold duplicate or unsorted
//! entries; the decoder only ever yields such values or a precise [`DecodeError`]. The
//! encoding is canonical (exactly one byte string per tree; the decoder rejects any other),
//! so `encode(decode(b)) == b` and a tree's hash is the same on every machine.
#![deny(missing_docs)]

mod codec;
mod error;
mod hash;
pub mod manifest;
mod name;
mod tree;
mod xattr;

pub use error::DecodeError;
pub use hash::{Hash, HashParseError, TREE_HASH_CONTEXT};
pub use name::{Name, NameError};
pub use tree::{
    depth, Entry, EntryKind, Mode, Tree, TreeError, MAX_SYMLINK_TARGET, TREE_FORMAT_VERSION,
};
pub use xattr::{is_kept_xattr, XattrError, Xattrs, MAX_XATTRS, MAX_XATTR_NAME, MAX_XATTR_VALUE};

/// The deepest tree velo makes or accepts: directories nested more than this many levels
/// are refused with a clear error by ingest, import, commit, checkout and merge (real
/// trees stay far below; PATH_MAX alone allows about 2,000 one-letter levels). Every walk
/// that recurses stays within its stack below this depth.
pub const MAX_DEPTH: usize = 1024;

/// Seconds and nanoseconds (as `stat` gives them) as nanoseconds since the epoch, the
/// unit trees record: exact from 1677-09-21 to 2262-04-11, the nearest end of that range
/// outside it. Computed in 128 bits, so a time just inside the range is never pushed to
/// its end by an intermediate overflow.
pub fn time_ns(secs: i64, nsec: i64) -> i64 {
    let ns = i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    ns.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Whether [`time_ns`] of these is exact (the time is inside the recordable range).
pub fn time_ns_is_exact(secs: i64, nsec: i64) -> bool {
    let ns = i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    i64::try_from(ns).is_ok()
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn times_near_the_ends_of_the_range_are_exact_and_keep_their_order() {
        // -9223372036.5 s: the seconds alone times 10^9 overflow, the sum does not.
        assert_eq!(
            time_ns(-9_223_372_037, 500_000_000),
            -9_223_372_036_500_000_000
        );
        assert!(time_ns_is_exact(-9_223_372_037, 500_000_000));
        // i64::MIN ns is 1677-09-21T00:12:43.145224192.
        assert_eq!(time_ns(-9_223_372_037, 145_224_192), i64::MIN);
        assert!(time_ns_is_exact(-9_223_372_037, 145_224_192));
        // Earlier: clamped to the start, never after a later time.
        assert!(!time_ns_is_exact(-9_223_372_037, 145_224_191));
        assert_eq!(time_ns(-10_000_000_000, 0), i64::MIN);
        assert_eq!(time_ns(9_223_372_036, 854_775_807), i64::MAX);
        assert_eq!(time_ns(10_000_000_000, 0), i64::MAX);
        assert_eq!(time_ns(-2, 999_999_999), -1_000_000_001);
    }
}
