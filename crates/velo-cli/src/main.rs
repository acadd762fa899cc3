//! `velo`: the command-line edge of Velo Rift.
//!
//! This crate owns argument parsing, output (human text, `--json`, progress bars) and exit
//! codes; everything else is a call into `velo-ingest` and `velo-store`. Errors become
//! `anyhow` chains here and nowhere below.

/// A line on stderr that never panics: a closed or full stderr (`2>&-`, `2>/dev/full`, a
/// reader that went away) must not abort a command half-way, e.g. between a run and its
/// commit.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// A line of the command's output on stdout: see [`fmt::out_line`].
macro_rules! out {
    ($($arg:tt)*) => {
        crate::fmt::out_line(format_args!($($arg)*))
    };
}

mod control;
mod doctor;
mod fmt;
mod mount;
mod read;
mod remote;
mod run;
mod shim;
mod workspace;
mod write;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Velo Rift: content-addressed trees, stored once, projected anywhere.
#[derive(Parser, Debug)]
#[command(name = "velo", version, about, long_about = None)]
struct Cli {
    /// Store directory [default: $VR_THE_SOURCE, else $XDG_DATA_HOME/velo, else ~/.local/share/velo]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,

    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Store a directory's files once each and record it as a tree; prints the root hash
    Ingest {
        /// The directory to ingest (only read, never modified)
        dir: PathBuf,
        /// Also write the tree as a .velo manifest
        #[arg(short = 'o', long = "output", value_name = "OUT.velo")]
        output: Option<PathBuf>,
        /// Register the root under this name (re-using a name moves it)
        #[arg(long)]
        name: Option<String>,
        /// Leave out paths matching GLOB (a GLOB without '/' matches names at any depth)
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Keep each entry's mtime, or record zero for reproducible roots
        #[arg(long, value_enum, default_value = "keep")]
        mtime: MtimeArg,
        /// Read every file even if the stat cache says it is unchanged
        #[arg(long)]
        no_cache: bool,
        /// Skip the final flush to stable storage (faster; a power cut may lose the newest objects)
        #[arg(long)]
        no_sync: bool,
        /// Leave out files and directories you may not read (listed in the summary and in
        /// --json) instead of failing
        #[arg(long)]
        skip_unreadable: bool,
    },
    /// List a directory of a tree
    Ls {
        /// A root name, a tree hash (or unique prefix), or a .velo file
        tree: String,
        /// A directory inside the tree
        path: Option<OsString>,
        /// Long format: mode, size, mtime, name
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into subdirectories
        #[arg(short = 'R')]
        recursive: bool,
    },
    /// Write a file of a tree to stdout
    Cat { tree: String, path: OsString },
    /// Show one entry's metadata
    Show { tree: String, path: OsString },
    /// List paths added, removed or modified from the first tree to the second (trees,
    /// or in a workspace also snapshot ids and branch names)
    Diff {
        from: String,
        to: String,
        /// Only the counts of added, removed and modified paths
        #[arg(long, conflicts_with = "patch")]
        stat: bool,
        /// Each changed file's lines as a unified diff (text files of up to 4 MiB whose
        /// bytes are in the store)
        #[arg(long)]
        patch: bool,
        /// The workspace whose snapshots and branches FROM and TO may name [default:
        /// $VELO_WORKSPACE, else the one the working directory is in]
        #[arg(long, short = 'w', value_name = "DIR")]
        workspace: Option<PathBuf>,
    },
    /// Materialise a tree as a directory: hard links into the store, reflinks or copies
    Checkout {
        /// A root name, a tree hash (or unique prefix), or a .velo file (with --remove: the
        /// checkout to remove)
        tree: String,
        /// Where (must not exist, or be an empty directory)
        #[arg(required_unless_present = "remove")]
        dir: Option<PathBuf>,
        /// Remove the checkout at the path given: its directories are made writable to
        /// empty them, its files (in hardlink mode, the store's own blobs) are never
        /// chmod'ed. Use it instead of `chmod -R u+w DIR && rm -rf DIR`, which would make
        /// the store's blobs writable
        #[arg(long)]
        remove: bool,
        /// hardlink: no data copied, files read-only; reflink/copy: independent writable files
        #[arg(long, value_enum, default_value = "hardlink")]
        mode: ModeArg,
        /// Give copied/reflinked files the set-uid/set-gid bits the tree records (left off
        /// by default: a tree from a .velo file or a sandbox may carry a set-uid file)
        #[arg(long)]
        preserve_setuid: bool,
    },
    /// Run a command in a tree: `--isolate` runs it in a rootless namespace sandbox whose
    /// root is an overlay of the layers' cached link farms and a copy-on-write upper
    Run {
        /// Run in the namespace sandbox. Without it, the command runs on the host with the
        /// LD_PRELOAD shim, which shows the tree at --at (dynamically linked programs only)
        #[arg(long)]
        isolate: bool,
        /// Without --isolate: where the tree appears [default: $VRIFT_VFS_PREFIX, else /vrift]
        #[arg(long, value_name = "PATH")]
        at: Option<PathBuf>,
        /// A base layer below the manifest (repeatable; later ones on top)
        #[arg(long = "base", value_name = "TREE")]
        bases: Vec<String>,
        /// The top layer: a root name, a tree hash, or a .velo file (imported first)
        #[arg(long, value_name = "TREE")]
        manifest: String,
        /// Keep the copy-on-write upper in DIR (default: a temporary session directory)
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Commit the run's changes into a new tree and write it to OUT.velo
        #[arg(long, value_name = "OUT.velo")]
        commit: Option<PathBuf>,
        /// Commit the run's changes and register the new tree under NAME
        #[arg(long)]
        name: Option<String>,
        /// Commit (--commit/--name) even when the command fails; by default only a run
        /// that exits 0 is committed
        #[arg(long)]
        commit_always: bool,
        /// none: an empty network namespace; host: the host's network
        #[arg(long, value_enum, default_value = "none")]
        net: NetArg,
        /// How the layers show file modes (mtimes are always exact). writable: as the tree
        /// records them (less group/other write and set-id bits), each such file a variant
        /// inode of its own (a reflink, or a copy where the store cannot reflink);
        /// read-only: less every write bit, sharing the store's inodes (no variant for a
        /// tree just ingested). auto: writable where the store reflinks, else read-only
        #[arg(long, value_enum, default_value = "auto")]
        farm_modes: FarmModesArg,
        /// Bind a host path in: SRC:DST or SRC:DST:ro
        #[arg(long = "bind", value_name = "SRC:DST[:ro]")]
        binds: Vec<String>,
        /// Working directory inside the sandbox
        #[arg(long)]
        workdir: Option<String>,
        /// Set an environment variable inside (K=V, repeatable)
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Fetch what the store lacks of the layers from this remote first (verified);
        /// a layer may be a root published there
        #[arg(long, value_name = "REMOTE")]
        remote: Option<String>,
        /// The command and its arguments
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Serve a tree as a read-write FUSE file system at MOUNTPOINT, in the background
    /// until `velo umount`; changes go copy-on-write to an upper, `velo commit` seals them
    Mount {
        /// A root name, a tree hash (or unique prefix), or a .velo file
        tree: String,
        /// An existing directory, outside the store
        mountpoint: PathBuf,
        /// Keep the changes in DIR (overlay format), across unmounts and crashes; by
        /// default they live until `velo umount` (which can commit them)
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// The name `velo commit` and `velo umount` register commits under by default
        #[arg(long)]
        name: Option<String>,
        /// Refuse every change (EROFS)
        #[arg(long)]
        read_only: bool,
        /// Let the kernel read tree files straight from the store (FUSE passthrough: Linux
        /// 6.9+, root). The kernel keeps one way of reading per file, so while a tree file
        /// is open for reading that way, opening it for writing fails (ETXTBSY)
        #[arg(long)]
        passthrough: bool,
        /// Serve in this process until unmounted, instead of in the background
        #[arg(long)]
        foreground: bool,
        /// Let other users in (needs root, or user_allow_other in /etc/fuse.conf)
        #[arg(long)]
        allow_other: bool,
        /// Fetch what the store lacks from this remote: the trees (and executables) at
        /// once, every other file's bytes on its first read (TREE may be a root published
        /// there)
        #[arg(long, value_name = "REMOTE")]
        remote: Option<String>,
    },
    /// Unmount a `velo mount` (also one whose server died), committing its changes first
    /// with --commit/--name (or the mount's --name)
    Umount {
        mountpoint: PathBuf,
        /// Commit the mount's changes into a new tree and write it to OUT.velo
        #[arg(long, value_name = "OUT.velo")]
        commit: Option<PathBuf>,
        /// Commit the mount's changes and register the new tree under NAME
        #[arg(long)]
        name: Option<String>,
    },
    /// Seal a mount's current state as a new tree; the mount goes on serving
    Commit {
        mountpoint: PathBuf,
        /// Register the new tree under NAME (default: the mount's --name)
        #[arg(long)]
        name: Option<String>,
        /// Also write it to OUT.velo
        #[arg(short = 'o', long = "output", value_name = "OUT.velo")]
        output: Option<PathBuf>,
    },
    /// Write a tree as a .velo manifest
    Export {
        tree: String,
        #[arg(short = 'o', long = "output", value_name = "OUT.velo")]
        output: PathBuf,
        /// Include every blob, so an empty store can import and run it
        #[arg(long)]
        with_blobs: bool,
    },
    /// Verify a .velo manifest and add its trees (and blobs) to the store
    Import {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// Register even if some blobs are neither in the file nor in the store
        #[arg(long)]
        partial: bool,
    },
    /// List registered roots
    Roots,
    /// Remotes: S3-compatible object storage that trees are pushed to and pulled from
    Remote {
        #[command(subcommand)]
        action: RemoteAction,
    },
    /// Upload the trees' objects that the remote lacks, then publish their roots (a tree
    /// given by root name is published under that name)
    Push {
        /// A remote (`velo remote add`)
        remote: String,
        /// Root names, tree hashes or .velo files
        #[arg(required = true)]
        trees: Vec<String>,
        /// Publish the (one) tree under this name
        #[arg(long)]
        name: Option<String>,
    },
    /// Fetch a published root (or a tree by hash) and every object the store lacks of it,
    /// verifying each against its hash, and register it
    Pull {
        /// A remote (`velo remote add`)
        remote: String,
        /// A root name published there, or a tree hash (64 hex digits)
        what: String,
        /// Register it under this name [default: the name on the remote]
        #[arg(long)]
        name: Option<String>,
    },
    /// Unregister a root name, or every registration of a root hash
    Forget {
        name_or_root: String,
        /// Also a workspace's roots (`ws.ID.base.BRANCH`, `ws.ID.snap.N`), which
        /// `velo branch delete` and `velo snapshot delete` let go: for a workspace that
        /// is gone
        #[arg(long)]
        force: bool,
    },
    /// Summarise the store
    Status,
    /// Report (or with --run, delete) what no registered root reaches
    Gc {
        #[arg(long)]
        run: bool,
    },
    /// Check the store; exit status 0 iff it is sound
    Fsck {
        /// Check metadata and structure only; do not re-hash blob contents
        #[arg(long)]
        quick: bool,
        /// Move damaged objects to quarantine/, restore bad modes, and list what is then
        /// missing and which roots need it (exit 0 iff the store is sound afterwards)
        #[arg(long)]
        repair: bool,
    },
    /// Report what this machine supports (reflink, FUSE, user namespaces, overlayfs)
    Doctor,
    /// Print a shell completion script (e.g. `velo completions bash > /etc/bash_completion.d/velo`)
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the manual page in roff (e.g. `velo man > velo.1; man ./velo.1`)
    Man {
        /// A command's own page (`velo man run`), with every option
        command: Option<String>,
    },
    /// Make or mount an agent workspace: branches of a tree, each writable on its own
    Workspace {
        #[command(subcommand)]
        action: WorkspaceAction,
    },
    /// Seal a workspace branch's state as a snapshot; list, show and delete them
    Snapshot {
        /// The workspace [default: $VELO_WORKSPACE, else the one the working directory is in]
        #[arg(long, short = 'w', value_name = "DIR", global = true)]
        workspace: Option<PathBuf>,
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Make, list, run in, reset and delete workspace branches
    Branch {
        /// The workspace [default: $VELO_WORKSPACE, else the one the working directory is in]
        #[arg(long, short = 'w', value_name = "DIR", global = true)]
        workspace: Option<PathBuf>,
        #[command(subcommand)]
        action: BranchAction,
    },
    #[command(hide = true, name = "__workspace-serve")]
    WorkspaceServe { dir: PathBuf, mountpoint: PathBuf },
    #[command(hide = true, name = "__probe-userns")]
    ProbeUserns,
    #[command(hide = true, name = "__probe-overlay")]
    ProbeOverlay { dir: PathBuf },
    #[command(hide = true, name = "__sandbox")]
    SandboxStage1,
}

#[derive(Subcommand, Debug)]
enum WorkspaceAction {
    /// Make workspace DIR over a tree (its branch `main`), and serve it at --mount
    Init {
        /// A new or empty directory: the workspace's records and every branch's changes
        dir: PathBuf,
        /// The tree: a root name, a tree hash (or unique prefix), or a .velo file
        #[arg(
            long,
            value_name = "TREE",
            required_unless_present = "lower",
            conflicts_with = "lower"
        )]
        from: Option<String>,
        /// A host directory as the base, not ingested: branch main shows it as it is now
        /// (indexed, no file read); it is never written; a file changed on the host later
        /// is refused (EIO), and a snapshot ingests it then
        #[arg(long, value_name = "HOSTDIR")]
        lower: Option<PathBuf>,
        /// Serve it here: branch main at MOUNTPOINT, every branch at
        /// MOUNTPOINT/.velo/branches/NAME
        #[arg(long, value_name = "MOUNTPOINT")]
        mount: Option<PathBuf>,
        /// Let `velo branch bind --pid` show other branches at MOUNTPOINT to running
        /// processes (the kernel then keeps nothing of the mount's top: a lookup per walk
        /// through it)
        #[arg(long, requires = "mount")]
        bindable: bool,
    },
    /// Serve an existing workspace at MOUNTPOINT (`velo umount MOUNTPOINT` stops it)
    Mount {
        dir: PathBuf,
        mountpoint: PathBuf,
        /// As for `workspace init --bindable`
        #[arg(long)]
        bindable: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RemoteAction {
    /// Record a remote: s3://BUCKET/PREFIX. Credentials come from the AWS environment
    /// variables or ~/.aws/credentials, never from a flag
    Add {
        name: String,
        #[arg(value_name = "s3://BUCKET/PREFIX")]
        url: String,
        /// Another endpoint than AWS's (MinIO, Garage, Ceph RGW…); http:// is allowed
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// The region [default: $AWS_REGION, the AWS config file, else us-east-1]
        #[arg(long)]
        region: Option<String>,
    },
    /// List the remotes
    List,
    /// Forget a remote (nothing on it is touched)
    Remove { name: String },
    /// List the roots published on a remote
    Ls { remote: String },
}

#[derive(Subcommand, Debug)]
enum SnapshotAction {
    /// Seal a branch's current state (default: $VELO_BRANCH, else main)
    Create {
        #[arg(long)]
        branch: Option<String>,
        #[arg(short = 'm', long = "message", value_name = "MSG")]
        message: Option<String>,
    },
    /// List the snapshots: id, tree, branch, message
    List,
    /// Show one snapshot
    Show { id: String },
    /// Delete a snapshot (what only it kept becomes collectable)
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
enum BranchAction {
    /// Make a branch from a snapshot, another branch or a tree (default: main's state)
    Create {
        name: String,
        #[arg(long, value_name = "SNAPSHOT|BRANCH|TREE")]
        from: Option<String>,
    },
    /// List the branches: name, base tree, whether they hold changes
    List,
    /// Delete a branch and its changes
    Delete { name: String },
    /// Run a command (and its children) seeing branch NAME at the workspace's mount point
    Exec {
        name: String,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Write a branch's changes since its base into a host directory (e.g. the checkout
    /// the workspace was made from); refused if a path it changes differs there
    Apply {
        name: String,
        dir: PathBuf,
        /// Overwrite paths that differ from the branch's base
        #[arg(long)]
        force: bool,
    },
    /// Show branch NAME at the workspace's mount point to a running process and its
    /// descendants (the mount must be --bindable; `branch exec` is the faster way for a
    /// command you start)
    Bind {
        name: String,
        #[arg(long)]
        pid: u32,
    },
    /// Take a process's binding away: it sees main again
    Unbind {
        #[arg(long)]
        pid: u32,
    },
    /// Roll a branch back to a snapshot (its changes since are dropped)
    Reset {
        name: String,
        #[arg(value_name = "SNAPSHOT")]
        to: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FarmModesArg {
    Auto,
    Writable,
    ReadOnly,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NetArg {
    None,
    Host,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Hardlink,
    Reflink,
    Copy,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum MtimeArg {
    Keep,
    Zero,
}

fn default_store() -> PathBuf {
    if let Some(dir) = std::env::var_os("VR_THE_SOURCE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("velo");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".local/share/velo")
}

fn init_logging() {
    let level = match std::env::var("VRIFT_DEBUG") {
        Ok(v) if ["trace", "debug", "info", "warn", "error"].contains(&v.as_str()) => v,
        Ok(v) if !v.is_empty() && v != "0" => "debug".to_string(),
        _ => "warn".to_string(),
    };
    let crates = [
        "velo",
        "velo_cli",
        "velo_store",
        "velo_ingest",
        "velo_core",
        "velo_project",
        "velo_view",
        "velo_fuse",
        "velo_workspace",
        "velo_remote",
    ];
    let directives: Vec<String> = crates.iter().map(|c| format!("{c}={level}")).collect();
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,{}", directives.join(",")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

/// Context handed to every command.
pub struct Ctx {
    store_path: PathBuf,
    json: bool,
}

impl Ctx {
    /// Opens the existing store (read commands never create one).
    pub fn store(&self) -> anyhow::Result<velo_store::Store> {
        Ok(velo_store::Store::open(&self.store_path)?)
    }

    /// Opens the store, creating it on first use (write commands).
    pub fn store_or_create(&self) -> anyhow::Result<velo_store::Store> {
        Ok(velo_store::Store::open_or_create(&self.store_path)?)
    }
}

fn main() -> ExitCode {
    // The sandbox's stage 1, when exec'd, sits on the start-up path of `velo run
    // --isolate`: skip the argument parser and the log filter for it.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("__sandbox")) {
        return run::sandbox_stage(velo_project::sandbox::stage1).unwrap_or(ExitCode::FAILURE);
    }
    // `velo branch exec` is on the start-up path of every command an agent runs in a
    // branch: its plain form skips the argument parser (building it costs about as much
    // as the rest of the command) and the log filter.
    if let Some(code) = branch_exec_fast() {
        return code;
    }
    init_logging();
    let nofile = raise_fd_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `velo run` reports its own failures as 125, never a status the command
            // could return (the container convention); other commands keep clap's 2.
            let run = std::env::args_os()
                .skip(1)
                .take_while(|a| a != "--")
                .any(|a| a == "run");
            let code = if run && e.use_stderr() {
                125
            } else {
                e.exit_code()
            };
            let _ = e.print();
            // `--json` promises one JSON document on stdout, usage errors included.
            let json = std::env::args_os()
                .skip(1)
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            if json && e.use_stderr() {
                let _ = fmt::try_print_json(&serde_json::json!({
                    "error": { "message": e.kind().to_string(), "usage": e.to_string(), "exit_code": code }
                }));
            }
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
    };
    let ctx = Ctx {
        store_path: cli.store.clone().unwrap_or_else(default_store),
        json: cli.json,
    };
    dispatch(&ctx, cli.command, nofile)
}

/// `velo branch [-w DIR | --workspace DIR] exec NAME -- CMD [ARGS...]`, exactly that form,
/// run without the argument parser; `None` for anything else (the parser then reports
/// and handles it as usual).
fn branch_exec_fast() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (workspace, rest) = match args.as_slice() {
        [branch, rest @ ..] if branch == "branch" => match rest {
            [flag, dir, rest @ ..]
                if (flag == "-w" || flag == "--workspace")
                    && !dir.as_encoded_bytes().starts_with(b"-") =>
            {
                (Some(PathBuf::from(dir)), rest)
            }
            [flag, ..] if flag.as_encoded_bytes().starts_with(b"-") => return None,
            _ => (None, rest),
        },
        _ => return None,
    };
    let [exec, name, dashes, command @ ..] = rest else {
        return None;
    };
    if exec != "exec" || dashes != "--" || command.is_empty() {
        return None;
    }
    let name = name.to_str()?;
    if name.starts_with('-') {
        return None;
    }
    let ctx = Ctx {
        store_path: default_store(),
        json: false,
    };
    let result = workspace::find(workspace.as_deref())
        .and_then(|ws| workspace::branch_exec(&ws, name, command, None));
    // A failure of velo itself exits 125, never a status the command could return.
    Some(match result {
        Ok(code) => code,
        Err(e) => report_error(&ctx, &e, 125),
    })
}

/// Runs one parsed command; returns its exit status (errors are reported here).
fn dispatch(ctx: &Ctx, command: Command, nofile: Option<u64>) -> ExitCode {
    let result = match command {
        Command::Ingest {
            dir,
            output,
            name,
            exclude,
            mtime,
            no_cache,
            no_sync,
            skip_unreadable,
        } => {
            let options = velo_ingest::IngestOptions {
                excludes: exclude,
                mtime: match mtime {
                    MtimeArg::Keep => velo_ingest::MtimePolicy::Keep,
                    MtimeArg::Zero => velo_ingest::MtimePolicy::Zero,
                },
                name,
                no_cache,
                no_sync,
                skip_unreadable,
                no_register: false,
            };
            write::ingest(ctx, &dir, &options, output.as_deref())
        }
        Command::Ls {
            tree,
            path,
            long,
            recursive,
        } => read::ls(
            ctx,
            &tree,
            path.as_deref().map(|p| p.as_bytes()),
            long,
            recursive,
        ),
        Command::Cat { tree, path } => read::cat(ctx, &tree, path.as_bytes()),
        Command::Show { tree, path } => read::show(ctx, &tree, path.as_bytes()),
        Command::Diff {
            from,
            to,
            stat,
            patch,
            workspace,
        } => {
            let show = match (stat, patch) {
                (true, _) => read::DiffShow::Stat,
                (_, true) => read::DiffShow::Patch,
                _ => read::DiffShow::Paths,
            };
            workspace::diff(ctx, &from, &to, show, workspace.as_deref())
        }
        Command::Workspace { action } => match action {
            WorkspaceAction::Init {
                dir,
                from,
                lower,
                mount,
                bindable,
            } => match (&from, &lower) {
                (Some(from), _) => workspace::init(
                    ctx,
                    &dir,
                    workspace::Over::Tree(from),
                    mount.as_deref(),
                    bindable,
                ),
                (None, Some(lower)) => workspace::init(
                    ctx,
                    &dir,
                    workspace::Over::Lower(lower),
                    mount.as_deref(),
                    bindable,
                ),
                (None, None) => Err(anyhow::anyhow!(
                    "velo workspace init needs --from TREE or --lower HOSTDIR"
                )),
            },
            WorkspaceAction::Mount {
                dir,
                mountpoint,
                bindable,
            } => workspace::mount(ctx, &dir, &mountpoint, bindable),
        },
        Command::WorkspaceServe { dir, mountpoint } => workspace::serve(&dir, &mountpoint),
        Command::Snapshot { workspace, action } => {
            workspace::find(workspace.as_deref()).and_then(|ws| match action {
                SnapshotAction::Create { branch, message } => {
                    workspace::snapshot_create(ctx, &ws, branch.as_deref(), message.as_deref())
                }
                SnapshotAction::List => workspace::snapshot_list(ctx, &ws),
                SnapshotAction::Show { id } => workspace::snapshot_show(ctx, &ws, &id),
                SnapshotAction::Delete { id } => workspace::snapshot_delete(ctx, &ws, &id),
            })
        }
        Command::Branch { workspace, action } => {
            let exec = matches!(action, BranchAction::Exec { .. });
            let result = workspace::find(workspace.as_deref()).and_then(|ws| match action {
                BranchAction::Create { name, from } => {
                    workspace::branch_create(ctx, &ws, &name, from.as_deref())
                }
                BranchAction::List => workspace::branch_list(ctx, &ws),
                BranchAction::Delete { name } => workspace::branch_delete(ctx, &ws, &name),
                BranchAction::Exec { name, command } => {
                    workspace::branch_exec(&ws, &name, &command, nofile)
                }
                BranchAction::Reset { name, to } => workspace::branch_reset(ctx, &ws, &name, &to),
                BranchAction::Bind { name, pid } => {
                    workspace::branch_bind(ctx, &ws, Some(&name), pid)
                }
                BranchAction::Unbind { pid } => workspace::branch_bind(ctx, &ws, None, pid),
                BranchAction::Apply { name, dir, force } => {
                    workspace::branch_apply(ctx, &ws, &name, &dir, force)
                }
            });
            // `branch exec` only returns on a failure of velo's: 125, as for `velo run`,
            // never a status the command could return.
            if exec {
                return match result {
                    Ok(code) => code,
                    Err(e) => report_error(ctx, &e, 125),
                };
            }
            result
        }
        Command::Checkout {
            tree, remove: true, ..
        } => read::remove_checkout(ctx, &PathBuf::from(tree)),
        Command::Checkout {
            tree,
            dir,
            mode,
            preserve_setuid,
            remove: false,
        } => {
            let dir = dir.ok_or_else(|| anyhow::anyhow!("velo checkout needs TREE and DIR"));
            let mode = match mode {
                ModeArg::Hardlink => velo_project::CheckoutMode::Hardlink,
                ModeArg::Reflink => velo_project::CheckoutMode::Reflink,
                ModeArg::Copy => velo_project::CheckoutMode::Copy,
            };
            let options = velo_project::CheckoutOptions {
                preserve_setid: preserve_setuid,
                ..velo_project::CheckoutOptions::new(mode)
            };
            dir.and_then(|dir| read::checkout(ctx, &tree, &dir, options))
        }
        Command::Export {
            tree,
            output,
            with_blobs,
        } => write::export(ctx, &tree, &output, with_blobs),
        Command::Import {
            file,
            name,
            partial,
        } => write::import(ctx, &file, name, partial),
        Command::Roots => write::roots(ctx),
        Command::Remote { action } => match action {
            RemoteAction::Add {
                name,
                url,
                endpoint,
                region,
            } => remote::add(ctx, &name, &url, endpoint, region),
            RemoteAction::List => remote::list(ctx),
            RemoteAction::Remove { name } => remote::remove(ctx, &name),
            RemoteAction::Ls { remote } => remote::ls(ctx, &remote),
        },
        Command::Push {
            remote,
            trees,
            name,
        } => remote::push(ctx, &remote, &trees, name.as_deref()),
        Command::Pull { remote, what, name } => remote::pull(ctx, &remote, &what, name.as_deref()),
        Command::Forget {
            name_or_root,
            force,
        } => write::forget(ctx, &name_or_root, force),
        Command::Status => write::status(ctx),
        Command::Mount {
            tree,
            mountpoint,
            upper,
            name,
            read_only,
            passthrough,
            foreground,
            allow_other,
            remote,
        } => mount::mount(
            ctx,
            &mount::MountArgs {
                tree,
                mountpoint,
                upper,
                name,
                read_only,
                passthrough,
                foreground,
                allow_other,
                remote,
            },
        ),
        Command::Umount {
            mountpoint,
            commit,
            name,
        } => mount::umount(ctx, &mountpoint, commit.as_deref(), name.as_deref()),
        Command::Commit {
            mountpoint,
            name,
            output,
        } => mount::commit(ctx, &mountpoint, output.as_deref(), name.as_deref()),
        Command::Gc { run } => write::gc(ctx, run),
        Command::Fsck { quick, repair } => write::fsck(ctx, quick, repair),
        Command::Doctor => doctor::doctor(ctx),
        Command::Completions { shell } => completions(shell),
        Command::Man { command } => man_page(command.as_deref()),
        Command::ProbeUserns => doctor::probe_userns(),
        Command::ProbeOverlay { dir } => doctor::probe_overlay(&dir),
        Command::SandboxStage1 => run::sandbox_stage(velo_project::sandbox::stage1),
        Command::Run {
            isolate,
            at,
            bases,
            manifest,
            upper,
            commit,
            name,
            commit_always,
            net,
            farm_modes,
            binds,
            workdir,
            env,
            remote,
            command,
        } => {
            let args = run::RunArgs {
                isolate,
                at,
                bases,
                manifest,
                upper,
                commit,
                name,
                host_net: net == NetArg::Host,
                farm_modes: match farm_modes {
                    FarmModesArg::Auto => None,
                    FarmModesArg::Writable => Some(velo_store::FarmModes::Writable),
                    FarmModesArg::ReadOnly => Some(velo_store::FarmModes::ReadOnly),
                },
                binds,
                workdir,
                env,
                command,
                commit_always,
                nofile,
                remote,
            };
            // A failure of velo itself exits 125, never a status the command could return.
            return match run::run(ctx, args) {
                Ok(code) => code,
                Err(e) => report_error(ctx, &e, 125),
            };
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => report_error(ctx, &e, 1),
    }
}

/// `velo completions SHELL`: the completion script clap derives from the arguments.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "velo", &mut script);
    out!("{}", String::from_utf8_lossy(&script).trim_end());
    Ok(ExitCode::SUCCESS)
}

/// `velo man`: the manual page (roff) clap derives from the arguments.
fn man_page(command: Option<&str>) -> anyhow::Result<ExitCode> {
    let top = <Cli as clap::CommandFactory>::command();
    let page_of = match command {
        None => top,
        Some(name) => {
            let sub = top
                .get_subcommands()
                .find(|c| c.get_name() == name && !c.is_hide_set())
                .ok_or_else(|| anyhow::anyhow!("velo has no command {name:?}; see velo --help"))?
                .clone();
            // The page is titled velo-NAME; clap wants a 'static name (one per process).
            let title: &'static str = Box::leak(format!("velo-{name}").into_boxed_str());
            sub.name(title)
        }
    };
    let mut page = Vec::new();
    clap_mangen::Man::new(page_of)
        .render(&mut page)
        .map_err(|e| anyhow::anyhow!("rendering the manual page: {e}"))?;
    out!("{}", String::from_utf8_lossy(&page).trim_end());
    Ok(ExitCode::SUCCESS)
}

/// Reports a failed command on stderr and, under `--json` (which promises one JSON
/// document on stdout), as `{"error": {"message", "exit_code"}}` on stdout too.
fn report_error(ctx: &Ctx, error: &anyhow::Error, code: u8) -> ExitCode {
    let mut message = format!("{error:#}");
    if let Some(hint) = remote::missing_blob_hint(ctx, error) {
        message = format!("{message}\n  ({hint})");
    }
    note!("velo: error: {message}");
    if ctx.json {
        let _ = fmt::try_print_json(&serde_json::json!({
            "error": { "message": message, "exit_code": code }
        }));
    }
    ExitCode::from(code)
}

/// Deep trees keep one fd open per directory level and worker; raise the soft limit to the
/// hard one so wide, deep trees do not run out. Returns the soft limit velo started with.
fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let original = limit.current;
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise the open-file limit");
        }
    }
    original
}
