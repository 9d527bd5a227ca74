//! AWS shared-credentials files (INI: `[profile]` sections of `aws_access_key_id` and
//! `aws_secret_access_key`), and how a client finds its key: the standard AWS variables, a
//! named profile, or the daemon's own `<data-dir>/credentials`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{write_private, Credentials};

/// Reads profile `profile` of the credentials file at `path` (None: no such file or
/// profile).
pub fn read_profile(path: &Path, profile: &str) -> io::Result<Option<Credentials>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(parse_profile(&text, profile))
}

/// Profile `profile` of a credentials file's text.
pub fn parse_profile(text: &str, profile: &str) -> Option<Credentials> {
    let mut current = None::<String>;
    let (mut id, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            current = Some(
                name.strip_prefix("profile ")
                    .unwrap_or(name)
                    .trim()
                    .to_owned(),
            );
            continue;
        }
        if current.as_deref() != Some(profile) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
    })
}

/// Writes a credentials file holding one profile (mode 0600).
pub fn write_credentials(path: &Path, profile: &str, creds: &Credentials) -> io::Result<()> {
    let text = format!(
        "# Spore access key (written by the daemon; keep it private)\n[{profile}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        creds.access_key_id, creds.secret_access_key
    );
    write_private(path, text.as_bytes())
}

/// Where a client's key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    Environment,
    /// A profile of a credentials file.
    Profile {
        /// The file.
        file: PathBuf,
        /// The profile.
        profile: String,
    },
}

/// Why a client has no key.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A named profile is not in the credentials file.
    #[error("profile {profile:?} is not in {}", file.display())]
    NoProfile {
        /// The file.
        file: PathBuf,
        /// The profile.
        profile: String,
    },
    /// The credentials file could not be read.
    #[error("reading {}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Finds a client's key: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`; else `profile` (or
/// `AWS_PROFILE`) in `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`); else the
/// `default` profile of `<data_dir>/credentials` when this user can read it. `Ok(None)`: no
/// key anywhere (requests go unsigned, and a daemon with authentication refuses them).
pub fn resolve(
    profile: Option<&str>,
    data_dir: Option<&Path>,
) -> Result<Option<(Credentials, Source)>, CredentialsError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        if profile.is_none() {
            let c = Credentials {
                access_key_id: id,
                secret_access_key: secret,
            };
            return Ok(Some((c, Source::Environment)));
        }
    }
    let named = profile.map(str::to_owned).or_else(|| env("AWS_PROFILE"));
    if let Some(profile) = named {
        let file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".aws").join("credentials")))
            .unwrap_or_else(|| PathBuf::from(".aws/credentials"));
        let found = read_profile(&file, &profile).map_err(|source| CredentialsError::Read {
            file: file.clone(),
            source,
        })?;
        return match found {
            Some(c) => Ok(Some((c, Source::Profile { file, profile }))),
            None => Err(CredentialsError::NoProfile { file, profile }),
        };
    }
    if let Some(dir) = data_dir {
        let file = dir.join("credentials");
        // Unreadable (another user's daemon): no key, not an error.
        if let Ok(Some(c)) = read_profile(&file, "default") {
            let source = Source::Profile {
                file,
                profile: "default".into(),
            };
            return Ok(Some((c, source)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_as_the_aws_cli_writes_them() {
        let text = "[default]\naws_access_key_id = A1\naws_secret_access_key = S1\n\n[profile spore]\n# c\naws_access_key_id=A2\naws_secret_access_key=S2\nregion = x\n[half]\naws_access_key_id = A3\n";
        assert_eq!(parse_profile(text, "default").unwrap().access_key_id, "A1");
        let s = parse_profile(text, "spore").unwrap();
        assert_eq!(
            (s.access_key_id.as_str(), s.secret_access_key.as_str()),
            ("A2", "S2")
        );
        assert!(parse_profile(text, "half").is_none());
        assert!(parse_profile(text, "nope").is_none());
    }

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("credentials");
        let c = Credentials::generate();
        write_credentials(&p, "default", &c).unwrap();
        assert_eq!(read_profile(&p, "default").unwrap(), Some(c));
        assert_eq!(
            read_profile(&dir.path().join("none"), "default").unwrap(),
            None
        );
    }
}
