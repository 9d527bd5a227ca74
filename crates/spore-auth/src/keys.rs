//! The daemon's access keys, persisted in `<data-dir>/keys.json` (mode 0600).
//!
//! At the first start the daemon makes an admin key and writes it, as an AWS
//! shared-credentials file (profile `default`), to `<data-dir>/credentials` (mode 0600), so
//! that root on the daemon's host (and the AWS CLI pointed at that file) needs no set-up. A
//! credentials file that exists already is kept: its `default` profile becomes the admin key.
//! Further keys come from `spore keys create`: admin keys may do everything, invoke-only keys
//! may invoke the functions their glob names and nothing else.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::credentials::{read_profile, write_credentials};
use crate::{write_private, Credentials};

/// The name of the key the daemon makes at its first start.
pub const ADMIN: &str = "admin";

/// One access key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// Its name (unique).
    pub name: String,
    /// The access key id (what requests name).
    pub access_key_id: String,
    /// The secret.
    pub secret_access_key: String,
    /// It may only invoke functions.
    #[serde(default)]
    pub invoke_only: bool,
    /// (Invoke-only keys) the functions it may invoke, a glob with `*` and `?` (None: all).
    #[serde(default)]
    pub functions: Option<String>,
    /// When it was made, ms since the epoch.
    #[serde(default)]
    pub created_ms: u64,
}

/// What a request does, as far as access goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Invokes a function.
    Invoke {
        /// The function's name.
        function: String,
    },
    /// Invokes a DAG (several functions).
    InvokeDag,
    /// Anything else: deploy, change, delete, read configuration, logs, keys, metrics.
    Manage,
}

impl Key {
    /// Whether this key may do `action`.
    pub fn allows(&self, action: &Action) -> bool {
        if !self.invoke_only {
            return true;
        }
        match action {
            Action::Invoke { function } => self
                .functions
                .as_deref()
                .is_none_or(|g| glob_match(g, function)),
            // A DAG runs several functions: only a key for all of them may run it.
            Action::InvokeDag => self.functions.is_none(),
            Action::Manage => false,
        }
    }

    /// Its credentials.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
        }
    }
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key files failed.
    #[error("Key storage failed at {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The key file is unreadable.
    #[error("{path} is not a key file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A parameter is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such key.
    #[error("no access key named {0:?}")]
    NotFound(String),
    /// A key of that name exists.
    #[error("an access key named {0:?} exists already")]
    Exists(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The key store.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    keys: Vec<Key>,
}

impl KeyStore {
    /// Opens `<data_dir>/keys.json`, making the admin key (and `<data_dir>/credentials`) at
    /// the first start. Returns the store and, when it made or imported the admin key, a
    /// line saying so for the daemon's log.
    pub fn open(data_dir: &Path, now_ms: u64) -> Result<(KeyStore, Option<String>), KeyError> {
        let path = data_dir.join("keys.json");
        let keys = match fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Vec<Key>>(&b).map_err(|e| KeyError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let mut store = KeyStore { path, keys };
        let mut note = None;
        if store.get(ADMIN).is_none() {
            let cred_path = data_dir.join("credentials");
            let existing = read_profile(&cred_path, "default").map_err(|e| KeyError::Corrupt {
                path: cred_path.clone(),
                reason: e.to_string(),
            })?;
            let creds = match existing {
                Some(c) => {
                    note = Some(format!(
                        "the admin access key is the default profile of {}",
                        cred_path.display()
                    ));
                    c
                }
                None => {
                    let c = Credentials::generate();
                    write_credentials(&cred_path, "default", &c).map_err(io_at(&cred_path))?;
                    note = Some(format!(
                        "made an admin access key: {} (profile default)",
                        cred_path.display()
                    ));
                    c
                }
            };
            store.keys.push(Key {
                name: ADMIN.into(),
                access_key_id: creds.access_key_id,
                secret_access_key: creds.secret_access_key,
                invoke_only: false,
                functions: None,
                created_ms: now_ms,
            });
            store.save()?;
        }
        // Existing data dirs: the files hold secrets.
        for p in [store.path.clone(), data_dir.join("credentials")] {
            if p.exists() {
                crate::make_private(&p).map_err(io_at(&p))?;
            }
        }
        Ok((store, note))
    }

    fn save(&self) -> Result<(), KeyError> {
        let bytes = serde_json::to_vec_pretty(&self.keys).expect("keys serialize");
        write_private(&self.path, &bytes).map_err(io_at(&self.path))
    }

    /// The key named `name`.
    pub fn get(&self, name: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// The key with access key id `id`.
    pub fn by_access_key(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.access_key_id == id)
    }

    /// Every key.
    pub fn list(&self) -> &[Key] {
        &self.keys
    }

    /// Makes a key.
    pub fn create(
        &mut self,
        name: &str,
        invoke_only: bool,
        functions: Option<String>,
        now_ms: u64,
    ) -> Result<Key, KeyError> {
        let ok_name = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok_name {
            return Err(KeyError::Invalid(format!(
                "{name:?} is not a valid key name: use 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        if self.get(name).is_some() {
            return Err(KeyError::Exists(name.into()));
        }
        if functions.is_some() && !invoke_only {
            return Err(KeyError::Invalid(
                "a functions glob limits what an invoke-only key may invoke: give --invoke-only too".into(),
            ));
        }
        if let Some(g) = &functions {
            let ok = !g.is_empty()
                && g.len() <= 140
                && g.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'*' | b'?'));
            if !ok {
                return Err(KeyError::Invalid(format!(
                    "{g:?} is not a function glob: use function-name characters with * and ?"
                )));
            }
        }
        let c = Credentials::generate();
        let key = Key {
            name: name.into(),
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            invoke_only,
            functions,
            created_ms: now_ms,
        };
        self.keys.push(key.clone());
        if let Err(e) = self.save() {
            self.keys.pop();
            return Err(e);
        }
        Ok(key)
    }

    /// Removes a key (the admin key cannot be removed: the daemon would lock its operator
    /// out).
    pub fn remove(&mut self, name: &str) -> Result<Key, KeyError> {
        if name == ADMIN {
            return Err(KeyError::Invalid(
                "the admin key cannot be removed (make another admin key first if it leaked, then replace the credentials file)".into(),
            ));
        }
        let i = self
            .keys
            .iter()
            .position(|k| k.name == name)
            .ok_or_else(|| KeyError::NotFound(name.into()))?;
        let key = self.keys.remove(i);
        if let Err(e) = self.save() {
            self.keys.insert(i, key);
            return Err(e);
        }
        Ok(key)
    }
}

/// Whether `name` matches `glob` (`*`: any run of characters, `?`: one character).
pub fn glob_match(glob: &str, name: &str) -> bool {
    let (g, n) = (glob.as_bytes(), name.as_bytes());
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && (g[gi] == b'?' || g[gi] == n[ni]) {
            gi += 1;
            ni += 1;
        } else if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ni));
            gi += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("img-*", "img-resize"));
        assert!(!glob_match("img-*", "pdf-resize"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*-v?", "fn-v2"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn first_start_makes_a_private_admin_key_and_keeps_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, note) = KeyStore::open(dir.path(), 1).unwrap();
        assert!(note.unwrap().contains("made an admin access key"));
        let admin = store.get(ADMIN).unwrap().clone();
        let cred = dir.path().join("credentials");
        for p in [&cred, &dir.path().join("keys.json")] {
            let mode = fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        assert_eq!(
            read_profile(&cred, "default").unwrap().unwrap(),
            admin.credentials()
        );
        let (again, note) = KeyStore::open(dir.path(), 2).unwrap();
        assert!(note.is_none());
        assert_eq!(again.get(ADMIN).unwrap(), &admin);
    }

    #[test]
    fn invoke_only_keys_invoke_what_they_name_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = KeyStore::open(dir.path(), 1).unwrap();
        let k = store.create("ci", true, Some("img-*".into()), 1).unwrap();
        let invoke = |f: &str| Action::Invoke { function: f.into() };
        assert!(k.allows(&invoke("img-resize")));
        assert!(!k.allows(&invoke("billing")));
        assert!(!k.allows(&Action::Manage));
        assert!(!k.allows(&Action::InvokeDag));
        let all = store.create("all", true, None, 1).unwrap();
        assert!(all.allows(&Action::InvokeDag));
        assert!(store.get(ADMIN).unwrap().allows(&Action::Manage));
        assert!(matches!(
            store.create("ci", true, None, 1),
            Err(KeyError::Exists(_))
        ));
        assert!(matches!(
            store.create("x", false, Some("a*".into()), 1),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            store.create("../x", false, None, 1),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(store.remove(ADMIN), Err(KeyError::Invalid(_))));
        store.remove("ci").unwrap();
        let (reopened, _) = KeyStore::open(dir.path(), 2).unwrap();
        assert!(reopened.get("ci").is_none() && reopened.get("all").is_some());
    }
}
