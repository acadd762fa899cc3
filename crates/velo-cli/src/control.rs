//! The control endpoint of a `velo mount` server: how `velo commit` and `velo umount`
//! ask a running server to seal its state.
//!
//! A Unix socket in the abstract namespace (no file to leave behind when the server is
//! killed, no path-length limit) with a random name, which the server gives its mount as
//! its source (`velo-<name>` in /proc/self/mountinfo): a client finds it from the mount
//! point, and no one can take the name before the server does. Messages are single JSON
//! lines of at most [`MAX_LINE`] bytes carrying `"v": 1`, one connection reading its
//! requests in order. Both ends check who is on the other side: the server answers only
//! its own user (or root), and a client talks only to a server of its own user (or
//! root). At most [`MAX_CLIENTS`] connections at once; an idle one is closed after
//! [`IDLE`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The longest message either side accepts.
const MAX_LINE: u64 = velo_control::MAX_LINE as u64;
/// The protocol version.
const VERSION: u64 = velo_control::VERSION;

/// The longest a connection may wait between requests.
const IDLE: std::time::Duration = std::time::Duration::from_secs(120);
/// Connections served at once.
const MAX_CLIENTS: usize = 64;
/// The reply to a connection beyond [`MAX_CLIENTS`].
pub(crate) const BUSY: &str = "too many connections; try again";

fn address(name: &str) -> Result<SocketAddr> {
    Ok(SocketAddr::from_abstract_name(format!(
        "velo-mount-{name}"
    ))?)
}

/// A fresh socket name for a server (and its mount's source `velo-<name>`).
pub fn new_name() -> String {
    let mut seed = [0u8; 16];
    if rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty()).is_err() {
        // Never reached on Linux 3.17+; the time and pid still make squatting a guess.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        seed[..16].copy_from_slice(&(now ^ u128::from(std::process::id())).to_le_bytes());
    }
    velo_core::Hash::of_blob(&seed).to_hex()[..32].to_string()
}

/// The socket name of the velo server mounted at `mountpoint`, from its source name.
fn name_of_mount(mountpoint: &Path) -> Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let info = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    // Fields: id parent dev root mountpoint options ... - fstype source superopts; the
    // mount point's spaces and backslashes are written as octal escapes.
    let want: Vec<u8> = mountpoint
        .as_os_str()
        .as_bytes()
        .iter()
        .flat_map(|&b| match b {
            b' ' | b'\t' | b'\n' | b'\\' => format!("\\{b:03o}").into_bytes(),
            _ => vec![b],
        })
        .collect();
    let mut found = None;
    for line in info.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if fields.get(4) == Some(&want.as_slice()) {
            // The last mount there is the one that shows.
            found = fields.get(dash + 2).map(|s| s.to_vec());
        }
    }
    let source = found.with_context(|| format!("{} is not a mount point", mountpoint.display()))?;
    match source.strip_prefix(b"velo-") {
        Some(name) if !name.is_empty() && name.iter().all(u8::is_ascii_hexdigit) => {
            Ok(String::from_utf8_lossy(name).into_owned())
        }
        _ => bail!("{} is not a velo mount", mountpoint.display()),
    }
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

/// One line, end of line included, of at most [`MAX_LINE`] bytes.
fn read_raw_line(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    read_line_of_at_most(reader, MAX_LINE, "a message longer than 64 KiB")
}

/// The longest reply a client reads: replies list paths (a commit's set-id files, say),
/// so they may be far longer than a request; they come from a server of the caller's own
/// user.
const MAX_REPLY: u64 = 1 << 30;

/// One line, end of line included, of at most `limit` bytes (`too_long` says so).
fn read_line_of_at_most(
    reader: &mut impl BufRead,
    limit: u64,
    too_long: &'static str,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = reader.take(limit + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        let why = if n as u64 > limit {
            too_long
        } else {
            "a message without its end of line"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    Ok(Some(line))
}

/// A reply: one JSON line of any length up to [`MAX_REPLY`].
fn read_line(reader: &mut impl BufRead) -> std::io::Result<Option<Value>> {
    let Some(line) = read_line_of_at_most(reader, MAX_REPLY, "a reply longer than 1 GiB")? else {
        return Ok(None);
    };
    serde_json::from_slice(&line)
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
    /// The workspace directory, for a workspace's server.
    pub workspace: Option<PathBuf>,
}

/// What the server does for a request (implemented by the mount's server).
pub trait Server: Send + Sync + 'static {
    fn info(&self) -> ServerInfo;
    /// Whether the upper holds any change.
    fn changed(&self) -> bool;
    /// Seals the current state: the new root and the files whose set-id bits were
    /// dropped.
    fn commit(&self) -> Result<velo_project::commit::CommitReport>;
    /// Whether the mount still serves (a client that goes away before it is unmounted
    /// takes its commit-at-unmount back; after, the commit goes on without it).
    fn mounted(&self) -> bool;
    /// Answers a request this module does not answer itself (`None`: the server does not
    /// serve it): the workspace's branch and snapshot requests. `Ok` values are sent with
    /// `ok: true`.
    fn answer(&self, _request: &velo_control::Request) -> Option<Result<Value>> {
        None
    }
}

/// A commit asked for when the server stops (`velo umount --commit/--name`): where to
/// write it, under which name, and the connection to answer on.
pub struct Pending {
    pub stream: UnixStream,
    pub name: Option<String>,
    pub out: Option<PathBuf>,
}

/// The one commit-at-unmount a server may be asked for.
#[derive(Default)]
pub struct AtExit(Mutex<Option<Pending>>);

impl AtExit {
    /// The commit asked for, if one still is.
    pub fn take(&self) -> Option<Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Starts answering requests, on socket `name` (see [`new_name`]), on a thread.
pub fn listen(name: &str, server: Arc<dyn Server>, at_exit: Arc<AtExit>) -> Result<()> {
    let listener =
        UnixListener::bind_addr(&address(name)?).context("binding the mount's control socket")?;
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::sync::atomic::Ordering::SeqCst;
            if clients.fetch_add(1, SeqCst) >= MAX_CLIENTS {
                clients.fetch_sub(1, SeqCst);
                let mut stream = stream;
                let _ = write_line(&mut stream, &error_reply(BUSY));
                continue;
            }
            let (server, at_exit, clients) = (server.clone(), at_exit.clone(), clients.clone());
            std::thread::spawn(move || {
                serve_client(stream, &*server, &at_exit);
                clients.fetch_sub(1, SeqCst);
            });
        }
    });
    Ok(())
}

/// Ends a connection whose request was refused unread: closing with bytes still
/// unread would reset it (ECONNRESET) before the client read the error, so the rest is
/// read first, within bounds (a client that keeps sending is cut off after them).
fn hang_up(stream: &UnixStream, reader: &mut impl Read) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = std::io::copy(&mut reader.take(16 << 20), &mut std::io::sink());
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
    let _ = stream.set_read_timeout(Some(IDLE));
    let Ok(reading) = stream.try_clone() else {
        return;
    };
    // One reader for the connection: requests sent together are answered in order.
    let mut reader = BufReader::new(reading);
    loop {
        let line = match read_raw_line(&mut reader) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                let _ = write_line(&mut stream, &error_reply(format!("bad request: {e}")));
                hang_up(&stream, &mut reader);
                return;
            }
        };
        let request = match velo_control::decode(&line) {
            Ok(request) => request,
            Err(e @ velo_control::DecodeError::Version) => {
                let _ = write_line(&mut stream, &error_reply(e));
                return;
            }
            Err(e) => {
                // A bad request gets its error; the connection goes on.
                if write_line(&mut stream, &error_reply(format!("bad request: {e}"))).is_err() {
                    return;
                }
                continue;
            }
        };
        let reply = match &request {
            velo_control::Request::Info => {
                let info = server.info();
                json!({
                    "v": VERSION, "ok": true,
                    "store": info.store.to_string_lossy(), "root": info.root,
                    "upper": info.upper.as_ref().map(|u| u.to_string_lossy()),
                    "temporary": info.temporary, "name": info.name,
                    "passthrough": info.passthrough,
                    "workspace": info.workspace.as_ref().map(|w| w.to_string_lossy()),
                    "changed": server.changed(),
                })
            }
            velo_control::Request::Commit => match server.commit() {
                Ok(report) => json!({
                    "v": VERSION, "ok": true, "root": report.root.to_hex(),
                    "setid_dropped": report
                        .setid_dropped
                        .iter()
                        .map(|p| p.to_string_lossy())
                        .collect::<Vec<_>>(),
                    "not_committed": report
                        .not_committed
                        .iter()
                        .map(|p| p.to_string_lossy())
                        .collect::<Vec<_>>(),
                }),
                Err(e) => error_reply(format!("{e:#}")),
            },
            velo_control::Request::CommitAtExit { .. } if server.info().workspace.is_some() => {
                error_reply(
                    "a workspace keeps each branch's changes in its own upper: `velo snapshot create` seals one; unmount without --commit",
                )
            }
            velo_control::Request::CommitAtExit { name, out } => {
                let Ok(waiting) = stream.try_clone() else {
                    return;
                };
                {
                    let mut slot = at_exit.0.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.is_some() {
                        drop(slot);
                        let _ = write_line(
                            &mut stream,
                            &error_reply("another velo umount is committing this mount"),
                        );
                        continue;
                    }
                    *slot = Some(Pending {
                        stream: waiting,
                        name: name.clone(),
                        out: out.clone(),
                    });
                }
                if write_line(&mut stream, &json!({ "v": VERSION, "ok": true })).is_err() {
                    at_exit.take();
                    return;
                }
                // The client unmounts now. If it goes away while the mount still serves
                // (its unmount failed), the commit is off; once unmounted, the server
                // commits and registers it whether the client waits or not.
                let _ = stream.set_read_timeout(None);
                let _ = read_raw_line(&mut reader);
                if server.mounted() {
                    at_exit.take();
                }
                return;
            }
            other => match server.answer(other) {
                Some(Ok(mut value)) => {
                    if let Some(map) = value.as_object_mut() {
                        map.insert("v".into(), json!(VERSION));
                        map.insert("ok".into(), json!(true));
                    }
                    value
                }
                Some(Err(e)) => error_reply(format!("{e:#}")),
                None => error_reply("this server does not serve that request"),
            },
        };
        if write_line(&mut stream, &reply).is_err() {
            return;
        }
    }
}

/// Answers the client that asked for a commit at exit (if it still listens).
pub fn answer_at_exit(mut stream: UnixStream, reply: Result<Value>) {
    let reply = match reply {
        Ok(mut value) => {
            if let Some(map) = value.as_object_mut() {
                map.insert("v".into(), json!(VERSION));
                map.insert("ok".into(), json!(true));
            }
            value
        }
        Err(e) => error_reply(format!("{e:#}")),
    };
    let _ = write_line(&mut stream, &reply);
}

/// A connection to the server of the mount at `mountpoint`.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(mountpoint: &Path) -> Result<Client> {
        let name = name_of_mount(mountpoint)?;
        let stream = UnixStream::connect_addr(&address(&name)?).with_context(|| {
            format!(
                "no velo server answers for {} (its server died: `velo umount {}`)",
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
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    /// Sends `request` and returns the reply (an `ok: false` reply is an error).
    pub fn ask(&mut self, request: &velo_control::Request) -> Result<Value> {
        let mut line = velo_control::encode(request);
        line.push(b'\n');
        if let Err(e) = self.stream.write_all(&line) {
            // A server that turned the connection away (busy) answered first, then
            // closed: its answer says why.
            if let Ok(Some(reply)) = read_line(&mut self.reader) {
                if let Some(why) = reply.get("error").and_then(Value::as_str) {
                    bail!("{why}");
                }
            }
            return Err(e).context("talking to the mount's server");
        }
        self.reply()
    }

    /// Waits up to `limit` for the server to close the connection (it exits).
    pub fn wait_closed(&mut self, limit: std::time::Duration) {
        let _ = self.reader.get_ref().set_read_timeout(Some(limit));
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
    }

    /// The next reply.
    pub fn reply(&mut self) -> Result<Value> {
        let reply = read_line(&mut self.reader)
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

/// The strings of array `key` of a reply.
pub fn strings(reply: &Value, key: &str) -> Vec<String> {
    reply
        .get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
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
        setid_dropped: strings(reply, "setid_dropped")
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        not_committed: strings(reply, "not_committed")
            .into_iter()
            .map(PathBuf::from)
            .collect(),
    })
}
