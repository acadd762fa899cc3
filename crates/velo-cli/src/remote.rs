//! `velo remote add|list|remove|ls`, `velo push`, `velo pull`: the CLI side of crate
//! velo-remote. Holds the store lock around transfers and registers pulled roots.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use velo_core::Hash;
use velo_remote::{Remote, RemoteConfig};

use crate::Ctx;

fn print(ctx: &Ctx, value: serde_json::Value, text: impl FnOnce()) -> Result<ExitCode> {
    if ctx.json {
        crate::fmt::try_print_json(&value)?;
    } else {
        text();
    }
    Ok(ExitCode::SUCCESS)
}

/// `velo remote add NAME s3://BUCKET/PREFIX [--endpoint URL] [--region R]`.
pub fn add(
    ctx: &Ctx,
    name: &str,
    url: &str,
    endpoint: Option<String>,
    region: Option<String>,
) -> Result<ExitCode> {
    let store = ctx.store_or_create()?;
    let config = RemoteConfig::new(name, url, endpoint, region)?;
    velo_remote::add_remote(&store, &config)?;
    print(ctx, serde_json::to_value(&config)?, || {
        note!("velo: remote {name} is {}", config.url())
    })
}

/// `velo remote list`.
pub fn list(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.store()?;
    let remotes = velo_remote::list_remotes(&store)?;
    print(ctx, json!({ "remotes": remotes }), || {
        for r in &remotes {
            out!(
                "{}\t{}{}",
                r.name,
                r.url(),
                r.endpoint
                    .as_deref()
                    .map(|e| format!("\t{e}"))
                    .unwrap_or_default()
            );
        }
    })
}

/// `velo remote remove NAME`.
pub fn remove(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let store = ctx.store()?;
    velo_remote::remove_remote(&store, name)?;
    print(ctx, json!({ "removed": name }), || {
        note!("velo: forgot remote {name} (nothing on it was touched)")
    })
}

fn connect(store: &velo_store::Store, name: &str) -> Result<Remote> {
    let config = velo_remote::load_remote(store, name)?;
    Ok(Remote::connect(config)?)
}

/// `velo remote ls REMOTE`.
pub fn ls(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let store = ctx.store()?;
    let remote = connect(&store, name)?;
    let roots = remote.roots()?;
    print(
        ctx,
        json!({ "roots": roots.iter().map(|(n, t)| json!({"name": n, "root": t})).collect::<Vec<_>>() }),
        || {
            for (n, t) in &roots {
                out!("{n}\t{t}");
            }
        },
    )
}

/// `velo push REMOTE TREE... [--name NAME]`.
pub fn push(ctx: &Ctx, remote: &str, trees: &[String], name: Option<&str>) -> Result<ExitCode> {
    if name.is_some() && trees.len() != 1 {
        bail!("--name names one tree; push several under their own root names");
    }
    let store = ctx.store()?;
    let remote = connect(&store, remote)?;
    let _lock = store.lock_shared()?;
    let mut roots = Vec::new();
    for spec in trees {
        let hash = crate::run::layer(&store, spec)?;
        let published = match name {
            Some(n) => Some(n.to_string()),
            None => store
                .root_by_name(spec)?
                .filter(|r| r.root == hash.to_hex())
                .map(|_| spec.clone()),
        };
        roots.push((published, hash));
    }
    let report = remote.push(&store, &roots)?;
    let unnamed: Vec<Hash> = roots
        .iter()
        .filter(|(n, _)| n.is_none())
        .map(|(_, h)| *h)
        .collect();
    print(ctx, serde_json::to_value(&report)?, || {
        note!(
            "velo: pushed to {}: {} objects uploaded ({}) in {} packs and {} large blobs; {} were there already",
            remote.config.url(),
            report.uploaded,
            crate::fmt::bytes(report.uploaded_bytes),
            report.packs,
            report.loose,
            report.objects - report.uploaded
        );
        for (n, t) in &report.roots {
            out!("{n}\t{t}");
        }
        for t in &unnamed {
            note!("velo: {t} has no root name (give --name to publish one); `velo pull REMOTE {t}` reads it");
        }
    })
}

/// `velo pull REMOTE NAME|HASH [--name LOCAL]`.
pub fn pull(ctx: &Ctx, remote: &str, what: &str, name: Option<&str>) -> Result<ExitCode> {
    if let Some(n) = name {
        velo_store::validate_root_name(n).with_context(|| format!("--name {n}"))?;
    }
    let store = ctx.store_or_create()?;
    let remote = connect(&store, remote)?;
    let (root, remote_name) = match what.parse::<Hash>() {
        Ok(hash) if what.len() == 64 => (hash, None),
        _ => match remote.root(what)? {
            Some(hash) => (hash, Some(what)),
            None => bail!(
                "the remote {} publishes no root named {what} (`velo remote ls {}` lists them)",
                remote.config.url(),
                remote.config.name
            ),
        },
    };
    let _lock = store.lock_shared()?;
    let report = remote.pull(&store, root, false)?;
    let local = name.or(remote_name);
    let stats = velo_store::treeops::stats(&store, root)?;
    store
        .register_root(&velo_store::RootRecord {
            name: local.map(str::to_string),
            root: root.to_hex(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            stats,
            partial: false,
            source: Some(format!("{}/roots/{what}", remote.config.url())),
        })
        .with_context(|| format!("registering the pulled tree {root}"))?;
    print(
        ctx,
        json!({ "root": report.root, "name": local, "trees": report.trees, "blobs": report.blobs, "bytes": report.bytes }),
        || {
            note!(
                "velo: pulled {} trees and {} blobs ({}), every byte verified",
                report.trees,
                report.blobs,
                crate::fmt::bytes(report.bytes)
            );
            out!("{}", report.root);
        },
    )
}
