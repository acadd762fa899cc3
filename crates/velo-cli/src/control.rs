//! The control endpoint of a `velo mount` server: how `velo commit` and `velo umount`
//! ask a running server to seal its state.
//!
//! A Unix socket in the abstract namespace named after the mount point (no file to leave
//! behind when the server is killed, no path-length limit). Messages are single JSON
//! lines of at most [`MAX_LINE`] bytes carrying `"v": 1`. Both ends check who is on the
//! other side: the server answers only its own user (or root), and a client talks only
//! to a server of its own user (or root), so no one can squat the name to take commits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The longest message either side accepts.
const MAX_LINE: u64 = 64 * 1024;
/// The protocol version.
const VERSION: u64 = 1;

fn address(mountpoint: &Path) -> Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let key = velo_core::Hash::of_blob(mountpoint.as_os_str().as_bytes()).to_hex();
    Ok(SocketAddr::from_abstract_name(format!(
        "velo-mount-{}",
        &key[..32]
    ))?)
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    rustix::net::sockopt::socket_peercred(stream)
        .ok()
        .map(|cred| cred.uid.as_raw())
}

fn trusted(uid: Option<u32>) -> bool {
    let me = rustix::process::geteuid().as_raw();
    uid.is_some_and(|uid| uid == me || uid == 0)
}

fn read_line(stream: &mut impl Read) -> std::io::Result<Option<Value>> {
    let mut line = String::new();
    let n = BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn write_line(stream: &mut impl Write, value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// What a server knows about itself.
pub struct ServerInfo {
    pub store: PathBuf,
    pub root: String,
    pub upper: Option<PathBuf>,
    pub temporary: bool,
    pub name: Option<String>,
    /// The kernel reads tree files straight from their blobs.
    pub passthrough: bool,
}

/// What the server does for a request (implemented by the mount's server).
pub trait Server: Send + Sync + 'static {
    fn info(&self) -> ServerInfo;
    /// Whether the upper holds any change.
    fn changed(&self) -> bool;
    /// Seals the current state: the new root and the files whose set-id bits were
    /// dropped.
    fn commit(&self) -> Result<velo_project::commit::CommitReport>;
}

/// A commit asked for when the server stops (`velo umount --commit`): the connection to
/// answer on.
#[derive(Default)]
pub struct AtExit(Mutex<Option<UnixStream>>);

impl AtExit {
    /// The waiting client's connection, if one still waits.
    pub fn take(&self) -> Option<UnixStream> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Starts answering requests for the mount at `mountpoint` on a thread.
pub fn listen(mountpoint: &Path, server: Arc<dyn Server>, at_exit: Arc<AtExit>) -> Result<()> {
    let listener = UnixListener::bind_addr(&address(mountpoint)?).with_context(|| {
        format!(
            "another velo server already answers for {}",
            mountpoint.display()
        )
    })?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (server, at_exit) = (server.clone(), at_exit.clone());
            std::thread::spawn(move || serve_client(stream, &*server, &at_exit));
        }
    });
    Ok(())
}

fn error_reply(message: impl std::fmt::Display) -> Value {
    json!({ "v": VERSION, "ok": false, "error": message.to_string() })
}

fn serve_client(mut stream: UnixStream, server: &dyn Server, at_exit: &AtExit) {
    if !trusted(peer_uid(&stream)) {
        let _ = write_line(
            &mut stream,
            &error_reply("refused: only the user who mounted (or root) may control the mount"),
        );
        return;
    }
    loop {
        let request = match read_line(&mut stream) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                let _ = write_line(&mut stream, &error_reply(format!("bad request: {e}")));
                return;
            }
        };
        if request.get("v").and_then(Value::as_u64) != Some(VERSION) {
            let _ = write_line(
                &mut stream,
                &error_reply("unsupported protocol version (velo and the server differ: remount)"),
            );
            return;
        }
        let reply = match request.get("op").and_then(Value::as_str) {
            Some("info") => {
                let info = server.info();
                json!({
                    "v": VERSION, "ok": true,
                    "store": info.store, "root": info.root, "upper": info.upper,
                    "temporary": info.temporary, "name": info.name,
                    "passthrough": info.passthrough,
                    "changed": server.changed(),
                })
            }
            Some("commit") => match server.commit() {
                Ok(report) => json!({
                    "v": VERSION, "ok": true, "root": report.root.to_hex(),
                    "setid_dropped": report.setid_dropped,
                }),
                Err(e) => error_reply(format!("{e:#}")),
            },
            Some("commit_at_exit") => {
                let Ok(waiting) = stream.try_clone() else {
                    return;
                };
                *at_exit.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(waiting);
                if write_line(&mut stream, &json!({ "v": VERSION, "ok": true })).is_err() {
                    at_exit.take();
                    return;
                }
                // The client unmounts now; if it gives up (closes, or says cancel), the
                // commit is off.
                let _ = read_line(&mut stream);
                at_exit.take();
                return;
            }
            _ => error_reply("unknown request"),
        };
        if write_line(&mut stream, &reply).is_err() {
            return;
        }
    }
}

/// Answers the client that asked for a commit at exit.
pub fn answer_at_exit(mut stream: UnixStream, result: Result<velo_project::commit::CommitReport>) {
    let reply = match result {
        Ok(report) => json!({
            "v": VERSION, "ok": true, "root": report.root.to_hex(),
            "setid_dropped": report.setid_dropped,
        }),
        Err(e) => error_reply(format!("{e:#}")),
    };
    let _ = write_line(&mut stream, &reply);
}

/// A connection to the server of the mount at `mountpoint`.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(mountpoint: &Path) -> Result<Client> {
        let stream = UnixStream::connect_addr(&address(mountpoint)?).with_context(|| {
            format!(
                "no velo server answers for {} (not a velo mount, or its server died: `velo umount {}`)",
                mountpoint.display(),
                mountpoint.display()
            )
        })?;
        if !trusted(peer_uid(&stream)) {
            bail!(
                "the server answering for {} belongs to another user; not talking to it",
                mountpoint.display()
            );
        }
        Ok(Client { stream })
    }

    /// Sends `op` and returns the reply (an `ok: false` reply is an error).
    pub fn request(&mut self, op: &str) -> Result<Value> {
        write_line(&mut self.stream, &json!({ "v": VERSION, "op": op }))
            .context("talking to the mount's server")?;
        self.reply()
    }

    /// The next reply.
    pub fn reply(&mut self) -> Result<Value> {
        let reply = read_line(&mut self.stream)
            .context("reading the mount server's reply")?
            .context("the mount's server closed the connection without answering")?;
        if reply.get("ok").and_then(Value::as_bool) != Some(true) {
            bail!(
                "{}",
                reply
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the mount's server refused")
            );
        }
        Ok(reply)
    }
}

/// The report in a commit reply.
pub fn report_of(reply: &Value) -> Result<velo_project::commit::CommitReport> {
    let root = reply
        .get("root")
        .and_then(Value::as_str)
        .context("the server's reply names no root")?;
    Ok(velo_project::commit::CommitReport {
        root: root
            .parse::<velo_core::Hash>()
            .map_err(|e| anyhow::anyhow!("the server's reply names a bad root: {e}"))?,
        setid_dropped: reply
            .get("setid_dropped")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default(),
    })
}
