//! Reading the extended attributes a tree keeps (see velo-core's `Xattrs`) from a file,
//! for ingest and for commits of an upper.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;

use velo_core::{is_kept_xattr, Xattrs};

/// Calls `get` with a growing buffer until the value fits.
fn sized(
    mut get: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match get(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < (1 << 20) => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The attributes a tree keeps of the entry `name` of directory `dir`, not following a
/// symlink. A file system without extended attributes has none.
pub fn read_xattrs(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<Xattrs> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    let path = OsString::from_vec(path);
    let names = match sized(|buf| rustix::fs::llistxattr(&path, buf)) {
        Ok(names) => names,
        Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::NODATA) => return Ok(Xattrs::default()),
        Err(e) => return Err(e.into()),
    };
    let mut pairs = Vec::new();
    for attr in names.split(|&b| b == 0).filter(|n| is_kept_xattr(n)) {
        match sized(|buf| rustix::fs::lgetxattr(&path, attr, buf)) {
            Ok(value) => pairs.push((attr.to_vec(), value)),
            // Removed since it was listed.
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Xattrs::new(pairs).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
