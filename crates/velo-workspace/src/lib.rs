//! The agent workspace on disk: branches, snapshots, and what keeps their trees from gc.
//!
//! A workspace is a directory:
//!
//! ```text
//! DIR/workspace.json            {"v":1,"id","store","mount","top"}
//! DIR/branches/NAME/branch.json {"v":1,"name","base","created_unix","from"}
//! DIR/branches/NAME/upper/      the branch's changes (the one upper format)
//! DIR/snapshots/ID.json         {"v":1,"id","tree","branch","message","created_unix"}
//! ```
//!
//! A branch is a base tree and its own upper; creating one writes two small files and
//! an empty directory, whatever the tree's size. A snapshot is a sealed tree (the shared
//! commit routine of velo-project made it from a branch's base and upper), so writes
//! after it never show through it. Every branch base and snapshot is a registered root of
//! the store (`ws.<id>.base.<branch>`, `ws.<id>.snap.<snapshot>`): gc keeps them, and
//! deleting a branch or snapshot unregisters it, so what only it reached becomes
//! collectable.
//!
//! This crate owns those records; it calls velo-store (roots, trees) and velo-project
//! (commit) and is called by the CLI, which also runs the FUSE server of a workspace.
//! Records are replaced atomically and durably; a half-made branch (killed between its
//! directory and its record) is not listed and is made again by the next create.
#![deny(missing_docs)]

mod apply;
mod lower;

pub use apply::{apply, ApplyReport};
pub use lower::{fingerprint, index_host_dir, ingest_checked};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use velo_core::Hash;
use velo_store::{Durability, RootRecord, Store};

/// The record format's version.
const VERSION: u32 = 1;
/// The branch shown at the top of the mount, made by `init`.
pub const TOP_BRANCH: &str = "main";

/// What failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// A file of the workspace could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record is not what this version writes.
    #[error(
        "{path}: not a velo workspace record ({why}); it was damaged or written by another version"
    )]
    BadRecord {
        /// Which.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The user asked for something that cannot be.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] velo_store::StoreError),
    /// A commit failed.
    #[error(transparent)]
    Project(#[from] velo_project::ProjectError),
}

/// This crate's results.
pub type Result<T, E = WorkspaceError> = std::result::Result<T, E>;

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError {
    let path = path.to_path_buf();
    move |source| WorkspaceError::Io { op, path, source }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `workspace.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// Record version.
    pub v: u32,
    /// The workspace's id (names its roots in the store).
    pub id: String,
    /// The store its trees live in.
    pub store: PathBuf,
    /// Where it is mounted when it is.
    pub mount: Option<PathBuf>,
    /// Mounted so that processes can be bound to branches (`branch bind --pid`).
    #[serde(default)]
    pub bindable: bool,
    /// The host directory branch `main` shows (`init --lower`), indexed in `lower.idx`.
    #[serde(default)]
    pub lower: Option<PathBuf>,
    /// Where the workspace was made: a directory found elsewhere while this one still
    /// holds a workspace of the same id is a copy (records of older versions lack it).
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// `branches/NAME/branch.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BranchRecord {
    /// Record version.
    pub v: u32,
    /// The branch's name.
    pub name: String,
    /// The tree its upper's changes apply to (hex).
    pub base: String,
    /// When it was made or last reset.
    pub created_unix: u64,
    /// What it was made from, as the user named it.
    pub from: Option<String>,
    /// Its base is the workspace's host lower, not a tree (`base` is then `"lower"`).
    #[serde(default)]
    pub lower: bool,
}

impl BranchRecord {
    /// The base tree (for a branch over the host lower: an error saying so).
    pub fn base(&self) -> Result<Hash> {
        if self.lower {
            return Err(WorkspaceError::Refused(format!(
                "branch {} shows the workspace's host directory, not a tree",
                self.name
            )));
        }
        self.base.parse().map_err(|e| WorkspaceError::BadRecord {
            path: PathBuf::from(format!("branch {}", self.name)),
            why: format!("bad base: {e}"),
        })
    }
}

/// `snapshots/ID.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Record version.
    pub v: u32,
    /// Its id: a number, counted up in each workspace.
    pub id: String,
    /// The sealed tree (hex).
    pub tree: String,
    /// The branch it was taken of.
    pub branch: String,
    /// The user's message.
    pub message: Option<String>,
    /// When it was taken.
    pub created_unix: u64,
}

impl SnapshotRecord {
    /// The sealed tree.
    pub fn tree(&self) -> Result<Hash> {
        self.tree.parse().map_err(|e| WorkspaceError::BadRecord {
            path: PathBuf::from(format!("snapshot {}", self.id)),
            why: format!("bad tree: {e}"),
        })
    }
}

/// What a name given to `diff`, `branch create --from` or `branch reset` stands for.
#[derive(Clone, Debug)]
pub enum Named {
    /// A snapshot.
    Snapshot(SnapshotRecord),
    /// A branch (its current state is its base plus its upper).
    Branch(BranchRecord),
    /// A tree of the store.
    Tree(Hash),
}

/// An open workspace.
pub struct Workspace {
    dir: PathBuf,
    config: Config,
}

/// Checks a branch name: what a root name may hold (it is part of one), at most 64
/// characters (the control protocol's rule, so a name the CLI takes the server takes).
pub fn validate_branch_name(name: &str) -> Result<()> {
    velo_control::validate_branch_name(name).map_err(WorkspaceError::Refused)
}

fn write_record(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| WorkspaceError::BadRecord {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    bytes.push(b'\n');
    let dir = path.parent().unwrap_or(Path::new("."));
    velo_store::replace_file(path, dir, &bytes, Durability::Durable).map_err(io("writing", path))
}

fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(io("reading", path))?;
    if bytes.len() > 1 << 20 {
        return Err(WorkspaceError::BadRecord {
            path: path.to_path_buf(),
            why: "larger than 1 MiB".into(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| WorkspaceError::BadRecord {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

impl Workspace {
    /// Makes workspace `dir` (which must not exist, or be empty) over tree `base` of
    /// `store`, with branch [`TOP_BRANCH`].
    pub fn init(dir: &Path, store: &Store, base: Hash, mount: Option<&Path>) -> Result<Workspace> {
        let ws = Workspace::init_records(dir, store, mount)?;
        let made = ws
            .create_branch(store, TOP_BRANCH, base, None)
            // Written last: a directory without it is no workspace, and init may run again.
            .and_then(|_| write_record(&ws.dir.join("workspace.json"), &ws.config));
        if let Err(e) = made {
            // A failure (a full disk) leaves nothing: not a half-made directory that a
            // second init refuses as not empty, nor a root keeping the base.
            let _ = ws.remove(store);
            return Err(e);
        }
        Ok(ws)
    }

    /// The directory and the records of a new workspace, but its config and its branch.
    fn init_records(dir: &Path, store: &Store, mount: Option<&Path>) -> Result<Workspace> {
        check_path(dir)?;
        match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    // What an init killed half-way leaves: its directories, no record.
                    let killed = !dir.join("workspace.json").exists()
                        && std::fs::read_dir(dir).is_ok_and(|entries| {
                            entries.flatten().all(|e| {
                                e.file_name() == "branches" || e.file_name() == "snapshots"
                            })
                        });
                    let hint = if killed {
                        " (it holds only branches/ and snapshots/: an init that was killed; remove it and run again)"
                    } else {
                        ""
                    };
                    return Err(WorkspaceError::Refused(format!(
                        "{}: not empty; a workspace is made in a new or empty directory{hint}",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
            }
            Err(e) => return Err(io("reading", dir)(e)),
        }
        let dir = std::fs::canonicalize(dir).map_err(io("resolving", dir))?;
        let store_root =
            std::fs::canonicalize(store.root()).map_err(io("resolving", store.root()))?;
        let mut seed = [0u8; 16];
        let _ = rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty());
        seed[..8].copy_from_slice(&(now_unix() ^ u64::from(std::process::id())).to_le_bytes());
        let config = Config {
            v: VERSION,
            id: Hash::of_blob(&seed).to_hex()[..12].to_string(),
            store: store_root,
            mount: mount.map(Path::to_path_buf),
            bindable: false,
            lower: None,
            dir: Some(dir.clone()),
        };
        for sub in ["branches", "snapshots"] {
            let path = dir.join(sub);
            if let Err(e) = std::fs::create_dir(&path) {
                let _ = remove_dir(&dir);
                return Err(io("creating", &path)(e));
            }
        }
        // A branch records a deletion as a whiteout (a 0/0 character device) in its
        // upper: on a file system that cannot hold one (a velo mount refuses devices)
        // every delete of a file of the base would fail with EPERM, long after init.
        let probe = dir.join("snapshots/.whiteout-probe");
        let made = rustix::fs::mknodat(
            rustix::fs::CWD,
            &probe,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        );
        let _ = std::fs::remove_file(&probe);
        if let Err(e) = made {
            let _ = remove_dir(&dir);
            return Err(WorkspaceError::Refused(format!(
                "{}: this file system cannot hold the whiteouts that record deletions in a branch (mknod of a 0/0 character device: {e}); make the workspace on a local file system (ext4, xfs, btrfs, tmpfs), not inside a velo mount",
                dir.display()
            )));
        }
        Ok(Workspace { dir, config })
    }

    /// Makes workspace `dir` over host directory `lower`, not ingested: its branch
    /// [`TOP_BRANCH`] shows the directory as it is now (indexed, no file read), and the
    /// directory is never written. Returns the workspace and how many entries the index
    /// left out (sockets, fifos, devices).
    pub fn init_lower(
        dir: &Path,
        store: &Store,
        lower: &Path,
        mount: Option<&Path>,
    ) -> Result<(Workspace, u64)> {
        let lower = std::fs::canonicalize(lower).map_err(io("resolving --lower", lower))?;
        // Refused before anything is walked or made: a lower holding the workspace, its
        // store or its mount point would show (and snapshot) velo's own files.
        let inside = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        let store_root = velo_store::resolve_existing(store.root());
        for (what, path) in [
            ("the workspace", Some(velo_store::resolve_existing(dir))),
            ("its store", Some(store_root)),
            ("its mount point", mount.map(velo_store::resolve_existing)),
        ] {
            if let Some(path) = path.filter(|p| inside(&lower, p)) {
                return Err(WorkspaceError::Refused(format!(
                    "--lower {}: holds {what} {} (or is inside it); choose another directory",
                    lower.display(),
                    path.display()
                )));
            }
        }
        let (index, left_out) = index_host_dir(&lower)?;
        let mut ws = Workspace::init_records(dir, store, mount)?;
        let made = (|| {
            velo_store::replace_file(
                &ws.dir.join("lower.idx"),
                &ws.dir,
                &index,
                Durability::Durable,
            )
            .map_err(io("writing", &ws.dir.join("lower.idx")))?;
            let branch = ws.branch_dir(TOP_BRANCH);
            private_dir(&branch)?;
            private_dir(&branch.join("upper"))?;
            write_record(
                &branch.join("branch.json"),
                &BranchRecord {
                    v: VERSION,
                    name: TOP_BRANCH.to_string(),
                    base: "lower".to_string(),
                    created_unix: now_unix(),
                    from: Some(lower.to_string_lossy().into_owned()),
                    lower: true,
                },
            )?;
            ws.config.lower = Some(lower.clone());
            write_record(&ws.dir.join("workspace.json"), &ws.config)
        })();
        if let Err(e) = made {
            let _ = remove_dir(&ws.dir);
            return Err(e);
        }
        Ok((ws, left_out))
    }

    /// The lower index of a workspace made with [`Workspace::init_lower`].
    pub fn lower_index(&self) -> Result<Vec<u8>> {
        let path = self.dir.join("lower.idx");
        std::fs::read(&path).map_err(io("reading", &path))
    }

    /// The tree branch `record` applies its changes to: its base, or for a branch over
    /// the host lower, the lower ingested now and checked against its index.
    pub fn base_tree(&self, store: &Store, record: &BranchRecord) -> Result<Hash> {
        if !record.lower {
            return record.base();
        }
        let lower = self
            .config
            .lower
            .as_ref()
            .ok_or_else(|| WorkspaceError::BadRecord {
                path: self.dir.join("workspace.json"),
                why: format!(
                    "branch {} shows a host lower the workspace does not name",
                    record.name
                ),
            })?;
        let upper = self.upper_of(&record.name);
        let tree = ingest_checked(store, lower, &self.lower_index()?, Some(&upper))?;
        self.register(store, "base", &record.name, tree, None)?;
        Ok(tree)
    }

    /// Opens workspace `dir`.
    pub fn open(dir: &Path) -> Result<Workspace> {
        let dir = std::fs::canonicalize(dir).map_err(io("opening the workspace", dir))?;
        let path = dir.join("workspace.json");
        if !path.exists() {
            return Err(WorkspaceError::Refused(format!(
                "{}: not a velo workspace (no workspace.json); `velo workspace init` makes one",
                dir.display()
            )));
        }
        let config: Config = read_record(&path)?;
        if config.v != VERSION {
            return Err(WorkspaceError::BadRecord {
                path,
                why: format!("version {} (this velo reads {VERSION})", config.v),
            });
        }
        // A copy (`cp -a`) has the original's id, so its roots in the store: a snapshot
        // deleted in one would be freed under the other. A move leaves no original.
        // The same directory by another path (a bind mount) is no copy.
        let same_dir = |a: &Path, b: &Path| {
            use std::os::unix::fs::MetadataExt;
            match (std::fs::metadata(a), std::fs::metadata(b)) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            }
        };
        if let Some(made_at) = config
            .dir
            .as_ref()
            .filter(|d| **d != dir && !same_dir(d, &dir))
        {
            let original = read_record::<Config>(&made_at.join("workspace.json"));
            if original.is_ok_and(|o| o.id == config.id) {
                return Err(WorkspaceError::Refused(format!(
                    "{}: a copy of workspace {} (the same id, {}): the two would share their roots in the store, and what one deletes gc would free under the other. Work in the original, or make a new workspace from one of its snapshots (`velo workspace init DIR --from TREE`)",
                    dir.display(),
                    made_at.display(),
                    config.id
                )));
            }
        }
        Ok(Workspace { dir, config })
    }

    /// The workspace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Records where the workspace is mounted (`None`: not mounted), and whether
    /// processes can be bound to its branches there.
    pub fn set_mount(&mut self, mount: Option<&Path>, bindable: bool) -> Result<()> {
        self.config.mount = mount.map(Path::to_path_buf);
        self.config.bindable = bindable;
        write_record(&self.dir.join("workspace.json"), &self.config)
    }

    /// Whether root `name` is one a workspace keeps (a branch base, a snapshot): only
    /// the workspace's own commands should let it go.
    pub fn is_workspace_root(name: &str) -> bool {
        let mut parts = name.splitn(4, '.');
        parts.next() == Some("ws")
            && parts.next().is_some_and(|id| !id.is_empty())
            && parts
                .next()
                .is_some_and(|kind| matches!(kind, "base" | "snap" | "reset"))
            && parts.next().is_some_and(|rest| !rest.is_empty())
    }

    /// The lock that makes branch creates, deletes and resets one at a time.
    fn lock_branches(&self) -> Result<std::fs::File> {
        lock_dir(&self.dir.join("branches"))
    }

    fn root_name(&self, kind: &str, name: &str) -> String {
        format!("ws.{}.{kind}.{name}", self.config.id)
    }

    fn branch_dir(&self, name: &str) -> PathBuf {
        self.dir.join("branches").join(name)
    }

    /// Branch `name`'s upper directory.
    pub fn upper_of(&self, name: &str) -> PathBuf {
        self.branch_dir(name).join("upper")
    }

    /// Registers `tree` as root `ws.<id>.<kind>.<name>`. Its counts (files, bytes) are
    /// copied from a root of the same tree, or worked out from `near`'s (a registered
    /// tree it was made from) and the diff between them: a branch or snapshot of a large
    /// tree reads only what changed.
    fn register(
        &self,
        store: &Store,
        kind: &str,
        name: &str,
        tree: Hash,
        near: Option<Hash>,
    ) -> Result<()> {
        let roots = store.roots()?;
        let known = |hash: Hash| {
            roots
                .iter()
                .find(|r| r.root == hash.to_hex())
                .map(|r| r.stats)
        };
        let stats = match (known(tree), near.and_then(|n| Some((n, known(n)?)))) {
            (Some(stats), _) => stats,
            (None, Some((near, stats))) => stats_from(store, near, stats, tree)?,
            (None, None) => velo_store::treeops::stats(store, tree)?,
        };
        store.register_root(&RootRecord {
            name: Some(self.root_name(kind, name)),
            root: tree.to_hex(),
            created_unix: now_unix(),
            stats,
            partial: false,
            source: Some(format!("workspace {} {kind} {name}", self.dir.display())),
        })?;
        Ok(())
    }

    fn unregister(&self, store: &Store, kind: &str, name: &str) -> Result<()> {
        store.forget(&self.root_name(kind, name))?;
        Ok(())
    }

    /// Removes the workspace: every root it registered, then its directory (its
    /// branches' changes with it).
    pub fn remove(self, store: &Store) -> Result<()> {
        let prefix = format!("ws.{}.", self.config.id);
        for root in store.roots()? {
            if let Some(name) = root.name.filter(|n| n.starts_with(&prefix)) {
                store.forget(&name)?;
            }
        }
        remove_dir(&self.dir)
    }

    /// Every branch, by name (damaged records left out).
    pub fn branches(&self) -> Result<Vec<BranchRecord>> {
        Ok(self.branches_and_damage()?.0)
    }

    /// Every branch, by name, and the names of branches whose record is damaged (a
    /// damaged record hides nothing else; `delete_branch` removes it).
    pub fn branches_and_damage(&self) -> Result<(Vec<BranchRecord>, Vec<String>)> {
        let dir = self.dir.join("branches");
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let entry = entry.map_err(io("listing", &dir))?;
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                // A reset in progress, or one that was killed: not a branch.
                continue;
            }
            let record = entry.path().join("branch.json");
            if record.exists() {
                let name = entry.file_name().to_string_lossy().into_owned();
                match read_record::<BranchRecord>(&record) {
                    Ok(branch) if branch.name == name => out.push(branch),
                    _ => damaged.push(name),
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        damaged.sort();
        Ok((out, damaged))
    }

    /// Names of branches a create or delete killed half-way left behind: a directory
    /// without its record, or a root of the branch's with no record. Not branches;
    /// [`Workspace::finish_delete`] removes what is left (and a create makes the branch).
    pub fn unfinished_branches(&self, store: &Store) -> Result<Vec<String>> {
        let mut names = std::collections::BTreeSet::new();
        let dir = self.dir.join("branches");
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let entry = entry.map_err(io("listing", &dir))?;
            if let Some(name) = entry.file_name().to_str() {
                names.insert(name.to_string());
            }
        }
        for kind in ["base", "reset"] {
            let prefix = self.root_name(kind, "");
            for root in store.roots()? {
                if let Some(name) = root.name.as_deref().and_then(|n| n.strip_prefix(&prefix)) {
                    names.insert(name.to_string());
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            if validate_branch_name(&name).is_err() {
                continue;
            }
            // Only a record known to be absent makes an unfinished branch: one this user
            // may not see (EACCES) is an error, not a branch to clean up.
            let record = self.branch_dir(&name).join("branch.json");
            match record.try_exists() {
                Ok(true) => {}
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(io("reading", &record)(e));
                }
                // Absent, or no directory to hold it (a file put there by hand).
                Ok(false) | Err(_) => out.push(name),
            }
        }
        Ok(out)
    }

    /// Removes what an interrupted create or delete of branch `name` left (its
    /// directory, its roots); false if nothing is left.
    pub fn finish_delete(&self, store: &Store, name: &str) -> Result<bool> {
        let _lock = self.lock_branches()?;
        if !self.unfinished_branches(store)?.iter().any(|n| n == name) {
            return Ok(false);
        }
        remove_dir(&self.branch_dir(name))?;
        self.unregister(store, "reset", name)?;
        self.unregister(store, "base", name)?;
        Ok(true)
    }

    /// Branch `name`.
    pub fn branch(&self, name: &str) -> Result<BranchRecord> {
        validate_branch_name(name)?;
        let path = self.branch_dir(name).join("branch.json");
        if !path.exists() {
            return Err(WorkspaceError::Refused(format!(
                "no branch {name} in workspace {} (`velo branch list` lists them)",
                self.dir.display()
            )));
        }
        let record: BranchRecord = read_record(&path)?;
        // Its name is its directory's: another (edited by hand) would lead elsewhere.
        if record.name != name {
            return Err(WorkspaceError::BadRecord {
                path,
                why: format!("it names branch {:?}", record.name),
            });
        }
        Ok(record)
    }

    /// Makes branch `name` over tree `base` with an empty upper: no tree is read or
    /// copied. `from` is what the user named as its origin.
    pub fn create_branch(
        &self,
        store: &Store,
        name: &str,
        base: Hash,
        from: Option<&str>,
    ) -> Result<BranchRecord> {
        validate_branch_name(name)?;
        // One create, delete or reset at a time: two creates of one name must not both
        // pass the check below.
        let _lock = self.lock_branches()?;
        let dir = self.branch_dir(name);
        let record_path = dir.join("branch.json");
        if record_path.exists() {
            return Err(WorkspaceError::Refused(format!(
                "branch {name} exists (`velo branch delete {name}` first, or choose another name)"
            )));
        }
        // A directory without its record is a create that was killed half-way: made again.
        if dir.exists() {
            remove_dir(&dir)?;
        }
        let record = BranchRecord {
            v: VERSION,
            name: name.to_string(),
            base: base.to_hex(),
            created_unix: now_unix(),
            from: from.map(str::to_string),
            lower: false,
        };
        let made = private_dir(&dir)
            .and_then(|()| private_dir(&dir.join("upper")))
            .and_then(|()| self.register(store, "base", name, base, None))
            .and_then(|()| write_record(&record_path, &record));
        if let Err(e) = made {
            // A create that fails (a full disk) leaves nothing; only one that is killed
            // leaves what `unfinished_branches` lists.
            let _ = remove_dir(&dir);
            let _ = self.unregister(store, "base", name);
            return Err(e);
        }
        Ok(record)
    }

    /// Deletes branch `name`: its changes and its record; its base becomes collectable
    /// unless something else keeps it.
    pub fn delete_branch(&self, store: &Store, name: &str) -> Result<()> {
        let _lock = self.lock_branches()?;
        // A damaged record is deleted too: nothing else could remove it.
        match self.branch(name) {
            Ok(_) | Err(WorkspaceError::BadRecord { .. }) => {}
            Err(e) => return Err(e),
        }
        let dir = self.branch_dir(name);
        // The record goes first: a delete killed half-way leaves no listed branch.
        let record = dir.join("branch.json");
        std::fs::remove_file(&record).map_err(io("removing", &record))?;
        remove_dir(&dir)?;
        self.unregister(store, "reset", name)?;
        self.unregister(store, "base", name)
    }

    /// Makes sure branch `record`'s base is registered under the branch's root name (what
    /// a reset killed between its swap and its registration leaves undone).
    pub fn keep_base(&self, store: &Store, record: &BranchRecord) -> Result<()> {
        if record.lower {
            return Ok(());
        }
        let name = self.root_name("base", &record.name);
        if store
            .root_by_name(&name)?
            .is_some_and(|r| r.root == record.base)
        {
            return Ok(());
        }
        self.register(store, "base", &record.name, record.base()?, None)
    }

    /// Points branch `name` at tree `base` and empties its upper (its changes are gone:
    /// snapshot first to keep them).
    ///
    /// The new branch (record and empty upper) is made beside the old one and the two
    /// directories are swapped in one `renameat2(RENAME_EXCHANGE)`, so a reset that fails
    /// or is killed leaves the old branch or the new, never a mix; both bases stay
    /// registered until the swap is done.
    pub fn reset_branch(
        &self,
        store: &Store,
        name: &str,
        base: Hash,
        from: &str,
    ) -> Result<BranchRecord> {
        let _lock = self.lock_branches()?;
        let mut record = self.branch(name)?;
        // A reset killed after its swap left the base registered under its reset name
        // only: registered under the branch's again, before that name is used anew.
        self.keep_base(store, &record)?;
        let branches = self.dir.join("branches");
        // Branch names never start with '.': this is nobody's branch, and not listed.
        let staged = branches.join(format!(".{name}.reset"));
        if staged.exists() {
            remove_dir(&staged)?;
        }
        self.register(store, "reset", name, base, None)?;
        record.base = base.to_hex();
        record.created_unix = now_unix();
        record.from = Some(from.chars().take(256).collect());
        record.lower = false;
        let made = (|| {
            private_dir(&staged)?;
            private_dir(&staged.join("upper"))?;
            write_record(&staged.join("branch.json"), &record)?;
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                self.branch_dir(name),
                rustix::fs::CWD,
                &staged,
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .map_err(|e| io("swapping in the reset branch", &staged)(e.into()))
        })();
        if let Err(e) = made {
            let _ = remove_dir(&staged);
            let _ = self.unregister(store, "reset", name);
            return Err(e);
        }
        sync_dir(&branches);
        // Swapped: the old branch is the staged directory now.
        self.register(store, "base", name, base, None)?;
        self.unregister(store, "reset", name)?;
        remove_dir(&staged)?;
        Ok(record)
    }

    /// Every snapshot, oldest first, and the files of damaged snapshot records (a
    /// damaged record hides nothing else).
    pub fn snapshots_and_damage(&self) -> Result<(Vec<SnapshotRecord>, Vec<PathBuf>)> {
        let dir = self.dir.join("snapshots");
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let path = entry.map_err(io("listing", &dir))?.path();
            if let Some(id) = snapshot_id_of(&path) {
                // A record naming no tree, or another id, is damaged too (edited by hand).
                match read_record::<SnapshotRecord>(&path) {
                    Ok(record) if record.tree().is_ok() && record.id == id.to_string() => {
                        out.push(record)
                    }
                    _ => damaged.push(path),
                }
            }
        }
        out.sort_by_key(|s| s.id.parse::<u64>().unwrap_or(u64::MAX));
        damaged.sort();
        Ok((out, damaged))
    }

    /// Every snapshot, oldest first (damaged records left out).
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        Ok(self.snapshots_and_damage()?.0)
    }

    /// Snapshot `id`.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        read_record(&self.snapshot_path(id)?)
    }

    fn snapshot_path(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || id.len() > 19 {
            return Err(WorkspaceError::Refused(format!(
                "{id:?}: a snapshot id is a number (`velo snapshot list` lists them)"
            )));
        }
        let path = self.dir.join("snapshots").join(format!("{id}.json"));
        if !path.exists() {
            return Err(WorkspaceError::Refused(format!(
                "no snapshot {id} in workspace {}",
                self.dir.display()
            )));
        }
        Ok(path)
    }

    /// Records tree `tree` (sealed from `branch`) as a new snapshot and keeps it from gc.
    /// Ids are given out under a lock on the snapshots' directory; the root is registered
    /// before the record is written, and unregistered if that fails, so a record always
    /// names a kept tree and a failure leaves no record.
    pub fn add_snapshot(
        &self,
        store: &Store,
        tree: Hash,
        branch: &str,
        message: Option<&str>,
    ) -> Result<SnapshotRecord> {
        let dir = self.dir.join("snapshots");
        let _lock = lock_dir(&dir)?;
        // Never an id given out before, even if its snapshot was deleted: a script that
        // kept an id must not find other content under it. `.next` remembers the highest.
        let high_water = dir.join(".next");
        let mut next = std::fs::read_to_string(&high_water)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(1)
            .max(1);
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let path = entry.map_err(io("listing", &dir))?.path();
            if let Some(id) = snapshot_id_of(&path) {
                next = next.max(id.saturating_add(1));
            }
        }
        let record = SnapshotRecord {
            v: VERSION,
            id: next.to_string(),
            tree: tree.to_hex(),
            branch: branch.to_string(),
            message: message.map(|m| m.chars().take(4096).collect()),
            created_unix: now_unix(),
        };
        let near = self.branch(branch).ok().and_then(|b| b.base().ok());
        self.register(store, "snap", &record.id, tree, near)?;
        let path = dir.join(format!("{}.json", record.id));
        if let Err(e) = write_record(&path, &record) {
            let _ = self.unregister(store, "snap", &record.id);
            return Err(e);
        }
        // After the record: if this fails, the listing still gives the next id.
        let _ = velo_store::replace_file(
            &high_water,
            &dir,
            format!("{}\n", next.saturating_add(1)).as_bytes(),
            velo_store::Durability::Durable,
        );
        Ok(record)
    }

    /// Deletes snapshot `id`; its tree becomes collectable unless something else keeps it.
    /// A damaged record is deleted too.
    pub fn delete_snapshot(&self, store: &Store, id: &str) -> Result<()> {
        let path = self.snapshot_path(id)?;
        std::fs::remove_file(&path).map_err(io("removing", &path))?;
        self.unregister(store, "snap", id)
    }

    /// What `spec` names: a snapshot id, a branch, or a tree of the store (a root name,
    /// a hash or its prefix, a .velo file).
    pub fn resolve(&self, store: &Store, spec: &str) -> Result<Named> {
        if !spec.is_empty() && spec.len() <= 19 && spec.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(s) = self.snapshot(spec) {
                return Ok(Named::Snapshot(s));
            }
        }
        if validate_branch_name(spec).is_ok() && self.branch_dir(spec).join("branch.json").exists()
        {
            return Ok(Named::Branch(self.branch(spec)?));
        }
        store.resolve(spec).map(Named::Tree).map_err(|e| {
            WorkspaceError::Refused(format!(
                "{spec:?}: no snapshot or branch of that name in workspace {}, and not a tree of the store ({e})",
                self.dir.display()
            ))
        })
    }
}

/// A directory only its owner may enter: what a command makes in an upper (as root, a
/// set-uid file) must not be reachable by other users.
fn private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io("creating", path))
}

/// Refuses a workspace path its branches' uppers could not be used under: a branch's
/// upper is also an overlayfs upper (`velo run --upper`), and overlayfs takes only UTF-8
/// paths without ':' ',' or '\\'.
fn check_path(dir: &Path) -> Result<()> {
    let absolute = std::path::absolute(dir).map_err(io("resolving", dir))?;
    match absolute.to_str() {
        Some(text) if !text.contains([':', ',', '\\']) => Ok(()),
        _ => Err(WorkspaceError::Refused(format!(
            "{}: a workspace's path is UTF-8 without ':' ',' or '\\' (its branches' uppers are overlayfs uppers too); choose another directory",
            dir.display()
        ))),
    }
}

/// The id of snapshot record `path` (`N.json`).
fn snapshot_id_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
    if name.is_empty() || name.len() > 19 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

/// Flushes directory `dir`'s entries (a rename in it) to disk, as far as it can.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The counts of `tree`, from those of `near` and the paths that differ between them.
fn stats_from(
    store: &Store,
    near: Hash,
    mut stats: velo_store::RootStats,
    tree: Hash,
) -> Result<velo_store::RootStats> {
    use velo_core::EntryKind;
    use velo_store::treeops::{self, ChangeKind, Found};
    let entry = |root: Hash, path: &[u8]| match treeops::lookup(store, root, path) {
        Ok(Found::Entry(e)) => Ok(Some(e)),
        Ok(Found::Root(_)) | Err(velo_store::StoreError::NoSuchPath { .. }) => Ok(None),
        Err(e) => Err(WorkspaceError::from(e)),
    };
    let mut count = |e: &velo_core::Entry, sign: bool| {
        let step = |n: u64, by: u64| {
            if sign {
                n.saturating_add(by)
            } else {
                n.saturating_sub(by)
            }
        };
        match &e.kind {
            EntryKind::File { size, .. } => {
                stats.files = step(stats.files, 1);
                stats.bytes = step(stats.bytes, *size);
            }
            EntryKind::Dir { .. } => stats.dirs = step(stats.dirs, 1),
            EntryKind::Symlink { .. } => stats.symlinks = step(stats.symlinks, 1),
        }
    };
    for change in treeops::diff(store, near, tree)? {
        if change.change != ChangeKind::Added {
            if let Some(old) = entry(near, &change.path)? {
                count(&old, false);
            }
        }
        if change.change != ChangeKind::Removed {
            if let Some(new) = entry(tree, &change.path)? {
                count(&new, true);
            }
        }
    }
    Ok(stats)
}

/// An exclusive `flock` on directory `dir`, held while the file lives.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let lock = std::fs::File::open(dir).map_err(io("opening", dir))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io("locking", dir)(e.into()))?;
    Ok(lock)
}

fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // A file where a branch's directory would be (put there by hand): it goes too.
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            std::fs::remove_file(path).map_err(io("removing", path))
        }
        Err(e) => Err(io("removing", path)(e)),
    }
}

/// The workspace at `start` or above it (the directory holding `workspace.json`).
pub fn find_from(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| dir.join("workspace.json").is_file())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_tree(dir: &Path) -> (Store, Hash) {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/a"), b"alpha").unwrap();
        let store = Store::open_or_create(dir.join("store")).unwrap();
        let report = velo_ingest::ingest(
            &store,
            &src,
            &velo_ingest::IngestOptions::default(),
            &velo_ingest::Progress::default(),
        )
        .unwrap();
        (store, report.root)
    }

    #[test]
    fn branches_and_snapshots_are_recorded_and_kept_from_gc() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, root) = store_with_tree(tmp.path());
        let ws = Workspace::init(&tmp.path().join("ws"), &store, root, None).unwrap();
        assert_eq!(ws.branches().unwrap().len(), 1);
        let b = ws
            .create_branch(&store, "task-1", root, Some("main"))
            .unwrap();
        assert_eq!(b.base().unwrap(), root);
        assert!(ws.create_branch(&store, "task-1", root, None).is_err());
        assert!(ws.create_branch(&store, "../x", root, None).is_err());
        let s1 = ws
            .add_snapshot(&store, root, "task-1", Some("first"))
            .unwrap();
        let s2 = ws.add_snapshot(&store, root, "task-1", None).unwrap();
        assert_eq!((s1.id.as_str(), s2.id.as_str()), ("1", "2"));
        let names: Vec<String> = store
            .roots()
            .unwrap()
            .into_iter()
            .filter_map(|r| r.name)
            .collect();
        let id = &ws.config().id;
        for want in [
            format!("ws.{id}.base.main"),
            format!("ws.{id}.base.task-1"),
            format!("ws.{id}.snap.1"),
            format!("ws.{id}.snap.2"),
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        assert!(matches!(
            ws.resolve(&store, "1").unwrap(),
            Named::Snapshot(_)
        ));
        assert!(matches!(
            ws.resolve(&store, "task-1").unwrap(),
            Named::Branch(_)
        ));
        ws.delete_snapshot(&store, "1").unwrap();
        ws.delete_branch(&store, "task-1").unwrap();
        assert!(ws.branch("task-1").is_err());
        assert!(ws.snapshot("1").is_err());
        let names: Vec<String> = store
            .roots()
            .unwrap()
            .into_iter()
            .filter_map(|r| r.name)
            .collect();
        assert!(!names.contains(&format!("ws.{id}.snap.1")));
        assert!(!names.contains(&format!("ws.{id}.base.task-1")));
        // A reopened workspace reads the same records.
        let again = Workspace::open(ws.dir()).unwrap();
        assert_eq!(again.snapshots().unwrap(), vec![s2]);
    }

    #[test]
    fn a_snapshot_counts_its_tree_from_the_diff_as_a_full_walk_would() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, root) = store_with_tree(tmp.path());
        let ws = Workspace::init(&tmp.path().join("ws"), &store, root, None).unwrap();
        // Another tree: a file added, one grown, a directory replaced by a symlink.
        let src = tmp.path().join("src2");
        std::fs::create_dir_all(src.join("e/f")).unwrap();
        std::fs::write(src.join("e/f/g"), b"0123456789").unwrap();
        std::fs::write(src.join("top"), b"x").unwrap();
        std::os::unix::fs::symlink("e", src.join("d")).unwrap();
        let changed = velo_ingest::ingest(
            &store,
            &src,
            &velo_ingest::IngestOptions::default(),
            &velo_ingest::Progress::default(),
        )
        .unwrap()
        .root;
        store.forget(&format!("@{changed}")).ok();
        store.forget(&changed.to_hex()).ok();
        let snap = ws.add_snapshot(&store, changed, TOP_BRANCH, None).unwrap();
        let recorded = store
            .root_by_name(&format!("ws.{}.snap.{}", ws.config().id, snap.id))
            .unwrap()
            .unwrap()
            .stats;
        assert_eq!(
            recorded,
            velo_store::treeops::stats(&store, changed).unwrap()
        );
    }

    fn ingest_dir(store: &Store, dir: &Path, files: &[(&str, &[u8])]) -> Hash {
        for (path, bytes) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        velo_ingest::ingest(
            store,
            dir,
            &velo_ingest::IngestOptions::default(),
            &velo_ingest::Progress::default(),
        )
        .unwrap()
        .root
    }

    #[test]
    fn a_branch_base_registered_nowhere_else_is_kept_by_the_branch_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, root) = store_with_tree(tmp.path());
        let ws = Workspace::init(&tmp.path().join("ws"), &store, root, None).unwrap();
        let b = ws.create_branch(&store, "b", root, None).unwrap();
        // What a reset killed between its swap and its registration leaves: the record's
        // base under no root of the branch's name.
        let name = format!("ws.{}.base.b", ws.config().id);
        store.forget(&name).unwrap();
        ws.keep_base(&store, &b).unwrap();
        assert_eq!(store.root_by_name(&name).unwrap().unwrap().root, b.base);
        let other = ingest_dir(&store, &tmp.path().join("other"), &[("o", b"o")]);
        store.forget(&name).unwrap();
        let reset = ws.reset_branch(&store, "b", other, "other").unwrap();
        assert_eq!(reset.base, other.to_hex());
        assert_eq!(
            store.root_by_name(&name).unwrap().unwrap().root,
            other.to_hex()
        );
        let reset_name = format!("ws.{}.reset.b", ws.config().id);
        assert!(store.root_by_name(&reset_name).unwrap().is_none());
        ws.delete_branch(&store, "b").unwrap();
        assert!(store.root_by_name(&name).unwrap().is_none());
    }

    #[test]
    fn apply_keeps_the_hosts_own_files_and_turns_files_into_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(tmp.path().join("store")).unwrap();
        let base = ingest_dir(
            &store,
            &tmp.path().join("a"),
            &[("gone/x", b"x"), ("becomes-dir", b"f"), ("kept", b"k")],
        );
        let b = tmp.path().join("b");
        std::fs::create_dir_all(b.join("becomes-dir")).unwrap();
        std::fs::write(b.join("becomes-dir/inside"), b"i").unwrap();
        rustix::fs::setxattr(
            b.join("becomes-dir/inside"),
            "user.kept",
            b"yes",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let new = ingest_dir(&store, &b, &[("kept", b"k")]);
        let host = tmp.path().join("host");
        for (path, bytes) in [("gone/x", &b"x"[..]), ("becomes-dir", b"f"), ("kept", b"k")] {
            let path = host.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        // A file of the host's own in a directory the branch removes: a conflict.
        std::fs::write(host.join("gone/untracked"), b"mine").unwrap();
        let e = apply(&store, base, new, &host, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gone") && e.contains("nothing written"), "{e}");
        assert_eq!(std::fs::read(host.join("gone/untracked")).unwrap(), b"mine");
        assert!(host.join("becomes-dir").is_file());
        // Without it, the apply goes through: a file became a directory.
        std::fs::remove_file(host.join("gone/untracked")).unwrap();
        apply(&store, base, new, &host, false).unwrap();
        assert!(!host.join("gone").exists());
        assert_eq!(
            std::fs::read(host.join("becomes-dir/inside")).unwrap(),
            b"i"
        );
        // With the branch's extended attributes.
        let mut value = [0u8; 8];
        let n =
            rustix::fs::getxattr(host.join("becomes-dir/inside"), "user.kept", &mut value).unwrap();
        assert_eq!(&value[..n], b"yes");
    }

    #[test]
    fn a_damaged_record_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, root) = store_with_tree(tmp.path());
        let ws = Workspace::init(&tmp.path().join("ws"), &store, root, None).unwrap();
        std::fs::write(ws.dir().join("branches/main/branch.json"), b"{not json").unwrap();
        let e = ws.branch("main").unwrap_err().to_string();
        assert!(e.contains("not a velo workspace record"), "{e}");
        assert!(Workspace::init(ws.dir(), &store, root, None).is_err());
    }
}
