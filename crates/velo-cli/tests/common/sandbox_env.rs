//! The sandbox tests' shared set-up: a check that the machine can run them, the busybox
//! base made by the project's own script, a tiny app layer, and a way to run a script.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, Env};

pub fn sandbox_supported() -> bool {
    let probe = Command::new(common::velo_bin())
        .arg("__probe-userns")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    common::require(probe, "unprivileged user namespaces (velo doctor explains)")
        && common::require(
            Path::new("/bin/busybox").exists(),
            "Debian's busybox-static (/bin/busybox)",
        )
}

/// busybox.velo made by the project's own script, and a tiny app layer.
pub fn layers(env: &Env) -> (PathBuf, PathBuf) {
    let busybox = env.path("busybox.velo");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup_busybox.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&busybox)
        .env("VELO", common::velo_bin())
        .env("VR_THE_SOURCE", &env.store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup_busybox.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = env.path("app");
    fs::create_dir_all(app.join("app/dir")).unwrap();
    fs::write(app.join("app/hello.sh"), b"echo hello from app\n").unwrap();
    fs::write(app.join("app/gone"), b"to be deleted").unwrap();
    fs::write(app.join("app/mode"), b"mode changes").unwrap();
    fs::write(app.join("app/dir/old"), b"hidden by an opaque dir").unwrap();
    let manifest = env.path("app.velo");
    env.ok(&[
        "ingest",
        app.to_str().unwrap(),
        "-o",
        manifest.to_str().unwrap(),
    ]);
    (busybox, manifest)
}

pub fn run(
    env: &Env,
    busybox: &Path,
    app: &Path,
    extra: &[&str],
    script: &str,
) -> std::process::Output {
    let mut cmd = env.cmd();
    cmd.args(["run", "--isolate", "--base"])
        .arg(busybox)
        .arg("--manifest")
        .arg(app)
        .args(extra)
        .args(["--", "/bin/sh", "-c", script]);
    cmd.output().unwrap()
}

/// `velo run --isolate --base BUSYBOX --manifest APP`, to be completed with options and
/// `-- COMMAND`.
pub fn velo_run(env: &Env, busybox: &Path, app: &Path) -> Command {
    let mut cmd = env.cmd();
    cmd.args(["run", "--isolate", "--base"])
        .arg(busybox)
        .arg("--manifest")
        .arg(app);
    cmd
}
