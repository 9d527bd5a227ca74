//! The web dashboard at `/ui`: one page, its assets built into the binary (no CDN, works
//! offline), that polls `/spore/v1/status`, follows a function's log through the log stream
//! and invokes functions through the ordinary API.
//!
//! Login: with an admin access key (its id and secret, posted to `/ui/login`), or with a
//! one-time URL that `spore ui` asks the daemon for (`POST /spore/v1/ui/login-url`, signed,
//! valid five minutes, good for one login). Either gives a session cookie (`HttpOnly`,
//! `SameSite=Strict`, 12 hours) which the API then accepts in place of a signature; a
//! cookie-authenticated request that changes anything must also carry `X-Spore-UI: 1`, which
//! no other site's page can add without the daemon's consent (it gives none).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use crate::auth::Auth;
use crate::sessions::{session_cookie, COOKIE, LOGIN_URL_TTL, SESSION_TTL};
use crate::AppState;

const PAGE: &str = include_str!("../ui/index.html");
const LOGIN: &str = include_str!("../ui/login.html");

fn with_session(to: &str, session: &str) -> Response {
    let mut r = Redirect::to(to).into_response();
    let cookie = format!(
        "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
    );
    r
}

fn login_page(error: Option<&str>, status: StatusCode) -> Response {
    let msg = error.map_or_else(String::new, |e| {
        format!("<p class=\"error\">{}</p>", html_escape(e))
    });
    with_csp((status, Html(LOGIN.replace("<!--ERROR-->", &msg))).into_response())
}

/// The page loads nothing from elsewhere and may not be framed (no clickjacking).
fn with_csp(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    r
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page() -> Response {
    with_csp(Html(PAGE).into_response())
}

/// `GET /ui`: the dashboard, or the login page.
pub(crate) async fn dashboard(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if matches!(st.auth, Auth::None) {
        return page();
    }
    match session_cookie(&headers).and_then(|s| st.sessions.key_of(&s)) {
        Some(_) => page(),
        None => Redirect::to("/ui/login").into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginQuery {
    token: Option<String>,
}

/// `GET /ui/login[?token=T]`: the login form, or a one-time login.
pub(crate) async fn login_form(
    State(st): State<AppState>,
    Query(q): Query<LoginQuery>,
) -> Response {
    match q.token {
        Some(t) => match st.sessions.redeem(&t) {
            Some(key) => {
                tracing::info!(key = %key, "dashboard login with a one-time URL");
                with_session("/ui", &st.sessions.start(&key))
            }
            None => login_page(
                Some("That login link is unknown, used already or expired: run `spore ui` for a new one."),
                StatusCode::UNAUTHORIZED,
            ),
        },
        None => login_page(None, StatusCode::OK),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    access_key_id: String,
    secret_access_key: String,
}

/// `POST /ui/login`: logs in with an admin access key.
pub(crate) async fn login(State(st): State<AppState>, Form(f): Form<LoginForm>) -> Response {
    let Auth::Keys(store) = &st.auth else {
        return Redirect::to("/ui").into_response();
    };
    let key = {
        let store = store.read().expect("keys lock");
        store.by_access_key(f.access_key_id.trim()).cloned()
    };
    let ok = key.as_ref().is_some_and(|k| {
        use hmac::Mac;
        // Constant-time comparison of the secrets.
        let mac = |s: &str| {
            let mut m =
                hmac::Hmac::<sha2::Sha256>::new_from_slice(b"spore-ui").expect("any key length");
            m.update(s.as_bytes());
            m
        };
        let want = mac(&k.secret_access_key).finalize().into_bytes();
        mac(f.secret_access_key.trim()).verify_slice(&want).is_ok()
    });
    match key {
        Some(k) if ok && k.allows(&spore_auth::Action::Manage) => {
            tracing::info!(key = %k.name, "dashboard login");
            with_session("/ui", &st.sessions.start(&k.name))
        }
        Some(k) if ok => login_page(
            Some(&format!(
                "The key {:?} may only invoke functions; the dashboard needs an admin key.",
                k.name
            )),
            StatusCode::FORBIDDEN,
        ),
        _ => login_page(
            Some("Unknown access key id or wrong secret."),
            StatusCode::UNAUTHORIZED,
        ),
    }
}

/// `POST /ui/logout`.
pub(crate) async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(s) = session_cookie(&headers) {
        st.sessions.end(&s);
    }
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("spore_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// `POST /spore/v1/ui/login-url` (admin keys): a one-time login path for the dashboard.
pub(crate) async fn login_url(
    State(st): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
) -> Response {
    let key = caller.map_or_else(|| "admin".to_owned(), |c| c.key.clone());
    let t = st.sessions.one_time(&key);
    axum::Json(serde_json::json!({
        "Path": format!("/ui/login?token={t}"),
        "ExpiresInSeconds": LOGIN_URL_TTL.as_secs(),
    }))
    .into_response()
}

/// `GET /spore/v1/processes`: every process this unit runs for functions, and the idle DAG
/// pipelines (what `spore ps` lists).
pub(crate) async fn processes(State(st): State<AppState>) -> Response {
    let (procs, pipelines) = st.control.processes();
    let pipelines: Vec<serde_json::Value> = pipelines
        .into_iter()
        .map(|(dag, instances, idle_s)| {
            serde_json::json!({ "dag": dag, "instances": instances, "idle_s": idle_s })
        })
        .collect();
    axum::Json(serde_json::json!({ "Processes": procs, "Pipelines": pipelines })).into_response()
}

/// `GET /spore/v1/status`: what the dashboard shows, in one answer.
pub(crate) async fn status(State(st): State<AppState>) -> Response {
    let c = &st.control;
    let stats: HashMap<String, spore_pool::FunctionStats> = c
        .function_stats()
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let snapshots: HashMap<String, serde_json::Value> = c
        .list_snapshots()
        .into_iter()
        .filter_map(|s| {
            let v = serde_json::to_value(&s).ok()?;
            Some((v["function"].as_str()?.to_owned(), v))
        })
        .collect();
    let functions: Vec<serde_json::Value> = c
        .list_functions()
        .into_iter()
        .map(|r| {
            let name = r.manifest.name.clone();
            serde_json::json!({
                "name": name,
                "runtime": r.manifest.runtime_str(),
                "sandbox": r.manifest.sandbox.as_str(),
                "memoryMb": r.manifest.memory_mb,
                "timeoutS": r.manifest.timeout_s,
                "snapshot": r.manifest.snapshot,
                "revision": r.revision,
                "unit": r.manifest.unit,
                "stats": stats.get(&name),
                "image": snapshots.get(&name),
            })
        })
        .collect();
    let dags: Vec<serde_json::Value> = {
        let last = c.last_dag_runs();
        c.list_dags()
            .into_iter()
            .map(|d| {
                let run = last.get(&d.name);
                serde_json::json!({ "spec": d, "lastRun": run })
            })
            .collect()
    };
    axum::Json(serde_json::json!({
        "functions": functions,
        "units": c.unit_statuses(),
        "dags": dags,
        "recent": c.recent_invocations(),
        "pipelinesIdle": c.idle_pipelines(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}
