//! Batched insertion: a command that writes many objects stages them under their final
//! names in a private directory of `tmp/`, flushes once, and only then moves them into
//! `blobs/` and `trees/`.
//!
//! Why: an object must never be visible under its name before its bytes are durable — a
//! power cut after a link but before the data reached the disk would leave a blob whose
//! content does not match its name. Staging gives that without one fsync per object, and it
//! is cheaper than a link per object: into a store that lacks a shard directory, the whole
//! staged shard is moved with one `rename` (a first ingest moves up to 512 directories: 256
//! blob shards and 256 tree shards, not
//! 80,000 files). Where the shard exists, files move one by one with
//! `renameat2(RENAME_NOREPLACE)`; an object already there is simply dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, Mode as FsMode, OFlags, RenameFlags, CWD};
use rustix::io::Errno;
use velo_core::Hash;

use crate::objects::{BlobForm, ObjectKind};
use crate::{Result, Staged, Store, StoreError};

/// Objects staged for one command; dropped unpublished, they vanish.
pub struct Batch<'s> {
    store: &'s Store,
    dir: PathBuf,
    dir_fd: OwnedFd,
    shards: Mutex<HashMap<(ObjectKind, u8), Arc<OwnedFd>>>,
    chmod_needed: bool,
}

fn shard_name(kind: ObjectKind, byte: u8) -> String {
    let prefix = if kind == ObjectKind::Blob { 'b' } else { 't' };
    format!("{prefix}-{byte:02x}")
}

/// Whether the process umask would strip read bits from a 0444 file (then an explicit
/// chmod is needed after creation). Read from /proc, never by setting the umask.
fn umask_strips_read_bits() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string()))
        })
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .is_none_or(|mask| mask & 0o444 != 0)
}

impl Store {
    /// Starts a batch. The caller holds the shared store lock until it has published.
    pub fn begin_batch(&self) -> Result<Batch<'_>> {
        let n = self
            .temp_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("batch-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).map_err(StoreError::io("creating", &dir))?;
        let dir_fd = rustix::fs::open(
            &dir,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            FsMode::empty(),
        )
        .map_err(|e| StoreError::io("opening", &dir)(e.into()))?;
        Ok(Batch {
            store: self,
            dir,
            dir_fd,
            shards: Mutex::new(HashMap::new()),
            chmod_needed: umask_strips_read_bits(),
        })
    }
}

impl Batch<'_> {
    fn shard(&self, kind: ObjectKind, byte: u8) -> Result<Arc<OwnedFd>> {
        let mut shards = self.shards.lock().expect("no panics hold this lock");
        if let Some(fd) = shards.get(&(kind, byte)) {
            return Ok(fd.clone());
        }
        let name = shard_name(kind, byte);
        match rustix::fs::mkdirat(&self.dir_fd, name.as_str(), FsMode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(StoreError::io("creating", self.dir.join(&name))(e.into())),
        }
        let fd = rustix::fs::openat(
            &self.dir_fd,
            name.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            FsMode::empty(),
        )
        .map_err(|e| StoreError::io("opening", self.dir.join(&name))(e.into()))?;
        let fd = Arc::new(fd);
        shards.insert((kind, byte), fd.clone());
        Ok(fd)
    }

    /// Creates `name` (`O_EXCL`) in the shard of `hash`, fills it and gives it `form`
    /// (else 0444 and the time of writing); false if it exists. A failed fill leaves
    /// nothing behind.
    fn create_named(
        &self,
        kind: ObjectKind,
        hash: &Hash,
        name: String,
        form: Option<BlobForm>,
        fill: &mut dyn FnMut(&mut File) -> io::Result<()>,
    ) -> Result<bool> {
        let mode = form.map_or(0o444, |f| f.mode);
        let shard = self.shard(kind, hash.0[0])?;
        let fd = match rustix::fs::openat(
            &*shard,
            name.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            FsMode::from_raw_mode(mode),
        ) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => return Ok(false),
            Err(e) => return Err(StoreError::io("staging", self.dir.join(&name))(e.into())),
        };
        let mut file = File::from(fd);
        let mut result = fill(&mut file).map_err(StoreError::io("staging", self.dir.join(&name)));
        // The umask may have taken bits of `mode` (read bits are checked once per batch).
        if result.is_ok() && (self.chmod_needed || mode != 0o444) {
            result = rustix::fs::fchmod(&file, FsMode::from_raw_mode(mode))
                .map_err(|e| StoreError::io("staging", self.dir.join(&name))(e.into()));
        }
        if let (Ok(()), Some(form)) = (&result, form) {
            result = rustix::fs::futimens(&file, &form.timestamps())
                .map_err(|e| StoreError::io("staging", self.dir.join(&name))(e.into()));
        }
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(&*shard, name.as_str(), AtFlags::empty());
            return Err(e);
        }
        Ok(true)
    }

    /// Stages blob `hash`, written by `fill` (which must write exactly the bytes that hash
    /// to it), in `form` (from [`BlobForm::canonical`] of the file it comes from; `None`:
    /// 0444 and the time of writing). Returns false, without calling `fill`, if this batch
    /// already holds it.
    pub fn insert_blob(
        &self,
        hash: &Hash,
        form: Option<BlobForm>,
        fill: &mut dyn FnMut(&mut File) -> io::Result<()>,
    ) -> Result<bool> {
        self.create_named(ObjectKind::Blob, hash, hash.to_hex(), form, fill)
    }

    /// Stages a filled staged file (an O_TMPFILE) as blob `hash`, in `form` as for
    /// [`Batch::insert_blob`].
    pub fn insert_staged_blob(
        &self,
        staged: Staged<'_>,
        hash: &Hash,
        form: Option<BlobForm>,
    ) -> Result<bool> {
        let shard = self.shard(ObjectKind::Blob, hash.0[0])?;
        let hex = hash.to_hex();
        rustix::fs::fchmod(
            staged.file_ref(),
            FsMode::from_raw_mode(form.map_or(0o444, |f| f.mode)),
        )
        .map_err(|e| StoreError::io("staging", self.dir.join(&hex))(e.into()))?;
        if let Some(form) = form {
            rustix::fs::futimens(staged.file_ref(), &form.timestamps())
                .map_err(|e| StoreError::io("staging", self.dir.join(&hex))(e.into()))?;
        }
        let linked = match staged.temp_name() {
            Some(name) => rustix::fs::linkat(
                self.store.tmp_fd(),
                name,
                &*shard,
                hex.as_str(),
                AtFlags::empty(),
            ),
            None => {
                let proc_path = format!("/proc/self/fd/{}", staged.file_ref().as_raw_fd());
                rustix::fs::linkat(
                    CWD,
                    proc_path.as_str(),
                    &*shard,
                    hex.as_str(),
                    AtFlags::SYMLINK_FOLLOW,
                )
            }
        };
        match linked {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(StoreError::io("staging", self.dir.join(&hex))(e.into())),
        }
    }

    /// Stages the variant of stored blob `hash` in `form`: a separate inode with the
    /// blob's bytes (a clone where the file system can, else a copy), published as
    /// `blobs/ab/<hash>.<mode>.<mtime_ns>`. Returns the staged path, which callers may
    /// hard-link at once, and whether this call made it (false: this batch already had
    /// it).
    pub fn stage_variant(&self, hash: &Hash, form: &BlobForm) -> Result<(PathBuf, bool)> {
        let name = format!("{}{}", hash.to_hex(), form.suffix());
        let path = self
            .dir
            .join(shard_name(ObjectKind::Blob, hash.0[0]))
            .join(&name);
        let source = self.store.open_blob(hash)?;
        // false: another thread of this command made it (or is filling it: a link shares
        // the inode, whose bytes are complete before the command ends).
        let made = self.create_named(ObjectKind::Blob, hash, name, Some(*form), &mut |dest| {
            if rustix::fs::ioctl_ficlone(&*dest, &source).is_err() {
                // A clone keeps holes; so must the copy (a sparse blob stays sparse).
                crate::sparse::copy_sparse(&source, Some(dest), None)?;
            }
            Ok(())
        })?;
        Ok((path, made))
    }

    /// Whether nothing was staged (publishing would do nothing).
    pub fn is_empty(&self) -> bool {
        self.shards
            .lock()
            .expect("no panics hold this lock")
            .is_empty()
    }

    /// Stages an encoded tree whose hash the caller computed.
    pub fn insert_tree(&self, hash: &Hash, bytes: &[u8]) -> Result<bool> {
        self.create_named(ObjectKind::Tree, hash, hash.to_hex(), None, &mut |f| {
            io::Write::write_all(f, bytes)
        })
    }

    /// Moves every staged object into the store. Call after the data is durable (or when
    /// durability was waived); the moves are made durable here.
    pub fn publish(self) -> Result<()> {
        let shards: Vec<(ObjectKind, u8)> = self
            .shards
            .lock()
            .expect("no panics hold this lock")
            .keys()
            .copied()
            .collect();
        for (kind, byte) in shards {
            let name = shard_name(kind, byte);
            let target = format!("{byte:02x}");
            let base = self.store.dir(kind);
            match rustix::fs::renameat_with(
                &self.dir_fd,
                name.as_str(),
                base,
                target.as_str(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => continue,
                Err(Errno::EXIST | Errno::NOTEMPTY) => {}
                Err(e) => return Err(StoreError::io("publishing", self.dir.join(&name))(e.into())),
            }
            // The shard exists in the store: move file by file.
            let staged_dir = self.dir.join(&name);
            let dest = rustix::fs::openat(
                base,
                target.as_str(),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                FsMode::empty(),
            )
            .map_err(|e| StoreError::io("opening shard", &staged_dir)(e.into()))?;
            let source = self.shard(kind, byte)?;
            for entry in
                std::fs::read_dir(&staged_dir).map_err(StoreError::io("listing", &staged_dir))?
            {
                let entry = entry.map_err(StoreError::io("listing", &staged_dir))?;
                let file = entry.file_name();
                match rustix::fs::renameat_with(
                    &*source,
                    file.as_os_str(),
                    &dest,
                    file.as_os_str(),
                    RenameFlags::NOREPLACE,
                ) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(StoreError::io("publishing", entry.path())(e.into())),
                }
            }
            let _ = rustix::fs::fsync(&dest);
        }
        for kind in [ObjectKind::Blob, ObjectKind::Tree] {
            let _ = rustix::fs::fsync(self.store.dir(kind).as_fd());
        }
        Ok(())
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        crate::remove_tree(&self.dir);
    }
}
