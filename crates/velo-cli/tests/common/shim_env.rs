//! The shim tests' shared set-up: the library built once, a run through it, a program
//! compiled with the host's gcc.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use crate::common::{self, Env};

/// The shim library is a cdylib, which `cargo test` does not rebuild for the velo binary:
/// built here once, into the target directory velo looks in.
pub fn shim_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "velo-shim"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p velo-shim");
        assert!(status.success(), "cargo build -p velo-shim failed");
        let lib = common::velo_bin().with_file_name("libvelo_shim.so");
        assert!(lib.is_file(), "no shim library at {}", lib.display());
    });
}

/// `velo run --manifest <manifest> <extra> -- <command>` with the shim.
pub fn run_shimmed(env: &Env, manifest: &str, extra: &[&str], command: &[&str]) -> Output {
    shim_built();
    let mut cmd = env.cmd();
    cmd.args(["run", "--manifest", manifest])
        .args(extra)
        .arg("--")
        .args(command);
    cmd.output().unwrap()
}

pub fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Compiles `source` with the host's gcc into `env`; `None` (a visible skip) without gcc.
pub fn compiled(env: &Env, name: &str, source: &[u8]) -> Option<PathBuf> {
    let Some(gcc) = ["/usr/bin/gcc", "/usr/bin/cc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        common::require(false, "gcc (scripts/test.sh installs it)");
        return None;
    };
    let c = env.path(&format!("{name}.c"));
    fs::write(&c, source).unwrap();
    let exe = env.path(name);
    let out = std::process::Command::new(gcc)
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}
