//! Jemma's OpenAI-compatible HTTP gateway. The app, the CLI and the tests all build it with [`router`] and
//! run it with [`serve`]; handlers are thin: parse, validate, hand to [`jemma_router::route::TierRouter`],
//! and shape its output as JSON or server-sent events.
#![deny(missing_docs)]

mod anthropic;
pub mod auth;
mod error;
mod handlers;
mod ids;
pub mod openapi;
mod responses;
mod sse;
pub mod web;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use jemma_router::api::Limits;
use jemma_router::route::TierRouter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use error::ApiError;

/// Shared state of the HTTP layer.
#[derive(Clone)]
pub struct AppState {
    /// Routing and tiers.
    pub router: Arc<TierRouter>,
    /// Request limits.
    pub limits: Limits,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// SSE keep-alive interval.
    pub keep_alive: Duration,
    /// Browser origins allowed by CORS.
    pub cors_origins: Vec<String>,
    /// Keys and rate limits.
    pub access: auth::AccessPolicy,
    /// Adds endpoints to tiers' pools at run time (`/admin/tiers/{tier}/endpoints`); None: not offered.
    pub membership: Option<Arc<jemma_router::membership::Membership>>,
    limiters: Arc<auth::Limiters>,
    metrics: PrometheusHandle,
}

/// The process-wide Prometheus recorder (a `metrics` recorder can be installed once per process; tests
/// start several gateways in one).
#[expect(
    clippy::expect_used,
    reason = "the buckets are a constant, non-empty list"
)]
fn prometheus() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0,
            ])
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding app; then ours just renders empty.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
    .clone()
}

impl AppState {
    /// State over a configured router.
    pub fn new(
        router: Arc<TierRouter>,
        limits: Limits,
        max_body_bytes: usize,
        keep_alive: Duration,
    ) -> Self {
        Self {
            router,
            limits,
            max_body_bytes,
            keep_alive,
            cors_origins: vec!["tauri://localhost".into(), "http://tauri.localhost".into()],
            limiters: Arc::new(auth::Limiters::new(&auth::AccessPolicy::default())),
            access: auth::AccessPolicy::default(),
            membership: None,
            metrics: prometheus(),
        }
    }

    /// Offers `POST /admin/tiers/{tier}/endpoints` and `DELETE /admin/tiers/{tier}/endpoints/{name}`,
    /// building joined endpoints as `membership`'s configuration says.
    pub fn with_membership(
        mut self,
        membership: Arc<jemma_router::membership::Membership>,
    ) -> Self {
        self.membership = Some(membership);
        self
    }

    /// Replaces the key/rate-limit policy.
    pub fn with_access(mut self, access: auth::AccessPolicy) -> Self {
        self.limiters = Arc::new(auth::Limiters::new(&access));
        self.access = access;
        self
    }

    /// Charges one request to the caller's rate budget.
    pub(crate) fn charge(
        &self,
        caller: &auth::Caller,
        media: bool,
    ) -> Result<(), jemma_router::RouterError> {
        self.limiters
            .check(caller, media)
            .map_err(|wait| jemma_router::RouterError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            })
    }

    /// Replaces the CORS origin list.
    pub fn with_cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = state
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("anthropic-version"),
            // What Anthropic's SDKs send from a browser (accepted; no beta changes behaviour here).
            header::HeaderName::from_static("anthropic-beta"),
            header::HeaderName::from_static("anthropic-dangerous-direct-browser-access"),
        ])
        // The chat window reads these (busy banners, routing badge).
        .expose_headers([
            header::RETRY_AFTER,
            header::HeaderName::from_static("x-jemma-tier"),
        ]);
    // The chat page's files, each on its own path (a fixed list, so no path walks the disk).
    let pages = web::FILES.iter().fold(Router::new(), |r, (path, _, _)| {
        r.route(path, get(web::page))
    });
    pages
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/models", get(handlers::models))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/v1/models/{id}", get(handlers::model))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/admin/tiers/{tier}", post(handlers::set_tier))
        .route("/admin/tiers/{tier}/model", post(handlers::set_tier_model))
        .route(
            "/admin/tiers/{tier}/endpoints",
            post(handlers::join_endpoint),
        )
        .route(
            "/admin/tiers/{tier}/endpoints/{name}",
            axum::routing::delete(handlers::leave_endpoint),
        )
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .layer(cors)
        // A clean 429/503 is an answer, not a server fault: keep it out of error-level logs.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves; in-flight requests (and streams) drain first.
/// Every accepted connection is set `TCP_NODELAY` ([`no_delay`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // The peer address decides who is a loopback caller (exempt from keys by default): without it every
    // caller would look local.
    axum::serve(
        listener.tap_io(no_delay),
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Turns off Nagle's algorithm on an accepted connection, as llama-server, uvicorn (vLLM) and TGI do. With
/// it on, a small write waits until the peer acknowledges the previous one, and a peer delays its
/// acknowledgement by up to 40 ms: a stream's first token, written just after the response headers, waited
/// for it whenever it came sooner (on loopback, a warm prompt's first token arrived at 73-92 ms, together
/// with the next one, instead of at 34-46 ms), and so may any token of a fast stream after a pause.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `serve` applies to each accepted connection turns Nagle's algorithm off.
    #[tokio::test]
    async fn no_delay_turns_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tcp, _) = listener.accept().await.unwrap();
        // The default, so that the test can fail.
        assert!(!tcp.nodelay().unwrap());
        no_delay(&mut tcp);
        assert!(tcp.nodelay().unwrap());
    }
}
