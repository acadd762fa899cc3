//! `velo run --isolate`: cached farms, a session directory, the sandbox, the commit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use velo_core::Hash;
use velo_store::Store;

use crate::sandbox::{Bind, SandboxConfig, Supervisor, CONFIG_VAR};
use crate::{checkout, CheckoutMode, ProjectError};

/// The cached link farm of `root` in the store (`farms/<root>`), built on first use.
/// Returns its path and, when it had to be built, how long that took. The caller holds
/// the store's shared lock.
pub fn ensure_farm(store: &Store, root: Hash) -> Result<(PathBuf, Option<f64>), ProjectError> {
    let farms = store.root().join("farms");
    let path = farms.join(root.to_hex());
    if crate::sandbox::is_real_dir(&path) {
        return Ok((path, None));
    }
    std::fs::create_dir_all(&farms).map_err(|source| ProjectError::Dest {
        op: "creating",
        path: farms.clone(),
        cause: source,
    })?;
    let started = Instant::now();
    let building = farms.join(format!(".build-{}-{}", std::process::id(), root.to_hex()));
    velo_store::remove_tree(&building);
    checkout(
        store,
        store,
        root,
        &building,
        CheckoutMode::Hardlink,
        &velo_ingest::Progress::default(),
    )?;
    match std::fs::rename(&building, &path) {
        Ok(()) => {}
        // Another run built it first: theirs is as good as ours.
        Err(_) if crate::sandbox::is_real_dir(&path) => velo_store::remove_tree(&building),
        Err(source) => {
            return Err(ProjectError::Dest {
                op: "publishing farm",
                path,
                cause: source,
            })
        }
    }
    Ok((path, Some(started.elapsed().as_secs_f64())))
}

/// What to run, where.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Base layers, bottom first.
    pub bases: Vec<Hash>,
    /// The top layer.
    pub manifest: Option<Hash>,
    /// Keep the upper here instead of a temporary session directory.
    pub upper: Option<PathBuf>,
    /// Share the host network instead of an empty network namespace.
    pub host_net: bool,
    /// Host paths to bind in.
    pub binds: Vec<Bind>,
    /// Working directory inside (default `/`).
    pub workdir: Option<String>,
    /// Extra environment (`K=V`), on top of a minimal default.
    pub env: Vec<(String, String)>,
    /// The command.
    pub argv: Vec<Vec<u8>>,
    /// The run's changes are wanted afterwards (a commit follows). Without this and
    /// without `upper`, the upper is a tmpfs inside the sandbox that vanishes with it.
    pub keep_changes: bool,
}

/// What happened.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The command's exit status (128 + signal when it was killed).
    pub exit_code: i32,
    /// The upper holding the run's changes.
    pub upper: PathBuf,
    /// The merged layers, the base any commit applies the upper to.
    pub base: Hash,
    /// Farms built for this run, with seconds each.
    pub farms_built: Vec<(Hash, f64)>,
    /// Seconds from start to the command's exit, farm building excluded.
    pub run_seconds: f64,
    /// The session directory (the caller removes it when done with the upper).
    pub session: PathBuf,
    /// Whether the upper belongs to the session (not the user's `--upper`).
    pub upper_is_temporary: bool,
}

/// Runs a command in the sandbox over the layers. The caller holds the shared lock for
/// the whole run, so gc never removes a farm in use.
pub fn run_isolated(store: &Store, options: &RunOptions) -> Result<RunOutcome, ProjectError> {
    let manifest = options.manifest.ok_or_else(|| {
        ProjectError::Store(velo_store::StoreError::Invalid(
            "--manifest is required".into(),
        ))
    })?;
    let mut layers: Vec<Hash> = options.bases.clone();
    layers.push(manifest);
    let mut farms_built = Vec::new();
    let mut lowers = Vec::new();
    for &layer in layers.iter().rev() {
        let (path, built) = ensure_farm(store, layer)?;
        if let Some(seconds) = built {
            farms_built.push((layer, seconds));
        }
        lowers.push(path);
    }
    let base = crate::commit::merge_layers(store, &layers)?;
    let id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let session = store.root().join("sessions").join(&id);
    let mk = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| ProjectError::Dest {
            op: "creating",
            path: p.to_path_buf(),
            cause: source,
        })
    };
    let (upper, work) = match &options.upper {
        Some(dir) => {
            mk(dir)?;
            let dir = std::fs::canonicalize(dir).map_err(|source| ProjectError::Dest {
                op: "resolving",
                path: dir.clone(),
                cause: source,
            })?;
            let work = dir.with_file_name(format!(
                ".{}.velo-work-{id}",
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            (dir, work)
        }
        None => (session.join("upper"), session.join("work")),
    };
    let scratch = !options.keep_changes && options.upper.is_none();
    let merged = session.join("merged");
    if scratch {
        mk(&store.root().join("sessions"))?;
    } else {
        mk(&upper)?;
        mk(&work)?;
        mk(&merged)?;
    }
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("HOME".to_string(), "/root".to_string()),
        ("USER".to_string(), "root".to_string()),
        ("LOGNAME".to_string(), "root".to_string()),
    ];
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".into(), term));
    }
    for (k, v) in &options.env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    let config = SandboxConfig {
        lowers,
        upper: upper.clone(),
        work: work.clone(),
        merged,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        isolate_net: !options.host_net,
        scratch_upper: scratch.then(|| store.root().join("sessions")),
        binds: options.binds.clone(),
        workdir: options.workdir.clone().unwrap_or_else(|| "/".into()),
        env,
        argv: options.argv.clone(),
    };
    let started = Instant::now();
    let exe = std::env::current_exe().map_err(|source| ProjectError::Dest {
        op: "finding",
        path: "velo".into(),
        cause: source,
    })?;
    let json = serde_json::to_string(&config).expect("the sandbox config always serialises");
    let supervisor = Supervisor::new().map_err(|source| ProjectError::Dest {
        op: "installing signal handlers",
        path: session.clone(),
        cause: source,
    })?;
    let child = Command::new(exe)
        .arg("__sandbox")
        .env(CONFIG_VAR, json)
        .spawn()
        .map_err(|source| ProjectError::Dest {
            op: "starting the sandbox",
            path: session.clone(),
            cause: source,
        })?;
    let exit_code = supervisor
        .wait(child.id(), false)
        .map_err(|source| ProjectError::Dest {
            op: "waiting for the sandbox",
            path: session.clone(),
            cause: source,
        })?;
    let run_seconds = started.elapsed().as_secs_f64();
    if options.upper.is_some() {
        velo_store::remove_tree(&work);
    }
    Ok(RunOutcome {
        exit_code,
        upper,
        base,
        farms_built,
        run_seconds,
        session,
        upper_is_temporary: options.upper.is_none(),
    })
}
