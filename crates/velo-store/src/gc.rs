//! Garbage collection: delete what no registered root reaches.
//!
//! Protocol: the sweep runs under the exclusive store lock, which waits for every writer
//! (ingest, import, commit) to finish, since each holds the shared lock from before it
//! first checks "is this blob already stored?" until its root is registered. So no object
//! a writer has seen, or is about to reference, can disappear under it. The gc generation
//! is bumped *before* anything is deleted, so caches that remember "this blob is stored"
//! re-check even if gc is killed half-way.

use std::collections::HashSet;
use std::fs;

use serde::Serialize;
use velo_core::{EntryKind, Hash};

use crate::objects::ObjectKind;
use crate::{Result, Store, StoreError};

/// What gc found (and, with `ran`, deleted).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Whether objects were actually deleted (`gc --run`).
    pub ran: bool,
    /// Registered roots that were kept.
    pub roots: usize,
    /// Processes (mounts, workspaces) whose served trees were kept too.
    pub serving: usize,
    /// Pins of processes that had ended, removed.
    pub dead_pins: usize,
    /// Trees no root reaches.
    pub trees: u64,
    /// Blobs (distinct contents) no root reaches.
    pub blobs: u64,
    /// Bytes of those blobs (each variant file counted).
    pub bytes: u64,
    /// Variants of reachable blobs that nothing links any more (no farm, no hard-linked
    /// checkout): forms of tree entries that no projection shows now.
    pub unused_variants: u64,
    /// Bytes of those variants.
    pub unused_variant_bytes: u64,
    /// Leftover temp files of interrupted commands.
    pub temp_files: u64,
    /// Cached link farms and shim views of trees no root reaches (and half-built ones,
    /// and farms of an older format).
    pub farms: u64,
    /// Session directories of runs that have ended (killed, or crashed before cleaning up).
    pub sessions: u64,
    /// Sessions kept on purpose (a run whose commit failed keeps its upper): never deleted.
    pub kept_sessions: Vec<String>,
}

impl Store {
    /// Every tree and blob the registered roots reach. Fails if a reachable tree is missing
    /// or damaged: then the store cannot know what that tree would have kept.
    /// `pinned`: trees that live processes serve (see `pins`), kept like roots.
    pub fn mark(&self, pinned: &[Hash]) -> Result<(HashSet<Hash>, HashSet<Hash>)> {
        let mut trees = HashSet::new();
        let mut blobs = HashSet::new();
        let mut starts = Vec::new();
        for record in self.roots()? {
            starts.push((
                record.hash()?,
                format!("root {}", record.name.as_deref().unwrap_or(&record.root)),
            ));
        }
        starts.extend(pinned.iter().map(|t| (*t, format!("the served tree {t}"))));
        for (root, label) in starts {
            crate::treeops::walk_reachable(root, &mut trees, &mut |hash, _| {
                let tree = self.get_tree(hash).map_err(|e| {
                    StoreError::Invalid(format!(
                        "gc stopped without deleting anything: {label} reaches a tree it cannot read ({e})"
                    ))
                })?;
                for entry in tree.entries() {
                    if let EntryKind::File { hash, .. } = &entry.kind {
                        blobs.insert(*hash);
                    }
                }
                Ok(Some(tree))
            })?;
        }
        Ok((trees, blobs))
    }

    /// Reports what no root reaches; with `run`, deletes it and stale temp files.
    pub fn gc(&self, run: bool) -> Result<GcReport> {
        let _lock = if run {
            self.lock_exclusive()?
        } else {
            self.lock_shared()?
        };
        let roots = self.roots()?.len();
        // A mount or workspace serves without the store lock; its pins keep its trees.
        let pins = self.scan_pins()?;
        let (live_trees, live_blobs) = self.mark(&pins.trees)?;
        let (trees, _) = self.list_objects(ObjectKind::Tree)?;
        let dead_trees: Vec<Hash> = trees
            .into_iter()
            .map(|(h, _)| h)
            .filter(|h| !live_trees.contains(h))
            .collect();
        let tmp = self.root.join("tmp");
        let temps: Vec<_> = fs::read_dir(&tmp)
            .map_err(StoreError::io("listing", &tmp))?
            .flatten()
            .collect();
        let listing = |dir: &str| -> Vec<std::path::PathBuf> {
            fs::read_dir(self.root.join(dir))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let dead_farms: Vec<_> = listing("farms")
            .into_iter()
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                !matches!(crate::objects::parse_farm_name(&name).map(|(h, _)| h), Some(h) if live_trees.contains(&h))
            })
            .collect();
        // Views (the shim's index of a tree, and its executables' links) of trees no root
        // reaches, and half-built ones.
        let dead_farms: Vec<_> = dead_farms
            .into_iter()
            .chain(listing("views").into_iter().filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let hex = name
                    .strip_suffix(".idx")
                    .or_else(|| name.strip_suffix(".d"))
                    .or_else(|| name.strip_suffix(".ok"))
                    .unwrap_or("");
                !matches!(hex.parse::<Hash>(), Ok(h) if live_trees.contains(&h))
            }))
            .collect();
        // A run's sandbox can outlive the shared lock of the `velo` that started it (only
        // for the instant it takes the kernel to deliver the parent-death signal), so the
        // session's own liveness lock decides, not the store lock.
        let (sessions, kept) = self.dead_sessions();
        if run {
            // First, so that variants only they linked count as unused below.
            for path in dead_farms.iter().chain(&sessions) {
                crate::remove_tree(path);
            }
        }
        let (blobs, _) = self.list_objects(ObjectKind::Blob)?;
        let mut dead_blobs: Vec<(Hash, Option<Box<str>>)> = Vec::new();
        let mut unused_variants = Vec::new();
        for (hash, variant) in blobs {
            if !live_blobs.contains(&hash) {
                dead_blobs.push((hash, variant));
            } else if let Some(suffix) = variant {
                // A variant linked only by its own name shows nothing; a projection that
                // needs its form again makes it again from the blob.
                let path = self.blob_variant_path(&hash, Some(&suffix));
                if let Ok(meta) = fs::symlink_metadata(&path) {
                    use std::os::unix::fs::MetadataExt;
                    if meta.nlink() == 1 {
                        unused_variants.push((path, meta.len()));
                    }
                }
            }
        }
        let mut report = GcReport {
            ran: run,
            roots,
            trees: dead_trees.len() as u64,
            blobs: dead_blobs
                .iter()
                .map(|(h, _)| h)
                .collect::<HashSet<_>>()
                .len() as u64,
            unused_variants: unused_variants.len() as u64,
            unused_variant_bytes: unused_variants.iter().map(|(_, len)| len).sum(),
            temp_files: temps.len() as u64,
            ..GcReport::default()
        };
        for (hash, variant) in &dead_blobs {
            let path = self.blob_variant_path(hash, variant.as_deref());
            report.bytes += fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
        }
        report.farms = dead_farms.len() as u64;
        report.serving = pins.live;
        report.dead_pins = pins.dead.len();
        report.sessions = sessions.len() as u64;
        report.kept_sessions = kept.iter().map(|p| p.display().to_string()).collect();
        if !run {
            return Ok(report);
        }
        for path in &pins.dead {
            remove(path)?;
        }
        let deletes =
            !dead_trees.is_empty() || !dead_blobs.is_empty() || !unused_variants.is_empty();
        let mut bump_after = false;
        if deletes {
            match self.bump_gc_generation() {
                Ok(()) => {}
                // On a full disk gc is how space comes back, so it must not need any: drop
                // the stat caches instead (unlinking needs no space), sweep, bump afterwards.
                Err(StoreError::Full(_)) => {
                    self.drop_stat_caches()?;
                    bump_after = true;
                }
                Err(e) => return Err(e),
            }
        }
        for hash in &dead_trees {
            remove(&self.tree_path(hash))?;
        }
        for (hash, variant) in &dead_blobs {
            remove(&self.blob_variant_path(hash, variant.as_deref()))?;
        }
        for (path, _) in &unused_variants {
            remove(path)?;
        }
        if deletes {
            // Shard directories left empty go too (a later insert makes them again); the
            // exclusive lock means no writer is about to put something in one.
            for dir in [self.root.join("blobs"), self.root.join("trees")] {
                for shard in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let _ = fs::remove_dir(shard.path());
                }
            }
        }
        // Every writer holds the shared lock, so under the exclusive one nothing in tmp/ is
        // in use: it is all left over from killed commands.
        for entry in temps {
            let path = entry.path();
            let result = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(StoreError::io("removing temp file", &path))?;
        }
        if bump_after {
            if let Err(e) = self.bump_gc_generation() {
                tracing::warn!(error = %e, "could not record the gc generation (the stat caches were dropped instead)");
            }
        }
        tracing::info!(
            trees = report.trees,
            blobs = report.blobs,
            bytes = report.bytes,
            "gc swept"
        );
        Ok(report)
    }

    /// Removes every stat cache and import cache entry, so no cache can vouch for an
    /// object this gc deletes.
    fn drop_stat_caches(&self) -> Result<()> {
        let dir = self.cache_dir();
        for entry in fs::read_dir(&dir)
            .map_err(StoreError::io("listing", &dir))?
            .flatten()
        {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("stat-") || name.starts_with("import-") {
                remove(&entry.path())?;
            }
        }
        Ok(())
    }

    pub(crate) fn bump_gc_generation(&self) -> Result<()> {
        let next = self.gc_generation() + 1;
        let path = self.root.join("gc-generation");
        crate::replace_file(
            &path,
            &self.root.join("tmp"),
            format!("{next}\n").as_bytes(),
            crate::Durability::Durable,
        )
        .map_err(StoreError::io("writing", &path))
    }
}

fn remove(path: &std::path::Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("removing", path)(e)),
    }
}
