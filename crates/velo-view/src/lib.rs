//! The view index: one tree flattened into an immutable file, `views/<root>.idx` in the
//! store, that the `LD_PRELOAD` shim maps and reads on its hot path (`stat`, `open`,
//! `readdir`) without a system call, a lock or an allocation.
//!
//! This crate owns the format: [`IndexWriter`] encodes it (velo-project builds an index
//! from the store with it), [`View`] reads it and resolves paths inside the tree,
//! following the tree's own symlinks. The reader allocates nothing and panics on nothing:
//! every offset in the file is checked before it is used, so a damaged or hostile index
//! gives errors, never a crash inside the program the shim serves. It depends on nothing
//! (the shim links it into every process it serves).
//!
//! Layout (little-endian):
//! ```text
//! header   64 bytes: magic "VRVIEW02", root hash [32], node count u32, names length u32,
//!          device number u64 (what st_dev reports), view flags u64
//! nodes    count × 96 bytes; node 0 is the root directory; the children of a directory
//!          are contiguous and sorted bytewise by name (the tree's order), so a lookup is
//!          a binary search per path component
//! names    the names and symlink targets the nodes point into
//! ```
//! A node: kind u8 (1 file, 2 directory, 3 symlink), flags u8 (bit 0: the file has an
//! executable inode of its own, `views/<root>.d/<node index>`), name length u16, mode u32
//! (permission bits as the tree records them), name offset u32, parent u32, mtime i64
//! (ns), size u64 (a symlink: its target's length), first child u32, child count u32,
//! target offset u32, target length u32, blob hash [32], 16 bytes reserved.
#![deny(missing_docs)]

mod layered;
pub use layered::{Layer, Layered, NoLayer, UpperEntry};

/// The first bytes of every index.
pub const MAGIC: [u8; 8] = *b"VRVIEW02";
/// Bytes before the first node.
pub const HEADER_LEN: usize = 64;
/// Bytes per node.
pub const NODE_LEN: usize = 96;
/// The longest path the resolver handles (as `PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// Symlinks followed in one resolution before it gives up (as Linux's `ELOOP` limit).
pub const MAX_SYMLINKS: u32 = 40;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// Flag bit: the file has an executable inode of its own under `views/<root>.d/`.
pub const FLAG_EXEC_LINK: u8 = 1;

/// Flag bit: the entry has extended attributes (in its directory's tree object, whose
/// hash a directory node carries).
pub const FLAG_XATTRS: u8 = 2;

/// View flag: the tree holds shared libraries (`*.so`, `*.so.*`), which the dynamic loader
/// needs by real paths (a farm).
pub const VIEW_HAS_LIBRARIES: u64 = 1;

/// One node, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    /// Its index (also its inode number, plus one).
    pub index: u32,
    /// What it is.
    pub kind: Kind,
    /// [`FLAG_EXEC_LINK`] and future flags.
    pub flags: u8,
    /// Permission bits as the tree records them.
    pub mode: u32,
    /// Its parent directory (the root's parent is the root).
    pub parent: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Size in bytes (a symlink: its target's length; a directory: 0).
    pub size: u64,
    /// A directory's first child.
    pub first_child: u32,
    /// A directory's number of children.
    pub child_count: u32,
    /// A file's blob hash; a directory's tree hash (zero for the root: see
    /// [`View::root_hash`]).
    pub hash: [u8; 32],
    name: (u32, u16),
    target: (u32, u32),
}

/// A damaged index: an offset or count outside the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damaged;

/// Where a path leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// A node of the tree.
    Node(u32),
    /// Nothing of that name; `parent` is the directory that would hold it (so a create
    /// can tell where), and `last` says whether the missing name was the last component.
    Missing {
        /// The directory that lacks the name.
        parent: u32,
        /// Whether it was the path's last component.
        last: bool,
    },
    /// A component that must be a directory is not one (`ENOTDIR`).
    NotDir,
    /// The path leaves the tree (through `..` above its top or an absolute symlink
    /// target elsewhere): the host path is in the caller's buffer, this many bytes.
    Outside(usize),
    /// More than [`MAX_SYMLINKS`] symlinks (`ELOOP`).
    Loop,
    /// A path longer than [`PATH_MAX`] on the way (`ENAMETOOLONG`).
    TooLong,
    /// The index is damaged.
    Damaged,
}

/// An index, borrowed (from a mapping, or a buffer).
#[derive(Clone, Copy)]
pub struct View<'a> {
    bytes: &'a [u8],
    count: u32,
    names: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl<'a> View<'a> {
    /// Checks the header and the sizes; `None` if this is not a whole index.
    pub fn new(bytes: &'a [u8]) -> Option<View<'a>> {
        if bytes.get(..8)? != MAGIC {
            return None;
        }
        let count = u32_at(bytes, 40)?;
        let names_len = u32_at(bytes, 44)? as usize;
        let nodes_end = HEADER_LEN.checked_add((count as usize).checked_mul(NODE_LEN)?)?;
        let names = bytes.get(nodes_end..nodes_end.checked_add(names_len)?)?;
        if count == 0 {
            return None;
        }
        Some(View {
            bytes,
            count,
            names,
        })
    }

    /// The tree's root hash.
    pub fn root_hash(&self) -> [u8; 32] {
        let mut hash = [0; 32];
        hash.copy_from_slice(&self.bytes[8..40]);
        hash
    }

    /// [`VIEW_HAS_LIBRARIES`] and future flags of the whole view.
    pub fn view_flags(&self) -> u64 {
        u64_at(self.bytes, 56).unwrap_or(0)
    }

    /// The device number the view's files report.
    pub fn device(&self) -> u64 {
        u64_at(self.bytes, 48).unwrap_or(0)
    }

    /// How many nodes.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Never: an index holds at least its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Node `index`.
    pub fn node(&self, index: u32) -> Result<Node, Damaged> {
        if index >= self.count {
            return Err(Damaged);
        }
        let at = HEADER_LEN + index as usize * NODE_LEN;
        let b = self.bytes.get(at..at + NODE_LEN).ok_or(Damaged)?;
        let kind = match b[0] {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            _ => return Err(Damaged),
        };
        let get32 = |at| u32_at(b, at).ok_or(Damaged);
        let mut hash = [0; 32];
        hash.copy_from_slice(&b[48..80]);
        Ok(Node {
            index,
            kind,
            flags: b[1],
            name: (get32(8)?, u16_at(b, 2).ok_or(Damaged)?),
            mode: get32(4)?,
            parent: get32(12)?,
            mtime_ns: u64_at(b, 16).ok_or(Damaged)? as i64,
            size: u64_at(b, 24).ok_or(Damaged)?,
            first_child: get32(32)?,
            child_count: get32(36)?,
            target: (get32(40)?, get32(44)?),
            hash,
        })
    }

    /// A node's name (empty for the root).
    pub fn name(&self, node: &Node) -> Result<&'a [u8], Damaged> {
        let (off, len) = (node.name.0 as usize, node.name.1 as usize);
        self.names.get(off..off + len).ok_or(Damaged)
    }

    /// A symlink's target.
    pub fn target(&self, node: &Node) -> Result<&'a [u8], Damaged> {
        let (off, len) = (node.target.0 as usize, node.target.1 as usize);
        self.names
            .get(off..off.checked_add(len).ok_or(Damaged)?)
            .ok_or(Damaged)
    }

    /// The child of directory `dir` named `name`.
    pub fn child(&self, dir: &Node, name: &[u8]) -> Result<Option<u32>, Damaged> {
        if dir.kind != Kind::Dir {
            return Ok(None);
        }
        let (mut low, mut high) = (0u32, dir.child_count);
        if dir
            .first_child
            .checked_add(dir.child_count)
            .is_none_or(|end| end > self.count)
        {
            return Err(Damaged);
        }
        while low < high {
            let mid = low + (high - low) / 2;
            let index = dir.first_child + mid;
            let candidate = self.node(index)?;
            match self.name(&candidate)?.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(index)),
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
            }
        }
        Ok(None)
    }

    /// The absolute path of `node` when the tree is shown at `at` (the names from the
    /// root), in `out`; its length, or `None` if it does not fit or the index is damaged.
    pub fn path_of(&self, at: &[u8], node: u32, out: &mut [u8; PATH_MAX]) -> Option<usize> {
        // Node indices from `node` up to the root's child, deepest first.
        let mut chain = [0u32; 1100];
        let mut depth = 0;
        let mut current = node;
        while current != 0 {
            let n = self.node(current).ok()?;
            *chain.get_mut(depth)? = current;
            depth += 1;
            current = n.parent;
        }
        out.get_mut(..at.len())?.copy_from_slice(at);
        let mut len = at.len();
        for &index in chain[..depth].iter().rev() {
            let name = self.name(&self.node(index).ok()?).ok()?;
            out.get_mut(len..len + 1 + name.len())?;
            out[len] = b'/';
            out[len + 1..len + 1 + name.len()].copy_from_slice(name);
            len += 1 + name.len();
        }
        Some(len)
    }

    /// Resolves `path` inside the tree, which is shown at `at` (absolute, no trailing
    /// `/`). A relative `path` starts at directory `start`; an absolute one must begin
    /// with `at` (the caller checked) and starts at the root. Symlinks inside the tree
    /// are followed (the last component only with `follow_last`). `scratch` holds the
    /// host path of a path that leaves the tree.
    pub fn resolve(
        &self,
        at: &[u8],
        start: u32,
        path: &[u8],
        follow_last: bool,
        scratch: &mut [u8; PATH_MAX],
    ) -> Resolved {
        let mut rel = [0u8; PATH_MAX];
        let mut rel_len = 0;
        match self.resolve_layered(
            at,
            start,
            path,
            follow_last,
            &NoLayer,
            scratch,
            &mut rel,
            &mut rel_len,
        ) {
            Layered::Tree(n) => Resolved::Node(n),
            Layered::Missing {
                parent: Some(parent),
                last,
            } => Resolved::Missing { parent, last },
            // Without an upper layer nothing is found in one.
            Layered::Upper | Layered::Missing { parent: None, .. } => Resolved::Damaged,
            Layered::NotDir => Resolved::NotDir,
            Layered::Outside(n) => Resolved::Outside(n),
            Layered::Loop => Resolved::Loop,
            Layered::TooLong => Resolved::TooLong,
            Layered::Damaged => Resolved::Damaged,
        }
    }
}

/// The interpreter and its one optional argument of a script's first bytes, if they
/// start with `#!` (split as the kernel splits the line: blanks separate the two, the
/// rest of the line is the argument).
pub fn shebang(head: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let line = head.strip_prefix(b"#!")?;
    let end = line.iter().position(|&b| b == b'\n')?;
    let line = &line[..end];
    let blanks = |s: &[u8]| s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let line = &line[blanks(line)..];
    let stop = line
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let (interpreter, rest) = line.split_at(stop);
    if interpreter.is_empty() {
        return None;
    }
    let rest = &rest[blanks(rest)..];
    let rest = match rest
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t' && b != b'\r')
    {
        Some(last) => &rest[..=last],
        None => &rest[..0],
    };
    Some((interpreter, (!rest.is_empty()).then_some(rest)))
}

/// `a` then `b` (which starts with `/` or is empty) into `out`; the length, or `None`
/// when it does not fit.
fn concat(out: &mut [u8; PATH_MAX], a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().checked_add(b.len())?;
    if n > PATH_MAX {
        return None;
    }
    out[..a.len()].copy_from_slice(a);
    out[a.len()..n].copy_from_slice(b);
    Some(n)
}

fn copy_outside(out: &mut [u8; PATH_MAX], path: &[u8]) -> Resolved {
    join_outside(out, path, b"")
}

/// The host path `base` + `rest` (`rest` empty or starting with `/`), with one `/` where
/// they meet.
fn join_outside(out: &mut [u8; PATH_MAX], base: &[u8], rest: &[u8]) -> Resolved {
    let base = match base {
        b"/" if !rest.is_empty() => &b""[..],
        _ => base,
    };
    match concat(out, base, rest) {
        Some(n) => Resolved::Outside(n),
        None => Resolved::TooLong,
    }
}

/// What a *lower index* (an index of a host directory, not of a tree: a workspace's
/// `--lower`) holds in a file's hash field: the host file's identity when the index was
/// made. A file whose identity is not this any more has changed since.
pub fn host_fingerprint(dev: u64, ino: u64, ctime_ns: i64, size: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&dev.to_le_bytes());
    out[8..16].copy_from_slice(&ino.to_le_bytes());
    out[16..24].copy_from_slice(&ctime_ns.to_le_bytes());
    out[24..32].copy_from_slice(&size.to_le_bytes());
    out
}

/// One entry to write, in the tree's shape (see [`IndexWriter`]).
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// What it is.
    pub kind: Kind,
    /// Its name (empty for the root).
    pub name: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, ns.
    pub mtime_ns: i64,
    /// Size (files).
    pub size: u64,
    /// Blob hash (files).
    pub hash: [u8; 32],
    /// Symlink target.
    pub target: Vec<u8>,
    /// Flags ([`FLAG_EXEC_LINK`]).
    pub flags: u8,
}

/// Encodes an index. Directories are added breadth first: [`IndexWriter::add_children`]
/// of a directory node, in bytewise name order, right after each other.
pub struct IndexWriter {
    nodes: Vec<u8>,
    names: Vec<u8>,
    count: u32,
}

/// Too many nodes, or names too long for the format's 32-bit offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooBig;

impl IndexWriter {
    /// Starts an index whose root directory has `mode` and `mtime_ns`.
    pub fn new(mode: u32, mtime_ns: i64) -> IndexWriter {
        let mut writer = IndexWriter {
            nodes: Vec::new(),
            names: Vec::new(),
            count: 0,
        };
        let root = NodeSpec {
            kind: Kind::Dir,
            name: Vec::new(),
            mode,
            mtime_ns,
            size: 0,
            hash: [0; 32],
            target: Vec::new(),
            flags: 0,
        };
        // The root's own record cannot fail: empty name, no target.
        let _ = writer.push(&root, 0);
        writer
    }

    /// How many nodes so far (the index the next one gets).
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Never: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn push(&mut self, spec: &NodeSpec, parent: u32) -> Result<u32, TooBig> {
        let index = self.count;
        self.count = self.count.checked_add(1).ok_or(TooBig)?;
        let name_off = u32::try_from(self.names.len()).map_err(|_| TooBig)?;
        let name_len = u16::try_from(spec.name.len()).map_err(|_| TooBig)?;
        self.names.extend_from_slice(&spec.name);
        let target_off = u32::try_from(self.names.len()).map_err(|_| TooBig)?;
        let target_len = u32::try_from(spec.target.len()).map_err(|_| TooBig)?;
        self.names.extend_from_slice(&spec.target);
        u32::try_from(self.names.len()).map_err(|_| TooBig)?;
        let mut b = [0u8; NODE_LEN];
        b[0] = match spec.kind {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
        };
        b[1] = spec.flags;
        b[2..4].copy_from_slice(&name_len.to_le_bytes());
        b[4..8].copy_from_slice(&spec.mode.to_le_bytes());
        b[8..12].copy_from_slice(&name_off.to_le_bytes());
        b[12..16].copy_from_slice(&parent.to_le_bytes());
        b[16..24].copy_from_slice(&spec.mtime_ns.to_le_bytes());
        let size = if spec.kind == Kind::Symlink {
            spec.target.len() as u64
        } else {
            spec.size
        };
        b[24..32].copy_from_slice(&size.to_le_bytes());
        b[40..44].copy_from_slice(&target_off.to_le_bytes());
        b[44..48].copy_from_slice(&target_len.to_le_bytes());
        b[48..80].copy_from_slice(&spec.hash);
        self.nodes.extend_from_slice(&b);
        Ok(index)
    }

    /// Adds the children of directory node `dir` (sorted bytewise by name, as a tree
    /// holds them); returns the index of the first.
    pub fn add_children(&mut self, dir: u32, children: &[NodeSpec]) -> Result<u32, TooBig> {
        let first = self.count;
        for child in children {
            self.push(child, dir)?;
        }
        let count = u32::try_from(children.len()).map_err(|_| TooBig)?;
        let at = dir as usize * NODE_LEN;
        self.nodes[at + 32..at + 36].copy_from_slice(&first.to_le_bytes());
        self.nodes[at + 36..at + 40].copy_from_slice(&count.to_le_bytes());
        Ok(first)
    }

    /// The index's bytes.
    pub fn finish(self, root_hash: [u8; 32], device: u64, view_flags: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.nodes.len() + self.names.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&root_hash);
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(self.names.len() as u32).to_le_bytes());
        out.extend_from_slice(&device.to_le_bytes());
        out.extend_from_slice(&view_flags.to_le_bytes());
        out.extend_from_slice(&self.nodes);
        out.extend_from_slice(&self.names);
        out
    }
}

#[cfg(test)]
mod tests;
