//! Cluster membership in etcd, for units on several hosts.
//!
//! Keys (under a prefix, `/spore` by default):
//! - `PREFIX/control`: the control plane's link address, under the control plane's lease;
//! - `PREFIX/units/<id>`: a unit's [`UnitInfo`] as JSON, under that shim's lease;
//! - `PREFIX/placement/<function>`: the unit a function was placed on (no lease: it survives
//!   a control plane restart, so functions go back to the units that hold their warm
//!   instances and templates).
//!
//! A lease has a 6 s TTL and is kept alive every 2 s. When etcd is unreachable the cluster
//! keeps serving (links are direct); once etcd answers again, a lease it forgot is granted
//! anew and every key put again, so membership recovers by itself.
//!
//! The client speaks etcd's v3 JSON gateway (`/v3/kv/put`, `/v3/lease/grant`, ... with base64
//! keys), which etcd 3.4 serves on its client port. Written here rather than using the
//! `etcd-client` crate, which needs `protoc` and a gRPC stack for the half-dozen calls used.
//!
//! Over `https://` endpoints it speaks TLS (rustls), trusting the CA of [`EtcdAuth::ca`] (or
//! the system's roots) and presenting a client certificate if given (etcd's
//! `--client-cert-auth`). With a user and password it authenticates
//! (`/v3/auth/authenticate`) and sends the token it gets with every call, authenticating
//! again when etcd says the token is no longer valid.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Lease time to live, seconds.
pub const LEASE_TTL_S: i64 = 6;
/// How often leases are renewed.
pub const KEEPALIVE: Duration = Duration::from_secs(2);

/// An etcd call failed.
#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoint}: {message}")]
pub struct EtcdError {
    /// The endpoint tried last.
    pub endpoint: String,
    /// What went wrong.
    pub message: String,
}

/// How the client proves itself to etcd and checks etcd's certificate.
#[derive(Clone, Default)]
pub struct EtcdAuth {
    /// The CA certificate (PEM file) that etcd's server certificate chains to; without it,
    /// the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM file) for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// Its key (PEM file).
    pub key: Option<PathBuf>,
    /// An etcd user and its password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// A client of one or more etcd endpoints (tried in turn).
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    prefix: String,
    http: reqwest::Client,
    user: Option<(String, String)>,
    /// The auth token, once authenticated.
    token: Arc<tokio::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl Etcd {
    /// A client of `endpoints` (comma-separated URLs) for keys under `prefix`.
    pub fn new(endpoints: &str, prefix: &str) -> Result<Etcd, EtcdError> {
        Etcd::with_auth(endpoints, prefix, EtcdAuth::default())
    }

    /// A client of `endpoints` for keys under `prefix`, with TLS and authentication.
    pub fn with_auth(endpoints: &str, prefix: &str, auth: EtcdAuth) -> Result<Etcd, EtcdError> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        let bad = endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")));
        if endpoints.is_empty() || bad.is_some() {
            return Err(EtcdError {
                endpoint: bad.cloned().unwrap_or_default(),
                message: "give etcd endpoints as http://HOST:PORT[,http://HOST:PORT...]".into(),
            });
        }
        let fail = |message: String| EtcdError {
            endpoint: endpoints[0].clone(),
            message,
        };
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| fail(format!("reading the {what} {}: {e}", p.display())))
        };
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(3));
        if let Some(ca) = &auth.ca {
            let c = reqwest::Certificate::from_pem(&read(ca, "CA certificate")?)
                .map_err(|e| fail(format!("the CA certificate {}: {e}", ca.display())))?;
            b = b.tls_certs_only([c]);
        }
        match (&auth.cert, &auth.key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert, "client certificate")?;
                pem.push(b'\n');
                pem.extend(read(key, "client key")?);
                let id = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| fail(format!("the client certificate and key: {e}")))?;
                b = b.identity(id);
            }
            (None, None) => {}
            _ => {
                return Err(fail(
                    "a client certificate needs its key, and a key its certificate".into(),
                ))
            }
        }
        let http = b.build().map_err(|e| fail(e.to_string()))?;
        Ok(Etcd {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_owned(),
            http,
            user: auth.user,
            token: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// The full key of `rest` under the prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Authenticates as the configured user; returns the token.
    async fn authenticate(&self) -> Result<Option<String>, EtcdError> {
        let Some((name, password)) = &self.user else {
            return Ok(None);
        };
        let v = self
            .send(
                "/v3/auth/authenticate",
                &json!({ "name": name, "password": password }),
                None,
            )
            .await?;
        let token = v["token"].as_str().ok_or_else(|| EtcdError {
            endpoint: self.endpoints[0].clone(),
            message: "an authentication answer without a token".into(),
        })?;
        Ok(Some(token.to_owned()))
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        if self.user.is_none() {
            return self.send(path, &body, None).await;
        }
        let mut token = self.token.lock().await;
        if token.is_none() {
            *token = self.authenticate().await?;
        }
        match self.send(path, &body, token.as_deref()).await {
            // etcd forgot the token (it expires when unused, and with a restart): once more.
            Err(e) if e.message.contains("auth token") || e.message.contains(" 401 ") => {
                *token = self.authenticate().await?;
                self.send(path, &body, token.as_deref()).await
            }
            r => r,
        }
    }

    async fn send(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, EtcdError> {
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{ep}{path}");
            let mut req = self.http.post(&url).json(body);
            if let Some(t) = token {
                req = req.header("Authorization", t);
            }
            let r = req.send().await;
            match r {
                Ok(resp) => {
                    let status = resp.status();
                    let v: Value = resp.json().await.unwrap_or(Value::Null);
                    if status.is_success() {
                        return Ok(v);
                    }
                    last = Some(EtcdError {
                        endpoint: ep.clone(),
                        message: format!("{path} answered {status}: {v}"),
                    });
                }
                Err(e) => {
                    last = Some(EtcdError {
                        endpoint: ep.clone(),
                        message: format!("{path}: {}", crate::error_chain(&e)),
                    })
                }
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Grants a lease; returns its id.
    pub async fn grant(&self) -> Result<i64, EtcdError> {
        let v = self
            .post("/v3/lease/grant", json!({ "TTL": LEASE_TTL_S }))
            .await?;
        num(&v["ID"]).ok_or_else(|| EtcdError {
            endpoint: self.endpoints[0].clone(),
            message: format!("a lease grant without an id: {v}"),
        })
    }

    /// Renews a lease; false if etcd no longer knows it (expired, or etcd lost its state).
    pub async fn keepalive(&self, lease: i64) -> Result<bool, EtcdError> {
        let v = self
            .post("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        Ok(num(&v["result"]["TTL"]).is_some_and(|t| t > 0))
    }

    /// Puts `key` (under the prefix) = `value`, under `lease` if given.
    pub async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), EtcdError> {
        let mut body = json!({ "key": B64.encode(self.key(key)), "value": B64.encode(value) });
        if let Some(l) = lease {
            body["lease"] = l.to_string().into();
        }
        self.post("/v3/kv/put", body).await.map(|_| ())
    }

    /// Deletes `key` (under the prefix).
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let body = json!({ "key": B64.encode(self.key(key)) });
        self.post("/v3/kv/deleterange", body).await.map(|_| ())
    }

    /// Every key under `PREFIX/dir/`, with the prefix and dir cut off, and its value.
    pub async fn list(&self, dir: &str) -> Result<BTreeMap<String, String>, EtcdError> {
        let start = format!("{}/", self.key(dir));
        let mut end = start.clone().into_bytes();
        *end.last_mut().expect("non-empty") += 1; // '/' + 1 = '0': the end of the prefix range
        let v = self
            .post(
                "/v3/kv/range",
                json!({ "key": B64.encode(&start), "range_end": B64.encode(&end) }),
            )
            .await?;
        let mut out = BTreeMap::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let dec = |f: &str| {
                kv[f]
                    .as_str()
                    .and_then(|s| B64.decode(s).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            };
            if let (Some(k), Some(val)) = (dec("key"), dec("value")) {
                if let Some(rest) = k.strip_prefix(&start) {
                    out.insert(rest.to_owned(), val);
                }
            }
        }
        Ok(out)
    }

    /// Reads one key (under the prefix).
    pub async fn get(&self, key: &str) -> Result<Option<String>, EtcdError> {
        let v = self
            .post("/v3/kv/range", json!({ "key": B64.encode(self.key(key)) }))
            .await?;
        Ok(v["kvs"][0]["value"]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

/// etcd writes 64-bit numbers as JSON strings.
fn num(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
}

/// Keys held under one lease, kept alive in the background and put again whenever etcd has
/// lost the lease (it expired while etcd was unreachable, or etcd restarted without its data).
#[derive(Clone)]
pub struct Registration {
    etcd: Etcd,
    keys: Arc<Mutex<BTreeMap<String, String>>>,
    state: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("state", &self.state())
            .finish()
    }
}

impl Registration {
    /// Starts keeping `keys` registered under a lease until `stop` fires (then they are
    /// deleted, best effort).
    pub fn start(
        etcd: Etcd,
        keys: BTreeMap<String, String>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Registration {
        let reg = Registration {
            etcd,
            keys: Arc::new(Mutex::new(keys)),
            state: Arc::new(Mutex::new("connecting".into())),
        };
        let r = reg.clone();
        tokio::spawn(async move {
            let mut lease: Option<i64> = None;
            let mut warned = false;
            loop {
                match r.round(&mut lease).await {
                    Ok(()) => {
                        if warned {
                            tracing::info!("etcd reachable again; membership registered");
                        }
                        warned = false;
                        r.set_state("registered".into());
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "etcd unreachable; serving on, will register again");
                        }
                        warned = true;
                        r.set_state(format!("unreachable: {e}"));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(KEEPALIVE) => {}
                    _ = stop.changed() => break,
                }
            }
            let keys: Vec<String> = r.keys.lock().expect("keys lock").keys().cloned().collect();
            for k in keys {
                let _ = r.etcd.delete(&k).await;
            }
        });
        reg
    }

    async fn round(&self, lease: &mut Option<i64>) -> Result<(), EtcdError> {
        if let Some(l) = *lease {
            if self.etcd.keepalive(l).await? {
                return Ok(());
            }
            tracing::info!(lease = l, "etcd forgot the lease; registering again");
        }
        let l = self.etcd.grant().await?;
        let keys = self.keys.lock().expect("keys lock").clone();
        for (k, v) in &keys {
            self.etcd.put(k, v, Some(l)).await?;
        }
        *lease = Some(l);
        Ok(())
    }

    fn set_state(&self, s: String) {
        *self.state.lock().expect("state lock") = s;
    }

    /// `registered`, `connecting` or `unreachable: why`.
    pub fn state(&self) -> String {
        self.state.lock().expect("state lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(Etcd::new("", "/spore").is_err());
        let e = Etcd::new("127.0.0.1:2379", "/spore").unwrap_err();
        assert!(e.to_string().contains("http://HOST:PORT"), "{e}");
        let e = Etcd::new("http://a:1, http://b:2/", "/spore/").unwrap();
        assert_eq!(e.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(e.key("units/3"), "/spore/units/3");
    }

    #[test]
    fn numbers_come_as_strings() {
        assert_eq!(num(&json!("42")), Some(42));
        assert_eq!(num(&json!(7)), Some(7));
        assert_eq!(num(&json!(null)), None);
    }
}
