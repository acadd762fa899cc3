//! Fuzz target `control`: the decoder of the control messages a velo server (a mount or
//! a workspace) reads from its socket, on hostile input.
//!
//! Every input is given to `velo_control::decode` twice: raw, and wrapped as the `op`
//! and `branch` (or `name` and `out`) of a well-formed version-1 message, so the field
//! checks are reached without a corpus. Oracles: nothing panics; a decoded request
//! encodes to a line that decodes to the same request; a branch that passes has a name
//! the store allows (no `/`, no leading `.`, at most 64 bytes).
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run control -- -max_total_time=60`
#![no_main]

use libfuzzer_sys::fuzz_target;
use velo_control::{decode, encode, Request, MAX_BRANCH_NAME};

fn check(line: &[u8]) {
    let Ok(request) = decode(line) else {
        return;
    };
    assert_eq!(decode(&encode(&request)).as_ref(), Ok(&request));
    if let Request::Snapshot { branch }
    | Request::BranchAdd { branch }
    | Request::BranchDelete { branch }
    | Request::BranchReset { branch, .. }
    | Request::BranchBind { branch, .. } = &request
    {
        assert!(branch.len() <= MAX_BRANCH_NAME);
        assert!(!branch.is_empty() && !branch.contains('/') && !branch.starts_with('.'));
    }
    if let Request::BranchBind { pid, .. } | Request::BranchUnbind { pid } = &request {
        assert!(*pid > 1);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let text = String::from_utf8_lossy(data);
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid -= 1;
    }
    let (head, tail) = text.split_at(mid);
    let number = data.first().map_or(0, |&b| i64::from(b) - 2);
    for op in [
        "snapshot",
        "branch_add",
        "branch_delete",
        "branch_reset",
        "branch_bind",
        "branch_unbind",
        "commit_at_exit",
        head,
    ] {
        let line = serde_json::json!({
            "v": 1, "op": op, "branch": tail, "name": head, "out": tail, "base": head,
            "from": tail, "pid": number,
        });
        check(line.to_string().as_bytes());
    }
});
