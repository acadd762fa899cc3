//! Push: upload what the remote lacks of some trees, then publish their roots.
//!
//! Order is what makes a half-done push safe: packs before their indexes, every object
//! before a root that reaches it. A push killed anywhere leaves no root naming a missing
//! object (at worst a pack without an index, which nothing reads), and the next push sees
//! through the indexes what is there and uploads only the rest.

use std::collections::HashSet;
use std::io::Read;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use velo_core::{EntryKind, Hash};
use velo_store::Store;

use crate::pack::{Kind, PackBuilder, LOOSE_FROM, PACK_TARGET};
use crate::{PublishedRoot, Remote, RemoteError, Result, PARALLEL};

/// What a push did.
#[derive(Debug, Default, serde::Serialize)]
pub struct PushReport {
    /// The roots published: (name, tree).
    pub roots: Vec<(String, String)>,
    /// Objects the trees reach.
    pub objects: u64,
    /// Of those, objects uploaded (the rest were there).
    pub uploaded: u64,
    /// Bytes of the objects uploaded.
    pub uploaded_bytes: u64,
    /// Packs written.
    pub packs: u64,
    /// Large blobs written alone.
    pub loose: u64,
}

/// One object to upload.
#[derive(Clone, Copy)]
struct Wanted {
    kind: Kind,
    hash: Hash,
    size: u64,
}

impl Remote {
    /// Uploads every object `roots` reach that the remote lacks, then publishes each
    /// root that has a name under it. The caller holds the store's shared lock.
    pub fn push(&self, store: &Store, roots: &[(Option<String>, Hash)]) -> Result<PushReport> {
        for name in roots.iter().filter_map(|(n, _)| n.as_deref()) {
            velo_store::validate_root_name(name)?;
        }
        // Every tree and blob reached, trees first (a lazy reader needs them first),
        // blobs in the order the trees name them (files of one directory stay together).
        let mut trees = HashSet::new();
        let mut order: Vec<Wanted> = Vec::new();
        let mut blobs_seen = HashSet::new();
        let mut blob_order = Vec::new();
        for (_, root) in roots {
            velo_store::treeops::walk_reachable(*root, &mut trees, &mut |hash, _| {
                let bytes = store.tree_bytes(hash)?;
                let tree = velo_core::Tree::decode(&bytes).map_err(|e| {
                    velo_store::StoreError::Corrupt {
                        kind: "tree",
                        hash: *hash,
                        detail: e.to_string(),
                    }
                })?;
                order.push(Wanted {
                    kind: Kind::Tree,
                    hash: *hash,
                    size: bytes.len() as u64,
                });
                for entry in tree.entries() {
                    if let EntryKind::File { hash, size } = entry.kind {
                        if blobs_seen.insert(hash) {
                            blob_order.push(Wanted {
                                kind: Kind::Blob,
                                hash,
                                size,
                            });
                        }
                    }
                }
                Ok(Some(tree))
            })?;
        }
        order.extend(blob_order);
        let index = self.index(store)?;
        let missing: Vec<Wanted> = order
            .iter()
            .copied()
            .filter(|w| !index.has(&w.hash, w.kind))
            .collect();
        let mut report = PushReport {
            objects: order.len() as u64,
            uploaded: missing.len() as u64,
            uploaded_bytes: missing.iter().map(|w| w.size).sum(),
            ..PushReport::default()
        };
        // Packs of about PACK_TARGET bytes, planned from the sizes; filled when sent.
        let mut plans: Vec<Vec<Wanted>> = Vec::new();
        let mut loose: Vec<Wanted> = Vec::new();
        let mut filling = 0u64;
        for w in missing {
            if w.kind == Kind::Blob && w.size >= LOOSE_FROM {
                loose.push(w);
                continue;
            }
            if plans.is_empty() || filling >= PACK_TARGET {
                plans.push(Vec::new());
                filling = 0;
            }
            filling += w.size;
            plans.last_mut().expect("just pushed").push(w);
        }
        report.packs = plans.len() as u64;
        report.loose = loose.len() as u64;
        let packs =
            futures::stream::iter(plans.into_iter().map(|plan| self.send_pack(store, plan)))
                .buffer_unordered(PARALLEL / 2)
                .try_collect::<Vec<()>>();
        let loose = futures::stream::iter(loose.into_iter().map(|w| self.send_loose(store, w)))
            .buffer_unordered(2)
            .try_collect::<Vec<()>>();
        self.runtime
            .block_on(async { futures::try_join!(packs, loose) })?;
        // Every object is there: the roots may name them now.
        for (name, root) in roots {
            let Some(name) = name else { continue };
            let key = self.key(&format!("roots/{name}"));
            let record = PublishedRoot {
                v: 1,
                root: root.to_hex(),
                pushed_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            let bytes = serde_json::to_vec(&record).expect("a record serialises");
            self.runtime
                .block_on(self.client.put(&key, bytes.into()))
                .map_err(|e| RemoteError::request("publishing root", &key, e))?;
            report.roots.push((name.clone(), root.to_hex()));
        }
        Ok(report)
    }

    /// Reads the plan's objects from the store (checking each against its hash), writes
    /// the pack, then its index.
    async fn send_pack(&self, store: &Store, plan: Vec<Wanted>) -> Result<()> {
        let mut builder = PackBuilder::default();
        for w in &plan {
            let bytes = match w.kind {
                Kind::Tree => store.tree_bytes(&w.hash)?,
                Kind::Blob => read_blob(store, &w.hash, w.size)?,
            };
            builder.add(w.kind, w.hash, &bytes);
        }
        let (pack, index, id) = builder.finish();
        for (key, bytes, what) in [
            (self.key(&format!("packs/{id}.pack")), pack, "writing pack"),
            (
                self.key(&format!("packs/{id}.idx")),
                index,
                "writing pack index",
            ),
        ] {
            self.client
                .put(&key, bytes.into())
                .await
                .map_err(|e| RemoteError::request(what, &key, e))?;
        }
        Ok(())
    }

    /// Streams a large blob to `objects/<hash>` (a multipart upload), checking its bytes.
    async fn send_loose(&self, store: &Store, w: Wanted) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let key = self.key(&format!("objects/{}", w.hash.to_hex()));
        let failed = |e: std::io::Error| RemoteError::Request {
            what: "writing",
            key: key.to_string(),
            why: crate::tidy(&e),
        };
        let mut file = store.open_blob(&w.hash)?;
        let mut writer = object_store::buffered::BufWriter::with_capacity(
            std::sync::Arc::clone(&self.client) as std::sync::Arc<dyn ObjectStore>,
            key.clone(),
            16 << 20,
        );
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 4 << 20];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| RemoteError::Io {
                what: "reading",
                path: store.blob_path(&w.hash).display().to_string(),
                cause: e,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            writer.write_all(&buf[..n]).await.map_err(failed)?;
        }
        if Hash(*hasher.finalize().as_bytes()) != w.hash || total != w.size {
            writer.abort().await.ok();
            return Err(damaged(w.hash));
        }
        writer.shutdown().await.map_err(failed)?;
        Ok(())
    }
}

fn damaged(hash: Hash) -> RemoteError {
    RemoteError::Store(velo_store::StoreError::Corrupt {
        kind: "blob",
        hash,
        detail:
            "its bytes do not hash to its name; nothing of it was uploaded (`velo fsck --repair`)"
                .into(),
    })
}

/// A blob's bytes from the store, checked against its hash and size.
fn read_blob(store: &Store, hash: &Hash, size: u64) -> Result<Vec<u8>> {
    if size == 0 && *hash == Hash::of_blob(b"") {
        return Ok(Vec::new());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    store
        .open_blob(hash)?
        .read_to_end(&mut bytes)
        .map_err(|e| RemoteError::Io {
            what: "reading",
            path: store.blob_path(hash).display().to_string(),
            cause: e,
        })?;
    if bytes.len() as u64 != size || Hash::of_blob(&bytes) != *hash {
        return Err(damaged(*hash));
    }
    Ok(bytes)
}
