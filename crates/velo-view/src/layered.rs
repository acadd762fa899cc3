//! Resolution through an upper layer over the tree: what a process sees when its writes
//! go copy-on-write into an overlay-format upper directory (whiteouts, opaque
//! directories). The index stays immutable; the caller answers for the upper through
//! [`Layer`], and says per tree directory whether the upper may hold anything in it, so
//! that a lookup in an untouched part of the tree costs no system call.

use crate::{concat, copy_outside, join_outside, Damaged, Kind, View, MAX_SYMLINKS, PATH_MAX};

/// What the upper layer holds at one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpperEntry {
    /// Nothing: the tree's entry (if any) shows.
    Absent,
    /// A whiteout: the name is deleted.
    Whiteout,
    /// A directory; an opaque one hides the tree's directory of that name.
    Dir {
        /// Whether it hides the tree's directory.
        opaque: bool,
    },
    /// A file (or anything but a directory, symlink or whiteout).
    File,
    /// A symlink whose target is in the caller's buffer, this many bytes.
    Symlink(usize),
}

/// The upper layer, as the resolver asks about it.
pub trait Layer {
    /// Whether the upper may hold entries directly in tree directory `dir`. A `false`
    /// lets the resolver skip [`Layer::entry`] for its children.
    fn touched(&self, dir: u32) -> bool;
    /// What the upper holds at `rel` (relative to the tree's top, no leading `/`); a
    /// symlink's target goes into `target`.
    fn entry(&self, rel: &[u8], target: &mut [u8; PATH_MAX]) -> UpperEntry;
}

/// No upper layer: the tree alone.
pub struct NoLayer;

impl Layer for NoLayer {
    fn touched(&self, _dir: u32) -> bool {
        false
    }
    fn entry(&self, _rel: &[u8], _target: &mut [u8; PATH_MAX]) -> UpperEntry {
        UpperEntry::Absent
    }
}

/// Where a path leads through the layers. The path relative to the tree's top (for
/// [`Layered::Upper`], and [`Layered::Missing`] of a last component) is in the caller's
/// `rel` buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layered {
    /// A node of the tree; a directory may also exist in the upper (merged with it).
    Tree(u32),
    /// An entry of the upper that no tree entry shows through: a file or symlink of the
    /// upper, or a directory the tree lacks or the upper made opaque.
    Upper,
    /// Nothing of that name. `parent` is the tree directory that lacks it (`None` when
    /// the parent exists only in the upper); `last`: it was the last component.
    Missing {
        /// The tree directory that lacks the name, if the parent is one.
        parent: Option<u32>,
        /// Whether it was the path's last component.
        last: bool,
    },
    /// A component that must be a directory is not one (`ENOTDIR`).
    NotDir,
    /// The path leaves the tree: the host path is in `scratch`, this many bytes.
    Outside(usize),
    /// More than [`MAX_SYMLINKS`] symlinks (`ELOOP`).
    Loop,
    /// A path longer than [`PATH_MAX`] on the way (`ENAMETOOLONG`).
    TooLong,
    /// The index is damaged.
    Damaged,
}

/// A relative path being built, `a/b/c`: the path of tree directory `base` (not yet
/// spelled out, which costs a walk to the root, until the upper must be asked) followed
/// by the names in `buf`.
struct Rel<'b> {
    buf: &'b mut [u8; PATH_MAX],
    len: usize,
    base: u32,
}

impl Rel<'_> {
    /// Spells out `base`'s path in front of the names; false if it does not fit.
    fn materialize(&mut self, view: &View<'_>) -> bool {
        if self.base == 0 {
            return true;
        }
        let mut own = [0u8; PATH_MAX];
        let Some(n) = view.path_of(b"", self.base, &mut own) else {
            return false;
        };
        let prefix = own[..n].strip_prefix(b"/").unwrap_or(&own[..n]);
        let sep = usize::from(self.len > 0 && !prefix.is_empty());
        let total = prefix.len() + sep + self.len;
        if total > PATH_MAX {
            return false;
        }
        self.buf.copy_within(..self.len, prefix.len() + sep);
        self.buf[..prefix.len()].copy_from_slice(prefix);
        if sep == 1 {
            self.buf[prefix.len()] = b'/';
        }
        self.len = total;
        self.base = 0;
        true
    }

    fn push(&mut self, name: &[u8]) -> bool {
        let sep = usize::from(self.len > 0);
        let end = self.len + sep + name.len();
        if end > PATH_MAX {
            return false;
        }
        if sep == 1 {
            self.buf[self.len] = b'/';
        }
        self.buf[self.len + sep..end].copy_from_slice(name);
        self.len = end;
        true
    }
    fn pop(&mut self) {
        self.len = self.buf[..self.len]
            .iter()
            .rposition(|&b| b == b'/')
            .unwrap_or(0);
    }
    fn with<'s>(&'s self, name: &[u8], out: &'s mut [u8; PATH_MAX]) -> Option<&'s [u8]> {
        let sep = usize::from(self.len > 0);
        let end = self.len + sep + name.len();
        if end > PATH_MAX {
            return None;
        }
        out[..self.len].copy_from_slice(&self.buf[..self.len]);
        if sep == 1 {
            out[self.len] = b'/';
        }
        out[self.len + sep..end].copy_from_slice(name);
        Some(&out[..end])
    }
}

impl View<'_> {
    /// The tree directory (if any) that directory `rel` of the merged view stands on:
    /// `None` when the upper made it (or an ancestor) opaque, or the tree lacks it.
    fn locate(&self, rel: &[u8], layer: &impl Layer) -> Result<Option<u32>, Damaged> {
        let mut current = Some(0);
        let mut target = [0u8; PATH_MAX];
        let mut end = 0;
        for name in rel.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            end += name.len() + usize::from(end > 0);
            let tree_child = match current {
                Some(dir) => self.child(&self.node(dir)?, name)?,
                None => None,
            };
            let tree_dir = match tree_child {
                Some(c) if self.node(c)?.kind == Kind::Dir => Some(c),
                _ => None,
            };
            if current.is_none_or(|d| layer.touched(d)) {
                current = match layer.entry(&rel[..end], &mut target) {
                    UpperEntry::Dir { opaque: false } => tree_dir,
                    UpperEntry::Absent => tree_dir,
                    _ => None,
                };
            } else {
                current = tree_dir;
            }
        }
        Ok(current)
    }

    /// [`View::resolve`] through an upper `layer`: the upper's entries hide the tree's,
    /// its whiteouts delete them, its opaque directories hide whole tree directories.
    /// The path relative to the tree's top goes to `rel[..*rel_len]`.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve_layered(
        &self,
        at: &[u8],
        start: u32,
        path: &[u8],
        follow_last: bool,
        layer: &impl Layer,
        scratch: &mut [u8; PATH_MAX],
        rel: &mut [u8; PATH_MAX],
        rel_len: &mut usize,
    ) -> Layered {
        let mut rel = Rel {
            buf: rel,
            len: 0,
            base: 0,
        };
        let result = match self.walk(at, start, path, follow_last, layer, scratch, &mut rel) {
            Ok(r) => r,
            Err(Damaged) => Layered::Damaged,
        };
        // Only what is not a tree node needs its path spelled out.
        if matches!(result, Layered::Upper | Layered::Missing { last: true, .. })
            && !rel.materialize(self)
        {
            return Layered::TooLong;
        }
        *rel_len = rel.len;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        at: &[u8],
        start: u32,
        path: &[u8],
        follow_last: bool,
        layer: &impl Layer,
        scratch: &mut [u8; PATH_MAX],
        rel: &mut Rel<'_>,
    ) -> Result<Layered, Damaged> {
        // The path still to walk lives in `rest[..len]`, from `pos`; a symlink's target is
        // put in front of what remains (in `scratch`, then copied back).
        let mut rest = [0u8; PATH_MAX];
        let mut len;
        let mut current = Some(start);
        let path = if path.first() == Some(&b'/') {
            current = Some(0);
            match path.strip_prefix(at) {
                Some(p) if p.is_empty() || p[0] == b'/' => p,
                _ => return Ok(outside(copy_outside(scratch, path))),
            }
        } else {
            // The start directory's path is spelled out only if the upper must be asked.
            rel.base = start;
            path
        };
        if path.len() > PATH_MAX {
            return Ok(Layered::TooLong);
        }
        rest[..path.len()].copy_from_slice(path);
        len = path.len();
        let mut pos = 0;
        let mut links = 0;
        let mut target = [0u8; PATH_MAX];
        let mut joined = [0u8; PATH_MAX];
        loop {
            while pos < len && rest[pos] == b'/' {
                pos += 1;
            }
            if pos >= len {
                return Ok(match current {
                    Some(n) => Layered::Tree(n),
                    None => Layered::Upper,
                });
            }
            let end = rest[pos..len]
                .iter()
                .position(|&b| b == b'/')
                .map_or(len, |i| pos + i);
            let is_last = rest[end..len].iter().all(|&b| b == b'/');
            let trailing_slash = is_last && end < len;
            let name_start = pos;
            pos = end;
            let name = &rest[name_start..end];
            let dir = match current {
                Some(d) => {
                    let node = self.node(d)?;
                    if node.kind != Kind::Dir {
                        return Ok(Layered::NotDir);
                    }
                    Some(node)
                }
                None => None,
            };
            if name == b"." {
                continue;
            }
            if name == b".." {
                if rel.len == 0 && rel.base != 0 {
                    // Up from the start directory: still a tree directory.
                    let base = self.node(rel.base)?;
                    rel.base = base.parent;
                    current = Some(base.parent);
                    continue;
                }
                if rel.len == 0 {
                    // Above the top of the tree: the host's parent of `at`.
                    let parent = match at.iter().rposition(|&b| b == b'/') {
                        Some(0) | None => &b"/"[..],
                        Some(i) => &at[..i],
                    };
                    return Ok(outside(join_outside(scratch, parent, &rest[pos..len])));
                }
                rel.pop();
                current = match dir {
                    // A tree directory is reached only through tree directories that no
                    // opaque upper directory hides: its parent is the tree's.
                    Some(node) => Some(node.parent),
                    None => {
                        if !rel.materialize(self) {
                            return Ok(Layered::TooLong);
                        }
                        self.locate(&rel.buf[..rel.len], layer)?
                    }
                };
                continue;
            }
            let tree_child = match &dir {
                Some(d) => self.child(d, name)?,
                None => None,
            };
            // What the upper says, where it may say anything.
            let upper = if current.is_none_or(|d| layer.touched(d)) {
                if !rel.materialize(self) {
                    return Ok(Layered::TooLong);
                }
                let Some(full) = rel.with(name, &mut joined) else {
                    return Ok(Layered::TooLong);
                };
                layer.entry(full, &mut target)
            } else {
                UpperEntry::Absent
            };
            let symlink_target: Option<&[u8]> = match upper {
                UpperEntry::Whiteout => {
                    if !rel.push(name) {
                        return Ok(Layered::TooLong);
                    }
                    return Ok(Layered::Missing {
                        parent: current,
                        last: is_last,
                    });
                }
                UpperEntry::Dir { opaque } => {
                    if !rel.push(name) {
                        return Ok(Layered::TooLong);
                    }
                    current = match tree_child {
                        Some(c) if !opaque && self.node(c)?.kind == Kind::Dir => Some(c),
                        _ => None,
                    };
                    continue;
                }
                UpperEntry::File => {
                    if !rel.push(name) {
                        return Ok(Layered::TooLong);
                    }
                    return Ok(if is_last && !trailing_slash {
                        Layered::Upper
                    } else {
                        Layered::NotDir
                    });
                }
                UpperEntry::Symlink(n) => {
                    if is_last && !follow_last && !trailing_slash {
                        rel.push(name);
                        return Ok(Layered::Upper);
                    }
                    Some(&target[..n.min(PATH_MAX)])
                }
                UpperEntry::Absent => {
                    let Some(child) = tree_child else {
                        if !rel.push(name) {
                            return Ok(Layered::TooLong);
                        }
                        return Ok(Layered::Missing {
                            parent: current,
                            last: is_last,
                        });
                    };
                    let node = self.node(child)?;
                    if node.kind == Kind::Symlink && (!is_last || follow_last || trailing_slash) {
                        Some(self.target(&node)?)
                    } else {
                        if trailing_slash && node.kind != Kind::Dir {
                            return Ok(Layered::NotDir);
                        }
                        if !rel.push(name) {
                            return Ok(Layered::TooLong);
                        }
                        current = Some(child);
                        if node.kind != Kind::Dir && !is_last {
                            return Ok(Layered::NotDir);
                        }
                        continue;
                    }
                }
            };
            let Some(link) = symlink_target else {
                continue;
            };
            links += 1;
            if links > MAX_SYMLINKS {
                return Ok(Layered::Loop);
            }
            let remaining = &rest[pos..len];
            if link.first() == Some(&b'/') {
                match link.strip_prefix(at) {
                    Some(inside) if inside.is_empty() || inside[0] == b'/' => {
                        current = Some(0);
                        rel.len = 0;
                        rel.base = 0;
                        let Some(n) = concat(scratch, inside, remaining) else {
                            return Ok(Layered::TooLong);
                        };
                        rest[..n].copy_from_slice(&scratch[..n]);
                        len = n;
                        pos = 0;
                    }
                    _ => return Ok(outside(join_outside(scratch, link, remaining))),
                }
            } else {
                // Relative to the symlink's directory (where the walk is).
                let Some(n) = concat(scratch, link, remaining) else {
                    return Ok(Layered::TooLong);
                };
                rest[..n].copy_from_slice(&scratch[..n]);
                len = n;
                pos = 0;
            }
        }
    }
}

fn outside(r: crate::Resolved) -> Layered {
    match r {
        crate::Resolved::Outside(n) => Layered::Outside(n),
        _ => Layered::TooLong,
    }
}
