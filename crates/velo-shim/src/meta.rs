//! What `stat` and `statx` report for a tree node: the tree's metadata, the view's
//! device, an inode number per node, and the user who runs the program as owner; a
//! directory the command changed shows its upper copy's mode, owner and times.

use velo_view::{Kind, Node};

use crate::config::Config;

fn type_bits(node: &Node) -> u32 {
    match node.kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
    }
}

fn split(ns: i64) -> (i64, i64) {
    (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Fills `out` with `node`'s metadata.
pub fn fill_stat(config: &Config, node: &Node, out: &mut libc::stat) {
    let (secs, nsec) = split(node.mtime_ns);
    out.st_dev = config.view.device();
    out.st_ino = u64::from(node.index) + 1;
    out.st_nlink = if node.kind == Kind::Dir { 2 } else { 1 };
    out.st_mode = type_bits(node) | (node.mode & 0o7777);
    out.st_uid = config.uid;
    out.st_gid = config.gid;
    out.st_rdev = 0;
    out.st_size = node.size as i64;
    out.st_blksize = 4096;
    out.st_blocks = node.size.div_ceil(512) as i64;
    out.st_atime = secs;
    out.st_atime_nsec = nsec;
    out.st_mtime = secs;
    out.st_mtime_nsec = nsec;
    out.st_ctime = secs;
    out.st_ctime_nsec = nsec;
    if let Some(copy) = crate::upper::dir_copy(config, node) {
        out.st_mode = libc::S_IFDIR | (copy.st_mode & 0o7777);
        out.st_uid = copy.st_uid;
        out.st_gid = copy.st_gid;
        out.st_atime = copy.st_atime;
        out.st_atime_nsec = copy.st_atime_nsec as i64;
        out.st_mtime = copy.st_mtime;
        out.st_mtime_nsec = copy.st_mtime_nsec as i64;
        out.st_ctime = copy.st_ctime;
        out.st_ctime_nsec = copy.st_ctime_nsec as i64;
    }
}

/// Fills `out` with `node`'s metadata, as `statx` reports it.
pub fn fill_statx(config: &Config, node: &Node, out: &mut libc::statx) {
    let (secs, nsec) = split(node.mtime_ns);
    // SAFETY: statx_timestamp is plain integers; all-zero is a valid value.
    let mut time: libc::statx_timestamp = unsafe { core::mem::zeroed() };
    time.tv_sec = secs;
    time.tv_nsec = nsec as u32;
    let device = config.view.device();
    out.stx_mask = libc::STATX_BASIC_STATS;
    out.stx_blksize = 4096;
    out.stx_attributes = 0;
    out.stx_nlink = if node.kind == Kind::Dir { 2 } else { 1 };
    out.stx_uid = config.uid;
    out.stx_gid = config.gid;
    out.stx_mode = (type_bits(node) | (node.mode & 0o7777)) as u16;
    out.stx_ino = u64::from(node.index) + 1;
    out.stx_size = node.size;
    out.stx_blocks = node.size.div_ceil(512);
    out.stx_attributes_mask = 0;
    out.stx_atime = time;
    out.stx_btime = time;
    out.stx_ctime = time;
    out.stx_mtime = time;
    out.stx_rdev_major = 0;
    out.stx_rdev_minor = 0;
    out.stx_dev_major = libc::major(device);
    out.stx_dev_minor = libc::minor(device);
    if let Some(copy) = crate::upper::dir_copy(config, node) {
        let at = |secs: i64, nsec: u64| {
            // SAFETY: statx_timestamp is plain integers; all-zero is a valid value.
            let mut t: libc::statx_timestamp = unsafe { core::mem::zeroed() };
            t.tv_sec = secs;
            t.tv_nsec = nsec as u32;
            t
        };
        out.stx_mode = (libc::S_IFDIR | (copy.st_mode & 0o7777)) as u16;
        out.stx_uid = copy.st_uid;
        out.stx_gid = copy.st_gid;
        out.stx_atime = at(copy.st_atime, copy.st_atime_nsec);
        out.stx_mtime = at(copy.st_mtime, copy.st_mtime_nsec);
        out.stx_ctime = at(copy.st_ctime, copy.st_ctime_nsec);
    }
}

/// Copies a kernel `stat` (as rustix returns it) into libc's.
pub fn from_kernel(st: &rustix::fs::Stat, out: &mut libc::stat) {
    out.st_dev = st.st_dev;
    out.st_ino = st.st_ino;
    out.st_nlink = st.st_nlink;
    out.st_mode = st.st_mode;
    out.st_uid = st.st_uid;
    out.st_gid = st.st_gid;
    out.st_rdev = st.st_rdev;
    out.st_size = st.st_size;
    out.st_blksize = st.st_blksize;
    out.st_blocks = st.st_blocks;
    out.st_atime = st.st_atime;
    out.st_atime_nsec = st.st_atime_nsec as i64;
    out.st_mtime = st.st_mtime;
    out.st_mtime_nsec = st.st_mtime_nsec as i64;
    out.st_ctime = st.st_ctime;
    out.st_ctime_nsec = st.st_ctime_nsec as i64;
}
