//! The agent workspace against hostile use: many branches at once on a server with few
//! descriptors, and programs in a branch trying to leave it. Needs /dev/fuse and either
//! root or fusermount3: elsewhere the tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fuse_available, Env, Mounted};

/// `velo workspace init WS --from TREE --mount MNT EXTRA` run by `sh -c 'PREFIX; exec
/// velo ...'` (the server inherits what PREFIX sets); unmounted when the guard goes.
fn workspace_with<'a>(
    env: &'a Env,
    tree: &str,
    prefix: &str,
    extra: &[&str],
) -> (PathBuf, Mounted<'a>) {
    let ws = env.path("ws");
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{prefix}; exec \"$@\""))
        .arg("sh")
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(["workspace", "init"])
        .arg(&ws)
        .args(["--from", tree, "--mount"])
        .arg(&at)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "workspace init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (ws, Mounted { env, at })
}

fn in_ws(env: &Env, ws: &Path, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.insert(1, "--workspace");
    all.insert(2, ws.to_str().unwrap());
    env.ok(&all)
}

fn branch_dir(at: &Path, name: &str) -> PathBuf {
    at.join(".velo/branches").join(name)
}

#[test]
fn many_branches_never_run_a_server_with_few_descriptors_out_of_them() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    let files: Vec<(String, Vec<u8>)> = (0..150)
        .map(|i| (format!("t/f{i}"), format!("tree {i}\n").into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    common::ingest_files(&env, "t", &refs);
    // Each branch's caches once kept up to 4,096 directories and 1,024 blobs open: a
    // few branches ran a server with 256 descriptors out of them (EMFILE).
    let (ws, mounted) = workspace_with(&env, "t", "ulimit -n 256", &[]);
    let at = mounted.at.clone();
    let mut roots = vec![at.clone()];
    for b in 0..8 {
        let name = format!("b{b}");
        in_ws(&env, &ws, &["branch", "create", &name]);
        roots.push(branch_dir(&at, &name));
    }
    for (b, root) in roots.iter().enumerate() {
        for i in 0..40 {
            let dir = root.join(format!("d{i}/e"));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let file = dir.join("f");
            fs::write(&file, format!("{b} {i}\n"))
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
        for (path, bytes) in &files {
            let file = root.join(path);
            let read = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(&read, bytes, "{}", file.display());
        }
    }
    // Everything made is still there and each branch's own.
    for (b, root) in roots.iter().enumerate() {
        for i in 0..40 {
            let file = root.join(format!("d{i}/e/f"));
            let read = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(read, format!("{b} {i}\n").into_bytes());
        }
    }
    drop(mounted);
    env.fsck_ok();
}
