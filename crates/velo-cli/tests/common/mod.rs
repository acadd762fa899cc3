//! Helpers shared by the CLI integration tests: a private store per test and a way to
//! run the real `velo` binary against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn velo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_velo"))
}

/// A temporary directory holding a store (`store/`) and whatever the test puts beside it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        Env { dir, store }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A `velo` command with `--store` set and a clean environment for the store.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(velo_bin());
        cmd.arg("--store").arg(&self.store);
        cmd.env_remove("VR_THE_SOURCE");
        cmd.env_remove("VRIFT_DEBUG");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("velo runs")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "velo {args:?} failed with {}:\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "velo {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).expect("valid JSON on stdout")
    }

    /// Ingests `dir` and returns the root hash.
    pub fn ingest(&self, dir: &Path, extra: &[&str]) -> String {
        let mut args = vec!["ingest", dir.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.ok(&args).trim().to_string()
    }

    pub fn fsck_ok(&self) {
        let out = self.run(&["fsck"]);
        assert!(
            out.status.success(),
            "fsck failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Whether the tests run as root (loop devices and mounts need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Under CI a missing capability is a failure, elsewhere a skip with a message.
pub fn require(capability: bool, what: &str) -> bool {
    if capability {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {what}, which this CI machine lacks: install it or run as root");
    }
    eprintln!("skipping: this test needs {what}");
    false
}
