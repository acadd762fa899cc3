//! What velo writes on stdout when stdout fails (issue 8, items 9 and 10): a reader that
//! went away ends a command quietly, a full or broken stdout is an error with its cause,
//! never a panic; under `--json` an error is a JSON document too.

mod common;

use std::fs;
use std::io::Read;
use std::process::Stdio;

use common::Env;

fn sample(env: &Env) -> String {
    let dir = env.path("src");
    fs::create_dir_all(dir.join("a/b")).unwrap();
    for i in 0..300 {
        fs::write(dir.join(format!("a/b/file-{i}")), format!("{i}")).unwrap();
    }
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "s"]);
    "s".to_string()
}

/// Every command that prints, with its output read only in part: it ends with status 0
/// (as `ls | head` does), without a panic.
#[test]
fn a_reader_that_goes_away_ends_commands_quietly() {
    let env = Env::new();
    let tree = sample(&env);
    for args in [
        vec!["--json", "ls", "-R", &tree],
        vec!["ls", "-lR", &tree],
        vec!["--json", "roots"],
        vec!["--json", "status"],
        vec!["--json", "show", &tree, "a"],
        vec!["diff", &tree, &tree],
    ] {
        let mut child = env
            .cmd()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        let _ = child.stdout.as_mut().unwrap().read(&mut first);
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// A full stdout is an error with its cause and status 1.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let env = Env::new();
    let tree = sample(&env);
    let src = env.path("src");
    for args in [
        vec!["--json", "ls", "-R", tree.as_str()],
        vec!["ls", "-R", tree.as_str()],
        vec!["roots"],
        vec!["status"],
        vec!["--json", "status"],
        vec!["show", tree.as_str(), "a"],
        vec!["--json", "doctor"],
        vec!["ingest", src.to_str().unwrap()],
        vec!["diff", tree.as_str(), "s"],
    ] {
        let out = env
            .cmd()
            .args(&args)
            .stdout(fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // `diff` of a tree with itself prints nothing, so nothing fails.
        if args[0] != "diff" {
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(stderr.contains("writing the output"), "{args:?}: {stderr}");
        }
    }
}

/// `--json` promises one JSON document on stdout: an error is one too, with the exit code.
#[test]
fn json_errors_are_json_documents() {
    let env = Env::new();
    sample(&env);
    let out = env.run(&["--json", "cat", "no-such-tree", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON document");
    assert_eq!(doc["error"]["exit_code"], 1);
    assert!(doc["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no-such-tree"));
}

/// `-o PATH` writes to what PATH names (issue 8, item 8): `-` is stdout, a symlink's
/// target is written and the link stays, a fifo or a device is written through (never
/// replaced by a file), a directory is refused; a regular file is replaced atomically.
#[test]
fn export_writes_through_to_what_the_output_path_names() {
    let env = Env::new();
    let tree = sample(&env);
    let out = env.run(&["export", &tree, "-o", "-"]);
    assert!(out.status.success());
    assert_eq!(&out.stdout[..4], b"VELO");
    // A symlink: its target gets the manifest, the link stays a link.
    let target = env.path("target.velo");
    fs::write(&target, b"old").unwrap();
    let link = env.path("link.velo");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    env.ok(&["export", &tree, "-o", link.to_str().unwrap()]);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(&fs::read(&target).unwrap()[..4], b"VELO");
    // A fifo: streamed to its reader, still a fifo afterwards.
    let fifo = env.path("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    env.ok(&["export", &tree, "-o", fifo.to_str().unwrap()]);
    assert_eq!(&reader.join().unwrap()[..4], b"VELO");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(&fifo).unwrap().file_type()
    ));
    // /dev/null stays a device (as root, replacing it used to break the machine).
    env.ok(&["export", &tree, "-o", "/dev/null"]);
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &fs::symlink_metadata("/dev/null").unwrap().file_type()
    ));
    let err = env.fails(&["export", &tree, "-o", env.dir.path().to_str().unwrap()]);
    assert!(err.contains("is a directory"), "{err}");
}

/// `velo completions SHELL` and `velo man` print what a shell and man(1) read.
#[test]
fn completions_and_the_manual_page_print() {
    let env = Env::new();
    let bash = env.ok(&["completions", "bash"]);
    assert!(
        bash.contains("_velo()") && bash.contains("checkout"),
        "{bash}"
    );
    let zsh = env.ok(&["completions", "zsh"]);
    assert!(zsh.contains("#compdef velo"), "{zsh}");
    let man = env.ok(&["man"]);
    assert!(man.contains(".TH velo 1"), "{man}");
    let run = env.ok(&["man", "run"]);
    assert!(
        run.contains(".TH velo-run 1") && run.contains("commit\\-always"),
        "{run}"
    );
    env.fails(&["man", "no-such-command"]);
}

/// `ingest -o` checks its output before ingesting: a bad path registers nothing (it used
/// to register the root, even move a name, and then fail); a checkout into the store is
/// refused.
#[test]
fn a_bad_output_path_is_refused_before_anything_is_registered() {
    let env = Env::new();
    let dir = env.path("src");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    for out in [
        env.store.join("x.velo"),
        env.path("no-such-dir/x.velo"),
        env.dir.path().to_path_buf(),
    ] {
        let out = out.to_str().unwrap().to_string();
        env.fails(&[
            "ingest",
            dir.to_str().unwrap(),
            "--name",
            "should-not",
            "-o",
            &out,
        ]);
    }
    let roots = env.run(&["roots"]);
    assert!(!String::from_utf8_lossy(&roots.stdout).contains("should-not"));
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "t"]);
    let err = env.fails(&[
        "checkout",
        "t",
        env.store.join("blobs/qq").to_str().unwrap(),
    ]);
    assert!(err.contains("inside the store"), "{err}");
    env.fsck_ok();
}
