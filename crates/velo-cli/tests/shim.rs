//! `velo run --manifest M -- CMD` without `--isolate`: the LD_PRELOAD shim shows the tree
//! at a virtual path to real, dynamically linked host programs (coreutils, findutils, sh,
//! python3). The tree exists only in the store: nothing is mounted or copied, and the
//! virtual path does not exist on the host.

mod common;
#[path = "common/shim_env.rs"]
mod shim_env;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::Env;
use shim_env::{compiled, stdout_of};

/// A small tree: a file from 2001, a symlink, a subdirectory, a private file, an
/// executable copy of /bin/true and a Python module.
fn tree(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("sub/pkg")).unwrap();
    fs::write(src.join("a.txt"), b"hello\n").unwrap();
    common::touch_ns(&src.join("a.txt"), 978_307_200, 123_456_789);
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    fs::write(src.join("sub/b"), b"deep\n").unwrap();
    fs::write(src.join("secret"), b"s").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::copy("/bin/true", src.join("mytrue")).unwrap();
    fs::write(src.join("sub/pkg/__init__.py"), b"").unwrap();
    fs::write(src.join("sub/pkg/mod.py"), b"VALUE = 42\n").unwrap();
    env.ingest(&src, &["--name", "t"]);
    src
}

fn shimmed(env: &Env, extra: &[&str], command: &[&str]) -> Output {
    shim_env::run_shimmed(env, "t", extra, command)
}

#[test]
fn coreutils_list_read_and_stat_the_tree_at_its_virtual_path() {
    let env = Env::new();
    let src = tree(&env);
    assert!(
        !Path::new("/vrift").exists(),
        "the test needs /vrift absent on the host"
    );
    let out = shimmed(&env, &[], &["ls", "-ln", "--time-style=+%s", "/vrift"]);
    let text = stdout_of(&out);
    assert!(
        out.stderr.is_empty() || String::from_utf8_lossy(&out.stderr).starts_with("velo: built"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uid = rustix::process::getuid().as_raw();
    for want in [
        format!("-rw-r--r-- 1 {uid} "),
        " 978307200 a.txt".to_string(),
        "link -> a.txt".to_string(),
        "-rw------- 1".to_string(),
        "secret".to_string(),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
    let out = shimmed(
        &env,
        &[],
        &["cat", "/vrift/a.txt", "/vrift/link", "/vrift/sub/b"],
    );
    assert_eq!(stdout_of(&out), "hello\nhello\ndeep\n");
    let out = shimmed(
        &env,
        &[],
        &[
            "stat",
            "-c",
            "%n %s %a %.9Y %F",
            "/vrift/a.txt",
            "/vrift/sub",
            "/vrift/link",
        ],
    );
    assert_eq!(
        stdout_of(&out),
        "/vrift/a.txt 6 644 978307200.123456789 regular file\n\
         /vrift/sub 0 755 "
            .to_string()
            + &format!(
                "{} directory\n/vrift/link 5 777 {} symbolic link\n",
                stat_mtime(&src.join("sub")),
                lstat_mtime(&src.join("link"))
            )
    );
    // find walks the whole tree (openat + fdopendir + readdir of tree directories).
    let out = shimmed(&env, &[], &["find", "/vrift", "-printf", "%P %y\n"]);
    let mut found: Vec<String> = stdout_of(&out).lines().map(String::from).collect();
    found.sort();
    assert_eq!(
        found,
        [
            " d",
            "a.txt f",
            "link l",
            "mytrue f",
            "secret f",
            "sub d",
            "sub/b f",
            "sub/pkg d",
            "sub/pkg/__init__.py f",
            "sub/pkg/mod.py f"
        ]
    );
    assert!(
        !Path::new("/vrift").exists(),
        "nothing was made on the host"
    );
}

fn stat_mtime(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap();
    format!("{}.{:09}", m.mtime(), m.mtime_nsec())
}

fn lstat_mtime(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(path).unwrap();
    format!("{}.{:09}", m.mtime(), m.mtime_nsec())
}

#[test]
fn the_command_starts_at_the_top_of_the_tree_and_children_follow_its_cd() {
    let env = Env::new();
    tree(&env);
    let out = shimmed(
        &env,
        &[],
        &[
            "sh",
            "-c",
            "pwd; cat a.txt; cd sub && /bin/pwd && cat b && env -i /bin/cat b && ./../mytrue && echo ran-from-tree; cd /tmp && pwd; \
             cd / && cat vrift/a.txt && cd /vrift/sub && cat ../../vrift/sub/b",
        ],
    );
    assert_eq!(
        stdout_of(&out),
        "/vrift\nhello\n/vrift/sub\ndeep\ndeep\nran-from-tree\n/tmp\nhello\ndeep\n"
    );
    let out = shimmed(&env, &["--workdir", "/vrift/sub"], &["cat", "b"]);
    assert_eq!(stdout_of(&out), "deep\n");
    // A descriptor of a tree file inherited through exec still shows the tree's metadata.
    let out = shimmed(
        &env,
        &[],
        &[
            "sh",
            "-c",
            "python3 -c 'import os; s = os.fstat(3); print(int(s.st_mtime), s.st_size)' 3</vrift/a.txt",
        ],
    );
    assert_eq!(stdout_of(&out), "978307200 6\n");
    let out = shimmed(&env, &["--workdir", "/sub"], &["cat", "b"]);
    assert_eq!(stdout_of(&out), "deep\n");
    // Python: listing, reading, importing a module from the tree, a subprocess.
    let out = shimmed(
        &env,
        &[],
        &[
            "python3",
            "-B",
            "-c",
            "import os, sys, subprocess; sys.path.insert(0, '/vrift/sub'); import pkg.mod; \
             print(sorted(os.listdir('.')), open('a.txt').read().strip(), pkg.mod.VALUE, os.getcwd(), \
             subprocess.run(['cat', 'sub/b'], capture_output=True).stdout.decode().strip())",
        ],
    );
    assert_eq!(
        stdout_of(&out),
        "['a.txt', 'link', 'mytrue', 'secret', 'sub'] hello 42 /vrift deep\n"
    );
}

#[test]
fn changes_without_commit_are_discarded_and_paths_that_leave_the_tree_reach_the_host() {
    let env = Env::new();
    tree(&env);
    let out = shimmed(
        &env,
        &[],
        &[
            "sh",
            "-c",
            "echo x > /vrift/new && touch a.txt && rm a.txt && mkdir /vrift/d && mv link l2 && \
             cat /vrift/new && ls && cat /vrift/../etc/hostname >/dev/null && echo host-reached",
        ],
    );
    assert_eq!(
        stdout_of(&out),
        "x\nd\nl2\nmytrue\nnew\nsecret\nsub\nhost-reached\n"
    );
    assert!(!Path::new("/vrift").exists());
    // Nothing of it is left: the next run sees the tree as it was, and the session is gone.
    let out = shimmed(&env, &[], &["ls"]);
    assert_eq!(stdout_of(&out), "a.txt\nlink\nmytrue\nsecret\nsub\n");
    let sessions = env.store.join("sessions");
    assert_eq!(
        fs::read_dir(&sessions).map(|d| d.count()).unwrap_or(0),
        0,
        "a session left in {}",
        sessions.display()
    );
    env.fsck_ok();
}

#[test]
fn a_path_that_exists_on_the_host_is_hidden_by_the_tree() {
    let env = Env::new();
    tree(&env);
    let host = env.path("mnt");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("a.txt"), b"the host's\n").unwrap();
    let at = host.to_str().unwrap();
    let out = shimmed(&env, &["--at", at], &["cat", &format!("{at}/a.txt")]);
    assert_eq!(stdout_of(&out), "hello\n");
    assert_eq!(fs::read(host.join("a.txt")).unwrap(), b"the host's\n");
}

#[test]
fn programs_the_shim_cannot_enter_are_refused_with_the_way_to_run_them() {
    let env = Env::new();
    tree(&env);
    if !common::require(
        Path::new("/bin/busybox").exists(),
        "Debian's busybox-static (a statically linked program)",
    ) {
        return;
    }
    let out = shimmed(&env, &[], &["/bin/busybox", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("statically linked") && stderr.contains("--isolate"),
        "{stderr}"
    );
    let out = shimmed(&env, &["--bind", "/tmp:/tmp"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--isolate"));
}

/// What C programs reach through libc's own internal calls (scandir, fopen, realpath,
/// statfs) or raw system calls (`syscall(SYS_statx)`, as libuv does):
/// the shim does them itself for tree paths. Compiled here with the host's gcc.
#[test]
fn c_library_calls_that_libc_does_internally_see_the_tree() {
    let env = Env::new();
    tree(&env);
    let Some(exe) = compiled(
        &env,
        "probe",
        br#"#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <sys/statfs.h>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
int main(void) {
    char line[64] = {0};
    struct dirent **names;
    int n = scandir("/vrift", &names, NULL, alphasort);
    for (int i = 0; i < n; i++) { printf("%s,", names[i]->d_name); free(names[i]); }
    free(names);
    DIR *dr = opendir("/vrift/sub");
    struct dirent de, *dep;
    int seen = 0;
    while (readdir_r(dr, &de, &dep) == 0 && dep) seen++;
    closedir(dr);
    printf("readdir_r %d\n", seen);
    struct statx sx;
    long sr = syscall(SYS_statx, AT_FDCWD, "/vrift/a.txt", 0, STATX_BASIC_STATS, &sx);
    printf(" %ld %llu\n", sr, (unsigned long long)sx.stx_size);
    FILE *f = fopen("/vrift/sub/b", "re");
    if (!f || !fgets(line, sizeof line, f)) { perror("fopen"); return 1; }
    fclose(f);
    char *real = realpath("/vrift/link", NULL);
    char *cwd_real = realpath("sub/../a.txt", NULL);
    struct statfs fs;
    int st = statfs("/vrift/a.txt", &fs);
    FILE *w = fopen("/vrift/new", "w");
    int werr = errno;
    f = freopen("/vrift/a.txt", "r", stdin);
    char again[64] = {0};
    if (!f || !fgets(again, sizeof again, stdin)) { perror("freopen"); return 1; }
    printf("%s%s %s %d %s %s", line, real ? real : "(null)", cwd_real ? cwd_real : "(null)",
           st, w ? "created" : strerror(werr), again);
    return 0;
}
"#,
    ) else {
        return;
    };
    let out = shimmed(&env, &[], &[exe.to_str().unwrap()]);
    assert_eq!(
        stdout_of(&out),
        ".,..,a.txt,link,mytrue,secret,sub,readdir_r 4\n 0 6\n\
         deep\n/vrift/a.txt /vrift/a.txt 0 created hello\n"
    );
}

/// A shared library in the tree, which needs another one beside it (run path `$ORIGIN`),
/// loads with `dlopen` by its tree path: the loader gets its path in the tree's farm.
#[test]
fn dlopen_of_a_library_in_the_tree_finds_its_neighbours() {
    let env = Env::new();
    let Some(gcc) = ["/usr/bin/gcc", "/usr/bin/cc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        common::require(false, "gcc (scripts/test.sh installs it)");
        return;
    };
    let src = env.path("src");
    fs::create_dir_all(src.join("lib")).unwrap();
    let build = |args: &[&str]| {
        let out = std::process::Command::new(gcc).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    fs::write(env.path("dep.c"), b"int dep(void) { return 40; }\n").unwrap();
    fs::write(
        env.path("top.c"),
        b"int dep(void);\nint top(void) { return dep() + 2; }\n",
    )
    .unwrap();
    let lib = src.join("lib");
    build(&[
        "-shared",
        "-fPIC",
        "-o",
        lib.join("libdep.so").to_str().unwrap(),
        env.path("dep.c").to_str().unwrap(),
    ]);
    build(&[
        "-shared",
        "-fPIC",
        "-o",
        lib.join("libtop.so").to_str().unwrap(),
        env.path("top.c").to_str().unwrap(),
        "-L",
        lib.to_str().unwrap(),
        "-ldep",
        "-Wl,-rpath,$ORIGIN",
    ]);
    fs::write(
        env.path("load.c"),
        br#"#include <dlfcn.h>
#include <stdio.h>
int main(void) {
    void *h = dlopen("/vrift/lib/libtop.so", RTLD_NOW);
    if (!h) { printf("dlopen: %s\n", dlerror()); return 1; }
    int (*top)(void) = (int (*)(void))dlsym(h, "top");
    printf("%d\n", top());
    return 0;
}
"#,
    )
    .unwrap();
    let exe = env.path("load");
    build(&[
        "-o",
        exe.to_str().unwrap(),
        env.path("load.c").to_str().unwrap(),
        "-ldl",
    ]);
    env.ingest(&src, &["--name", "t"]);
    // The host copies are gone: only the tree has the libraries.
    fs::remove_dir_all(&src).unwrap();
    let out = shimmed(&env, &[], &[exe.to_str().unwrap()]);
    assert_eq!(stdout_of(&out), "42\n");
}

/// Every change a program makes to tree files, through their descriptors (the blob's
/// own, a tree directory's placeholder), `/proc/self/fd` or paths, lands on copies in the
/// run's upper: the store's blobs and the view keep their bytes, modes and times; a
/// relative path that leaves the tree lands beside it on the host, never in the store.
#[test]
fn a_program_cannot_change_the_store_through_the_shim() {
    let env = Env::new();
    tree(&env);
    let Some(exe) = compiled(
        &env,
        "hostile",
        br#"#define _GNU_SOURCE
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/xattr.h>
static void say(const char *what, int r) { printf("%s=%s\n", what, r < 0 ? strerror(errno) : "ok"); }
int main(int argc, char **argv) {
    char path[4096];
    snprintf(path, sizeof path, "%s/a.txt", argv[1]);
    int fd = open(path, O_RDONLY);
    say("fchmod", fchmod(fd, 0666));
    say("fchown", fchown(fd, 1, 1));
    say("futimens", futimens(fd, NULL));
    say("fsetxattr", fsetxattr(fd, "user.x", "1", 1, 0));
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    say("reopen-rw", open(p, O_WRONLY | O_TRUNC));
    say("chmod-proc", chmod(p, 0666));
    snprintf(path, sizeof path, "%s/sub", argv[1]);
    int d = open(path, O_RDONLY | O_DIRECTORY);
    say("fchmod-dir", fchmod(d, 0777));
    say("mkfifoat", mkfifoat(d, "fifo", 0600));
    chdir(argv[1]);
    say("mkdir-out", mkdir("../made-by-test", 0700));
    char t[] = "tmpXXXXXX";
    say("mkstemp-in-tree", mkstemp(t));
    struct stat st;
    say("fstat-bad", fstat(-1, &st));
    say("openat-bad-abs", openat(-1, "/etc/hostname", O_RDONLY));
    say("fchdir-bad", fchdir(-1));
    return 0;
}
"#,
    ) else {
        return;
    };
    let at = env.path("mnt/tree");
    fs::create_dir_all(env.path("mnt")).unwrap();
    let at = at.to_str().unwrap();
    let out = shimmed(&env, &["--at", at], &[exe.to_str().unwrap(), at]);
    assert_eq!(
        stdout_of(&out),
        "fchmod=ok\n\
         fchown=ok\n\
         futimens=ok\n\
         fsetxattr=ok\n\
         reopen-rw=ok\n\
         chmod-proc=ok\n\
         fchmod-dir=ok\n\
         mkfifoat=ok\n\
         mkdir-out=ok\n\
         mkstemp-in-tree=ok\n\
         fstat-bad=Bad file descriptor\n\
         openat-bad-abs=ok\n\
         fchdir-bad=Bad file descriptor\n"
    );
    // `../made-by-test` from the top of the tree is beside it on the host, not in the
    // store (the kernel's working directory).
    assert!(env.path("mnt/made-by-test").is_dir());
    env.fsck_ok();
    let hash = env.json(&["show", "t", "a.txt"])["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = env.store.join("blobs").join(&hash[..2]).join(&hash);
    let meta = fs::metadata(&blob).unwrap();
    assert_eq!(fs::read(&blob).unwrap(), b"hello\n");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o444,
        "{}",
        blob.display()
    );
    let views = env.store.join("views");
    for entry in fs::read_dir(&views).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            let names: Vec<_> = fs::read_dir(entry.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<u32>().is_err())
                .collect();
            assert_eq!(names, ["e"], "nothing made in {}", entry.path().display());
            assert_eq!(fs::read_dir(entry.path().join("e")).unwrap().count(), 0);
        }
    }
}

/// A damaged view is never handed to the shim: velo builds it again, and fsck names it.
#[test]
fn a_damaged_view_is_built_again_and_fsck_names_it() {
    let env = Env::new();
    tree(&env);
    let out = shimmed(&env, &[], &["cat", "/vrift/a.txt"]);
    assert_eq!(stdout_of(&out), "hello\n");
    let index = fs::read_dir(env.store.join("views"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "idx"))
        .unwrap();
    let mut bytes = fs::read(&index).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 1;
    fs::write(&index, &bytes).unwrap();
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("bad-view"));
    let out = shimmed(&env, &[], &["cat", "/vrift/a.txt"]);
    assert_eq!(stdout_of(&out), "hello\n");
    env.fsck_ok();
}

/// A `#!` script in the tree runs with its tree path as `$0` (so `dirname "$0"` finds its
/// neighbours), whether velo starts it or a program in the run does; a program run from
/// the tree sees its tree path in /proc/self/exe.
#[test]
fn scripts_and_programs_from_the_tree_know_their_tree_paths() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(
        src.join("bin/s.sh"),
        b"#!/bin/sh\necho \"$0\"; cat \"$(dirname \"$0\")/data\"\n",
    )
    .unwrap();
    fs::set_permissions(src.join("bin/s.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("bin/data"), b"beside\n").unwrap();
    fs::copy("/bin/readlink", src.join("bin/rl")).unwrap();
    fs::write(src.join("bin/loop.sh"), b"#!/vrift/bin/loop.sh\n").unwrap();
    fs::set_permissions(src.join("bin/loop.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    env.ingest(&src, &["--name", "t"]);
    let out = shimmed(&env, &[], &["/vrift/bin/s.sh"]);
    assert_eq!(stdout_of(&out), "/vrift/bin/s.sh\nbeside\n");
    let out = shimmed(&env, &["--workdir", "bin"], &["./s.sh"]);
    assert_eq!(stdout_of(&out), "./s.sh\nbeside\n");
    let out = shimmed(
        &env,
        &[],
        &[
            "sh",
            "-c",
            "bin/s.sh && /vrift/bin/rl /proc/self/exe; /vrift/bin/loop.sh; echo $?",
        ],
    );
    let text = stdout_of(&out);
    assert_eq!(
        text,
        "bin/s.sh\nbeside\n/vrift/bin/rl\n127\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
