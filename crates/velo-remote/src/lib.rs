//! Remotes: trees shared through S3-compatible object storage (AWS S3, MinIO, Ceph RGW,
//! Garage…), with the local store as the cache.
//!
//! Owns the remote's layout, the remotes' configuration (`STORE/remotes/NAME.json`) and
//! the transfers: [`Remote::push`] uploads what the remote lacks, [`Remote::pull`] fetches
//! and verifies what the store lacks. Calls velo-store (objects, batches, roots) and
//! velo-core (hashes, trees); the CLI owns the commands, the store lock and the
//! registration of pulled roots.
//!
//! Layout under `s3://BUCKET/PREFIX/`, every object named by content so that pushes of
//! the same objects from two machines never conflict:
//! - `packs/<id>.pack` and `packs/<id>.idx`: small objects packed together ([`pack`]);
//!   the index is written after its pack, so an index names only bytes that are there;
//! - `objects/<hash>`: one large blob;
//! - `roots/<name>`: a published root (JSON), written after every object it reaches.
//!
//! The client is the `object_store` crate (retries with backoff on 5xx answers and broken
//! connections, timeouts); credentials come from the AWS environment variables or the
//! AWS shared files, never from a flag, and are never logged.

mod config;
mod creds;
mod index;
pub mod pack;
mod pull;
mod push;

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

pub use config::{add_remote, list_remotes, load_remote, remove_remote, RemoteConfig};
pub use index::{Location, RemoteIndex};
pub use pull::{Blobs, PullReport};
pub use push::PushReport;

/// What went wrong with a remote.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A remote's configuration (or a name for one) is wrong.
    #[error("{0}")]
    Config(String),
    /// No credentials were found; says where velo looked and what it found there.
    #[error("no AWS credentials ({0}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give them in ~/.aws/credentials (profile from AWS_PROFILE, else [default])")]
    NoCredentials(String),
    /// The object storage refused or failed a request (after retries).
    #[error("{what} {key}: {why}")]
    Request {
        /// What was being done.
        what: &'static str,
        /// The object's key.
        key: String,
        /// Why it failed, as [`tidy`] words it (the server's answer, bounded and printable).
        why: String,
    },
    /// An object on the remote is not what its name says.
    #[error("remote object {key}: {why}; nothing of it entered the store")]
    Corrupt {
        /// The object's key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// Something a tree names is not on the remote.
    #[error("{0}")]
    Missing(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] velo_store::StoreError),
    /// A local file failed.
    #[error("{what} {path}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: String,
        /// Why (not a `source`: the message says it already, and would say it twice).
        cause: std::io::Error,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, RemoteError>;

impl RemoteError {
    /// A failed request, its error worded by [`tidy`].
    fn request(what: &'static str, key: &ObjectPath, error: object_store::Error) -> RemoteError {
        let mut why = tidy(&error);
        if why.contains("status code: 30") {
            why.push_str(" (velo follows no redirect: check the remote's --endpoint and --region)");
        }
        RemoteError::Request {
            what,
            key: key.to_string(),
            why,
        }
    }
}

/// The longest a server's words may run in one of velo's messages.
const MAX_QUOTED: usize = 400;

/// An error of the object storage, for a terminal: its chain of causes without the
/// repetitions (object_store's messages repeat their sources'), the server's answer cut
/// to [`MAX_QUOTED`] characters, and control characters (a hostile server's escape
/// sequences, its XML's newlines) shown as spaces.
pub fn tidy(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        // A cause already quoted by the message above it adds nothing.
        if !parts.iter().any(|p| p.contains(text.as_str())) {
            parts.push(text);
        }
        next = e.source();
    }
    // A layer that prefixes its cause's words with its own label ("Generic S3 error:
    // Generic S3 error: ...") says it once.
    let mut words: Vec<&str> = Vec::new();
    for part in parts.iter().flat_map(|p| p.split(": ")) {
        if words.last() != Some(&part) {
            words.push(part);
        }
    }
    let joined = words.join(": ");
    let mut out = String::with_capacity(joined.len().min(MAX_QUOTED + 3));
    let mut last_space = false;
    for c in joined.chars() {
        if out.len() >= MAX_QUOTED {
            out.push('…');
            break;
        }
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        out.push(c);
    }
    out.trim_end().to_string()
}

/// Requests in flight at once.
const PARALLEL: usize = 8;
/// The longest a server may keep velo waiting for an answer, or for the next bytes of one.
const READ_IDLE: Duration = Duration::from_secs(300);
/// A read slower on average than [`MIN_RATE`] bytes a second, after [`SLOW_GRACE`], is
/// given up: a server that trickles (a byte a second) holds velo no longer than that,
/// however long the object it claims.
const MIN_RATE: u64 = 8 << 10;
const SLOW_GRACE: Duration = Duration::from_secs(60);

/// When a read that started at `started` and has `read` bytes must have its next ones.
fn rate_deadline(started: tokio::time::Instant, read: u64) -> tokio::time::Instant {
    started + SLOW_GRACE + Duration::from_secs(read / MIN_RATE)
}
/// The longest a root record may be.
const MAX_ROOT_RECORD: u64 = 64 << 10;
/// The most keys one listing may return, and how long it may take: a remote that pages
/// for ever must not hold velo for ever.
const MAX_LISTED: usize = 4 << 20;
const LIST_TIMEOUT: Duration = Duration::from_secs(300);

/// A connected remote.
pub struct Remote {
    /// Its configuration.
    pub config: RemoteConfig,
    client: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
}

impl Remote {
    /// Connects to the remote `config` describes (no request is made yet).
    pub fn connect(config: RemoteConfig) -> Result<Remote> {
        let creds = creds::credentials()?;
        let region = match config.region.clone() {
            Some(region) => region,
            None => match creds::region() {
                Some(region) => {
                    config::check_region(&region, "AWS_REGION (or the AWS config file's region)")?;
                    region
                }
                None => "us-east-1".to_string(),
            },
        };
        let endpoint = match config.endpoint.clone() {
            Some(endpoint) => Some(endpoint),
            None => match std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|e| !e.is_empty())
            {
                Some(endpoint) => {
                    config::check_endpoint(&endpoint, "AWS_ENDPOINT_URL")?;
                    Some(endpoint)
                }
                None => None,
            },
        };
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(region)
            .with_access_key_id(&creds.key_id)
            .with_secret_access_key(&creds.secret)
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(4),
                    base: 2.0,
                },
                max_retries: 8,
                retry_timeout: Duration::from_secs(120),
            })
            .with_http_connector(NoRedirects {
                allow_http: endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            });
        if let Some(token) = &creds.token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &endpoint {
            // A self-hosted endpoint (MinIO, Garage…) addresses buckets by path.
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let client = builder
            .build()
            .map_err(|e| RemoteError::Config(format!("remote {}: {e}", config.name)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Io {
                what: "starting the I/O runtime for",
                path: config.url(),
                cause: e,
            })?;
        Ok(Remote {
            config,
            client: Arc::new(client),
            runtime,
        })
    }

    /// The key of `rest` under the remote's prefix.
    fn key(&self, rest: &str) -> ObjectPath {
        ObjectPath::from(self.config.key(rest))
    }

    /// Reads `key` (or `range` of it), refusing more than `cap` bytes as they come: sizes
    /// come from the remote, which may lie (object_store's own collecting reserves what a
    /// Content-Length says, and 10^18 aborted velo). `Ok(None)`: no such key.
    async fn read_capped(
        &self,
        key: &ObjectPath,
        range: Option<std::ops::Range<u64>>,
        cap: u64,
    ) -> Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        let found = self
            .read_each(key, range, cap, &mut |chunk| {
                out.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok(found.map(|_| out))
    }

    /// Reads `key` (or `range` of it) a chunk at a time into `each`, refusing more than
    /// `cap` bytes as they come. Returns how many bytes came; `Ok(None)`: no such key.
    async fn read_each(
        &self,
        key: &ObjectPath,
        range: Option<std::ops::Range<u64>>,
        cap: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<Option<u64>> {
        use futures::StreamExt;
        let request = |e| RemoteError::request("reading", key, e);
        let options = object_store::GetOptions {
            range: range.map(object_store::GetRange::Bounded),
            ..object_store::GetOptions::default()
        };
        let got = match self.client.get_opts(key, options).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(request(e)),
        };
        let mut stream = got.into_stream();
        let mut read = 0u64;
        let started = tokio::time::Instant::now();
        loop {
            let next = tokio::time::timeout_at(rate_deadline(started, read), stream.next());
            let chunk = match next.await {
                Ok(Some(chunk)) => chunk.map_err(request)?,
                Ok(None) => break,
                Err(_) => {
                    return Err(RemoteError::Request {
                        what: "reading",
                        key: key.to_string(),
                        why: format!(
                            "{read} bytes in {} s, slower than {} KiB/s: a stalled or trickling server (try again later, or check the remote's --endpoint)",
                            started.elapsed().as_secs(),
                            MIN_RATE >> 10
                        ),
                    })
                }
            };
            read += chunk.len() as u64;
            if read > cap {
                return Err(RemoteError::Corrupt {
                    key: key.to_string(),
                    why: format!("longer than the {cap} bytes it may be"),
                });
            }
            each(&chunk)?;
        }
        Ok(Some(read))
    }

    /// Every key under `prefix`, within bounds: keys that are no valid path (another
    /// tool's) are skipped, a listing that never ends is an error.
    async fn list_keys(&self, prefix: &ObjectPath) -> Result<Vec<object_store::ObjectMeta>> {
        use futures::StreamExt;
        let mut stream = self.client.list(Some(prefix));
        let deadline = tokio::time::Instant::now() + LIST_TIMEOUT;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, stream.next()).await;
            let bounded = |why: String| RemoteError::Corrupt {
                key: prefix.to_string(),
                why,
            };
            match next {
                Err(_) => {
                    return Err(bounded(format!(
                        "its listing did not end within {} s",
                        LIST_TIMEOUT.as_secs()
                    )))
                }
                Ok(None) => return Ok(out),
                Ok(Some(Err(object_store::Error::InvalidPath { source }))) => {
                    tracing::warn!(
                        "listing {prefix}: skipped a key that is no path ({})",
                        tidy(&source)
                    );
                }
                Ok(Some(Err(e))) => return Err(RemoteError::request("listing", prefix, e)),
                Ok(Some(Ok(meta))) => {
                    out.push(meta);
                    if out.len() > MAX_LISTED {
                        return Err(bounded(format!("more than {MAX_LISTED} keys")));
                    }
                }
            }
        }
    }

    /// Reads a published root: its tree. `Ok(None)` if there is no such root.
    pub fn root(&self, name: &str) -> Result<Option<velo_core::Hash>> {
        self.runtime.block_on(self.read_root(name))
    }

    async fn read_root(&self, name: &str) -> Result<Option<velo_core::Hash>> {
        velo_store::validate_root_name(name)?;
        let key = self.key(&format!("roots/{name}"));
        let Some(bytes) = self.read_capped(&key, None, MAX_ROOT_RECORD).await? else {
            return Ok(None);
        };
        let record: PublishedRoot =
            serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
                key: key.to_string(),
                why: format!("not a root record ({e})"),
            })?;
        record
            .root
            .parse()
            .map(Some)
            .map_err(|e| RemoteError::Corrupt {
                key: key.to_string(),
                why: format!("root: {e}"),
            })
    }

    /// The roots published on the remote: (name, tree), by name.
    pub fn roots(&self) -> Result<Vec<(String, String)>> {
        let prefix = self.key("roots/");
        let metas = self.runtime.block_on(self.list_keys(&prefix))?;
        let mut names = Vec::new();
        for meta in metas {
            // Right below roots/ only (another remote's prefix may lie below this one's).
            let below = meta
                .location
                .as_ref()
                .strip_prefix(prefix.as_ref())
                .and_then(|rest| rest.strip_prefix('/'));
            if below.is_none_or(|name| name.contains('/')) {
                continue;
            }
            let Some(name) = meta.location.filename().map(str::to_string) else {
                continue;
            };
            if velo_store::validate_root_name(&name).is_err() {
                continue;
            }
            names.push(name);
        }
        // Read PARALLEL at a time, all within the time a listing may take: a remote of
        // many roots (or a slow one) is not read one request after another for ever.
        use futures::StreamExt;
        let read = futures::stream::iter(names)
            .map(|name| async move {
                let tree = self.read_root(&name).await;
                (name, tree)
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>();
        let records = self
            .runtime
            .block_on(async { tokio::time::timeout(LIST_TIMEOUT, read).await })
            .map_err(|_| RemoteError::Corrupt {
                key: prefix.to_string(),
                why: format!(
                    "its root records were not read within {} s",
                    LIST_TIMEOUT.as_secs()
                ),
            })?;
        let mut out = Vec::new();
        for (name, tree) in records {
            match tree {
                Ok(Some(tree)) => out.push((name, tree.to_hex())),
                Ok(None) => {}
                Err(e @ RemoteError::Corrupt { .. }) => tracing::warn!("{e}"),
                Err(e) => return Err(e),
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The HTTP client of every remote: reqwest, as object_store builds it, except that a
/// redirect is an error rather than followed. reqwest drops `Authorization` when it
/// follows one to another host but keeps `x-amz-security-token`, so a session token
/// would reach whatever host a server (or whoever answers for it) names; S3 itself never
/// redirects a well-addressed request.
#[derive(Debug)]
struct NoRedirects {
    allow_http: bool,
}

impl object_store::client::HttpConnector for NoRedirects {
    fn connect(
        &self,
        _: &object_store::ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("velo/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            // Until the answer starts, and then between two reads of it: never a
            // deadline for a whole transfer (`timeout` was one, so a blob that took more
            // than 300 s to come could never be pulled, however fast it came);
            // read_each bounds a trickle by its average rate instead.
            .read_timeout(READ_IDLE)
            .https_only(!self.allow_http)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(object_store::client::HttpClient::new(client))
    }
}

/// `roots/<name>` on the remote.
#[derive(serde::Serialize, serde::Deserialize)]
struct PublishedRoot {
    v: u32,
    root: String,
    pushed_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::{tidy, RemoteError};

    #[test]
    fn a_read_may_take_long_if_it_keeps_a_minimum_rate() {
        use super::{rate_deadline, MIN_RATE, SLOW_GRACE};
        let t0 = tokio::time::Instant::now();
        // A gigabyte at ten times the minimum rate is never cut off, however long it runs.
        let gib = 1u64 << 30;
        let at = t0 + std::time::Duration::from_secs(gib / (10 * MIN_RATE));
        assert!(rate_deadline(t0, gib / 2) > at);
        // A trickle of a byte a second is, once the grace has passed.
        assert_eq!(rate_deadline(t0, 70), t0 + SLOW_GRACE);
    }

    #[test]
    fn a_local_failure_is_said_once() {
        // Its cause was also its source, so `{:#}` said "No space left on device" twice.
        let e = RemoteError::Io {
            what: "reading",
            path: "/s/x".into(),
            cause: std::io::Error::from_raw_os_error(28),
        };
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(std::error::Error::source(&e).is_none());
    }

    #[derive(Debug)]
    struct Layer(String, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn a_servers_words_are_quoted_once_printable_and_bounded() {
        let body = format!(
            "\x1b[2J\x1b]0;owned\x07<Error>\r\n{}",
            "DENIED ".repeat(1000)
        );
        let inner = Layer(format!("403 Forbidden: {body}"), None);
        let outer = Layer(
            format!("reading p/roots/app: 403 Forbidden: {body}"),
            Some(Box::new(inner)),
        );
        let said = tidy(&outer);
        assert!(!said.contains(|c: char| c.is_control()), "{said:?}");
        assert_eq!(said.matches("403 Forbidden").count(), 1, "{said}");
        assert!(said.chars().count() <= 401, "{}", said.len());
        assert!(said.ends_with('…'));
        // A short cause that adds something is kept.
        let chained = Layer(
            "connecting".into(),
            Some(Box::new(Layer("refused".into(), None))),
        );
        assert_eq!(tidy(&chained), "connecting: refused");
        // A label its cause repeats is said once.
        let doubled = Layer(
            "Generic S3 error: Generic S3 error: Error performing GET".into(),
            None,
        );
        assert_eq!(tidy(&doubled), "Generic S3 error: Error performing GET");
    }
}
