//! A blocking HTTP client that signs every request (AWS Signature Version 4) with the
//! caller's access key, the way the AWS SDKs do: what the CLI, the benchmarks and the tests
//! use to reach a daemon that checks signatures.
//!
//! [`Http`] and [`RequestBuilder`] mirror the few `reqwest` calls Spore's clients make; a
//! request is signed when it is sent, over its final method, URL, headers and body.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::blocking::{Client, Request, Response};
use spore_auth::Credentials;

/// Where clients look for a key when none is given: a named profile (`--profile`) and the
/// daemon's data dir (for its `credentials` file).
static DEFAULTS: OnceLock<(Option<String>, Option<PathBuf>)> = OnceLock::new();

/// Sets the profile and data dir [`default_credentials`] uses (once, at start; later calls
/// are ignored).
pub fn set_defaults(profile: Option<String>, data_dir: Option<PathBuf>) {
    let _ = DEFAULTS.set((profile, data_dir));
}

/// The data dir a daemon of this user uses unless told otherwise: `/var/lib/spore` as root,
/// else `$XDG_DATA_HOME/spore` (`~/.local/share/spore`).
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/spore");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("spore")
}

/// The key a client signs with, found as the AWS tools find theirs (see
/// [`spore_auth::credentials::resolve`]), with the daemon's `<data-dir>/credentials` last
/// (`SPORE_DATA_DIR`, or the default data dir).
pub fn default_credentials(
) -> Result<Option<Credentials>, spore_auth::credentials::CredentialsError> {
    let (profile, data_dir) = DEFAULTS.get().cloned().unwrap_or_default();
    let data_dir = data_dir
        .or_else(|| std::env::var_os("SPORE_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(default_data_dir);
    credentials_for(profile.as_deref(), &data_dir)
}

/// The key for a daemon on `data_dir` (the standard variables and `profile` first).
pub fn credentials_for(
    profile: Option<&str>,
    data_dir: &Path,
) -> Result<Option<Credentials>, spore_auth::credentials::CredentialsError> {
    Ok(spore_auth::credentials::resolve(profile, Some(data_dir))?.map(|(c, _)| c))
}

/// Signs `req` with `creds` (AWS Signature Version 4, service `lambda`, Spore's default
/// region), over its final method, address, headers and body.
pub fn sign(req: &mut Request, creds: &Credentials) {
    let body = req.body().and_then(|b| b.as_bytes()).unwrap_or_default();
    let added = spore_auth::sigv4::sign_http(
        req.method(),
        req.url().as_str(),
        req.headers(),
        body,
        creds,
        std::time::SystemTime::now(),
    );
    req.headers_mut().extend(added);
}

/// A blocking HTTP client whose requests are signed with one key (or not at all).
#[derive(Debug, Clone)]
pub struct Http {
    inner: Client,
    creds: Option<Credentials>,
    /// Without a key: look for the default one again at each request (a daemon that was
    /// starting writes its credentials file when it comes up).
    lazy: bool,
}

impl Http {
    /// A client with `timeout` per request, signing with `creds`.
    pub fn new(timeout: Duration, creds: Option<Credentials>) -> reqwest::Result<Http> {
        Ok(Http {
            inner: Client::builder().timeout(timeout).build()?,
            creds,
            lazy: false,
        })
    }

    /// Wraps a configured `reqwest` client.
    pub fn from_client(inner: Client, creds: Option<Credentials>) -> Http {
        Http {
            inner,
            creds,
            lazy: false,
        }
    }

    /// The same client, looking for the default key again at each request while it has
    /// none.
    pub fn lazy_default(mut self) -> Http {
        self.lazy = true;
        self
    }

    /// The key it signs with.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.creds.as_ref()
    }

    /// The same client signing with `creds` instead.
    pub fn with_credentials(&self, creds: Option<Credentials>) -> Http {
        Http {
            inner: self.inner.clone(),
            creds,
            lazy: false,
        }
    }

    fn wrap(&self, b: reqwest::blocking::RequestBuilder) -> RequestBuilder {
        RequestBuilder {
            inner: b,
            http: self.clone(),
            progress: None,
        }
    }

    /// A GET request.
    pub fn get(&self, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.wrap(self.inner.get(url))
    }

    /// A POST request.
    pub fn post(&self, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.wrap(self.inner.post(url))
    }

    /// A PUT request.
    pub fn put(&self, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.wrap(self.inner.put(url))
    }

    /// A DELETE request.
    pub fn delete(&self, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.wrap(self.inner.delete(url))
    }
}

/// Called while a request's body is sent, with (bytes sent, total bytes).
pub type Progress = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

struct ProgressHook(Progress);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// A body read from memory that reports how far the sending got.
struct ProgressReader {
    cur: std::io::Cursor<Vec<u8>>,
    total: u64,
    hook: Progress,
}

impl std::io::Read for ProgressReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.cur.read(buf)?;
        (self.hook)(self.cur.position(), self.total);
        Ok(n)
    }
}

/// A request being built; signed when sent.
#[derive(Debug)]
pub struct RequestBuilder {
    inner: reqwest::blocking::RequestBuilder,
    http: Http,
    progress: Option<ProgressHook>,
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header(self, name: &str, value: &str) -> RequestBuilder {
        RequestBuilder {
            inner: self.inner.header(name, value),
            ..self
        }
    }

    /// Sets the body.
    pub fn body(self, body: impl Into<reqwest::blocking::Body>) -> RequestBuilder {
        RequestBuilder {
            inner: self.inner.body(body),
            ..self
        }
    }

    /// Sets a JSON body.
    pub fn json<T: serde::Serialize + ?Sized>(self, json: &T) -> RequestBuilder {
        RequestBuilder {
            inner: self.inner.json(json),
            ..self
        }
    }

    /// Sets this request's timeout.
    pub fn timeout(self, timeout: Duration) -> RequestBuilder {
        RequestBuilder {
            inner: self.inner.timeout(timeout),
            ..self
        }
    }

    /// Reports the sending of the body (set in memory) to `hook`.
    pub fn upload_progress(self, hook: Progress) -> RequestBuilder {
        RequestBuilder {
            progress: Some(ProgressHook(hook)),
            ..self
        }
    }

    /// A copy (None when the body cannot be copied, a stream).
    pub fn try_clone(&self) -> Option<RequestBuilder> {
        Some(RequestBuilder {
            inner: self.inner.try_clone()?,
            http: self.http.clone(),
            progress: self.progress.as_ref().map(|p| ProgressHook(p.0.clone())),
        })
    }

    /// Signs and sends the request.
    pub fn send(self) -> reqwest::Result<Response> {
        let mut req = self.inner.build()?;
        let found = match (&self.http.creds, self.http.lazy) {
            (None, true) => default_credentials().ok().flatten(),
            _ => None,
        };
        if let Some(c) = self.http.creds.as_ref().or(found.as_ref()) {
            sign(&mut req, c);
        }
        // Signed over the bytes; then sent from a reader that reports its progress.
        if let Some(ProgressHook(hook)) = self.progress {
            if let Some(bytes) = req.body().and_then(|b| b.as_bytes()).map(<[u8]>::to_vec) {
                let total = bytes.len() as u64;
                let reader = ProgressReader {
                    cur: std::io::Cursor::new(bytes),
                    total,
                    hook,
                };
                *req.body_mut() = Some(reqwest::blocking::Body::sized(reader, total));
            }
        }
        self.http.inner.execute(req)
    }
}
