//! The import cache: a `.velo` file that was verified and imported once, and has not
//! changed since, is not read again.
//!
//! `velo run --manifest app.velo` names its layer by a file, and reading, verifying and
//! importing that file on every run cost more than the rest of the start-up. So each
//! successful full import remembers (device, inode, size, mtime, ctime) of the file it
//! read → the root it registered, in `cache/import-<dev>-<ino>` (one small file per
//! `.velo`, replaced atomically, so concurrent runs never merge entries).
//!
//! A hit is trusted only while everything that made the first import's result safe to use
//! still holds: the same store (its id), no gc deleted anything since (gc generation), the
//! root record written by that import still registers that root and is not partial (a
//! registered root keeps its objects through any gc, and `velo forget` removes the record),
//! and the root tree is present. Anything else, including a damaged or foreign entry, is a
//! miss and the file is imported normally: the cache can cost a verification, never a
//! wrong tree. Entries of files changed within the last two seconds are not written, as
//! for the stat cache: a later change within the same timestamp tick would go unseen.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use velo_core::Hash;

use crate::Store;

const MAGIC: &[u8; 8] = b"VIMPC01\n";
/// Files whose ctime is younger than this are not remembered (see the module comment).
const RACY_NS: i128 = 2_000_000_000;

/// The identity of one version of a file, as the stat cache keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileKey {
    pub(crate) fn of(meta: &fs::Metadata) -> FileKey {
        let ns = velo_core::time_ns;
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Changed so recently that a further change could keep the same timestamps.
    fn is_racy(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        now - i128::from(self.ctime_ns.max(self.mtime_ns)) < RACY_NS
    }
}

/// One remembered import.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    store_id: String,
    gc_generation: u64,
    key: FileKey,
    root: Hash,
    /// The name the root record was registered under (`None`: the unnamed `@<root>`).
    record: Option<String>,
}

fn entry_path(store: &Store, key: &FileKey) -> PathBuf {
    store
        .cache_dir()
        .join(format!("import-{:x}-{:x}", key.dev, key.ino))
}

fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(MAGIC);
    let mut bytes = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    bytes(entry.store_id.as_bytes());
    bytes(entry.record.as_deref().unwrap_or("").as_bytes());
    let k = &entry.key;
    for v in [
        entry.gc_generation,
        k.dev,
        k.ino,
        k.size,
        k.mtime_ns as u64,
        k.ctime_ns as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&entry.root.0);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Reads an entry field by field; every read is bounds-checked.
struct Cursor<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let s = self.body.get(self.pos..self.pos.checked_add(len)?)?;
        self.pos += len;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.u64()?).ok()?;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// `None` for anything but a complete entry with a matching checksum.
fn decode(bytes: &[u8]) -> Option<Entry> {
    let body = bytes.get(..bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != &bytes[body.len()..] || body.get(..8)? != MAGIC {
        return None;
    }
    let mut c = Cursor { body, pos: 8 };
    let store_id = c.string()?;
    let name = c.string()?;
    let mut fields = [0u64; 6];
    for f in &mut fields {
        *f = c.u64()?;
    }
    let root = Hash(c.take(32)?.try_into().ok()?);
    if c.pos != body.len() {
        return None;
    }
    Some(Entry {
        store_id,
        gc_generation: fields[0],
        key: FileKey {
            dev: fields[1],
            ino: fields[2],
            size: fields[3],
            mtime_ns: fields[4] as i64,
            ctime_ns: fields[5] as i64,
        },
        root,
        record: (!name.is_empty()).then_some(name),
    })
}

/// The root `path` was imported to, if the cache vouches that the file is unchanged and
/// its import is still registered and complete; `want_name` (an import asked to register
/// a name) must be the name that import registered.
pub(crate) fn lookup(store: &Store, path: &Path, want_name: Option<&str>) -> Option<Hash> {
    let meta = fs::metadata(path).ok().filter(|m| m.is_file())?;
    let key = FileKey::of(&meta);
    let cache = entry_path(store, &key);
    let bytes = fs::read(&cache).ok()?;
    let Some(entry) = decode(&bytes) else {
        tracing::warn!(path = %cache.display(), "ignoring a damaged import cache entry");
        return None;
    };
    let why_not = if entry.key != key {
        "the file changed"
    } else if entry.store_id != store.id() {
        "the entry is from another store"
    } else if entry.gc_generation != store.gc_generation() {
        "gc deleted objects since"
    } else if want_name.is_some() && want_name != entry.record.as_deref() {
        "another name was asked for"
    } else if !store.record_registers(entry.record.as_deref(), &entry.root) {
        "its root record is gone, moved or partial"
    } else if !store.has_tree(&entry.root) {
        "its root tree is missing"
    } else {
        tracing::debug!(
            file = %path.display(),
            root = %entry.root,
            "import cache hit: unchanged since it was verified, not read again"
        );
        return Some(entry.root);
    };
    tracing::debug!(file = %path.display(), why = why_not, "import cache miss");
    None
}

/// Remembers that the version `key` of a file was verified and imported to `root`,
/// registered under `record`. Called under the store's shared lock, so the gc generation
/// read here is the one the import ran under. Failure only costs speed.
pub(crate) fn remember(store: &Store, key: FileKey, root: Hash, record: Option<&str>) {
    if key.is_racy() {
        tracing::debug!("import cache: the file changed under 2 s ago, not remembered");
        return;
    }
    let entry = Entry {
        store_id: store.id().to_string(),
        gc_generation: store.gc_generation(),
        key,
        root,
        record: record.map(str::to_string),
    };
    let path = entry_path(store, &key);
    let result = crate::replace_file(
        &path,
        &store.cache_dir(),
        &encode(&entry),
        crate::Durability::Cache,
    );
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), error = %e, "could not save the import cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            store_id: "0123abcd".into(),
            gc_generation: 3,
            key: FileKey {
                dev: 66,
                ino: 12345,
                size: 999,
                mtime_ns: 1_700_000_000_123_456_789,
                ctime_ns: -5,
            },
            root: Hash([7; 32]),
            record: Some("app".into()),
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = entry();
        assert_eq!(decode(&encode(&e)), Some(e));
        let unnamed = Entry {
            record: None,
            ..entry()
        };
        assert_eq!(decode(&encode(&unnamed)), Some(unnamed));
    }

    #[test]
    fn any_damage_is_a_miss() {
        let good = encode(&entry());
        for len in 0..good.len() {
            assert_eq!(decode(&good[..len]), None, "truncated to {len}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad), None, "byte {i} flipped");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }
}
