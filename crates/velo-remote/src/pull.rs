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
use velo_store::{Batch, Staged, Store};

use crate::index::{Location, RemoteIndex};
use crate::pack::Kind;
use crate::{Remote, RemoteError, Result, PARALLEL};

/// The largest tree object a pull accepts (a directory of about a million entries).
const MAX_TREE: u64 = 256 << 20;
/// Objects of a pack at most this far apart are read with one request.
const COALESCE_GAP: u64 = 1 << 20;
/// The most one such request may span (what it holds in memory at once).
const MAX_COALESCED: u64 = 32 << 20;
/// Blobs at least this large are streamed into a staged file as they arrive, never held
/// in memory whole (the tree may say a blob is terabytes long).
const STREAM_FROM: u64 = 4 << 20;

/// A fetched object, verified: its bytes, or a large blob's staged file.
pub(crate) enum Got<'s> {
    Bytes(Vec<u8>),
    Staged(Staged<'s>),
}

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
            for (hash, bytes) in self.fetch_trees(store, &index, &wanted)? {
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
            self.fetch_blobs(store, &index, &missing, &batch, &forms)?;
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

    /// Fetches and verifies trees `wanted`: (hash, bytes).
    fn fetch_trees(
        &self,
        store: &Store,
        index: &RemoteIndex,
        wanted: &[Fetch],
    ) -> Result<Vec<(Hash, Vec<u8>)>> {
        let trees = std::sync::Mutex::new(Vec::new());
        let keep = |hash: Hash, got: Got<'_>| {
            if let Got::Bytes(bytes) = got {
                trees
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((hash, bytes));
            }
            Ok(())
        };
        self.fetch_groups(store, index, wanted, &keep)?;
        Ok(trees.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// Fetches blobs into the batch as they come.
    fn fetch_blobs(
        &self,
        store: &Store,
        index: &RemoteIndex,
        wanted: &[Fetch],
        batch: &Batch<'_>,
        forms: &HashMap<Hash, velo_store::BlobForm>,
    ) -> Result<()> {
        let insert = |hash: Hash, got: Got<'_>| {
            let form = forms.get(&hash).copied();
            match got {
                Got::Bytes(bytes) => {
                    batch.insert_blob(&hash, form, &mut |f| f.write_all(&bytes))?;
                }
                Got::Staged(staged) => {
                    batch.insert_staged_blob(staged, &hash, form)?;
                }
            }
            Ok(())
        };
        self.fetch_groups(store, index, wanted, &insert)
    }

    /// Fetches `wanted`, [`PARALLEL`] groups at a time, each object verified and handed
    /// to `sink` as it comes.
    fn fetch_groups<'s>(
        &self,
        store: &'s Store,
        index: &RemoteIndex,
        wanted: &[Fetch],
        sink: &dyn Fn(Hash, Got<'s>) -> Result<()>,
    ) -> Result<()> {
        let groups = self.group(index, wanted)?;
        self.runtime.block_on(
            futures::stream::iter(
                groups
                    .into_iter()
                    .map(|(pack, items)| self.fetch_group(store, index, pack, items, sink)),
            )
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

    /// Fetches one group, verifies each object against its hash and hands it to `sink`
    /// as it comes: small objects of a pack by coalesced ranged reads, large blobs (and
    /// loose ones) each streamed on its own.
    async fn fetch_group<'s>(
        &self,
        store: &'s Store,
        index: &RemoteIndex,
        pack: Option<usize>,
        items: Vec<(Fetch, u64, u64)>,
        sink: &dyn Fn(Hash, Got<'s>) -> Result<()>,
    ) -> Result<()> {
        let key = match pack {
            Some(p) => self.key(&format!("packs/{}.pack", index.packs[p])),
            None => self.key(&format!("objects/{}", items[0].0.hash.to_hex())),
        };
        let (large, mut small): (Vec<_>, Vec<_>) = items.into_iter().partition(|(f, _, len)| {
            pack.is_none() || (f.kind == Kind::Blob && *len >= STREAM_FROM)
        });
        for (f, offset, len) in large {
            let range = pack.map(|_| offset..offset + len);
            let got = if len >= STREAM_FROM {
                Got::Staged(self.stream_blob(store, &key, range, &f, len).await?)
            } else {
                let body = self
                    .read_capped(&key, range, len)
                    .await?
                    .ok_or_else(|| gone(&key))?;
                verify(&key, &f, offset, len, &body)?;
                Got::Bytes(body)
            };
            sink(f.hash, got)?;
        }
        // Ranges close together are read as one (fewer requests, within MAX_COALESCED);
        // each read is capped at what was asked, and sliced only after its length is
        // checked.
        small.sort_by_key(|&(_, offset, _)| offset);
        let spans: Vec<(u64, u64)> = small
            .iter()
            .map(|&(_, offset, len)| (offset, len))
            .collect();
        for (items, bytes) in coalesce(&spans) {
            let (at, last) = (items.start, items.end);
            let (start, end) = (bytes.start, bytes.end);
            let got = if end > start {
                self.read_capped(&key, Some(start..end), end - start)
                    .await?
                    .ok_or_else(|| gone(&key))?
            } else {
                Vec::new()
            };
            for &(f, offset, len) in &small[at..last] {
                let from = (offset - start) as usize;
                let body = got
                    .get(from..from + len as usize)
                    .or_else(|| got.get(from..))
                    .unwrap_or_default();
                verify(&key, &f, offset, len, body)?;
                sink(f.hash, Got::Bytes(body.to_vec()))?;
            }
        }
        Ok(())
    }

    /// Streams blob `f` (`len` bytes: `range` of `key`, or all of it) into a staged file,
    /// hashing as it comes; the file once its length and hash are checked.
    async fn stream_blob<'s>(
        &self,
        store: &'s Store,
        key: &object_store::path::Path,
        range: Option<std::ops::Range<u64>>,
        f: &Fetch,
        len: u64,
    ) -> Result<Staged<'s>> {
        let mut staged = store.stage()?;
        let mut hasher = blake3::Hasher::new();
        let staging = store.root().join("tmp");
        let file = staged.file();
        let read = self
            .read_each(key, range.clone(), len, &mut |chunk| {
                hasher.update(chunk);
                // As the store words it: a full disk says how to free space.
                file.write_all(chunk).map_err(|e| {
                    velo_store::StoreError::io("staging a fetched blob in", &staging)(e).into()
                })
            })
            .await?
            .ok_or_else(|| gone(key))?;
        let offset = range.map_or(0, |r| r.start);
        if read != len {
            return Err(truncated(key, f, offset, len, read));
        }
        let actual = Hash(*hasher.finalize().as_bytes());
        if actual != f.hash {
            return Err(mismatched(key, f, actual));
        }
        Ok(staged)
    }
}

/// The reads that fetch objects at `spans` (offset, length; sorted by offset): for each,
/// the objects it covers (indexes into `spans`) and the bytes it reads. Objects at most
/// [`COALESCE_GAP`] apart share a read spanning at most [`MAX_COALESCED`] bytes (one object
/// longer than that is read alone). The offsets come from a remote's index, which may
/// place them anywhere up to 2^64: no sum here may overflow.
fn coalesce(spans: &[(u64, u64)]) -> Vec<(std::ops::Range<usize>, std::ops::Range<u64>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(&(start, len)) = spans.get(at) {
        let mut end = start.saturating_add(len);
        let mut last = at + 1;
        while let Some(&(offset, len)) = spans.get(last) {
            let reach = end.max(offset.saturating_add(len));
            if offset > end.saturating_add(COALESCE_GAP) || reach - start > MAX_COALESCED {
                break;
            }
            end = reach;
            last += 1;
        }
        out.push((at..last, start..end));
        at = last;
    }
    out
}

/// An object the index listed is not there.
fn gone(key: &object_store::path::Path) -> RemoteError {
    RemoteError::Missing(format!("{key}: listed, then gone"))
}

/// Checks a fetched object's length and hash.
fn verify(
    key: &object_store::path::Path,
    f: &Fetch,
    offset: u64,
    len: u64,
    body: &[u8],
) -> Result<()> {
    if body.len() as u64 != len {
        return Err(truncated(key, f, offset, len, body.len() as u64));
    }
    let actual = f.kind.hash(body);
    if actual != f.hash {
        return Err(mismatched(key, f, actual));
    }
    Ok(())
}

fn truncated(
    key: &object_store::path::Path,
    f: &Fetch,
    offset: u64,
    len: u64,
    got: u64,
) -> RemoteError {
    RemoteError::Corrupt {
        key: key.to_string(),
        why: format!(
            "{got} bytes at {offset} where {len} were asked for ({} {}): truncated",
            f.kind.label(),
            f.hash
        ),
    }
}

fn mismatched(key: &object_store::path::Path, f: &Fetch, actual: Hash) -> RemoteError {
    RemoteError::Corrupt {
        key: key.to_string(),
        why: format!(
            "the bytes of {} {} hash to {actual}",
            f.kind.label(),
            f.hash
        ),
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
    /// One blob, verified and staged in `store` (the caller commits it), within
    /// `timeout` (a reader waits no longer).
    pub fn fetch_blob<'s>(
        &self,
        store: &'s Store,
        index: &RemoteIndex,
        hash: Hash,
        size: u64,
        timeout: std::time::Duration,
    ) -> Result<Staged<'s>> {
        let wanted = [Fetch {
            hash,
            kind: Kind::Blob,
            size: Some(size),
        }];
        let mut groups = self.group(index, &wanted)?;
        let (pack, items) = groups.pop().expect("one object, one group");
        let got = std::sync::Mutex::new(None);
        let keep = |_: Hash, one: Got<'s>| {
            *got.lock().unwrap_or_else(|e| e.into_inner()) = Some(one);
            Ok(())
        };
        self.runtime
            .block_on(async {
                tokio::time::timeout(timeout, self.fetch_group(store, index, pack, items, &keep))
                    .await
            })
            .map_err(|_| {
                RemoteError::Missing(format!(
                    "blob {hash}: no answer from {} within {} s",
                    self.config.url(),
                    timeout.as_secs()
                ))
            })??;
        match got.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Got::Staged(staged)) => Ok(staged),
            Some(Got::Bytes(bytes)) => {
                let mut staged = store.stage()?;
                staged.file().write_all(&bytes).map_err(|e| {
                    velo_store::StoreError::io(
                        "staging a fetched blob in",
                        store.root().join("tmp"),
                    )(e)
                })?;
                Ok(staged)
            }
            None => Err(gone(&self.key(&format!("objects/{}", hash.to_hex())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{coalesce, COALESCE_GAP, MAX_COALESCED};

    #[test]
    fn reads_coalesce_within_bounds_wherever_an_index_puts_objects() {
        // Close together: one read; far apart: two.
        assert_eq!(
            coalesce(&[(0, 10), (20, 5), (COALESCE_GAP + 100, 1)]),
            vec![
                (0..2, 0..25),
                (2..3, COALESCE_GAP + 100..COALESCE_GAP + 101)
            ]
        );
        // Overlapping ranges (a hostile index): one read of their union.
        assert_eq!(coalesce(&[(0, 100), (50, 10)]), vec![(0..2, 0..100)]);
        // No read spans more than MAX_COALESCED.
        let spans: Vec<(u64, u64)> = (0..100).map(|i| (i << 20, 1 << 20)).collect();
        for (_, bytes) in coalesce(&spans) {
            assert!(bytes.end - bytes.start <= MAX_COALESCED);
        }
        // Offsets at the top of the u64 range (an index may claim a pack that long):
        // once an overflow, a panic.
        let top = u64::MAX - 20;
        assert_eq!(
            coalesce(&[(top, 5), (top + 10, 5)]),
            vec![(0..2, top..top + 15)]
        );
        assert!(coalesce(&[]).is_empty());
    }
}
