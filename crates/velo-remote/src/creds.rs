//! AWS credentials and region, as the AWS tools find them: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_DEFAULT_REGION`), else the shared files (`~/.aws/credentials` and
//! `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`) under profile
//! `AWS_PROFILE` (default `default`). Secrets are never printed or logged.

use std::path::PathBuf;

use crate::{RemoteError, Result};

pub(crate) struct Credentials {
    pub(crate) key_id: String,
    pub(crate) secret: String,
    pub(crate) token: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn profile() -> String {
    env("AWS_PROFILE").unwrap_or_else(|| "default".to_string())
}

fn aws_file(variable: &str, name: &str) -> Option<PathBuf> {
    env(variable)
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".aws").join(name)))
}

/// The `key = value` pairs of section `section` of an INI file.
fn section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

fn lookup(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

pub(crate) fn credentials() -> Result<Credentials> {
    let (key_id, secret) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"));
    if let (Some(key_id), Some(secret)) = (&key_id, &secret) {
        return Ok(Credentials {
            key_id: key_id.clone(),
            secret: secret.clone(),
            token: env("AWS_SESSION_TOKEN"),
        });
    }
    // What the environment lacks, for the message if the file does not do either.
    let half = match (key_id, secret) {
        (Some(_), None) => "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; ",
        (None, Some(_)) => "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; ",
        _ => "",
    };
    let none = |why: String| RemoteError::NoCredentials(format!("{half}{why}"));
    let Some(path) = aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials") else {
        return Err(none(
            "neither AWS_SHARED_CREDENTIALS_FILE nor HOME is set".to_string(),
        ));
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(none(format!("there is no {}", path.display())))
        }
        Err(e) => return Err(none(format!("{} cannot be read: {e}", path.display()))),
    };
    let profile = profile();
    let pairs = section(&text, &profile);
    let from = if env("AWS_PROFILE").is_some() {
        "AWS_PROFILE"
    } else {
        "the default"
    };
    match (
        lookup(&pairs, "aws_access_key_id"),
        lookup(&pairs, "aws_secret_access_key"),
    ) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: lookup(&pairs, "aws_session_token"),
        }),
        _ if !has_section(&text, &profile) => Err(none(format!(
            "{} has no profile [{profile}] ({from})",
            path.display()
        ))),
        _ => Err(none(format!(
            "profile [{profile}] of {} lacks aws_access_key_id or aws_secret_access_key",
            path.display()
        ))),
    }
}

/// Whether an INI file has section `section`.
fn has_section(text: &str, section: &str) -> bool {
    text.lines().any(|line| {
        line.trim()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .is_some_and(|name| name.trim() == section)
    })
}

pub(crate) fn region() -> Option<String> {
    env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| {
            let text = std::fs::read_to_string(aws_file("AWS_CONFIG_FILE", "config")?).ok()?;
            let name = profile();
            let section_name = if name == "default" {
                name
            } else {
                format!("profile {name}")
            };
            lookup(&section(&text, &section_name), "region")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_are_read() {
        let text = "# c\n[default]\naws_access_key_id = A\n[other]\naws_access_key_id=B\n aws_secret_access_key = S \n";
        assert_eq!(
            lookup(&section(text, "default"), "aws_access_key_id").as_deref(),
            Some("A")
        );
        assert_eq!(
            lookup(&section(text, "other"), "aws_secret_access_key").as_deref(),
            Some("S")
        );
        assert_eq!(
            lookup(&section(text, "default"), "aws_secret_access_key"),
            None
        );
        assert!(has_section(text, "other") && !has_section(text, "ci"));
    }
}
