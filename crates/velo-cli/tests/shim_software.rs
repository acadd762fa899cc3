//! Real software through the shim (`velo run --manifest M -- CMD` without `--isolate`) on
//! trees that exist only in the store: each test ingests a directory and deletes it before
//! the first run, so every byte the programs see comes through the shim.
//!
//! coreutils, findutils and tar over a real source tree; git on a repository; node's
//! module resolution and fs; the `fsx` file-system exerciser on a tree file; python
//! writing, importing (with `__pycache__`) and removing a tree directory.

mod common;
#[path = "common/shim_env.rs"]
mod shim_env;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Env;
use shim_env::{run_shimmed, stdout_of};

/// `velo run --manifest M EXTRA -- COMMAND` as a `Command`, for callers that set the
/// command's environment.
fn shim_cmd(env: &Env, manifest: &str, extra: &[&str], command: &[&str]) -> Command {
    shim_env::shim_built();
    let mut cmd = env.cmd();
    cmd.args(["run", "--manifest", manifest])
        .args(extra)
        .arg("--")
        .args(command);
    cmd
}

/// Runs `program args` natively in `dir`, asserting success; returns stdout.
fn native(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.sort();
    lines
}

fn first_existing(candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|p| Path::new(p).is_file())
        .map(|p| p.to_string())
}

/// Bytes of `path` in `tree` (`velo cat`, which need not be UTF-8).
fn cat_bytes(env: &Env, tree: &str, path: &str) -> Vec<u8> {
    let out = env.run(&["cat", tree, path]);
    assert!(
        out.status.success(),
        "velo cat {tree} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Two scans (or listings) hold the same paths with the same metadata; names the first
/// few differences instead of printing both.
fn assert_same_entries(
    got: &BTreeMap<Vec<u8>, common::Meta>,
    want: &BTreeMap<Vec<u8>, common::Meta>,
    what: &str,
) {
    let mut differences = Vec::new();
    for (path, m) in want {
        match got.get(path) {
            None => differences.push(format!("missing {}", String::from_utf8_lossy(path))),
            Some(g) if g != m => differences.push(format!(
                "{}: {g:?}, want {m:?}",
                String::from_utf8_lossy(path)
            )),
            Some(_) => {}
        }
    }
    for path in got.keys().filter(|p| !want.contains_key(*p)) {
        differences.push(format!("extra {}", String::from_utf8_lossy(path)));
    }
    let n = differences.len();
    differences.truncate(10);
    assert!(
        n == 0,
        "{what}: {n} differences:\n{}",
        differences.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// 1. coreutils, findutils and tar over a real source tree.

/// A real source tree: `perl5/` (a copy of /usr/share/perl5, a few hundred Perl files in
/// nested directories), an empty directory, a relative symlink and an executable script.
/// Returns the native copy kept for comparison (same contents and mtimes as what was
/// ingested); the ingested directory itself is deleted.
fn perl_tree(env: &Env) -> Option<PathBuf> {
    let perl5 = Path::new("/usr/share/perl5");
    if !common::require(
        ["Dpkg", "Dpkg.pm", "Debian"]
            .iter()
            .all(|name| perl5.join(name).exists()),
        "/usr/share/perl5 with Dpkg and Debian (Debian's libdpkg-perl and debconf)",
    ) {
        return None;
    }
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    common::cp("-r", perl5, &src.join("perl5"));
    fs::create_dir_all(src.join("empty/dir")).unwrap();
    std::os::unix::fs::symlink("perl5/Dpkg.pm", src.join("dpkg-link")).unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let kept = env.path("native");
    common::cp("-a", &src, &kept);
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();
    Some(kept)
}

/// `ls -lRn` without what a tree legitimately reports differently from ext4: the
/// `total` (block) lines, link counts, and the size of directories.
fn ls_normalized(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with("total "))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            if fields.len() < 7 || !fields[0].starts_with(['-', 'd', 'l']) {
                return l.to_string();
            }
            let size = if fields[0].starts_with('d') {
                "-"
            } else {
                fields[4]
            };
            // perms uid gid size mtime name...
            format!(
                "{} {} {} {} {} {}",
                fields[0],
                fields[2],
                fields[3],
                size,
                fields[5],
                fields[6..].join(" ")
            )
        })
        .collect()
}

#[test]
fn coreutils_findutils_and_tar_walk_a_real_source_tree() {
    let env = Env::new();
    let Some(kept) = perl_tree(&env) else {
        return;
    };
    let files: usize = native(&kept, "find", &[".", "-type", "f"]).lines().count();
    assert!(files > 150, "a few hundred files: {files}");

    // ls -lR: the same names, modes, owners, sizes and mtimes as the native copy.
    let ls_args = ["-lRn", "--time-style=+%s"];
    let want = ls_normalized(&native(&kept, "ls", &ls_args));
    let mut cmd = vec!["ls"];
    cmd.extend_from_slice(&ls_args);
    let got = ls_normalized(&stdout_of(&run_shimmed(&env, "t", &[], &cmd)));
    assert_eq!(got.len(), want.len(), "ls -lR line counts");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "ls -lR differs");
    }

    // find | xargs stat: every file, with its size; and its contents, read through the
    // shim.
    for script in [
        "find . -type f -print0 | xargs -0 stat --format='%n %s'",
        "find . -type f -print0 | xargs -0 sha256sum",
    ] {
        let want = sorted_lines(&native(&kept, "sh", &["-c", script]));
        let got = sorted_lines(&stdout_of(&run_shimmed(
            &env,
            "t",
            &[],
            &["sh", "-c", script],
        )));
        assert_eq!(got, want, "{script}");
    }

    // du -sb (fts) adds up what find (stat of every entry) reports.
    let out = run_shimmed(
        &env,
        "t",
        &[],
        &[
            "sh",
            "-c",
            "du -sb . | cut -f1; find . -printf '%s\\n' | awk '{s += $1} END {print s}'",
        ],
    );
    let text = stdout_of(&out);
    let sums: Vec<&str> = text.lines().collect();
    assert_eq!(sums.len(), 2, "{text}");
    assert_eq!(sums[0], sums[1], "du -sb against the sum of find's sizes");
    let file_bytes: u64 = common::scan(&kept)
        .values()
        .filter(|m| m.kind != "dir")
        .map(|m| m.size)
        .sum();
    assert!(
        sums[0].parse::<u64>().unwrap() >= file_bytes,
        "du {} < the files' {file_bytes} bytes",
        sums[0]
    );

    // tar c . | tar t: the same member list; and the archive, unpacked on the host, is the
    // native tree.
    let want = sorted_lines(&native(&kept, "sh", &["-c", "tar cf - . | tar tf -"]));
    let got = sorted_lines(&stdout_of(&run_shimmed(
        &env,
        "t",
        &[],
        &["sh", "-c", "tar cf - . | tar tf -"],
    )));
    assert_eq!(got, want, "tar t of tar c");
    let archive = env.path("tree.tar");
    // The pax format keeps mtimes to the nanosecond.
    let out = run_shimmed(
        &env,
        "t",
        &[],
        &[
            "tar",
            "--format=posix",
            "-cf",
            archive.to_str().unwrap(),
            ".",
        ],
    );
    stdout_of(&out);
    let unpacked = env.path("unpacked");
    fs::create_dir_all(&unpacked).unwrap();
    native(&unpacked, "tar", &["xf", archive.to_str().unwrap()]);
    native(
        &env.path(""),
        "diff",
        &["-r", "--no-dereference", "native", "unpacked"],
    );
    assert_same_entries(
        &common::scan(&unpacked),
        &common::scan(&kept),
        "tar x of tar c",
    );

    // cp -r out of the tree to the host, then diff -r on the host and through the shim.
    let out_dir = env.path("copied");
    let out = run_shimmed(
        &env,
        "t",
        &[],
        &["cp", "-r", "/vrift/perl5", out_dir.to_str().unwrap()],
    );
    stdout_of(&out);
    native(&env.path(""), "diff", &["-r", "native/perl5", "copied"]);
    let out = run_shimmed(
        &env,
        "t",
        &[],
        &[
            "diff",
            "-r",
            "--no-dereference",
            "/vrift",
            kept.to_str().unwrap(),
        ],
    );
    stdout_of(&out);
    assert!(!Path::new("/vrift").exists());
}

#[test]
fn mv_and_rm_r_in_a_real_source_tree_are_committed() {
    let env = Env::new();
    let Some(_kept) = perl_tree(&env) else {
        return;
    };
    let before = common::listed(&env, "t");
    let out = run_shimmed(
        &env,
        "t",
        &["--name", "moved"],
        &[
            "sh",
            "-c",
            "set -e; mv perl5/Dpkg perl5/Dpkg-moved; mv perl5/Dpkg.pm perl5/Dpkg-moved.pm; \
             rm -r perl5/Debian; mv run.sh empty/dir/; ls perl5 | grep -c Dpkg",
        ],
    );
    assert_eq!(stdout_of(&out), "2\n");
    let after = common::listed(&env, "moved");
    let top = env.ok(&["ls", "moved", "perl5"]);
    for gone in ["Dpkg\n", "Dpkg.pm\n", "Debian\n"] {
        assert!(!top.contains(&format!("\n{gone}")), "{gone:?} left:\n{top}");
    }
    assert!(
        top.contains("\nDpkg-moved\n") && top.contains("\nDpkg-moved.pm\n"),
        "{top}"
    );
    assert_eq!(env.ok(&["ls", "moved", "empty/dir"]), "run.sh\n");

    // Every entry is where the commands put it, with the same kind, mode, size, mtime
    // and contents (mv of a tree directory copies it, keeping modes and times).
    let rename = |path: &[u8]| -> Option<Vec<u8>> {
        let p = String::from_utf8(path.to_vec()).unwrap();
        if p.starts_with("perl5/Debian") {
            return None;
        }
        let moved = if let Some(rest) = p.strip_prefix("perl5/Dpkg/") {
            format!("perl5/Dpkg-moved/{rest}")
        } else if p == "perl5/Dpkg" {
            "perl5/Dpkg-moved".into()
        } else if p == "perl5/Dpkg.pm" {
            "perl5/Dpkg-moved.pm".into()
        } else if p == "run.sh" {
            "empty/dir/run.sh".into()
        } else {
            p
        };
        Some(moved.into_bytes())
    };
    let expected: BTreeMap<Vec<u8>, common::Meta> = before
        .iter()
        .filter_map(|(p, m)| rename(p).map(|q| (q, m.clone())))
        .collect();
    // Directories whose entries changed get new mtimes.
    let changed_dirs: [&[u8]; 3] = [b"perl5", b"empty/dir", b"empty"];
    let strip = |map: &BTreeMap<Vec<u8>, common::Meta>| -> BTreeMap<Vec<u8>, common::Meta> {
        map.iter()
            .filter(|(p, _)| !changed_dirs.contains(&p.as_slice()))
            .map(|(p, m)| (p.clone(), m.clone()))
            .collect()
    };
    assert_same_entries(&strip(&after), &strip(&expected), "the committed tree");
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// 2. git on a repository that exists only in the tree.

fn git_bin() -> Option<String> {
    let found = first_existing(&["/usr/local/bin/git", "/usr/bin/git"]);
    if !common::require(found.is_some(), "git") {
        return None;
    }
    found
}

/// git with no system or user configuration and a fixed identity.
fn git_native(git: &str, home: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(git)
        .args(["-c", "user.name=Tester", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `sh -c SCRIPT` through the shim with `$GIT` set, no git configuration from the host.
fn git_shimmed(env: &Env, git: &str, manifest: &str, extra: &[&str], script: &str) -> Output {
    shim_cmd(env, manifest, extra, &["sh", "-c", script])
        .env(
            "GIT",
            format!("{git} -c user.name=Tester -c user.email=t@example.com"),
        )
        .env("HOME", env.path("home"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap()
}

#[test]
fn git_status_log_and_commit_in_a_repository_that_exists_only_in_the_tree() {
    let env = Env::new();
    let Some(git) = git_bin() else {
        return;
    };
    let home = env.path("home");
    fs::create_dir_all(&home).unwrap();
    let repo = env.path("repo");
    fs::create_dir_all(repo.join("src/deep")).unwrap();
    let g = |args: &[&str]| git_native(&git, &home, &repo, args);
    g(&["init", "-q", "-b", "main"]);
    fs::write(repo.join("README"), "a repository\n").unwrap();
    fs::write(repo.join("src/a.c"), "int a(void) { return 1; }\n").unwrap();
    fs::write(repo.join("src/deep/b.c"), "int b(void) { return 2; }\n").unwrap();
    fs::write(repo.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(repo.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/a.c", repo.join("a-link")).unwrap();
    g(&["add", "-A"]);
    g(&["commit", "-qm", "one"]);
    fs::write(repo.join("src/a.c"), "int a(void) { return 10; }\n").unwrap();
    fs::write(repo.join("src/c.c"), "int c(void) { return 3; }\n").unwrap();
    g(&["add", "-A"]);
    g(&["commit", "-qm", "two"]);
    // Packed objects (git mmaps the pack) and loose ones after them.
    g(&["gc", "-q"]);
    fs::write(repo.join("src/deep/b.c"), "int b(void) { return 20; }\n").unwrap();
    g(&["commit", "-qam", "three"]);
    assert_eq!(g(&["status", "--porcelain"]), "");
    let head = g(&["rev-parse", "HEAD"]);
    env.ingest(&repo, &["--name", "repo"]);
    fs::remove_dir_all(&repo).unwrap();

    let run = |manifest: &str, extra: &[&str], script: &str| {
        stdout_of(&git_shimmed(&env, &git, manifest, extra, script))
    };
    assert_eq!(run("repo", &[], "$GIT status --porcelain"), "");
    assert_eq!(
        run(
            "repo",
            &[],
            "$GIT log --oneline | wc -l; $GIT rev-parse HEAD"
        ),
        format!("3\n{head}")
    );
    assert_eq!(
        run(
            "repo",
            &[],
            "$GIT show HEAD~2:src/a.c; $GIT diff HEAD~1 --stat | tail -1"
        ),
        "int a(void) { return 1; }\n 1 file changed, 1 insertion(+), 1 deletion(-)\n"
    );
    assert_eq!(
        run(
            "repo",
            &[],
            "echo more >> README && rm src/c.c && echo new > new.txt && $GIT status --porcelain"
        ),
        " M README\n D src/c.c\n?? new.txt\n"
    );
    // Nothing was committed by those runs.
    assert_eq!(run("repo", &[], "$GIT status --porcelain"), "");

    // A commit made through the shim (loose objects, the index, refs, logs: all new or
    // copied up), kept with --name.
    let out = git_shimmed(
        &env,
        &git,
        "repo",
        &["--name", "committed"],
        "set -e; echo more >> README; $GIT rm -q src/c.c; $GIT commit -qam four; \
         $GIT status --porcelain; $GIT log --format=%s | head -1",
    );
    assert_eq!(stdout_of(&out), "four\n");
    assert_eq!(
        run(
            "committed",
            &[],
            "$GIT status --porcelain; $GIT log --oneline | wc -l; $GIT rev-parse HEAD~1; \
             $GIT show HEAD:README; $GIT fsck --full --no-progress --no-dangling 2>&1"
        ),
        format!("4\n{head}a repository\nmore\n")
    );
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "committed", "README")).unwrap(),
        "a repository\nmore\n"
    );
    assert!(!env.ok(&["ls", "committed", "src"]).contains("c.c"));
    env.fsck_ok();
}

// ---------------------------------------------------------------------------------------
// 3. node: module resolution from node_modules, fs writes.

fn node_bin() -> Option<String> {
    let found = first_existing(&["/usr/bin/node", "/usr/bin/nodejs"]);
    if !common::require(found.is_some(), "Debian's nodejs (/usr/bin/node)") {
        return None;
    }
    found
}

fn node_tree(env: &Env) {
    let src = env.path("src");
    let pkg = src.join("node_modules/mypkg");
    fs::create_dir_all(pkg.join("lib")).unwrap();
    fs::create_dir_all(src.join("app/old/deeper")).unwrap();
    fs::write(
        pkg.join("package.json"),
        r#"{ "name": "mypkg", "version": "1.0.0", "main": "lib/main.js" }"#,
    )
    .unwrap();
    fs::write(
        pkg.join("lib/main.js"),
        "const helper = require('./helper');\n\
         const data = require('../data.json');\n\
         module.exports = { value: helper.twice(data.n), dir: __dirname };\n",
    )
    .unwrap();
    fs::write(pkg.join("lib/helper.js"), "exports.twice = (n) => n * 2;\n").unwrap();
    fs::write(pkg.join("data.json"), r#"{ "n": 21 }"#).unwrap();
    fs::write(
        src.join("app/main.js"),
        "const m = require('mypkg');\nconsole.log('app', m.value, require.resolve('mypkg'));\n",
    )
    .unwrap();
    fs::write(
        src.join("app/esm.mjs"),
        "import m from 'mypkg';\nimport { readFile } from 'node:fs/promises';\n\
         console.log('esm', m.value, (await readFile(new URL('../node_modules/mypkg/data.json', import.meta.url), 'utf8')).trim());\n",
    )
    .unwrap();
    fs::write(src.join("app/existing.txt"), "old\n").unwrap();
    fs::write(src.join("app/old/a"), "a\n").unwrap();
    fs::write(src.join("app/old/deeper/b"), "b\n").unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();
}

#[test]
fn node_resolves_and_loads_a_package_from_the_tree_s_node_modules() {
    let env = Env::new();
    let Some(node) = node_bin() else {
        return;
    };
    node_tree(&env);
    let out = run_shimmed(
        &env,
        "t",
        &[],
        &[
            &node,
            "-e",
            "const m = require('mypkg'); console.log(m.value, m.dir, process.cwd())",
        ],
    );
    assert_eq!(stdout_of(&out), "42 /vrift/node_modules/mypkg/lib /vrift\n");
    // A script in a subdirectory finds the package in its parent's node_modules, and an
    // ES module imports it (the ESM resolver and fs/promises on libuv's thread pool).
    let out = run_shimmed(&env, "t", &[], &[&node, "app/main.js"]);
    assert_eq!(
        stdout_of(&out),
        "app 42 /vrift/node_modules/mypkg/lib/main.js\n"
    );
    let out = run_shimmed(&env, "t", &[], &[&node, "/vrift/app/esm.mjs"]);
    assert_eq!(stdout_of(&out), "esm 42 { \"n\": 21 }\n");
}

#[test]
fn node_writes_reads_back_and_removes_in_the_tree_and_the_changes_are_committed() {
    let env = Env::new();
    let Some(node) = node_bin() else {
        return;
    };
    node_tree(&env);
    let script = r#"
const fs = require('fs');
fs.mkdirSync('out/deep', { recursive: true });
fs.writeFileSync('out/deep/x.txt', 'written by node\n');
fs.appendFileSync('app/existing.txt', 'appended\n');
fs.renameSync('app/main.js', 'app/renamed.js');
fs.rmSync('app/old', { recursive: true });
console.log(fs.readFileSync('out/deep/x.txt', 'utf8').trim());
console.log(fs.readFileSync('app/existing.txt', 'utf8').trim().split('\n').join(','));
console.log(fs.readdirSync('app').join(','), fs.existsSync('app/old'));
fs.promises.writeFile('out/async.txt', 'async\n')
  .then(() => fs.promises.readFile('out/async.txt', 'utf8'))
  .then((text) => console.log(text.trim()));
"#;
    let out = run_shimmed(&env, "t", &["--name", "written"], &[&node, "-e", script]);
    assert_eq!(
        stdout_of(&out),
        "written by node\nold,appended\nesm.mjs,existing.txt,renamed.js false\nasync\n"
    );
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "written", "out/deep/x.txt")).unwrap(),
        "written by node\n"
    );
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "written", "app/existing.txt")).unwrap(),
        "old\nappended\n"
    );
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "written", "out/async.txt")).unwrap(),
        "async\n"
    );
    assert_eq!(
        env.ok(&["ls", "written", "app"]),
        "esm.mjs\nexisting.txt\nrenamed.js\n"
    );
    // The committed tree still runs: the renamed script finds the package.
    let out = run_shimmed(&env, "written", &[], &[&node, "app/renamed.js"]);
    assert_eq!(
        stdout_of(&out),
        "app 42 /vrift/node_modules/mypkg/lib/main.js\n"
    );
    env.fsck_ok();
}

/// `scandir(3)` of a directory that exists only in the upper (one the command made) lists
/// it, as `opendir` does; node's `fs.readdirSync` (libuv calls scandir) of a directory it
/// just made with `fs.mkdirSync` works. (Found by this test: scandir handed libc the
/// caller's path for an upper directory.)
#[test]
fn scandir_of_a_directory_the_command_made_lists_it() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("old")).unwrap();
    fs::write(src.join("old/f"), "f\n").unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();
    if let Some(probe) = shim_env::compiled(
        &env,
        "scan",
        br#"#include <stdio.h>
#include <stdlib.h>
#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
int main(void) {
    mkdir("made", 0755);
    fclose(fopen("made/file", "w"));
    const char *paths[] = { "made", "/vrift/made", "old" };
    for (int p = 0; p < 3; p++) {
        struct dirent **names;
        int n = scandir(paths[p], &names, NULL, alphasort);
        printf("%s:", paths[p]);
        if (n < 0) printf(" %s", strerror(errno));
        for (int i = 0; i < n; i++) printf(" %s", names[i]->d_name);
        printf("\n");
    }
    return 0;
}
"#,
    ) {
        let out = run_shimmed(&env, "t", &[], &[probe.to_str().unwrap()]);
        assert_eq!(
            stdout_of(&out),
            "made: . .. file\n/vrift/made: . .. file\nold: . .. f\n"
        );
    }
    if let Some(node) = first_existing(&["/usr/bin/node"]) {
        let out = run_shimmed(
            &env,
            "t",
            &[],
            &[
                &node,
                "-e",
                "const fs = require('fs'); fs.mkdirSync('made'); fs.writeFileSync('made/x', 'x'); \
                 console.log(fs.readdirSync('made').join(','))",
            ],
        );
        assert_eq!(stdout_of(&out), "x\n");
    }
}

// ---------------------------------------------------------------------------------------
// 4. fsx, the file-system exerciser, on a file of the tree.

fn fsx_bin() -> Option<PathBuf> {
    let home_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin/fsx"));
    let found = common::find_tool("fsx").or(home_bin.filter(|p| p.is_file()));
    if !common::require(found.is_some(), "fsx (cargo install fsx)") {
        return None;
    }
    found
}

/// Every operation fsx has, except fsync/fdatasync and msync after mapwrite (which only
/// make it wait for the disk): pread/pwrite, mmap reads and writes, msync(MS_INVALIDATE),
/// ftruncate, posix_fallocate, hole punching, sendfile, posix_fadvise, copy_file_range,
/// and close/reopen by path (through the shim) every few dozen operations.
const FSX_TOML: &str = "nomsyncafterwrite = true\n\
[weights]\n\
close_open = 2\nread = 10\nwrite = 10\nmapread = 10\nmapwrite = 10\ninvalidate = 1\n\
truncate = 2\nfsync = 0\nfdatasync = 0\nposix_fallocate = 1\npunch_hole = 1\n\
sendfile = 1\nposix_fadvise = 1\ncopy_file_range = 1\n";

/// Operations per run in the test, which runs fsx twice (natively and through the shim).
/// 100,000 operations of this configuration take about 35 s either way (the time is the
/// kernel's mmap and page-cache work; the shim only sees the opens), 20,000 about 2.5 s.
const FSX_OPS: &str = "20000";

#[test]
fn fsx_exercises_a_tree_file_copied_up_and_its_result_is_committed() {
    let env = Env::new();
    let Some(fsx) = fsx_bin() else {
        return;
    };
    let fsx = fsx.to_str().unwrap().to_string();
    let src = env.path("src");
    fs::create_dir_all(src.join("data")).unwrap();
    let original: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    fs::write(src.join("data/testfile"), &original).unwrap();
    fs::write(src.join("fsx.toml"), FSX_TOML).unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();

    // The same run natively, for the bytes fsx leaves.
    let host = env.path("host");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("fsx.toml"), FSX_TOML).unwrap();
    fs::write(host.join("testfile"), &original).unwrap();
    let text = native(
        &host,
        &fsx,
        &["-f", "fsx.toml", "-S", "17", "-N", FSX_OPS, "testfile"],
    );
    assert!(text.contains("All operations completed A-OK!"), "{text}");
    let expected = fs::read(host.join("testfile")).unwrap();

    // The config is read from the tree; the file under test is a tree file (opened
    // O_RDWR|O_CREAT|O_TRUNC: copied up), reopened by its tree path again and again.
    let out = run_shimmed(
        &env,
        "t",
        &["--name", "exercised"],
        &[
            &fsx,
            "-f",
            "fsx.toml",
            "-S",
            "17",
            "-N",
            FSX_OPS,
            "/vrift/data/testfile",
        ],
    );
    let text = stdout_of(&out);
    assert!(
        text.contains("All operations completed A-OK!"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.ok(&["ls", "exercised", "data"]),
        "testfile\n",
        "no .fsxgood artifact (fsx writes one on a miscompare)"
    );
    let got = cat_bytes(&env, "exercised", "data/testfile");
    assert_eq!(got.len(), expected.len(), "the committed file's size");
    assert!(
        got == expected,
        "the committed file differs from fsx's native run"
    );
    assert_eq!(cat_bytes(&env, "t", "data/testfile"), original);
    env.fsck_ok();
}

/// fsx's block mode never truncates: the file keeps the size of the tree file it was
/// copied up from (fsx reads it with fstat on the copy), and mapwrite msyncs each time.
#[test]
fn fsx_in_block_mode_on_a_tree_file_keeps_its_size() {
    let env = Env::new();
    let Some(fsx) = fsx_bin() else {
        return;
    };
    let fsx = fsx.to_str().unwrap().to_string();
    let toml = "blockmode = true\nnosizechecks = true\n[weights]\nclose_open = 0\n\
                read = 10\nwrite = 10\nmapread = 10\nmapwrite = 10\ntruncate = 0\n";
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let original: Vec<u8> = (0..131_072u32).map(|i| (i % 251) as u8).collect();
    fs::write(src.join("blockfile"), &original).unwrap();
    fs::write(src.join("fsx.toml"), toml).unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();
    let artifacts = env.path("artifacts");
    fs::create_dir_all(&artifacts).unwrap();
    let host = env.path("host");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("fsx.toml"), toml).unwrap();
    fs::write(host.join("blockfile"), &original).unwrap();
    let art = artifacts.to_str().unwrap();
    let args = ["-f", "fsx.toml", "-S", "5", "-N", "2000", "-P", art];
    let mut native_args = args.to_vec();
    native_args.push("blockfile");
    native(&host, &fsx, &native_args);
    let expected = fs::read(host.join("blockfile")).unwrap();
    assert_eq!(expected.len(), original.len());

    let mut cmd = vec![fsx.as_str()];
    cmd.extend_from_slice(&args);
    cmd.push("blockfile");
    let out = run_shimmed(&env, "t", &["--name", "exercised"], &cmd);
    let text = stdout_of(&out);
    assert!(text.contains("All operations completed A-OK!"), "{text}");
    let got = cat_bytes(&env, "exercised", "blockfile");
    assert_eq!(got.len(), original.len(), "block mode keeps the size");
    assert!(
        got == expected,
        "the committed file differs from fsx's native run"
    );
}

// ---------------------------------------------------------------------------------------
// 5. python writing, importing and removing in the tree.

fn python_bin() -> String {
    first_existing(&["/usr/bin/python3"]).unwrap_or_else(|| "python3".into())
}

const GEN_PY: &str = r#"
import importlib, os, shutil, sys
os.makedirs('gen/pkg/sub', exist_ok=True)
files = {
    'gen/pkg/__init__.py': 'from .a import A\n',
    'gen/pkg/a.py': 'A = 40\n',
    'gen/pkg/sub/__init__.py': '',
    'gen/pkg/sub/b.py': 'from ..a import A\nB = A + 2\n',
}
for path, text in files.items():
    with open(path, 'w') as f:
        f.write(text)
sys.path.insert(0, os.path.abspath('gen'))
importlib.invalidate_caches()
import pkg, pkg.sub.b
print(pkg.A, pkg.sub.b.B, pkg.__file__)
shutil.rmtree('olddir')
print(sorted(os.listdir('.')))
print(sorted(n.split('.')[0] for n in os.listdir('gen/pkg/__pycache__')))
print(sorted(n.split('.')[0] for n in os.listdir('gen/pkg/sub/__pycache__')))
"#;

#[test]
fn python_writes_a_package_imports_it_and_removes_a_tree_directory() {
    let env = Env::new();
    let python = python_bin();
    let src = env.path("src");
    fs::create_dir_all(src.join("tools")).unwrap();
    fs::create_dir_all(src.join("olddir/sub/deeper")).unwrap();
    fs::write(src.join("tools/gen.py"), GEN_PY).unwrap();
    fs::write(src.join("olddir/a.txt"), "a\n").unwrap();
    fs::write(src.join("olddir/sub/b.txt"), "b\n").unwrap();
    fs::write(src.join("olddir/sub/deeper/c.txt"), "c\n").unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("olddir/sub/link")).unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();

    let out = shim_cmd(&env, "t", &["--name", "py"], &[&python, "tools/gen.py"])
        .env_remove("PYTHONDONTWRITEBYTECODE")
        .output()
        .unwrap();
    assert_eq!(
        stdout_of(&out),
        "40 42 /vrift/gen/pkg/__init__.py\n['gen', 'tools']\n['__init__', 'a']\n['__init__', 'b']\n"
    );
    assert_eq!(env.ok(&["ls", "py"]), "gen\ntools\n");
    let cache = env.ok(&["ls", "py", "gen/pkg/__pycache__"]);
    assert!(
        cache
            .lines()
            .any(|l| l.starts_with("a.") && l.ends_with(".pyc")),
        "{cache}"
    );
    assert_eq!(
        String::from_utf8(cat_bytes(&env, "py", "gen/pkg/sub/b.py")).unwrap(),
        "from ..a import A\nB = A + 2\n"
    );
    // The committed sources keep their mtimes, so the committed bytecode is valid: a
    // later run loads every module from __pycache__ and compiles nothing.
    let out = shim_cmd(
        &env,
        "py",
        &[],
        &[
            &python,
            "-v",
            "-c",
            "import sys; sys.path.insert(0, '/vrift/gen'); import pkg.sub.b; print(pkg.sub.b.B)",
        ],
    )
    .env_remove("PYTHONDONTWRITEBYTECODE")
    .output()
    .unwrap();
    assert_eq!(stdout_of(&out), "42\n");
    let verbose = String::from_utf8_lossy(&out.stderr);
    for module in ["__init__", "a", "sub/__init__", "sub/b"] {
        let (dir, name) = match module.rsplit_once('/') {
            Some((d, n)) => (format!("/vrift/gen/pkg/{d}"), n),
            None => ("/vrift/gen/pkg".to_string(), module),
        };
        let want = format!("code object from '{dir}/__pycache__/{name}.");
        assert!(verbose.contains(&want), "{want} not in:\n{verbose}");
    }
    let compiled: BTreeSet<&str> = verbose
        .lines()
        .filter(|l| l.contains("bytecode is stale") || l.contains("could not create"))
        .collect();
    assert!(compiled.is_empty(), "{compiled:?}");
    env.fsck_ok();
}

/// numpy and pandas (C extensions, installed with pip into a directory by
/// scripts/test.sh) imported from a tree placed with `--at` where the directory was made,
/// with the host's copy gone: python finds every module and extension in the tree.
#[test]
fn python_imports_numpy_and_pandas_from_a_tree_at_the_path_it_was_made() {
    let cache = std::env::var_os("VELO_NUMPY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/velo-tests/numpy-pandas"));
    let python = fs::read_to_string(cache.join(".python")).ok();
    if !common::require(
        python.is_some() && cache.join("pkgs/numpy").is_dir(),
        "numpy and pandas installed by scripts/test.sh (pip)",
    ) {
        return;
    }
    let python = python.unwrap_or_default().trim().to_string();
    let env = Env::new();
    let made = env.path("site");
    common::cp("-a", &cache.join("pkgs"), &made);
    env.ingest(&made, &["--name", "np"]);
    fs::remove_dir_all(&made).unwrap();
    let at = made.to_str().unwrap();
    let script = format!(
        "import sys; sys.path.insert(0, '{at}'); import numpy, pandas; \
         print(numpy.__file__.startswith('{at}/'), pandas.__file__.startswith('{at}/'), \
         int(numpy.arange(10).sum()), int(pandas.Series([1, 2, 3]).sum()))"
    );
    let out = run_shimmed(&env, "np", &["--at", at], &[&python, "-c", &script]);
    assert_eq!(stdout_of(&out), "True True 45 6\n");
    assert!(!made.exists(), "the host copy stays gone");
}
