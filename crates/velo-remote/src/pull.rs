//! Pull: fetch the trees and blobs of a root that the store lacks, verifying every byte
//! against its hash before it is staged, and publish them all at once.
//!
//! Everything fetched goes into one batch of the store, published only when the whole
//! root is there and verified: a corrupt, truncated or missing object on the remote fails
//! the pull with its name, and the store is as it was.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use futures::{StreamExt, TryStreamExt};
use velo_core::{EntryKind, Hash, Tree};
use velo_store::{Batch, Store};

use crate::index::{Location, RemoteIndex};
use crate::pack::Kind;
use crate::{Remote, RemoteError, Result, PARALLEL};

/// The largest tree object a pull accepts (a directory of about a million entries).
const MAX_TREE: u64 = 256 << 20;
/// Objects of a pack at most this far apart are read with one request.
const COALESCE_GAP: u64 = 1 << 20;

/// What a pull did.
#[derive(Debug, Default, serde::Serialize)]
pub struct PullReport {
    /// The root tree.
    pub root: String,
    /// Trees fetched (the rest were in the store).
    pub trees: u64,
    /// Blobs fetched.
    pub blobs: u64,
    /// Bytes of the blobs fetched.
    pub bytes: u64,
}

/// What a pull fetches besides the trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blobs {
    /// Every blob the store lacks.
    All,
    /// Only executable files' (a view of the tree links them); the others are fetched
    /// when first read (a mount with `--remote`).
    Executables,
}

/// An object to fetch, and what its tree says of it.
#[derive(Clone, Copy)]
struct Fetch {
    hash: Hash,
    kind: Kind,
    /// The size a tree entry gives (blobs); the remote's index must agree.
    size: Option<u64>,
}

impl Remote {
    /// Fetches what the store lacks of tree `root` (every tree, and the blobs `blobs`
    /// says), verified, and publishes it. The caller holds the store's shared
    /// lock and registers the root.
    pub fn pull(&self, store: &Store, root: Hash, blobs: Blobs) -> Result<PullReport> {
        let index = self.index(store)?;
        let batch = store.begin_batch()?;
        let mut report = PullReport {
            root: root.to_hex(),
            ..PullReport::default()
        };
        // Trees, a level at a time: each level's missing trees fetched at once.
        let mut fetched: HashMap<Hash, Tree> = HashMap::new();
        let mut seen = HashSet::new();
        let mut level = vec![root];
        let mut files: Vec<(Hash, u64, bool)> = Vec::new();
        let mut depth = 0;
        while !level.is_empty() {
            depth += 1;
            // As an import refuses it: a tree deeper than a tree may be (and a remote that
            // makes a pull one request round per level for as long as it likes).
            if depth > velo_core::MAX_DEPTH {
                return Err(RemoteError::Corrupt {
                    key: format!("{}: tree {root}", self.config.url()),
                    why: format!("deeper than {} levels", velo_core::MAX_DEPTH),
                });
            }
            let mut next = Vec::new();
            let mut wanted = Vec::new();
            for hash in level {
                if !seen.insert(hash) {
                    continue;
                }
                if store.has_tree(&hash) {
                    let tree = store.get_tree(&hash)?;
                    collect(&tree, &mut next, &mut files);
                } else {
                    wanted.push(Fetch {
                        hash,
                        kind: Kind::Tree,
                        size: None,
                    });
                }
            }
            for (hash, bytes) in self.fetch_all(&index, &wanted)? {
                let tree = Tree::decode(&bytes).map_err(|e| RemoteError::Corrupt {
                    key: self.where_is(&index, &hash),
                    why: format!("tree {hash} does not decode ({e})"),
                })?;
                batch.insert_tree(&hash, &bytes)?;
                collect(&tree, &mut next, &mut files);
                fetched.insert(hash, tree);
                report.trees += 1;
            }
            level = next;
        }
        {
            let mut unique = HashSet::new();
            let missing: Vec<Fetch> = files
                .into_iter()
                .filter(|(_, _, exec)| blobs == Blobs::All || *exec)
                .filter(|(hash, _, _)| unique.insert(*hash) && !store.has_blob(hash))
                .map(|(hash, size, _)| Fetch {
                    hash,
                    kind: Kind::Blob,
                    size: Some(size),
                })
                .collect();
            let wanted: HashMap<Hash, ()> = missing.iter().map(|f| (f.hash, ())).collect();
            let forms = velo_store::first_forms(&fetched, root, &wanted);
            self.fetch_blobs(&index, &missing, &batch, &forms)?;
            report.blobs = missing.len() as u64;
            report.bytes = missing.iter().filter_map(|f| f.size).sum();
        }
        if !batch.is_empty() {
            store.sync()?;
            batch.publish()?;
        }
        Ok(report)
    }

    /// For messages: the key an object is read from.
    fn where_is(&self, index: &RemoteIndex, hash: &Hash) -> String {
        match index.objects.get(hash) {
            Some(Location::Packed { pack, .. }) => self
                .key(&format!("packs/{}.pack", index.packs[*pack]))
                .to_string(),
            _ => self.key(&format!("objects/{}", hash.to_hex())).to_string(),
        }
    }

    /// Fetches and verifies `wanted` (whole objects in memory): (hash, bytes).
    fn fetch_all(&self, index: &RemoteIndex, wanted: &[Fetch]) -> Result<Vec<(Hash, Vec<u8>)>> {
        let groups = self.group(index, wanted)?;
        self.runtime.block_on(
            futures::stream::iter(
                groups
                    .into_iter()
                    .map(|(pack, items)| self.fetch_group(index, pack, items)),
            )
            .buffer_unordered(PARALLEL)
            .try_fold(Vec::new(), |mut all, got| async move {
                all.extend(got);
                Ok(all)
            }),
        )
    }

    /// Fetches blobs into the batch, a pack's worth at a time.
    fn fetch_blobs(
        &self,
        index: &RemoteIndex,
        wanted: &[Fetch],
        batch: &Batch<'_>,
        forms: &HashMap<Hash, velo_store::BlobForm>,
    ) -> Result<()> {
        let groups = self.group(index, wanted)?;
        self.runtime.block_on(
            futures::stream::iter(groups.into_iter().map(|(pack, items)| async move {
                let got = self.fetch_group(index, pack, items).await?;
                for (hash, bytes) in got {
                    batch.insert_blob(&hash, forms.get(&hash).copied(), &mut |f| {
                        f.write_all(&bytes)
                    })?;
                }
                Ok::<(), RemoteError>(())
            }))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>(),
        )?;
        Ok(())
    }

    /// Groups objects by the pack that holds them (`None`: loose), checking that the
    /// remote has each, with the size its tree gives.
    #[allow(clippy::type_complexity)]
    fn group(
        &self,
        index: &RemoteIndex,
        wanted: &[Fetch],
    ) -> Result<Vec<(Option<usize>, Vec<(Fetch, u64, u64)>)>> {
        let mut by_pack: HashMap<Option<usize>, Vec<(Fetch, u64, u64)>> = HashMap::new();
        for f in wanted {
            let missing = || {
                RemoteError::Missing(format!(
                    "the remote {} has no {} {} (a push that did not finish, or objects deleted there); nothing was added to the store",
                    self.config.url(),
                    f.kind.label(),
                    f.hash
                ))
            };
            match index.objects.get(&f.hash) {
                Some(Location::Packed {
                    pack,
                    kind,
                    offset,
                    len,
                }) => {
                    if *kind != f.kind {
                        return Err(missing());
                    }
                    let bad_len = match f.size {
                        Some(size) => *len != size,
                        None => *len > MAX_TREE,
                    };
                    if bad_len {
                        return Err(RemoteError::Corrupt {
                            key: self
                                .key(&format!("packs/{}.idx", index.packs[*pack]))
                                .to_string(),
                            why: format!(
                                "it gives {} {} a length of {len} bytes, which its tree does not",
                                f.kind.label(),
                                f.hash
                            ),
                        });
                    }
                    by_pack
                        .entry(Some(*pack))
                        .or_default()
                        .push((*f, *offset, *len));
                }
                Some(Location::Loose) if f.kind == Kind::Blob => {
                    by_pack
                        .entry(None)
                        .or_default()
                        .push((*f, 0, f.size.unwrap_or(0)));
                }
                _ => return Err(missing()),
            }
        }
        let mut groups: Vec<_> = by_pack.into_iter().collect();
        // Loose objects one request each; packs by ranges, coalesced by object_store.
        let mut out = Vec::new();
        for (pack, items) in groups.drain(..) {
            match pack {
                None => out.extend(items.into_iter().map(|item| (None, vec![item]))),
                Some(_) => out.push((pack, items)),
            }
        }
        Ok(out)
    }

    /// Fetches one group and verifies each object against its hash.
    async fn fetch_group(
        &self,
        index: &RemoteIndex,
        pack: Option<usize>,
        items: Vec<(Fetch, u64, u64)>,
    ) -> Result<Vec<(Hash, Vec<u8>)>> {
        let key = match pack {
            Some(p) => self.key(&format!("packs/{}.pack", index.packs[p])),
            None => self.key(&format!("objects/{}", items[0].0.hash.to_hex())),
        };
        let gone = || RemoteError::Missing(format!("{key}: listed, then gone"));
        let bodies: Vec<Vec<u8>> = match pack {
            Some(_) => {
                // Ranges close together are read as one (fewer requests); each read is
                // capped at what was asked, and sliced only after its length is checked.
                let mut order: Vec<usize> = (0..items.len()).collect();
                order.sort_by_key(|&i| items[i].1);
                let mut bodies = vec![Vec::new(); items.len()];
                let mut at = 0;
                while at < order.len() {
                    let start = items[order[at]].1;
                    let mut end = start + items[order[at]].2;
                    let mut last = at + 1;
                    while last < order.len() && items[order[last]].1 <= end + COALESCE_GAP {
                        end = end.max(items[order[last]].1 + items[order[last]].2);
                        last += 1;
                    }
                    if end > start {
                        let got = self
                            .read_capped(&key, Some(start..end), end - start)
                            .await?
                            .ok_or_else(gone)?;
                        for &i in &order[at..last] {
                            let (_, offset, len) = items[i];
                            let from = (offset - start) as usize;
                            if let Some(slice) = got.get(from..from + len as usize) {
                                bodies[i] = slice.to_vec();
                            } else if let Some(tail) = got.get(from..) {
                                bodies[i] = tail.to_vec();
                            }
                        }
                    }
                    at = last;
                }
                bodies
            }
            None => {
                let size = items[0].0.size.unwrap_or(0);
                vec![self.read_capped(&key, None, size).await?.ok_or_else(gone)?]
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for ((f, offset, len), body) in items.iter().zip(bodies) {
            if body.len() as u64 != *len {
                return Err(RemoteError::Corrupt {
                    key: key.to_string(),
                    why: format!(
                        "{} bytes at {offset} where {len} were asked for ({} {}): truncated",
                        body.len(),
                        f.kind.label(),
                        f.hash
                    ),
                });
            }
            let actual = f.kind.hash(&body);
            if actual != f.hash {
                return Err(RemoteError::Corrupt {
                    key: key.to_string(),
                    why: format!(
                        "the bytes of {} {} hash to {actual}",
                        f.kind.label(),
                        f.hash
                    ),
                });
            }
            out.push((f.hash, body));
        }
        Ok(out)
    }
}

/// A tree's subdirectories (to walk) and files (to fetch: hash, size, executable).
fn collect(tree: &Tree, dirs: &mut Vec<Hash>, files: &mut Vec<(Hash, u64, bool)>) {
    for entry in tree.entries() {
        match entry.kind {
            EntryKind::Dir { hash } => dirs.push(hash),
            EntryKind::File { hash, size } => files.push((hash, size, entry.mode.is_executable())),
            _ => {}
        }
    }
}

impl Remote {
    /// One blob's bytes, verified, within `timeout` (a reader waits no longer).
    pub fn fetch_blob(
        &self,
        index: &RemoteIndex,
        hash: Hash,
        size: u64,
        timeout: std::time::Duration,
    ) -> Result<Vec<u8>> {
        let wanted = [Fetch {
            hash,
            kind: Kind::Blob,
            size: Some(size),
        }];
        let mut groups = self.group(index, &wanted)?;
        let (pack, items) = groups.pop().expect("one object, one group");
        let got = self
            .runtime
            .block_on(async {
                tokio::time::timeout(timeout, self.fetch_group(index, pack, items)).await
            })
            .map_err(|_| {
                RemoteError::Missing(format!(
                    "blob {hash}: no answer from {} within {} s",
                    self.config.url(),
                    timeout.as_secs()
                ))
            })??;
        Ok(got
            .into_iter()
            .next()
            .map(|(_, bytes)| bytes)
            .unwrap_or_default())
    }
}
