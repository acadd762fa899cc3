//! `velo branch bind` on a `--bindable` workspace mount: a bound process's walk of the top
//! never takes a directory away from another view, and a binding ends with its branch.
//! Needs /dev/fuse and either root or fusermount3 (and for `branch exec` unprivileged,
//! user namespaces): elsewhere the tests show as skipped, and fail under CI.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fuse_available, Env, Mounted};

/// A `--bindable` workspace over tree `tree` at `ws`, mounted at `mnt`.
fn bindable_workspace<'a>(env: &'a Env, tree: &str) -> (PathBuf, Mounted<'a>) {
    let ws = env.path("ws");
    let at = env.path("mnt");
    fs::create_dir_all(&at).unwrap();
    env.ok(&[
        "workspace",
        "init",
        ws.to_str().unwrap(),
        "--from",
        tree,
        "--mount",
        at.to_str().unwrap(),
        "--bindable",
    ]);
    (ws, Mounted { env, at })
}

fn branch_dir(at: &Path, name: &str) -> PathBuf {
    at.join(".velo/branches").join(name)
}

/// The shell words that run `velo` on this test's store and workspace `ws`.
fn velo_in(env: &Env, ws: &Path) -> String {
    format!(
        "{} --store {} branch -w {}",
        common::velo_bin().display(),
        env.store.display(),
        ws.display()
    )
}

fn sh(script: &str) -> Output {
    Command::new("sh").args(["-c", script]).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(if common::is_root() {
            vec!["-m", "true"]
        } else {
            vec!["-rm", "true"]
        })
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} never came",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_bound_walk_of_the_top_never_moves_a_directory_another_process_is_in() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(
        &env,
        "t",
        &[("src/a.txt", b"base\n"), ("src/sub/x", b"x\n")],
    );
    let (ws, mounted) = bindable_workspace(&env, "t");
    let at = mounted.at.clone();
    env.ok(&["branch", "-w", ws.to_str().unwrap(), "create", "b1"]);
    fs::write(branch_dir(&at, "b1").join("ONLY-B1"), b"b1\n").unwrap();
    // An unbound shell in b1's src (through .velo/branches), a bound child of it walking
    // the top's src, then the unbound shell going up from where it is. The unbound side
    // first has the kernel remember that b1's src has no `new`.
    let script = format!(
        "set -e
        cd {b1}/src
        ls >/dev/null
        test ! -e new
        sh -c '{velo} bind b1 --pid $$ >/dev/null && ls {at}/src >/dev/null && cd {at}/src/sub && cat {at}/ONLY-B1 && echo made-bound > {at}/src/new'
        echo cwd=$(readlink /proc/self/cwd)
        echo up=$(ls .. | tr '\\n' ' ')
        cat new
        ls | grep -x new
        echo meant-for-b1 > ../a.txt
        rm a.txt",
        b1 = branch_dir(&at, "b1").display(),
        at = at.display(),
        velo = velo_in(&env, &ws),
    );
    let out = sh(&script);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", text(&out.stderr));
    // The bound child saw b1 at the top.
    assert!(said.starts_with("b1\n"), "{said}");
    // The unbound shell stayed in b1, and so did its writes.
    let cwd = format!("cwd={}/src", branch_dir(&at, "b1").display());
    assert!(said.lines().any(|l| l == cwd), "{said}");
    assert!(
        said.lines().any(|l| l == "up=ONLY-B1 src"),
        "`..` is b1's root: {said}"
    );
    // What the bound child made shows through .velo/branches at once.
    assert!(said.contains("made-bound\nnew\n"), "{said}");
    assert!(!at.join("a.txt").exists(), "nothing written into main");
    assert!(!ws.join("branches/main/upper/a.txt").exists());
    assert_eq!(
        fs::read(branch_dir(&at, "b1").join("a.txt")).unwrap(),
        b"meant-for-b1\n"
    );
    assert!(!branch_dir(&at, "b1").join("src/a.txt").exists());
    assert_eq!(fs::read(at.join("src/a.txt")).unwrap(), b"base\n");
    // Each change made through one view is seen through the other at once: a bound
    // process reads what was written through .velo/branches and lists what was removed
    // there no more, and an unbound one sees the bound one's removals and renames.
    let out = sh(&format!(
        "set -e
        sh -c '{velo} bind b1 --pid $$ >/dev/null
            cat {at}/a.txt
            ls {at}/src | tr \"\\n\" \" \"; echo
            rm {at}/src/new
            mkdir {at}/src/made
            echo in-made > {at}/src/made/f
            mv {at}/src/made {at}/src/moved'
        ls {b1}/src | tr '\\n' ' '; echo
        cat {b1}/src/moved/f",
        at = at.display(),
        b1 = branch_dir(&at, "b1").display(),
        velo = velo_in(&env, &ws),
    ));
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", text(&out.stderr));
    assert_eq!(said, "meant-for-b1\nnew sub \nmoved sub \nin-made\n");
    drop(mounted);
}

#[test]
fn a_branch_exec_command_keeps_its_directory_while_a_bound_process_walks_the_top() {
    if !fuse_available() || !can_unshare() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("src/a.txt", b"base\n")]);
    let (ws, mounted) = bindable_workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    env.ok(&["branch", "-w", w, "create", "b2"]);
    fs::write(branch_dir(&at, "b2").join("ONLY-B2"), b"b2\n").unwrap();
    let (ready, go, walked) = (env.path("ready"), env.path("go"), env.path("walked"));
    // A command in b2's view, in src, waiting while a bound process walks the top's src.
    let exec = env
        .cmd()
        .args(["branch", "-w", w, "exec", "b2", "--", "sh", "-c"])
        .arg(format!(
            "set -e; cd {at}/src; touch {ready}; while [ ! -e {walked} ]; do sleep 0.01; done
            echo cwd=$(readlink /proc/self/cwd)
            echo up=$(ls .. | tr '\\n' ' ')
            echo from-exec > ../out",
            at = at.display(),
            ready = ready.display(),
            walked = walked.display(),
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let walker = Command::new("sh")
        .args([
            "-c",
            &format!(
                "while [ ! -e {go} ]; do sleep 0.01; done; ls {at}/src >/dev/null; cd {at}/src; cat ../ONLY-B2; touch {walked}",
                go = go.display(),
                at = at.display(),
                walked = walked.display(),
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&ready);
    env.ok(&[
        "branch",
        "-w",
        w,
        "bind",
        "b2",
        "--pid",
        &walker.id().to_string(),
    ]);
    fs::write(&go, b"").unwrap();
    let walked_out = walker.wait_with_output().unwrap();
    assert!(walked_out.status.success());
    assert_eq!(walked_out.stdout, b"b2\n");
    let out = exec.wait_with_output().unwrap();
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", text(&out.stderr));
    assert!(
        said.lines()
            .any(|l| l == format!("cwd={}/src", at.display())),
        "{said}"
    );
    assert!(said.lines().any(|l| l == "up=ONLY-B2 src"), "{said}");
    assert!(!at.join("out").exists(), "nothing written into main");
    assert_eq!(
        fs::read(branch_dir(&at, "b2").join("out")).unwrap(),
        b"from-exec\n"
    );
    drop(mounted);
}

#[test]
fn a_binding_ends_with_its_branch_and_never_passes_to_main_or_a_new_branch_of_its_name() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    common::ingest_files(&env, "t", &[("f", b"base\n")]);
    let (ws, mounted) = bindable_workspace(&env, "t");
    let at = mounted.at.clone();
    let w = ws.to_str().unwrap();
    for name in ["gone", "reset"] {
        env.ok(&["branch", "-w", w, "create", name]);
        fs::write(branch_dir(&at, name).join("MARK"), format!("{name}\n")).unwrap();
    }
    let snap = env.json(&["snapshot", "-w", w, "create", "-m", "s"]);
    let id = snap["id"].as_str().unwrap().to_string();
    let (go, again) = (env.path("go"), env.path("again"));
    // Bound shells: each reads its branch's MARK, waits while its branch is deleted
    // (or reset) and a branch of the same name made, then tries the top again.
    let spawn = |name: &str| {
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "while [ ! -e {go} ]; do sleep 0.01; done; cat {at}/MARK
                    touch {go}.{name}; while [ ! -e {again} ]; do sleep 0.01; done
                    cat {at}/MARK && echo read-after
                    cat {at}/NEW && echo read-new
                    echo leak > {at}/LEAK-{name} && echo wrote
                    ls {at} && echo listed
                    true",
                    go = go.display(),
                    again = again.display(),
                    at = at.display(),
                ),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (gone, reset) = (spawn("gone"), spawn("reset"));
    env.ok(&[
        "branch",
        "-w",
        w,
        "bind",
        "gone",
        "--pid",
        &gone.id().to_string(),
    ]);
    env.ok(&[
        "branch",
        "-w",
        w,
        "bind",
        "reset",
        "--pid",
        &reset.id().to_string(),
    ]);
    fs::write(&go, b"").unwrap();
    wait_for(&env.path("go.gone"));
    wait_for(&env.path("go.reset"));
    env.ok(&["branch", "-w", w, "delete", "gone"]);
    env.ok(&["branch", "-w", w, "reset", "reset", &id]);
    // A new branch of the old name: the old binding must not reach it.
    env.ok(&["branch", "-w", w, "create", "gone"]);
    for name in ["gone", "reset"] {
        fs::write(branch_dir(&at, name).join("NEW"), b"new\n").unwrap();
    }
    fs::write(&again, b"").unwrap();
    for (name, child) in [("gone", gone), ("reset", reset)] {
        let out = child.wait_with_output().unwrap();
        let said = text(&out.stdout);
        let err = text(&out.stderr);
        assert_eq!(
            said,
            format!("{name}\n"),
            "{name}: only the first read: {err}"
        );
        assert!(err.contains("Stale file handle"), "{name}: {err}");
        assert!(!at.join(format!("LEAK-{name}")).exists(), "{name}");
        assert!(!ws.join(format!("branches/main/upper/LEAK-{name}")).exists());
        assert!(!branch_dir(&at, name).join(format!("LEAK-{name}")).exists());
    }
    assert_eq!(fs::read(at.join("f")).unwrap(), b"base\n");
    // A process bound to the new branch sees it.
    let out = sh(&format!(
        "{velo} bind gone --pid $$ >/dev/null && cat {at}/NEW",
        velo = velo_in(&env, &ws),
        at = at.display()
    ));
    assert_eq!(text(&out.stdout), "new\n", "{}", text(&out.stderr));
    drop(mounted);
}
