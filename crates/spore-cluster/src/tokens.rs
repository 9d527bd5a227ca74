//! Join tokens: how a new shim proves it may join the cluster, and how it knows the control
//! plane it joins is the real one.
//!
//! A token reads `spore1.ID.SECRET.FINGERPRINT`: `ID` (8 hex digits) names it (to list and
//! revoke it), `SECRET` is 128 random bits (32 hex digits), and `FINGERPRINT` is the SHA-256
//! of the cluster CA's certificate (64 hex digits). The shim checks the control plane's
//! certificate chain against that fingerprint before it sends the token, so a token is never
//! shown to anyone but the control plane of that CA, whatever address the shim was given or
//! found in etcd.
//!
//! The control plane keeps only the secret's SHA-256, in `<data>/cluster/tokens/ID.json`
//! (0600), with the token's expiry, whether it is single-use, and the unit it is for if it
//! is bound to one. A token serves any number of joins until it expires (or once, if it was
//! made `--once`: the file is removed by the join that uses it).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::pki::{cluster_dir, hex, random, write_file, PkiError};

const PREFIX: &str = "spore1";

/// A join token as `spore cluster token` prints it and `spore shim --join` takes it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Its public name (8 hex digits).
    pub id: String,
    secret: String,
    /// SHA-256 of the cluster CA's certificate.
    pub ca_fingerprint: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &hex(&self.ca_fingerprint))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            self.id,
            self.secret,
            hex(&self.ca_fingerprint)
        )
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A string that is not a join token.
#[derive(Debug, thiserror::Error)]
#[error("not a join token (expected {PREFIX}.ID.SECRET.FINGERPRINT, as `spore cluster token` prints it)")]
pub struct BadToken;

impl std::str::FromStr for JoinToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<JoinToken, BadToken> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [PREFIX, id, secret, fp] = parts[..] else {
            return Err(BadToken);
        };
        if !(is_hex(id, 8) && is_hex(secret, 32) && is_hex(fp, 64)) {
            return Err(BadToken);
        }
        let mut ca_fingerprint = [0u8; 32];
        for (i, b) in ca_fingerprint.iter_mut().enumerate() {
            *b = u8::from_str_radix(&fp[2 * i..2 * i + 2], 16).map_err(|_| BadToken)?;
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_fingerprint,
        })
    }
}

/// What the control plane keeps of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's id.
    pub id: String,
    /// SHA-256 of its secret (hex).
    pub secret_sha256: String,
    /// When it was made (unix seconds).
    pub created: u64,
    /// When it stops working (unix seconds).
    pub expires: u64,
    /// Whether the first join uses it up.
    pub once: bool,
    /// The only unit it may join as, if bound to one.
    #[serde(default)]
    pub unit: Option<u32>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sha256_hex(s: &str) -> String {
    hex(&sha2::Sha256::digest(s.as_bytes()))
}

/// Equality that takes as long whichever byte differs.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The tokens of one control plane (`<data>/cluster/tokens`).
#[derive(Debug, Clone)]
pub struct Tokens {
    dir: PathBuf,
}

impl Tokens {
    /// The token store of the control plane whose data dir is `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Tokens, PkiError> {
        let dir = cluster_dir(data_dir)?.join("tokens");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .map_err(|source| PkiError::Io {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        Ok(Tokens { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Makes a token for the CA of fingerprint `ca_fingerprint`, valid for `ttl`.
    pub fn create(
        &self,
        ca_fingerprint: [u8; 32],
        ttl: Duration,
        once: bool,
        unit: Option<u32>,
    ) -> Result<(JoinToken, TokenRecord), PkiError> {
        self.prune();
        let token = JoinToken {
            id: hex(&random::<4>()),
            secret: hex(&random::<16>()),
            ca_fingerprint,
        };
        let created = now();
        let rec = TokenRecord {
            id: token.id.clone(),
            secret_sha256: sha256_hex(&token.secret),
            created,
            expires: created.saturating_add(ttl.as_secs()),
            once,
            unit,
        };
        let json = serde_json::to_vec_pretty(&rec).expect("records serialize");
        write_file(&self.path(&rec.id), &json, 0o600)?;
        Ok((token, rec))
    }

    /// Every token still valid, oldest first (expired ones are removed).
    pub fn list(&self) -> Result<Vec<TokenRecord>, PkiError> {
        self.prune();
        let mut out: Vec<TokenRecord> = self.records().into_iter().map(|(_, r)| r).collect();
        out.sort_by_key(|r| r.created);
        Ok(out)
    }

    /// Removes token `id`; false if there was none.
    pub fn revoke(&self, id: &str) -> Result<bool, PkiError> {
        if !is_hex(id, 8) {
            return Ok(false);
        }
        let p = self.path(id);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(PkiError::Io {
                what: "removing",
                path: p,
                source,
            }),
        }
    }

    fn records(&self) -> Vec<(PathBuf, TokenRecord)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| {
                let r = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
                Some((p, r))
            })
            .collect()
    }

    fn prune(&self) {
        let t = now();
        for (p, r) in self.records() {
            if r.expires <= t {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Checks `token` for a join as unit `unit` to the CA of fingerprint `ca_fingerprint`;
    /// uses it up if it is single-use. The error is the reason, for the joining shim.
    pub fn redeem(
        &self,
        token: &str,
        unit: u32,
        ca_fingerprint: [u8; 32],
    ) -> Result<TokenRecord, String> {
        let token: JoinToken = token.parse().map_err(|e: BadToken| e.to_string())?;
        if token.ca_fingerprint != ca_fingerprint {
            return Err("the token was made for another cluster CA".into());
        }
        let unknown = || "unknown, revoked or used-up token".to_owned();
        let path = self.path(&token.id);
        let bytes = std::fs::read(&path).map_err(|_| unknown())?;
        let rec: TokenRecord = serde_json::from_slice(&bytes).map_err(|_| unknown())?;
        if !same(&rec.secret_sha256, &sha256_hex(&token.secret)) {
            return Err(unknown());
        }
        if rec.expires <= now() {
            let _ = std::fs::remove_file(&path);
            return Err(format!("token {} has expired", rec.id));
        }
        if let Some(u) = rec.unit.filter(|&u| u != unit) {
            return Err(format!("token {} is for unit {u}, not unit {unit}", rec.id));
        }
        // Whoever removes the file of a single-use token is the one join it serves.
        if rec.once && std::fs::remove_file(&path).is_err() {
            return Err(unknown());
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_print_and_hide_their_secret() {
        let t = JoinToken {
            id: "0123abcd".into(),
            secret: "f".repeat(32),
            ca_fingerprint: [0xab; 32],
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(&"f".repeat(32)));
        for bad in [
            "",
            "spore1.0123abcd",
            &s.replacen("spore1", "spore2", 1),
            &s.replacen("0123abcd", "../../x", 1),
            &format!("{s}.extra"),
            &s.to_uppercase(),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_are_checked_bound_used_up_expired_and_revoked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Tokens::open(tmp.path()).unwrap();
        let fp = [7u8; 32];
        let day = Duration::from_secs(86_400);
        let (many, _) = store.create(fp, day, false, None).unwrap();
        let many = many.to_string();
        assert!(store.redeem(&many, 1, fp).is_ok());
        assert!(store.redeem(&many, 2, fp).is_ok());
        let e = store.redeem(&many, 1, [8u8; 32]).unwrap_err();
        assert!(e.contains("another cluster CA"), "{e}");
        // A wrong secret under a real id.
        let mut forged = many.clone();
        let i = "spore1.01234567.".len();
        forged.replace_range(i..i + 1, if &many[i..=i] == "0" { "1" } else { "0" });
        assert!(store
            .redeem(&forged, 1, fp)
            .unwrap_err()
            .contains("unknown"));

        let (once, _) = store.create(fp, day, true, Some(3)).unwrap();
        let once = once.to_string();
        let e = store.redeem(&once, 4, fp).unwrap_err();
        assert!(e.contains("is for unit 3, not unit 4"), "{e}");
        assert!(store.redeem(&once, 3, fp).is_ok());
        assert!(store.redeem(&once, 3, fp).unwrap_err().contains("used-up"));

        let (old, _) = store.create(fp, Duration::ZERO, false, None).unwrap();
        let e = store.redeem(&old.to_string(), 1, fp).unwrap_err();
        assert!(e.contains("expired"), "{e}");

        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let id = many.split('.').nth(1).unwrap();
        assert!(store.revoke(id).unwrap());
        assert!(!store.revoke(id).unwrap());
        assert!(store.redeem(&many, 1, fp).is_err());
        // The file holds the secret's hash only, 0600.
        let (t, rec) = store.create(fp, day, false, None).unwrap();
        let text = std::fs::read_to_string(store.path(&rec.id)).unwrap();
        assert!(!text.contains(&t.secret));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path(&rec.id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
