//! A small blocking client of the daemon's API, used by the CLI commands.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use reqwest::blocking::{Client as Http, Response};
use serde_json::Value;

/// The daemon did not answer at all.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot reach the Spore daemon at {}: is `spore serve` running? (set --endpoint or SPORE_ENDPOINT)", self.0)
    }
}

impl std::error::Error for Unreachable {}

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

impl Client {
    /// A client of `endpoint`.
    pub fn new(endpoint: &str) -> Result<Client> {
        let http = Http::builder().timeout(Duration::from_secs(960)).build()?;
        Ok(Client {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<Response> {
        req.send().map_err(|e| {
            if e.is_connect() {
                anyhow::Error::new(Unreachable(self.endpoint.clone()))
            } else {
                anyhow::Error::new(e).context("request to the daemon failed")
            }
        })
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
        let msg = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        bail!("{kind} ({status}): {msg}")
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
        resp.json().context("the daemon sent malformed JSON")
    }

    /// Creates or updates a function from a manifest and a zip.
    pub fn deploy(&self, m: &spore_core::FunctionManifest, zip: &[u8]) -> Result<Value> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(zip);
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
        if let Some(a) = &m.accelerator {
            tags.insert("spore:accelerator".into(), a.clone().into());
        }
        if let Some(a) = &m.arch {
            tags.insert("spore:arch".into(), a.clone().into());
        }
        let create = serde_json::json!({
            "FunctionName": m.name, "Runtime": m.runtime.as_str(), "Handler": m.handler,
            "MemorySize": m.memory_mb, "Timeout": m.timeout_s, "Code": { "ZipFile": b64 },
            "Environment": { "Variables": m.environment }, "Tags": tags,
        });
        let resp = self.send(
            self.http
                .post(self.url("/2015-03-31/functions"))
                .json(&create),
        )?;
        if resp.status() != reqwest::StatusCode::CONFLICT {
            return Self::check(resp)?
                .json()
                .context("malformed CreateFunction answer");
        }
        let base = format!("/2015-03-31/functions/{}", m.name);
        let config = serde_json::json!({
            "Runtime": m.runtime.as_str(), "Handler": m.handler, "MemorySize": m.memory_mb,
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
        Self::check(self.send(self.http.put(self.url(&format!("{base}/code"))).json(&code))?)?
            .json()
            .context("malformed UpdateFunctionCode answer")
    }

    /// `GET /spore/v1/units`.
    pub fn units(&self) -> Result<Value> {
        Self::check(self.send(self.http.get(self.url("/spore/v1/units")))?)?
            .json()
            .context("malformed answer to a units listing")
    }

    /// `POST /spore/v1/units/{unit}/echo`: `n` echo calls of `bytes` over the unit's link.
    pub fn unit_echo(&self, unit: u32, bytes: usize, n: usize) -> Result<Value> {
        let url = self.url(&format!("/spore/v1/units/{unit}/echo?bytes={bytes}&n={n}"));
        Self::check(self.send(self.http.post(url))?)?
            .json()
            .context("malformed answer to a link echo")
    }

    /// Deletes a function.
    pub fn delete(&self, name: &str) -> Result<()> {
        Self::check(
            self.send(
                self.http
                    .delete(self.url(&format!("/2015-03-31/functions/{name}"))),
            )?,
        )?;
        Ok(())
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
        Self::check(self.send(self.http.post(url))?)?
            .json()
            .context("malformed answer to an eviction")
    }

    /// Removes a function's snapshots.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let url = self.url(&format!("/spore/v1/snapshots/{name}"));
        Self::check(self.send(self.http.delete(url))?)?;
        Ok(())
    }

    /// Deploys a DAG file (TOML).
    pub fn put_dag(&self, toml: &str) -> Result<Value> {
        Self::check(self.send(self.http.post(self.url("/dags")).body(toml.to_owned()))?)?
            .json()
            .context("malformed answer to a DAG deploy")
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
