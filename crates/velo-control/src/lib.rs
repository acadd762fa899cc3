//! The control messages of a velo server (a `velo mount`, or a workspace's server): what
//! the CLI asks a running server over its control socket, decoded and checked before
//! anything acts on them.
//!
//! A message is one JSON object on one line of at most [`MAX_LINE`] bytes, carrying the
//! protocol version (`"v": 1`) and an operation (`"op"`). [`decode`] turns a line into a
//! [`Request`] whose every field has been validated (branch and root names as the store
//! allows them, paths without NUL), or says what is wrong with it; it never panics, on
//! any bytes (`fuzz/fuzz_targets/control.rs`). [`encode`] is its inverse. This crate
//! calls velo-store only for its name rules; the CLI owns the socket.
#![deny(missing_docs)]

use std::path::PathBuf;

use serde_json::{json, Map, Value};

/// The protocol version this velo speaks.
pub const VERSION: u64 = 1;
/// The longest message either side accepts, end of line included.
pub const MAX_LINE: usize = 64 * 1024;
/// The longest branch name.
pub const MAX_BRANCH_NAME: usize = 64;

/// A request to a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// What the server serves.
    Info,
    /// Seal the (top branch's) changes as a tree; the server goes on serving.
    Commit,
    /// Commit once unmounted, register under `name` and/or write to `out`.
    CommitAtExit {
        /// The root name to register the commit under.
        name: Option<String>,
        /// The `.velo` file to write.
        out: Option<PathBuf>,
    },
    /// Seal branch `branch` of a workspace.
    Snapshot {
        /// Which.
        branch: String,
    },
    /// Serve the branch recorded under this name from now on.
    BranchAdd {
        /// Which.
        branch: String,
    },
    /// Stop serving this branch and delete it (its records, its changes).
    BranchDelete {
        /// Which.
        branch: String,
    },
    /// Point this branch at tree `base` with no changes, and serve it so.
    BranchReset {
        /// Which.
        branch: String,
        /// The tree, 64 hex digits.
        base: String,
        /// What the user named as the tree, for the record (at most 256 bytes).
        from: String,
    },
    /// The names of the branches served.
    Branches,
    /// Show branch `branch` at the top to process `pid` and its descendants.
    BranchBind {
        /// Which branch.
        branch: String,
        /// Which process (above 1).
        pid: u32,
    },
    /// Take process `pid`'s binding away.
    BranchUnbind {
        /// Which process.
        pid: u32,
    },
}

/// Why a line is not a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_LINE`].
    #[error("a message longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// Another protocol version (velo and the server differ).
    #[error("unsupported protocol version (velo and the server differ: remount)")]
    Version,
    /// An operation this version does not know.
    #[error("unknown request {0:?}")]
    UnknownOp(String),
    /// A field is missing or wrong.
    #[error("field {field}: {why}")]
    BadField {
        /// Which.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Checks a branch name: what a root name may hold (it is part of one), at most
/// [`MAX_BRANCH_NAME`] characters.
pub fn validate_branch_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_BRANCH_NAME {
        return Err(format!(
            "branch name {:?}: at most {MAX_BRANCH_NAME} characters",
            name.chars().take(MAX_BRANCH_NAME + 6).collect::<String>()
        ));
    }
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "branch name {name:?}: not only digits (it would read as a snapshot id)"
        ));
    }
    velo_store::validate_root_name(name).map_err(|e| format!("branch name: {e}"))
}

/// A JSON object whose keys are each given once: a message that names a field twice
/// could be read one way by this check and another way by a later reader.
struct Strict(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Strict, A::Error> {
                let mut object = Map::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if object.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "field {key:?} given twice"
                        )));
                    }
                    object.insert(key, value);
                }
                Ok(Strict(object))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

fn text<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, DecodeError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(DecodeError::BadField {
            field,
            why: "not a string".into(),
        }),
    }
}

fn pid(object: &Map<String, Value>) -> Result<u32, DecodeError> {
    object
        .get("pid")
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 1)
        .ok_or(DecodeError::BadField {
            field: "pid",
            why: "missing, or not a process id above 1".into(),
        })
}

fn branch(object: &Map<String, Value>) -> Result<String, DecodeError> {
    let name = text(object, "branch")?.ok_or(DecodeError::BadField {
        field: "branch",
        why: "missing".into(),
    })?;
    validate_branch_name(name).map_err(|why| DecodeError::BadField {
        field: "branch",
        why,
    })?;
    Ok(name.to_string())
}

/// The request on `line` (one message, with or without its end of line).
pub fn decode(line: &[u8]) -> Result<Request, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let Strict(object) =
        serde_json::from_slice(line).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    if object.get("v").and_then(Value::as_u64) != Some(VERSION) {
        return Err(DecodeError::Version);
    }
    let op = text(&object, "op")?.ok_or(DecodeError::BadField {
        field: "op",
        why: "missing".into(),
    })?;
    Ok(match op {
        "info" => Request::Info,
        "commit" => Request::Commit,
        "branches" => Request::Branches,
        "snapshot" => Request::Snapshot {
            branch: branch(&object)?,
        },
        "branch_add" => Request::BranchAdd {
            branch: branch(&object)?,
        },
        "branch_bind" => Request::BranchBind {
            branch: branch(&object)?,
            pid: pid(&object)?,
        },
        "branch_unbind" => Request::BranchUnbind { pid: pid(&object)? },
        "branch_delete" => Request::BranchDelete {
            branch: branch(&object)?,
        },
        "branch_reset" => {
            let bad = |field, why: &str| DecodeError::BadField {
                field,
                why: why.into(),
            };
            let base = text(&object, "base")?.ok_or(bad("base", "missing"))?;
            if base.len() != 64 || !base.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("base", "not a tree hash (64 hex digits)"));
            }
            let from = text(&object, "from")?.ok_or(bad("from", "missing"))?;
            if from.len() > 256 || from.contains('\0') {
                return Err(bad("from", "longer than 256 bytes, or with a NUL byte"));
            }
            Request::BranchReset {
                branch: branch(&object)?,
                base: base.to_ascii_lowercase(),
                from: from.to_string(),
            }
        }
        "commit_at_exit" => {
            let name = text(&object, "name")?;
            if let Some(name) = name {
                velo_store::validate_root_name(name).map_err(|e| DecodeError::BadField {
                    field: "name",
                    why: e.to_string(),
                })?;
            }
            let out = text(&object, "out")?;
            if out.is_some_and(|o| o.is_empty() || o.contains('\0')) {
                return Err(DecodeError::BadField {
                    field: "out",
                    why: "an empty path or one with a NUL byte".into(),
                });
            }
            Request::CommitAtExit {
                name: name.map(str::to_string),
                out: out.map(PathBuf::from),
            }
        }
        other => {
            return Err(DecodeError::UnknownOp(
                other.chars().take(64).collect::<String>(),
            ))
        }
    })
}

/// The line (without its end) that [`decode`] reads back as `request`. Paths that are
/// not UTF-8 are written lossily: the CLI refuses them before asking.
pub fn encode(request: &Request) -> Vec<u8> {
    let value = match request {
        Request::Info => json!({ "v": VERSION, "op": "info" }),
        Request::Commit => json!({ "v": VERSION, "op": "commit" }),
        Request::Branches => json!({ "v": VERSION, "op": "branches" }),
        Request::Snapshot { branch } => {
            json!({ "v": VERSION, "op": "snapshot", "branch": branch })
        }
        Request::BranchAdd { branch } => {
            json!({ "v": VERSION, "op": "branch_add", "branch": branch })
        }
        Request::BranchDelete { branch } => {
            json!({ "v": VERSION, "op": "branch_delete", "branch": branch })
        }
        Request::BranchBind { branch, pid } => {
            json!({ "v": VERSION, "op": "branch_bind", "branch": branch, "pid": pid })
        }
        Request::BranchUnbind { pid } => {
            json!({ "v": VERSION, "op": "branch_unbind", "pid": pid })
        }
        Request::BranchReset { branch, base, from } => json!({
            "v": VERSION, "op": "branch_reset", "branch": branch, "base": base, "from": from,
        }),
        Request::CommitAtExit { name, out } => json!({
            "v": VERSION, "op": "commit_at_exit", "name": name,
            "out": out.as_ref().map(|o| o.to_string_lossy()),
        }),
    };
    value.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_read_back_as_written() {
        for request in [
            Request::Info,
            Request::Commit,
            Request::Branches,
            Request::Snapshot {
                branch: "task-1".into(),
            },
            Request::BranchAdd { branch: "a".into() },
            Request::BranchDelete { branch: "b".into() },
            Request::BranchBind {
                branch: "b".into(),
                pid: 1234,
            },
            Request::BranchUnbind { pid: 99 },
            Request::BranchReset {
                branch: "b".into(),
                base: "ab".repeat(32),
                from: "3".into(),
            },
            Request::CommitAtExit {
                name: Some("app-v2".into()),
                out: Some("/tmp/x y.velo".into()),
            },
            Request::CommitAtExit {
                name: None,
                out: None,
            },
        ] {
            assert_eq!(decode(&encode(&request)), Ok(request));
        }
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let cases: [(&[u8], &str); 10] = [
            (b"{", "not a JSON object"),
            (b"[1]", "not a JSON object"),
            (b"7", "not a JSON object"),
            (
                br#"{"v":1,"op":"branch_delete","branch":"a","branch":"b"}"#,
                "given twice",
            ),
            (br#"{"op":"info"}"#, "version"),
            (br#"{"v":2,"op":"info"}"#, "version"),
            (br#"{"v":1,"op":"format-disk"}"#, "unknown request"),
            (br#"{"v":1,"op":"snapshot"}"#, "branch: missing"),
            (
                br#"{"v":1,"op":"branch_add","branch":"../x"}"#,
                "branch name",
            ),
            (br#"{"v":1,"op":"commit_at_exit","out":"a\u0000b"}"#, "NUL"),
        ];
        for (line, want) in cases {
            let e = decode(line).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(line));
        }
        assert_eq!(decode(&vec![b' '; MAX_LINE + 1]), Err(DecodeError::TooLong));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(request) = decode(&bytes) {
                prop_assert_eq!(decode(&encode(&request)), Ok(request));
            }
        }

        #[test]
        fn any_branch_field_is_checked(name in ".{0,80}", op in prop_oneof!["snapshot", "branch_add", "branch_delete"]) {
            let line = json!({ "v": 1, "op": op, "branch": name }).to_string();
            match decode(line.as_bytes()) {
                Ok(Request::Snapshot { branch } | Request::BranchAdd { branch } | Request::BranchDelete { branch }) => {
                    prop_assert!(validate_branch_name(&branch).is_ok());
                    prop_assert!(!branch.contains('/') && !branch.starts_with('.'));
                }
                Ok(other) => prop_assert!(false, "{:?}", other),
                Err(_) => prop_assert!(validate_branch_name(&name).is_err()),
            }
        }
    }
}
