//! The sandbox boundary, tried as a hostile command would (issue 7): the caller's
//! terminal, environment, descriptors and host settings stay out of reach, read-only
//! means read-only, the sandbox dies with velo, and a run commits only what the command
//! changed, only when it succeeded.

mod common;
#[path = "common/sandbox_env.rs"]
mod sandbox_env;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use sandbox_env::{layers, run, sandbox_supported, velo_run};

/// The sandbox, and `script` (bsdutils) to give velo a terminal.
fn sandbox_and_pty_supported() -> bool {
    sandbox_supported()
        && common::require(
            common::find_tool("script").is_some(),
            "script (bsdutils) for a pty",
        )
}

/// A static C program built for the test (the busybox base has no libc to link against).
fn static_program(env: &Env, name: &str, source: &str) -> Option<PathBuf> {
    if !common::require(
        common::find_tool("gcc").is_some(),
        "gcc with static glibc (libc6-dev) to build an attacker",
    ) {
        return None;
    }
    let c = env.path(&format!("{name}.c"));
    fs::write(&c, source).unwrap();
    let exe = env.path(name);
    let out = Command::new("gcc")
        .args(["-static", "-O", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

fn velo_run_line(env: &Env, busybox: &Path, app: &Path, extra: &str, cmd: &str) -> String {
    format!(
        "VR_THE_SOURCE={} {} run --isolate --base {} --manifest {} {extra} -- {cmd}",
        env.store.display(),
        common::velo_bin().display(),
        busybox.display(),
        app.display()
    )
}

const TIOCSTI_ATTACK: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
int main(void) {
    const char *line = "echo INJECTED-BY-SANDBOX\n";
    int pushed = 0;
    for (const char *p = line; *p; p++) {
        if (ioctl(0, TIOCSTI, p) == 0) pushed++;
    }
    int tty = open("/dev/tty", O_RDWR);
    if (tty >= 0) {
        for (const char *p = line; *p; p++) {
            if (ioctl(tty, TIOCSTI, p) == 0) pushed++;
        }
    }
    printf("pushed=%d\n", pushed);
    return 0;
}
"#;

/// Item 1: with a terminal as stdin (`script` provides one), a command inside cannot push
/// input into it: interactive, it has a pty of its own; otherwise it runs in a new session
/// without a controlling terminal.
#[test]
fn tiocsti_cannot_type_into_the_callers_terminal() {
    if !sandbox_and_pty_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let Some(attacker) = static_program(&env, "tiocsti", TIOCSTI_ATTACK) else {
        return;
    };
    let line = velo_run_line(
        &env,
        &busybox,
        &app,
        &format!("--bind {}:/attacker:ro", attacker.display()),
        "/attacker",
    );
    // Interactive (stdin and stdout the terminal): the command has a terminal of its own,
    // so whatever it pushes stays there. Piped stdout: it has no terminal at all. Either
    // way the caller's shell, reading its next line, must not get the injected one.
    for (mode, tail) in [("own pty", ""), ("no terminal", " | cat")] {
        let shell = format!("{line}{tail}; read -t 2 next; echo \"next=[$next]\"");
        let out = Command::new("script")
            .args(["-qec", &shell, "/dev/null"])
            .stdin(Stdio::piped())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("pushed="),
            "{mode}: the attacker did not run: {text}"
        );
        assert!(
            text.contains("next=[]"),
            "{mode}: the command typed into the caller's terminal: {text}"
        );
        if mode == "no terminal" {
            assert!(text.contains("pushed=0"), "{mode}: {text}");
        }
    }
}

/// Counts SIGINTs in itself and in a child it forks (same process group).
const SIGINT_COUNTER: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
static volatile sig_atomic_t got;
static void count(int sig) { (void)sig; got++; }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = count;
    sigaction(SIGINT, &sa, 0);
    int report[2];
    if (pipe(report) != 0) return 1;
    pid_t child = fork();
    if (child == 0) {
        for (int i = 0; i < 30 && !got; i++) usleep(100000);
        char c = '0' + got;
        if (write(report[1], &c, 1) != 1) return 1;
        _exit(0);
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 30 && !got; i++) usleep(100000);
    usleep(300000);
    char c = '?';
    if (read(report[0], &c, 1) != 1) c = '?';
    waitpid(child, 0, 0);
    printf("parent=%d child=%c\n", (int)got, c);
    return 0;
}
"#;

/// Item 14: Ctrl-C on the terminal reaches the foreground job inside once (through the
/// run's own pty), and a SIGINT sent to velo reaches the command only (velo forwards it).
#[test]
fn ctrl_c_through_a_pty_reaches_the_command_once() {
    if !sandbox_and_pty_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let Some(counter) = static_program(&env, "sigcount", SIGINT_COUNTER) else {
        return;
    };
    let line = velo_run_line(
        &env,
        &busybox,
        &app,
        &format!("--bind {}:/sigcount:ro", counter.display()),
        "/sigcount",
    );
    let mut child = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        if stdout.read(&mut byte).unwrap() == 0 {
            panic!("no ready: {}", String::from_utf8_lossy(&seen));
        }
        seen.push(byte[0]);
    }
    // ETX on the pty master: the line discipline sends SIGINT to the foreground group.
    child.stdin.as_mut().unwrap().write_all(b"\x03").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let _ = child.wait();
    // The run has a terminal of its own: Ctrl-C reaches its foreground group (the
    // command and its child) once, as on any terminal, and never twice.
    assert!(
        rest.contains("parent=1 child=1"),
        "Ctrl-C should reach the foreground job inside once: {rest:?}"
    );

    // Without a terminal, a SIGINT sent to velo is forwarded to the command only.
    let mut child = velo_run(&env, &busybox, &app)
        .arg("--bind")
        .arg(format!("{}:/sigcount:ro", counter.display()))
        .args(["--", "/sigcount"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let _ = child.wait();
    assert!(rest.contains("parent=1 child=0"), "{rest:?}");
}

/// An interactive shell inside has job control: Ctrl-C stops its foreground job (not
/// the shell), `tty` names its terminal, and the shell's status is velo's.
#[test]
fn an_interactive_shell_has_job_control_on_a_terminal_of_its_own() {
    if !sandbox_and_pty_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let line = velo_run_line(&env, &busybox, &app, "", "/bin/sh -i");
    let mut child = Command::new("script")
        .args(["-qec", &format!("{line}; echo velo-status=$?"), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str, seen: &mut Vec<u8>| {
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(seen).contains(needle) {
            if stdout.read(&mut byte).unwrap() == 0 {
                panic!("no {needle:?} in {}", String::from_utf8_lossy(seen));
            }
            seen.push(byte[0]);
        }
    };
    wait_for("# ", &mut seen);
    stdin.write_all(b"echo started; sleep 30\n").unwrap();
    wait_for("started\r\n", &mut seen);
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"\x03").unwrap();
    stdin.write_all(b"echo after=$?; tty; exit 7\n").unwrap();
    wait_for("velo-status=", &mut seen);
    let mut rest = [0u8; 3];
    let _ = stdout.read(&mut rest);
    let _ = child.wait();
    let text = String::from_utf8_lossy(&seen).into_owned() + &String::from_utf8_lossy(&rest);
    assert!(
        text.contains("after=130"),
        "Ctrl-C did not stop the job: {text}"
    );
    assert!(text.contains("/dev/pts/"), "tty: {text}");
    assert!(text.contains("velo-status=7"), "{text}");
}

/// Items 2: host-wide /proc files are read-only inside and the command cannot make them
/// writable again (no CAP_SYS_ADMIN; a nested namespace sees them locked).
#[test]
fn proc_sys_is_read_only_and_stays_so() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let before = fs::read_to_string("/proc/sys/vm/swappiness").unwrap();
    let new_value = if before.trim() == "61" { "62" } else { "61" };
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        &format!(
            "echo {new_value} > /proc/sys/vm/swappiness && echo WROTE-SYSCTL; \
             mount -o remount,rw /proc/sys && echo REMOUNTED; \
             umount /proc/sys && echo UNMOUNTED; \
             unshare -rm sh -c 'mount -o remount,rw,bind /proc/sys && echo NESTED-REMOUNT'; \
             echo 1 > /proc/sysrq-trigger && echo SYSRQ; \
             head -c 1 /proc/kcore | wc -c; \
             grep CapEff /proc/self/status"
        ),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for leak in [
        "WROTE-SYSCTL",
        "REMOUNTED",
        "UNMOUNTED",
        "NESTED-REMOUNT",
        "SYSRQ",
    ] {
        assert!(!text.contains(leak), "{leak}: {text}");
    }
    assert!(
        text.contains("\n0\n") || text.starts_with("0\n"),
        "/proc/kcore readable: {text}"
    );
    assert_eq!(
        fs::read_to_string("/proc/sys/vm/swappiness").unwrap(),
        before
    );
    // CAP_SYS_ADMIN (bit 21) is gone from the command's effective set.
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .expect("CapEff line");
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN kept: {caps:x}");
}

/// Item 4: a directory fd the caller left open does not reach the command.
#[test]
fn the_callers_open_descriptors_do_not_reach_the_command() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let host_dir = env.path("host-dir");
    fs::create_dir(&host_dir).unwrap();
    let dir = fs::File::open(&host_dir).unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&dir);
    let mut cmd = velo_run(&env, &busybox, &app);
    cmd.args([
        "--",
        "/bin/sh",
        "-c",
        "ls /proc/self/fd/ | tr '\\n' ' '; echo x > /proc/self/fd/9/planted && echo PLANTED",
    ]);
    // SAFETY: dup2 in the child before exec; `raw` stays open in the parent until then.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    drop(dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("PLANTED"), "{text}");
    assert!(
        !host_dir.join("planted").exists(),
        "the command wrote the host"
    );
    // 0, 1, 2 and the fd ls itself opened for the listing.
    let fds: Vec<&str> = text.split_whitespace().collect();
    assert!(fds.len() <= 4 && !fds.contains(&"9"), "fds inside: {text}");
}

/// Items 5 and 17: no environment of the caller inside (not in the command's, not in pid
/// 1's), and a command line far longer than one environment variable may be works.
#[test]
fn the_callers_environment_stays_out_and_long_command_lines_work() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let long: Vec<String> = (0..12)
        .map(|i| format!("{i}{}", "y".repeat(100_000)))
        .collect();
    // The first run builds the farms (rayon threads: stage 1 is exec'd), the second runs
    // on cached farms (stage 1 is a fork of velo): both must keep the caller out.
    for attempt in ["farms built", "farms cached"] {
        let mut cmd = env.cmd();
        cmd.env("MYSECRET", "hunter2")
            .args(["run", "--isolate", "--base"])
            .arg(&busybox)
            .arg("--manifest")
            .arg(&app)
            .args([
                "--",
                "/bin/sh",
                "-c",
                "cat /proc/1/environ /proc/self/environ /proc/1/cmdline 2>/dev/null | tr '\\0' '\\n'; echo args=$#",
                "sh",
            ])
            .args(&long);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{attempt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("args=12"), "{attempt}: {text}");
        assert!(
            !text.contains("hunter2"),
            "{attempt}: the caller's environment leaked: {text}"
        );
        assert!(
            !text.contains(env.store.to_str().unwrap()),
            "{attempt}: the store path leaked: {text}"
        );
    }
}

/// Item 6: a read-only bind is read-only in every mount beneath its source too.
#[test]
fn read_only_binds_are_read_only_recursively() {
    if !sandbox_supported()
        || !common::require(
            common::is_root(),
            "root (to mount a tmpfs under the bind source)",
        )
    {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let source = env.path("src");
    fs::create_dir_all(source.join("sub")).unwrap();
    rustix::mount::mount(
        "tmpfs",
        source.join("sub"),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    let bind = format!("{}:/h:ro", source.display());
    let out = run(
        &env,
        &busybox,
        &app,
        &["--bind", &bind],
        "echo x > /h/top && echo TOP; echo x > /h/sub/f && echo SUB; ls /h && echo RAN",
    );
    let leaked = source.join("sub/f").exists() || source.join("top").exists();
    let _ = rustix::mount::unmount(source.join("sub"), rustix::mount::UnmountFlags::DETACH);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RAN"), "the command did not run: {text}");
    assert!(!text.contains("TOP") && !text.contains("SUB"), "{text}");
    assert!(!leaked, "a read-only bind wrote the host");
}

/// Item 9: `--net none` still has a working loopback.
#[test]
fn loopback_works_without_a_network() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        // The client connects only once the listener listens (port 7777 is 1E61 in
        // /proc/net/tcp or tcp6, state 0A): a client that came first was the flake. The
        // listener's stdin stays open a while: busybox nc may quit at its stdin's end
        // before it reads what the client sent (an empty /tmp/got, seen under load).
        "sleep 3 | timeout 20 nc -l -p 7777 > /tmp/got & \
         for i in $(seq 200); do grep -qE ':1E61 [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6 && break; sleep 0.05; done; \
         for i in $(seq 20); do echo over-loopback | nc 127.0.0.1 7777 && break; sleep 0.2; done; \
         wait; cat /tmp/got",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("over-loopback"),
        "{text} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Items 10 and 11: an upper inside (or around) the store and a bind of the store are
/// refused; one upper cannot serve two runs at once.
#[test]
fn uppers_and_binds_that_reach_the_store_are_refused_and_uppers_are_exclusive() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let blobs = env.store.join("blobs");
    let farms = env.store.join("farms/poison");
    for args in [
        vec!["--upper".to_string(), blobs.display().to_string()],
        vec!["--upper".to_string(), farms.display().to_string()],
        vec!["--upper".to_string(), env.dir.path().display().to_string()],
        vec!["--bind".to_string(), format!("{}:/s", env.store.display())],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&env, &busybox, &app, &args, "echo RAN");
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("RAN"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("store"), "{err}");
    }
    assert!(!farms.exists(), "a refused upper was created in the store");
    env.fsck_ok();

    let upper = env.path("upper");
    let mut first = velo_run(&env, &busybox, &app)
        .arg("--upper")
        .arg(&upper)
        .args(["--", "/bin/sh", "-c", "echo ready; sleep 3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    first
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    let second = run(
        &env,
        &busybox,
        &app,
        &["--upper", upper.to_str().unwrap()],
        "echo RAN",
    );
    assert_eq!(second.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another run is using"));
    assert!(first.wait().unwrap().success());
}

/// Items 12, 13, 15, 18: what a run commits and what it reports.
#[test]
fn only_successful_runs_commit_and_only_what_the_command_changed() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let roots = |env: &Env| env.json(&["roots"]).to_string();

    // A failed command commits nothing and keeps its status.
    let out = run(
        &env,
        &busybox,
        &app,
        &["--name", "x"],
        "echo new > /made; exit 3",
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing committed"));
    assert!(!roots(&env).contains("\"x\""), "a failed run was committed");
    // A sandbox that cannot start commits nothing either.
    let out = run(
        &env,
        &busybox,
        &app,
        &["--name", "x", "--workdir", "/nowhere"],
        "true",
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(!roots(&env).contains("\"x\""));
    // --commit-always commits a failed run.
    let out = run(
        &env,
        &busybox,
        &app,
        &["--name", "x", "--commit-always"],
        "echo one > /made; exit 4",
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(env.ok(&["cat", "x", "made"]), "one\n");

    // Mount points the sandbox made (bind targets, /proc, /dev, /tmp when the layers lack
    // them) are not part of the commit; the command's own changes are.
    let bound = env.path("bound");
    fs::create_dir(&bound).unwrap();
    let bind = format!("{}:/mnt/deep/d", bound.display());
    let out = run(
        &env,
        &busybox,
        &app,
        &["--name", "x", "--bind", &bind],
        "echo two > /made",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("x moved from"),
        "a moved name is reported: {err}"
    );
    let listing = env.ok(&["ls", "x"]);
    assert!(!listing.lines().any(|l| l == "mnt"), "{listing}");
    let base = env.ok(&["ls", busybox.to_str().unwrap()]);
    for mount_point in ["proc", "dev", "tmp"] {
        assert_eq!(
            listing.lines().any(|l| l == mount_point),
            base.lines().any(|l| l == mount_point),
            "{mount_point}: {listing}"
        );
    }
    assert_eq!(env.ok(&["cat", "x", "made"]), "two\n");

    // Item 3: a setuid file made inside is committed without the bit, and velo says so.
    let out = run(
        &env,
        &busybox,
        &app,
        &["--name", "x"],
        "cp /bin/busybox /rootsh && chmod 4755 /rootsh",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("rootsh: setuid/setgid bits dropped"));
    let shown = env.json(&["show", "x", "rootsh"]);
    assert_eq!(shown["mode"].as_u64().unwrap() & 0o6000, 0, "{shown}");

    // An unwritable --commit path fails before the command runs, registering nothing.
    let before = roots(&env);
    let out = run(
        &env,
        &busybox,
        &app,
        &["--name", "y", "--commit", "/nonexistent-dir/out.velo"],
        "echo RAN",
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("RAN"));
    assert_eq!(roots(&env), before);

    // Exit codes follow the container convention.
    let code = |script: &str| run(&env, &busybox, &app, &[], script).status.code();
    assert_eq!(code("kill -9 $$"), Some(137));
    let mut cmd = velo_run(&env, &busybox, &app);
    cmd.args(["--", "/no/such/program"]);
    assert_eq!(cmd.output().unwrap().status.code(), Some(127));
    let mut cmd = velo_run(&env, &busybox, &app);
    cmd.args(["--", "/app/hello.sh"]);
    assert_eq!(
        cmd.output().unwrap().status.code(),
        Some(126),
        "not executable"
    );
    let out = env.run(&[
        "run",
        "--isolate",
        "--manifest",
        "no-such-tree",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    env.fsck_ok();
}

fn processes_with(marker: &str) -> usize {
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(marker))
        .count()
}

/// Item 7: `kill -9` of velo ends the sandbox; gc deletes the session only once no
/// process of the run holds it, and never one that was kept.
#[test]
fn kill_9_of_velo_ends_the_sandbox_and_gc_respects_live_and_kept_sessions() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let marker = format!("velo-kill9-test-{}", std::process::id());
    let mut child = env
        .cmd()
        .args(["run", "--isolate", "--name", "k", "--base"])
        .arg(&busybox)
        .arg("--manifest")
        .arg(&app)
        .args([
            "--",
            "/bin/sh",
            "-c",
            &format!("echo ready; while :; do sleep 1; done # {marker}"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    assert!(processes_with(&marker) > 0);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with(&marker) > 0 {
        assert!(Instant::now() < deadline, "the sandbox outlived velo");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The session of the killed run is dead: gc removes it.
    let gc = env.json(&["gc", "--run"]);
    assert_eq!(gc["sessions"], 1, "{gc}");

    // A session whose lock is held is alive; a kept one stays.
    let live = env.store.join("sessions/live");
    let kept = env.store.join("sessions/kept-one");
    fs::create_dir_all(&live).unwrap();
    fs::create_dir_all(&kept).unwrap();
    fs::write(kept.join("kept"), "a failed commit").unwrap();
    let lock = fs::File::create(live.join("lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let gc = env.json(&["gc", "--run"]);
    assert!(live.exists() && kept.exists(), "{gc}");
    assert_eq!(gc["kept_sessions"].as_array().unwrap().len(), 1, "{gc}");
    drop(lock);
    env.json(&["gc", "--run"]);
    assert!(!live.exists() && kept.exists());
}

/// Odd arguments a new user gives (found by trying them): each is refused before the run
/// with a message naming it, or handled without harm.
#[test]
fn odd_outputs_binds_and_uppers_are_refused_before_the_run() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let refused = |extra: &[&str], what: &str| {
        let out = run(&env, &busybox, &app, extra, "echo RAN");
        assert_eq!(out.status.code(), Some(125), "{extra:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("RAN"),
            "{extra:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains(what), "{extra:?}: {err}");
    };
    // --commit onto a fifo (or a device, as root /dev/null) must never replace it.
    let fifo = env.path("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    refused(&["--commit", fifo.to_str().unwrap()], "not a regular file");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(&fifo).unwrap().file_type()
    ));
    // A writable bind of a directory holding the store would let the command rewrite it.
    let around = format!("{}:/host", env.dir.path().display());
    refused(&["--bind", &around], "contains the store");
    let out = run(
        &env,
        &busybox,
        &app,
        &["--bind", &format!("{around}:ro")],
        "test -d /host/store && echo SEEN",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SEEN"),
        "a read-only bind around the store is fine"
    );
    // Binds over the root, and unknown options.
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    refused(
        &["--bind", &format!("{}://", src.display())],
        "over the sandbox's root",
    );
    refused(
        &["--bind", &format!("{}:/mnt:xx", src.display())],
        "unknown option",
    );
    // Uppers that are files, or whose path overlayfs cannot take.
    let file = env.path("a-file");
    fs::write(&file, b"x").unwrap();
    refused(&["--upper", file.to_str().unwrap()], "not a directory");
    let colon = env.path("up:colon");
    refused(&["--upper", colon.to_str().unwrap()], "without ':'");
    assert!(!colon.exists(), "a refused upper was created");
    // Work directories of killed runs on an upper are cleared by the next run on it.
    let upper = env.path("upper");
    let stale = env.path(".upper.velo-work-killed");
    fs::create_dir_all(stale.join("work/inner")).unwrap();
    let out = run(
        &env,
        &busybox,
        &app,
        &["--upper", upper.to_str().unwrap()],
        "true",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale.exists(), "a stale work directory was left");
    // --commit-always never commits a run whose command did not start.
    let out = run(
        &env,
        &busybox,
        &app,
        &[
            "--name",
            "never",
            "--commit-always",
            "--workdir",
            "/nowhere",
        ],
        "true",
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never ran"));
    assert!(!env.json(&["roots"]).to_string().contains("\"never\""));
    // A broken stderr does not abort velo between the run and its commit.
    let mut child = env
        .cmd()
        .args(["run", "--isolate", "--name", "quiet", "--base"])
        .arg(&busybox)
        .arg("--manifest")
        .arg(&app)
        .args(["--", "/bin/sh", "-c", "sleep 0.3; echo x > /x"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(env.ok(&["cat", "quiet", "x"]), "x\n");
    // Clap's own errors in `velo run` are velo's failures too.
    let out = env.run(&[
        "run",
        "--isolate",
        "--manifest",
        "x",
        "--no-such-flag",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    env.fsck_ok();
}

const KEYRING_PROBE: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    long id = syscall(SYS_keyctl, 10 /* KEYCTL_SEARCH */, -3 /* session keyring */,
                      "user", "velo-test-secret", 0);
    printf("search=%s\n", id < 0 ? strerror(errno) : "FOUND");
    return 0;
}
"#;

/// The second red-team round: the caller's session keyring, nested user namespaces (a
/// fresh bounding set: cgroupfs and the host's limits), host device inodes, more of
/// /proc, uppers others can reach, and terminal modes left behind.
#[test]
fn keyrings_nested_namespaces_devices_and_shared_uppers_stay_closed() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    if let Some(probe) = static_program(&env, "keyprobe", KEYRING_PROBE) {
        let mut cmd = velo_run(&env, &busybox, &app);
        cmd.arg("--bind")
            .arg(format!("{}:/keyprobe:ro", probe.display()))
            .args(["--", "/keyprobe"]);
        // SAFETY: raw keyctl/add_key calls in the child before exec; the strings are
        // static and NUL-terminated.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_keyctl, 1, c"velo-test".as_ptr());
                let secret = b"hunter2";
                let id = libc::syscall(
                    libc::SYS_add_key,
                    c"user".as_ptr(),
                    c"velo-test-secret".as_ptr(),
                    secret.as_ptr(),
                    secret.len(),
                    -3i64,
                );
                if id < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("search=Required key not available"), "{text}");
    }
    let before = fs::metadata("/dev/null").unwrap();
    let out = run(
        &env,
        &busybox,
        &app,
        &[],
        "unshare -r true && echo NESTED-USERNS; \
         mkdir -p /tmp/cg && mount -t cgroup2 none /tmp/cg && echo CGROUP-MOUNTED; \
         chmod 600 /dev/null && echo CHMOD-DEV; touch /dev/tty && echo TOUCH-DEV; \
         chmod 600 /proc/timer_list && echo CHMOD-MASK; \
         echo x > /dev/null && echo dev-writes; \
         head -c 8 /proc/kpageflags | wc -c; ls /proc/acpi | wc -l",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for leak in [
        "NESTED-USERNS",
        "CGROUP-MOUNTED",
        "CHMOD-DEV",
        "TOUCH-DEV",
        "CHMOD-MASK",
    ] {
        assert!(!text.contains(leak), "{leak}: {text}");
    }
    assert!(
        text.contains("dev-writes"),
        "devices must still work: {text}"
    );
    assert!(
        text.contains("\n0\n0\n"),
        "kpageflags or acpi readable: {text}"
    );
    let after = fs::metadata("/dev/null").unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&before.permissions()),
        std::os::unix::fs::PermissionsExt::mode(&after.permissions())
    );

    // An upper others can write, or that belongs to someone else, is refused; as root,
    // one that others can even enter.
    let open_upper = env.path("open-upper");
    fs::create_dir(&open_upper).unwrap();
    fs::set_permissions(
        &open_upper,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = run(
        &env,
        &busybox,
        &app,
        &["--upper", open_upper.to_str().unwrap()],
        "true",
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("others can write"));
    if common::is_root() {
        fs::set_permissions(
            &open_upper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let out = run(
            &env,
            &busybox,
            &app,
            &["--upper", open_upper.to_str().unwrap()],
            "true",
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 700"));
        rustix::fs::chown(&open_upper, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
        fs::set_permissions(
            &open_upper,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let out = run(
            &env,
            &busybox,
            &app,
            &["--upper", open_upper.to_str().unwrap()],
            "true",
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to uid 65534"));
    }
    // A new upper is private.
    let fresh = env.path("fresh-upper");
    let out = run(
        &env,
        &busybox,
        &app,
        &["--upper", fresh.to_str().unwrap()],
        "true",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&fresh).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

/// Terminal modes the command changes on the caller's terminal are restored.
#[test]
fn terminal_modes_are_restored_after_the_run() {
    if !sandbox_and_pty_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let line = velo_run_line(&env, &busybox, &app, "", "/bin/sh -c 'stty -echo'");
    // With stdout piped the command shares the caller's terminal (fd 0); interactive, it
    // has its own. Either way the caller's modes are as before afterwards.
    for tail in [" | cat", ""] {
        let out = Command::new("script")
            .args(["-qec", &format!("{line}{tail}; stty -a"), "/dev/null"])
            .stdin(Stdio::piped())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(" echo "), "{tail:?}: {text}");
        assert!(
            !text.contains("-echo "),
            "{tail:?}: echo stayed off: {text}"
        );
    }
}

/// An `--upper` path swapped for a symlink into the store between velo's checks and the
/// mount (another process renaming in its parent) must not make a farm the upper: velo
/// checks what it opened, and the sandbox mounts only that very directory.
#[test]
fn an_upper_or_bind_source_swapped_for_a_link_into_the_store_is_never_mounted() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let out = run(&env, &busybox, &app, &[], "true");
    assert!(out.status.success());
    let app_root = env.json(&["import", app.to_str().unwrap()])["root"]
        .as_str()
        .unwrap()
        .to_string();
    let farm = env.store.join("farms").join(format!("{app_root}.2"));
    assert!(farm.join("app/hello.sh").exists(), "{}", farm.display());
    let race = env.path("race");
    fs::create_dir(&race).unwrap();
    let upper = race.join("up");
    fs::create_dir(&upper).unwrap();
    fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let link = race.join("lnk");
    std::os::unix::fs::symlink(&farm, &link).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (upper, link) = (upper.clone(), link.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &upper,
                    rustix::fs::CWD,
                    &link,
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                std::thread::sleep(std::time::Duration::from_micros(1500));
            }
        })
    };
    let mut wrote = 0;
    for _ in 0..80 {
        let out = run(
            &env,
            &busybox,
            &app,
            &["--upper", upper.to_str().unwrap()],
            "test -f /app/hello.sh && echo PWNED > /app/hello.sh && echo WROTE",
        );
        if String::from_utf8_lossy(&out.stdout).contains("WROTE") {
            wrote += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        wrote > 0,
        "no run got through the swaps: the test proves nothing"
    );

    // The same race on a bind source: a swap to a link to the store must not bind it.
    let source = race.join("src");
    fs::create_dir(&source).unwrap();
    let store_link = race.join("store-link");
    std::os::unix::fs::symlink(&env.store, &store_link).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (source, link) = (source.clone(), store_link.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &source,
                    rustix::fs::CWD,
                    &link,
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                std::thread::sleep(std::time::Duration::from_micros(1500));
            }
        })
    };
    let bind = format!("{}:/data", source.display());
    let mut seen = 0;
    let mut ran = 0;
    for _ in 0..80 {
        let out = run(
            &env,
            &busybox,
            &app,
            &["--bind", &bind],
            "test -e /data/VERSION && echo STORE; echo RAN",
        );
        let text = String::from_utf8_lossy(&out.stdout);
        seen += usize::from(text.contains("STORE"));
        ran += usize::from(text.contains("RAN"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        ran > 0,
        "no run got through the swaps: the test proves nothing"
    );
    assert_eq!(seen, 0, "the store was bound into {seen} of {ran} runs");
    env.fsck_ok();
    assert_eq!(
        env.ok(&["cat", &app_root, "app/hello.sh"]),
        "echo hello from app\n"
    );
}

/// A kept upper renamed (and its path taken by another directory) during the run: the
/// commit reads the directory velo locked, not whatever the path names afterwards.
#[test]
fn a_kept_upper_moved_during_the_run_is_still_what_is_committed() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let parent = env.path("open");
    fs::create_dir(&parent).unwrap();
    let upper = parent.join("up");
    let mut child = env
        .cmd()
        .args(["run", "--isolate", "--name", "moved", "--base"])
        .arg(&busybox)
        .arg("--manifest")
        .arg(&app)
        .arg("--upper")
        .arg(&upper)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "echo legit > /result; echo ready; sleep 1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    fs::rename(&upper, parent.join("up.old")).unwrap();
    fs::create_dir(&upper).unwrap();
    fs::write(upper.join("PLANTED"), b"x").unwrap();
    assert!(child.wait().unwrap().success());
    let listing = env.ok(&["ls", "moved"]);
    assert!(listing.lines().any(|l| l == "result"), "{listing}");
    assert!(!listing.lines().any(|l| l == "PLANTED"), "{listing}");
}

/// The first run of a tree (velo exec's its stage then: rayon threads exist) with many
/// binds: each bind source travels as a descriptor.
#[test]
fn many_binds_work_on_the_first_run_too() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let mut args = Vec::new();
    for i in 0..12 {
        let dir = env.path(&format!("b{i}"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("f"), format!("{i}")).unwrap();
        args.push("--bind".to_string());
        args.push(format!("{}:/b{i}:ro", dir.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&env, &busybox, &app, &args, "cat /b0/f /b11/f");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "011");
    assert_eq!(
        fs::read_dir(env.store.join("sessions"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "a session was left behind"
    );
}

/// A file the caller hands over as stdout (`> build.log`) or stdin, or the caller's
/// terminal, is never an inode the command can chmod: it is relayed through a pipe, and
/// what the command writes still arrives in order.
#[test]
fn stdio_files_of_the_caller_cannot_be_chmodded_from_inside() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let log = env.path("build.log");
    let input = env.path("input.txt");
    fs::write(&input, "line1\nline2\n").unwrap();
    let before = fs::metadata(&input).unwrap();
    let mut cmd = velo_run(&env, &busybox, &app);
    cmd
        .args([
            "--",
            "/bin/sh",
            "-c",
            "read first; echo out $first; echo err >&2; chmod 4755 /proc/self/fd/1 /proc/self/fd/0; echo out2",
        ])
        .stdin(fs::File::open(&input).unwrap())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::OpenOptions::new().append(true).open(&log).unwrap());
    let status = cmd.status().unwrap();
    assert!(status.success());
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o7000,
        0,
        "the command chmodded the caller's file: {mode:o}"
    );
    assert_eq!(
        fs::metadata(&input).unwrap().permissions().mode(),
        before.permissions().mode()
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("out line1\n"), "{text}");
    // /dev/null as stdio is the sandbox's own (read-only /dev): as root, the host's
    // /dev/null would otherwise be chmod-able through /proc/self/fd.
    let null_mode = fs::metadata("/dev/null").unwrap().permissions().mode();
    let status = velo_run(&env, &busybox, &app)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "chmod 600 /proc/self/fd/0 /proc/self/fd/1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the chmod should fail");
    assert_eq!(
        fs::metadata("/dev/null").unwrap().permissions().mode(),
        null_mode
    );
    assert!(text.contains("out2\n") && text.contains("err\n"), "{text}");
}

/// A commit that fails after a successful command (here: the file system of `--commit`
/// fills up during the run) keeps the run's changes where it says, gc leaves them there,
/// nothing is registered, and velo exits 125.
#[test]
fn a_failed_commit_keeps_the_changes_where_it_says_and_gc_leaves_them() {
    if !sandbox_supported() || !common::require(common::is_root(), "root (to mount a small tmpfs)")
    {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let small = env.path("small");
    fs::create_dir(&small).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &small,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"size=64k",
    )
    .unwrap();
    let out_path = small.join("out.velo");
    let mut child = env
        .cmd()
        .args(["run", "--isolate", "--name", "kept", "--commit"])
        .arg(&out_path)
        .arg("--base")
        .arg(&busybox)
        .arg("--manifest")
        .arg(&app)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "echo precious > /work; echo ready; sleep 1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    // Fill the output's file system while the command runs.
    let _ = fs::write(small.join("filler"), vec![1u8; 128 * 1024]);
    let out = child.wait_with_output().unwrap();
    let _ = rustix::mount::unmount(&small, rustix::mount::UnmountFlags::DETACH);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("the changes are kept at"), "{err}");
    assert!(!env.json(&["roots"]).to_string().contains("\"kept\""));
    let kept_upper = err
        .split("the changes are kept at ")
        .nth(1)
        .and_then(|rest| rest.split(" (").next())
        .map(std::path::PathBuf::from)
        .unwrap();
    let gc = env.json(&["gc", "--run"]);
    assert_eq!(gc["kept_sessions"].as_array().unwrap().len(), 1, "{gc}");
    assert_eq!(
        fs::read_to_string(kept_upper.join("work")).unwrap(),
        "precious\n"
    );
}

/// Stdin, from the third round: a named fifo the caller owns is relayed too (its mode
/// outlives the run); a file is given back unconsumed (a `while read` loop around velo
/// sees every line); the caller's terminal is not read by a run that is not interactive.
#[test]
fn stdin_is_taken_only_as_far_as_the_command_reads_it() {
    if !sandbox_and_pty_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    // A named fifo as stdout: relayed, so its mode cannot change.
    let fifo = env.path("out.fifo");
    assert!(Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let status = velo_run(&env, &busybox, &app)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "chmod 666 /proc/self/fd/1; echo through",
        ])
        .stdout(fs::OpenOptions::new().write(true).open(&fifo).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(reader.join().unwrap(), b"through\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&fifo).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // One file, three runs that each read one line: each gets the next line.
    let lines = env.path("lines.txt");
    fs::write(&lines, "one\ntwo\nthree\n").unwrap();
    let shared = fs::File::open(&lines).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let out = velo_run(&env, &busybox, &app)
            .args(["--", "/bin/sh", "-c", "read x; echo $x"])
            .stdin(shared.try_clone().unwrap())
            .output()
            .unwrap();
        got.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(got, ["one", "two", "three"]);
    // The caller's terminal, output piped: the command reads an empty stdin, and the line
    // typed meanwhile is still there for the shell.
    let line = velo_run_line(
        &env,
        &busybox,
        &app,
        "",
        "/bin/sh -c 'read x; echo got=[$x]'",
    );
    let mut child = Command::new("script")
        .args([
            "-qec",
            &format!("{line} | cat; read y; echo after=[$y]"),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"typed\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("got=[]"), "{text}");
    assert!(text.contains("after=[typed]"), "{text}");
}

/// Outputs that would land in the store are refused, and a `--json` report that cannot be
/// written fails a run that succeeded.
#[test]
fn outputs_into_the_store_are_refused_and_a_lost_json_report_is_an_error() {
    if !sandbox_supported() {
        return;
    }
    let env = Env::new();
    let (busybox, app) = layers(&env);
    let lock = env.store.join("lock");
    let out = run(
        &env,
        &busybox,
        &app,
        &["--commit", lock.to_str().unwrap()],
        "echo RAN",
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the store"));
    let err = env.fails(&[
        "export",
        app.to_str().unwrap(),
        "-o",
        env.store.join("refs/x.velo").to_str().unwrap(),
    ]);
    assert!(err.contains("inside the store"), "{err}");
    env.fsck_ok();
    let status = velo_run(&env, &busybox, &app)
        .arg("--json")
        .args(["--", "true"])
        .stdout(fs::File::create("/dev/full").unwrap())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(125));
}
