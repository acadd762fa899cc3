//! `velo run --manifest M [--upper DIR] [--commit OUT] [--name N] -- CMD` with the shim:
//! the command's changes go copy-on-write into an upper in the overlayfs format, which
//! velo commits with the shared routine when the command succeeds, and which a later
//! run (through the shim or the sandbox) continues from.

mod common;
#[path = "common/sandbox_env.rs"]
mod sandbox_env;
#[path = "common/shim_env.rs"]
mod shim_env;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::Env;
use shim_env::{run_shimmed, stdout_of};

/// a.txt (2001), keep 0600, sub/{b, c}, gone/x, link -> a.txt.
fn tree(env: &Env) {
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::create_dir_all(src.join("gone")).unwrap();
    fs::write(src.join("a.txt"), b"hello\n").unwrap();
    common::touch_ns(&src.join("a.txt"), 978_307_200, 0);
    fs::write(src.join("keep"), b"private\n").unwrap();
    fs::set_permissions(src.join("keep"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join("sub/b"), b"b\n").unwrap();
    fs::write(src.join("sub/c"), b"c\n").unwrap();
    fs::write(src.join("gone/x"), b"x\n").unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    env.ingest(&src, &["--name", "t"]);
}

fn cat(env: &Env, tree: &str, path: &str) -> String {
    env.ok(&["cat", tree, path])
}

#[test]
fn a_successful_command_s_changes_are_committed_as_a_new_tree() {
    let env = Env::new();
    tree(&env);
    let out_velo = env.path("out.velo");
    let out = run_shimmed(
        &env,
        "t",
        &["--commit", out_velo.to_str().unwrap(), "--name", "next"],
        &[
            "sh",
            "-c",
            "set -e; echo more >> a.txt; echo new > sub/new; rm sub/c; rm -r gone; \
             mkdir -p made/deep; echo d > made/deep/f; mv sub/b sub/b2; ln -s sub/b2 l2; \
             chmod 0750 sub/new; touch -d @1000000000 keep; cat a.txt; ls sub",
        ],
    );
    assert_eq!(stdout_of(&out), "hello\nmore\nb2\nnew\n");
    assert!(out_velo.is_file());
    assert_eq!(cat(&env, "next", "a.txt"), "hello\nmore\n");
    assert_eq!(cat(&env, "next", "sub/new"), "new\n");
    assert_eq!(cat(&env, "next", "sub/b2"), "b\n");
    assert_eq!(cat(&env, "next", "made/deep/f"), "d\n");
    let listing = env.ok(&["ls", "next"]);
    assert!(!listing.contains("gone"), "{listing}");
    assert_eq!(env.ok(&["ls", "next", "sub"]), "b2\nnew\n");
    let show = |path: &str| env.json(&["show", "next", path]);
    assert_eq!(show("sub/new")["mode"], 0o750);
    assert_eq!(show("keep")["mode"], 0o600, "the untouched mode is kept");
    assert_eq!(show("keep")["mtime_ns"], 1_000_000_000_000_000_000i64);
    assert_eq!(show("l2")["target"], "sub/b2");
    // The committed tree runs through the shim like any other.
    let out = run_shimmed(&env, "next", &[], &["cat", "l2", "made/deep/f"]);
    assert_eq!(stdout_of(&out), "b\nd\n");
    env.fsck_ok();
}

#[test]
fn a_failed_command_commits_nothing_and_an_upper_can_be_kept_and_continued() {
    let env = Env::new();
    tree(&env);
    let out = run_shimmed(
        &env,
        "t",
        &["--name", "never"],
        &["sh", "-c", "echo x > a.txt; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing committed"));
    assert!(!env.ok(&["roots"]).contains("never"));

    let upper = env.path("kept");
    let up = upper.to_str().unwrap();
    let out = run_shimmed(
        &env,
        "t",
        &["--upper", up],
        &[
            "sh",
            "-c",
            "echo 1 > a.txt && rm sub/c && rm -r gone && mkdir gone && echo n > gone/n",
        ],
    );
    stdout_of(&out);
    // The upper is in the kernel overlayfs format: a 0/0 whiteout, an opaque directory.
    let whiteout = fs::symlink_metadata(upper.join("sub/c")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    let mut value = [0u8; 4];
    let n = rustix::fs::getxattr(upper.join("gone"), "user.overlay.opaque", &mut value).unwrap();
    assert_eq!(&value[..n], b"y");
    // A later run on the same upper continues from it.
    let out = run_shimmed(
        &env,
        "t",
        &["--upper", up, "--name", "after"],
        &["sh", "-c", "cat a.txt; ls sub gone; echo 2 >> a.txt"],
    );
    assert_eq!(stdout_of(&out), "1\ngone:\nn\n\nsub:\nb\n");
    assert_eq!(cat(&env, "after", "a.txt"), "1\n2\n");
    assert_eq!(env.ok(&["ls", "after", "gone"]), "n\n");
    env.fsck_ok();
}

#[test]
fn an_upper_made_through_the_shim_is_continued_by_the_sandbox() {
    let env = Env::new();
    if !sandbox_env::sandbox_supported() {
        return;
    }
    let (busybox, app) = sandbox_env::layers(&env);
    // The shim changes the app layer; the sandbox, with busybox under it, sees the same.
    let upper = env.path("up");
    let up = upper.to_str().unwrap();
    let app_velo = app.to_str().unwrap();
    let out = run_shimmed(
        &env,
        app_velo,
        &["--upper", up, "--at", "/vrift-shim-test"],
        &[
            "sh",
            "-c",
            "cd app && echo shim > from-shim && rm -r dir && ls",
        ],
    );
    let listed = stdout_of(&out);
    assert!(
        listed.contains("from-shim") && !listed.contains("\ndir\n"),
        "{listed}"
    );
    let out = env.run(&[
        "run",
        "--isolate",
        "--base",
        busybox.to_str().unwrap(),
        "--manifest",
        app_velo,
        "--upper",
        up,
        "--",
        "sh",
        "-c",
        "cat /app/from-shim; ls /app",
    ]);
    let text = stdout_of(&out);
    assert!(text.starts_with("shim\n"), "{text}");
    assert!(
        !text.lines().any(|l| l == "dir"),
        "the whiteout hides dir: {text}"
    );
}

#[test]
fn processes_racing_to_change_one_tree_file_share_one_copy() {
    let env = Env::new();
    tree(&env);
    // Eight appenders at once: each first write-open copies up (or finds the copy made
    // by another); every line lands in the one copy.
    let out = run_shimmed(
        &env,
        "t",
        &["--name", "raced"],
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do (echo line$i >> a.txt) & done; wait; \
             for i in 1 2 3 4 5 6 7 8; do (mkdir -p sub/d/e && echo $i > sub/d/e/f$i) & done; wait",
        ],
    );
    stdout_of(&out);
    let text = cat(&env, "raced", "a.txt");
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.remove(0), "hello", "{text}");
    lines.sort();
    assert_eq!(
        lines,
        (1..=8).map(|i| format!("line{i}")).collect::<Vec<_>>(),
        "{text}"
    );
    assert_eq!(env.ok(&["ls", "raced", "sub/d/e"]).lines().count(), 8);
}

#[test]
fn renaming_a_tree_directory_is_exdev_and_mv_copies_it() {
    let env = Env::new();
    tree(&env);
    let Some(probe) = shim_env::compiled(
        &env,
        "ren",
        br#"#include <stdio.h>
#include <errno.h>
#include <string.h>
int main(void) {
    int r = rename("sub", "moved");
    printf("%s\n", r == 0 ? "ok" : strerror(errno));
    return 0;
}
"#,
    ) else {
        return;
    };
    let out = run_shimmed(&env, "t", &[], &[probe.to_str().unwrap()]);
    assert_eq!(stdout_of(&out), "Invalid cross-device link\n");
    let out = run_shimmed(
        &env,
        "t",
        &["--name", "mv"],
        &["sh", "-c", "mv sub moved && ls; cat moved/b"],
    );
    assert_eq!(stdout_of(&out), "a.txt\ngone\nkeep\nlink\nmoved\nb\n");
    assert_eq!(env.ok(&["ls", "mv", "moved"]), "b\nc\n");
}

#[test]
fn make_builds_a_c_project_that_exists_only_in_the_tree() {
    let env = Env::new();
    if !common::require(
        common::find_tool("gcc").is_some(),
        "gcc (scripts/test.sh installs it)",
    ) || !common::require(
        common::find_tool("make").is_some(),
        "make (scripts/test.sh installs it)",
    ) {
        return;
    }
    let src = env.path("proj");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(
        src.join("lib/greet.c"),
        "#include <stdio.h>\nvoid greet(const char *w) { printf(\"hello, %s\\n\", w); }\n",
    )
    .unwrap();
    fs::write(src.join("lib/greet.h"), "void greet(const char *w);\n").unwrap();
    fs::write(
        src.join("main.c"),
        "#include \"lib/greet.h\"\nint main(void) { greet(\"tree\"); return 0; }\n",
    )
    .unwrap();
    fs::write(
        src.join("Makefile"),
        "OBJS = main.o lib/greet.o\nhello: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\nmain.o: lib/greet.h\nclean:\n\trm -f hello $(OBJS)\n",
    )
    .unwrap();
    env.ingest(&src, &["--name", "proj"]);
    fs::remove_dir_all(&src).unwrap();
    let out = run_shimmed(&env, "proj", &["--name", "built"], &["make", "-j2"]);
    stdout_of(&out);
    let listing = env.ok(&["ls", "built"]);
    assert!(
        listing.contains("hello") && listing.contains("main.o"),
        "{listing}"
    );
    assert!(env.ok(&["ls", "built", "lib"]).contains("greet.o"));
    // The binary runs from the committed tree, and the build is up to date there (its
    // mtimes are exact), until a source changes.
    let out = run_shimmed(&env, "built", &[], &["./hello"]);
    assert_eq!(stdout_of(&out), "hello, tree\n");
    let out = run_shimmed(&env, "built", &[], &["make", "-q", "hello"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_shimmed(
        &env,
        "built",
        &[],
        &[
            "sh",
            "-c",
            "sleep 0.01; touch lib/greet.h; make -q hello; echo $?",
        ],
    );
    assert_eq!(stdout_of(&out), "1\n");
    assert!(!Path::new("/vrift").exists());
    env.fsck_ok();
}

#[test]
fn a_directory_the_command_made_works_as_a_working_directory_with_tree_paths() {
    let env = Env::new();
    tree(&env);
    let out = run_shimmed(
        &env,
        "t",
        &[],
        &[
            "sh",
            "-c",
            "mkdir -p new/x && cd new/x && /bin/pwd && cat ../../a.txt ../../sub/b && \
             echo y > ../../new/y && ls .. && python3 -c 'import os; print(os.getcwd(), os.path.realpath(\"../y\"))' && \
             cd /vrift && chmod 700 sub && stat -c %a sub && touch -d @1500000000 sub && stat -c %Y sub",
        ],
    );
    assert_eq!(
        stdout_of(&out),
        "/vrift/new/x\nhello\nb\nx\ny\n/vrift/new/x /vrift/new/y\n700\n1500000000\n"
    );
}

/// What the red-team runs found: other names of a descriptor (`/proc/thread-self/fd/N`,
/// a second thread's `/proc/<tid>/fd/N`, `/dev/stdout`), `..` from a descriptor of a
/// directory the command made, overlayfs's own xattrs, `close(-1)`, a raw system call
/// relative to a tree directory. None of them may change the store.
#[test]
fn other_names_of_tree_files_and_upper_directories_stay_in_the_tree() {
    let env = Env::new();
    tree(&env);
    let Some(probe) = shim_env::compiled(
        &env,
        "hostile2",
        br#"#define _GNU_SOURCE
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
static void say(const char *what, int r) { printf("%s=%s\n", what, r < 0 ? strerror(errno) : "ok"); fflush(stdout); }
static int tree_fd;
static void *other_thread(void *arg) {
    char p[64];
    snprintf(p, sizeof p, "/proc/%ld/fd/%d", (long)syscall(SYS_gettid), tree_fd);
    int fd = open(p, O_WRONLY | O_APPEND);
    say("tid-reopen", fd);
    if (fd >= 0) { write(fd, "T\n", 2); close(fd); }
    return arg;
}
int main(void) {
    say("close-neg", close(-1));
    tree_fd = open("a.txt", O_RDONLY);
    char p[64];
    snprintf(p, sizeof p, "/proc/thread-self/fd/%d", tree_fd);
    int fd = open(p, O_WRONLY | O_APPEND);
    say("thread-self-reopen", fd);
    if (fd >= 0) { write(fd, "S\n", 2); close(fd); }
    pthread_t t;
    pthread_create(&t, NULL, other_thread, NULL);
    pthread_join(t, NULL);
    mkdir("nd", 0755);
    int d = open("nd", O_RDONLY | O_DIRECTORY);
    fd = openat(d, "../keep", O_WRONLY | O_APPEND);
    say("upper-dir-dotdot", fd);
    if (fd >= 0) { write(fd, "K\n", 2); close(fd); }
    say("upper-dir-escape", openat(d, "../../../../../../etc/hostname/x", O_RDONLY));
    say("fchdir-upper", fchdir(d));
    char cwd[4096];
    printf("cwd=%s\n", getcwd(cwd, sizeof cwd));
    say("opaque-xattr", setxattr("/vrift/sub", "user.overlay.opaque", "y", 1, 0));
    chdir("/vrift/sub");
    say("raw-mkdirat", (int)syscall(SYS_mkdirat, AT_FDCWD, "raw-made", 0755));
    return 0;
}
"#,
    ) else {
        return;
    };
    let prog = probe.to_str().unwrap().to_string();
    let out = run_shimmed(
        &env,
        "t",
        &["--name", "after"],
        &[
            "sh",
            "-c",
            &format!("{prog} && ls | head -1 && echo D >/dev/stdout"),
        ],
    );
    assert_eq!(
        stdout_of(&out),
        "close-neg=Bad file descriptor\n\
         thread-self-reopen=ok\n\
         tid-reopen=ok\n\
         upper-dir-dotdot=ok\n\
         upper-dir-escape=Not a directory\n\
         fchdir-upper=ok\n\
         cwd=/vrift/nd\n\
         opaque-xattr=Operation not permitted\n\
         raw-mkdirat=ok\n\
         a.txt\n\
         D\n"
    );
    assert_eq!(cat(&env, "after", "a.txt"), "hello\nS\nT\n");
    assert_eq!(cat(&env, "after", "keep"), "private\nK\n");
    assert_eq!(env.ok(&["ls", "after", "sub"]), "b\nc\n");
    // The store's blobs kept their bytes; the view's placeholder stayed empty (the raw
    // mkdirat landed in the run's own placeholder, gone with the run).
    env.fsck_ok();
    assert_eq!(cat(&env, "t", "a.txt"), "hello\n");
    for entry in fs::read_dir(env.store.join("views")).unwrap().flatten() {
        let e = entry.path().join("e");
        if e.is_dir() {
            assert_eq!(fs::read_dir(&e).unwrap().count(), 0, "{}", e.display());
        }
    }
}

#[test]
fn a_relative_store_and_a_kept_upper_s_own_directories_work() {
    let env = Env::new();
    tree(&env);
    // velo given the store by a relative path: the command still sees the tree.
    let parent = env.store.parent().unwrap();
    let name = env.store.file_name().unwrap().to_str().unwrap();
    shim_env::shim_built();
    let out = std::process::Command::new(common::velo_bin())
        .current_dir(parent)
        .args([
            "--store",
            name,
            "run",
            "--manifest",
            "t",
            "--name",
            "rel",
            "--",
        ])
        .args(["sh", "-c", "echo new > new && pwd"])
        .env_remove("VR_THE_SOURCE")
        .output()
        .unwrap();
    assert_eq!(stdout_of(&out), "/vrift\n");
    assert_eq!(cat(&env, "rel", "new"), "new\n");
    // --workdir and the program resolve through a kept upper: a directory and a script
    // an earlier run made there, and not a directory it deleted.
    let upper = env.path("kept");
    let up = upper.to_str().unwrap();
    stdout_of(&run_shimmed(
        &env,
        "t",
        &["--upper", up],
        &[
            "sh",
            "-c",
            "mkdir made && printf '#!/bin/sh\\necho made-script\\n' > made/run.sh && chmod +x made/run.sh && rm -r sub",
        ],
    ));
    let out = run_shimmed(
        &env,
        "t",
        &["--upper", up, "--workdir", "made"],
        &["sh", "-c", "pwd; ./run.sh"],
    );
    assert_eq!(stdout_of(&out), "/vrift/made\nmade-script\n");
    let out = run_shimmed(&env, "t", &["--upper", up], &["made/run.sh"]);
    assert_eq!(stdout_of(&out), "made-script\n");
    let out = run_shimmed(&env, "t", &["--upper", up, "--workdir", "sub"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workdir sub: no such directory"));
}

/// The other spellings of exec, access, close and dlopen: glibc implements them with
/// internal calls the shim would not see, so each is mapped onto the shim's own.
#[test]
fn execl_family_execveat_fexecve_close_range_and_faccessat2_see_the_tree() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/hello"), b"#!/bin/sh\necho \"hi $0 $1\"\n").unwrap();
    fs::set_permissions(src.join("bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();
    let Some(probe) = shim_env::compiled(
        &env,
        "spellings",
        br#"#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <sys/wait.h>
#include <sys/syscall.h>
#include <linux/close_range.h>
extern char **environ;
static void run(const char *what, int how) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = {"hello", "v", NULL};
        int d = open("/vrift/bin", O_RDONLY | O_DIRECTORY);
        int f = open("/vrift/bin/hello", O_RDONLY);
        switch (how) {
        case 0: execl("/vrift/bin/hello", "hello", "l", (char *)NULL); break;
        case 1: setenv("PATH", "/vrift/bin:/usr/bin:/bin", 1); execlp("hello", "hello", "lp", (char *)NULL); break;
        case 2: execle("/vrift/bin/hello", "hello", "le", (char *)NULL, environ); break;
        case 3: execveat(d, "hello", argv, environ, 0); break;
        case 4: fexecve(f, argv, environ); break;
        }
        printf("%s failed: %s\n", what, strerror(errno));
        _exit(1);
    }
    int status;
    waitpid(pid, &status, 0);
}
int main(void) {
    run("execl", 0); run("execlp", 1); run("execle", 2); run("execveat", 3); run("fexecve", 4);
    printf("faccessat2 %d\n", faccessat(AT_FDCWD, "/vrift/bin/hello", X_OK, AT_EACCESS));
    int fd = open("/vrift/bin/hello", O_RDONLY);
    int again = dup2(fd, 50);
    close_range(3, ~0U, 0);
    int reused = open("/etc/passwd", O_RDONLY);
    struct stat st;
    fstat(reused, &st);
    printf("close_range %d %s\n", again, st.st_size > 0 && (st.st_mode & 0777) != 0755 ? "host" : "tree?");
    return 0;
}
"#,
    ) else {
        return;
    };
    let out = run_shimmed(&env, "t", &[], &[probe.to_str().unwrap()]);
    assert_eq!(
        stdout_of(&out),
        "hi /vrift/bin/hello l\n\
         hi /vrift/bin/hello lp\n\
         hi /vrift/bin/hello le\n\
         hi /vrift/bin/hello v\n\
         hi /vrift/bin/hello v\n\
         faccessat2 0\n\
         close_range 50 host\n"
    );
}

/// A run whose velo is killed takes its command with it: nothing would commit or clean
/// up after it, and gc may remove its session.
#[test]
fn the_command_goes_when_velo_is_killed() {
    let env = Env::new();
    tree(&env);
    shim_env::shim_built();
    let pid_file = env.path("child.pid");
    let mut velo = env
        .cmd()
        .args(["run", "--manifest", "t", "--"])
        .args([
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
        ])
        .spawn()
        .unwrap();
    let mut child = String::new();
    for _ in 0..200 {
        child = fs::read_to_string(&pid_file).unwrap_or_default();
        if !child.trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let child: i32 = child.trim().parse().expect("the command wrote its pid");
    velo.kill().unwrap();
    velo.wait().unwrap();
    let gone = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(25));
        !Path::new(&format!("/proc/{child}")).exists()
            || fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| {
                s.split(") ")
                    .nth(1)
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
    });
    assert!(gone, "the command {child} outlived velo");
}

/// The second red-team round: `..` above the top from a directory the command made leads
/// to the host's parent of the tree (never into velo's session), a host directory's
/// descriptor above the tree reaches it (rsync's `fstatat(fd_of_root, "vrift")`),
/// `/proc/self/fd/N` of a tree file names its tree path, the kernel's errors for `.` and
/// for renames onto directories, and `posix_spawnp` finding a program in a tree PATH
/// entry (Rust's `Command` spawns that way).
#[test]
fn paths_from_new_directories_host_descriptors_and_spawnp_behave_as_natively() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("a.txt"), b"hi\n").unwrap();
    fs::copy("/bin/true", src.join("bin/mytrue")).unwrap();
    env.ingest(&src, &["--name", "t"]);
    fs::remove_dir_all(&src).unwrap();
    let Some(probe) = shim_env::compiled(
        &env,
        "round2",
        br#"#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <spawn.h>
#include <sys/wait.h>
#include <sys/stat.h>
extern char **environ;
static const char *err(int r) { return r < 0 ? strerror(errno) : "ok"; }
int main(void) {
    char link[64], buf[4096];
    mkdir("n1", 0755);
    int fd = open("n1", O_RDONLY | O_DIRECTORY);
    int up = openat(fd, "../..", O_RDONLY | O_DIRECTORY);
    snprintf(link, sizeof link, "/proc/self/fd/%d", up);
    ssize_t n = readlink(link, buf, sizeof buf);
    buf[n > 0 ? n : 0] = 0;
    printf("above-top=%s\n", buf);
    printf("no-session=%s\n", err(openat(fd, "../../lock", O_RDONLY)));
    int t = open("a.txt", O_RDONLY);
    snprintf(link, sizeof link, "/proc/self/fd/%d", t);
    n = readlink(link, buf, sizeof buf);
    buf[n > 0 ? n : 0] = 0;
    printf("tree-fd=%s\n", buf);
    int root = open("/", O_RDONLY | O_PATH);
    struct stat st;
    printf("from-root=%s\n", err(fstatat(root, "vrift/a.txt", &st, 0)));
    printf("unlink-dot=%s rmdir-dot=%s\n", err(unlink(".")), err(rmdir(".")));
    printf("rename-file-onto-dir=%s\n", err(rename("a.txt", "sub")));
    setenv("PATH", "/vrift/bin:/usr/bin:/bin", 1);
    pid_t pid;
    char *argv[] = {"mytrue", NULL};
    int e = posix_spawnp(&pid, "mytrue", NULL, NULL, argv, environ);
    int status = 1;
    if (e == 0) waitpid(pid, &status, 0);
    printf("spawnp=%d status=%d\n", e, status);
    return 0;
}
"#,
    ) else {
        return;
    };
    let out = run_shimmed(&env, "t", &[], &[probe.to_str().unwrap()]);
    assert_eq!(
        stdout_of(&out),
        "above-top=/\n\
         no-session=No such file or directory\n\
         tree-fd=/vrift/a.txt\n\
         from-root=ok\n\
         unlink-dot=Is a directory rmdir-dot=Invalid argument\n\
         rename-file-onto-dir=Is a directory\n\
         spawnp=0 status=0\n"
    );
}
