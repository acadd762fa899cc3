//! Extended attributes an entry keeps: which ones a tree records, and their limits.
//!
//! Kept: `user.*` (except `user.overlay.*`, the upper format's own, and `user.velo.*`,
//! velo's bookkeeping) and `security.capability` (file capabilities, which programs such
//! as `ping` need to work). Not kept: `trusted.*` (root's private data, overlayfs's),
//! `security.selinux` and the like (labels belong to the host's policy, not to the
//! content), `system.posix_acl_*` (not yet: an ACL changes what a mode means).

use crate::DecodeError;

/// The longest attribute name (Linux's `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// The largest attribute value (Linux's `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 65536;
/// The most attributes one entry keeps.
pub const MAX_XATTRS: usize = 256;

/// Whether a tree records the attribute `name`.
pub fn is_kept_xattr(name: &[u8]) -> bool {
    (name.starts_with(b"user.")
        && name.len() > 5
        && !name.starts_with(b"user.overlay.")
        && !name.starts_with(b"user.velo."))
        || name == b"security.capability"
}

/// An entry's extended attributes: kept names only, strictly ascending, each value at
/// most [`MAX_XATTR_VALUE`] bytes. Empty for almost every entry.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Xattrs(Vec<Pair>);

/// One attribute: name, value.
type Pair = (Box<[u8]>, Box<[u8]>);

/// Why a set of attributes cannot be kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XattrError {
    /// A name a tree does not record, or an empty or overlong one.
    #[error("extended attribute {0:?} is not one a tree records (user.*, security.capability)")]
    NotKept(String),
    /// A value over the limit.
    #[error("extended attribute {0:?} is larger than {MAX_XATTR_VALUE} bytes")]
    TooLarge(String),
    /// Too many.
    #[error("more than {MAX_XATTRS} extended attributes on one entry")]
    TooMany,
    /// One name twice.
    #[error("extended attribute {0:?} given twice")]
    Duplicate(String),
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Xattrs {
    /// Builds a set from pairs in any order.
    pub fn new(mut pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Xattrs, XattrError> {
        if pairs.len() > MAX_XATTRS {
            return Err(XattrError::TooMany);
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, value)) in pairs.iter().enumerate() {
            if !is_kept_xattr(name) || name.len() > MAX_XATTR_NAME || name.contains(&0) {
                return Err(XattrError::NotKept(shown(name)));
            }
            if value.len() > MAX_XATTR_VALUE {
                return Err(XattrError::TooLarge(shown(name)));
            }
            if i > 0 && pairs[i - 1].0 == *name {
                return Err(XattrError::Duplicate(shown(name)));
            }
        }
        Ok(Xattrs(
            pairs
                .into_iter()
                .map(|(n, v)| (n.into_boxed_slice(), v.into_boxed_slice()))
                .collect(),
        ))
    }

    /// No attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (name, value) pairs, ascending by name.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.iter().map(|(n, v)| (&n[..], &v[..]))
    }

    /// The value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.0
            .binary_search_by(|(n, _)| n[..].cmp(name))
            .ok()
            .map(|i| &self.0[i].1[..])
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        crate::codec::put_varint(out, self.0.len() as u64);
        for (name, value) in &self.0 {
            crate::codec::put_varint(out, name.len() as u64);
            out.extend_from_slice(name);
            crate::codec::put_varint(out, value.len() as u64);
            out.extend_from_slice(value);
        }
    }

    pub(crate) fn decode(
        r: &mut crate::codec::Reader<'_>,
        entry: &str,
    ) -> Result<Xattrs, DecodeError> {
        let count = r.bounded("xattr count", MAX_XATTRS as u64)?;
        let mut pairs: Vec<Pair> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = r.bounded("xattr name length", MAX_XATTR_NAME as u64)?;
            let name = r.take(len as usize, "xattr name")?;
            let len = r.bounded("xattr value length", MAX_XATTR_VALUE as u64)?;
            let value = r.take(len as usize, "xattr value")?;
            let bad = |why: &'static str| DecodeError::BadXattr {
                name: entry.to_string(),
                xattr: shown(name),
                why,
            };
            if !is_kept_xattr(name) || name.contains(&0) {
                return Err(bad("a name a tree does not record"));
            }
            if pairs.last().is_some_and(|(prev, _)| prev[..] >= *name) {
                return Err(bad("names not strictly ascending"));
            }
            pairs.push((name.into(), value.into()));
        }
        Ok(Xattrs(pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_and_capability_attributes_are_kept() {
        assert!(is_kept_xattr(b"user.mime_type"));
        assert!(is_kept_xattr(b"security.capability"));
        for refused in [
            &b"user."[..],
            b"user.overlay.opaque",
            b"user.velo.base",
            b"trusted.overlay.opaque",
            b"security.selinux",
            b"system.posix_acl_access",
        ] {
            assert!(!is_kept_xattr(refused), "{}", shown(refused));
        }
        let set = Xattrs::new(vec![
            (b"user.b".to_vec(), b"2".to_vec()),
            (b"user.a".to_vec(), b"1".to_vec()),
        ])
        .unwrap();
        assert_eq!(
            set.iter().map(|(n, _)| n.to_vec()).collect::<Vec<_>>(),
            vec![b"user.a".to_vec(), b"user.b".to_vec()]
        );
        assert_eq!(set.get(b"user.b"), Some(&b"2"[..]));
        assert!(Xattrs::new(vec![
            (b"user.a".to_vec(), vec![]),
            (b"user.a".to_vec(), vec![])
        ])
        .is_err());
        assert!(Xattrs::new(vec![(b"user.a".to_vec(), vec![0; MAX_XATTR_VALUE + 1])]).is_err());
    }
}
