//! `velo run --isolate` and the hidden sandbox stages it re-executes.
//!
//! Exit status, as container runtimes report it: the command's own status; 128 + n when
//! a signal n killed it; 125 when velo itself failed (bad arguments, unknown tree,
//! sandbox setup, a failed commit of a successful command); 126 when the command cannot
//! be run, 127 when it is not found.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use velo_core::Hash;
use velo_project::sandbox::Bind;
use velo_project::session::{run_isolated, RunOptions};
use velo_store::{ImportOptions, RootRecord, Store};

use crate::{fmt, Ctx};

pub struct RunArgs {
    pub isolate: bool,
    /// Where the shim shows the tree (runs without --isolate).
    pub at: Option<PathBuf>,
    pub bases: Vec<String>,
    pub manifest: String,
    pub upper: Option<PathBuf>,
    pub commit: Option<PathBuf>,
    pub name: Option<String>,
    pub host_net: bool,
    /// `None`: the store's default (velo_project::session::default_farm_modes).
    pub farm_modes: Option<velo_store::FarmModes>,
    pub binds: Vec<String>,
    pub workdir: Option<String>,
    pub env: Vec<String>,
    pub command: Vec<OsString>,
    pub commit_always: bool,
    /// The soft limit of open files velo started with, restored for the command.
    pub nofile: Option<u64>,
    /// Fetch what the store lacks of the layers from this remote first.
    pub remote: Option<String>,
}

/// Runs a sandbox stage; a setup failure exits 125 with the reason on stderr.
pub fn sandbox_stage(
    stage: fn() -> Result<i32, velo_project::sandbox::SandboxError>,
) -> Result<ExitCode> {
    match stage() {
        Ok(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Err(e) => {
            note!("velo: sandbox: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

/// A TREE for a layer: a .velo file is imported (verified) first, unless the store
/// remembers having verified this very version of it (the import cache): that read was
/// most of the start-up cost of `--manifest app.velo`.
pub fn layer(store: &Store, spec: &str) -> Result<Hash> {
    let path = Path::new(spec);
    if (spec.contains('/') || spec.ends_with(".velo"))
        || (store.resolve(spec).is_err() && path.is_file())
    {
        let imported = store
            .import_remembered(path, &ImportOptions::default())
            .with_context(|| format!("importing {spec}"))?;
        return Ok(imported.root);
    }
    Ok(store.resolve(spec)?)
}

fn parse_bind(spec: &str) -> Result<Bind> {
    let mut parts = spec.splitn(3, ':');
    let (Some(source), Some(dest)) = (parts.next(), parts.next()) else {
        bail!("--bind {spec:?}: expected SRC:DST, SRC:DST:ro or SRC:DST:rw");
    };
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(other) => bail!("--bind {spec:?}: unknown option {other:?} (ro or rw)"),
    };
    velo_project::sandbox::validate_inside_path(dest)
        .with_context(|| format!("--bind {spec:?}"))?;
    // `/a//b/` is `/a/b`; what is left of `//` is the root itself.
    let dest = dest
        .split('/')
        .filter(|c| !c.is_empty())
        .fold(String::new(), |path, c| path + "/" + c);
    if dest.is_empty() {
        bail!("--bind {spec:?}: cannot bind over the sandbox's root; choose a directory inside it");
    }
    let source = std::fs::canonicalize(source)
        .with_context(|| format!("--bind {spec:?}: the source {source:?} does not exist"))?;
    if source.to_str().is_none() {
        bail!("--bind {spec:?}: the source's path is not UTF-8; bind a parent directory, or rename it");
    }
    Ok(Bind {
        source,
        dest,
        read_only,
    })
}

/// Checks `--name` and `--commit` before a run; returns the path `--commit` writes.
pub(crate) fn commit_target(args: &RunArgs) -> Result<Option<PathBuf>> {
    if let Some(name) = &args.name {
        velo_store::validate_root_name(name)?;
    }
    let commit_to = args.commit.as_deref().map(check_output_path).transpose()?;
    if args.commit_always && args.commit.is_none() && args.name.is_none() {
        note!("velo: --commit-always does nothing without --commit or --name");
    }
    Ok(commit_to)
}

/// Refuses a `--commit` file inside the store.
pub(crate) fn commit_outside_store(out: Option<&Path>, store: &Store) -> Result<()> {
    if let Some(out) = out {
        if velo_store::path_is_inside(out, store.root()) {
            bail!(
                "--commit {}: is inside the store {}; write the .velo file elsewhere",
                out.display(),
                store.root().display()
            );
        }
    }
    Ok(())
}

/// Checks `--commit OUT` before the run (after it, the run's work would be lost to a
/// typo) and returns the path to write: a symlink is followed to its target. Only a
/// regular file is ever replaced: a device, a fifo or a socket at OUT (`/dev/null` as
/// root) must never become a file.
fn check_output_path(out: &Path) -> Result<PathBuf> {
    let out = match std::fs::symlink_metadata(out) {
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::canonicalize(out).with_context(|| {
                format!(
                    "--commit {}: a symlink whose target does not exist",
                    out.display()
                )
            })?
        }
        _ => out.to_path_buf(),
    };
    match std::fs::metadata(&out) {
        Ok(meta) if meta.is_dir() => {
            bail!("--commit {}: is a directory; name the .velo file to write", out.display())
        }
        Ok(meta) if !meta.is_file() => bail!(
            "--commit {}: is not a regular file (a device, fifo or socket); name a .velo file to write",
            out.display()
        ),
        _ => {}
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--commit {}: the directory {} does not exist",
            out.display(),
            parent.display()
        );
    }
    rustix::fs::access(parent, rustix::fs::Access::WRITE_OK).map_err(|e| {
        anyhow::anyhow!(
            "--commit {}: cannot write in {} ({}); choose another path",
            out.display(),
            parent.display(),
            std::io::Error::from(e)
        )
    })?;
    Ok(out)
}

/// What became of a run's changes.
#[derive(Default)]
struct Settled {
    committed: Option<Committed>,
    /// Why the commit failed (the changes are then kept, and said where).
    error: Option<String>,
    /// Not committed on purpose: the command failed, or never ran.
    skipped: bool,
}

/// Commits a run's changes when its command ran and succeeded (or `--commit-always`);
/// says what it did. A failed commit keeps a temporary upper where gc leaves it.
fn settle_commit(
    store: &Store,
    args: &RunArgs,
    commit_to: Option<&Path>,
    manifest: Hash,
    outcome: &velo_project::session::RunOutcome,
) -> Settled {
    if !outcome.command_started {
        note!(
            "velo: the command never ran (status {}): nothing committed",
            outcome.exit_code
        );
        return Settled {
            skipped: true,
            ..Settled::default()
        };
    }
    if outcome.exit_code != 0 && !args.commit_always {
        note!(
            "velo: the command exited with status {}: nothing committed{} (--commit-always commits a failed run's changes)",
            outcome.exit_code,
            if outcome.upper_is_temporary { ", its changes are discarded" } else { "" }
        );
        return Settled {
            skipped: true,
            ..Settled::default()
        };
    }
    match commit_run(store, args, commit_to, manifest, outcome) {
        Ok(c) => Settled {
            committed: Some(c),
            ..Settled::default()
        },
        Err(e) => {
            let kept = if outcome.upper_is_temporary {
                match outcome.session.keep(&format!(
                    "velo run could not commit this run's changes ({e:#}); upper/ holds them in overlay format. Remove this directory when done.\n"
                )) {
                    Ok(()) => format!(
                        "the changes are kept at {} (gc leaves it; remove it when done)",
                        outcome.upper.display()
                    ),
                    Err(k) => format!("the changes could not be kept either ({k})"),
                }
            } else {
                format!("the upper {} is unchanged", outcome.upper.display())
            };
            note!("velo: error: {e:#}; {kept}");
            Settled {
                error: Some(format!("{e:#}")),
                ..Settled::default()
            }
        }
    }
}

/// What a commit produced.
pub(crate) struct Committed {
    pub root: Hash,
    pub moved_from: Option<String>,
    /// Files whose setuid/setgid bits the commit dropped (paths inside the tree).
    pub setid_dropped: Vec<String>,
    /// Sockets, fifos and devices the commit could not hold (paths inside the tree).
    pub not_committed: Vec<String>,
}

/// Commits the upper, writes `--commit OUT`, then registers the root (under `--name`).
/// Nothing is registered unless everything before succeeded.
fn commit_run(
    store: &Store,
    args: &RunArgs,
    commit_to: Option<&Path>,
    manifest: Hash,
    outcome: &velo_project::session::RunOutcome,
) -> Result<Committed> {
    let base = outcome
        .base
        .context("internal error: a run whose changes are committed has no merged base")?;
    // A kept upper is read through the descriptor velo locked it with: renaming it (or a
    // parent) and putting something else at its path during the run changes nothing.
    let upper = match &outcome.upper_lock {
        Some(fd) => PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(fd)
        )),
        None => outcome.upper.clone(),
    };
    // The sandbox's lowers are farms; the shim shows every mode exactly.
    let shown = velo_project::commit::Shown {
        modes: args.isolate.then_some(outcome.farm_modes),
        xattrs: false,
    };
    let report = velo_project::commit::commit_upper(store, base, &upper, shown)
        .context("committing the run's changes")?;
    record_commit(
        store,
        &report,
        commit_to,
        args.name.as_deref(),
        format!(
            "velo run{} (manifest {})",
            if args.isolate { " --isolate" } else { "" },
            &manifest.to_hex()[..16]
        ),
    )
}

/// Makes a committed tree durable and known: writes it to `commit_to` (a .velo), then
/// registers it (under `name`). Nothing is registered unless everything before
/// succeeded. Shared by `velo run`, `velo commit` and `velo umount`.
pub(crate) fn record_commit(
    store: &Store,
    report: &velo_project::commit::CommitReport,
    commit_to: Option<&Path>,
    name: Option<&str>,
    source: String,
) -> Result<Committed> {
    let root = report.root;
    store.sync()?;
    let stats = velo_store::treeops::stats(store, root)?;
    if let Some(out) = commit_to {
        store.export(root, out, false).with_context(|| {
            format!(
                "the changes were committed as tree {root}, but writing {} failed (nothing registered)",
                out.display()
            )
        })?;
    }
    let moved_from = match name {
        Some(name) => store
            .root_by_name(name)?
            .map(|r| r.root)
            .filter(|previous| *previous != root.to_hex()),
        None => None,
    };
    store
        .register_root(&RootRecord {
            name: name.map(str::to_string),
            root: root.to_hex(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            stats,
            partial: false,
            source: Some(source),
        })
        .with_context(|| format!("registering the committed tree {root}"))?;
    Ok(Committed {
        root,
        moved_from,
        setid_dropped: report
            .setid_dropped
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        not_committed: report
            .not_committed
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    })
}

pub fn run(ctx: &Ctx, args: RunArgs) -> Result<ExitCode> {
    if !args.isolate {
        return crate::shim::run_shimmed(ctx, &args);
    }
    if let Some(dir) = &args.workdir {
        velo_project::sandbox::validate_inside_path(dir).context("--workdir")?;
    }
    let commit_to = commit_target(&args)?;
    let binds = args
        .binds
        .iter()
        .map(|b| parse_bind(b))
        .collect::<Result<Vec<_>>>()?;
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() && !kv.contains('\0') => {
                Ok((k.to_string(), v.to_string()))
            }
            _ => bail!("--env {kv:?}: expected K=V"),
        })
        .collect::<Result<Vec<_>>>()?;
    let store = ctx.store_or_create()?;
    commit_outside_store(commit_to.as_deref(), &store)?;
    // Held for the whole run: gc must not remove a farm under a running sandbox.
    let _lock = store.lock_shared()?;
    // With --remote, what the store lacks of each layer is fetched (verified) first.
    let remote = match &args.remote {
        Some(name) => Some(crate::remote::connect(&store, name)?),
        None => None,
    };
    let resolve = |spec: &str| match &remote {
        Some(remote) => crate::remote::fetch_for_use(&store, remote, spec, velo_remote::Blobs::All),
        None => layer(&store, spec),
    };
    let bases = args
        .bases
        .iter()
        .map(|b| resolve(b))
        .collect::<Result<Vec<_>>>()?;
    let manifest = resolve(&args.manifest)?;
    let wants_commit = args.commit.is_some() || args.name.is_some();
    let options = RunOptions {
        bases,
        manifest: Some(manifest),
        upper: args.upper.clone(),
        host_net: args.host_net,
        binds,
        workdir: args.workdir.clone(),
        env,
        argv: args.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        keep_changes: wants_commit,
        nofile: args.nofile,
        farm_modes: args.farm_modes,
    };
    let outcome = run_isolated(&store, &options)?;
    for farm in &outcome.farms_built {
        note!(
            "velo: built the link farm of {} in {:.2} s (cached for later runs){}",
            &farm.root.to_hex()[..16],
            farm.seconds,
            if farm.variants_made > 0 {
                format!("; made {}", fmt::counted(farm.variants_made, "variant"))
            } else {
                String::new()
            }
        );
        if farm.inexact_modes > 0 {
            let (what, hint) = match outcome.farm_modes {
                velo_store::FarmModes::ReadOnly => (
                    "without write (or set-id) bits: the farm shares the store's read-only inodes",
                    "; --farm-modes writable shows owner write bits (a variant inode per such file)",
                ),
                velo_store::FarmModes::Writable => (
                    "without group/other write or set-id bits: the farm's inodes are shared",
                    "",
                ),
            };
            note!(
                "velo: inside, {} of it show their mode {what}; times are exact, and a commit keeps the tree's modes of files the command does not chmod{hint}",
                fmt::counted(farm.inexact_modes, "file")
            );
        }
    }
    finish_run(ctx, &store, &args, commit_to.as_deref(), manifest, outcome)
}

/// After a run (in the sandbox or with the shim): commits its changes when wanted,
/// cleans up its session, reports.
pub(crate) fn finish_run(
    ctx: &Ctx,
    store: &Store,
    args: &RunArgs,
    commit_to: Option<&Path>,
    manifest: Hash,
    outcome: velo_project::session::RunOutcome,
) -> Result<ExitCode> {
    let wants_commit = args.commit.is_some() || args.name.is_some();
    let mut exit_code = outcome.exit_code;
    let settled = if wants_commit {
        settle_commit(store, args, commit_to, manifest, &outcome)
    } else {
        Settled::default()
    };
    let (committed, commit_error, skipped) = (settled.committed, settled.error, settled.skipped);
    if commit_error.is_some() && exit_code == 0 {
        exit_code = 125;
    }
    let upper = (!outcome.upper_is_temporary).then(|| outcome.upper.display().to_string());
    // Cleaned up before anything is printed: a failed write of the output ends velo.
    drop(outcome.upper_lock);
    outcome.session.remove();
    let kept_changes = commit_error.is_some() && outcome.upper_is_temporary;
    let kept_at = kept_changes.then(|| outcome.upper.display().to_string());
    if ctx.json {
        let printed = fmt::try_print_json(&json!({
            "exit_code": outcome.exit_code,
            "committed": committed.as_ref().map(|c| c.root.to_hex()),
            "name": args.name,
            "name_moved_from": committed.as_ref().and_then(|c| c.moved_from.clone()),
            "commit_skipped": skipped,
            "setid_dropped": committed.as_ref().map(|c| c.setid_dropped.clone()).unwrap_or_default(),
            "commit_error": commit_error,
            "changes_kept_at": kept_at,
            "upper": upper,
            "farms_built": outcome.farms_built.iter().map(|f| json!({
                "root": f.root.to_hex(), "seconds": f.seconds,
                "inexact_modes": f.inexact_modes, "variants_made": f.variants_made,
            })).collect::<Vec<_>>(),
            "run_seconds": outcome.run_seconds,
            "farm_modes": match outcome.farm_modes {
                velo_store::FarmModes::ReadOnly => "read-only",
                velo_store::FarmModes::Writable => "writable",
            },
        }));
        // The report is lost, not the run: say so, and fail only a run that succeeded.
        if let Err(e) = printed {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                note!("velo: error: writing the --json report: {e}");
                if exit_code == 0 {
                    exit_code = 125;
                }
            }
        }
    } else if let Some(c) = &committed {
        for path in &c.setid_dropped {
            note!("velo: {path}: setuid/setgid bits dropped (a sandboxed command cannot grant privileges)");
        }
        for path in &c.not_committed {
            note!("velo: {path}: not committed (a socket, fifo or device: a tree holds files, directories and symlinks)");
        }
        note!("velo: committed the run's changes as {}", c.root);
        if let (Some(name), Some(previous)) = (&args.name, &c.moved_from) {
            note!("velo: {name} moved from {previous} to {}", c.root);
        }
    }
    Ok(ExitCode::from(exit_code.clamp(0, 255) as u8))
}
