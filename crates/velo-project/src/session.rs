//! `velo run --isolate`: cached farms, a session directory, the sandbox.
//!
//! What a run may touch is decided here, before anything starts: a kept `--upper` is
//! locked for the life of the run (two overlays on one upper are undefined behaviour) and
//! may not lie inside the store or contain it; a bind source may not lie inside the store.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use velo_core::Hash;
use velo_store::Store;

use crate::sandbox::{Bind, SandboxConfig};
use crate::{CheckoutMode, CheckoutOptions, ProjectError};
use velo_store::FarmModes;

/// A farm built for a run.
#[derive(Clone, Debug)]
pub struct FarmBuilt {
    /// The tree.
    pub root: Hash,
    /// Seconds it took.
    pub seconds: f64,
    /// Files that show their tree's mode less write (or set-id) bits: the farm's inodes
    /// are the store's, shared and read-only. Their mtimes are exact, and a commit keeps
    /// the tree's modes of files the command did not chmod.
    pub inexact_modes: u64,
    /// Variants made for it (stored contents in another mode or mtime).
    pub variants_made: u64,
}

/// The cached link farm of `root` whose files show `modes` (`farms/<root>.2` or
/// `.2w`), built on first use. Returns its path and, when it had to be built, what
/// building it did. The caller holds the store's shared lock.
pub fn ensure_farm(
    store: &Store,
    root: Hash,
    modes: FarmModes,
) -> Result<(PathBuf, Option<FarmBuilt>), ProjectError> {
    let path = store.farm_path(&root, modes);
    let farms = path.parent().expect("farms/<name>").to_path_buf();
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
    let report = crate::checkout_with(
        store,
        store,
        root,
        &building,
        CheckoutOptions {
            farm_modes: modes,
            ..CheckoutOptions::new(CheckoutMode::Hardlink)
        },
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
    Ok((
        path,
        Some(FarmBuilt {
            root,
            seconds: started.elapsed().as_secs_f64(),
            inexact_modes: report.inexact_modes,
            variants_made: report.variants_made,
        }),
    ))
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
    /// The soft limit of open files to give the command (the caller's, before velo
    /// raised its own).
    pub nofile: Option<u64>,
    /// Which modes the lowers show; `None`: [`default_farm_modes`].
    pub farm_modes: Option<FarmModes>,
}

/// The farm modes a run uses unless told: owner-writable where the store reflinks (a
/// variant then costs an inode, not a copy), read-only elsewhere (ext4), where a variant
/// per writable file would copy nearly every byte of the tree.
pub fn default_farm_modes(store: &Store) -> FarmModes {
    if store.reflinks() {
        FarmModes::Writable
    } else {
        FarmModes::ReadOnly
    }
}

/// What happened.
pub struct RunOutcome {
    /// The command's exit status (128 + signal when it was killed; 125 when the sandbox
    /// failed to start, 126/127 when the command could not be run).
    pub exit_code: i32,
    /// The upper holding the run's changes.
    pub upper: PathBuf,
    /// The merged layers, the base a commit applies the upper to: computed only when the
    /// run's changes are wanted (`keep_changes`), as a throwaway run never needs it.
    pub base: Option<Hash>,
    /// Farms built for this run.
    pub farms_built: Vec<FarmBuilt>,
    /// The modes the lowers showed (a commit needs them to tell what the command chmod'ed).
    pub farm_modes: FarmModes,
    /// Seconds from start to the command's exit, farm building excluded.
    pub run_seconds: f64,
    /// The session (the caller removes or keeps it when done with the upper).
    pub session: velo_store::Session,
    /// Whether the upper belongs to the session (not the user's `--upper`).
    pub upper_is_temporary: bool,
    /// Whether the command started (a sandbox that failed to set up, or a command that was
    /// not found, changed nothing worth committing).
    pub command_started: bool,
    /// The lock on a kept `--upper`, held until the caller has committed it.
    pub upper_lock: Option<OwnedFd>,
}

fn refused(message: String) -> ProjectError {
    ProjectError::Store(velo_store::StoreError::Invalid(message))
}

/// Whether `path` is `dir` or lies beneath it (both canonical).
fn within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// Creates (if needed), checks and locks a kept upper; returns its canonical path and the
/// held lock.
pub fn prepare_upper(store_root: &Path, dir: &Path) -> Result<(PathBuf, OwnedFd), ProjectError> {
    // Checked before anything is created: a refused upper leaves no trace.
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(refused(format!(
                "--upper {}: is not a directory",
                dir.display()
            )))
        }
        Err(_) if std::fs::symlink_metadata(dir).is_ok() => {
            return Err(refused(format!(
                "--upper {}: a symlink whose target does not exist",
                dir.display()
            )))
        }
        _ => {}
    }
    match dir.to_str() {
        Some(text) if !text.contains([':', ',', '\\']) => {}
        _ => {
            return Err(refused(format!(
                "--upper {}: overlayfs takes only UTF-8 paths without ':' ',' or '\\'; choose another directory",
                dir.display()
            )))
        }
    }
    let absolute = std::path::absolute(dir).unwrap_or(dir.to_path_buf());
    let mut existing = absolute.as_path();
    let mut missing = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut resolved = std::fs::canonicalize(existing).map_err(|source| ProjectError::Dest {
        op: "resolving",
        path: existing.to_path_buf(),
        cause: source,
    })?;
    resolved.extend(missing.iter().rev());
    if within(&resolved, store_root) || within(store_root, &resolved) {
        return Err(refused(format!(
            "--upper {}: an upper inside the store (or containing it) would let the command write the store; choose a directory outside {}",
            dir.display(),
            store_root.display()
        )));
    }
    // Private from the start: as root, what the command makes there (set-uid files among
    // them) must not be reachable by other users while the run lasts.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&resolved)
        .map_err(|source| ProjectError::Dest {
            op: "creating",
            path: dir.to_path_buf(),
            cause: source,
        })?;
    // Resolved again once it exists: a symlink planted meanwhile must not lead elsewhere.
    let canonical = std::fs::canonicalize(&resolved).map_err(|source| ProjectError::Dest {
        op: "resolving",
        path: dir.to_path_buf(),
        cause: source,
    })?;
    if within(&canonical, store_root) || within(store_root, &canonical) {
        return Err(refused(format!(
            "--upper {}: it resolves into the store; choose a directory outside {}",
            dir.display(),
            store_root.display()
        )));
    }
    // Opened without following any symlink, and checked again by what was opened: this
    // descriptor is what the sandbox mounts, whatever the path names later.
    let lock = open_no_symlinks(
        &canonical,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
    )
    .map_err(|e| ProjectError::Dest {
        op: "opening (no symlinks allowed on the way)",
        path: canonical.clone(),
        cause: e.into(),
    })?;
    let opened = opened_path(&lock);
    if within(&opened, store_root) || within(store_root, &opened) {
        return Err(refused(format!(
            "--upper {}: it resolves into the store; choose a directory outside {}",
            dir.display(),
            store_root.display()
        )));
    }
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(refused(format!(
            "--upper {}: another run is using this upper; wait for it to finish (two overlays on one upper corrupt it)",
            dir.display()
        )));
    }
    let stat = rustix::fs::fstat(&lock).map_err(|e| ProjectError::Dest {
        op: "inspecting",
        path: canonical.clone(),
        cause: e.into(),
    })?;
    let me = rustix::process::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(refused(format!(
            "--upper {}: it belongs to uid {}, not to you (uid {me}); its owner could change what the run commits. Use a directory of your own",
            dir.display(),
            stat.st_uid
        )));
    }
    if stat.st_mode & 0o022 != 0 {
        return Err(refused(format!(
            "--upper {}: others can write there and change what the run commits; `chmod go-w {}` or choose another directory",
            dir.display(),
            dir.display()
        )));
    }
    if me != 0 && stat.st_mode & 0o077 != 0 {
        // What the command makes there may be open to all (a directory it makes 0777):
        // others must not reach it through the top while the upper is kept.
        rustix::fs::fchmod(&lock, rustix::fs::Mode::from_raw_mode(stat.st_mode & 0o700)).map_err(
            |e| ProjectError::Dest {
                op: "making private (chmod 700)",
                path: canonical.clone(),
                cause: e.into(),
            },
        )?;
        tracing::warn!(upper = %canonical.display(), "made the upper private (0700): what the command makes there may be open to everyone");
    }
    if me == 0 && stat.st_mode & 0o077 != 0 {
        return Err(refused(format!(
            "--upper {}: run as root, the command is root in its upper: other users must not reach what it makes there (a set-uid file); `chmod 700 {}`",
            dir.display(),
            dir.display()
        )));
    }
    if rustix::fs::access(&canonical, rustix::fs::Access::WRITE_OK).is_err() {
        return Err(refused(format!(
            "--upper {}: you cannot write there; choose a directory of your own",
            dir.display()
        )));
    }
    // Work directories of earlier runs on this upper that were killed: with the lock held,
    // none of them is in use.
    if let (Some(parent), Some(name)) = (canonical.parent(), canonical.file_name()) {
        let prefix = format!(".{}.velo-work-", name.to_string_lossy());
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                velo_store::remove_tree(&entry.path());
            }
        }
    }
    Ok((canonical, lock))
}

/// Opens an absolute path with no symlink anywhere on the way (a component swapped for a
/// symlink after it was checked fails the open instead of leading elsewhere).
fn open_no_symlinks(path: &Path, flags: rustix::fs::OFlags) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        flags | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::NO_SYMLINKS | rustix::fs::ResolveFlags::NO_MAGICLINKS,
    )
}

/// Where an open descriptor actually is (its path as the kernel tracks it).
fn opened_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// The bind sources, each opened without following a symlink and checked by what was
/// opened (never the store; a writable one never around the store): the descriptors the
/// sandbox binds, and the binds with their verified source paths.
fn open_binds(
    binds: &[Bind],
    store_root: &Path,
) -> Result<(Vec<OwnedFd>, Vec<Bind>), ProjectError> {
    let mut fds = Vec::new();
    let mut verified = Vec::new();
    for bind in binds {
        let source = std::fs::canonicalize(&bind.source).unwrap_or(bind.source.clone());
        let fd = open_no_symlinks(&source, rustix::fs::OFlags::PATH).map_err(|e| {
            ProjectError::Dest {
                op: "opening --bind source (no symlinks allowed on the way)",
                path: source.clone(),
                cause: e.into(),
            }
        })?;
        let source = opened_path(&fd);
        if within(&source, store_root) {
            return Err(refused(format!(
                "--bind {}: the store cannot be bound into a sandbox (the command could change what later runs read)",
                bind.source.display()
            )));
        }
        if !bind.read_only && within(store_root, &source) {
            return Err(refused(format!(
                "--bind {}: it contains the store ({}), which the command could then rewrite; bind it read-only (:ro), bind a subdirectory, or keep the store elsewhere (--store)",
                bind.source.display(),
                store_root.display()
            )));
        }
        fds.push(fd);
        verified.push(Bind {
            source,
            ..bind.clone()
        });
    }
    Ok((fds, verified))
}

/// Makes (if needed) and opens directory `name` in `parent`, never through a symlink.
fn open_private_dir(parent: &OwnedFd, name: &str, path: &Path) -> Result<OwnedFd, ProjectError> {
    let dest_error = |op: &'static str| {
        let path = path.to_path_buf();
        move |e: rustix::io::Errno| ProjectError::Dest {
            op,
            path,
            cause: e.into(),
        }
    };
    match rustix::fs::mkdirat(parent, name, rustix::fs::Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(dest_error("creating")(e)),
    }
    rustix::fs::openat(
        parent,
        name,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(dest_error("opening"))
}

/// An upper whose changes are kept: its path, its directory (locked, for a `--upper`), the
/// overlay work directory, and that directory's path.
struct KeptDirs {
    path: PathBuf,
    upper: OwnedFd,
    work: OwnedFd,
    work_path: PathBuf,
}

/// The upper of a run whose changes are wanted: the user's `--upper` (already checked and
/// locked) with a work directory beside it, or one in the session directory for a commit.
fn kept_dirs(
    session: &velo_store::Session,
    kept_upper: Option<(PathBuf, OwnedFd)>,
    keep_changes: bool,
) -> Result<Option<KeptDirs>, ProjectError> {
    let open_dir_of = |dir: &Path| {
        open_no_symlinks(
            dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        )
        .map_err(|e| ProjectError::Dest {
            op: "opening (no symlinks allowed on the way)",
            path: dir.to_path_buf(),
            cause: e.into(),
        })
    };
    let name_of = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok(match kept_upper {
        Some((dir, lock)) => {
            let name = format!(".{}.velo-work-{}", name_of(&dir), name_of(session.dir()));
            let work_path = dir.with_file_name(&name);
            let parent = open_dir_of(dir.parent().unwrap_or(Path::new("/")))?;
            let work = open_private_dir(&parent, &name, &work_path)?;
            Some(KeptDirs {
                path: dir,
                upper: lock,
                work,
                work_path,
            })
        }
        None if keep_changes => {
            let session_fd = open_dir_of(session.dir())?;
            let (path, work_path) = (session.dir().join("upper"), session.dir().join("work"));
            Some(KeptDirs {
                upper: open_private_dir(&session_fd, "upper", &path)?,
                work: open_private_dir(&session_fd, "work", &work_path)?,
                path,
                work_path,
            })
        }
        None => None,
    })
}

/// The command's environment: a minimal default, the caller's TERM, then `--env`.
fn command_env(extra: &[(String, String)]) -> Vec<(String, String)> {
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
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Runs a command in the sandbox over the layers. The caller holds the shared lock for
/// the whole run, so gc never removes a farm in use.
pub fn run_isolated(store: &Store, options: &RunOptions) -> Result<RunOutcome, ProjectError> {
    store.ensure_private_dirs()?;
    let manifest = options
        .manifest
        .ok_or_else(|| refused("--manifest is required".into()))?;
    let store_root = std::fs::canonicalize(store.root()).map_err(|source| ProjectError::Dest {
        op: "resolving",
        path: store.root().to_path_buf(),
        cause: source,
    })?;
    let (bind_fds, binds) = open_binds(&options.binds, &store_root)?;
    let kept_upper = match &options.upper {
        Some(dir) => Some(prepare_upper(&store_root, dir)?),
        None => None,
    };
    let mut layers: Vec<Hash> = options.bases.clone();
    layers.push(manifest);
    let mut farms_built = Vec::new();
    let mut lowers = Vec::new();
    let farm_modes = options
        .farm_modes
        .unwrap_or_else(|| default_farm_modes(store));
    for &layer in layers.iter().rev() {
        let (path, built) = ensure_farm(store, layer, farm_modes)?;
        farms_built.extend(built);
        lowers.push(path);
    }
    let base = if options.keep_changes {
        Some(crate::commit::merge_layers(store, &layers)?)
    } else {
        None
    };
    let session = store.new_session()?;
    let scratch = session.dir().join("scratch");
    std::fs::create_dir_all(&scratch).map_err(|source| ProjectError::Dest {
        op: "creating",
        path: scratch.clone(),
        cause: source,
    })?;
    let kept = kept_dirs(&session, kept_upper, options.keep_changes)?;
    let config = SandboxConfig {
        lowers,
        upper: kept.as_ref().map(|k| crate::sandbox::KeptUpper {
            path: k.path.clone(),
            work_path: k.work_path.clone(),
            upper_fd: -1,
            work_fd: -1,
        }),
        scratch,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        isolate_net: !options.host_net,
        binds,
        bind_fds: Vec::new(),
        held_fds: Vec::new(),
        workdir: options.workdir.clone().unwrap_or_else(|| "/".into()),
        env: command_env(&options.env),
        argv: options.argv.clone(),
        nofile: options.nofile,
        controlling_tty: false,
        null_stdio: [false; 3],
    };
    let started = Instant::now();
    let fds = crate::sandbox::RunFds {
        session_lock: session.lock_fd(),
        upper: kept.as_ref().map(|k| (k.upper.as_fd(), k.work.as_fd())),
        binds: bind_fds.iter().map(|fd| fd.as_fd()).collect(),
    };
    let started_run = crate::sandbox::start(&config, &fds);
    drop(fds);
    let exit_code = match started_run {
        Ok(code) => code,
        Err(cause) => {
            let error = ProjectError::Dest {
                op: "running the sandbox",
                path: session.dir().to_path_buf(),
                cause,
            };
            session.remove();
            return Err(error);
        }
    };
    let run_seconds = started.elapsed().as_secs_f64();
    let upper_is_temporary = options.upper.is_none();
    let (upper, upper_lock) = match kept {
        Some(k) => {
            drop(k.work);
            if !upper_is_temporary {
                velo_store::remove_tree(&k.work_path);
            }
            (k.path, (!upper_is_temporary).then_some(k.upper))
        }
        None => (PathBuf::new(), None),
    };
    let command_started = session.dir().join(crate::sandbox::STARTED_MARKER).exists();
    Ok(RunOutcome {
        command_started,
        exit_code,
        upper,
        base,
        farms_built,
        farm_modes,
        run_seconds,
        session,
        upper_is_temporary,
        upper_lock,
    })
}
