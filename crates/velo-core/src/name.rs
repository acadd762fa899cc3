//! The validated name of a directory entry.

use std::fmt;

/// The longest name Linux file systems accept (NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

/// One path component: never empty, `.` or `..`, never containing `/` or NUL, at most
/// 255 bytes. Any other bytes are allowed (names need not be UTF-8).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Box<[u8]>);

/// Why a byte string is not a valid entry name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The empty string.
    #[error("an entry name cannot be empty")]
    Empty,
    /// `.` or `..`.
    #[error("an entry name cannot be {0:?}")]
    Dot(String),
    /// A `/` inside the name.
    #[error("entry name {0:?} cannot contain a slash")]
    Slash(String),
    /// A NUL byte inside the name.
    #[error("entry name {0:?} cannot contain a NUL byte")]
    Nul(String),
    /// More than 255 bytes.
    #[error("entry name of {0} bytes is longer than the 255 bytes a file system allows")]
    TooLong(usize),
}

impl Name {
    /// Validates `bytes` as an entry name.
    pub fn new(bytes: &[u8]) -> Result<Name, NameError> {
        let shown = || String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
        if bytes.is_empty() {
            return Err(NameError::Empty);
        }
        if bytes == b"." || bytes == b".." {
            return Err(NameError::Dot(shown()));
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(bytes.len()));
        }
        if bytes.contains(&b'/') {
            return Err(NameError::Slash(shown()));
        }
        if bytes.contains(&0) {
            return Err(NameError::Nul(shown()));
        }
        Ok(Name(bytes.into()))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as an `OsStr` (lossless on Unix).
    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }
}

impl TryFrom<&[u8]> for Name {
    type Error = NameError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        Name::new(bytes)
    }
}

impl TryFrom<&str> for Name {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Name::new(s.as_bytes())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_to_be_invalid_is_rejected() {
        let long = vec![b'a'; 256];
        let cases: &[(&[u8], NameError)] = &[
            (b"", NameError::Empty),
            (b".", NameError::Dot(".".into())),
            (b"..", NameError::Dot("..".into())),
            (b"a/b", NameError::Slash("a/b".into())),
            (b"/", NameError::Slash("/".into())),
            (b"a\0b", NameError::Nul("a\0b".into())),
            (&long, NameError::TooLong(256)),
        ];
        for (bytes, want) in cases {
            assert_eq!(Name::new(bytes).unwrap_err(), *want, "{bytes:?}");
        }
    }

    #[test]
    fn odd_but_valid_names_are_accepted() {
        for ok in [
            &b"..."[..],
            b".hidden",
            b"\xff\xfe latin",
            b"a b",
            &[b'x'; 255],
        ] {
            assert_eq!(Name::new(ok).unwrap().as_bytes(), ok);
        }
    }
}
