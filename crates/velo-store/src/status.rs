//! `velo status`: what the store holds and how well it deduplicates.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

use serde::Serialize;

use crate::objects::ObjectKind;
use crate::{Result, Store, STORE_FORMAT_VERSION};

/// A summary of the store.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The store's directory.
    pub store: String,
    /// Its format version.
    pub format_version: u32,
    /// Distinct blobs (contents).
    pub blobs: u64,
    /// Bytes of distinct blob contents: what the store holds once.
    pub blob_bytes: u64,
    /// Tree objects.
    pub trees: u64,
    /// Registered roots.
    pub roots: u64,
    /// Sum of the sizes of every file of every registered root.
    pub logical_bytes: u64,
    /// `logical_bytes / blob_bytes` (0 when the store holds no bytes).
    pub dedup_ratio: f64,
    /// Blocks the blob files take on disk, in bytes (variants included).
    pub disk_bytes: u64,
    /// Variant files: blobs in another form (mode, mtime) for the trees that show them
    /// that way (docs/FORMAT.md).
    pub variants: u64,
    /// Bytes of the variant files: what variants cost where each is a copy (ext4). Where
    /// the store's file system reflinks (btrfs, xfs) they share the blob's blocks, and
    /// cost an inode each.
    pub variant_bytes: u64,
}

impl Store {
    /// Counts objects and bytes. Reads every blob's metadata, not its content.
    pub fn status(&self) -> Result<StatusReport> {
        let (blobs, _) = self.list_objects(ObjectKind::Blob)?;
        let (trees, _) = self.list_objects(ObjectKind::Tree)?;
        let mut seen = HashSet::with_capacity(blobs.len());
        let (mut blob_bytes, mut disk_bytes) = (0u64, 0u64);
        let (mut variants, mut variant_bytes) = (0u64, 0u64);
        for (hash, variant) in &blobs {
            let path = self.blob_variant_path(hash, variant.as_deref());
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                disk_bytes += meta.blocks() * 512;
                if variant.is_some() {
                    variants += 1;
                    variant_bytes += meta.len();
                } else if seen.insert(*hash) {
                    blob_bytes += meta.len();
                }
            }
        }
        // Damaged records are `velo roots`'s to report; status counts the readable ones.
        let (roots, _) = self.roots_and_damage()?;
        // Saturating: a hostile tree's statistics are u64::MAX already.
        let logical_bytes = roots
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.stats.bytes));
        Ok(StatusReport {
            store: self.root.display().to_string(),
            format_version: STORE_FORMAT_VERSION,
            blobs: seen.len() as u64,
            blob_bytes,
            trees: trees.len() as u64,
            roots: roots.len() as u64,
            logical_bytes,
            dedup_ratio: if blob_bytes == 0 {
                0.0
            } else {
                logical_bytes as f64 / blob_bytes as f64
            },
            disk_bytes,
            variants,
            variant_bytes,
        })
    }
}
