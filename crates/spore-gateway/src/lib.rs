//! The HTTP API: a subset of the AWS Lambda REST API (so that the AWS SDKs and CLI work with
//! `endpoint_url=http://127.0.0.1:<port>`), Prometheus metrics and a health check.
//!
//! | method | path | Lambda action |
//! |---|---|---|
//! | POST | `/2015-03-31/functions` | CreateFunction |
//! | GET | `/2015-03-31/functions` | ListFunctions |
//! | GET | `/2015-03-31/functions/{name}` | GetFunction |
//! | DELETE | `/2015-03-31/functions/{name}` | DeleteFunction |
//! | GET, PUT | `/2015-03-31/functions/{name}/configuration` | Get/UpdateFunctionConfiguration |
//! | PUT | `/2015-03-31/functions/{name}/code` | UpdateFunctionCode |
//! | POST | `/2015-03-31/functions/{name}/invocations` | Invoke |
//! | (several) | `/2018-10-31/layers/...` | layers (`layers`) |
//! | (several) | tags, policy, concurrency, event-invoke-config, account-settings, ... | the operations around a function, and those refused by name (`settings`) |
//! | GET | `/spore/v1/functions/{name}/logs?lines=N&since_ms=T&request_id=R` | (Spore) recent log lines |
//! | GET | `/spore/v1/functions/{name}/logs/stream` | (Spore) new log lines, as server-sent events |
//! | GET | `/spore/v1/snapshots` | (Spore) stored runtime snapshots |
//! | DELETE | `/spore/v1/snapshots/{name}` | (Spore) remove a function's snapshots |
//! | GET, POST | `/spore/v1/keys` | (Spore) list, create access keys (admin keys only) |
//! | DELETE | `/spore/v1/keys/{name}` | (Spore) remove an access key |
//! | GET | `/spore/v1/status` | (Spore) what the dashboard shows: functions and what they hold, units, DAGs and their last runs, recent invocations |
//! | GET | `/spore/v1/processes` | (Spore) instances, templates, spares and idle pipelines (`spore ps`) |
//! | POST | `/spore/v1/ui/login-url` | (Spore, admin keys) a one-time dashboard login path |
//! | GET | `/ui` | (Spore) the web dashboard (`/ui/login` to log in) |
//! | GET | `/metrics`, `/healthz` | (Spore) Prometheus text, liveness |
//!
//! Every request but `/healthz` must be signed (AWS Signature Version 4) with one of the
//! daemon's access keys, unless the daemon runs with `--auth none` (see [`auth`]).
#![forbid(unsafe_code)]

pub mod auth;
mod dag;
mod deps;
mod lambda;
mod layers;
pub mod sessions;
mod settings;
pub mod ui;
mod versions;

use std::future::Future;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
pub use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use spore_control::Control;

pub use auth::Auth;
pub use lambda::ApiError;

/// Largest request body (a zip of about 54 MiB, base64-encoded, plus JSON).
pub const MAX_BODY: usize = spore_registry::code::MAX_REQUEST;

#[derive(Clone)]
struct AppState {
    control: Control,
    metrics: Option<PrometheusHandle>,
    auth: Auth,
    sessions: std::sync::Arc<sessions::Sessions>,
}

/// Installs the process-wide Prometheus recorder. Returns `None` if one is installed already.
pub fn install_metrics() -> Option<PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
        ])
        .ok()?
        // Gauges of functions that are gone stop being reported a while after their last
        // update (they are set at every scrape).
        .idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(std::time::Duration::from_secs(120)),
        )
        .install_recorder()
        .ok()?;
    describe_metrics();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

/// `# HELP` and units of every metric family the daemon reports.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "spore_invocations_total",
        Unit::Count,
        "Invocations served, by function and how the serving instance started (warm, fork, restore, cold)"
    );
    describe_counter!(
        "spore_invocation_errors_total",
        Unit::Count,
        "Invocations that ended in a function error, by function and error type"
    );
    describe_counter!(
        "spore_platform_errors_total",
        Unit::Count,
        "Invocations the platform could not serve (a sandbox that failed to start), by function"
    );
    describe_counter!(
        "spore_dag_invocations_total",
        Unit::Count,
        "DAG invocations, by DAG and transport"
    );
    describe_histogram!(
        "spore_invocation_duration_seconds",
        Unit::Seconds,
        "From an invocation reaching the daemon to its result, by function and start path"
    );
    describe_histogram!(
        "spore_init_duration_seconds",
        Unit::Seconds,
        "Start-up of a fresh instance (a fork, a restore from a snapshot, a cold init), by function and start path"
    );
    describe_histogram!(
        "spore_dag_hop_seconds",
        Unit::Seconds,
        "One DAG hop: a node's handler returning to its successor's handler starting, by DAG and transport"
    );
    describe_gauge!(
        "spore_instances",
        Unit::Count,
        "Instances on this unit, by function and state (idle, busy)"
    );
    describe_gauge!(
        "spore_templates",
        Unit::Count,
        "Live cfork templates, by function"
    );
    describe_gauge!(
        "spore_spares",
        Unit::Count,
        "Spare sandboxes built ahead of a restore, by function"
    );
    describe_gauge!(
        "spore_idle_memory_bytes",
        Unit::Bytes,
        "Memory held by a function's idle instances and cfork template"
    );
    describe_gauge!(
        "spore_pipelines_idle",
        Unit::Count,
        "Idle pre-wired DAG pipelines"
    );
    describe_gauge!(
        "spore_inflight",
        Unit::Count,
        "Invocations, DAG runs and background starts in flight"
    );
    describe_gauge!(
        "spore_units",
        Unit::Count,
        "Processing units known to this daemon, by state (up, down)"
    );
}

/// The API router; `auth` says who may call it.
pub fn router(control: Control, metrics: Option<PrometheusHandle>, auth: Auth) -> Router {
    let api = "/2015-03-31/functions";
    let state = AppState {
        control,
        metrics,
        auth,
        sessions: std::sync::Arc::new(sessions::Sessions::default()),
    };
    Router::new()
        .route(
            api,
            post(lambda::create_function).get(lambda::list_functions),
        )
        .route(&format!("{api}/"), get(lambda::list_functions))
        .route(
            &format!("{api}/{{name}}"),
            get(lambda::get_function).delete(lambda::delete_function),
        )
        .route(
            &format!("{api}/{{name}}/configuration"),
            get(lambda::get_configuration).put(lambda::update_configuration),
        )
        .route(
            &format!("{api}/{{name}}/code"),
            axum::routing::put(lambda::update_code),
        )
        .route(&format!("{api}/{{name}}/invocations"), post(lambda::invoke))
        .route(
            &format!("{api}/{{name}}/versions"),
            post(versions::publish_version).get(versions::list_versions),
        )
        .route(
            &format!("{api}/{{name}}/aliases"),
            post(versions::create_alias).get(versions::list_aliases),
        )
        .route(
            "/2019-09-30/functions/{name}/provisioned-concurrency",
            get(versions::get_provisioned)
                .put(versions::put_provisioned)
                .delete(versions::delete_provisioned),
        )
        .route(
            &format!("{api}/{{name}}/aliases/{{alias}}"),
            get(versions::get_alias)
                .put(versions::update_alias)
                .delete(versions::delete_alias),
        )
        .merge(extras_routes())
        .route("/spore/v1/functions/{name}/logs", get(lambda::logs))
        .route(
            "/spore/v1/functions/{name}/logs/stream",
            get(lambda::follow_logs),
        )
        .route("/spore/v1/functions/{name}/evict", post(lambda::evict))
        .route("/spore/v1/units", get(lambda::list_units))
        .route("/spore/v1/units/{id}/echo", post(lambda::echo_unit))
        .route("/spore/v1/snapshots", get(lambda::list_snapshots))
        .route(
            "/spore/v1/snapshots/{name}",
            axum::routing::delete(lambda::delete_snapshots),
        )
        .route("/dags", post(dag::put_dag).get(dag::list_dags))
        .route("/dags/{name}", get(dag::get_dag).delete(dag::delete_dag))
        .route("/dags/{name}/invocations", post(dag::invoke_dag))
        .route(
            "/spore/v1/keys",
            post(auth::create_key).get(auth::list_keys),
        )
        .route(
            "/spore/v1/keys/{name}",
            axum::routing::delete(auth::delete_key),
        )
        .route("/spore/v1/status", get(ui::status))
        .route("/spore/v1/processes", get(ui::processes))
        .route("/spore/v1/ui/login-url", post(ui::login_url))
        .route("/ui", get(ui::dashboard))
        .route("/ui/", get(ui::dashboard))
        .route("/ui/login", get(ui::login_form).post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .route("/metrics", get(lambda::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(lambda::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Layers, tags, policies, concurrency, event-invoke configurations, account settings and
/// the operations Spore refuses by name (`layers.rs`, `settings.rs`).
fn extras_routes() -> Router<AppState> {
    use axum::routing::{delete, put};
    use settings as s;
    let f = "functions/{name}";
    Router::new()
        .route("/2018-10-31/layers", get(layers::list_layers))
        .route(
            "/2018-10-31/layers/{layer}/versions",
            post(layers::publish).get(layers::list_versions),
        )
        .route(
            "/2018-10-31/layers/{layer}/versions/{version}",
            get(layers::get_version).delete(layers::delete_version),
        )
        .route(
            "/2018-10-31/layers/{layer}/versions/{version}/policy",
            post(s::refused("AddLayerVersionPermission")),
        )
        .route(
            "/2017-03-31/tags/{arn}",
            post(s::tag_resource)
                .get(s::list_tags)
                .delete(s::untag_resource),
        )
        .route(
            &format!("/2015-03-31/{f}/policy"),
            post(s::add_permission).get(s::get_policy),
        )
        .route(
            &format!("/2015-03-31/{f}/policy/{{sid}}"),
            delete(s::remove_permission),
        )
        .route(
            &format!("/2017-10-31/{f}/concurrency"),
            put(s::put_concurrency).delete(s::delete_concurrency),
        )
        .route(
            &format!("/2019-09-30/{f}/concurrency"),
            get(s::get_concurrency),
        )
        .route(
            &format!("/2019-09-25/{f}/event-invoke-config"),
            put(s::put_event_config)
                .post(s::update_event_config)
                .get(s::get_event_config)
                .delete(s::delete_event_config),
        )
        .route(
            &format!("/2019-09-25/{f}/event-invoke-config/list"),
            get(s::list_event_configs),
        )
        .route("/2016-08-19/account-settings", get(s::account_settings))
        .route("/2016-08-19/account-settings/", get(s::account_settings))
        .route(
            &format!("/2020-06-30/{f}/code-signing-config"),
            get(s::code_signing_config).put(s::refused("PutFunctionCodeSigningConfig")),
        )
        .route(
            &format!("/2021-07-20/{f}/runtime-management-config"),
            get(s::runtime_management_config).put(s::refused("PutRuntimeManagementConfig")),
        )
        .route(
            "/2015-03-31/event-source-mappings",
            get(s::list_event_source_mappings).post(s::refused("CreateEventSourceMapping")),
        )
        .route(
            "/2015-03-31/event-source-mappings/",
            get(s::list_event_source_mappings).post(s::refused("CreateEventSourceMapping")),
        )
        .route(
            &format!("/2021-10-31/{f}/urls"),
            get(s::list_function_url_configs),
        )
        .route(
            &format!("/2021-10-31/{f}/url"),
            post(s::refused("CreateFunctionUrlConfig")).put(s::refused("UpdateFunctionUrlConfig")),
        )
        .route(
            &format!("/2021-11-15/{f}/response-streaming-invocations"),
            post(s::refused("InvokeWithResponseStream")),
        )
}

/// A router of `/metrics` and `/healthz` alone, without authentication (`spore serve
/// --metrics-listen`: an address for the Prometheus scraper only).
pub fn metrics_router(control: Control, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/metrics", get(lambda::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(lambda::not_found)
        .with_state(AppState {
            control,
            metrics,
            auth: Auth::None,
            sessions: std::sync::Arc::new(sessions::Sessions::default()),
        })
}

/// Serves the API on `listener` until `shutdown` completes; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Control,
    metrics: Option<PrometheusHandle>,
    auth: Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(control, metrics, auth))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
) -> std::io::Result<()> {
    axum::serve(listener, router).await
}
