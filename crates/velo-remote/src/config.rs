//! The remotes a store knows: `STORE/remotes/NAME.json`, one record each.

use std::path::PathBuf;

use velo_store::Store;

use crate::{RemoteError, Result};

/// A remote: where its objects are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteConfig {
    /// The local name.
    pub name: String,
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside it (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// An endpoint other than AWS's (MinIO, Garage, a test server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region (default: `AWS_REGION`, the AWS config file, else us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

impl RemoteConfig {
    /// Reads `s3://BUCKET[/PREFIX]`.
    pub fn new(
        name: &str,
        url: &str,
        endpoint: Option<String>,
        region: Option<String>,
    ) -> Result<RemoteConfig> {
        velo_store::validate_root_name(name)
            .map_err(|e| RemoteError::Config(format!("remote name: {e}")))?;
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            RemoteError::Config(format!("{url}: not an s3://BUCKET/PREFIX address"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(RemoteError::Config(format!(
                "{url}: {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')"
            )));
        }
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        // S3's "safe" characters only: anything else would be percent-encoded in the
        // keys, which then differ from the prefix policies and other tools name.
        let safe = |c: char| c.is_ascii_alphanumeric() || "!-_.*'()/".contains(c);
        if !prefix.is_empty()
            && (prefix
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
                || !prefix.chars().all(safe))
        {
            return Err(RemoteError::Config(format!(
                "{url}: the prefix may hold letters, digits and ! - _ . * ' ( ) between single '/', and no '.' or '..' part"
            )));
        }
        if let Some(endpoint) = &endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(RemoteError::Config(format!(
                    "--endpoint {endpoint}: not an http:// or https:// address"
                )));
            }
        }
        Ok(RemoteConfig {
            name: name.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint,
            region,
        })
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The key of `rest` under the prefix.
    pub(crate) fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// A short name for this remote's local cache: its endpoint and address.
    pub(crate) fn cache_key(&self) -> String {
        let text = format!("{}\n{}", self.endpoint.as_deref().unwrap_or(""), self.url());
        velo_core::Hash::of_blob(text.as_bytes()).to_hex()[..16].to_string()
    }
}

fn dir(store: &Store) -> PathBuf {
    store.root().join("remotes")
}

fn path(store: &Store, name: &str) -> Result<PathBuf> {
    velo_store::validate_root_name(name)
        .map_err(|e| RemoteError::Config(format!("remote name: {e}")))?;
    Ok(dir(store).join(format!("{name}.json")))
}

fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RemoteError {
    let path = path.display().to_string();
    move |source| RemoteError::Io { what, path, source }
}

/// Records a remote; refuses a name already taken.
pub fn add_remote(store: &Store, config: &RemoteConfig) -> Result<()> {
    let path = path(store, &config.name)?;
    if path.exists() {
        return Err(RemoteError::Config(format!(
            "a remote named {} exists already (`velo remote remove {}` first)",
            config.name, config.name
        )));
    }
    std::fs::create_dir_all(dir(store)).map_err(io("creating", &dir(store)))?;
    let bytes = serde_json::to_vec_pretty(config).expect("a config serialises");
    velo_store::replace_file(
        &path,
        &store.root().join("tmp"),
        &bytes,
        velo_store::Durability::Durable,
    )
    .map_err(io("writing", &path))
}

/// The remote named `name`.
pub fn load_remote(store: &Store, name: &str) -> Result<RemoteConfig> {
    let path = path(store, name)?;
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RemoteError::Config(format!(
                "no remote named {name} (`velo remote list`; `velo remote add {name} s3://BUCKET/PREFIX` makes one)"
            )))
        }
        Err(e) => return Err(io("reading", &path)(e)),
    };
    let config: RemoteConfig = serde_json::from_slice(&bytes).map_err(|e| {
        RemoteError::Config(format!("{}: not a remote record ({e})", path.display()))
    })?;
    // Checked again: the file may have been edited.
    RemoteConfig::new(name, &config.url(), config.endpoint, config.region)
}

/// Every remote, by name.
pub fn list_remotes(store: &Store) -> Result<Vec<RemoteConfig>> {
    let mut out = Vec::new();
    let listing = match std::fs::read_dir(dir(store)) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("listing", &dir(store))(e)),
    };
    for entry in listing.flatten() {
        let file = entry.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
            continue;
        };
        out.push(load_remote(store, name)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Forgets a remote (nothing on the remote is touched).
pub fn remove_remote(store: &Store, name: &str) -> Result<()> {
    let path = path(store, name)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RemoteError::Config(format!(
            "no remote named {name} (`velo remote list`)"
        ))),
        Err(e) => Err(io("removing", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_and_bad_ones_refused() {
        let c = RemoteConfig::new("r", "s3://my-bucket/a/b/", None, None).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(c.key("roots/x"), "a/b/roots/x");
        assert_eq!(c.url(), "s3://my-bucket/a/b");
        let c = RemoteConfig::new("r", "s3://bkt", None, None).unwrap();
        assert_eq!(c.key("roots/x"), "roots/x");
        for (url, why) in [
            ("http://b/p", "not an s3://"),
            ("s3://B/p", "bucket name"),
            ("s3://ab/p", "bucket name"),
            ("s3://bkt/a/../b", "'..'"),
            ("s3://bkt/a//b", "single '/'"),
            ("s3://bkt//b", "single '/'"),
            ("s3://bkt/a~b", "letters, digits"),
            ("s3://bkt/caf\u{e9}", "letters, digits"),
        ] {
            let e = RemoteConfig::new("r", url, None, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        let e = RemoteConfig::new("r", "s3://bkt", Some("ftp://x".into()), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--endpoint"), "{e}");
        assert!(RemoteConfig::new("../x", "s3://bkt", None, None).is_err());
    }
}
