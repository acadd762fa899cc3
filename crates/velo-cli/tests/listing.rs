//! Listing what a store holds when what it holds is odd (issue 8, items 1 and 4): files
//! dated before 1970, damaged root records. A listing reports and goes on; it never panics.

mod common;

use std::fs;

use common::Env;

#[test]
fn files_dated_before_1970_are_listed_and_shown() {
    let env = Env::new();
    let dir = env.path("old");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    common::touch_ns(&dir.join("f"), -315_619_200, 0);
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "old"]);
    let long = env.ok(&["ls", "-l", "old"]);
    assert!(long.contains("1960-01-01T00:00:00.000000000Z f"), "{long}");
    let shown = env.ok(&["show", "old", "f"]);
    assert!(shown.contains("1960-01-01"), "{shown}");
}

#[test]
fn a_damaged_root_record_is_reported_and_the_others_listed() {
    let env = Env::new();
    let dir = env.path("src");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "good"]);
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "bad"]);
    let record = env.store.join("refs/roots/bad");
    let text = fs::read_to_string(&record).unwrap();
    let start = text.find("\"root\": \"").unwrap() + 9;
    let end = start + text[start..].find('"').unwrap();
    let damaged = format!("{}abc{}", &text[..start], &text[end..]);
    fs::write(&record, damaged).unwrap();
    let out = env.run(&["roots"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("good"), "{stdout}");
    assert!(stderr.contains("damaged root record"), "{stderr}");
    // Garbage, and a fifo (which must not hang a listing), are reported the same way.
    fs::write(env.store.join("refs/roots/garbage"), b"{garbage").unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(env.store.join("refs/roots/fifo"))
        .status()
        .unwrap()
        .success());
    let out = env.run(&["roots"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("good"));
    env.ok(&["status"]);
    // fsck names each, and gives no gc advice while a root is unknown; gc refuses.
    let fsck = env.run(&["fsck"]);
    let text =
        String::from_utf8_lossy(&fsck.stdout).into_owned() + &String::from_utf8_lossy(&fsck.stderr);
    assert!(!fsck.status.success());
    assert!(
        text.contains("bad-root") && !text.contains("gc --run removes"),
        "{text}"
    );
    env.fails(&["gc", "--run"]);
    // forget removes a damaged record by its file name.
    for file in ["bad", "garbage", "fifo"] {
        env.ok(&["forget", file]);
    }
    env.fsck_ok();
    assert_eq!(env.ok(&["cat", "good", "f"]), "x");
}

/// A name holding a newline (or another control character) cannot forge a line of text
/// output: `ls` and `diff` escape it; `--json` keeps the exact bytes.
#[test]
fn names_with_newlines_are_escaped_in_text_output() {
    let env = Env::new();
    let dir = env.path("src");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("evil\nD fake"), b"x").unwrap();
    fs::write(dir.join("tab\there"), b"x").unwrap();
    {
        use std::os::unix::ffi::OsStrExt;
        for raw in [&b"\xffx"[..], &b"\xfex"[..]] {
            fs::write(dir.join(std::ffi::OsStr::from_bytes(raw)), b"x").unwrap();
        }
    }
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "a"]);
    let listing = env.ok(&["ls", "a"]);
    assert_eq!(listing.lines().count(), 4, "{listing}");
    // Two names that differ only in bytes that are not UTF-8 stay distinct.
    assert!(
        listing.contains("\\xffx") && listing.contains("\\xfex"),
        "{listing}"
    );
    assert!(listing.contains("evil\\nD fake"), "{listing}");
    assert!(listing.contains("tab\\there"), "{listing}");
    let empty = env.path("empty");
    fs::create_dir(&empty).unwrap();
    env.ok(&["ingest", empty.to_str().unwrap(), "--name", "b"]);
    let diff = env.ok(&["diff", "b", "a"]);
    assert_eq!(diff.lines().count(), 4, "{diff}");
    assert!(!diff.lines().any(|l| l == "D fake"), "{diff}");
    let json = env.json(&["ls", "a"]);
    assert!(json.to_string().contains("evil\\nD fake"), "{json}");
}

/// A time a tree cannot hold in nanoseconds (after 2262) is stored as the nearest one it
/// can, and ingest says so.
#[test]
fn an_mtime_past_2262_is_clamped_with_a_warning() {
    let env = Env::new();
    let dir = env.path("far");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    common::touch_ns(&dir.join("f"), 10_413_792_000, 0); // 2300-01-01
    let out = env.run(&["ingest", dir.to_str().unwrap(), "--name", "far"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mtime outside 1677..2262"), "{err}");
    let shown = env.json(&["show", "far", "f"]);
    assert_eq!(shown["mtime_ns"].as_i64(), Some(i64::MAX), "{shown}");
}

/// Small ones of issue 8: `cat t f/` on a file fails as cat(1) does; ingest of a dangling
/// or self-referring symlink says so; a deleted cache/ directory is made again.
#[test]
fn trailing_slashes_dangling_links_and_a_deleted_cache() {
    let env = Env::new();
    let dir = env.path("src");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/f"), b"x").unwrap();
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "t"]);
    let err = env.fails(&["cat", "t", "sub/f/"]);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(env.ok(&["cat", "t", "sub/f"]), "x");
    let link = env.path("self");
    std::os::unix::fs::symlink(&link, &link).unwrap();
    let err = env.fails(&["ingest", link.to_str().unwrap()]);
    assert!(err.contains("is a symlink"), "{err}");
    fs::remove_dir_all(env.store.join("cache")).unwrap();
    env.ok(&["ingest", dir.to_str().unwrap()]);
    assert!(env.store.join("cache").is_dir());
}

/// Another user who may read a store (not write it) can fsck and read it: the store lock
/// is taken through a read-only descriptor then (issue 8 item 16).
#[test]
fn a_reader_without_write_access_can_fsck_and_cat() {
    if !common::require(common::is_root(), "root (to run velo as another user)") {
        return;
    }
    let env = Env::new();
    let dir = env.path("src");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"shared").unwrap();
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "r"]);
    let status = std::process::Command::new("chmod")
        .args(["-R", "go+rX"])
        .arg(env.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    for args in [vec!["cat", "r", "f"], vec!["fsck", "--quick"]] {
        let out = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(common::velo_bin())
            .arg("--store")
            .arg(&env.store)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("opening lock file"), "{args:?}: {err}");
        if args[0] == "cat" {
            assert_eq!(out.stdout, b"shared", "{err}");
        }
    }
}

/// An unreadable file or directory fails an ingest, naming it; `--skip-unreadable` leaves
/// it out and lists it (issue 8 item 7). Root reads everything, so as root the ingest runs
/// as another user.
#[test]
fn unreadable_entries_fail_the_ingest_unless_skipped() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("locked")).unwrap();
    fs::write(src.join("ok"), b"a").unwrap();
    fs::write(src.join("secret"), b"s").unwrap();
    fs::write(src.join("locked/x"), b"l").unwrap();
    let store = env.path("other-store");
    let as_reader = |args: &[&str]| {
        let mut cmd = if common::is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(common::velo_bin());
            c
        } else {
            std::process::Command::new(common::velo_bin())
        };
        cmd.arg("--store").arg(&store).args(args).output().unwrap()
    };
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("ok"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    let out = as_reader(&["ingest", src.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Permission denied") && (err.contains("secret") || err.contains("locked")),
        "{err}"
    );
    let out = as_reader(&[
        "--json",
        "ingest",
        src.to_str().unwrap(),
        "--skip-unreadable",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = report["skipped"].to_string();
    assert!(
        skipped.contains("secret") && skipped.contains("locked"),
        "{report}"
    );
    assert_eq!(report["files"], 1, "{report}");
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
}
