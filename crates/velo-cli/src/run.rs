//! `velo run --isolate` and the hidden sandbox stages it re-executes.

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
    pub bases: Vec<String>,
    pub manifest: String,
    pub upper: Option<PathBuf>,
    pub commit: Option<PathBuf>,
    pub name: Option<String>,
    pub host_net: bool,
    pub binds: Vec<String>,
    pub workdir: Option<String>,
    pub env: Vec<String>,
    pub command: Vec<OsString>,
}

/// Runs a sandbox stage; a setup failure exits 125 with the reason on stderr.
pub fn sandbox_stage(
    stage: fn() -> Result<i32, velo_project::sandbox::SandboxError>,
) -> Result<ExitCode> {
    match stage() {
        Ok(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Err(e) => {
            eprintln!("velo: sandbox: {e}");
            Ok(ExitCode::from(125))
        }
    }
}

/// A TREE for a layer: a .velo file is imported (verified) first, unless the store
/// remembers having verified this very version of it (the import cache): that read was
/// most of the start-up cost of `--manifest app.velo`.
fn layer(store: &Store, spec: &str) -> Result<Hash> {
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
    let (rest, read_only) = match spec.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (spec.strip_suffix(":rw").unwrap_or(spec), false),
    };
    let Some((source, dest)) = rest.split_once(':') else {
        bail!("--bind {spec:?}: expected SRC:DST or SRC:DST:ro");
    };
    let source = std::fs::canonicalize(source)
        .with_context(|| format!("--bind {spec:?}: the source {source:?} does not exist"))?;
    velo_project::sandbox::validate_inside_path(dest)
        .with_context(|| format!("--bind {spec:?}"))?;
    Ok(Bind {
        source,
        dest: dest.to_string(),
        read_only,
    })
}

pub fn run(ctx: &Ctx, args: RunArgs) -> Result<ExitCode> {
    if !args.isolate {
        bail!("velo run needs --isolate for now (the LD_PRELOAD shim projection is not built yet)");
    }
    if let Some(name) = &args.name {
        velo_store::validate_root_name(name)?;
    }
    if let Some(dir) = &args.workdir {
        velo_project::sandbox::validate_inside_path(dir).context("--workdir")?;
    }
    let binds = args
        .binds
        .iter()
        .map(|b| parse_bind(b))
        .collect::<Result<Vec<_>>>()?;
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--env {kv:?}: expected K=V"),
        })
        .collect::<Result<Vec<_>>>()?;
    let store = ctx.store_or_create()?;
    // Held for the whole run: gc must not remove a farm under a running sandbox.
    let _lock = store.lock_shared()?;
    let bases = args
        .bases
        .iter()
        .map(|b| layer(&store, b))
        .collect::<Result<Vec<_>>>()?;
    let manifest = layer(&store, &args.manifest)?;
    let options = RunOptions {
        bases,
        manifest: Some(manifest),
        upper: args.upper.clone(),
        host_net: args.host_net,
        binds,
        workdir: args.workdir.clone(),
        env,
        argv: args.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        keep_changes: args.commit.is_some() || args.name.is_some(),
    };
    let outcome = run_isolated(&store, &options)?;
    for (root, seconds) in &outcome.farms_built {
        eprintln!(
            "velo: built the link farm of {} in {seconds:.2} s (cached for later runs)",
            &root.to_hex()[..16]
        );
    }
    let mut committed = None;
    if args.commit.is_some() || args.name.is_some() {
        let result = (|| -> Result<Hash> {
            let root = velo_project::commit::commit_upper(&store, outcome.base, &outcome.upper)?;
            store.sync()?;
            let stats = velo_store::treeops::stats(&store, root)?;
            store.register_root(&RootRecord {
                name: args.name.clone(),
                root: root.to_hex(),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                stats,
                partial: false,
                source: Some(format!(
                    "velo run --isolate (manifest {})",
                    &manifest.to_hex()[..16]
                )),
            })?;
            if let Some(out) = &args.commit {
                store.export(root, out, false)?;
            }
            Ok(root)
        })();
        match result {
            Ok(root) => committed = Some(root),
            Err(e) => {
                eprintln!("velo: error: committing the run's changes failed: {e:#}; the upper is kept at {}", outcome.upper.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    // The session holds the merged mount point and, unless --upper was given, the upper.
    velo_store::remove_tree(&outcome.session);
    if ctx.json {
        fmt::print_json(&json!({
            "exit_code": outcome.exit_code,
            "committed": committed.map(|h| h.to_hex()),
            "upper": if outcome.upper_is_temporary { None } else { Some(outcome.upper.display().to_string()) },
            "farms_built": outcome.farms_built.iter().map(|(h, s)| json!({"root": h.to_hex(), "seconds": s})).collect::<Vec<_>>(),
            "run_seconds": outcome.run_seconds,
        }));
    } else if let Some(root) = committed {
        eprintln!("velo: committed the run's changes as {root}");
    }
    Ok(ExitCode::from(outcome.exit_code.clamp(0, 255) as u8))
}
