//! Issue 9: every projection of a tree shows the tree's recorded metadata exactly.
//!
//! - A hard-linked checkout and every lower of `velo run --isolate` (a cached hard-link
//!   farm): each regular file shows the tree's mtime to the nanosecond and the mode
//!   `(tree_mode & 0o555) | 0o400` (write and set-id/sticky bits dropped, the inode being
//!   a shared read-only store inode; owner read kept); symlinks and directories the tree's
//!   mtime, directories the tree's mode less group/other write.
//! - A copy checkout: the exact mode (less set-uid/set-gid unless `--preserve-setuid`) and
//!   mtime.
//! - The store: a blob's file takes the mode class and mtime of the first file it came
//!   from; an entry that needs another (read-only mode, mtime) links a *variant*,
//!   `blobs/ab/<hex>.<mode in octal>.<mtime_ns>`, which gc keeps while something links it
//!   and fsck checks (bytes against the hash, mode and mtime against the name).
//! - A sandbox commit keeps the tree's mode of a file the command wrote without chmod.
//! - What tools built on mtimes see: `make` inside a sandbox rebuilds exactly what is out of
//!   date, and Python byte code compiled in one projection stays valid in the sandbox.
//!
//! The sandbox tests use the Debian root of scripts/setup_debian_base.sh (gcc, make,
//! python3) or the busybox base of scripts/setup_busybox.sh.

mod common;
#[path = "common/sandbox_env.rs"]
mod sandbox_env;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{is_root, listed, require, touch_ns, Env, Meta};
use velo_core::Hash;

/// What a projection shows for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shown {
    kind: String,
    mode: u32,
    mtime_ns: i64,
    ino: u64,
}

/// lstat of every path below `root` (not `root` itself), keyed like `common::listed`.
fn shown(root: &Path) -> BTreeMap<Vec<u8>, Shown> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel_child = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            let ft = meta.file_type();
            let kind = if ft.is_file() {
                "file"
            } else if ft.is_dir() {
                stack.push(rel_child.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "other"
            };
            out.insert(
                rel_child.as_os_str().as_bytes().to_vec(),
                Shown {
                    kind: kind.into(),
                    mode: meta.mode() & 0o7777,
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    ino: meta.ino(),
                },
            );
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Projection {
    /// A hard-linked checkout or a cached farm (a sandbox lower).
    Hardlink,
    /// A copy checkout without `--preserve-setuid`.
    Copy,
    /// A copy checkout with `--preserve-setuid`.
    CopyPreservingSetuid,
}

/// The mode a projection must show for an entry of the tree.
fn expected_mode(projection: Projection, entry: &Meta) -> u32 {
    match (projection, entry.kind.as_str()) {
        (Projection::Hardlink, "file") => (entry.mode & 0o555) | 0o400,
        (Projection::Hardlink, "dir") => entry.mode & !0o022,
        (Projection::Copy, "file") => entry.mode & !0o6000,
        _ => entry.mode,
    }
}

/// Every way `got` differs from what `projection` must show of `tree`, one line each.
fn differences(
    tree: &BTreeMap<Vec<u8>, Meta>,
    got: &BTreeMap<Vec<u8>, Shown>,
    projection: Projection,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, entry) in tree {
        let name = String::from_utf8_lossy(path);
        let Some(seen) = got.get(path) else {
            out.push(format!("{name}: missing"));
            continue;
        };
        if seen.kind != entry.kind {
            out.push(format!(
                "{name}: a {} where the tree has a {}",
                seen.kind, entry.kind
            ));
            continue;
        }
        let want = expected_mode(projection, entry);
        if seen.mode != want || seen.mtime_ns != entry.mtime_ns {
            out.push(format!(
                "{name} ({}): shows mode {:o} mtime_ns {}, want mode {want:o} mtime_ns {} \
                 (tree mode {:o})",
                entry.kind, seen.mode, seen.mtime_ns, entry.mtime_ns, entry.mode
            ));
        }
    }
    for path in got.keys().filter(|p| !tree.contains_key(*p)) {
        out.push(format!(
            "{}: not in the tree",
            String::from_utf8_lossy(path)
        ));
    }
    // Missing, extra and other-kind entries first: they say the most.
    out.sort_by_key(|line| {
        !(line.ends_with("missing")
            || line.ends_with("not in the tree")
            || line.contains(" where the tree has "))
    });
    out
}

fn assert_shows_tree(
    what: &str,
    tree: &BTreeMap<Vec<u8>, Meta>,
    got: &BTreeMap<Vec<u8>, Shown>,
    projection: Projection,
) {
    let diffs = differences(tree, got, projection);
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} entries differ from the tree ({projection:?} rule), e.g.:\n{}",
        diffs.len(),
        tree.len(),
        diffs
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every file of the hard-linked checkout `co` is one of the store's files for its blob:
/// the blob itself or one of its variants (`<hex>.<…>`), never a copy.
fn assert_links_store_blobs(env: &Env, tree: &BTreeMap<Vec<u8>, Meta>, co: &Path) {
    let mut by_inode: HashMap<u64, String> = HashMap::new();
    for shard in fs::read_dir(env.store.join("blobs")).unwrap().flatten() {
        for file in fs::read_dir(shard.path()).unwrap().flatten() {
            let ino = file.metadata().unwrap().ino();
            by_inode.insert(ino, file.file_name().to_string_lossy().into_owned());
        }
    }
    let mut bad = Vec::new();
    for (path, entry) in tree.iter().filter(|(_, e)| e.kind == "file") {
        let hash = entry.hash.clone().unwrap();
        let ino = fs::symlink_metadata(co.join(OsStr::from_bytes(path)))
            .unwrap()
            .ino();
        match by_inode.get(&ino) {
            Some(name) if *name == hash || name.starts_with(&format!("{hash}.")) => {}
            other => bad.push(format!(
                "{}: links {other:?}, not blob {hash} or a variant of it",
                String::from_utf8_lossy(path)
            )),
        }
    }
    assert!(
        bad.is_empty(),
        "{} files of the hard-linked checkout are not the store's inodes, e.g.:\n{}",
        bad.len(),
        bad.iter().take(12).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The tree `name` as `velo ls -R --json` lists it, checked against the source it was
/// ingested from (the ingest records lstat's mode and mtime: the reference of these tests).
fn recorded(env: &Env, name: &str, source: &Path) -> BTreeMap<Vec<u8>, Meta> {
    let tree = listed(env, name);
    assert_eq!(
        tree,
        common::scan(source),
        "the tree {name} records what lstat says of its source"
    );
    tree
}

/// Copy checkouts, with and without `--preserve-setuid`, show the exact modes and mtimes.
fn check_copy_checkouts(env: &Env, name: &str, tree: &BTreeMap<Vec<u8>, Meta>) {
    for (flag, projection) in [
        (None, Projection::Copy),
        (Some("--preserve-setuid"), Projection::CopyPreservingSetuid),
    ] {
        let dest = env.path(&format!("copy-{name}-{}", flag.is_some()));
        let mut args = vec!["checkout", name, dest.to_str().unwrap(), "--mode", "copy"];
        args.extend(flag);
        env.ok(&args);
        assert_shows_tree(
            &format!("copy checkout of {name} {flag:?}"),
            tree,
            &shown(&dest),
            projection,
        );
    }
}

/// A hard-linked checkout of `name` into `dest` links every file and shows every entry by
/// the hard-link rule.
fn check_hardlink_checkout(env: &Env, name: &str, tree: &BTreeMap<Vec<u8>, Meta>, dest: &Path) {
    let report = env.json(&["checkout", name, dest.to_str().unwrap()]);
    assert_eq!(
        report["linked"], report["files"],
        "every file is hard-linked: {report}"
    );
    assert_shows_tree(
        &format!("hard-linked checkout of {name} at {}", dest.display()),
        tree,
        &shown(dest),
        Projection::Hardlink,
    );
    assert_links_store_blobs(env, tree, dest);
}

fn set_mtime(path: &Path, mtime_ns: i64) {
    touch_ns(
        path,
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000) as u64,
    );
}

/// Writes `bytes` to `path` (making its parents), then sets its mode and mtime.
fn write_file(path: &Path, bytes: &[u8], mode: u32, mtime_ns: i64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(path, mtime_ns);
}

fn set_dir(path: &Path, mode: u32, mtime_ns: i64) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(path, mtime_ns);
}

/// `touch -d DATE PATH`.
fn touch_d(path: &Path, date: &str) {
    let status = Command::new("touch")
        .args(["-h", "-d", date])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "touch -d {date} {path:?}");
}

const SHARED: &[u8] = b"the same bytes in many places, with many modes and mtimes\n";

/// Files whose bytes repeat under other modes and mtimes (so a farm needs variants), every
/// mode class, set-id and sticky bits, mtimes before and at the epoch, empty files, odd
/// directory modes and a symlink with its own mtime.
fn odd_fixture(dir: &Path) {
    let s = 1_000_000_000i64;
    let mut files: Vec<(&str, &[u8], u32, i64)> = vec![
        ("shared-644", SHARED, 0o644, 1_600_000_000 * s + 123_456_789),
        ("shared-644-older", SHARED, 0o644, 1_500_000_000 * s + 1),
        ("shared-755", SHARED, 0o755, 1_600_000_000 * s + 123_456_789),
        (
            "shared-755-older",
            SHARED,
            0o755,
            1_400_000_000 * s + 999_999_999,
        ),
        ("shared-600", SHARED, 0o600, 1_600_000_000 * s + 123_456_789),
        ("shared-750", SHARED, 0o750, 1_600_000_001 * s),
        ("shared-444", SHARED, 0o444, 1_600_000_002 * s + 2),
        ("shared-400", SHARED, 0o400, 1_600_000_003 * s + 3),
        ("shared-before-1970", SHARED, 0o644, -1),
        (
            "d-odd/shared-751",
            SHARED,
            0o751,
            1_234_567_890 * s + 987_654_321,
        ),
        (
            "d-sticky/shared-664",
            SHARED,
            0o664,
            1_650_000_000 * s + 500,
        ),
        (
            "setuid",
            b"#!/bin/sh\necho setuid\n",
            0o4755,
            1_300_000_000 * s + 4,
        ),
        (
            "setgid",
            b"#!/bin/sh\necho setgid\n",
            0o2750,
            1_300_000_000 * s + 5,
        ),
        ("sticky-file", b"sticky\n", 0o1644, 1_300_000_000 * s + 6),
        (
            "before-1970",
            b"older than the epoch\n",
            0o644,
            -86_400 * 365 * 3 * s + 5,
        ),
        ("at-the-epoch", b"at the epoch\n", 0o644, 0),
        ("empty", b"", 0o644, 1_700_000_000 * s + 7),
        ("empty-600", b"", 0o600, 1_100_000_000 * s + 8),
    ];
    if is_root() {
        // Modes that deny the owner's read: only root can ingest them.
        files.push(("no-permissions", SHARED, 0o000, 1_200_000_000 * s + 9));
        files.push(("write-only", b"write only\n", 0o200, 1_200_000_000 * s + 10));
    }
    fs::create_dir_all(dir.join("d-setgid")).unwrap();
    for (name, bytes, mode, mtime) in files {
        write_file(&dir.join(name), bytes, mode, mtime);
    }
    std::os::unix::fs::symlink("../shared-644", dir.join("d-odd/link")).unwrap();
    set_mtime(&dir.join("d-odd/link"), 1_300_000_000 * s + 77);
    set_dir(&dir.join("d-odd"), 0o750, 1_200_000_000 * s + 11);
    set_dir(&dir.join("d-sticky"), 0o1777, 1_200_000_000 * s + 12);
    set_dir(&dir.join("d-setgid"), 0o2775, -7 * s + 13);
    set_dir(dir, 0o755, 1_250_000_000 * s + 14);
}

/// This repository's sources (no target/, no .git), copied with their metadata.
fn copy_repository(dest: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    fs::create_dir_all(dest).unwrap();
    for part in ["crates", "docs", "scripts", "samples"] {
        if repo.join(part).exists() {
            common::cp("-a", &repo.join(part), &dest.join(part));
        }
    }
}

#[test]
fn checkouts_of_this_repository_show_each_entry_s_exact_tree_mtime_and_mode() {
    let env = Env::new();
    let src = env.path("src");
    copy_repository(&src.join("repo"));
    odd_fixture(&src.join("odd"));
    env.ingest(&src, &["--name", "repo"]);
    let tree = recorded(&env, "repo", &src);
    check_copy_checkouts(&env, "repo", &tree);
    check_hardlink_checkout(&env, "repo", &tree, &env.path("farm"));
    // A second checkout links the same inodes and shows the same.
    check_hardlink_checkout(&env, "repo", &tree, &env.path("farm2"));
    env.fsck_ok();
}

#[test]
fn checkouts_of_usr_include_show_each_entry_s_exact_tree_mtime_and_mode() {
    let include = Path::new("/usr/include");
    if !require(include.is_dir(), "/usr/include (libc6-dev)") {
        return;
    }
    let env = Env::new();
    env.ingest(include, &["--name", "include"]);
    let tree = recorded(&env, "include", include);
    check_copy_checkouts(&env, "include", &tree);
    check_hardlink_checkout(&env, "include", &tree, &env.path("farm"));
    env.fsck_ok();
}

#[test]
fn the_same_bytes_ingested_later_with_another_mtime_show_each_tree_s_own_mtime() {
    let env = Env::new();
    let a = env.path("a");
    write_file(
        &a.join("one"),
        b"one content, two trees\n",
        0o644,
        1_580_000_000_000_000_111,
    );
    env.ingest(&a, &["--name", "a"]);
    let tree_a = recorded(&env, "a", &a);
    check_hardlink_checkout(&env, "a", &tree_a, &env.path("a-farm-1"));

    // Later, the same bytes in another tree: a copy `touch -d`-ed to another date, an
    // executable copy and a private copy with a's very mtime.
    let b = env.path("b");
    fs::create_dir_all(&b).unwrap();
    fs::copy(a.join("one"), b.join("one")).unwrap();
    touch_d(&b.join("one"), "2023-03-03 03:03:03.333333333 UTC");
    fs::copy(a.join("one"), b.join("exec")).unwrap();
    fs::set_permissions(b.join("exec"), fs::Permissions::from_mode(0o755)).unwrap();
    touch_d(&b.join("exec"), "2019-09-09 09:09:09.999999999 UTC");
    write_file(
        &b.join("private"),
        b"one content, two trees\n",
        0o600,
        1_580_000_000_000_000_111,
    );
    env.ingest(&b, &["--name", "b"]);
    let tree_b = recorded(&env, "b", &b);
    check_copy_checkouts(&env, "b", &tree_b);
    check_hardlink_checkout(&env, "b", &tree_b, &env.path("b-farm"));
    // Checking b out changed nothing a's checkouts show, and a new one of a is still a's.
    assert_shows_tree(
        "a's first checkout, after b's",
        &tree_a,
        &shown(&env.path("a-farm-1")),
        Projection::Hardlink,
    );
    check_hardlink_checkout(&env, "a", &tree_a, &env.path("a-farm-2"));
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// The sandbox: the Debian base of scripts/setup_debian_base.sh.

fn debian_root() -> PathBuf {
    std::env::var_os("VELO_DEBIAN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/velo-tests/bookworm-gcc"))
}

/// The Debian root, if the machine can run the sandbox and the root has `needs`.
fn debian_ready(needs: &[&str]) -> Option<PathBuf> {
    let probe = Command::new(common::velo_bin())
        .arg("__probe-userns")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !require(probe, "unprivileged user namespaces") {
        return None;
    }
    let root = debian_root();
    for need in needs {
        if !require(
            root.join(need).exists(),
            &format!("a Debian root with {need} (run scripts/setup_debian_base.sh as root)"),
        ) {
            return None;
        }
    }
    Some(root)
}

/// `velo run --isolate --farm-modes read-only ARGS` (layers and options, then
/// `-- COMMAND`): the farms these tests check are the read-only kind, whatever the file
/// system of the test's store (writable farms are checked in tests/sandbox.rs).
fn velo_run(env: &Env, args: &[&str]) -> Output {
    let mut cmd = env.cmd();
    cmd.args(["run", "--isolate", "--farm-modes", "read-only"])
        .args(args);
    cmd.output().unwrap()
}

fn assert_ran(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Parses `stat -c '%F|%a|%.9Y|%n'` lines into what the sandbox shows, keyed by the path
/// without its leading `/`.
fn parse_stat_lines(text: &str) -> BTreeMap<Vec<u8>, Shown> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.splitn(4, '|').collect();
        assert_eq!(parts.len(), 4, "a stat line: {line:?}");
        let kind = match parts[0] {
            "regular file" | "regular empty file" => "file",
            "directory" => "dir",
            "symbolic link" => "symlink",
            other => other,
        };
        let mode = u32::from_str_radix(parts[1], 8).unwrap();
        let (negative, digits) = match parts[2].strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, parts[2]),
        };
        let (secs, nanos) = digits.split_once('.').unwrap();
        let magnitude =
            secs.parse::<i64>().unwrap() * 1_000_000_000 + nanos.parse::<i64>().unwrap();
        let path = parts[3].trim_start_matches('/');
        out.insert(
            path.as_bytes().to_vec(),
            Shown {
                kind: kind.into(),
                mode,
                mtime_ns: if negative { -magnitude } else { magnitude },
                ino: 0,
            },
        );
    }
    out
}

/// Mount points of the sandbox and what lies below them: not the layers' files.
fn is_mount_point_path(path: &[u8]) -> bool {
    ["proc", "dev", "tmp"]
        .iter()
        .any(|m| path == m.as_bytes() || path.starts_with(format!("{m}/").as_bytes()))
}

#[test]
fn the_sandbox_lowers_show_each_entry_s_exact_tree_mtime_and_read_only_mode() {
    let Some(root) = debian_ready(&["usr/bin/gcc", "usr/bin/find", "usr/bin/stat"]) else {
        return;
    };
    let env = Env::new();
    env.ingest(&root, &["--name", "debian"]);
    let src = env.path("src");
    copy_repository(&src.join("t/repo"));
    odd_fixture(&src.join("t/odd"));
    // Bytes the base holds too, under other mtimes and modes.
    let s = 1_000_000_000i64;
    for (from, to, mode, mtime) in [
        (
            "usr/include/stdio.h",
            "stdio.h",
            0o644,
            1_000_000_000 * s + 1,
        ),
        ("usr/bin/make", "make-copy", 0o700, 900_000_000 * s + 2),
        ("etc/debian_version", "debian_version", 0o600, -s + 3),
    ] {
        let bytes = fs::read(root.join(from)).unwrap();
        write_file(&src.join("t/from-base").join(to), &bytes, mode, mtime);
    }
    env.ingest(&src, &["--name", "t"]);
    let top = recorded(&env, "t", &src);
    let base = listed(&env, "debian");
    let mut expected: BTreeMap<Vec<u8>, Meta> = base
        .into_iter()
        .chain(top)
        .filter(|(path, _)| !is_mount_point_path(path))
        .collect();
    expected.remove(b"".as_slice());
    let out = velo_run(
        &env,
        &[
            "--base",
            "debian",
            "--manifest",
            "t",
            "--",
            "find",
            "/",
            "-xdev",
            "-exec",
            "stat",
            "-c",
            "%F|%a|%.9Y|%n",
            "{}",
            "+",
        ],
    );
    assert_ran("find | stat in the sandbox", &out);
    let mut got = parse_stat_lines(&String::from_utf8_lossy(&out.stdout));
    got.retain(|path, _| !path.is_empty() && !is_mount_point_path(path));
    assert_shows_tree(
        "the sandbox over the Debian base and the tree t",
        &expected,
        &got,
        Projection::Hardlink,
    );
    env.fsck_ok();
}

/// A file the command wrote keeps the tree's mode in the commit (the sandbox showed it
/// read-only); a file it chmod'ed gets the mode it set.
#[test]
fn a_commit_keeps_the_tree_s_mode_of_files_the_command_wrote_without_chmod() {
    if !sandbox_env::sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, _) = sandbox_env::layers(&env);
    let src = env.path("src");
    let t = 1_600_000_000_000_000_000i64;
    for (name, mode) in [
        ("secret", 0o600),
        ("pub", 0o644),
        ("script", 0o700),
        ("chmodded", 0o644),
        ("touched", 0o600),
        ("untouched", 0o600),
    ] {
        write_file(
            &src.join("m").join(name),
            format!("{name}\n").as_bytes(),
            mode,
            t,
        );
    }
    env.ingest(&src, &["--name", "modes"]);
    let before = listed(&env, "modes");
    let script = "stat -c '%n %a' /m/secret /m/pub /m/script && \
                  for f in secret pub script chmodded; do echo appended >> /m/$f || exit 1; done && \
                  chmod 640 /m/chmodded && touch /m/touched";
    let out = velo_run(
        &env,
        &[
            "--base",
            busybox.to_str().unwrap(),
            "--manifest",
            "modes",
            "--name",
            "after",
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
    );
    assert_ran("the appending run", &out);
    let after = listed(&env, "after");
    let mut wrong = Vec::new();
    for (name, mode) in [
        ("m/secret", 0o600),
        ("m/pub", 0o644),
        ("m/script", 0o700),
        ("m/chmodded", 0o640),
        ("m/touched", 0o600),
        ("m/untouched", 0o600),
    ] {
        let got = after[name.as_bytes()].mode;
        if got != mode {
            wrong.push(format!("{name}: committed {got:o}, want {mode:o}"));
        }
    }
    assert!(wrong.is_empty(), "committed modes:\n{}", wrong.join("\n"));
    for name in ["secret", "pub", "script", "chmodded"] {
        assert_eq!(
            env.ok(&["cat", "after", &format!("m/{name}")]),
            format!("{name}\nappended\n")
        );
    }
    assert_eq!(
        after[b"m/untouched".as_slice()],
        before[b"m/untouched".as_slice()],
        "a file the command left alone is the same entry"
    );
    // Inside, the files showed the hard-link rule's read-only modes.
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in ["/m/secret 400", "/m/pub 444", "/m/script 500"] {
        assert!(
            stdout.lines().any(|l| l == line),
            "the sandbox did not show {line:?}:\n{stdout}"
        );
    }
    env.fsck_ok();
}

/// What the base's `make -q` says of targets `a` and `b` in the host directory `dir`,
/// seen through a read-only bind (which shows the host's own inodes): the lines
/// `make -q a: N` and `make -q b: N`.
fn make_q_in(env: &Env, dir: &Path) -> String {
    let bind = format!("{}:/w:ro", dir.display());
    let out = velo_run(
        env,
        &[
            "--manifest",
            "debian",
            "--bind",
            &bind,
            "--workdir",
            "/w",
            "--",
            "/bin/sh",
            "-c",
            MAKE_Q,
        ],
    );
    assert_ran("make -q over a bind", &out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("make -q "))
        .collect::<Vec<_>>()
        .join("\n")
}

const MAKE_Q: &str = "make -q a; echo \"make -q a: $?\"; make -q b; echo \"make -q b: $?\"";

#[test]
fn make_in_the_sandbox_sees_the_tree_s_mtimes_and_rebuilds_only_what_is_out_of_date() {
    let Some(_) = debian_ready(&["usr/bin/gcc", "usr/bin/make"]) else {
        return;
    };
    let root = debian_root();
    let env = Env::new();
    env.ingest(&root, &["--name", "debian"]);
    let s = 1_000_000_000i64;
    let (y2000, y2020, y2021, y2022) = (
        946_684_800 * s,
        1_577_836_800 * s + 1,
        1_609_459_200 * s + 2,
        1_640_995_200 * s + 3,
    );
    let a_c = b"int main(void) { return 0; }\n".as_slice();
    let a_old = b"a, built before a.c last changed\n".as_slice();
    let b_c = b"int main(void) { return 1; }\n".as_slice();
    let b_built = b"b, built after b.c last changed\n".as_slice();
    // Stored first, under an older mtime: a.c's source bytes and b's built bytes. A farm
    // that showed a blob's first mtime (or the time it was stored) would show a.c older
    // than a and b older than b.c: the wrong answer both ways.
    let seed = env.path("seed");
    write_file(&seed.join("a.c-earlier"), a_c, 0o644, y2000);
    write_file(&seed.join("b-earlier"), b_built, 0o755, y2000);
    env.ingest(&seed, &["--name", "seed"]);

    let src = env.path("src");
    write_file(
        &src.join("w/Makefile"),
        b"all: a b\na: a.c\n\tgcc -o a a.c\nb: b.c\n\tgcc -o b b.c\n",
        0o644,
        y2020,
    );
    write_file(&src.join("w/a.c"), a_c, 0o644, y2022);
    write_file(&src.join("w/a"), a_old, 0o755, y2021);
    write_file(&src.join("w/b.c"), b_c, 0o644, y2021);
    write_file(&src.join("w/b"), b_built, 0o755, y2022);
    env.ingest(&src, &["--name", "mk"]);
    let before = recorded(&env, "mk", &src);

    // The source and a copy checkout, bound in as they are: a is out of date, b is not.
    let copy = env.path("copy");
    env.ok(&["checkout", "mk", copy.to_str().unwrap(), "--mode", "copy"]);
    for dir in [src.join("w"), copy.join("w")] {
        assert_eq!(
            make_q_in(&env, &dir),
            "make -q a: 1\nmake -q b: 0",
            "make -q in {dir:?}"
        );
    }

    // In the sandbox: the same answers, and make rebuilds a only.
    let out_velo = env.path("built.velo");
    let out = velo_run(
        &env,
        &[
            "--base",
            "debian",
            "--manifest",
            "mk",
            "--workdir",
            "/w",
            "--commit",
            out_velo.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &format!("{MAKE_Q}; echo '--- make -n'; make -n all; echo '--- make'; make all"),
        ],
    );
    assert_ran("make in the sandbox", &out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.lines().any(|l| l == "make -q a: 1"),
        "inside, make -q must find a out of date (a.c is newer):\n{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l == "make -q b: 0"),
        "inside, make -q must find b up to date (b is newer than b.c):\n{stdout}"
    );
    let dry = stdout
        .split("--- make -n\n")
        .nth(1)
        .and_then(|rest| rest.split("--- make\n").next())
        .unwrap_or("");
    assert!(
        dry.contains("gcc -o a a.c") && !dry.contains("gcc -o b b.c"),
        "make -n inside:\n{dry}"
    );
    let built = listed(&env, out_velo.to_str().unwrap());
    assert_ne!(
        built[b"w/a".as_slice()].hash,
        before[b"w/a".as_slice()].hash,
        "a was rebuilt"
    );
    for name in ["w/b", "w/b.c", "w/a.c", "w/Makefile"] {
        assert_eq!(
            built[name.as_bytes()],
            before[name.as_bytes()],
            "{name} is untouched by the build"
        );
    }

    // A hard-linked checkout, bound in, answers as the source does.
    let farm = env.path("farm");
    env.ok(&["checkout", "mk", farm.to_str().unwrap()]);
    assert_eq!(
        make_q_in(&env, &farm.join("w")),
        "make -q a: 1\nmake -q b: 0",
        "make -q in the hard-linked checkout"
    );
    env.fsck_ok();
}

/// The paths `velo diff --json FROM TO` lists (change and path) that `keep` selects.
fn changes(env: &Env, from: &str, to: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let diff = env.json(&["diff", from, to]);
    diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| {
            let path = c["path"].as_str().unwrap_or("");
            keep(path).then(|| format!("{} {path}", c["change"].as_str().unwrap_or("")))
        })
        .collect()
}

fn under_py(path: &str) -> bool {
    path == "py" || path.starts_with("py/")
}

/// Byte code compiled by the base's own python3 against the source's real metadata (a
/// bind of the source directory) is valid in the sandbox's farm, and so is the base's own
/// (Debian compiles it at install): an import writes nothing, and the run's commit equals
/// its layers.
#[test]
fn python_byte_code_compiled_outside_the_farm_is_valid_in_the_sandbox() {
    let Some(_) = debian_ready(&["usr/bin/python3"]) else {
        return;
    };
    let root = debian_root();
    let env = Env::new();
    env.ingest(&root, &["--name", "debian"]);
    let s = 1_000_000_000i64;
    let src = env.path("src");
    let modules: [(&str, &[u8], u32, i64); 4] = [
        (
            "py/pkg/__init__.py",
            b"from . import util\n",
            0o644,
            1_590_000_000 * s + 111_111_111,
        ),
        (
            "py/pkg/util.py",
            b"def double(x):\n    return 2 * x\n",
            0o600,
            1_590_000_100 * s + 999_999_999,
        ),
        ("py/pkg/sub/__init__.py", b"", 0o644, 1_590_000_200 * s),
        (
            "py/pkg/sub/deep.py",
            b"from pkg.util import double\nVALUE = double(21)\n",
            0o444,
            1_590_000_300 * s + 5,
        ),
    ];
    for (path, bytes, mode, mtime) in modules {
        write_file(&src.join(path), bytes, mode, mtime);
    }
    // Compile with the python3 of the base (the version the sandbox runs), writing the
    // byte code into the source through a bind.
    let bind = format!("{}:/py", src.join("py").display());
    let out = velo_run(
        &env,
        &[
            "--manifest",
            "debian",
            "--bind",
            &bind,
            "--",
            "python3",
            "-m",
            "compileall",
            "-q",
            "/py",
        ],
    );
    assert_ran("compileall", &out);
    env.ingest(&src, &["--name", "compiled"]);
    let compiled = recorded(&env, "compiled", &src);
    let pycs = compiled
        .keys()
        .filter(|p| String::from_utf8_lossy(p).ends_with(".pyc"))
        .count();
    assert_eq!(pycs, 4, "compileall wrote one .pyc per module");
    let import = |tree: &str, commit: &Path| {
        velo_run(
            &env,
            &[
                "--base",
                "debian",
                "--manifest",
                tree,
                "--workdir",
                "/py",
                "--commit",
                commit.to_str().unwrap(),
                "--",
                "python3",
                "-v",
                "-c",
                "import json, pkg.sub.deep; assert pkg.sub.deep.VALUE == 42",
            ],
        )
    };

    let out_velo = env.path("out.velo");
    let out = import("compiled", &out_velo);
    assert_ran("the import", &out);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let out_name = out_velo.to_str().unwrap();
    let mut rewritten = changes(&env, "compiled", out_name, under_py);
    rewritten.extend(changes(&env, "debian", out_name, |p| !under_py(p)));
    assert!(
        rewritten.is_empty(),
        "importing in the sandbox wrote {} paths, e.g. {:?}\n{}",
        rewritten.len(),
        &rewritten[..rewritten.len().min(8)],
        stderr
            .lines()
            .filter(|l| l.contains("stale"))
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        env.json(&["show", out_name, "py"])["hash"],
        env.json(&["show", "compiled", "py"])["hash"],
        "the committed py/ is the input's"
    );
    assert!(
        !stderr.contains("bytecode is stale"),
        "python found stale byte code:\n{stderr}"
    );
    for source in [
        "/py/pkg/__init__.py",
        "/py/pkg/util.py",
        "/py/pkg/sub/__init__.py",
        "/py/pkg/sub/deep.py",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("# ") && l.ends_with(&format!(".pyc matches {source}"))),
            "python did not use the byte code of {source}"
        );
    }

    // The control, so the check above cannot pass for want of a write: a tree whose
    // util.py has another mtime than its .pyc records. Python finds that byte code stale,
    // writes it again, and the commit shows it.
    set_mtime(&src.join("py/pkg/util.py"), 1_500_000_000 * s);
    env.ingest(&src, &["--name", "stale"]);
    let stale_out = env.path("stale-out.velo");
    let out = import("stale", &stale_out);
    assert_ran("the import over a stale .pyc", &out);
    let rewritten = changes(&env, "stale", stale_out.to_str().unwrap(), under_py);
    assert!(
        rewritten
            .iter()
            .any(|c| c.contains("py/pkg/__pycache__/util.")),
        "the control run rewrites util's byte code: {rewritten:?}"
    );
    assert!(
        rewritten.iter().all(|c| c.contains("py/pkg/__pycache__")),
        "and nothing else: {rewritten:?}"
    );
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// Variants in the store: gc and fsck.

const VARIANT_BYTES: &[u8] = b"bytes stored first with one mtime, then needed with another\n";
const T1: i64 = 1_577_836_800_000_000_111;
const T2: i64 = 1_677_836_800_000_000_222;
const T3: i64 = -5_000_000_001;

fn shard(env: &Env, hex: &str) -> PathBuf {
    env.store.join("blobs").join(&hex[..2])
}

/// Names of the store's files for blob `hex` other than the blob itself.
fn variants(env: &Env, hex: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(shard(env, hex))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{hex}.")))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Tree `a` holds the bytes first (mtime T1, 0644); tree `b` the same bytes at T2 (0644)
/// and at T3 (0600); b is checked out hard-linked at `co`. Returns the blob's hex.
fn variant_fixture(env: &Env, co: &Path) -> String {
    let hex = Hash::of_blob(VARIANT_BYTES).to_hex();
    write_file(&env.path("a/f"), VARIANT_BYTES, 0o644, T1);
    env.ingest(&env.path("a"), &["--name", "a"]);
    let blob = fs::metadata(shard(env, &hex).join(&hex)).unwrap();
    assert_eq!(
        (
            blob.mode() & 0o7777,
            blob.mtime() * 1_000_000_000 + blob.mtime_nsec()
        ),
        (0o444, T1),
        "a blob takes the mode class and mtime of the first file it was ingested from"
    );
    write_file(&env.path("b/g"), VARIANT_BYTES, 0o644, T2);
    write_file(&env.path("b/h"), VARIANT_BYTES, 0o600, T3);
    env.ingest(&env.path("b"), &["--name", "b"]);
    env.ok(&["checkout", "b", co.to_str().unwrap()]);
    hex
}

#[test]
fn gc_keeps_a_variant_while_a_checkout_links_it_and_removes_it_after() {
    let env = Env::new();
    let co = env.path("co");
    let hex = variant_fixture(&env, &co);
    let (g_name, h_name) = (format!("{hex}.444.{T2}"), format!("{hex}.400.{T3}"));
    assert_eq!(
        variants(&env, &hex),
        {
            let mut v = vec![g_name.clone(), h_name.clone()];
            v.sort();
            v
        },
        "the checkout of b made one variant per (mode, mtime) the blob did not have"
    );
    for (file, name) in [("g", &g_name), ("h", &h_name)] {
        assert_eq!(
            fs::metadata(co.join(file)).unwrap().ino(),
            fs::metadata(shard(&env, &hex).join(name)).unwrap().ino(),
            "b/{file} links {name}"
        );
    }
    env.fsck_ok();

    env.ok(&["gc", "--run"]);
    assert_eq!(
        variants(&env, &hex).len(),
        2,
        "gc keeps the variants the checkout links"
    );
    env.ok(&["checkout", "--remove", co.to_str().unwrap()]);
    env.ok(&["gc", "--run"]);
    assert_eq!(
        variants(&env, &hex),
        Vec::<String>::new(),
        "gc removes variants nothing links"
    );
    assert!(
        shard(&env, &hex).join(&hex).is_file(),
        "the blob itself stays"
    );
    env.fsck_ok();

    // Checked out again, and the roots forgotten: the blob and its variants go.
    let co2 = env.path("co2");
    env.ok(&["checkout", "b", co2.to_str().unwrap()]);
    assert_eq!(variants(&env, &hex).len(), 2);
    env.ok(&["checkout", "--remove", co2.to_str().unwrap()]);
    env.ok(&["forget", "a"]);
    env.ok(&["forget", "b"]);
    env.ok(&["gc", "--run"]);
    assert!(!shard(&env, &hex).join(&hex).exists());
    assert_eq!(variants(&env, &hex), Vec::<String>::new());
    env.fsck_ok();
}

/// `velo fsck` output (stdout and stderr), asserting it fails.
fn fsck_fails(env: &Env, what: &str) -> String {
    let out = env.run(&["fsck"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "fsck passed a variant with {what}:\n{text}"
    );
    text
}

#[test]
fn fsck_checks_a_variant_s_bytes_against_its_hash_and_its_mode_and_mtime_against_its_name() {
    let env = Env::new();
    let co = env.path("co");
    let hex = variant_fixture(&env, &co);
    let variant = shard(&env, &hex).join(format!("{hex}.444.{T2}"));
    assert!(variant.is_file(), "{:?}", variants(&env, &hex));
    env.fsck_ok();

    // Through the checkout (the same inode): another mtime, then put back.
    set_mtime(&co.join("g"), T1);
    let text = fsck_fails(&env, "another mtime than its name");
    assert!(text.contains(&hex), "fsck names the variant:\n{text}");
    set_mtime(&co.join("g"), T2);
    env.fsck_ok();

    // Another (still read-only) mode, then put back.
    fs::set_permissions(co.join("g"), fs::Permissions::from_mode(0o555)).unwrap();
    let text = fsck_fails(&env, "another mode than its name");
    assert!(text.contains(&hex), "fsck names the variant:\n{text}");
    fs::set_permissions(co.join("g"), fs::Permissions::from_mode(0o444)).unwrap();
    env.fsck_ok();

    // Other bytes of the same length, with the name's mode and mtime put back: only the
    // hash can tell.
    fs::set_permissions(&variant, fs::Permissions::from_mode(0o644)).unwrap();
    let mut damaged = VARIANT_BYTES.to_vec();
    damaged[0] ^= 0x20;
    fs::write(&variant, &damaged).unwrap();
    fs::set_permissions(&variant, fs::Permissions::from_mode(0o444)).unwrap();
    set_mtime(&variant, T2);
    let text = fsck_fails(&env, "bytes that do not match its hash");
    assert!(
        text.contains("corrupt") && text.contains(&hex),
        "fsck reports the variant as corrupt:\n{text}"
    );
}
