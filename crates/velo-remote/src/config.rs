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
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| alnum(&b) || b == b'-' || b == b'.')
            && bucket.as_bytes().first().is_some_and(alnum)
            && bucket.as_bytes().last().is_some_and(alnum)
            && !bucket.contains("..");
        if !bucket_ok {
            return Err(RemoteError::Config(format!(
                "{url}: {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.', beginning and ending with a letter or digit, no '..')"
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
            check_endpoint(endpoint, "--endpoint")?;
        }
        if let Some(region) = &region {
            check_region(region, "--region")?;
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

/// Checks an endpoint (`whence` names where it came from): an http:// or https://
/// address of a host, with a port and a path if need be. The S3 client panics on an
/// address it cannot parse (`http://`, a port past 65535, a space), so whatever it could
/// not parse is refused here; so is a user name or password, which would sit in the
/// remote's record and show in `velo remote list`.
pub(crate) fn check_endpoint(endpoint: &str, whence: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(RemoteError::Config(format!(
            "{whence} {endpoint:?}: {why} (give an address such as http://127.0.0.1:9000 or https://s3.example.com)"
        )))
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return bad("not an http:// or https:// address");
    }
    if !endpoint
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~:/[]%".contains(c))
    {
        return bad("an address holds only letters, digits and - . _ ~ : / [ ] %, and no user, password, query or fragment");
    }
    match reqwest::Url::parse(endpoint) {
        Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        Ok(_) => bad("no host"),
        Err(e) => bad(&e.to_string()),
    }
}

/// Checks a region (`whence` names where it came from): it becomes part of a host name
/// (`s3.REGION.amazonaws.com`), where a space or a `/` made the S3 client panic or go to
/// another host.
pub(crate) fn check_region(region: &str, whence: &str) -> Result<()> {
    let ok = (1..=64).contains(&region.len())
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !region.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(RemoteError::Config(format!(
            "{whence} {region:?}: not a region (1 to 64 of letters, digits, '-' and '_', such as eu-west-1)"
        )))
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
    move |cause| RemoteError::Io { what, path, cause }
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
    // Checked again: the file may have been edited, or written by a velo that checked
    // less; the error names the record and how to mend it.
    RemoteConfig::new(name, &config.url(), config.endpoint, config.region).map_err(|e| {
        RemoteError::Config(format!(
            "remote {name} ({}): {e}; `velo remote remove {name}` and add it again",
            path.display()
        ))
    })
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
            ("s3://-bkt/p", "bucket name"),
            ("s3://bkt-/p", "bucket name"),
            ("s3://bkt..x/p", "bucket name"),
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
        // Addresses the S3 client could not parse (it panicked on each at the first
        // request), and regions that are no part of a host name.
        for endpoint in [
            "http://",
            "http://[::1",
            "http://127.0.0.1:99999",
            "http:// x",
            "http://h/a b",
            "http://user:pw@h:9000",
            "http://h:9000/?x=1",
            "https://h\u{e9}",
        ] {
            let e = RemoteConfig::new("r", "s3://bkt", Some(endpoint.into()), None);
            assert!(e.is_err(), "{endpoint}");
        }
        for endpoint in [
            "http://127.0.0.1:9000",
            "https://s3.example.com/base",
            "http://[::1]:9000",
        ] {
            RemoteConfig::new("r", "s3://bkt", Some(endpoint.into()), None).unwrap();
        }
        for region in ["a b", "\u{fc}", "us-east-1/x", "", "-x"] {
            let e = RemoteConfig::new("r", "s3://bkt", None, Some(region.into()));
            assert!(e.is_err(), "{region:?}");
        }
        RemoteConfig::new("r", "s3://bkt", None, Some("eu-west-1".into())).unwrap();
        assert!(RemoteConfig::new("../x", "s3://bkt", None, None).is_err());
    }
}
