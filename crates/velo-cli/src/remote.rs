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
        // The work is done: a reader gone away (`| head`) ends velo quietly, status 0.
        crate::fmt::print_json(&value);
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

pub(crate) fn connect(store: &velo_store::Store, name: &str) -> Result<Remote> {
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
    let report = remote.pull(&store, root, velo_remote::Blobs::All)?;
    let local = name.or(remote_name);
    register(&store, &remote, local, root, what, false)
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

/// The tree `spec` names, with what `blobs` says fetched from `remote` first: a tree of
/// the store, else a root published on the remote (registered here under its name, as
/// partial while blobs are still to come). The caller holds the store's shared lock.
pub(crate) fn fetch_for_use(
    store: &velo_store::Store,
    remote: &Remote,
    spec: &str,
    blobs: velo_remote::Blobs,
) -> Result<Hash> {
    let (root, name) = match crate::run::layer(store, spec) {
        // Registered already (or a .velo file, imported): only what it lacks is fetched.
        Ok(root) => {
            remote.pull(store, root, blobs)?;
            return Ok(root);
        }
        Err(local) => match spec.parse::<Hash>() {
            Ok(hash) if spec.len() == 64 => (hash, None),
            _ => match remote.root(spec)? {
                Some(hash) => (hash, Some(spec)),
                None => {
                    return Err(local.context(format!(
                        "not in the store, nor a root published on {}",
                        remote.config.url()
                    )))
                }
            },
        },
    };
    remote.pull(store, root, blobs)?;
    // A tree given by hash is kept by the caller (a mount's pin, a run's lock); one
    // published under a name is registered under it.
    if let Some(name) = name {
        register(
            store,
            remote,
            Some(name),
            root,
            spec,
            blobs != velo_remote::Blobs::All,
        )?;
    }
    Ok(root)
}

/// Registers tree `root` fetched from `remote` (as `what` there) under `name`.
fn register(
    store: &velo_store::Store,
    remote: &Remote,
    name: Option<&str>,
    root: Hash,
    what: &str,
    partial: bool,
) -> Result<()> {
    store.register_root(&velo_store::RootRecord {
        name: name.map(str::to_string),
        root: root.to_hex(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        stats: velo_store::treeops::stats(store, root)?,
        partial,
        source: Some(format!("{}/roots/{what}", remote.config.url())),
    })?;
    Ok(())
}

/// The blob fetcher of a mount with `--remote`: one request per blob however many readers
/// ask at once, each blob verified before it enters the store. A fetch runs on a thread of
/// its own: a reader waits for it [`FETCH_TIMEOUT`] at most, then gets `EIO`, while the
/// fetch goes on, so a large blob on a slow link is there for a later read (had the
/// reader's wait bounded the fetch, such a file could never be read).
pub(crate) struct LazyBlobs(std::sync::Arc<Lazy>);

struct Lazy {
    remote: Remote,
    /// How long a reader waits ([`FETCH_TIMEOUT`], or `VRIFT_FETCH_WAIT`).
    wait: std::time::Duration,
    index: velo_remote::RemoteIndex,
    store: velo_store::Store,
    /// The fetches running, by blob; each ends with its outcome, which the readers
    /// waiting for it share (each once started a fetch of its own, one after another).
    in_flight: std::sync::Mutex<std::collections::HashMap<Hash, std::sync::Arc<Fetching>>>,
}

/// One blob's fetch: `None` while it runs, then its outcome.
#[derive(Default)]
struct Fetching {
    outcome: std::sync::Mutex<Option<std::result::Result<(), String>>>,
    ended: std::sync::Condvar,
}

/// How long a reader waits for a blob before it gets EIO, unless `VRIFT_FETCH_WAIT`
/// (seconds, read when the mount starts) says otherwise.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a fetch may run once started, whoever waits for it (a stalled server is cut
/// off sooner, by velo-remote's minimum rate).
const FETCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

impl LazyBlobs {
    pub(crate) fn new(remote: Remote, store: &velo_store::Store) -> Result<LazyBlobs> {
        let index = remote.index(store)?;
        let wait = match std::env::var("VRIFT_FETCH_WAIT") {
            Ok(secs) => {
                std::time::Duration::from_secs(secs.trim().parse().with_context(|| {
                    format!("VRIFT_FETCH_WAIT={secs:?}: not a number of seconds")
                })?)
            }
            Err(_) => FETCH_TIMEOUT,
        };
        Ok(LazyBlobs(std::sync::Arc::new(Lazy {
            remote,
            wait,
            index,
            store: velo_store::Store::open(store.root())?,
            in_flight: std::sync::Mutex::new(std::collections::HashMap::new()),
        })))
    }
}

impl Lazy {
    /// Fetches blob `hash` into the store.
    fn fetch_now(&self, hash: Hash, size: u64) -> Result<()> {
        if self.store.has_blob(&hash) {
            return Ok(());
        }
        // Verified as it streams into a staged file (never held whole in memory).
        let staged = self
            .remote
            .fetch_blob(&self.store, &self.index, hash, size, FETCH_LIMIT)?;
        // A writer of the store: gc's sweep waits for it, and it for the sweep.
        let _lock = self.store.lock_shared()?;
        self.store.commit_blob(staged, &hash)?;
        Ok(())
    }
}

impl velo_fuse::BlobFetcher for LazyBlobs {
    fn fetch(&self, hash: &[u8; 32], size: u64) -> std::io::Result<()> {
        let hash = Hash(*hash);
        let lazy = &self.0;
        let fetching = {
            let mut in_flight = lazy.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if lazy.store.has_blob(&hash) {
                return Ok(());
            }
            match in_flight.get(&hash) {
                Some(fetching) => fetching.clone(),
                None => {
                    let fetching = std::sync::Arc::new(Fetching::default());
                    in_flight.insert(hash, fetching.clone());
                    let (lazy, ours) = (lazy.clone(), fetching.clone());
                    std::thread::spawn(move || {
                        let outcome = lazy.fetch_now(hash, size).map_err(|e| {
                            tracing::warn!(
                                "fetching blob {hash} from {}: {e:#}",
                                lazy.remote.config.url()
                            );
                            format!("{e:#}")
                        });
                        *ours.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                        // Gone from the map first: a later reader starts anew (after a
                        // failure) or finds the blob in the store.
                        lazy.in_flight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&hash);
                        ours.ended.notify_all();
                    });
                    fetching
                }
            }
        };
        let outcome = fetching.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (outcome, waited) = fetching
            .ended
            .wait_timeout_while(outcome, lazy.wait, |o| o.is_none())
            .unwrap_or_else(|e| e.into_inner());
        match outcome.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(std::io::Error::other(why.clone())),
            None => {
                debug_assert!(waited.timed_out());
                tracing::warn!(
                    "blob {hash} ({size} bytes) not fetched from {} within {} s; the fetch goes on, and a later read finds it",
                    lazy.remote.config.url(),
                    lazy.wait.as_secs()
                );
                Err(std::io::Error::other(format!(
                    "blob {hash}: still being fetched from {} after {} s",
                    lazy.remote.config.url(),
                    lazy.wait.as_secs()
                )))
            }
        }
    }
}

/// For an error that a blob is missing from the store: the roots that were fetched from
/// a remote only in part (`velo mount --remote` fetches blobs as they are read), which
/// is the likely cause, and the pull that fetches the rest. `None` when no partial root
/// came from a remote.
pub(crate) fn missing_blob_hint(ctx: &Ctx, error: &anyhow::Error) -> Option<String> {
    // By its words: layers between (`#[error(transparent)]`) hide the store's error from
    // a downcast.
    let missing_blob = error.chain().any(|e| {
        let text = e.to_string();
        text.starts_with("blob ") && text.contains(" is missing from the store")
    });
    if !missing_blob {
        return None;
    }
    let store = velo_store::Store::open(&ctx.store_path).ok()?;
    let remotes = velo_remote::list_remotes(&store).unwrap_or_default();
    let hints: Vec<String> = store
        .roots()
        .ok()?
        .into_iter()
        .filter(|r| r.partial)
        .filter_map(|r| {
            let source = r.source.as_deref()?;
            let (url, what) = source.rsplit_once("/roots/")?;
            let local = r.name.clone().unwrap_or_else(|| r.root.clone());
            Some(match remotes.iter().find(|c| c.url() == url) {
                Some(remote) => format!("`velo pull {} {what}` (root {local})", remote.name),
                None => format!("`velo pull REMOTE {what}` with a remote of {url} (root {local})"),
            })
        })
        .take(3)
        .collect();
    (!hints.is_empty()).then(|| {
        format!(
            "roots here were fetched from a remote only in part (blobs come on first read in `velo mount --remote`); fetch the rest with {}",
            hints.join(", or ")
        )
    })
}
