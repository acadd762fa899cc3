//! Projections: making a tree appear as real files for real programs.
//!
//! This crate owns the link farm (`checkout`): a tree materialised as directories, hard
//! links into the store (or reflinks, or copies) and symlinks; the rootless namespace
//! sandbox of `velo run --isolate` ([`sandbox`], its sessions in [`session`]); and the
//! one commit(base, upper) → tree routine ([`commit`]) that the shim and the FUSE server
//! will call too. It calls `velo-core`, `velo-store` and `velo-ingest`; the CLI calls it.
//!
//! It also builds the view index the `LD_PRELOAD` shim reads ([`view`]).
//!
//! Key decision: **a hard-linked farm shares the store's inodes.** It costs one `link(2)`
//! per file and no data, and a file shows its inode's mode and mtime: the blob's own file
//! where that is the entry's form, else a variant (a separate read-only inode; see
//! velo-store's `BlobForm`). A farm never changes a blob's metadata, and a writer must get
//! a copy (reflink or copy mode, or an overlay upper).
#![deny(missing_docs)]

pub mod commit;
mod farm;
pub mod sandbox;
pub mod session;
pub mod view;

pub use farm::{
    checkout, checkout_with, CheckoutMode, CheckoutOptions, CheckoutReport, ProjectError,
};
