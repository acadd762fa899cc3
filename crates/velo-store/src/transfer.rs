//! `.velo` export and import.
//!
//! Import writes nothing until the whole file has been read and verified: blob contents
//! are staged in a private directory under `tmp/`, and only after the checksum matches are
//! trees written, blobs linked into place and the root registered.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use velo_core::manifest::{BlobReadError, ManifestReader, ManifestWriter};
use velo_core::{EntryKind, Hash};

use crate::import_cache::{self, FileKey};
use crate::treeops::{stats, MemoryTrees};
use crate::{Result, RootRecord, RootStats, Store, StoreError};

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The root exported.
    pub root: String,
    /// The file written.
    pub path: String,
    /// Tree objects in it.
    pub trees: u64,
    /// Blob contents in it (0 without `--with-blobs`).
    pub blobs: u64,
    /// Size of the file.
    pub file_bytes: u64,
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Register under this name.
    pub name: Option<String>,
    /// Register even if some blobs are neither in the file nor in the store.
    pub partial: bool,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The root registered.
    pub root: String,
    /// Its registered name.
    pub name: Option<String>,
    /// Trees in the file.
    pub trees: u64,
    /// Trees the store did not have.
    pub new_trees: u64,
    /// Blobs the file carried.
    pub blobs_in_file: u64,
    /// Blobs the store did not have.
    pub new_blobs: u64,
    /// Bytes of those.
    pub new_bytes: u64,
    /// Blobs still missing (only with `partial`).
    pub missing_blobs: u64,
    /// What the tree holds.
    #[serde(flatten)]
    pub stats: RootStats,
}

/// Removes a staging directory however the import ends.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Where an export goes.
enum ExportTarget {
    /// Written as a stream: stdout (`-`, as `None`), or what a path names that is not a
    /// regular file (a fifo, a character device such as `/dev/null`).
    Stream(Option<PathBuf>),
    /// A regular file (new or replaced), written atomically; symlinks already followed.
    File(PathBuf),
}

/// Decides what `out` names: `-` is stdout; a symlink is followed (its target is what is
/// written, the link stays); a device or fifo is written through; a regular file or a new
/// name is written atomically. A directory or a socket is refused.
fn export_target(out: &Path, store_root: &Path) -> Result<ExportTarget> {
    if out.as_os_str() == "-" {
        return Ok(ExportTarget::Stream(None));
    }
    let resolved = match fs::symlink_metadata(out) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(out).map_err(|_| {
            StoreError::Invalid(format!(
                "{}: a symlink whose target does not exist; name the file to write",
                out.display()
            ))
        })?,
        _ => out.to_path_buf(),
    };
    if crate::path_is_inside(&resolved, store_root) {
        return Err(StoreError::Invalid(format!(
            "{}: is inside the store {}; write the .velo file elsewhere",
            out.display(),
            store_root.display()
        )));
    }
    match fs::metadata(&resolved) {
        Ok(meta) if meta.is_dir() => Err(StoreError::Invalid(format!(
            "{}: is a directory; name the .velo file to write",
            out.display()
        ))),
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            Err(StoreError::Invalid(format!(
                "{}: is a socket; name a file, a fifo, a device or - (stdout)",
                out.display()
            )))
        }
        Ok(meta) if !meta.is_file() => Ok(ExportTarget::Stream(Some(resolved))),
        _ => Ok(ExportTarget::File(resolved)),
    }
}

/// Counts what passes through, for the report of a streamed export.
struct CountingWriter<W: Write> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Store {
    /// Checks, before any work, that `export` could write to `out` (not a directory or a
    /// socket, not inside the store, its directory exists): a command that exports at its
    /// end (`ingest -o`) fails before it registers anything.
    pub fn check_export_target(&self, out: &Path) -> Result<()> {
        if let ExportTarget::File(path) = export_target(out, &self.root)? {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(StoreError::Invalid(format!(
                    "{}: the directory {} does not exist",
                    out.display(),
                    parent.display()
                )));
            }
        }
        Ok(())
    }

    /// Writes a file at `out` (a regular file, new or replaced) atomically: `write` fills a
    /// staging file beside it, which is synced and renamed over `out` only when complete.
    fn export_atomically(
        &self,
        out: &Path,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<u64> {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = out
            .file_name()
            .ok_or_else(|| StoreError::Invalid(format!("{} is not a file path", out.display())))?;
        // Created new (O_EXCL, never through a link another user planted) under a name
        // nobody can guess, so nothing but this file is ever written or renamed over OUT.
        let (staged, file) = (0..16)
            .find_map(|_| {
                let staged = dir.join(format!(
                    ".{}.{}.{:016x}.partial",
                    file_name.to_string_lossy(),
                    std::process::id(),
                    unpredictable()
                ));
                let opened = {
                    use std::os::unix::fs::OpenOptionsExt;
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                        .open(&staged)
                };
                match opened {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                    other => Some(
                        other
                            .map(|f| (staged.clone(), f))
                            .map_err(StoreError::io("creating", &staged)),
                    ),
                }
            })
            .unwrap_or_else(|| {
                Err(StoreError::Invalid(format!(
                    "could not create a staging file in {}",
                    dir.display()
                )))
            })?;
        let written = (|| -> std::io::Result<u64> {
            let mut buffered = BufWriter::with_capacity(1 << 20, file);
            write(&mut buffered)?;
            let file = buffered.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
        })();
        match written {
            Ok(bytes) => {
                fs::rename(&staged, out).map_err(StoreError::io("writing", out))?;
                Ok(bytes)
            }
            Err(e) => {
                let _ = fs::remove_file(&staged);
                Err(StoreError::io("writing", out)(e))
            }
        }
    }

    /// Writes `root` and every tree it reaches (and with `with_blobs`, every blob) to
    /// `out`: a regular file atomically (it appears complete or not at all), `-` (stdout),
    /// a fifo or a device as a stream. A symlink's target is written, not the link.
    pub fn export(&self, root: Hash, out: &Path, with_blobs: bool) -> Result<ExportReport> {
        let mut trees = Vec::new();
        let mut blobs: HashMap<Hash, u64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        crate::treeops::walk_reachable(root, &mut seen, &mut |&hash, _| {
            let bytes = self.tree_bytes(&hash)?;
            let tree = velo_core::Tree::decode(&bytes).map_err(|e| StoreError::Corrupt {
                kind: "tree",
                hash,
                detail: e.to_string(),
            })?;
            for entry in tree.entries() {
                if let EntryKind::File { hash, size } = &entry.kind {
                    blobs.insert(*hash, *size);
                }
            }
            trees.push((hash, bytes));
            Ok(Some(tree))
        })?;
        let mut blob_list: Vec<(Hash, u64)> = blobs.into_iter().collect();
        blob_list.sort_unstable();
        let tree_count = trees.len() as u64;
        if with_blobs {
            if let Some((hash, _)) = blob_list.iter().find(|(h, _)| !self.has_blob(h)) {
                return Err(StoreError::Missing {
                    kind: "blob",
                    hash: *hash,
                });
            }
        }
        let target = export_target(out, &self.root)?;
        let mut write_manifest = |sink: &mut dyn Write| -> std::io::Result<()> {
            let count = with_blobs.then_some(blob_list.len() as u64);
            let mut writer = ManifestWriter::new(sink, root, &mut trees, count)?;
            if with_blobs {
                for (hash, size) in &blob_list {
                    let mut content = BufReader::new(
                        self.open_blob(hash)
                            .map_err(|e| std::io::Error::other(e.to_string()))?,
                    );
                    writer.blob(*hash, *size, &mut content)?;
                }
            }
            writer.finish()?;
            Ok(())
        };
        let file_bytes = match &target {
            ExportTarget::Stream(path) => {
                // Stdout, a pipe, a device: written through as a stream (nothing to
                // rename, nothing to sync).
                let sink: Box<dyn Write> = match path {
                    None => Box::new(std::io::stdout().lock()),
                    Some(path) => Box::new(
                        fs::OpenOptions::new()
                            .write(true)
                            .open(path)
                            .map_err(StoreError::io("opening", path))?,
                    ),
                };
                let mut counting = CountingWriter {
                    inner: BufWriter::with_capacity(1 << 20, sink),
                    count: 0,
                };
                write_manifest(&mut counting)
                    .and_then(|()| counting.inner.flush())
                    .map_err(StoreError::io("writing", out))?;
                counting.count
            }
            ExportTarget::File(path) => self.export_atomically(path, write_manifest)?,
        };
        Ok(ExportReport {
            root: root.to_hex(),
            path: match &target {
                ExportTarget::Stream(None) => "-".to_string(),
                ExportTarget::Stream(Some(p)) | ExportTarget::File(p) => p.display().to_string(),
            },
            trees: tree_count,
            blobs: if with_blobs {
                blob_list.len() as u64
            } else {
                0
            },
            file_bytes,
        })
    }

    /// Reads a `.velo` file completely, verifies it, then adds its trees and blobs to the
    /// store and registers its root. On any error the store is left as it was.
    pub fn import(&self, path: &Path, options: &ImportOptions) -> Result<ImportReport> {
        if let Some(name) = &options.name {
            crate::validate_root_name(name)?;
        }
        let bad = |cause| StoreError::Manifest {
            path: path.to_path_buf(),
            cause,
        };
        let file = File::open(path).map_err(StoreError::io("opening", path))?;
        // The version read, for the import cache: remembered only if it is a regular file
        // (a pipe has no versions) that did not change while it was read.
        let before = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| FileKey::of(&m));
        let mut reader =
            ManifestReader::open(BufReader::with_capacity(1 << 20, &file)).map_err(bad)?;
        let _lock = self.lock_shared()?;
        let n = self
            .temp_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging_rel = format!("import-{}-{n}", std::process::id());
        let staging = StagingDir(self.root.join("tmp").join(&staging_rel));
        fs::create_dir(&staging.0).map_err(StoreError::io("creating", &staging.0))?;
        let blobs_in_file = reader.blobs_left();
        let mut staged: Vec<(Hash, u64)> = Vec::new();
        let mut pending = HashMap::new();
        loop {
            // A blob's hash is known only once it has been read, and a stream cannot be read
            // twice: each non-empty blob is written to a temp file, which is dropped
            // afterwards if the store already has that content.
            let temp = staging
                .0
                .join(format!("blob-{}", staged.len() + pending.len()));
            let mut sink = LazyFile::new(temp.clone());
            let next = reader.next_blob(&mut sink);
            match next {
                Ok(None) => break,
                Ok(Some((hash, size))) => {
                    sink.finish().map_err(StoreError::io("writing", &temp))?;
                    if !self.has_blob(&hash) {
                        pending.insert(hash, (temp, size));
                    } else {
                        let _ = fs::remove_file(&temp);
                    }
                    staged.push((hash, size));
                }
                Err(BlobReadError::Decode(e)) => return Err(bad(e)),
                Err(BlobReadError::Sink(e)) => {
                    return Err(StoreError::io("staging blob in", &staging.0)(e))
                }
            }
        }
        let root = reader.root();
        let trees = reader.trees().clone();
        let referenced = reader.referenced_blobs().clone();
        reader.finish().map_err(bad)?;

        let missing: Vec<(&Hash, &u64)> = referenced
            .iter()
            .filter(|(h, _)| !pending.contains_key(*h) && !self.has_blob(h))
            .collect();
        if !missing.is_empty() && !options.partial {
            return Err(StoreError::MissingBlobs {
                count: missing.len(),
                bytes: missing.iter().map(|(_, s)| **s).sum(),
            });
        }
        let missing_blobs = missing.len() as u64;
        // Everything goes through a batch: no object is visible under its name before
        // its bytes are on disk.
        let batch = self.begin_batch()?;
        let mut new_trees = 0;
        for (hash, tree) in &trees {
            if !self.has_tree(hash) && batch.insert_tree(hash, &tree.encode())? {
                new_trees += 1;
            }
        }
        let (mut new_blobs, mut new_bytes) = (0, 0);
        let forms = first_forms(&trees, root, &pending);
        for (hash, (temp, size)) in &pending {
            let file = File::options()
                .read(true)
                .write(true)
                .open(temp)
                .map_err(StoreError::io("opening", temp))?;
            let rel = format!(
                "{staging_rel}/{}",
                temp.file_name().expect("named").to_string_lossy()
            );
            if batch.insert_staged_blob(
                self.adopt_temp(file, &rel),
                hash,
                forms.get(hash).copied(),
            )? {
                new_blobs += 1;
                new_bytes += size;
            }
        }
        // Objects already in the store were flushed before they were published, so an
        // import that adds none has nothing to flush: a re-import (the first run of a
        // re-written .velo) then costs no journal commit.
        if !batch.is_empty() {
            self.sync()?;
            batch.publish()?;
        }
        let memory = MemoryTrees(trees);
        let record = RootRecord {
            name: options.name.clone(),
            root: root.to_hex(),
            created_unix: now_unix(),
            stats: stats(&memory, root)?,
            partial: missing_blobs > 0,
            source: Some(path.display().to_string()),
        };
        // The same registration already in place (same record, same root, complete) is
        // kept as it is rather than rewritten and fsynced again.
        if record.partial || !self.record_registers(options.name.as_deref(), &root) {
            self.register_root(&record)?;
        }
        tracing::debug!(file = %path.display(), root = %root, "verified and imported");
        let after = file.metadata().ok().map(|m| FileKey::of(&m));
        if let (Some(key), 0) = (before.filter(|_| before == after), missing_blobs) {
            import_cache::remember(self, key, root, options.name.as_deref());
        }
        Ok(ImportReport {
            root: root.to_hex(),
            name: options.name.clone(),
            trees: memory.0.len() as u64,
            new_trees,
            blobs_in_file,
            new_blobs,
            new_bytes,
            missing_blobs,
            stats: record.stats,
        })
    }
}

/// What [`Store::import_remembered`] did.
#[derive(Debug, Clone)]
pub struct RememberedImport {
    /// The root the file holds, registered in the store.
    pub root: Hash,
    /// The import's report; `None` when the file was not read because it is unchanged
    /// since an earlier import verified it (the import cache).
    pub report: Option<ImportReport>,
}

impl Store {
    /// Imports a `.velo` file unless this store already verified and imported this very
    /// version of it (same device, inode, size, mtime and ctime) and that import is still
    /// registered and complete; then the file is not even opened. What a TREE argument
    /// naming a file costs on every `velo run`. Hold the shared lock across the use of the
    /// root if gc must not run in between (as for any registered root, `velo forget`
    /// followed by `gc --run` could otherwise remove it).
    pub fn import_remembered(
        &self,
        path: &Path,
        options: &ImportOptions,
    ) -> Result<RememberedImport> {
        if let Some(root) = import_cache::lookup(self, path, options.name.as_deref()) {
            return Ok(RememberedImport { root, report: None });
        }
        let report = self.import(path, options)?;
        Ok(RememberedImport {
            root: report
                .root
                .parse()
                .map_err(|e: velo_core::HashParseError| {
                    StoreError::Invalid(format!("imported root {:?}: {e}", report.root))
                })?,
            report: Some(report),
        })
    }
}

/// Seconds since the epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A file created on the first write, so an empty blob costs no file at all.
struct LazyFile {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    created: bool,
}

impl LazyFile {
    fn new(path: PathBuf) -> Self {
        LazyFile {
            path,
            file: None,
            created: false,
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if !self.created {
            File::create(&self.path)?;
            self.created = true;
        }
        if let Some(f) = self.file.take() {
            f.into_inner().map_err(|e| e.into_error())?;
        }
        Ok(())
    }
}

impl Write for LazyFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.file.is_none() {
            self.file = Some(BufWriter::with_capacity(
                256 << 10,
                File::create(&self.path)?,
            ));
            self.created = true;
        }
        self.file.as_mut().expect("just set").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

/// 64 bits nobody outside this process can predict (for staging names): the kernel's
/// random bytes, else the clock and the address of a stack variable.
pub(crate) fn unpredictable() -> u64 {
    let mut bytes = [0u8; 8];
    if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())
        .is_ok_and(|n| n == 8)
    {
        return u64::from_le_bytes(bytes);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    now ^ (&bytes as *const _ as u64).rotate_left(32)
}

/// For each blob in `wanted`, the form of the first file entry (depth first from `root`)
/// that names it: a new blob takes it, so a checkout of this tree needs few variants.
pub fn first_forms<V>(
    trees: &HashMap<Hash, velo_core::Tree>,
    root: Hash,
    wanted: &HashMap<Hash, V>,
) -> HashMap<Hash, crate::BlobForm> {
    let mut forms = HashMap::with_capacity(wanted.len());
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(hash) = stack.pop() {
        if !seen.insert(hash) {
            continue;
        }
        let Some(tree) = trees.get(&hash) else {
            continue;
        };
        for entry in tree.entries().iter().rev() {
            match &entry.kind {
                velo_core::EntryKind::Dir { hash } => stack.push(*hash),
                velo_core::EntryKind::File { hash, .. } if wanted.contains_key(hash) => {
                    forms.entry(*hash).or_insert_with(|| {
                        crate::BlobForm::canonical(entry.mode.bits(), entry.mtime_ns)
                    });
                }
                _ => {}
            }
        }
    }
    forms
}
