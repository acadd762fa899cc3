//! `velo remote`, `velo push`, `velo pull` against a real S3 API server started on
//! loopback: moto's server (`pip install moto[server]`; scripts/test.sh installs it into
//! /var/cache/velo-tests/moto, or $VELO_MOTO_DIR). Elsewhere the tests show as skipped,
//! and fail under CI.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

/// Where moto's packages are (`pip install --target`).
fn moto_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("VELO_MOTO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/velo-tests/moto/pkgs"));
    dir.join("moto").is_dir().then_some(dir)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Python program with moto's packages on its path.
fn python(script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .env("PYTHONPATH", moto_dir().expect("checked"));
    cmd
}

/// A child process killed when dropped (a failed assertion must not leave it running).
struct KillOnDrop(Child);

impl KillOnDrop {
    /// Runs Python `script`, which prints "ready" once it serves.
    fn python_ready(script: &str) -> KillOnDrop {
        let mut child = KillOnDrop(
            Command::new("python3")
                .arg("-c")
                .arg(script)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        child
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A proxy on loopback in front of an S3 server, stopped when dropped: every request goes
/// through `behaviour` (Python, indented for the handler; `n` counts requests, `body` is
/// read), which may answer it itself (and return), before it is passed on.
struct Proxy;

impl Proxy {
    fn start(s3: &S3, behaviour: &str) -> (KillOnDrop, String) {
        let port = free_port();
        let script = format!(
            r#"
import http.client, http.server, socketserver, threading, time
count = [0]
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def handle_one(self):
        with lock:
            count[0] += 1
            n = count[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
{behaviour}
        c = http.client.HTTPConnection("127.0.0.1", {upstream})
        c.request(self.command, self.path, body=body, headers=dict(self.headers))
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
print("ready", flush=True)
S(("127.0.0.1", {port}), H).serve_forever()
"#,
            upstream = s3.endpoint.rsplit(':').next().unwrap(),
        );
        (
            KillOnDrop::python_ready(&script),
            format!("http://127.0.0.1:{port}"),
        )
    }
}

/// An S3 server on loopback, stopped when dropped.
struct S3 {
    child: Child,
    endpoint: String,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3 {
    /// Starts moto's server, or says why it cannot (skipped, or failed under CI).
    fn start() -> Option<S3> {
        if !common::require(
            moto_dir().is_some(),
            "moto's S3 server (scripts/test.sh installs it: pip install --target /var/cache/velo-tests/moto/pkgs 'moto[server]')",
        ) {
            return None;
        }
        // Credentials for every velo this test starts (moto takes any).
        std::env::set_var("AWS_ACCESS_KEY_ID", "velo-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "velo-test-secret");
        std::env::remove_var("AWS_PROFILE");
        let port = free_port();
        let child = python("import sys; from moto.server import main; sys.exit(main())")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let s3 = S3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(s3)
    }

    /// Runs boto3 code with `s3` a client of this server.
    fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x')\n{code}",
            self.endpoint
        );
        let out = python(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn bucket(&self, name: &str) {
        self.boto(&format!("s3.create_bucket(Bucket='{name}')"));
    }

    /// Every key under `prefix`.
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let out = self.boto(&format!(
            "p = s3.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket='{bucket}', Prefix='{prefix}'):\n    for o in page.get('Contents', []): print(o['Key'])"
        ));
        out.lines().map(str::to_string).collect()
    }
}

/// Ingests `n` files `f0`… (each its line repeated `repeat` times) as root "app".
fn numbered_files(env: &Env, n: usize, repeat: usize) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let line = format!("bytes of file {i}\n");
            (format!("f{i}"), line.repeat(repeat).into_bytes())
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    common::ingest_files(env, "app", &refs);
    files
}

/// `velo remote add NAME s3://BUCKET/PREFIX --endpoint` of this server.
fn add_remote(env: &Env, name: &str, url: &str, endpoint: &str) {
    env.ok(&["remote", "add", name, url, "--endpoint", endpoint]);
}

/// Number of blobs and trees in the store.
fn objects(store: &Path) -> usize {
    ["blobs", "trees"]
        .iter()
        .flat_map(|d| fs::read_dir(store.join(d)).into_iter().flatten().flatten())
        .flat_map(|shard| fs::read_dir(shard.path()).into_iter().flatten().flatten())
        .count()
}

#[test]
fn a_pushed_tree_pulls_into_an_empty_store_exactly_and_a_repush_uploads_nothing() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("team");
    let env = Env::new();
    let src = env.path("src");
    common::awkward_tree(&src);
    // Small files packed, a large one alone.
    fs::write(src.join("large.bin"), vec![7u8; 9 << 20]).unwrap();
    env.ingest(&src, &["--name", "app"]);
    add_remote(&env, "origin", "s3://team/velo", &s3.endpoint);
    let pushed = env.json(&["push", "origin", "app", "--json"]);
    assert!(pushed["uploaded"].as_u64().unwrap() > 3, "{pushed}");
    assert!(pushed["loose"].as_u64().unwrap() >= 1, "{pushed}");
    let keys = s3.keys("team", "velo/");
    assert!(keys
        .iter()
        .any(|k| k.starts_with("velo/packs/") && k.ends_with(".idx")));
    assert!(keys.iter().any(|k| k.starts_with("velo/objects/")));
    assert!(keys.contains(&"velo/roots/app".to_string()), "{keys:?}");
    // Nothing new: nothing uploaded.
    let again = env.json(&["push", "origin", "app", "--json"]);
    assert_eq!(again["uploaded"], 0, "{again}");
    assert_eq!(s3.keys("team", "velo/").len(), keys.len());
    let listed = env.ok(&["remote", "ls", "origin"]);
    assert!(listed.starts_with("app\t"), "{listed}");
    // Another machine: an empty store pulls it, every entry exact.
    let other = Env::new();
    add_remote(&other, "origin", "s3://team/velo", &s3.endpoint);
    let pulled = other.json(&["pull", "origin", "app", "--json"]);
    assert_eq!(pulled["root"], pushed["roots"][0][1], "{pulled}");
    assert_eq!(common::listed(&other, "app"), common::listed(&env, "app"));
    let copy = other.path("copy");
    other.ok(&["checkout", "app", copy.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(common::scan(&copy), common::scan(&src));
    other.fsck_ok();
    // By hash, under another name; a pull of what is there fetches nothing.
    let hash = pulled["root"].as_str().unwrap();
    let again = other.json(&["pull", "origin", hash, "--name", "by-hash", "--json"]);
    assert_eq!(
        (again["trees"].as_u64(), again["blobs"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(other.ok(&["roots"]).contains("by-hash"));
}

#[test]
fn a_corrupt_truncated_or_hostile_remote_is_refused_and_the_store_is_unchanged() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("bad");
    let env = Env::new();
    // Large enough that a pack cut in half ends inside the first blob: a range past the
    // end once made object_store slice beyond what it got (a panic).
    let (a, b) = (vec![b'a'; 5000], vec![b'b'; 5000]);
    common::ingest_files(&env, "app", &[("a", &a), ("b", &b)]);
    add_remote(&env, "r", "s3://bad", &s3.endpoint);
    env.ok(&["push", "r", "app"]);
    let pack = s3
        .keys("bad", "packs/")
        .into_iter()
        .find(|k| k.ends_with(".pack"))
        .unwrap();
    let other = Env::new();
    add_remote(&other, "r", "s3://bad", &s3.endpoint);
    other.ok(&["status"]);
    let before = objects(&other.store);
    let pull_fails = |want: &str| {
        let said = other.fails(&["pull", "r", "app"]);
        assert!(said.contains(want), "{said}");
        assert_eq!(objects(&other.store), before, "the store changed");
        assert!(!other.ok(&["roots"]).contains("app"));
    };
    // One byte changed: the object's hash says so, and names the pack.
    s3.boto(&format!(
        "b = bytearray(s3.get_object(Bucket='bad', Key='{pack}')['Body'].read()); b[-1] ^= 1\ns3.put_object(Bucket='bad', Key='{pack}', Body=bytes(b))"
    ));
    pull_fails(&pack);
    // Truncated.
    s3.boto(&format!(
        "b = s3.get_object(Bucket='bad', Key='{pack}')['Body'].read()\ns3.put_object(Bucket='bad', Key='{pack}', Body=b[:len(b)//2])"
    ));
    pull_fails("truncated");
    // An index that is not the one its name says (a hostile remote), read by a store
    // that has not cached the good one.
    let idx = pack.replace(".pack", ".idx");
    s3.boto(&format!(
        "s3.put_object(Bucket='bad', Key='{idx}', Body=b'VELOPIDX' + b'\\xff' * 100)"
    ));
    let third = Env::new();
    add_remote(&third, "r", "s3://bad", &s3.endpoint);
    let said = third.fails(&["pull", "r", "app"]);
    assert!(said.contains("do not hash to its name"), "{said}");
    assert!(!third.ok(&["roots"]).contains("app"));
    // A root naming a tree the remote does not have.
    s3.boto(&format!(
        "s3.put_object(Bucket='bad', Key='roots/ghost', Body=b'{{\"v\":1,\"root\":\"{}\",\"pushed_unix\":0}}')",
        "ab".repeat(32)
    ));
    let said = other.fails(&["pull", "r", "ghost"]);
    assert!(said.contains("has no tree"), "{said}");
    // Garbage as a root record.
    s3.boto("s3.put_object(Bucket='bad', Key='roots/junk', Body=b'\\x00' * 5000)");
    let said = other.fails(&["pull", "r", "junk"]);
    assert!(said.contains("not a root record"), "{said}");
    assert_eq!(objects(&other.store), before);
    other.fsck_ok();
}

/// A push cut off half-way leaves no root, and the next one uploads only what is missing;
/// a remote that is down is an error within seconds, not a hang.
#[test]
fn a_half_done_push_publishes_nothing_and_the_next_resumes() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("resume");
    let env = Env::new();
    numbered_files(&env, 50, 1);
    add_remote(&env, "r", "s3://resume", &s3.endpoint);
    env.ok(&["push", "r", "app"]);
    // As if killed after its packs were written: no root, one index missing.
    let idx = s3
        .keys("resume", "packs/")
        .into_iter()
        .find(|k| k.ends_with(".idx"))
        .unwrap();
    s3.boto(&format!(
        "s3.delete_object(Bucket='resume', Key='roots/app')\ns3.delete_object(Bucket='resume', Key='{idx}')"
    ));
    assert!(!env.ok(&["remote", "ls", "r"]).contains("app"));
    let again = env.json(&["push", "r", "app", "--json"]);
    assert!(again["uploaded"].as_u64().unwrap() > 0, "{again}");
    assert!(env.ok(&["remote", "ls", "r"]).contains("app"));
    // Down: refused connections are retried briefly, then an error naming the remote.
    let down = Env::new();
    down.ok(&[
        "remote",
        "add",
        "gone",
        "s3://resume",
        "--endpoint",
        &format!("http://127.0.0.1:{}", free_port()),
    ]);
    let started = Instant::now();
    let said = down.fails(&["pull", "gone", "app"]);
    assert!(started.elapsed() < Duration::from_secs(60), "{said}");
    assert!(said.contains("roots/app"), "{said}");
}

/// A proxy on loopback that answers every third request with 503 and drops every
/// seventh connection's request unanswered: push and pull still complete.
#[test]
fn transient_errors_are_retried_and_the_transfer_completes() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("flaky");
    let (proxy, flaky) = Proxy::start(
        &s3,
        r#"
        if n % 7 == 0:
            self.close_connection = True
            self.connection.close()
            return
        if n % 3 == 0:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
"#,
    );
    let env = Env::new();
    let src = env.path("src");
    common::awkward_tree(&src);
    env.ingest(&src, &["--name", "app"]);
    add_remote(&env, "r", "s3://flaky/p", &flaky);
    let pushed = env.run(&["push", "r", "app"]);
    let other = Env::new();
    add_remote(&other, "r", "s3://flaky/p", &flaky);
    let pulled = other.run(&["pull", "r", "app"]);
    drop(proxy);
    for out in [&pushed, &pulled] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(common::listed(&other, "app"), common::listed(&env, "app"));
    other.fsck_ok();
}

#[test]
fn remotes_are_checked_and_credentials_come_from_the_aws_files() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("creds");
    let env = Env::new();
    for (url, why) in [
        ("http://x/y", "s3://"),
        ("s3://UPPER/p", "bucket name"),
        ("s3://ok-bucket/a/../b", "'..'"),
    ] {
        let said = env.fails(&["remote", "add", "r", url]);
        assert!(said.contains(why), "{url}: {said}");
    }
    // Addresses and regions the S3 client cannot parse: refused when given, never a
    // panic at the first request (each of these once panicked in object_store).
    for (flag, value) in [
        ("--endpoint", "http://"),
        ("--endpoint", "http://127.0.0.1:99999"),
        ("--endpoint", "http:// x"),
        ("--region", "a b"),
    ] {
        let said = env.fails(&["remote", "add", "odd", "s3://creds", flag, value]);
        assert!(said.contains(flag) && !said.contains("panicked"), "{said}");
    }
    env.ok(&["remote", "add", "plain", "s3://creds"]);
    for (var, value) in [("AWS_ENDPOINT_URL", "http://"), ("AWS_REGION", "x y")] {
        let out = env
            .cmd()
            .env(var, value)
            .args(["remote", "ls", "plain"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(said.contains(var) && !said.contains("panicked"), "{said}");
    }
    env.ok(&["remote", "remove", "plain"]);
    // A record edited (or written by a velo that checked less): the error names it and
    // says how to mend it, where it once quoted an `--endpoint` nobody had typed.
    fs::write(
        env.store.join("remotes/edited.json"),
        r#"{"name":"edited","bucket":"creds","prefix":"","endpoint":"http://"}"#,
    )
    .unwrap();
    let said = env.fails(&["remote", "list"]);
    assert!(
        said.contains("remotes/edited.json") && said.contains("velo remote remove edited"),
        "{said}"
    );
    env.ok(&["remote", "remove", "edited"]);
    add_remote(&env, "r", "s3://creds", &s3.endpoint);
    let said = env.fails(&["remote", "add", "r", "s3://creds"]);
    assert!(said.contains("exists already"), "{said}");
    assert!(env.ok(&["remote", "list"]).contains("s3://creds"));
    common::ingest_files(&env, "app", &[("a", b"a\n")]);
    // No credentials anywhere: said, with where to put them.
    let home = env.path("home");
    fs::create_dir_all(home.join(".aws")).unwrap();
    let without = |cmd: &mut Command| {
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("HOME", &home);
    };
    let mut cmd = env.cmd();
    without(&mut cmd);
    let out = cmd.args(["push", "r", "app"]).output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no AWS credentials"), "{said}");
    // Where velo looked: once only "no AWS credentials", whatever was wrong.
    assert!(
        said.contains("there is no ") && said.contains(".aws/credentials"),
        "{said}"
    );
    let mut cmd = env.cmd();
    without(&mut cmd);
    let out = cmd
        .env("AWS_SHARED_CREDENTIALS_FILE", &home)
        .args(["push", "r", "app"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("cannot be read"), "{said}");
    // From ~/.aws/credentials, profile AWS_PROFILE; the secret never shows.
    fs::write(
        home.join(".aws/credentials"),
        "[default]\naws_access_key_id = nope\n[ci]\naws_access_key_id = from-file\naws_secret_access_key = s3cr3t-value\n",
    )
    .unwrap();
    // A profile the file does not have is named, with the file.
    let mut cmd = env.cmd();
    without(&mut cmd);
    let out = cmd
        .env("AWS_PROFILE", "nosuch")
        .args(["push", "r", "app"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("has no profile [nosuch] (AWS_PROFILE)"),
        "{said}"
    );
    let mut cmd = env.cmd();
    without(&mut cmd);
    let out = cmd
        .env("AWS_PROFILE", "ci")
        .env("VRIFT_DEBUG", "trace")
        .args(["push", "r", "app"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("s3cr3t-value"), "the secret was logged");
    env.ok(&["remote", "remove", "r"]);
    assert!(!env.ok(&["remote", "list"]).contains("creds"));
}

/// `velo mount TREE MP --remote R` of a root only the remote has: the trees come at once,
/// each file's bytes on its first read (many readers at once get the same bytes), and a
/// remote gone down gives the reader EIO, not a hang. `velo run --remote` fetches all.
#[test]
fn a_mount_with_a_remote_fetches_each_file_on_first_read() {
    let Some(s3) = S3::start() else { return };
    if !common::fuse_available() {
        return;
    }
    s3.bucket("lazy");
    let env = Env::new();
    let files = numbered_files(&env, 20, 100);
    add_remote(&env, "r", "s3://lazy", &s3.endpoint);
    env.ok(&["push", "r", "app"]);
    let other = Env::new();
    add_remote(&other, "r", "s3://lazy", &s3.endpoint);
    let at = other.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let mounted = common::mount_with(&other, "app", &at, &["--remote", "r"]);
    // Listed and stat'ed from the trees alone: no blob fetched yet.
    assert_eq!(fs::read_dir(&at).unwrap().count(), 20);
    assert_eq!(
        fs::metadata(at.join("f3")).unwrap().len(),
        files[3].1.len() as u64
    );
    let blobs = |store: &Path| {
        fs::read_dir(store.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|s| fs::read_dir(s.path()).into_iter().flatten().flatten())
            .count()
    };
    assert_eq!(blobs(&other.store), 0);
    // Eight readers of one file at once, and one of another.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let path = at.join("f7");
            std::thread::spawn(move || fs::read(path).unwrap())
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), files[7].1);
    }
    assert_eq!(fs::read(at.join("f1")).unwrap(), files[1].1);
    assert_eq!(blobs(&other.store), 2);
    assert!(other.ok(&["roots"]).contains("(partial)"));
    // The remote goes down: a file not fetched yet fails, within the fetch's timeout.
    drop(s3);
    let started = Instant::now();
    let err = fs::read(at.join("f2")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(45));
    assert_eq!(
        fs::read(at.join("f7")).unwrap(),
        files[7].1,
        "fetched ones stay"
    );
    drop(mounted);
    // What was never read is not in the store: a checkout says which pull fetches it.
    let copy = other.path("copy");
    let said = other.fails(&["checkout", "app", copy.to_str().unwrap(), "--mode", "copy"]);
    assert!(said.contains("`velo pull r app`"), "{said}");
    other.fsck_ok();
}

#[test]
fn a_run_with_a_remote_fetches_what_the_store_lacks_first() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("runs");
    let env = Env::new();
    common::ingest_files(&env, "app", &[("a", b"run me\n"), ("b", b"and me\n")]);
    add_remote(&env, "r", "s3://runs", &s3.endpoint);
    env.ok(&["push", "r", "app"]);
    let other = Env::new();
    add_remote(&other, "r", "s3://runs", &s3.endpoint);
    // Whatever the command does (here: nothing to run), the layers were fetched first.
    let _ = other.run(&[
        "run",
        "--isolate",
        "--manifest",
        "app",
        "--remote",
        "r",
        "--",
        "/no-such",
    ]);
    drop(s3);
    assert_eq!(other.ok(&["cat", "app", "a"]), "run me\n");
    assert!(!other.ok(&["roots"]).contains("(partial)"));
    other.fsck_ok();
}

/// Remotes whose prefixes nest (one at `p`, one at `p/objects`, one at `p/packs`) never
/// take each other's objects for their own: a push to `p` once skipped blobs only the
/// nested remote had, and published a root naming objects that were not there.
#[test]
fn remotes_whose_prefixes_nest_keep_to_their_own_objects() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("nest");
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("large"), vec![3u8; 9 << 20]).unwrap();
    fs::write(src.join("small"), b"small\n").unwrap();
    env.ingest(&src, &["--name", "app"]);
    add_remote(&env, "outer", "s3://nest/p", &s3.endpoint);
    add_remote(&env, "objects", "s3://nest/p/objects", &s3.endpoint);
    add_remote(&env, "packs", "s3://nest/p/packs", &s3.endpoint);
    env.ok(&["push", "objects", "app"]);
    env.ok(&["push", "packs", "app"]);
    let pushed = env.json(&["push", "outer", "app", "--json"]);
    assert_eq!(pushed["uploaded"], pushed["objects"], "{pushed}");
    assert_eq!(env.ok(&["remote", "ls", "outer"]).lines().count(), 1);
    let other = Env::new();
    add_remote(&other, "outer", "s3://nest/p", &s3.endpoint);
    other.ok(&["pull", "outer", "app"]);
    assert_eq!(other.ok(&["cat", "app", "small"]), "small\n");
    other.fsck_ok();
    // A prefix S3 tools would see percent-encoded is refused.
    let said = env.fails(&[
        "remote",
        "add",
        "odd",
        "s3://nest/a~b",
        "--endpoint",
        &s3.endpoint,
    ]);
    assert!(said.contains("letters, digits"), "{said}");
}

/// A server that redirects every request to another host (which records what reaches
/// it), and one that refuses every request with a long answer full of terminal escape
/// sequences: velo follows no redirect (a session token never reaches the other host),
/// and quotes a server's words bounded and printable. Needs only python3.
#[test]
fn redirects_are_refused_and_a_servers_words_are_quoted_tidily() {
    let env = Env::new();
    let record = env.path("reached");
    let (redirecting, recording, loud) = (free_port(), free_port(), free_port());
    let script = format!(
        r#"
import http.server, socketserver, threading
class Recording(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self):
        with open({record:?}, "a") as f:
            f.write(self.requestline + "\n" + str(self.headers) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer
class Redirecting(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self):
        self.send_response(307)
        self.send_header("Location", "http://127.0.0.1:{recording}" + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer
class Loud(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self):
        body = (b"\x1b[2J\x1b]0;owned\x07<Error>\r\n" + b"DENIED " * 20000)
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
for port, handler in (({recording}, Recording), ({redirecting}, Redirecting), ({loud}, Loud)):
    threading.Thread(target=S(("127.0.0.1", port), handler).serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#
    );
    let servers = KillOnDrop::python_ready(&script);
    let velo = |args: &[&str]| {
        env.cmd()
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "velo-test")
            .env("AWS_SECRET_ACCESS_KEY", "velo-test-secret")
            .env("AWS_SESSION_TOKEN", "the-session-token")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap()
    };
    for (name, port) in [("moved", redirecting), ("loud", loud)] {
        let endpoint = format!("http://127.0.0.1:{port}");
        env.ok(&[
            "remote",
            "add",
            name,
            "s3://bucket/p",
            "--endpoint",
            &endpoint,
        ]);
    }
    let moved = velo(&["pull", "moved", "app"]);
    let loud_pull = velo(&["pull", "loud", "app"]);
    drop(servers);
    assert!(!moved.status.success());
    let said = String::from_utf8_lossy(&moved.stderr);
    assert!(
        said.contains("307") && said.contains("no redirect"),
        "{said}"
    );
    let reached = fs::read_to_string(&record).unwrap_or_default();
    assert!(
        !reached.contains("the-session-token") && reached.is_empty(),
        "a redirect was followed to another host:\n{reached}"
    );
    assert!(!loud_pull.status.success());
    let said = String::from_utf8_lossy(&loud_pull.stderr);
    assert!(said.contains("403"), "{said}");
    assert!(said.contains("DENIED"), "{said}");
    assert!(
        !said.contains(['\x1b', '\x07', '\r']),
        "control characters reached the terminal: {said:?}"
    );
    assert!(said.len() < 2000, "{} bytes of error: {said}", said.len());
}

/// Blobs of 4 MiB or more are streamed to a staged file as they arrive (a tree may say a
/// blob is terabytes long): packed ones by their range, loose ones whole. A corrupt or
/// truncated large blob is refused like any other, and leaves nothing staged behind.
#[test]
fn large_blobs_stream_into_the_store_and_bad_ones_leave_nothing() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("big");
    let env = Env::new();
    let packed: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    let loose: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 241) as u8).collect();
    common::ingest_files(
        &env,
        "app",
        &[
            ("packed.bin", &packed),
            ("loose.bin", &loose),
            ("small", b"s\n"),
        ],
    );
    add_remote(&env, "r", "s3://big", &s3.endpoint);
    env.ok(&["push", "r", "app"]);
    let other = Env::new();
    add_remote(&other, "r", "s3://big", &s3.endpoint);
    other.ok(&["status"]);
    let before = objects(&other.store);
    let object = s3
        .keys("big", "objects/")
        .pop()
        .expect("the 9 MiB blob is stored alone");
    let staged_files = |store: &Path| fs::read_dir(store.join("tmp")).unwrap().count();
    let good = other.path("good");
    fs::write(&good, &loose).unwrap();
    for (how, change, want) in [
        ("flipped", "b = bytearray(b); b[-1] ^= 1", "hash to"),
        ("cut", "b = b[:len(b) // 2]", "truncated"),
    ] {
        s3.boto(&format!(
            "b = open({good:?}, 'rb').read()\n{change}\ns3.put_object(Bucket='big', Key='{object}', Body=bytes(b))"
        ));
        let said = other.fails(&["pull", "r", "app"]);
        assert!(
            said.contains(&object) && said.contains(want),
            "{how}: {said}"
        );
        assert_eq!(objects(&other.store), before, "{how}: the store changed");
        assert_eq!(staged_files(&other.store), 0, "{how}: a staged file stayed");
    }
    s3.boto(&format!(
        "s3.put_object(Bucket='big', Key='{object}', Body=open({good:?}, 'rb').read())"
    ));
    other.ok(&["pull", "r", "app"]);
    assert_eq!(other.run(&["cat", "app", "packed.bin"]).stdout, packed);
    let copy = other.path("copy");
    other.ok(&["checkout", "app", copy.to_str().unwrap(), "--mode", "copy"]);
    assert_eq!(fs::read(copy.join("packed.bin")).unwrap(), packed);
    assert_eq!(fs::read(copy.join("loose.bin")).unwrap(), loose);
    other.fsck_ok();
    // Read lazily through a mount: streamed the same way, one blob at a time.
    if !common::fuse_available() {
        return;
    }
    let third = Env::new();
    add_remote(&third, "r", "s3://big", &s3.endpoint);
    let at = third.path("mnt");
    fs::create_dir_all(&at).unwrap();
    let mounted = common::mount_with(&third, "app", &at, &["--remote", "r"]);
    assert_eq!(fs::read(at.join("loose.bin")).unwrap(), loose);
    assert_eq!(fs::read(at.join("packed.bin")).unwrap(), packed);
    drop(mounted);
    assert_eq!(staged_files(&third.store), 0);
    third.fsck_ok();
}

/// A blob that takes longer to come than a reader waits (a slow link): the reader gets
/// EIO when its wait ends, the fetch goes on, and a later read has the file. Before, the
/// reader's wait bounded the fetch, so such a file could never be read lazily.
#[test]
fn a_fetch_slower_than_a_readers_wait_goes_on_for_the_next_read() {
    let Some(s3) = S3::start() else { return };
    if !common::fuse_available() {
        return;
    }
    s3.bucket("slow");
    let env = Env::new();
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    common::ingest_files(&env, "app", &[("big", &big)]);
    add_remote(&env, "r", "s3://slow", &s3.endpoint);
    env.ok(&["push", "r", "app"]);
    // A proxy that holds every ranged read (a pack's object) for 4 s.
    let (proxy, slow) = Proxy::start(
        &s3,
        r#"
        if self.headers.get("Range"):
            time.sleep(4)
"#,
    );
    let other = Env::new();
    add_remote(&other, "r", "s3://slow", &slow);
    let at = other.path("mnt");
    std::env::set_var("VRIFT_FETCH_WAIT", "1");
    let mounted = common::mount_with(&other, "app", &at, &["--remote", "r"]);
    let started = Instant::now();
    let err = fs::read(at.join("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the reader waited for the fetch"
    );
    // The fetch went on: within a few seconds the file reads whole.
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        match fs::read(at.join("big")) {
            Ok(bytes) => break bytes,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("never fetched: {e}"),
        }
    };
    assert_eq!(got, big);
    drop(mounted);
    drop(proxy);
    other.fsck_ok();
}
