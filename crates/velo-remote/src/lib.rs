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
    /// No credentials were found.
    #[error("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give them in ~/.aws/credentials (profile from AWS_PROFILE, else [default])")]
    NoCredentials,
    /// The object storage refused or failed a request (after retries).
    #[error("{what} {key}: {source}")]
    Request {
        /// What was being done.
        what: &'static str,
        /// The object's key.
        key: String,
        /// Why it failed.
        #[source]
        source: object_store::Error,
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
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, RemoteError>;

/// Requests in flight at once.
const PARALLEL: usize = 8;
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
        let region = config
            .region
            .clone()
            .or_else(creds::region)
            .unwrap_or_else(|| "us-east-1".to_string());
        let endpoint = config.endpoint.clone().or_else(|| {
            std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|e| !e.is_empty())
        });
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
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(300)),
            );
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
                source: e,
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
        use futures::StreamExt;
        let request = |e| RemoteError::Request {
            what: "reading",
            key: key.to_string(),
            source: e,
        };
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
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(request)?;
            if out.len() as u64 + chunk.len() as u64 > cap {
                return Err(RemoteError::Corrupt {
                    key: key.to_string(),
                    why: format!("longer than the {cap} bytes it may be"),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
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
                    tracing::warn!("listing {prefix}: skipped a key that is no path ({source})");
                }
                Ok(Some(Err(e))) => {
                    return Err(RemoteError::Request {
                        what: "listing",
                        key: prefix.to_string(),
                        source: e,
                    })
                }
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
        velo_store::validate_root_name(name)?;
        let key = self.key(&format!("roots/{name}"));
        let Some(bytes) = self
            .runtime
            .block_on(self.read_capped(&key, None, MAX_ROOT_RECORD))?
        else {
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
        let mut out = Vec::new();
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
            match self.root(&name) {
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

/// `roots/<name>` on the remote.
#[derive(serde::Serialize, serde::Deserialize)]
struct PublishedRoot {
    v: u32,
    root: String,
    pushed_unix: u64,
}
