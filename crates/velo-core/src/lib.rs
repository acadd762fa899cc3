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

pub use error::DecodeError;
pub use hash::{Hash, HashParseError, TREE_HASH_CONTEXT};
pub use name::{Name, NameError};
pub use tree::{
    depth, Entry, EntryKind, Mode, Tree, TreeError, MAX_SYMLINK_TARGET, TREE_FORMAT_VERSION,
};

/// The deepest tree velo makes or accepts: directories nested more than this many levels
/// are refused with a clear error by ingest, import, commit, checkout and merge (real
/// trees stay far below; PATH_MAX alone allows about 2,000 one-letter levels). Every walk
/// that recurses stays within its stack below this depth.
pub const MAX_DEPTH: usize = 1024;
