//! Read-only commands over a TREE argument: `ls`, `cat`, `show`, `diff`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use velo_core::manifest::ManifestReader;
use velo_core::{Entry, EntryKind, Hash};
use velo_store::treeops::{self, Found, MemoryTrees, TreeSource};
use velo_store::StoreError;

use crate::{fmt, Ctx};

/// A resolved TREE argument: where its trees come from, and its root.
pub struct Resolved {
    pub source: Box<dyn TreeSource>,
    pub root: Hash,
}

fn from_manifest(path: &Path) -> Result<Resolved> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let bad = |e| StoreError::Manifest {
        path: path.to_path_buf(),
        cause: e,
    };
    let reader = ManifestReader::open(std::io::BufReader::new(file)).map_err(bad)?;
    let root = reader.root();
    let trees = reader.trees().clone();
    reader.skip_blobs_and_finish().map_err(bad)?;
    Ok(Resolved {
        source: Box::new(MemoryTrees(trees)),
        root,
    })
}

/// Resolves TREE: a `.velo` path (contains `/` or ends in `.velo`), a root name, a tree
/// hash or unique prefix, or else an existing file.
pub fn resolve(ctx: &Ctx, spec: &str) -> Result<Resolved> {
    let store = ctx.store();
    if spec.contains('/') || spec.ends_with(".velo") {
        return from_manifest(Path::new(spec));
    }
    match store {
        Ok(store) => match store.resolve(spec) {
            Ok(root) => Ok(Resolved {
                source: Box::new(store),
                root,
            }),
            Err(StoreError::UnknownTree(_)) if Path::new(spec).is_file() => {
                from_manifest(Path::new(spec))
            }
            Err(e) => Err(e.into()),
        },
        Err(_) if Path::new(spec).is_file() => from_manifest(Path::new(spec)),
        Err(e) => Err(e).with_context(|| format!("cannot resolve {spec:?}")),
    }
}

fn lookup_entry(resolved: &Resolved, path: &[u8]) -> Result<Option<Entry>> {
    Ok(
        match treeops::lookup(resolved.source.as_ref(), resolved.root, path)? {
            Found::Root(_) => None,
            Found::Entry(e) => Some(e),
        },
    )
}

fn trim_slashes(mut path: &[u8]) -> &[u8] {
    while let [b'/', rest @ ..] = path {
        path = rest;
    }
    while let [rest @ .., b'/'] = path {
        path = rest;
    }
    path
}

pub fn ls(
    ctx: &Ctx,
    spec: &str,
    path: Option<&[u8]>,
    long: bool,
    recursive: bool,
) -> Result<ExitCode> {
    let resolved = resolve(ctx, spec)?;
    let path = path.unwrap_or(b"");
    let dir = treeops::dir_at(resolved.source.as_ref(), resolved.root, path)?;
    if recursive {
        refuse_unlistable(resolved.source.as_ref(), dir, spec)?;
    }
    let prefix = trim_slashes(path);
    let mut json_entries = Vec::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut failed = None;
    treeops::walk(
        resolved.source.as_ref(),
        dir,
        prefix,
        recursive,
        &mut |p, entry| {
            if ctx.json {
                json_entries.push(fmt::entry_json(p, entry));
                return Ok(());
            }
            let shown = if recursive {
                fmt::shown(p)
            } else {
                fmt::shown(entry.name.as_bytes())
            };
            let line = if long {
                let size = match &entry.kind {
                    EntryKind::File { size, .. } => *size,
                    EntryKind::Symlink { target } => target.len() as u64,
                    EntryKind::Dir { .. } => 0,
                };
                let target = match &entry.kind {
                    EntryKind::Symlink { target } => format!(" -> {}", fmt::shown(target)),
                    _ => String::new(),
                };
                format!(
                    "{} {:>12} {} {}{}",
                    fmt::mode_string(entry),
                    size,
                    fmt::time(entry.mtime_ns),
                    shown,
                    target
                )
            } else {
                shown
            };
            if let Err(e) = writeln!(out, "{line}") {
                failed = Some(e);
            }
            Ok(())
        },
    )?;
    if let Some(e) = failed.or_else(|| out.flush().err()) {
        fmt::output_failed(&e);
    }
    drop(out);
    if ctx.json {
        fmt::print_json(&json!({ "root": resolved.root.to_hex(), "entries": json_entries }));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cat(ctx: &Ctx, spec: &str, raw_path: &[u8]) -> Result<ExitCode> {
    let resolved = resolve(ctx, spec)?;
    let entry = lookup_entry(&resolved, raw_path)?;
    let path = fmt::lossy(raw_path);
    let hash = match entry.map(|e| e.kind) {
        // `sub/f/` names a directory, as it does for cat(1).
        Some(EntryKind::File { .. }) if raw_path.ends_with(b"/") => {
            bail!("{path}: not a directory (it is a file; drop the trailing /)")
        }
        Some(EntryKind::File { hash, .. }) => hash,
        Some(EntryKind::Symlink { target }) => bail!(
            "{path} is a symlink to {}; cat the target instead",
            fmt::lossy(&target)
        ),
        _ => bail!("{path} is a directory; use velo ls"),
    };
    let store = ctx.store()?;
    let mut blob = match store.open_blob(&hash) {
        Ok(f) => f,
        Err(StoreError::Missing { .. }) => bail!("the content of {path} (blob {hash}) is not in the store {}; import the manifest (with its blobs) first", store.root().display()),
        Err(e) => return Err(e.into()),
    };
    let mut stdout = std::io::stdout().lock();
    match std::io::copy(&mut blob, &mut stdout) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

pub fn show(ctx: &Ctx, spec: &str, raw_path: &[u8]) -> Result<ExitCode> {
    let resolved = resolve(ctx, spec)?;
    let Some(entry) = lookup_entry(&resolved, raw_path)? else {
        let stats = treeops::stats(resolved.source.as_ref(), resolved.root)?;
        if ctx.json {
            fmt::print_json(
                &json!({ "path": "", "kind": "dir", "hash": resolved.root.to_hex(), "files": stats.files, "dirs": stats.dirs, "symlinks": stats.symlinks, "bytes": stats.bytes }),
            );
        } else {
            out!("path:     /\nkind:     dir (root)\nhash:     {}\nholds:    {} files, {} dirs, {} symlinks, {}", resolved.root, fmt::count(stats.files), fmt::count(stats.dirs), fmt::count(stats.symlinks), fmt::bytes(stats.bytes));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let trimmed = trim_slashes(raw_path);
    let shown_path = fmt::shown(trimmed);
    if ctx.json {
        fmt::print_json(&fmt::entry_json(trimmed, &entry));
        return Ok(ExitCode::SUCCESS);
    }
    out!("path:     {shown_path}");
    out!("kind:     {}", entry.kind.label());
    out!(
        "mode:     {:o} ({})",
        entry.mode.bits(),
        fmt::mode_string(&entry)
    );
    out!(
        "mtime:    {} ({} ns)",
        fmt::time(entry.mtime_ns),
        entry.mtime_ns
    );
    match &entry.kind {
        EntryKind::File { hash, size } => out!("size:     {size}\nhash:     {hash}"),
        EntryKind::Dir { hash } => out!("tree:     {hash}"),
        EntryKind::Symlink { target } => out!("target:   {}", fmt::shown(target)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Trees from two sources, tried in turn (diff across a store and a .velo file).
struct Both<'a>(&'a dyn TreeSource, &'a dyn TreeSource);

impl TreeSource for Both<'_> {
    fn tree(&self, hash: &Hash) -> velo_store::Result<velo_core::Tree> {
        self.0.tree(hash).or_else(|_| self.1.tree(hash))
    }
}

/// More paths than a recursive listing will walk: a real tree stays far below; a hostile
/// one naming a subtree twice per level reaches 2^64 in 64 levels (its statistics, computed
/// once per distinct subtree, saturate).
const MAX_LISTED_PATHS: u64 = 100_000_000;

/// Refuses, before walking, a tree with more paths than [`MAX_LISTED_PATHS`].
fn refuse_unlistable(
    src: &dyn treeops::TreeSource,
    tree: velo_core::Hash,
    spec: &str,
) -> Result<()> {
    let stats = treeops::stats(src, tree)?;
    let paths = stats
        .files
        .saturating_add(stats.dirs)
        .saturating_add(stats.symlinks);
    if paths > MAX_LISTED_PATHS {
        bail!(
            "{spec} holds {paths} paths (at least; a tree that names one subtree many times), more than velo lists or compares ({MAX_LISTED_PATHS}); list a directory without -R"
        );
    }
    Ok(())
}

/// What `velo diff` prints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DiffShow {
    /// Each path and how it changed.
    Paths,
    /// Only how many paths were added, removed and modified.
    Stat,
    /// Each path, and for files a unified diff of their lines.
    Patch,
}

/// The bytes of file `path` of `root` as lines to compare: `None` for a path that is not
/// a file there; `Err` with why the lines cannot be shown (binary, large, not stored).
fn text_of(
    src: &dyn TreeSource,
    store: Option<&velo_store::Store>,
    root: Hash,
    path: &[u8],
) -> Result<Option<Result<String, &'static str>>> {
    const MAX_TEXT: u64 = 4 << 20;
    let entry = match treeops::lookup(src, root, path) {
        Ok(Found::Entry(e)) => e,
        Ok(Found::Root(_)) | Err(StoreError::NoSuchPath { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let velo_core::EntryKind::File { hash, size } = entry.kind else {
        return Ok(None);
    };
    if size > MAX_TEXT {
        return Ok(Some(Err("larger than 4 MiB")));
    }
    let Some(file) = store.and_then(|s| s.open_blob(&hash).ok()) else {
        return Ok(Some(Err("its bytes are not in the store")));
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_TEXT), &mut bytes)?;
    if bytes.contains(&0) {
        return Ok(Some(Err("binary")));
    }
    Ok(Some(String::from_utf8(bytes).map_err(|_| "binary")))
}

/// The unified diff of file `path` between the two trees ("" when neither side is a
/// file), or a line saying why there is none.
fn patch_of(
    src: &dyn TreeSource,
    store: Option<&velo_store::Store>,
    (a, b): (Hash, Hash),
    path: &[u8],
) -> Result<String> {
    let shown = fmt::shown(path);
    let old = text_of(src, store, a, path)?;
    let new = text_of(src, store, b, path)?;
    if old.is_none() && new.is_none() {
        return Ok(String::new());
    }
    let why = [&old, &new]
        .into_iter()
        .find_map(|t| t.as_ref().and_then(|t| t.as_ref().err()));
    if let Some(why) = why {
        return Ok(format!("Files a/{shown} and b/{shown} differ ({why})\n"));
    }
    let text = |t: &Option<Result<String, &str>>| match t {
        Some(Ok(s)) => s.clone(),
        _ => String::new(),
    };
    let (old_text, new_text) = (text(&old), text(&new));
    let diff = similar::TextDiff::from_lines(&old_text, &new_text);
    let (from, to) = (
        if old.is_some() {
            format!("a/{shown}")
        } else {
            "/dev/null".into()
        },
        if new.is_some() {
            format!("b/{shown}")
        } else {
            "/dev/null".into()
        },
    );
    Ok(diff
        .unified_diff()
        .context_radius(3)
        .header(&from, &to)
        .to_string())
}

pub fn diff(ctx: &Ctx, from: &str, to: &str, show: DiffShow) -> Result<ExitCode> {
    let a = resolve(ctx, from)?;
    let b = resolve(ctx, to)?;
    let both = Both(a.source.as_ref(), b.source.as_ref());
    let changes = treeops::diff(&both, a.root, b.root)?;
    if show == DiffShow::Stat {
        let count = |kind| changes.iter().filter(|c| c.change == kind).count();
        let (added, removed, modified) = (
            count(treeops::ChangeKind::Added),
            count(treeops::ChangeKind::Removed),
            count(treeops::ChangeKind::Modified),
        );
        if ctx.json {
            fmt::print_json(&json!({
                "from": a.root.to_hex(), "to": b.root.to_hex(),
                "added": added, "removed": removed, "modified": modified,
            }));
        } else {
            out!("{added} added, {removed} removed, {modified} modified");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The store, when it is there: patches read file bytes from it.
    let patch_store = (show == DiffShow::Patch).then(|| ctx.store().ok());
    let store = patch_store.as_ref().and_then(|s| s.as_ref());
    if ctx.json {
        let list = changes
            .iter()
            .map(|c| {
                let mut obj = serde_json::Map::new();
                fmt::put_bytes(&mut obj, "path", &c.path);
                obj.insert("change".into(), json!(c.change.label()));
                obj.insert("kind".into(), json!(c.kind));
                obj.insert("what".into(), json!(c.what));
                if show == DiffShow::Patch {
                    let patch = patch_of(&both, store, (a.root, b.root), &c.path)?;
                    obj.insert("patch".into(), json!(patch));
                }
                Ok(serde_json::Value::Object(obj))
            })
            .collect::<Result<Vec<_>>>()?;
        fmt::print_json(
            &json!({ "from": a.root.to_hex(), "to": b.root.to_hex(), "changes": list }),
        );
    } else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for c in &changes {
            let mark = match c.change {
                treeops::ChangeKind::Added => 'A',
                treeops::ChangeKind::Removed => 'D',
                treeops::ChangeKind::Modified => 'M',
            };
            let what = if c.what.is_empty() {
                String::new()
            } else {
                format!("  ({})", c.what.join(", "))
            };
            if let Err(e) = writeln!(
                out,
                "{mark} {}{}{what}",
                fmt::shown(&c.path),
                if c.kind == "dir" { "/" } else { "" }
            ) {
                fmt::output_failed(&e);
            }
            if show == DiffShow::Patch {
                let patch = patch_of(&both, store, (a.root, b.root), &c.path)?;
                if let Err(e) = out.write_all(patch.as_bytes()) {
                    fmt::output_failed(&e);
                }
            }
        }
        if let Err(e) = out.flush() {
            fmt::output_failed(&e);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn checkout(
    ctx: &Ctx,
    spec: &str,
    dir: &Path,
    options: velo_project::CheckoutOptions,
) -> Result<ExitCode> {
    let resolved = resolve(ctx, spec)?;
    let store = ctx.store()?;
    if velo_store::path_is_inside(&dir.join("x"), store.root()) {
        bail!(
            "{}: is inside the store {}; check out elsewhere",
            dir.display(),
            store.root().display()
        );
    }
    let progress = std::sync::Arc::new(velo_ingest::Progress::default());
    let r = crate::write::with_progress(&progress, "checking out", || {
        velo_project::checkout_with(
            &store,
            resolved.source.as_ref(),
            resolved.root,
            dir,
            options,
            &progress,
        )
    })?;
    if ctx.json {
        fmt::print_json(&json!({
            "root": resolved.root.to_hex(), "dir": dir.display().to_string(),
            "files": r.files, "dirs": r.dirs, "symlinks": r.symlinks, "bytes": r.bytes,
            "linked": r.linked, "reflinked": r.reflinked, "copied": r.copied,
            "link_limit_fallbacks": r.link_limit_fallbacks, "cross_device": r.cross_device,
            "setid_dropped": r.setid_dropped, "inexact_modes": r.inexact_modes,
            "xattrs_not_shown": r.xattrs_not_shown,
            "variants_made": r.variants_made, "seconds": r.seconds,
        }));
    } else {
        note!(
            "checked out {} files ({} linked, {} reflinked, {} copied), {} dirs, {} symlinks into {} in {:.2} s{}",
            r.files, r.linked, r.reflinked, r.copied, r.dirs, r.symlinks, dir.display(), r.seconds,
            if r.link_limit_fallbacks > 0 { format!("; {} files copied at the link-count limit", r.link_limit_fallbacks) } else { String::new() }
        );
        if r.setid_dropped > 0 {
            note!(
                "velo: left the set-uid/set-gid bits off {} files; give --preserve-setuid if you trust this tree's author",
                r.setid_dropped
            );
        }
        if r.inexact_modes > 0 {
            note!(
                "velo: {} show the tree's mode without write (or set-id) bits: hard links share the store's read-only inodes; times are exact; --mode copy or --mode reflink gives writable files with exact modes",
                fmt::counted(r.inexact_modes, "file")
            );
        }
        if r.xattrs_not_shown > 0 {
            note!(
                "velo: {} lack extended attributes the tree records (hard links share the store's inodes, or this user may not set them: security.capability needs root); --mode copy or --mode reflink shows them",
                fmt::counted(r.xattrs_not_shown, "entry")
            );
        }
        if r.variants_made > 0 {
            note!(
                "velo: made {} (a stored content in another mode or mtime; `velo status` says what they cost)",
                fmt::counted(r.variants_made, "variant")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `velo checkout --remove DIR`: removes a hard-linked checkout without ever chmod'ing a
/// file in it (its files are the store's blobs); only its directories are made writable.
/// It refuses, before removing anything, what does not look like one: a file with a write
/// bit (a blob never has one; a writable checkout needs no help from velo), another file
/// system below DIR, the root directory, or the store itself.
pub fn remove_checkout(ctx: &Ctx, dir: &Path) -> Result<ExitCode> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("{}: cannot remove it", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: is not a directory (a checkout is one)", dir.display());
    }
    let canonical = std::fs::canonicalize(dir)?;
    // Inside a store (this one, or any: a directory holding VERSION and blobs/ above it)
    // is never a checkout: `velo checkout` refuses to write there.
    let in_a_store = canonical
        .ancestors()
        .any(|a| a.join("VERSION").is_file() && a.join("blobs").is_dir());
    if canonical == Path::new("/")
        || in_a_store
        || velo_store::path_is_inside(&canonical, &ctx.store_path)
    {
        bail!(
            "{}: is not a checkout (it is the root directory, or in a store); velo removes only what it checked out",
            dir.display()
        );
    }
    let device = meta.dev();
    let mut stack = vec![canonical.clone()];
    while let Some(current) = stack.pop() {
        // A directory the tree made unreadable (mode 000) is opened up to be inspected:
        // directories only, and only those.
        let listing = match std::fs::read_dir(&current) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                std::fs::set_permissions(&current, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("opening up {}", current.display()))?;
                std::fs::read_dir(&current)
            }
            other => other,
        }
        .with_context(|| format!("reading {}", current.display()))?;
        for entry in listing {
            let entry = entry.with_context(|| format!("reading {}", current.display()))?;
            let meta = entry.metadata()?;
            if meta.dev() != device {
                bail!(
                    "{}: another file system is mounted there; not a checkout, nothing removed",
                    entry.path().display()
                );
            }
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && meta.permissions().mode() & 0o222 != 0 {
                bail!(
                    "{}: is writable, so not a hard-linked checkout's file (a blob never is); nothing removed. A copy or reflink checkout is yours: `rm -rf` it",
                    entry.path().display()
                );
            } else if meta.is_file() && meta.nlink() < 2 {
                bail!(
                    "{}: is linked nowhere else, so not a hard-linked checkout's file (the store holds another link to each); nothing removed. Its files share nothing with the store: `chmod -R u+w {} && rm -rf {}` is safe",
                    entry.path().display(),
                    dir.display(),
                    dir.display()
                );
            }
        }
    }
    velo_store::remove_tree(&canonical);
    if std::fs::symlink_metadata(&canonical).is_ok() {
        bail!(
            "{}: could not be removed entirely (see the warnings above)",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
