//! The store's side of the shim's views (`views/<root>.idx` and `views/<root>.d/`, built
//! by velo-project): whether one is whole, for fsck and for the command about to use it.
//! An index ends with the BLAKE3 of everything before it; the shim maps it without
//! checking (it runs inside every program it serves), so velo checks before a run.

use std::path::Path;

use crate::fsck::{problem, Problem};
use crate::Store;

/// The label of a damaged or incomplete view.
pub(crate) const BAD_VIEW: &str = "bad-view";

/// `body` followed by its checksum: how an index is written.
pub fn seal_view(mut body: Vec<u8>) -> Vec<u8> {
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    body
}

/// Why the view of `hex` in `views` is not whole, if it is not: its index's checksum,
/// and its directory of executable links with the empty directory `e` in it.
pub fn view_damage(views: &Path, hex: &str) -> Option<String> {
    let index = views.join(format!("{hex}.idx"));
    let bytes = match std::fs::read(&index) {
        Ok(bytes) => bytes,
        Err(e) => return Some(format!("cannot read {}: {e}", index.display())),
    };
    let Some(split) = bytes.len().checked_sub(32) else {
        return Some("the index is shorter than its checksum".into());
    };
    if blake3::hash(&bytes[..split]).as_bytes() != &bytes[split..] {
        return Some("the index does not match its checksum (changed or damaged)".into());
    }
    if velo_view::View::new(&bytes[..split]).is_none() {
        return Some("the index is of another format version, or not an index".into());
    }
    let empty = views.join(format!("{hex}.d")).join("e");
    match std::fs::symlink_metadata(&empty) {
        Ok(meta) if meta.is_dir() => None,
        _ => Some(format!("{} is missing", empty.display())),
    }
}

/// The identity of a view's index as a stamp records it: a change of its bytes changes
/// its ctime, which no one can set back.
fn identity(index: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(index).ok()?;
    Some(format!(
        "{} {} {} {} {}.{} {}.{}\n",
        String::from_utf8_lossy(&velo_view::MAGIC),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// [`view_damage`], skipped when the index is the very file a stamp (`<root>.ok`) says
/// was checked: a run reads the view every time, and hashing a kernel tree's index costs
/// milliseconds. The stamp is written after a check finds the view whole.
pub fn view_damage_cached(views: &Path, hex: &str, tmp: &Path) -> Option<String> {
    let index = views.join(format!("{hex}.idx"));
    let stamp = views.join(format!("{hex}.ok"));
    let now = identity(&index);
    let empty = views.join(format!("{hex}.d")).join("e");
    if now.is_some()
        && std::fs::read_to_string(&stamp).ok() == now
        && std::fs::symlink_metadata(&empty).is_ok_and(|m| m.is_dir())
    {
        return None;
    }
    let damage = view_damage(views, hex);
    if let (None, Some(now)) = (&damage, now) {
        let _ = crate::replace_file(&stamp, tmp, now.as_bytes(), crate::Durability::Cache);
    }
    damage
}

impl Store {
    /// One problem per view that is not whole.
    pub(crate) fn view_problems(&self) -> Vec<Problem> {
        let views = self.root.join("views");
        let mut problems = Vec::new();
        for entry in std::fs::read_dir(&views).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".idx") else {
                continue;
            };
            if let Some(why) = view_damage(&views, hex) {
                problems.push(problem(
                    BAD_VIEW,
                    &name,
                    format!("{why}; `velo fsck --repair` removes the view (the next run builds it again)"),
                ));
            }
        }
        problems
    }
}
