//! The `.velo` manifest: a root hash, every tree object it reaches and optionally the blobs.
//!
//! Layout, version 1 (all integers little-endian; see docs/FORMAT.md):
//! ```text
//! magic "VELO\0\r\n\x1a" · u32 version=1 · u32 flags (bit 0: blobs included)
//! root[32] · u64 tree_count · tree_count × (hash[32] · u32 len · tree object)
//! u64 blob_count · blob_count × (hash[32] · u64 size · bytes)
//! checksum[32] = BLAKE3 of every byte before it
//! ```
//! Trees and blobs are each strictly ascending by hash, so one tree always gives the same
//! file. The reader verifies every object against its hash, that the root reaches exactly
//! the trees listed, that every blob is referenced with its size, and the checksum; blob
//! contents are streamed so a manifest with gigabytes of blobs needs no memory for them.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};

use crate::{DecodeError, EntryKind, Hash, Tree};

/// The first eight bytes of every `.velo` file.
pub const MAGIC: [u8; 8] = *b"VELO\0\r\n\x1a";
/// The manifest format version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Flag: the blob section holds blob contents.
pub const FLAG_BLOBS: u32 = 1;
/// Largest tree object accepted (a directory of ~500k entries).
pub const MAX_TREE_OBJECT: u32 = 64 << 20;

/// Writes a manifest: header and trees at construction, then each blob, then [`finish`].
///
/// [`finish`]: ManifestWriter::finish
pub struct ManifestWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    blobs_left: u64,
    last_blob: Option<Hash>,
}

impl<W: Write> ManifestWriter<W> {
    /// Writes the header, the trees (sorted here) and the number of blobs to follow.
    pub fn new(
        out: W,
        root: Hash,
        trees: &mut [(Hash, Vec<u8>)],
        blob_count: Option<u64>,
    ) -> io::Result<Self> {
        trees.sort_unstable_by_key(|t| t.0);
        let mut w = ManifestWriter {
            out,
            hasher: blake3::Hasher::new(),
            blobs_left: blob_count.unwrap_or(0),
            last_blob: None,
        };
        w.put(&MAGIC)?;
        w.put(&MANIFEST_VERSION.to_le_bytes())?;
        let flags = if blob_count.is_some() { FLAG_BLOBS } else { 0 };
        w.put(&flags.to_le_bytes())?;
        w.put(&root.0)?;
        w.put(&(trees.len() as u64).to_le_bytes())?;
        for (hash, bytes) in trees.iter() {
            let len = u32::try_from(bytes.len())
                .ok()
                .filter(|&l| l <= MAX_TREE_OBJECT)
                .ok_or_else(|| io::Error::other(format!("tree {hash} is too large to export")))?;
            w.put(&hash.0)?;
            w.put(&len.to_le_bytes())?;
            w.put(bytes)?;
        }
        w.put(&blob_count.unwrap_or(0).to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)
    }

    /// Appends one blob; blobs must come in ascending hash order, `size` bytes each.
    pub fn blob(&mut self, hash: Hash, size: u64, content: &mut dyn Read) -> io::Result<()> {
        if self.blobs_left == 0 || self.last_blob.is_some_and(|l| l >= hash) {
            return Err(io::Error::other(
                "manifest blobs written out of order or too many",
            ));
        }
        self.blobs_left -= 1;
        self.last_blob = Some(hash);
        self.put(&hash.0)?;
        self.put(&size.to_le_bytes())?;
        let mut buf = vec![0u8; 256 << 10];
        let mut left = size;
        let mut check = blake3::Hasher::new();
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = content.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::other(format!(
                    "blob {hash} is shorter than its {size} bytes"
                )));
            }
            check.update(&buf[..n]);
            self.put(&buf[..n])?;
            left -= n as u64;
        }
        if Hash::from(check.finalize()) != hash {
            return Err(io::Error::other(format!(
                "blob {hash} in the store does not match its hash; run velo fsck"
            )));
        }
        Ok(())
    }

    /// Writes the checksum and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.blobs_left != 0 {
            return Err(io::Error::other("fewer blobs written than announced"));
        }
        let sum = self.hasher.finalize();
        self.out.write_all(sum.as_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> HashingReader<R> {
    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
        read_exact(&mut self.inner, buf, what)?;
        self.hasher.update(buf);
        Ok(())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn hash(&mut self, what: &'static str) -> Result<Hash, DecodeError> {
        let mut b = [0u8; 32];
        self.exact(&mut b, what)?;
        Ok(Hash(b))
    }
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => DecodeError::Truncated { what },
        _ => DecodeError::Io(e.to_string()),
    })
}

/// Why reading one blob of a manifest failed: the manifest is bad, or the sink failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobReadError {
    /// The manifest is invalid.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Writing the content to the caller's sink failed (e.g. a full disk).
    #[error("writing blob content: {0}")]
    Sink(io::Error),
}

/// A manifest whose header and trees have been read and fully validated; blobs follow.
pub struct ManifestReader<R: Read> {
    input: HashingReader<R>,
    root: Hash,
    trees: HashMap<Hash, Tree>,
    blob_sizes: HashMap<Hash, u64>,
    has_blobs: bool,
    blobs_left: u64,
    last_blob: Option<Hash>,
}

impl<R: Read> ManifestReader<R> {
    /// Reads and validates the header and every tree. Fails on the first problem.
    pub fn open(inner: R) -> Result<Self, DecodeError> {
        let mut input = HashingReader {
            inner,
            hasher: blake3::Hasher::new(),
        };
        let mut magic = [0u8; 8];
        input.exact(&mut magic, "magic").map_err(|e| match e {
            DecodeError::Truncated { .. } => DecodeError::BadMagic,
            other => other,
        })?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = input.u32("version")?;
        if version != MANIFEST_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: ".velo manifest",
                found: u64::from(version),
                supported: u64::from(MANIFEST_VERSION),
            });
        }
        let flags = input.u32("flags")?;
        if flags & !FLAG_BLOBS != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        let root = input.hash("root hash")?;
        let tree_count = input.u64("tree count")?;
        let mut trees = HashMap::with_capacity(tree_count.min(1 << 16) as usize);
        let mut last: Option<Hash> = None;
        let mut buf = Vec::new();
        for _ in 0..tree_count {
            let hash = input.hash("tree hash")?;
            if last.is_some_and(|l| l >= hash) {
                return Err(DecodeError::ObjectOrder { what: "tree", hash });
            }
            last = Some(hash);
            let len = input.u32("tree length")?;
            if len > MAX_TREE_OBJECT {
                return Err(DecodeError::TooLarge {
                    what: "tree object length",
                    value: u64::from(len),
                    limit: u64::from(MAX_TREE_OBJECT),
                });
            }
            buf.resize(len as usize, 0);
            input.exact(&mut buf, "tree object")?;
            let actual = Hash::of_tree_encoding(&buf);
            if actual != hash {
                return Err(DecodeError::HashMismatch {
                    what: "tree",
                    claimed: hash,
                    actual,
                });
            }
            trees.insert(hash, Tree::decode(&buf)?);
        }
        let blob_sizes = check_closure(root, &trees)?;
        let blobs_left = input.u64("blob count")?;
        let has_blobs = flags & FLAG_BLOBS != 0;
        if !has_blobs && blobs_left != 0 {
            return Err(DecodeError::BadBlob {
                hash: root,
                why: "blob section is not empty although the flags say there are no blobs".into(),
            });
        }
        if blobs_left > blob_sizes.len() as u64 {
            return Err(DecodeError::TooLarge {
                what: "blob count",
                value: blobs_left,
                limit: blob_sizes.len() as u64,
            });
        }
        Ok(ManifestReader {
            input,
            root,
            trees,
            blob_sizes,
            has_blobs,
            blobs_left,
            last_blob: None,
        })
    }

    /// The root tree.
    pub fn root(&self) -> Hash {
        self.root
    }

    /// Every tree the root reaches (and nothing else).
    pub fn trees(&self) -> &HashMap<Hash, Tree> {
        &self.trees
    }

    /// Every blob the trees reference, with its size.
    pub fn referenced_blobs(&self) -> &HashMap<Hash, u64> {
        &self.blob_sizes
    }

    /// Whether the manifest carries blob contents.
    pub fn has_blobs(&self) -> bool {
        self.has_blobs
    }

    /// Blobs still to be read.
    pub fn blobs_left(&self) -> u64 {
        self.blobs_left
    }

    /// Streams the next blob's content into `sink` and verifies it against its hash. The
    /// sink has seen unverified bytes when this fails: stage them, and discard on error.
    pub fn next_blob(
        &mut self,
        sink: &mut dyn Write,
    ) -> Result<Option<(Hash, u64)>, BlobReadError> {
        if self.blobs_left == 0 {
            return Ok(None);
        }
        self.blobs_left -= 1;
        let hash = self.input.hash("blob hash")?;
        if self.last_blob.is_some_and(|l| l >= hash) {
            return Err(DecodeError::ObjectOrder { what: "blob", hash }.into());
        }
        self.last_blob = Some(hash);
        let size = self.input.u64("blob size")?;
        match self.blob_sizes.get(&hash) {
            None => {
                return Err(DecodeError::BadBlob {
                    hash,
                    why: "no entry of the tree references it".into(),
                }
                .into())
            }
            Some(&want) if want != size => {
                return Err(DecodeError::BadBlob {
                    hash,
                    why: format!("it holds {size} bytes but the tree says {want}"),
                }
                .into())
            }
            Some(_) => {}
        }
        let mut check = blake3::Hasher::new();
        let mut buf = vec![0u8; (256 << 10).min(size as usize).max(1)];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.input.exact(&mut buf[..n], "blob content")?;
            check.update(&buf[..n]);
            sink.write_all(&buf[..n]).map_err(BlobReadError::Sink)?;
            left -= n as u64;
        }
        let actual = Hash::from(check.finalize());
        if actual != hash {
            return Err(DecodeError::HashMismatch {
                what: "blob",
                claimed: hash,
                actual,
            }
            .into());
        }
        Ok(Some((hash, size)))
    }

    /// Verifies the checksum and that the file ends there. Call after the last blob.
    pub fn finish(mut self) -> Result<(), DecodeError> {
        if self.blobs_left != 0 {
            return Err(DecodeError::Truncated { what: "blobs" });
        }
        let expected = Hash::from(self.input.hasher.finalize());
        let mut sum = [0u8; 32];
        read_exact(&mut self.input.inner, &mut sum, "checksum")?;
        if Hash(sum) != expected {
            return Err(DecodeError::ChecksumMismatch);
        }
        let mut rest = [0u8; 64];
        let extra = self
            .input
            .inner
            .read(&mut rest)
            .map_err(|e| DecodeError::Io(e.to_string()))?;
        if extra != 0 {
            return Err(DecodeError::TrailingBytes(extra));
        }
        Ok(())
    }

    /// Reads and verifies every remaining blob without keeping it.
    pub fn skip_blobs_and_finish(mut self) -> Result<(), DecodeError> {
        while self
            .next_blob(&mut io::sink())
            .map_err(|e| match e {
                BlobReadError::Decode(d) => d,
                BlobReadError::Sink(s) => DecodeError::Io(s.to_string()),
            })?
            .is_some()
        {}
        self.finish()
    }
}

/// Checks that `root` reaches exactly the trees given, and collects referenced blob sizes.
fn check_closure(
    root: Hash,
    trees: &HashMap<Hash, Tree>,
) -> Result<HashMap<Hash, u64>, DecodeError> {
    let mut blobs: HashMap<Hash, u64> = HashMap::new();
    let mut seen: HashSet<Hash> = HashSet::with_capacity(trees.len());
    let mut stack = vec![root];
    seen.insert(root);
    while let Some(hash) = stack.pop() {
        let tree = trees.get(&hash).ok_or(DecodeError::MissingTree(hash))?;
        for entry in tree.entries() {
            match &entry.kind {
                EntryKind::Dir { hash } => {
                    if seen.insert(*hash) {
                        stack.push(*hash);
                    }
                }
                EntryKind::File { hash, size } => {
                    if let Some(prev) = blobs.insert(*hash, *size) {
                        if prev != *size {
                            return Err(DecodeError::BadBlob {
                                hash: *hash,
                                why: format!("entries give it two sizes, {prev} and {size}"),
                            });
                        }
                    }
                }
                EntryKind::Symlink { .. } => {}
            }
        }
    }
    if let Some(extra) = trees.keys().find(|h| !seen.contains(h)) {
        return Err(DecodeError::UnreachableTree(*extra));
    }
    let depth =
        crate::tree::depth(root, |hash| trees.get(hash)).ok_or(DecodeError::MissingTree(root))?;
    if depth > crate::MAX_DEPTH {
        return Err(DecodeError::TooLarge {
            what: "tree depth",
            value: depth as u64,
            limit: crate::MAX_DEPTH as u64,
        });
    }
    Ok(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Entry, Mode, Name};

    type Objects = Vec<(Hash, Vec<u8>)>;

    fn sample() -> (Hash, Objects, Objects) {
        let content = b"hello world".to_vec();
        let blob = Hash::of_blob(&content);
        let file = |name: &str| Entry {
            xattrs: Default::default(),
            name: Name::try_from(name).unwrap(),
            mode: Mode::new(0o644).unwrap(),
            mtime_ns: 5,
            kind: EntryKind::File {
                hash: blob,
                size: content.len() as u64,
            },
        };
        let child = Tree::new(vec![file("inner")]).unwrap();
        let (child_bytes, child_hash) = child.encode_with_hash();
        let root = Tree::new(vec![
            file("top"),
            Entry {
                xattrs: Default::default(),
                name: Name::try_from("sub").unwrap(),
                mode: Mode::new(0o755).unwrap(),
                mtime_ns: 6,
                kind: EntryKind::Dir { hash: child_hash },
            },
        ])
        .unwrap();
        let (root_bytes, root_hash) = root.encode_with_hash();
        (
            root_hash,
            vec![(root_hash, root_bytes), (child_hash, child_bytes)],
            vec![(blob, content)],
        )
    }

    fn write(with_blobs: bool) -> Vec<u8> {
        let (root, mut trees, blobs) = sample();
        let count = with_blobs.then_some(blobs.len() as u64);
        let mut w = ManifestWriter::new(Vec::new(), root, &mut trees, count).unwrap();
        if with_blobs {
            for (h, b) in &blobs {
                w.blob(*h, b.len() as u64, &mut &b[..]).unwrap();
            }
        }
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut r = ManifestReader::open(bytes).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        loop {
            let mut sink = Vec::new();
            match r.next_blob(&mut sink).map_err(|e| e.to_string())? {
                Some(_) => out.push(sink),
                None => break,
            }
        }
        r.finish().map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn round_trip_with_and_without_blobs() {
        assert_eq!(read_all(&write(false)).unwrap().len(), 0);
        assert_eq!(
            read_all(&write(true)).unwrap(),
            vec![b"hello world".to_vec()]
        );
        assert_eq!(
            write(true),
            write(true),
            "manifest bytes must be deterministic"
        );
    }

    #[test]
    fn every_truncation_and_every_single_bit_flip_is_rejected() {
        let good = write(true);
        for cut in 0..good.len() {
            assert!(
                read_all(&good[..cut]).is_err(),
                "truncation at {cut} accepted"
            );
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    read_all(&bad).is_err(),
                    "flip of bit {bit} in byte {i} accepted"
                );
            }
        }
    }

    #[test]
    fn unknown_version_is_named_in_the_error() {
        let mut bad = write(false);
        bad[8] = 9;
        let err = read_all(&bad).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
    }
}
