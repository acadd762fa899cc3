//! Registered roots (`refs/roots/`): what gc keeps, and the names users give trees.
//!
//! One small JSON file per registration, replaced atomically. A named root lives at
//! `refs/roots/<name>`; an unnamed one at `refs/roots/@<hash>` (`@` cannot start a name).

use std::fs;

use serde::{Deserialize, Serialize};
use velo_core::Hash;

use crate::{sync_dir, Result, Store, StoreError};

/// Counts of what a root holds, computed when it is registered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootStats {
    /// Regular files (each entry counts, also when content repeats).
    pub files: u64,
    /// Directories, not counting the root itself.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Sum of all file sizes: the logical bytes of the tree.
    pub bytes: u64,
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRecord {
    /// The user's name for it, if any.
    pub name: Option<String>,
    /// The root tree (hex).
    pub root: String,
    /// When it was registered (seconds since the epoch).
    pub created_unix: u64,
    /// What the tree holds.
    #[serde(flatten)]
    pub stats: RootStats,
    /// Registered although some blobs are not in this store (`import --partial`).
    #[serde(default)]
    pub partial: bool,
    /// Where it came from (a directory or a .velo file), for people reading `velo roots`.
    #[serde(default)]
    pub source: Option<String>,
}

impl RootRecord {
    /// The root hash.
    pub fn hash(&self) -> Result<Hash> {
        self.root.parse().map_err(|e: velo_core::HashParseError| {
            StoreError::Invalid(format!("root record {:?}: {e}", self.name))
        })
    }

    fn file_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => format!("@{}", self.root),
        }
    }
}

/// A root record that cannot be read as one.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedRecord {
    /// Its path.
    pub path: String,
    /// Its file name under `refs/roots/` (what `velo forget` takes to remove it).
    pub file: String,
    /// What is wrong with it.
    pub why: String,
}

/// Checks a root name: 1–128 of `A-Z a-z 0-9 . _ + - @`, not starting with `.`, `-` or `@`.
pub fn validate_root_name(name: &str) -> Result<()> {
    let bad = |why| {
        Err(StoreError::BadName {
            name: name.chars().take(80).collect(),
            why,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("a name has 1 to 128 characters");
    }
    if name.starts_with(['.', '-', '@']) {
        return bad("a name cannot start with '.', '-' or '@'");
    }
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("a name cannot be 64 hex digits: it would be taken for a tree hash");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-' | b'@'))
    {
        return bad("a name holds only letters, digits and . _ + - @");
    }
    Ok(())
}

impl Store {
    fn roots_dir(&self) -> std::path::PathBuf {
        self.root.join("refs/roots")
    }

    /// Registers (or re-points) a root. Durable when this returns.
    pub fn register_root(&self, record: &RootRecord) -> Result<()> {
        if let Some(name) = &record.name {
            validate_root_name(name)?;
        }
        let dir = self.roots_dir();
        let target = dir.join(record.file_name());
        let json = serde_json::to_vec_pretty(record).expect("a root record always serialises");
        crate::replace_file(
            &target,
            &self.root.join("tmp"),
            &json,
            crate::Durability::Durable,
        )
        .map_err(StoreError::io("registering root at", &target))
    }

    /// Every registered root, named ones first, each group sorted.
    pub fn roots(&self) -> Result<Vec<RootRecord>> {
        let (records, damaged) = self.roots_and_damage()?;
        if let Some(first) = damaged.first() {
            return Err(StoreError::Invalid(format!(
                "root record {} is damaged: {}; `velo forget {}` removes it",
                first.path, first.why, first.file
            )));
        }
        Ok(records)
    }

    /// Every readable root record, and each damaged one apart (a reader that lists or
    /// forgets reports damage and goes on; gc and fsck, which must know every root, use
    /// [`Store::roots`], which refuses). A record is read without following a link and
    /// without blocking (a fifo planted there must not hang a listing).
    pub fn roots_and_damage(&self) -> Result<(Vec<RootRecord>, Vec<DamagedRecord>)> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.roots_dir();
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io("listing", &dir))? {
            let entry = entry.map_err(StoreError::io("listing", &dir))?;
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            let damage = |why: String| DamagedRecord {
                path: path.display().to_string(),
                file: file.clone(),
                why,
            };
            let opened = fs::OpenOptions::new()
                .read(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
                )
                .open(&path);
            let mut text = Vec::new();
            let read = opened.and_then(|mut f| {
                if !f.metadata()?.is_file() {
                    return Err(std::io::Error::other("not a regular file"));
                }
                f.read_to_end(&mut text)
            });
            match read {
                Ok(_) => {}
                // Forgotten between the listing and the read: it is no longer a root.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    damaged.push(damage(e.to_string()));
                    continue;
                }
            }
            match serde_json::from_slice::<RootRecord>(&text) {
                Ok(record) => match record.hash() {
                    Ok(_) => out.push(record),
                    Err(e) => damaged.push(damage(e.to_string())),
                },
                Err(e) => damaged.push(damage(e.to_string())),
            }
        }
        out.sort_by(|a, b| {
            (a.name.is_none(), &a.name, &a.root).cmp(&(b.name.is_none(), &b.name, &b.root))
        });
        Ok((out, damaged))
    }

    /// The record registered under `name`, if any.
    pub fn root_by_name(&self, name: &str) -> Result<Option<RootRecord>> {
        if validate_root_name(name).is_err() {
            return Ok(None);
        }
        let path = self.roots_dir().join(name);
        match fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text).map(Some).map_err(|e| {
                StoreError::Invalid(format!("root record {} is damaged: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("reading", &path)(e)),
        }
    }

    /// Whether the record `name` (`None`: the unnamed record of `root`) registers `root`
    /// completely (not `--partial`). One small read: the import cache asks it on every run.
    pub(crate) fn record_registers(&self, name: Option<&str>, root: &Hash) -> bool {
        let file = match name {
            Some(name) if validate_root_name(name).is_ok() => name.to_string(),
            Some(_) => return false,
            None => format!("@{}", root.to_hex()),
        };
        fs::read(self.roots_dir().join(file))
            .ok()
            .and_then(|text| serde_json::from_slice::<RootRecord>(&text).ok())
            .is_some_and(|r| !r.partial && r.root == root.to_hex())
    }

    /// Unregisters a name, or every registration of a root hash (or unique prefix).
    /// Returns what was removed; an empty list means nothing matched.
    pub fn forget(&self, name_or_root: &str) -> Result<Vec<RootRecord>> {
        Ok(self.forget_sparing(name_or_root, &|_| false)?.0)
    }

    /// [`Store::forget`], but the matching records `spare` picks stay registered:
    /// (forgotten, spared).
    pub fn forget_sparing(
        &self,
        name_or_root: &str,
        spare: &dyn Fn(&RootRecord) -> bool,
    ) -> Result<(Vec<RootRecord>, Vec<RootRecord>)> {
        let (records, damaged) = self.roots_and_damage()?;
        // A damaged record is forgotten by its file name (what `velo roots` shows).
        if let Some(bad) = damaged.iter().find(|d| d.file == name_or_root) {
            let path = self.roots_dir().join(&bad.file);
            fs::remove_file(&path).map_err(StoreError::io("removing", &path))?;
            sync_dir(&self.roots_dir());
            return Ok((Vec::new(), Vec::new()));
        }
        let by_name: Vec<RootRecord> = records
            .iter()
            .filter(|r| r.name.as_deref() == Some(name_or_root))
            .cloned()
            .collect();
        let chosen = if !by_name.is_empty() {
            by_name
        } else if name_or_root.len() >= 4 && name_or_root.bytes().all(|b| b.is_ascii_hexdigit()) {
            let lower = name_or_root.to_ascii_lowercase();
            let matching: Vec<&RootRecord> = records
                .iter()
                .filter(|r| r.root.starts_with(&lower))
                .collect();
            let distinct: std::collections::BTreeSet<&str> =
                matching.iter().map(|r| r.root.as_str()).collect();
            if distinct.len() > 1 {
                return Err(StoreError::Ambiguous(name_or_root.to_string()));
            }
            matching.into_iter().cloned().collect()
        } else {
            Vec::new()
        };
        let (spared, chosen): (Vec<_>, Vec<_>) = chosen.into_iter().partition(|r| spare(r));
        for record in &chosen {
            let path = self.roots_dir().join(record.file_name());
            fs::remove_file(&path).map_err(StoreError::io("removing", &path))?;
        }
        if !chosen.is_empty() {
            sync_dir(&self.roots_dir());
        }
        Ok((chosen, spared))
    }

    /// Resolves a TREE argument that is a root name, a full hash or a unique hash prefix
    /// (at least 4 hex digits) of a tree in this store.
    pub fn resolve(&self, spec: &str) -> Result<Hash> {
        // A full hash always means that tree (a record named like one, made before names
        // were checked for it, cannot hide it).
        let full = spec.parse::<Hash>().ok().filter(|_| spec.len() == 64);
        if full.is_none() {
            if let Some(record) = self.root_by_name(spec)? {
                return record.hash();
            }
        }
        if let Ok(hash) = spec.parse::<Hash>() {
            if self.has_tree(&hash) {
                return Ok(hash);
            }
            return Err(StoreError::Missing { kind: "tree", hash });
        }
        if spec.len() >= 4 && spec.len() < 64 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            let prefix = spec.to_ascii_lowercase();
            let shard = self.root.join("trees").join(&prefix[..2]);
            let mut found = Vec::new();
            if let Ok(entries) = fs::read_dir(&shard) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&prefix) {
                        found.push(name);
                    }
                }
            }
            return match found.len() {
                0 => Err(StoreError::UnknownTree(spec.to_string())),
                1 => found[0]
                    .parse()
                    .map_err(|_| StoreError::UnknownTree(spec.to_string())),
                _ => Err(StoreError::Ambiguous(spec.to_string())),
            };
        }
        Err(StoreError::UnknownTree(spec.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_cannot_pose_as_a_tree_hash() {
        assert!(validate_root_name(&"ab".repeat(32)).is_err());
        assert!(validate_root_name(&"ab".repeat(31)).is_ok());
    }

    #[test]
    fn root_names_are_validated() {
        for ok in ["app", "my-app_1.2+x", "a@b"] {
            assert!(validate_root_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-flag",
            "@anon",
            "a/b",
            "a b",
            &"x".repeat(129),
            "ü",
        ] {
            assert!(validate_root_name(bad).is_err(), "{bad:?}");
        }
    }
}
