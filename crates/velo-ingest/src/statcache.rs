//! The stat cache: (device, inode, size, mtime, ctime) → content hash, per ingested
//! directory, so that re-ingesting an unchanged tree costs one `stat` per file.
//!
//! The cache is only trusted for the store that wrote it (store id) and only while no gc
//! has deleted anything since (gc generation); otherwise every hit is checked against the
//! store before use, so a recreated or collected store can never yield a tree whose blobs
//! are missing. A blob deleted by hand changes no generation, but it changes the mtime of
//! its shard directory (`blobs/ab/`): the cache records the 256 shard mtimes it was saved
//! with, and a hit whose shard changed since is checked too (256 `stat`s per ingest). Entries of files changed within the last two seconds are not written
//! ("racy" entries: a later change within the same timestamp tick would go unseen).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use velo_core::Hash;
use velo_store::Store;

const MAGIC: &[u8; 8] = b"VSTATC02";
const SHARDS: usize = 256;
const RECORD: usize = 8 * 5 + 32;

/// What the cache remembers about one file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Cached {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub hash: Hash,
}

pub(crate) struct StatCache {
    path: PathBuf,
    pub entries: HashMap<(u64, u64), Cached>,
    /// Hits must be checked against the store (the store was collected or replaced).
    pub verify_hits: bool,
    /// Blob shards whose directory changed since the cache was saved: their hits are
    /// checked against the store.
    changed_shards: [bool; SHARDS],
}

/// The mtime (ns) of each blob shard directory, 0 for one that does not exist.
fn shard_times(store: &Store) -> [i64; SHARDS] {
    let blobs = store.root().join("blobs");
    let mut times = [0i64; SHARDS];
    for (shard, time) in times.iter_mut().enumerate() {
        if let Ok(st) = rustix::fs::stat(blobs.join(format!("{shard:02x}"))) {
            *time = crate::walk::mtime_ns(&st);
        }
    }
    times
}

impl StatCache {
    /// Loads the cache of `source` (canonical path) for `store`; a missing or damaged
    /// cache is an empty one.
    pub fn load(store: &Store, source: &Path) -> StatCache {
        use std::os::unix::ffi::OsStrExt;
        let key = blake3::hash(source.as_os_str().as_bytes()).to_hex();
        let path = store.cache_dir().join(format!("stat-{}", &key[..32]));
        let mut cache = StatCache {
            path,
            entries: HashMap::new(),
            verify_hits: false,
            changed_shards: [false; SHARDS],
        };
        let Ok(bytes) = fs::read(&cache.path) else {
            return cache;
        };
        match parse(&bytes, store) {
            Some((entries, trusted, saved_times)) => {
                cache.entries = entries;
                cache.verify_hits = !trusted;
                let now = shard_times(store);
                for shard in 0..SHARDS {
                    cache.changed_shards[shard] = now[shard] != saved_times[shard];
                }
            }
            None => tracing::warn!(path = %cache.path.display(), "ignoring a damaged stat cache"),
        }
        cache
    }

    /// Whether some blob shard changed since the cache was saved (then it is saved again,
    /// with the shard times it was checked against).
    pub fn shards_changed(&self) -> bool {
        self.changed_shards.iter().any(|&c| c)
    }

    /// Whether a hit for `hash` must be checked against the store before use.
    pub fn must_verify(&self, hash: &Hash) -> bool {
        self.verify_hits || self.changed_shards[usize::from(hash.0[0])]
    }

    /// Replaces the cache file with `entries` (atomically; failure only costs speed).
    pub fn save(&self, store: &Store, entries: &HashMap<(u64, u64), Cached>) {
        let id = store.id().as_bytes();
        let mut out = Vec::with_capacity(64 + entries.len() * RECORD);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(id.len() as u64).to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&store.gc_generation().to_le_bytes());
        for time in shard_times(store) {
            out.extend_from_slice(&time.to_le_bytes());
        }
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for ((dev, ino), c) in entries {
            for v in [*dev, *ino, c.size, c.mtime_ns as u64, c.ctime_ns as u64] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&c.hash.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        // Someone may have removed cache/ by hand: make it again rather than warn forever.
        let dir = store.cache_dir();
        let _ = fs::create_dir_all(&dir);
        let result =
            velo_store::replace_file(&self.path, &dir, &out, velo_store::Durability::Cache);
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "could not save the stat cache");
        }
    }
}

type Entries = HashMap<(u64, u64), Cached>;

/// Returns the entries, whether they may be trusted without checking the store, and the
/// blob shard mtimes the cache was saved with.
fn parse(bytes: &[u8], store: &Store) -> Option<(Entries, bool, [i64; SHARDS])> {
    let body = bytes.get(..bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != &bytes[body.len()..] || body.get(..8)? != MAGIC {
        return None;
    }
    let u64_at = |pos: usize| -> Option<u64> {
        Some(u64::from_le_bytes(body.get(pos..pos + 8)?.try_into().ok()?))
    };
    let id_len = usize::try_from(u64_at(8)?).ok()?;
    let id = body.get(16..16usize.checked_add(id_len)?)?;
    let mut pos = 16 + id_len;
    let generation = u64_at(pos)?;
    pos += 8;
    let mut saved_times = [0i64; SHARDS];
    for time in saved_times.iter_mut() {
        *time = u64_at(pos)? as i64;
        pos += 8;
    }
    let count = usize::try_from(u64_at(pos)?).ok()?;
    pos += 8;
    if body.len().checked_sub(pos)? != count.checked_mul(RECORD)? {
        return None;
    }
    let mut entries = HashMap::with_capacity(count);
    for record in body[pos..].chunks_exact(RECORD) {
        let v =
            |i: usize| u64::from_le_bytes(record[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let hash = Hash(record[40..72].try_into().expect("32 bytes"));
        entries.insert(
            (v(0), v(1)),
            Cached {
                size: v(2),
                mtime_ns: v(3) as i64,
                ctime_ns: v(4) as i64,
                hash,
            },
        );
    }
    let trusted = id == store.id().as_bytes() && generation == store.gc_generation();
    Some((entries, trusted, saved_times))
}
