//! `velo run --manifest M [--at PATH] -- CMD`: the command runs on the host with the
//! `LD_PRELOAD` shim (crate velo-shim), which shows the tree at `--at`. velo builds the
//! tree's view index, finds the library, checks that the command can be intercepted at
//! all (dynamically linked, not set-uid), and starts it with the shim's environment.
//! The command's changes go to an upper directory (temporary, or `--upper DIR`) that
//! velo commits with the shared routine when the command succeeds and `--commit` or
//! `--name` asks for it; velo waits for the command, passing signals on.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::run::RunArgs;
use crate::Ctx;

/// The file name of the shim library, next to `velo` (cargo puts both in one directory).
const LIBRARY: &str = "libvelo_shim.so";

/// Where the library is: `$VRIFT_SHIM_PATH`, else next to this executable.
pub fn library() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VRIFT_SHIM_PATH") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(std::path::absolute(&path)?);
        }
        bail!(
            "VRIFT_SHIM_PATH={}: no such file; point it at {LIBRARY}, or unset it to use the one next to velo",
            path.display()
        );
    }
    let exe = std::env::current_exe().context("finding velo's own executable")?;
    let beside = exe.with_file_name(LIBRARY);
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "the shim library {LIBRARY} is not next to velo ({}); build it (`cargo build -p velo-shim`) or set VRIFT_SHIM_PATH",
        beside.display()
    )
}

/// Why a program cannot be run through the shim, if it cannot: a statically linked ELF
/// (no program interpreter: nothing loads the library) or a set-uid/set-gid file (the
/// loader ignores LD_PRELOAD for it).
fn unshimmable(path: &Path) -> Result<Option<&'static str>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.permissions().mode() & 0o6000 != 0 {
        return Ok(Some(
            "it is set-uid or set-gid, and the loader ignores LD_PRELOAD for such programs",
        ));
    }
    let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut head = vec![0u8; 4096];
    let n = file.read(&mut head)?;
    head.truncate(n);
    if !head.starts_with(b"\x7fELF") {
        // A script: its interpreter is what runs, checked when the kernel starts it.
        return Ok(None);
    }
    let (Some(&class), Some(&data)) = (head.get(4), head.get(5)) else {
        return Ok(None);
    };
    if class != 2 || data != 1 {
        return Ok(Some("it is not a 64-bit little-endian ELF program"));
    }
    let u16_at = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        head.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Ok(Some("its ELF header is damaged"));
    };
    for i in 0..u64::from(phnum) {
        let at = phoff.saturating_add(i.saturating_mul(u64::from(phentsize))) as usize;
        match head.get(at..at + 4) {
            Some(kind) if u32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]) == 3 => {
                return Ok(None);
            }
            Some(_) => {}
            None => return Ok(None),
        }
    }
    Ok(Some(
        "it is statically linked (no program interpreter), so no library can be preloaded into it",
    ))
}

/// The host file that runs for `program`: a path in the tree is its executable link in
/// the view; a host path is itself; a bare name is searched in PATH (whose entries under
/// `at` are the tree's).
fn resolve_program(
    index: &velo_view::View<'_>,
    exec_dir: &Path,
    upper: &Path,
    at: &[u8],
    start: &[u8],
    program: &OsStr,
) -> Result<PathBuf> {
    let in_tree = |path: &[u8]| -> Result<Option<PathBuf>> {
        let (mut scratch, mut rel, mut rel_len) =
            ([0u8; velo_view::PATH_MAX], [0u8; velo_view::PATH_MAX], 0);
        let layer = velo_project::view::DirLayer { upper };
        match index.resolve_layered(
            at,
            0,
            path,
            true,
            &layer,
            &mut scratch,
            &mut rel,
            &mut rel_len,
        ) {
            // A file the command (of an earlier run on this upper) made: itself.
            velo_view::Layered::Upper => Ok(Some(upper.join(OsStr::from_bytes(&rel[..rel_len])))),
            velo_view::Layered::Tree(n) => {
                let node = index
                    .node(n)
                    .map_err(|_| anyhow::anyhow!("the view index is damaged"))?;
                if node.kind != velo_view::Kind::File {
                    bail!(
                        "{}: is not a file in the tree",
                        String::from_utf8_lossy(path)
                    );
                }
                if node.flags & velo_view::FLAG_EXEC_LINK == 0 {
                    bail!(
                        "{}: the tree does not mark it executable",
                        String::from_utf8_lossy(path)
                    );
                }
                Ok(Some(exec_dir.join(n.to_string())))
            }
            velo_view::Layered::Outside(len) => {
                Ok(Some(PathBuf::from(OsStr::from_bytes(&scratch[..len]))))
            }
            _ => Ok(None),
        }
    };
    let bytes = program.as_bytes();
    let under_at = |p: &[u8]| {
        p.strip_prefix(at)
            .is_some_and(|r| r.is_empty() || r[0] == b'/')
    };
    if bytes.contains(&b'/') {
        // Relative paths start where the command starts (`start`, in the tree).
        if bytes.first() != Some(&b'/') || under_at(bytes) {
            let mut full = if under_at(bytes) {
                at.to_vec()
            } else {
                start.to_vec()
            };
            if bytes.first() != Some(&b'/') {
                full.push(b'/');
            }
            full.extend_from_slice(if under_at(bytes) {
                &bytes[at.len()..]
            } else {
                bytes
            });
            if let Some(found) = in_tree(&full)? {
                return Ok(found);
            }
            bail!("{}: no such file in the tree", program.to_string_lossy());
        }
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if under_at(candidate.as_os_str().as_bytes()) {
            if let Ok(Some(found)) = in_tree(candidate.as_os_str().as_bytes()) {
                return Ok(found);
            }
        } else if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{}: not found in PATH", program.to_string_lossy())
}

/// The view index, mapped: reading a kernel tree's (8 MB) would be much of a run's
/// start-up. The mapping is never unmapped; velo `exec`s or exits soon after.
pub(crate) fn map(path: &Path) -> Result<&'static [u8]> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        bail!("{}: empty view index", path.display());
    }
    // SAFETY: a private read-only mapping of a file velo replaces only by rename (this
    // mapping keeps its inode), never unmapped, so the 'static slice stays valid.
    let bytes = unsafe {
        let ptr = rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::PRIVATE,
            &file,
            0,
        )
        .with_context(|| format!("mapping {}", path.display()))?;
        std::slice::from_raw_parts(ptr as *const u8, len)
    };
    Ok(bytes)
}

/// The interpreter and optional argument of a `#!` script (velo-view's parser, which
/// the shim uses too).
fn shebang_of(path: &Path) -> Result<Option<(OsString, Option<OsString>)>> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(velo_view::shebang(&head[..n]).map(|(interpreter, option)| {
        (
            OsString::from(OsStr::from_bytes(interpreter)),
            option.map(|o| OsString::from(OsStr::from_bytes(o))),
        )
    }))
}

/// Runs `args.command` with the shim, waits for it, and commits its changes when asked.
pub fn run_shimmed(ctx: &Ctx, args: &RunArgs) -> Result<ExitCode> {
    for (given, flag) in [
        (!args.bases.is_empty(), "--base"),
        (!args.binds.is_empty(), "--bind"),
        (args.host_net, "--net host"),
    ] {
        if given {
            bail!("{flag} is not supported without --isolate (the shim shows one tree over the host as it is); add --isolate");
        }
    }
    let commit_to = crate::run::commit_target(args)?;
    let at = match &args.at {
        Some(at) => at.clone(),
        None => std::env::var_os("VRIFT_VFS_PREFIX")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/vrift")),
    };
    // Lexically normal (`/a/../b/` is `/b`), as the shim compares paths to it.
    if !at.is_absolute() || at.as_os_str().as_bytes().contains(&0) {
        bail!("--at {}: must be an absolute path", at.display());
    }
    let mut normal = PathBuf::from("/");
    for part in at.components() {
        match part {
            std::path::Component::Normal(name) => normal.push(name),
            std::path::Component::ParentDir => {
                normal.pop();
            }
            _ => {}
        }
    }
    if normal == Path::new("/") {
        bail!(
            "--at {}: the tree cannot hide the whole host; choose a directory such as /vrift",
            at.display()
        );
    }
    if normal.exists() && !normal.is_dir() {
        bail!("--at {}: exists and is not a directory", at.display());
    }
    let at = normal;
    let at_bytes = at.as_os_str().as_bytes();
    let library = library()?;
    let store = ctx.store_or_create()?;
    crate::run::commit_outside_store(commit_to.as_deref(), &store)?;
    // Held until the run is committed: gc must not take the view, the farm or the
    // blobs the command reads.
    let _lock = store.lock_shared()?;
    let root = match &args.remote {
        Some(name) => crate::remote::fetch_for_use(
            &store,
            &crate::remote::connect(&store, name)?,
            &args.manifest,
            velo_remote::Blobs::All,
        )?,
        None => crate::run::layer(&store, &args.manifest)?,
    };
    let view = velo_project::view::ensure_view(&store, root)?;
    if let Some(seconds) = view.built_seconds {
        note!(
            "velo: built the view of {} in {seconds:.2} s (cached for later runs)",
            &root.to_hex()[..16]
        );
    }
    let bytes = map(&view.index)?;
    let index = velo_view::View::new(bytes)
        .with_context(|| format!("{}: not a view index", view.index.display()))?;
    // `--workdir` inside the tree: `/sub`, `sub`, or `<at>/sub`.
    let workdir = args.workdir.as_deref().unwrap_or("");
    let workdir = Path::new(workdir)
        .strip_prefix(&at)
        .ok()
        .and_then(|rest| rest.to_str())
        .unwrap_or(workdir);
    // The dynamic loader opens libraries itself, by real paths whose directories must hold
    // their neighbours: a tree with shared libraries gets its (cached) farm for `dlopen`.
    let has_libraries = index.view_flags() & velo_view::VIEW_HAS_LIBRARIES != 0;
    let farm = if has_libraries {
        store.ensure_private_dirs()?;
        let (path, built) =
            velo_project::session::ensure_farm(&store, root, velo_store::FarmModes::ReadOnly)?;
        if let Some(built) = built {
            note!(
                "velo: built the link farm of {} for its shared libraries in {:.2} s (cached for later runs)",
                &root.to_hex()[..16],
                built.seconds
            );
        }
        Some(path)
    } else {
        None
    };
    let Some(program) = args.command.first() else {
        bail!("no command given (after --)");
    };
    // The run's changes: a temporary upper in a session of the store, or the user's.
    let session = store.new_session()?;
    let (upper, upper_lock, upper_is_temporary) = match &args.upper {
        Some(dir) => {
            let (path, lock) = velo_project::session::prepare_upper(store.root(), dir)?;
            velo_project::sandbox::spawn::keep_private(std::os::fd::AsRawFd::as_raw_fd(&lock));
            (path, Some(lock), false)
        }
        None => {
            let path = session.dir().join("upper");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            (path, None, true)
        }
    };
    // Where the command starts: a tree directory (the kernel's working directory is then
    // the run's empty placeholder), or a directory an earlier run on this upper made.
    let upper_start = {
        let rel = workdir.trim_matches('/');
        let (mut scratch, mut rel_buf, mut rel_len) =
            ([0u8; velo_view::PATH_MAX], [0u8; velo_view::PATH_MAX], 0);
        let layer = velo_project::view::DirLayer { upper: &upper };
        match index.resolve_layered(
            at_bytes,
            0,
            rel.as_bytes(),
            true,
            &layer,
            &mut scratch,
            &mut rel_buf,
            &mut rel_len,
        ) {
            velo_view::Layered::Tree(n)
                if index.node(n).is_ok_and(|n| n.kind == velo_view::Kind::Dir) =>
            {
                None
            }
            velo_view::Layered::Upper
                if upper.join(OsStr::from_bytes(&rel_buf[..rel_len])).is_dir() =>
            {
                Some(upper.join(OsStr::from_bytes(&rel_buf[..rel_len])))
            }
            _ => bail!("--workdir {workdir}: no such directory in the tree"),
        }
    };
    let start = {
        let rel = workdir.trim_matches('/');
        if rel.is_empty() {
            at.clone()
        } else {
            at.join(rel)
        }
    };
    let start_bytes = start.as_os_str().as_bytes();
    let mut real = resolve_program(
        &index,
        &view.exec_dir,
        &upper,
        at_bytes,
        start_bytes,
        program,
    )?;
    let mut argv0 = program.clone();
    let mut rest: Vec<OsString> = args.command[1..].to_vec();
    // A `#!` script in the tree: its interpreter runs with the script's tree path (as
    // the kernel would, but with the path the user sees, so `$0` is not in the store).
    if real.starts_with(&view.exec_dir) {
        if let Some((interpreter, option)) = shebang_of(&real)? {
            let script = if program.as_bytes().contains(&b'/') {
                program.clone()
            } else {
                at.join(program).into_os_string()
            };
            rest.splice(0..0, option.into_iter().chain([script]));
            real = resolve_program(
                &index,
                &view.exec_dir,
                &upper,
                at_bytes,
                start_bytes,
                &interpreter,
            )?;
            argv0 = interpreter;
        }
    }
    if let Some(why) = unshimmable(&real)? {
        bail!(
            "{}: cannot run through the LD_PRELOAD shim: {why}. Run it with `velo run --isolate` (or, later, on a `velo mount`)",
            program.to_string_lossy()
        );
    }
    let preload = match std::env::var_os("LD_PRELOAD") {
        Some(existing) if !existing.is_empty() => {
            let mut value = library.clone().into_os_string();
            value.push(":");
            value.push(existing);
            value
        }
        _ => library.clone().into_os_string(),
    };
    let touched = session.dir().join("touched");
    velo_project::view::write_touched(&index, &upper, &touched)?;
    // The run's own empty directory for the kernel's working directory while the
    // command works in a tree directory (and for descriptors of tree directories).
    let placeholder = session.dir().join("e");
    std::fs::DirBuilder::new()
        .mode(0o555)
        .create(&placeholder)
        .with_context(|| format!("creating {}", placeholder.display()))?;
    let mut command = std::process::Command::new(&real);
    command
        .arg0(&argv0)
        .args(&rest)
        .current_dir(upper_start.as_deref().unwrap_or(&placeholder))
        .env("LD_PRELOAD", preload)
        .env("VRIFT_VIEW", &view.index)
        .env("VRIFT_AT", &at)
        .env("VRIFT_STORE", store.root())
        .env("VRIFT_EXEC_DIR", &view.exec_dir)
        .env("VRIFT_CWD", workdir.trim_start_matches('/'))
        .env("VRIFT_FARM", farm.as_deref().unwrap_or(Path::new("")))
        .env("VRIFT_UPPER", &upper)
        .env("VRIFT_TOUCHED", &touched)
        .env("VRIFT_PLACEHOLDER", &placeholder)
        .env("PWD", &start);
    if upper_start.is_some() {
        // The kernel's working directory (in the upper) says where the command is.
        command.env_remove("VRIFT_CWD");
    }
    for kv in &args.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv:?}: expected K=V");
        };
        command.env(k, v);
    }
    let velo_pid = rustix::process::getpid();
    // SAFETY: runs in the child between fork and exec, calling only async-signal-safe
    // system calls (prctl, getppid, kill) and allocating nothing.
    unsafe {
        command.pre_exec(move || {
            // The command goes when velo does (killed): a run no one will commit or
            // clean up must not go on writing into a session gc may remove.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(velo_pid) {
                return Err(std::io::Error::other(
                    "velo exited before the command started",
                ));
            }
            Ok(())
        });
    }
    let supervisor = velo_project::sandbox::spawn::Supervisor::new()
        .context("catching signals to pass on to the command")?;
    let started = std::time::Instant::now();
    let (exit_code, command_started) = match command.spawn() {
        Ok(child) => (
            supervisor
                .wait(child.id(), false)
                .context("waiting for the command")?,
            true,
        ),
        Err(e) => {
            drop(supervisor);
            note!("velo: cannot run {}: {e}", program.to_string_lossy());
            (
                if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
                false,
            )
        }
    };
    let outcome = velo_project::session::RunOutcome {
        exit_code,
        upper,
        base: Some(root),
        farms_built: Vec::new(),
        // A copy-up keeps the tree's mode exactly: any mode the upper holds other than
        // the tree's is the command's own chmod.
        farm_modes: velo_store::FarmModes::Writable,
        run_seconds: started.elapsed().as_secs_f64(),
        session,
        upper_is_temporary,
        command_started,
        upper_lock,
    };
    crate::run::finish_run(ctx, &store, args, commit_to.as_deref(), root, outcome)
}
