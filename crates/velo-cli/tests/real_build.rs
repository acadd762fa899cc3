//! A real build in the sandbox: a debootstrapped Debian (gcc, libc6-dev, make) as the base,
//! the BLAKE3 reference C implementation as the app layer, compiled with gcc inside,
//! committed, and the built program run from the committed tree.
//! scripts/setup_debian_base.sh (run by scripts/test.sh) prepares the Debian root.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::Env;

fn debian_root() -> PathBuf {
    std::env::var_os("VELO_DEBIAN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/velo-tests/bookworm-gcc"))
}

#[test]
fn gcc_builds_a_real_c_project_in_the_sandbox_and_the_committed_program_runs() {
    let probe = Command::new(common::velo_bin())
        .arg("__probe-userns")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let root = debian_root();
    if !common::require(probe, "unprivileged user namespaces")
        || !common::require(
            root.join("usr/bin/gcc").exists(),
            "a Debian root with gcc (run scripts/setup_debian_base.sh as root)",
        )
    {
        return;
    }
    let Some(c_sources) = common::blake3_c_sources() else {
        panic!("the blake3 crate's C sources are not in the cargo registry");
    };
    let env = Env::new();
    env.ingest(&root, &["--name", "debian"]);
    let app = env.path("app");
    fs::create_dir_all(app.join("src")).unwrap();
    for entry in fs::read_dir(&c_sources).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".c") || name.ends_with(".h") || name.ends_with("_unix.S") {
            fs::copy(entry.path(), app.join("src").join(&name)).unwrap();
        }
    }
    fs::write(
        app.join("src/Makefile"),
        "SRCS = example.c blake3.c blake3_dispatch.c blake3_portable.c \\\n\tblake3_sse2_x86-64_unix.S blake3_sse41_x86-64_unix.S \\\n\tblake3_avx2_x86-64_unix.S blake3_avx512_x86-64_unix.S\n\
         b3example: $(SRCS)\n\tgcc -O2 -o $@ $(SRCS)\n\ninstall: b3example\n\tmkdir -p /usr/local/bin && cp b3example /usr/local/bin/\n",
    )
    .unwrap();
    env.ingest(&app, &["--name", "blake3-src"]);
    let out = env
        .cmd()
        .args([
            "run",
            "--isolate",
            "--base",
            "debian",
            "--manifest",
            "blake3-src",
            "--name",
            "built",
            "--workdir",
            "/src",
        ])
        .args(["--", "make", "install"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make in the sandbox failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let built = env.json(&["show", "built", "usr/local/bin/b3example"]);
    assert_eq!(built["kind"], "file");
    assert!(
        built["mode"].as_u64().unwrap() & 0o111 != 0,
        "the built program is executable"
    );
    // The program runs from the committed tree alone, and agrees with our BLAKE3.
    let input = b"velo rift builds real software";
    let input_file = env.path("input");
    fs::write(&input_file, input).unwrap();
    let bind = format!("{}:/input:ro", input_file.display());
    let out = env
        .cmd()
        .args([
            "run",
            "--isolate",
            "--manifest",
            "built",
            "--bind",
            &bind,
            "--",
            "/bin/sh",
            "-c",
            "/usr/local/bin/b3example < /input",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        velo_core::Hash::of_blob(input).to_hex()
    );
    // The source layer is untouched: the build's outputs live only in the commit.
    assert!(env
        .fails(&["show", "blake3-src", "src/b3example"])
        .contains("does not exist"));
    env.fsck_ok();
}
