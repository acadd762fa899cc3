//! Files with holes: copying and hashing that keep them sparse.
//!
//! Why: a file made with `truncate -s 2G` holds a few blocks of data and reads as 2 GiB
//! of zeros. Reading and writing every byte turned it into 2 GiB on disk (and a
//! `truncate -s 1T` would fill the disk). Here holes are found with
//! `lseek(SEEK_DATA/SEEK_HOLE)`: only data extents are read and written, at the same
//! offsets, and the destination is extended to the full length, so it has the same holes.
//! The hash still covers every logical byte (a hole hashes as the zeros it reads as):
//! blob names do not depend on how a file is laid out on disk. Hashing zeros is not free
//! (BLAKE3 mixes each 1 KiB chunk's position into its hash, so equal zero chunks cannot
//! be hashed once and reused): about a second per few GiB of holes, but no disk I/O.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// Read and write in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Zeros hashed in place of a hole, without reading it.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Which side of a copy failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source (or asking it for its holes).
    Read(io::Error),
    /// Writing the destination.
    Write(io::Error),
}

impl From<CopyError> for io::Error {
    fn from(e: CopyError) -> io::Error {
        match e {
            CopyError::Read(e) | CopyError::Write(e) => e,
        }
    }
}

/// Feeds `len` zero bytes to `hasher`.
pub fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// The next data extent of `file` at or after `pos`: `(start, end)`, clamped to `size`;
/// `None` when only a hole remains. A file system that cannot tell reports all data.
fn next_data(file: &File, pos: u64, size: u64) -> Result<Option<(u64, u64)>, CopyError> {
    let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
        Ok(start) if start >= size => return Ok(None),
        Ok(start) => start,
        // ENXIO: no data at or after `pos` (or the file shrank below it).
        Err(Errno::NXIO) => return Ok(None),
        Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(Some((pos, size))),
        Err(e) => return Err(CopyError::Read(e.into())),
    };
    let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
        // A hole at `start` itself means the file changed between the two calls: read on
        // to the end rather than loop.
        Ok(end) if end > start => end.min(size),
        Ok(_) | Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => size,
        Err(e) => return Err(CopyError::Read(e.into())),
    };
    Ok(Some((start, end)))
}

/// Reads `src` from offset 0 up to its size when called, feeding every logical byte to
/// `hasher` (holes as zeros, without reading them) and writing only its data extents into
/// `dst` at the same offsets; `dst` (a new, empty file) is then extended to that size, so
/// it reads as the same bytes and keeps the holes. Returns the size. A file that changes
/// meanwhile gives a mix of versions (callers that care compare `fstat` before and after),
/// but what is hashed is always exactly what `dst` holds.
pub fn copy_sparse(
    src: &File,
    dst: Option<&File>,
    mut hasher: Option<&mut blake3::Hasher>,
) -> Result<u64, CopyError> {
    let size = src.metadata().map_err(CopyError::Read)?.len();
    let mut buf = vec![0u8; CHUNK.min(size as usize)];
    let mut pos = 0u64;
    'extents: while pos < size {
        let Some((start, end)) = next_data(src, pos, size)? else {
            break;
        };
        if let Some(h) = hasher.as_deref_mut() {
            hash_zeros(h, start - pos);
        }
        pos = start;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = match src.read_at(&mut buf[..want], pos) {
                Ok(0) => break 'extents,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Read(e)),
            };
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&buf[..n]);
            }
            if let Some(dst) = dst {
                dst.write_all_at(&buf[..n], pos).map_err(CopyError::Write)?;
            }
            pos += n as u64;
        }
    }
    // The tail is a hole (or the file shrank while it was read: its end reads as zeros
    // here, so what was hashed is still what `dst` holds).
    if let Some(h) = hasher {
        hash_zeros(h, size - pos.min(size));
    }
    if let Some(dst) = dst {
        dst.set_len(size).map_err(CopyError::Write)?;
    }
    Ok(size)
}

/// Whether a file's allocated blocks fall short of its size: it has holes (or, on some
/// file systems, is small enough to live inline; treating such a file as sparse only
/// costs a scan for zero blocks).
pub fn has_holes(st_blocks: u64, st_size: u64) -> bool {
    st_blocks.saturating_mul(512) < st_size
}

/// Writes `data` into the new, empty file `dst`, leaving every all-zero 4 KiB block as a
/// hole: for the bytes of a sparse source that were read into memory.
pub fn write_skipping_zeros(dst: &File, data: &[u8]) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let mut run_start = None;
    let mut offset = 0;
    for block in data.chunks(BLOCK) {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(offset),
            (true, Some(start)) => {
                dst.write_all_at(&data[start..offset], start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        offset += block.len();
    }
    if let Some(start) = run_start {
        dst.write_all_at(&data[start..], start as u64)?;
    }
    dst.set_len(data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sparse_file(dir: &std::path::Path, size: u64, data: &[(u64, &[u8])]) -> File {
        let path = dir.join("src");
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        for (offset, bytes) in data {
            file.write_all_at(bytes, *offset).unwrap();
        }
        File::open(&path).unwrap()
    }

    fn logical(size: u64, data: &[(u64, &[u8])]) -> Vec<u8> {
        let mut v = vec![0u8; size as usize];
        for (offset, bytes) in data {
            v[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
        }
        v
    }

    #[test]
    fn copies_data_extents_keeps_holes_and_hashes_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 << 20;
        let data: &[(u64, &[u8])] = &[(0, b"head"), (20 << 20, b"middle"), (size - 3, b"end")];
        let src = sparse_file(dir.path(), size, data);
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("dst"))
            .unwrap();
        let mut hasher = blake3::Hasher::new();
        assert_eq!(
            copy_sparse(&src, Some(&dst), Some(&mut hasher)).unwrap(),
            size
        );
        let want = logical(size, data);
        assert_eq!(hasher.finalize(), blake3::hash(&want));
        assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), want);
        let meta = dst.metadata().unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    }

    #[test]
    fn a_file_that_is_all_hole_or_all_data_copies_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for (size, data) in [
            (0u64, &[][..]),
            (10 << 20, &[][..]),
            (5, &[(0u64, &b"abcde"[..])][..]),
        ] {
            let _ = std::fs::remove_file(dir.path().join("src"));
            let src = sparse_file(dir.path(), size, data);
            let dst = tempfile::tempfile_in(dir.path()).unwrap();
            let mut hasher = blake3::Hasher::new();
            assert_eq!(
                copy_sparse(&src, Some(&dst), Some(&mut hasher)).unwrap(),
                size
            );
            assert_eq!(hasher.finalize(), blake3::hash(&logical(size, data)));
            assert_eq!(dst.metadata().unwrap().len(), size);
        }
    }

    #[test]
    fn writing_from_memory_skips_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 4 << 20];
        data[5000] = 1;
        data[(4 << 20) - 1] = 2;
        let path = dir.path().join("out");
        let dst = File::create(&path).unwrap();
        write_skipping_zeros(&dst, &data).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(dst.metadata().unwrap().blocks() * 512 <= 64 << 10);
    }
}
