//! A small blocking client of the daemon's API (`/2015-03-31/functions`, `/dags`,
//! `/spore/v1`).

use std::time::Duration;

use base64::Engine as _;
use reqwest::blocking::Response;
use spore_auth::Credentials;

use crate::signed::{Http, RequestBuilder};
use serde_json::Value;

/// Errors of a request to the daemon. The messages are the CLI's own (printed as they are,
/// with their causes), so they keep its wording.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon did not answer at all (nothing listens at the endpoint).
    #[error("cannot reach the Spore daemon at {0}: is `spore serve` running? (set --endpoint or SPORE_ENDPOINT)")]
    Unreachable(String),
    /// The client's access key could not be found.
    #[error("finding an access key: {0}")]
    Credentials(String),
    /// The request failed on its way (other than by a refused connection).
    #[error("request to the daemon failed")]
    Request(#[source] reqwest::Error),
    /// The daemon answered with an error status.
    #[error("{kind} ({status}): {message}")]
    Api {
        /// `X-Amzn-ErrorType` (`Error` when absent).
        kind: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The answer's `message`, or its whole body.
        message: String,
    },
    /// A successful answer whose JSON body did not decode.
    #[error("{what}")]
    Malformed {
        /// Which answer.
        what: &'static str,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The client refuses the request before sending it (it would be silently ignored).
    #[error("{0}")]
    Refused(String),
    /// Building the HTTP client or reading an answer's body failed.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

impl ClientError {
    /// Whether the daemon could not be reached at all (the CLI's exit code 4).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable(_))
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// Decodes a successful answer's JSON body; `what` names the answer in the error.
fn json(resp: Response, what: &'static str) -> Result<Value> {
    resp.json()
        .map_err(|source| ClientError::Malformed { what, source })
}

/// Client of one daemon.
pub struct Client {
    endpoint: String,
    http: Http,
}

/// The answer to an invocation.
pub struct InvokeAnswer {
    /// Response body (result JSON or error JSON).
    pub body: Vec<u8>,
    /// Whether the function failed (`X-Amz-Function-Error`).
    pub function_error: bool,
    /// `X-Spore-Start`.
    pub start: String,
    /// `X-Spore-Init-Ms`.
    pub init_ms: f64,
    /// `X-Spore-Duration-Ms`.
    pub duration_ms: f64,
    /// Decoded `X-Amz-Log-Result`.
    pub log: Option<String>,
    /// `X-Spore-Unit`: the processing unit that ran it.
    pub unit: String,
}

/// How long a client waits for a daemon that does not listen yet.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

impl Client {
    /// A client of `endpoint`, signing with the key the AWS tools would find (the standard
    /// variables, `--profile`), else the daemon's own `<data-dir>/credentials`.
    pub fn new(endpoint: &str) -> Result<Client> {
        let creds = crate::signed::default_credentials()
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let mut c = Self::with_credentials(endpoint, creds)?;
        c.http = c.http.lazy_default();
        Ok(c)
    }

    /// A client of `endpoint` signing with `creds` (None: unsigned).
    pub fn with_credentials(endpoint: &str, creds: Option<Credentials>) -> Result<Client> {
        let http = Http::new(Duration::from_secs(960), creds)?;
        Ok(Client {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// The signing HTTP client it uses (for callers that time raw requests).
    pub fn http(&self) -> &Http {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    fn send(&self, req: RequestBuilder) -> Result<Response> {
        // A daemon that is starting (`spore serve &` then a client command) gets a few
        // seconds to listen before the client gives up.
        let deadline = std::time::Instant::now() + CONNECT_WAIT;
        let mut said = false;
        let mut req = req;
        loop {
            let retry = req.try_clone();
            match req.send() {
                Err(e) if e.is_connect() => {
                    let Some(next) = retry.filter(|_| std::time::Instant::now() < deadline) else {
                        return Err(ClientError::Unreachable(self.endpoint.clone()));
                    };
                    if !said {
                        eprintln!("waiting for the Spore daemon at {} ...", self.endpoint);
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    req = next;
                }
                Err(e) => return Err(ClientError::Request(e)),
                Ok(r) => return Ok(r),
            }
        }
    }

    /// Turns an API error response into a readable error.
    fn check(resp: Response) -> Result<Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let kind = resp
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("Error")
            .to_owned();
        let body = resp.text().unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        Err(ClientError::Api {
            kind,
            status,
            message,
        })
    }

    /// A function's recent log events (`{"timestamp", "requestId", "message"}`), the last
    /// `lines` of those logged since `since_ms` (and of `request_id` if given).
    pub fn log_events(
        &self,
        name: &str,
        lines: usize,
        since_ms: Option<u64>,
        request_id: Option<&str>,
    ) -> Result<Vec<Value>> {
        let mut url = format!("/spore/v1/functions/{name}/logs?lines={lines}");
        if let Some(t) = since_ms {
            url.push_str(&format!("&since_ms={t}"));
        }
        if let Some(r) = request_id {
            url.push_str(&format!("&request_id={r}"));
        }
        let v = self.get_json(&url)?;
        Ok(v["events"].as_array().cloned().unwrap_or_default())
    }

    /// Follows a function's log: calls `each` with every new event until the daemon ends the
    /// stream (or `each` returns false).
    pub fn follow_logs(&self, name: &str, mut each: impl FnMut(&Value) -> bool) -> Result<()> {
        use std::io::BufRead;
        let url = self.url(&format!("/spore/v1/functions/{name}/logs/stream"));
        // A follow lasts as long as the user wants it to.
        let req = self
            .http
            .get(url)
            .timeout(Duration::from_secs(30 * 24 * 3600));
        let resp = Self::check(self.send(req)?)?;
        for line in std::io::BufReader::new(resp).lines() {
            let line =
                line.map_err(|e| ClientError::Credentials(format!("reading the log stream: {e}")))?;
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                // The daemon's notice of skipped lines.
                eprintln!("(log stream: {})", data.trim());
                continue;
            };
            if !each(&v) {
                break;
            }
        }
        Ok(())
    }

    /// A one-time dashboard login path (`POST /spore/v1/ui/login-url`).
    pub fn ui_login_url(&self) -> Result<Value> {
        let req = self.http.post(self.url("/spore/v1/ui/login-url"));
        json(Self::check(self.send(req)?)?, "the login URL")
    }

    /// Makes an access key (`POST /spore/v1/keys`); the answer holds its secret.
    pub fn create_key(
        &self,
        name: &str,
        invoke_only: bool,
        functions: Option<&str>,
    ) -> Result<Value> {
        let body = serde_json::json!({
            "Name": name,
            "InvokeOnly": invoke_only,
            "Functions": functions,
        });
        let req = self.http.post(self.url("/spore/v1/keys")).json(&body);
        json(Self::check(self.send(req)?)?, "the new key")
    }

    /// Removes an access key.
    pub fn delete_key(&self, name: &str) -> Result<()> {
        let req = self
            .http
            .delete(self.url(&format!("/spore/v1/keys/{name}")));
        Self::check(self.send(req)?)?;
        Ok(())
    }

    /// Whether the daemon answers `/healthz`.
    pub fn healthy(&self) -> bool {
        self.http
            .get(self.url("/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }

    /// GET returning JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let resp = Self::check(self.send(self.http.get(self.url(path)))?)?;
        json(resp, "the daemon sent malformed JSON")
    }

    /// Creates or updates a function from a manifest and a zip.
    pub fn deploy(&self, m: &spore_core::FunctionManifest, zip: &[u8]) -> Result<Value> {
        self.deploy_with(m, zip, true, None)
    }

    /// As [`Client::deploy`]; `build` false skips the dependency build (the package vendors
    /// its packages). The answer may say the function's dependencies are being built
    /// ([`Client::wait_for_build`]).
    pub fn deploy_with(
        &self,
        m: &spore_core::FunctionManifest,
        zip: &[u8],
        build: bool,
        progress: Option<crate::signed::Progress>,
    ) -> Result<Value> {
        let build = if build { "build" } else { "skip" };
        let with_progress = |req: crate::signed::RequestBuilder| match &progress {
            Some(p) => req.upload_progress(p.clone()),
            None => req,
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(zip);
        let tags = spore_tags(m);
        let create = serde_json::json!({
            "FunctionName": m.name, "Runtime": m.runtime_str(), "Handler": m.handler,
            "MemorySize": m.memory_mb, "Timeout": m.timeout_s, "Code": { "ZipFile": b64 },
            "Environment": { "Variables": m.environment }, "Tags": tags,
        });
        let resp = self.send(with_progress(
            self.http
                .post(self.url("/2015-03-31/functions"))
                .header("x-spore-build", build)
                .json(&create),
        ))?;
        if resp.status() != reqwest::StatusCode::CONFLICT {
            return json(Self::check(resp)?, "malformed CreateFunction answer");
        }
        let base = format!("/2015-03-31/functions/{}", m.name);
        // Spore's settings are fixed when a function is created: a manifest that changes one
        // is refused by name rather than deployed without it.
        let current = self.get_json(&base)?;
        let changed = changed_spore_tags(&tags, &current["Tags"]);
        if !changed.is_empty() {
            return Err(ClientError::Refused(format!(
                "{} cannot change on the existing function {} ({}): delete it first (spore rm {}) \
                 and deploy again",
                if changed.len() == 1 {
                    "this setting"
                } else {
                    "these settings"
                },
                m.name,
                changed.join(", "),
                m.name,
            )));
        }
        let config = serde_json::json!({
            "Runtime": m.runtime_str(), "Handler": m.handler, "MemorySize": m.memory_mb,
            "Timeout": m.timeout_s, "Environment": { "Variables": m.environment },
        });
        Self::check(
            self.send(
                self.http
                    .put(self.url(&format!("{base}/configuration")))
                    .json(&config),
            )?,
        )?;
        let code = serde_json::json!({ "ZipFile": b64 });
        json(
            Self::check(
                self.send(with_progress(
                    self.http
                        .put(self.url(&format!("{base}/code")))
                        .header("x-spore-build", build)
                        .json(&code),
                ))?,
            )?,
            "malformed UpdateFunctionCode answer",
        )
    }

    /// Waits (at most `limit`) while `name`'s dependency build runs, calling `on_line` with
    /// each new line of its output; returns the function's last configuration (check
    /// `State` and `LastUpdateStatus`).
    pub fn wait_for_build(
        &self,
        name: &str,
        limit: std::time::Duration,
        mut on_line: impl FnMut(&str),
    ) -> Result<Value> {
        let deadline = std::time::Instant::now() + limit;
        let mut seen: u64 = 0;
        loop {
            let conf = self.get_json(&format!("/2015-03-31/functions/{name}/configuration"))?;
            if let Some(b) = conf.get("SporeBuild") {
                let dropped = b["Dropped"].as_u64().unwrap_or(0);
                let lines = b["Lines"].as_array().cloned().unwrap_or_default();
                for (i, l) in lines.iter().enumerate() {
                    if dropped + i as u64 >= seen {
                        on_line(l.as_str().unwrap_or_default());
                    }
                }
                seen = seen.max(dropped + lines.len() as u64);
            }
            let busy = conf["State"] == "Pending" || conf["LastUpdateStatus"] == "InProgress";
            if !busy || std::time::Instant::now() >= deadline {
                return Ok(conf);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// `GET /spore/v1/units`.
    pub fn units(&self) -> Result<Value> {
        json(
            Self::check(self.send(self.http.get(self.url("/spore/v1/units")))?)?,
            "malformed answer to a units listing",
        )
    }

    /// `POST /spore/v1/units/{unit}/echo`: `n` echo calls of `bytes` over the unit's link.
    pub fn unit_echo(&self, unit: u32, bytes: usize, n: usize) -> Result<Value> {
        let url = self.url(&format!("/spore/v1/units/{unit}/echo?bytes={bytes}&n={n}"));
        json(
            Self::check(self.send(self.http.post(url))?)?,
            "malformed answer to a link echo",
        )
    }

    /// Deletes a function.
    pub fn delete(&self, name: &str) -> Result<()> {
        self.delete_with(name, false).map(drop)
    }

    /// Deletes a function; `force` deletes one that DAGs use too. Returns the DAGs the
    /// delete left broken.
    pub fn delete_with(&self, name: &str, force: bool) -> Result<Vec<String>> {
        let resp = Self::check(
            self.send(
                self.http
                    .delete(self.url(&format!("/2015-03-31/functions/{name}")))
                    .header("x-spore-force", if force { "true" } else { "false" }),
            )?,
        )?;
        Ok(resp
            .headers()
            .get("x-spore-broken-dags")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default())
    }

    /// Invokes a function synchronously.
    pub fn invoke(&self, name: &str, payload: Vec<u8>, cold: bool) -> Result<InvokeAnswer> {
        self.invoke_with(name, payload, cold.then_some("1"))
    }

    /// Invokes a function synchronously; `cold` is the `X-Spore-Cold` value (`1`, `init`,
    /// `fork`, `restore`), if any.
    pub fn invoke_with(
        &self,
        name: &str,
        payload: Vec<u8>,
        cold: Option<&str>,
    ) -> Result<InvokeAnswer> {
        let mut req = self
            .http
            .post(self.url(&format!("/2015-03-31/functions/{name}/invocations")))
            .header("X-Amz-Log-Type", "Tail")
            .body(payload);
        if let Some(cold) = cold {
            req = req.header("X-Spore-Cold", cold);
        }
        let resp = Self::check(self.send(req)?)?;
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let function_error = h("x-amz-function-error").is_some();
        let start = h("x-spore-start").unwrap_or_default();
        let unit = h("x-spore-unit").unwrap_or_default();
        let init_ms = h("x-spore-init-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let duration_ms = h("x-spore-duration-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let log = h("x-amz-log-result")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let body = resp.bytes()?.to_vec();
        Ok(InvokeAnswer {
            body,
            function_error,
            start,
            init_ms,
            duration_ms,
            log,
            unit,
        })
    }

    /// Stops a function's idle instances and cfork template (`POST
    /// /spore/v1/functions/{name}/evict`); returns what went.
    pub fn evict(&self, name: &str) -> Result<Value> {
        let url = self.url(&format!("/spore/v1/functions/{name}/evict"));
        json(
            Self::check(self.send(self.http.post(url))?)?,
            "malformed answer to an eviction",
        )
    }

    /// Removes a function's snapshots.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let url = self.url(&format!("/spore/v1/snapshots/{name}"));
        Self::check(self.send(self.http.delete(url))?)?;
        Ok(())
    }

    /// Deploys a DAG file (TOML).
    pub fn put_dag(&self, toml: &str) -> Result<Value> {
        json(
            Self::check(self.send(self.http.post(self.url("/dags")).body(toml.to_owned()))?)?,
            "malformed answer to a DAG deploy",
        )
    }

    /// Deletes a DAG.
    pub fn delete_dag(&self, name: &str) -> Result<()> {
        Self::check(self.send(self.http.delete(self.url(&format!("/dags/{name}"))))?)?;
        Ok(())
    }

    /// Invokes a DAG; with `timing` the answer is `{"Result", "Timing"}`. Returns the body
    /// and whether a node failed.
    pub fn invoke_dag(
        &self,
        name: &str,
        payload: Vec<u8>,
        transport: Option<&str>,
        timing: bool,
    ) -> Result<(Vec<u8>, bool)> {
        let mut url = format!("/dags/{name}/invocations?timing={}", u8::from(timing));
        if let Some(t) = transport {
            url.push_str(&format!("&transport={t}"));
        }
        let resp = Self::check(self.send(self.http.post(self.url(&url)).body(payload))?)?;
        let failed = resp.headers().contains_key("x-amz-function-error");
        Ok((resp.bytes()?.to_vec(), failed))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A server on loopback that answers one request with `response`; its endpoint.
    fn answer_once(response: String) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(response.as_bytes()).unwrap();
        });
        endpoint
    }

    #[test]
    fn unreachable_daemon() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let client = Client::new(&endpoint).unwrap();
        assert!(!client.healthy());
        let e = client.get_json("/2015-03-31/functions").unwrap_err();
        assert!(e.is_unreachable(), "{e:?}");
        assert!(e.to_string().contains(&endpoint));
    }

    #[test]
    fn api_errors_carry_kind_status_and_message() {
        let body = r#"{"message":"Function not found: f"}"#;
        let response = format!(
            "HTTP/1.1 404 Not Found\r\nX-Amzn-ErrorType: ResourceNotFoundException\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let e = Client::new(&answer_once(response))
            .unwrap()
            .delete("f")
            .unwrap_err();
        assert!(!e.is_unreachable());
        assert_eq!(
            e.to_string(),
            "ResourceNotFoundException (404 Not Found): Function not found: f"
        );
    }

    #[test]
    fn malformed_json_is_named() {
        let endpoint = answer_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nnot".into(),
        );
        let e = Client::new(&endpoint).unwrap().units().unwrap_err();
        assert!(matches!(e, ClientError::Malformed { .. }), "{e:?}");
        assert_eq!(e.to_string(), "malformed answer to a units listing");
    }
}

/// The `spore:` tags that carry a manifest's Spore settings through the Lambda API.
pub fn spore_tags(m: &spore_core::FunctionManifest) -> serde_json::Map<String, Value> {
    let mut tags = serde_json::Map::new();
    tags.insert("spore:sandbox".into(), m.sandbox.as_str().into());
    if let Some(mx) = m.max_instances {
        tags.insert("spore:max_instances".into(), mx.to_string().into());
    }
    if m.snapshot {
        tags.insert("spore:snapshot".into(), "true".into());
    }
    if let Some(u) = m.unit {
        tags.insert("spore:unit".into(), u.to_string().into());
    }
    if let Some(w) = &m.warmup_event {
        tags.insert("spore:warmup_event".into(), w.clone().into());
    }
    if !m.auto_warmup && m.runtime == spore_core::Runtime::Python3 {
        tags.insert("spore:auto_warmup".into(), "false".into());
    }
    if let Some(a) = &m.accelerator {
        tags.insert("spore:accelerator".into(), a.clone().into());
    }
    if let Some(a) = &m.arch {
        tags.insert("spore:arch".into(), a.clone().into());
    }
    if let Some(n) = m.network {
        tags.insert("spore:network".into(), n.as_str().into());
    }
    tags
}

/// The settings (`key: now -> wanted`) where `wanted` differs from a function's `current`
/// tags, for the `spore:` tags only.
fn changed_spore_tags(wanted: &serde_json::Map<String, Value>, current: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let current = current.as_object().unwrap_or(&empty);
    let keys: std::collections::BTreeSet<&String> = wanted
        .keys()
        .chain(current.keys())
        .filter(|k| k.starts_with("spore:"))
        .collect();
    let show = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("unset").to_owned();
    keys.into_iter()
        .filter(|k| wanted.get(*k) != current.get(*k))
        .map(|k| {
            format!(
                "{}: {} -> {}",
                k.trim_start_matches("spore:"),
                show(current.get(k)),
                show(wanted.get(k))
            )
        })
        .collect()
}

#[cfg(test)]
mod tag_tests {
    use super::*;

    #[test]
    fn a_changed_spore_setting_is_named() {
        let m = spore_core::FunctionManifest::from_toml(
            "name = \"f\"\nhandler = \"m.h\"\nnetwork = \"none\"\nauto_warmup = false\n",
        )
        .unwrap();
        let wanted = spore_tags(&m);
        assert_eq!(wanted["spore:network"], "none");
        assert_eq!(wanted["spore:auto_warmup"], "false");
        let same = serde_json::json!({
            "spore:sandbox": "container", "spore:network": "none",
            "spore:auto_warmup": "false", "team": "a",
        });
        assert!(changed_spore_tags(&wanted, &same).is_empty());
        let other = serde_json::json!({"spore:sandbox": "cfork", "team": "a"});
        assert_eq!(
            changed_spore_tags(&wanted, &other),
            vec![
                "auto_warmup: unset -> false".to_owned(),
                "network: unset -> none".to_owned(),
                "sandbox: cfork -> container".to_owned(),
            ]
        );
    }
}
