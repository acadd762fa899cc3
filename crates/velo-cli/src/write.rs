//! Commands that change or inspect the store as a whole: ingest, import, export, roots,
//! forget, status, gc, fsck.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;
use velo_ingest::{IngestOptions, Progress};
use velo_store::{FsckOptions, ImportOptions};

use crate::{fmt, Ctx};

/// Shows a spinner with live counts on a terminal while `work` runs.
pub fn with_progress<T>(
    progress: &Arc<Progress>,
    label: &'static str,
    work: impl FnOnce() -> T,
) -> T {
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .expect("valid template"),
    );
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (bar, done, progress) = (bar.clone(), done.clone(), progress.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let files = progress.files.load(Ordering::Relaxed);
                let bytes = progress.bytes.load(Ordering::Relaxed);
                bar.set_message(format!("{label}: {files} files, {}", fmt::bytes(bytes)));
                bar.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let result = work();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    bar.finish_and_clear();
    result
}

pub fn ingest(
    ctx: &Ctx,
    dir: &Path,
    options: &IngestOptions,
    output: Option<&Path>,
) -> Result<ExitCode> {
    if !dir.is_dir() {
        if dir.exists() {
            bail!(
                "{} is not a directory: velo ingest takes a directory",
                dir.display()
            );
        }
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symlink whose target does not exist (or that leads to itself)",
                dir.display()
            );
        }
        bail!("{} does not exist", dir.display());
    }
    let store = ctx.store_or_create()?;
    if let Some(out) = output {
        store.check_export_target(out)?;
    }
    let progress = Arc::new(Progress::default());
    let report = with_progress(&progress, "ingesting", || {
        velo_ingest::ingest(&store, dir, options, &progress)
    })?;
    let exported = match output {
        Some(out) => Some(store.export(report.root, out, false)?),
        None => None,
    };
    let s = report.stats;
    if ctx.json {
        let skipped: Vec<_> = report
            .skipped
            .iter()
            .map(|k| json!({"path": k.path, "reason": k.reason}))
            .collect();
        fmt::print_json(&json!({
            "root": report.root.to_hex(),
            "name": options.name,
            "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "bytes": s.bytes,
            "new_blobs": report.new_blobs, "new_bytes": report.new_bytes,
            "cached_files": report.cached_files, "reflinked": report.reflinked,
            "skipped": skipped,
            "manifest": exported.as_ref().map(|e| e.path.clone()),
            "seconds": report.seconds,
        }));
    } else {
        out!("{}", report.root);
        let excluded = report
            .skipped
            .iter()
            .filter(|k| k.reason == "excluded")
            .count();
        let special = report.skipped.len() - excluded;
        note!(
            "ingested {} files, {} dirs, {} symlinks, {} ({} in {} new blobs{}) in {:.2} s{}{}{}",
            s.files,
            s.dirs,
            s.symlinks,
            fmt::bytes(s.bytes),
            fmt::bytes(report.new_bytes),
            report.new_blobs,
            if report.reflinked { ", reflinked" } else { "" },
            report.seconds,
            if excluded > 0 {
                format!("; {excluded} excluded")
            } else {
                String::new()
            },
            if special > 0 {
                format!("; {special} skipped (see warnings)")
            } else {
                String::new()
            },
            exported
                .map(|e| format!("; wrote {}", e.path))
                .unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn export(ctx: &Ctx, spec: &str, output: &Path, with_blobs: bool) -> Result<ExitCode> {
    let store = ctx.store()?;
    // Export writes from the store; a .velo TREE works once its trees are there.
    let root = crate::read::resolve(ctx, spec)?.root;
    if !store.has_tree(&root) {
        bail!(
            "{spec} is not in the store {}: run `velo import {spec}` first",
            store.root().display()
        );
    }
    let report = store.export(root, output, with_blobs)?;
    if ctx.json {
        fmt::print_json(&serde_json::to_value(&report)?);
    } else {
        note!(
            "wrote {} ({} trees, {} blobs, {})",
            report.path,
            report.trees,
            report.blobs,
            fmt::bytes(report.file_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn import(ctx: &Ctx, file: &Path, name: Option<String>, partial: bool) -> Result<ExitCode> {
    if !file.is_file() {
        bail!("{} is not a file", file.display());
    }
    if let Err(velo_store::StoreError::NoStore(_)) = velo_store::Store::open(&ctx.store_path) {
        // A bad file must not leave a new, empty store behind: verify before creating.
        let bad = |cause| velo_store::StoreError::Manifest {
            path: file.to_path_buf(),
            cause,
        };
        let reader =
            std::fs::File::open(file).map_err(velo_store::StoreError::io("opening", file))?;
        velo_core::manifest::ManifestReader::open(std::io::BufReader::new(reader))
            .map_err(bad)?
            .skip_blobs_and_finish()
            .map_err(bad)?;
    }
    let store = ctx.store_or_create()?;
    let report = store.import(file, &ImportOptions { name, partial })?;
    if ctx.json {
        fmt::print_json(&serde_json::to_value(&report)?);
    } else {
        out!("{}", report.root);
        note!(
            "imported {} trees ({} new), {} blobs ({} new, {}){}",
            report.trees,
            report.new_trees,
            report.blobs_in_file,
            report.new_blobs,
            fmt::bytes(report.new_bytes),
            if report.missing_blobs > 0 {
                format!("; {} blobs still missing (partial)", report.missing_blobs)
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn roots(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.store()?;
    // A damaged record is reported and skipped, never a reason to stop listing.
    let (roots, damaged) = store.roots_and_damage()?;
    for bad in &damaged {
        note!(
            "velo: damaged root record {}: {} (`velo forget {}` removes it)",
            bad.path,
            bad.why,
            bad.file
        );
    }
    if ctx.json {
        fmt::print_json(&json!({ "roots": roots, "damaged": damaged }));
        return Ok(ExitCode::SUCCESS);
    }
    for r in roots {
        let when = format!(
            "{}Z",
            fmt::civil_time(i64::try_from(r.created_unix).unwrap_or(i64::MAX))
        );
        out!(
            "{:<24} {} {} {:>8} files {:>10}{}",
            r.name.as_deref().unwrap_or("-"),
            r.root.get(..16).unwrap_or(&r.root),
            when,
            fmt::count(r.stats.files),
            fmt::bytes(r.stats.bytes),
            if r.partial { "  (partial)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn forget(ctx: &Ctx, name_or_root: &str, force: bool) -> Result<ExitCode> {
    let store = ctx.store()?;
    let damaged_before = store.roots_and_damage()?.1;
    let of_workspace = |r: &velo_store::RootRecord| {
        !force
            && r.name
                .as_deref()
                .is_some_and(velo_workspace::Workspace::is_workspace_root)
    };
    let (removed, spared) = store.forget_sparing(name_or_root, &of_workspace)?;
    if let Some(bad) = damaged_before.iter().find(|d| d.file == name_or_root) {
        note!("forgot the damaged root record {}", bad.path);
        return Ok(ExitCode::SUCCESS);
    }
    let spared_names: Vec<&str> = spared.iter().filter_map(|r| r.name.as_deref()).collect();
    if !spared.is_empty() && !ctx.json {
        note!(
            "velo: kept {}: a workspace's branch base or snapshot (`velo branch delete` or `velo snapshot delete` in that workspace lets it go; `velo forget --force` if the workspace is gone)",
            spared_names.join(", ")
        );
    }
    if removed.is_empty() && !spared.is_empty() {
        bail!("nothing forgotten: {name_or_root:?} is kept by a workspace (see above)");
    }
    if removed.is_empty() {
        bail!("no registered root is named {name_or_root:?} or has that hash; see velo roots");
    }
    if ctx.json {
        fmt::print_json(&json!({ "forgot": removed, "kept_for_workspaces": spared_names }));
    } else {
        for r in removed {
            note!(
                "forgot {} ({}); velo gc --run frees what only it kept",
                r.name.as_deref().unwrap_or("unnamed root"),
                r.root
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.store()?;
    let s = store.status()?;
    if ctx.json {
        fmt::print_json(&serde_json::to_value(&s)?);
    } else {
        out!("store:        {} (format {})", s.store, s.format_version);
        out!("roots:        {}", s.roots);
        out!("trees:        {}", s.trees);
        out!(
            "blobs:        {} ({} stored, {} on disk)",
            s.blobs,
            fmt::bytes(s.blob_bytes),
            fmt::bytes(s.disk_bytes)
        );
        out!(
            "variants:     {} ({}; each a copy where the store cannot reflink)",
            s.variants,
            fmt::bytes(s.variant_bytes)
        );
        out!("logical:      {}", fmt::bytes(s.logical_bytes));
        out!("dedup ratio:  {:.2}", s.dedup_ratio);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(ctx: &Ctx, run: bool) -> Result<ExitCode> {
    let store = ctx.store()?;
    if run && store.in_use() {
        note!(
            "velo: waiting for the other velo processes on this store to finish (runs, ingests, commits; mounts and workspaces keep what they serve without holding gc up)"
        );
    }
    let r = store.gc(run)?;
    if ctx.json {
        fmt::print_json(&serde_json::to_value(&r)?);
    } else if run {
        note!(
            "freed {} trees, {} blobs, {}, {} unused variants, {}; removed {} farms, {} stale sessions, {} temp files; kept {} roots and what {} mounts or workspaces serve",
            r.trees,
            r.blobs,
            fmt::bytes(r.bytes),
            r.unused_variants,
            fmt::bytes(r.unused_variant_bytes),
            r.farms,
            r.sessions,
            r.temp_files,
            r.roots,
            r.serving
        );
    } else {
        note!(
            "would free {} trees, {} blobs, {}, {} unused variants, {}, {} farms, {} ended sessions and {} temp files (kept: {} roots, and what {} mounts or workspaces serve); run `velo gc --run` to delete",
            r.trees,
            r.blobs,
            fmt::bytes(r.bytes),
            r.unused_variants,
            fmt::bytes(r.unused_variant_bytes),
            r.farms,
            r.sessions,
            r.temp_files,
            r.roots,
            r.serving
        );
    }
    if !ctx.json {
        for kept in &r.kept_sessions {
            note!("kept on purpose (see {kept}/kept; remove it by hand when done): {kept}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fsck(ctx: &Ctx, quick: bool, repair: bool) -> Result<ExitCode> {
    let store = ctx.store()?;
    let options = FsckOptions {
        verify_content: !quick,
    };
    if repair {
        let r = store.repair(options)?;
        if ctx.json {
            fmt::print_json(&serde_json::to_value(&r)?);
        } else {
            for q in &r.quarantined {
                out!(
                    "quarantined {} {}: {}; moved to {}",
                    q.kind,
                    q.object,
                    q.reason,
                    q.moved_to
                );
            }
            for m in &r.modes_fixed {
                if m.now.starts_with("mtime") {
                    out!("restored the {} of {} {}", m.now, m.kind, m.object);
                } else {
                    out!(
                        "restored mode {} of {} {} (was {})",
                        m.now,
                        m.kind,
                        m.object,
                        m.was
                    );
                }
            }
            for f in &r.farms_removed {
                out!(
                    "removed cached farm {f}: it showed damaged bytes or other metadata than its tree (a run builds it again)"
                );
            }
            for m in &r.missing {
                let needers: Vec<String> = m
                    .needed_by
                    .iter()
                    .map(|n| {
                        if n.path.is_empty() {
                            format!("root {} (its root directory)", n.root)
                        } else {
                            format!("root {} ({:?})", n.root, n.path)
                        }
                    })
                    .collect();
                out!(
                    "missing {} {}: needed by {}",
                    m.kind,
                    m.object,
                    if needers.is_empty() {
                        "no complete root".to_string()
                    } else {
                        needers.join(", ")
                    }
                );
            }
            for p in r
                .problems
                .iter()
                .filter(|p| !p.kind.starts_with("missing-"))
            {
                out!("{}: {}: {}", p.kind, p.object, p.detail);
            }
            note!(
                "repair: {} found, {} quarantined, {} modes restored: {}",
                r.found.len(),
                r.quarantined.len(),
                r.modes_fixed.len(),
                if r.ok {
                    "store is sound".to_string()
                } else if !r.missing.is_empty() {
                    format!(
                        "{} problems left; {} objects missing: import a .velo that carries them (velo export --with-blobs) or ingest the source again, then velo fsck",
                        r.problems.len(),
                        r.missing.len()
                    )
                } else {
                    format!("{} problems left", r.problems.len())
                }
            );
        }
        return Ok(if r.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let r = store.fsck(options)?;
    if ctx.json {
        fmt::print_json(&serde_json::to_value(&r)?);
    } else {
        for p in &r.problems {
            out!("{}: {}: {}", p.kind, p.object, p.detail);
        }
        for s in &r.stray_files {
            note!("note: {s} in an object directory is not an object (left alone)");
        }
        note!(
            "checked {} blobs ({} hashed), {} trees, {} roots: {}{}",
            r.blobs,
            fmt::bytes(r.bytes_verified),
            r.trees,
            r.roots,
            if r.ok {
                "store is sound".to_string()
            } else {
                format!("{} problems", r.problems.len())
            },
            if r.unreachable_objects + r.temp_files > 0 {
                format!(
                    " ({} unreachable objects, {} temp files: velo gc --run removes them)",
                    r.unreachable_objects, r.temp_files
                )
            } else {
                String::new()
            }
        );
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
