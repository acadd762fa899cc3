//! What the remote holds: every pack index (read once, then cached in the store by id,
//! which is the index's own hash) and the list of loose objects.

use std::collections::HashMap;
use std::path::PathBuf;

use futures::{StreamExt, TryStreamExt};
use velo_core::Hash;

use crate::pack::{Kind, PackIndex};
use crate::{Remote, RemoteError, Result, PARALLEL};

/// The most objects the indexes of one remote may name (about 2.5 GiB of memory: 12 Mi
/// took a pull to a peak of 2.0 GB; and
/// 200 kernel trees' worth of distinct files).
const MAX_OBJECTS: usize = 16 << 20;

/// Where an object is on the remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// In pack number `pack` of [`RemoteIndex::packs`].
    Packed {
        /// Which pack.
        pack: usize,
        /// Blob or tree.
        kind: Kind,
        /// Where in it.
        offset: u64,
        /// How long.
        len: u64,
    },
    /// Alone, at `objects/<hash>` (blobs only).
    Loose,
}

/// The remote's objects.
#[derive(Default)]
pub struct RemoteIndex {
    /// Pack ids.
    pub packs: Vec<String>,
    /// Every object, by hash.
    pub objects: HashMap<Hash, Location>,
}

impl RemoteIndex {
    /// Whether the remote has `hash` as an object of `kind`.
    pub fn has(&self, hash: &Hash, kind: Kind) -> bool {
        match self.objects.get(hash) {
            Some(Location::Packed { kind: k, .. }) => *k == kind,
            Some(Location::Loose) => kind == Kind::Blob,
            None => false,
        }
    }
}

impl Remote {
    fn cache_dir(&self, store: &velo_store::Store) -> PathBuf {
        store
            .cache_dir()
            .join(format!("remote-{}", self.config.cache_key()))
    }

    /// Lists the remote and reads the pack indexes this store has not cached yet.
    pub fn index(&self, store: &velo_store::Store) -> Result<RemoteIndex> {
        let cache = self.cache_dir(store);
        let packs_prefix = self.key("packs/");
        let objects_prefix = self.key("objects/");
        let (pack_keys, loose) = self.runtime.block_on(async {
            futures::try_join!(
                self.list_keys(&packs_prefix),
                self.list_keys(&objects_prefix)
            )
        })?;
        // Only keys right below packs/ and objects/: a listing is recursive, and another
        // remote's prefix may lie below this one's (`PREFIX/objects/...`); its objects are
        // not this remote's.
        let directly_in = |meta: &object_store::ObjectMeta, dir: &object_store::path::Path| {
            let key: &str = meta.location.as_ref();
            key.strip_prefix(dir.as_ref())
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|name| !name.contains('/'))
        };
        let ids: Vec<String> = pack_keys
            .iter()
            .filter(|m| directly_in(m, &packs_prefix))
            .filter_map(|m| {
                m.location
                    .filename()?
                    .strip_suffix(".idx")
                    .map(str::to_string)
            })
            .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        let _ = std::fs::create_dir_all(&cache);
        // Each index is decoded into the map as it arrives: at most PARALLEL raw indexes
        // are held at once, and the map is bounded by MAX_OBJECTS.
        let mut index = self.runtime.block_on(
            futures::stream::iter(ids.into_iter().map(|id| {
                let cached = cache.join(format!("{id}.idx"));
                async move {
                    if let Ok(bytes) = std::fs::read(&cached) {
                        if PackIndex::id_of(&bytes) == id {
                            return Ok((id, bytes));
                        }
                    }
                    let key = self.key(&format!("packs/{id}.idx"));
                    let bytes = self
                        .read_capped(&key, None, crate::pack::MAX_INDEX_BYTES)
                        .await?
                        .ok_or_else(|| {
                            RemoteError::Missing(format!(
                                "{key}: listed, then gone (a gc of the remote by another tool?)"
                            ))
                        })?;
                    if PackIndex::id_of(&bytes) != id {
                        return Err(RemoteError::Corrupt {
                            key: key.to_string(),
                            why: "its bytes do not hash to its name".into(),
                        });
                    }
                    // A cache: losing it costs a download.
                    let _ = velo_store::replace_file(
                        &cached,
                        &store.root().join("tmp"),
                        &bytes,
                        velo_store::Durability::Cache,
                    );
                    Ok((id, bytes))
                }
            }))
            .buffer_unordered(PARALLEL)
            .try_fold(RemoteIndex::default(), |mut index, (id, bytes)| async move {
                let key = || self.key(&format!("packs/{id}.idx")).to_string();
                let decoded = PackIndex::decode(&bytes).map_err(|e| RemoteError::Corrupt {
                    key: key(),
                    why: e.to_string(),
                })?;
                drop(bytes);
                if index.objects.len() + decoded.entries.len() > MAX_OBJECTS {
                    return Err(RemoteError::Corrupt {
                        key: key(),
                        why: format!(
                            "the remote's indexes name more than {MAX_OBJECTS} objects, more than velo holds in memory; push to a new prefix"
                        ),
                    });
                }
                let pack = index.packs.len();
                index.packs.push(id);
                for e in decoded.entries {
                    index.objects.entry(e.hash).or_insert(Location::Packed {
                        pack,
                        kind: e.kind,
                        offset: e.offset,
                        len: e.len,
                    });
                }
                Ok(index)
            }),
        )?;
        for meta in loose.iter().filter(|m| directly_in(m, &objects_prefix)) {
            if let Some(hash) = meta
                .location
                .filename()
                .and_then(|n| n.parse::<Hash>().ok())
            {
                index.objects.entry(hash).or_insert(Location::Loose);
            }
        }
        Ok(index)
    }
}
