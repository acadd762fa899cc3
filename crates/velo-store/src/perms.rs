//! Who may write into the store: nothing another local user can write may reach what the
//! store's runs read.
//!
//! Cached farms (`farms/<root>.2`) are shared by every later run of the store's owner, and
//! `sessions/` holds the uppers of runs. A base image's world-writable directory
//! (`var/tmp`, 1777) used to become a world-writable directory inside `farms/`: any local
//! user who could traverse to it could plant files a later sandbox would see. Two walls
//! keep them out:
//! 1. `farms/` and `sessions/` are 0700, so no one else can even enter them (the overlay
//!    is mounted by the owner, who reads them as before);
//! 2. no directory of a hard-linked checkout (so of a farm) gets group or other write
//!    (velo-project's checkout), so the first wall can later open up to a mapped uid that
//!    must traverse farms without letting anyone write there.
//!
//! The other directories of the store are 0755, never group or other writable. `fsck` and
//! `doctor` report any that are, with the command that fixes it; a command that opens the
//! store to write fixes `farms/` and `sessions/` itself (they are velo's own caches).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::fsck::Problem;
use crate::Store;

/// Directories only the owner may enter.
pub(crate) const PRIVATE_DIRS: [&str; 3] = ["farms", "sessions", "views"];

const GROUP_OTHER_WRITE: u32 = 0o022;
const GROUP_OTHER_ANY: u32 = 0o077;

fn unsafe_dir(path: &Path, detail: String) -> Problem {
    Problem {
        kind: "unsafe-permissions",
        object: path.display().to_string(),
        detail,
    }
}

impl Store {
    /// Makes `farms/` and `sessions/` (0700) if missing, and takes group and other
    /// permissions off them where the owner's own older store left them open. Failures
    /// are logged: fsck reports what stays wrong.
    pub(crate) fn secure_private_dirs(&self) {
        use std::os::unix::fs::DirBuilderExt;
        let me = rustix::process::geteuid().as_raw();
        for name in PRIVATE_DIRS {
            let path = self.root.join(name);
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot create");
                    continue;
                }
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() && meta.uid() == me && meta.mode() & GROUP_OTHER_ANY != 0 {
                match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)) {
                    Ok(()) => tracing::info!(path = %path.display(), "made private (0700)"),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot make private")
                    }
                }
            }
        }
    }

    /// Fails unless `farms/` and `sessions/` are private directories of the caller (made
    /// so first where they are the caller's) and no one else can write the store's own
    /// directory (who can rename `farms/` can put another in its place). A run reads its
    /// layers from `farms/`: a farm someone else could write is a command they choose.
    pub fn ensure_private_dirs(&self) -> crate::Result<()> {
        self.secure_private_dirs();
        let me = rustix::process::geteuid().as_raw();
        let refuse = |path: &Path, why: String| {
            Err(crate::StoreError::Invalid(format!(
                "{}: {why}; velo will not run from this store until it is fixed (`velo doctor` and `velo fsck` say more)",
                path.display()
            )))
        };
        let root = std::fs::symlink_metadata(&self.root)
            .map_err(crate::StoreError::io("inspecting", &self.root))?;
        if root.mode() & GROUP_OTHER_WRITE != 0 {
            return refuse(
                &self.root,
                format!(
                    "other users can write the store's directory (mode {:o}): `chmod go-w {}`",
                    root.mode() & 0o7777,
                    self.root.display()
                ),
            );
        }
        for name in PRIVATE_DIRS {
            let path = self.root.join(name);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(crate::StoreError::io("inspecting", &path))?;
            if !meta.is_dir() {
                return refuse(&path, "is not a directory (a symlink?)".into());
            }
            if meta.uid() != me {
                return refuse(
                    &path,
                    format!("belongs to uid {}, not to you (uid {me})", meta.uid()),
                );
            }
            if meta.mode() & GROUP_OTHER_ANY != 0 {
                return refuse(
                    &path,
                    format!(
                        "others may enter it (mode {:o}): `chmod 700 {}`",
                        meta.mode() & 0o7777,
                        path.display()
                    ),
                );
            }
        }
        Ok(())
    }

    /// Directories of the store another local user could write into (or, for `farms/`
    /// and `sessions/`, enter), each with the command that fixes it. Walks the
    /// directories of every farm (not their files); leaves the uppers in `sessions/`
    /// alone (they are the runs' own data, behind `sessions/` 0700).
    pub fn permission_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let owner = match std::fs::metadata(&self.root) {
            Ok(meta) => meta.uid(),
            Err(e) => {
                problems.push(unsafe_dir(&self.root, format!("cannot stat: {e}")));
                return problems;
            }
        };
        let mut check = |path: &Path, private: bool| {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                return; // absent: nothing to write into
            };
            let mode = meta.mode() & 0o7777;
            if !meta.is_dir() {
                problems.push(unsafe_dir(
                    path,
                    "is not a directory (a symlink would send the store's writes elsewhere): move it away and let velo recreate it".into(),
                ));
            } else if meta.uid() != owner {
                problems.push(unsafe_dir(
                    path,
                    format!(
                        "is owned by uid {}, not by the store's owner (uid {owner}), who can change it at will: chown {owner} {}",
                        meta.uid(),
                        path.display()
                    ),
                ));
            } else if private && mode & GROUP_OTHER_ANY != 0 {
                problems.push(unsafe_dir(
                    path,
                    format!(
                        "has mode {mode:o}: other users can enter it and reach what runs read or write; fix: chmod 700 {}",
                        path.display()
                    ),
                ));
            } else if mode & GROUP_OTHER_WRITE != 0 {
                problems.push(unsafe_dir(
                    path,
                    format!(
                        "has mode {mode:o}: other users can write into the store; fix: chmod go-w {}",
                        path.display()
                    ),
                ));
            }
        };
        check(&self.root, false);
        for name in crate::SUBDIRS {
            check(&self.root.join(name), false);
        }
        for name in PRIVATE_DIRS {
            check(&self.root.join(name), true);
        }
        for objects in ["blobs", "trees"] {
            for shard in subdirs(&self.root.join(objects)) {
                check(&shard, false);
            }
        }
        // Farms: one problem per farm, however many directories it opens up.
        for farm in subdirs(&self.root.join("farms")) {
            let mut open = 0u64;
            let mut stack = vec![farm.clone()];
            while let Some(dir) = stack.pop() {
                if let Ok(meta) = std::fs::symlink_metadata(&dir) {
                    if meta.mode() & GROUP_OTHER_WRITE != 0 {
                        open += 1;
                    }
                }
                stack.extend(subdirs(&dir));
            }
            if open > 0 {
                problems.push(unsafe_dir(
                    &farm,
                    format!(
                        "{open} directories of this cached farm are writable by other users, who could plant files that runs read; fix: find {} -type d -perm /022 -exec chmod go-w {{}} +",
                        farm.display()
                    ),
                ));
            }
        }
        problems
    }
}

/// The subdirectories of `dir` (not following symlinks); none if it cannot be read.
fn subdirs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_new_store_is_clean_and_open_directories_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("s")).unwrap();
        assert_eq!(store.permission_problems(), Vec::new());
        for name in PRIVATE_DIRS {
            let mode = std::fs::metadata(store.root().join(name)).unwrap().mode();
            assert_eq!(mode & 0o7777, 0o700, "{name}");
        }
        let deep = store.root().join("farms/abc/var/tmp");
        std::fs::create_dir_all(&deep).unwrap();
        chmod(&deep, 0o1777);
        chmod(&store.root().join("tmp"), 0o775);
        chmod(&store.root().join("sessions"), 0o711);
        let problems = store.permission_problems();
        let objects: Vec<_> = problems.iter().map(|p| p.object.clone()).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for want in ["tmp", "sessions", "farms/abc"] {
            let path = store.root().join(want).display().to_string();
            assert!(objects.contains(&path), "{want} in {objects:?}");
        }
        // Reopening to write closes the private directories again; the rest is reported.
        let store = Store::open_or_create(store.root()).unwrap();
        let problems = store.permission_problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
