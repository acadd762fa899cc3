//! `velo fsck`: is the store sound? Every object under its right name, read-only, every
//! root complete.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use rayon::prelude::*;
use serde::Serialize;
use velo_core::{EntryKind, Hash, Tree};

use crate::objects::ObjectKind;
use crate::{Result, Store};

/// What fsck checks.
#[derive(Debug, Clone, Copy)]
pub struct FsckOptions {
    /// Re-hash every blob's content (the slow part); without it only metadata is checked.
    pub verify_content: bool,
}

/// One thing that makes the store unsound.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// A stable label: `corrupt-blob`, `corrupt-tree`, `bad-mode`, `missing-blob`,
    /// `missing-tree`, `blob-size`, `bad-root`, `unsafe-permissions` (a directory of the
    /// store other users can write into, or enter where they must not), `bad-mtime` (a
    /// variant's mtime is not the one its name says), `stale-farm` (a cached farm shows
    /// another mode or mtime than its tree), `bad-view` (a shim view that is damaged or
    /// incomplete).
    pub kind: &'static str,
    /// The object, root or path concerned.
    pub object: String,
    /// What is wrong, as a sentence.
    pub detail: String,
}

/// The outcome of fsck.
#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    /// True iff `problems` is empty.
    pub ok: bool,
    /// Blob files checked (variants included).
    pub blobs: u64,
    /// Tree objects checked.
    pub trees: u64,
    /// Roots checked.
    pub roots: u64,
    /// Bytes whose hash was recomputed.
    pub bytes_verified: u64,
    /// Objects no root reaches (harmless; `gc --run` frees them).
    pub unreachable_objects: u64,
    /// Leftovers of interrupted commands in tmp/ (harmless; `gc --run` removes them).
    pub temp_files: u64,
    /// Files in the object directories that are not objects (left alone).
    pub stray_files: Vec<String>,
    /// What is wrong.
    pub problems: Vec<Problem>,
}

pub(crate) fn problem(kind: &'static str, object: impl ToString, detail: impl ToString) -> Problem {
    Problem {
        kind,
        object: object.to_string(),
        detail: detail.to_string(),
    }
}

/// What the walk of the roots found (see `check_roots`).
struct Reach {
    reachable_trees: std::collections::HashSet<Hash>,
    reachable_blobs: std::collections::HashSet<Hash>,
    /// False while a root record is damaged: what it would keep is unknown.
    reachability_known: bool,
    /// The first root (and path in it) found to need each damaged object.
    needed_by: HashMap<Hash, String>,
    roots: u64,
}

impl Store {
    /// Checks the whole store. Holds the shared lock, so gc cannot run meanwhile but
    /// ingests can (their temp files are counted, not blamed).
    pub fn fsck(&self, options: FsckOptions) -> Result<FsckReport> {
        let _lock = self.lock_shared()?;
        self.fsck_locked(options)
    }

    /// [`Store::fsck`] for a caller that holds a store lock (repair holds the exclusive one).
    pub(crate) fn fsck_locked(&self, options: FsckOptions) -> Result<FsckReport> {
        let (tree_list, mut strays) = self.list_objects(ObjectKind::Tree)?;
        let (blob_list, blob_strays) = self.list_objects(ObjectKind::Blob)?;
        strays.extend(blob_strays.into_iter().map(|s| format!("blobs/{s}")));

        let tree_results: Vec<(Hash, std::result::Result<Tree, Problem>)> = tree_list
            .par_iter()
            .map(|(hash, _)| (*hash, self.check_tree(hash)))
            .collect();
        let mut problems = Vec::new();
        let mut trees = HashMap::with_capacity(tree_results.len());
        for (hash, result) in tree_results {
            match result {
                Ok(tree) => {
                    trees.insert(hash, tree);
                }
                Err(p) => problems.push(p),
            }
        }

        let blob_results: Vec<(Hash, bool, u64, u64, Vec<Problem>)> = blob_list
            .par_iter()
            .map(|(hash, variant)| {
                let (size, verified, found) =
                    self.check_blob(hash, variant.as_deref(), options.verify_content);
                (*hash, variant.is_some(), size, verified, found)
            })
            .collect();
        let mut blob_sizes: HashMap<Hash, u64> = HashMap::with_capacity(blob_results.len());
        // Blobs with a problem in either file: which root needs them is added to it.
        let mut damaged_blobs = std::collections::HashSet::new();
        let mut bytes_verified = 0;
        for (hash, is_variant, size, verified, found) in blob_results {
            bytes_verified += verified;
            if !found.is_empty() {
                damaged_blobs.insert(hash);
            } else if !is_variant {
                blob_sizes.insert(hash, size);
            }
            problems.extend(found);
        }
        let listed_trees: std::collections::HashSet<Hash> =
            tree_list.iter().map(|(h, _)| *h).collect();
        let listed_blobs: std::collections::HashSet<Hash> = blob_list
            .iter()
            .filter(|(_, variant)| variant.is_none())
            .map(|(h, _)| *h)
            .collect();
        let Reach {
            reachable_trees,
            reachable_blobs,
            reachability_known,
            needed_by,
            roots,
        } = self.check_roots(
            &trees,
            &listed_trees,
            &listed_blobs,
            &blob_sizes,
            &damaged_blobs,
            &mut problems,
        )?;
        let unreachable = if !reachability_known {
            0
        } else {
            trees
                .keys()
                .filter(|h| !reachable_trees.contains(h))
                .count()
                + blob_sizes
                    .keys()
                    .filter(|h| !reachable_blobs.contains(h))
                    .count()
        };
        let temp_files = std::fs::read_dir(self.root.join("tmp"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        for p in &mut problems {
            // A blob's file, or a variant's: the hash comes first.
            let hex = p.object.get(..64).unwrap_or(&p.object);
            let needer = hex.parse::<Hash>().ok().and_then(|h| needed_by.get(&h));
            if let (Some(needer), "corrupt-blob" | "corrupt-tree" | "bad-mode") = (needer, p.kind) {
                p.detail = format!("{}; {needer}", p.detail);
            }
        }
        problems.extend(self.permission_problems());
        problems.extend(self.farm_problems(&trees));
        problems.extend(self.view_problems());
        problems.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
        Ok(FsckReport {
            ok: problems.is_empty(),
            blobs: blob_list.len() as u64,
            trees: tree_list.len() as u64,
            roots,
            bytes_verified,
            unreachable_objects: unreachable as u64,
            temp_files,
            stray_files: strays,
            problems,
        })
    }

    /// Walks every root: reports missing trees and blobs (with the whole path), wrong sizes,
    /// damaged records, and which root first needs each damaged object.
    fn check_roots(
        &self,
        trees: &HashMap<Hash, Tree>,
        listed_trees: &std::collections::HashSet<Hash>,
        listed_blobs: &std::collections::HashSet<Hash>,
        blob_sizes: &HashMap<Hash, u64>,
        damaged_blobs: &std::collections::HashSet<Hash>,
        problems: &mut Vec<Problem>,
    ) -> Result<Reach> {
        // The first root (and path in it) found to need each damaged object.
        let mut needed_by: HashMap<Hash, String> = HashMap::new();

        // Reachability: every root complete.
        let mut reachable_trees = std::collections::HashSet::new();
        let mut reachable_blobs = std::collections::HashSet::new();
        // Each damaged record is a problem of its own; while one exists, what it would keep
        // is unknown, so nothing is called unreachable (gc refuses to sweep then too).
        let (records, damaged) = match self.roots_and_damage() {
            Ok(found) => found,
            Err(e) => {
                problems.push(problem("bad-root", "refs/roots", e));
                (Vec::new(), Vec::new())
            }
        };
        for bad in &damaged {
            problems.push(problem(
                "bad-root",
                &bad.path,
                format!("{}; `velo forget {}` removes it", bad.why, bad.file),
            ));
        }
        let reachability_known = damaged.is_empty();
        for record in &records {
            let label = record.name.clone().unwrap_or_else(|| record.root.clone());
            let root = match record.hash() {
                Ok(h) => h,
                Err(e) => {
                    problems.push(problem("bad-root", &label, e));
                    continue;
                }
            };
            // Each tree with the path of the directory it is (empty: the root), so a
            // problem names the whole path, not only the leaf.
            crate::treeops::walk_reachable(root, &mut reachable_trees, &mut |&hash, dir| {
                let Some(tree) = trees.get(&hash) else {
                    let place = if dir.is_empty() {
                        "its root directory".to_string()
                    } else {
                        format!("directory {:?}", String::from_utf8_lossy(dir))
                    };
                    if !listed_trees.contains(&hash) {
                        problems.push(problem(
                            "missing-tree",
                            hash,
                            format!("tree is missing; root {label} needs it ({place})"),
                        ));
                    } else {
                        needed_by
                            .entry(hash)
                            .or_insert_with(|| format!("root {label} needs it ({place})"));
                    }
                    return Ok(None);
                };
                for entry in tree.entries() {
                    let EntryKind::File { hash, size } = &entry.kind else {
                        continue;
                    };
                    if !reachable_blobs.insert(*hash) {
                        continue;
                    }
                    let shown = || {
                        format!(
                            "{:?}",
                            String::from_utf8_lossy(&crate::treeops::join(
                                dir,
                                entry.name.as_bytes()
                            ))
                        )
                    };
                    if damaged_blobs.contains(hash) {
                        needed_by
                            .insert(*hash, format!("root {label} needs it (file {})", shown()));
                    }
                    match blob_sizes.get(hash) {
                        Some(stored) if stored != size => problems.push(problem(
                            "blob-size",
                            hash,
                            format!(
                                "blob holds {stored} bytes but root {label} says {size} (file {})",
                                shown()
                            ),
                        )),
                        Some(_) => {}
                        None if record.partial => {}
                        None if listed_blobs.contains(hash) => {} // damaged: reported above
                        None => problems.push(problem(
                            "missing-blob",
                            hash,
                            format!("blob is missing; root {label} needs it (file {})", shown()),
                        )),
                    }
                }
                Ok(Some(tree.clone()))
            })?;
        }
        Ok(Reach {
            reachable_trees,
            reachable_blobs,
            reachability_known,
            needed_by,
            roots: records.len() as u64,
        })
    }

    fn check_tree(&self, hash: &Hash) -> std::result::Result<Tree, Problem> {
        let path = self.tree_path(hash);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_file() => {
                return Err(problem(
                    "corrupt-tree",
                    hash,
                    "tree object is not a regular file",
                ))
            }
            Ok(meta) if meta.permissions().mode() & 0o7777 != 0o444 => {
                return Err(problem(
                    "bad-mode",
                    hash,
                    format!(
                        "tree object has mode {:o}, must be 444 (read-only)",
                        meta.permissions().mode() & 0o7777
                    ),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(problem("corrupt-tree", hash, format!("cannot stat: {e}"))),
        }
        self.get_tree(hash)
            .map_err(|e| problem("corrupt-tree", hash, e))
    }

    /// Returns (size, bytes hashed, problems) of a blob's file or of its variant with
    /// name suffix `variant`.
    fn check_blob(
        &self,
        hash: &Hash,
        variant: Option<&str>,
        verify: bool,
    ) -> (u64, u64, Vec<Problem>) {
        let path = self.blob_variant_path(hash, variant);
        let label = format!("{hash}{}", variant.unwrap_or(""));
        let mut found = Vec::new();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                return (
                    0,
                    0,
                    vec![problem("corrupt-blob", label, format!("cannot stat: {e}"))],
                )
            }
        };
        if !meta.file_type().is_file() {
            return (
                0,
                0,
                vec![problem("corrupt-blob", label, "blob is not a regular file")],
            );
        }
        let mode = meta.mode() & 0o7777;
        let form = variant.and_then(crate::BlobForm::parse_suffix);
        let (mode_ok, want) = match (variant, form) {
            (None, _) => (
                crate::BlobForm::is_canonical_mode(mode),
                "444 or 555".to_string(),
            ),
            (Some(_), Some(form)) => (mode == form.mode, format!("{:o}", form.mode)),
            // The legacy executable variant.
            (Some(_), None) => (mode == 0o555, "555".to_string()),
        };
        if !mode_ok {
            found.push(problem(
                "bad-mode",
                &label,
                if mode & 0o222 != 0 {
                    format!("blob has mode {mode:o}, must be {want}: a writable blob can be changed in place by any tree that links it")
                } else {
                    format!("blob has mode {mode:o}, must be {want}: the trees that link it show another mode than they record")
                },
            ));
        }
        if let Some(form) = form {
            let mtime_ns = velo_core::time_ns(meta.mtime(), meta.mtime_nsec());
            if mtime_ns != form.mtime_ns && mtime_ns != self.representable_mtime(form.mtime_ns) {
                found.push(problem(
                    "bad-mtime",
                    &label,
                    format!("variant has mtime {mtime_ns} ns, its name says {} ns: the trees that link it show the wrong time", form.mtime_ns),
                ));
            }
        }
        let mut verified = 0;
        if verify {
            // Holes of a sparse blob hash as zeros without being read.
            let result = std::fs::File::open(&path).and_then(|f| {
                let mut hasher = blake3::Hasher::new();
                verified = crate::sparse::copy_sparse(&f, None, Some(&mut hasher))?;
                Ok(Hash::from(hasher.finalize()))
            });
            match result {
                Ok(actual) if actual == *hash => {}
                Ok(actual) => found.push(problem(
                    "corrupt-blob",
                    &label,
                    format!("content hashes to {actual}"),
                )),
                Err(e) => found.push(problem("corrupt-blob", &label, format!("cannot read: {e}"))),
            }
        }
        (meta.len(), verified, found)
    }
}
