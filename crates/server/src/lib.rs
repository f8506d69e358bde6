//! The HTTP face of rtpay: the native `/v1` API, operator routes, health, metrics and the OpenAPI
//! document.
//!
//! Invariants this crate protects:
//! - bad input never changes state and never gets a 5xx: every request is parsed and checked in
//!   full before anything is submitted, and every error names the field and the rule;
//! - another tenant's ids do not exist: every read and write is keyed by the caller's tenant;
//! - no secret appears in a log line, an error or a response other than the one that creates it.

// `Problem` is the error of every handler and is returned by value: errors are the cold path, and
// boxing them would only move the allocation.
#![allow(clippy::result_large_err)]

pub mod audit_trail;
pub mod auth;
pub mod card_network;
pub mod clock;
pub mod contract;
pub mod dto;
pub mod iso8583;
pub mod json;
pub mod json_objects;
pub mod jws;
pub mod limits;
pub mod linger;
pub mod metrics;
pub mod oauth;
pub mod pix_rail;
pub mod pix_return;
pub mod problem;
pub mod proxy;
pub mod routes;
pub mod spi;
pub mod tls;
pub mod vault_service;
pub mod webhook;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use utoipa::OpenApi;

use crate::problem::Problem;

/// Shared by every handler: one reference-counted pointer, so the clones axum makes for every
/// request and layer cost one atomic increment (cloning the fields one by one was a tenth of the
/// HTTP workers' time).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<store::Store>,
    pub keys: Arc<auth::Keys>,
    pub key_cache: Arc<auth::KeyCache>,
    pub metrics: Arc<metrics::Metrics>,
    /// The Ed25519 key that verifies the audit log's tree heads.
    pub audit_public_key: Arc<Vec<u8>>,
    /// Requests per tenant (per node).
    pub tenant_rate: Arc<limits::Buckets<u128>>,
    pub auth_guard: Arc<limits::AuthGuard>,
    /// Sensitive data at rest; `None`: holder routes answer 503.
    pub vault: Option<Arc<vault_service::VaultService>>,
    pub card_settings: card_network::CardSettings,
    pub pix: pix_rail::PixSettings,
    pub pix_runtime: Arc<pix_rail::PixRuntime>,
    /// One card's network messages are taken one at a time on a node (see `card_network`).
    pub card_locks: Arc<card_network::CardLocks>,
    /// Delivers webhook notifications; `None`: none are sent.
    pub webhooks: Option<Arc<webhook::WebhookClient>>,
    /// Proxies whose `X-Forwarded-For` names the client (none by default).
    pub trusted_proxies: proxy::TrustedProxies,
    /// The bearer token `/metrics` asks for; `None`: it asks for none.
    pub metrics_token: Option<routes::ops::MetricsToken>,
}

/// Requests per second a tenant may make on one node, by default, and its burst.
pub const TENANT_RATE_DEFAULT: f64 = 50_000.0;

impl AppState {
    pub fn new(store: Arc<store::Store>, keys: auth::Keys, audit_public_key: Vec<u8>) -> AppState {
        AppState(Arc::new(Shared {
            store,
            keys: Arc::new(keys),
            key_cache: Arc::new(auth::KeyCache::default()),
            metrics: Arc::new(metrics::Metrics::default()),
            audit_public_key: Arc::new(audit_public_key),
            tenant_rate: Arc::new(limits::Buckets::new(TENANT_RATE_DEFAULT, TENANT_RATE_DEFAULT)),
            auth_guard: Arc::new(limits::AuthGuard::default()),
            vault: None,
            card_settings: card_network::CardSettings::default(),
            pix: pix_rail::PixSettings::default(),
            pix_runtime: Arc::default(),
            card_locks: Arc::default(),
            webhooks: None,
            trusted_proxies: proxy::TrustedProxies::default(),
            metrics_token: None,
        }))
    }

    /// For the builders below, which run before the state is shared.
    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }

    pub fn with_vault(mut self, vault: vault_service::VaultService) -> AppState {
        self.shared_mut().vault = Some(Arc::new(vault));
        self
    }

    pub fn with_pix(mut self, settings: pix_rail::PixSettings) -> AppState {
        self.shared_mut().pix_runtime =
            Arc::new(pix_rail::PixRuntime::new(Arc::new(spi::Simulator(settings.simulator))));
        self.shared_mut().pix = settings;
        self
    }

    pub fn with_webhooks(mut self, client: webhook::WebhookClient) -> AppState {
        self.shared_mut().webhooks = Some(Arc::new(client));
        self
    }

    pub fn with_card_settings(mut self, settings: card_network::CardSettings) -> AppState {
        self.shared_mut().card_settings = settings;
        self
    }

    pub fn with_metrics_token(mut self, token: Option<routes::ops::MetricsToken>) -> AppState {
        self.shared_mut().metrics_token = token;
        self
    }

    pub fn with_trusted_proxies(mut self, proxies: proxy::TrustedProxies) -> AppState {
        self.shared_mut().trusted_proxies = proxies;
        self
    }

    /// Sets each tenant's request rate (per second, per node) and burst.
    pub fn with_tenant_rate(mut self, per_second: f64, burst: f64) -> AppState {
        self.shared_mut().tenant_rate = Arc::new(limits::Buckets::new(per_second, burst));
        self
    }
}

use contract::Contract;

#[derive(OpenApi)]
#[openapi(
    info(title = "rtpay native API", version = "1", description = "Accounts and transfers on a strict double-entry ledger. Amounts are integer minor units; ids are UUIDs; errors are application/problem+json."),
    paths(
        routes::tenants::create_tenant, routes::tenants::create_api_key, routes::tenants::revoke_api_key,
        routes::accounts::create_account, routes::accounts::get_account, routes::accounts::close_account,
        routes::accounts::list_account_transfers,
        routes::transfers::create_transfer, routes::transfers::create_batch, routes::transfers::get_transfer,
        routes::transfers::post_pending, routes::transfers::void_pending,
        routes::holders::create_holder, routes::holders::get_holder, routes::holders::set_address, oauth::create_client, oauth::revoke_client, routes::keys::rotate_keys,
        routes::audit::list_entries, routes::audit::tree_head, routes::audit::inclusion_proof,
        routes::audit::consistency_proof,
        routes::cards::create_product, routes::cards::get_product, routes::cards::create_card, routes::cards::get_card,
        routes::cards::card_action, routes::cards::card_authorizations, routes::cards::get_authorization,
        routes::pix::create_key, routes::pix::delete_key, routes::pix::lookup_key, routes::pix::decode_brcode,
        routes::pix::encode_brcode, routes::pix::brcode_png, routes::pix::brcode_svg, routes::pix::create_payment,
        routes::pix::get_payment, routes::pix::get_limits, routes::pix::set_limits, routes::pix::sandbox_incoming, routes::pix::webhook_secret, routes::pix::rotate_webhook_secret, routes::pix::webhook_delivery, routes::pix::webhook_redeliver, routes::med::open_claim, routes::med::get_claim, routes::med::resolve_claim,
    ),
    modifiers(&Contract)
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    use routes::*;
    Router::new()
        .route("/v1/tenants", post(tenants::create_tenant))
        .route("/v1/tenants/{id}/api-keys", post(tenants::create_api_key))
        .route("/v1/tenants/{id}/api-keys/{key_id}", axum::routing::delete(tenants::revoke_api_key))
        .route("/v1/accounts", post(accounts::create_account))
        .route("/v1/accounts/{id}", get(accounts::get_account))
        .route("/v1/accounts/{id}/close", post(accounts::close_account))
        .route("/v1/accounts/{id}/transfers", get(accounts::list_account_transfers))
        .route("/v1/transfers", post(transfers::create_transfer))
        .route("/v1/transfers/batch", post(transfers::create_batch))
        .route("/v1/transfers/{id}", get(transfers::get_transfer))
        .route("/v1/transfers/{id}/post", post(transfers::post_pending))
        .route("/v1/transfers/{id}/void", post(transfers::void_pending))
        .route("/oauth/token", post(crate::oauth::token))
        .route("/v1/oauth-clients", post(crate::oauth::create_client))
        .route("/v1/oauth-clients/{id}", axum::routing::delete(crate::oauth::revoke_client))
        .route("/v1/keys/rotate", post(keys::rotate_keys))
        .route("/v1/holders", post(holders::create_holder))
        .route("/v1/holders/{id}", get(holders::get_holder))
        .route("/v1/holders/{id}/address", put(holders::set_address))
        .route("/v1/holders/{id}/pix-limits", get(pix::get_limits).put(pix::set_limits))
        .route("/v1/card-products", post(cards::create_product))
        .route("/v1/card-products/{id}", get(cards::get_product))
        .route("/v1/cards", post(cards::create_card))
        .route("/v1/cards/{id}", get(cards::get_card))
        .route("/v1/cards/{id}/authorizations", get(cards::card_authorizations))
        .route("/v1/cards/{id}/{action}", post(cards::card_action))
        .route("/v1/authorizations/{id}", get(cards::get_authorization))
        .route("/v1/pix/keys", post(pix::create_key))
        .route("/v1/pix/keys/{key}", get(pix::lookup_key).delete(pix::delete_key))
        .route("/v1/pix/brcode", post(pix::encode_brcode))
        .route("/v1/pix/brcode/decode", post(pix::decode_brcode))
        .route("/v1/pix/brcode/qr.png", get(pix::brcode_png))
        .route("/v1/pix/brcode/qr.svg", get(pix::brcode_svg))
        .route("/v1/pix/payments", post(pix::create_payment))
        .route("/v1/pix/payments/{id}", get(pix::get_payment))
        .route("/v1/sandbox/spi/incoming", post(pix::sandbox_incoming))
        .route("/v1/pix/webhook-secret", get(pix::webhook_secret))
        .route("/v1/pix/webhook-secret/rotate", post(pix::rotate_webhook_secret))
        .route("/v1/pix/webhook-deliveries/{e2e}", get(pix::webhook_delivery))
        .route("/v1/pix/webhook-deliveries/{e2e}/retry", post(pix::webhook_redeliver))
        .route("/v1/pix/med", post(med::open_claim))
        .route("/v1/pix/med/{e2e}", get(med::get_claim))
        .route("/v1/pix/med/{e2e}/{action}", post(med::resolve_claim))
        // The Central Bank's API Pix (shared/spec/pix-api/openapi.yaml).
        .route("/api/v2/cob", post(api_pix::cob_post).get(api_pix::cob_list))
        .route("/api/v2/cob/{txid}", put(api_pix::cob_put).patch(api_pix::cob_patch).get(api_pix::cob_get))
        .route("/api/v2/cobv", get(api_pix::cobv::cobv_list))
        .route(
            "/api/v2/cobv/{txid}",
            put(api_pix::cobv::cobv_put).patch(api_pix::cobv::cobv_patch).get(api_pix::cobv::cobv_get),
        )
        .route("/api/v2/lotecobv", get(api_pix::lote::lote_list))
        .route(
            "/api/v2/lotecobv/{id}",
            put(api_pix::lote::lote_put).patch(api_pix::lote::lote_patch).get(api_pix::lote::lote_get),
        )
        .route("/api/v2/loc", post(pix_loc::loc_post).get(pix_loc::loc_list))
        .route("/api/v2/loc/{id}", get(pix_loc::loc_get))
        .route("/api/v2/loc/{id}/txid", axum::routing::delete(pix_loc::loc_unlink))
        // What a charge's location serves (its URL is a capability: no authentication).
        .route("/qr/v2/{token}", get(pix_loc::payload))
        .route("/qr/v2/cobv/{token}", get(api_pix::cobv::payload))
        .route(pix_loc::JWKS_PATH, get(pix_loc::jwks))
        .route("/api/v2/pix", get(api_pix::pix_list))
        .route("/api/v2/pix/{e2eid}", get(api_pix::pix_get))
        .route("/api/v2/pix/{e2eid}/devolucao/{id}", put(api_pix::refund_put).get(api_pix::refund_get))
        .route("/api/v2/webhook", get(api_pix::webhook_list))
        .route(
            "/api/v2/webhook/{chave}",
            put(api_pix::webhook_put).get(api_pix::webhook_get).delete(api_pix::webhook_delete),
        )
        .route("/v1/audit", get(audit::list_entries))
        .route("/v1/audit/tree-head", get(audit::tree_head))
        .route("/v1/audit/proof/inclusion", get(audit::inclusion_proof))
        .route("/v1/audit/proof/consistency", get(audit::consistency_proof))
        .route("/openapi.json", get(ops::openapi))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(ObserveLayer(state.clone()))
        .with_state(state)
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no_route", "no such route; see /openapi.json")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take this method; see /openapi.json",
    )
}

/// Request ids, the audit trail, metrics and the access log, around every request (see
/// [`Observe`]).
#[derive(Clone)]
struct ObserveLayer(AppState);

impl<S> tower_layer::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { state: self.0.clone(), inner }
    }
}

/// The request middleware, as a service of its own: `axum::middleware::from_fn` would clone the
/// route's boxed service and box one more future for every request.
#[derive(Clone)]
struct Observe<S> {
    state: AppState,
    inner: S,
}

impl<S> tower_service::Service<Request> for Observe<S>
where
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let state = self.state.clone();
        let method = metrics::method_name(request.method());
        let mutating = !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let given = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            // Request ids are logged and audited: one that could hold a card number is replaced,
            // printed with dashes or underscores too (`4111-1111-1111-1111`, `4111_1111_1111_1111`).
            .filter(|v| !vault::mask::holds_pan(v) && !vault::mask::holds_pan(&v.replace('_', " ")))
            .map(str::to_owned);
        let request_id = given.unwrap_or_else(next_request_id);
        let source = request
            .extensions()
            .get::<axum::extract::ConnectInfo<Peer>>()
            .map(|c| state.trusted_proxies.client(c.0.addr, request.headers()));
        let action = [method, " ", route.as_ref().map_or("unmatched", MatchedPath::as_str)].concat();
        let slot = Arc::new(audit_trail::Slot::new(action, request_id, source));
        request.extensions_mut().insert(slot.clone());
        // A handler that panics answers 500 and the connection lives on; the panic hook (see
        // `quiet_panics`) logs where, never the message, which could hold request data. The
        // inner service is caught in its call as in its future.
        let inner = &mut self.inner;
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.call(request)));
        Box::pin(async move {
            let handled = match handled {
                Ok(future) => {
                    let mut finishing = Finishing {
                        handler: Some(Box::pin(catch_panic(future))),
                        state: state.clone(),
                        slot: slot.clone(),
                        mutating: mutating && route.is_some(),
                        method,
                        route: route.clone(),
                        started,
                    };
                    let handled = finishing.handler.as_mut().expect("set above").await;
                    finishing.handler = None;
                    handled
                }
                Err(_) => Err(Panicked),
            };
            let mut response = match handled {
                Ok(Ok(response)) => response,
                Ok(Err(infallible)) => match infallible {},
                Err(Panicked) => axum::response::IntoResponse::into_response(Problem::internal()),
            };
            let status = response.status().as_u16();
            // A request no route took (404 `no_route`, 405) reached no handler and changed
            // nothing: it is counted in the metrics and logged, not audited.
            let routed = route.is_some() && status != 405;
            audit_trail::record_after(&state, &slot, mutating && routed, status).await;
            let micros = started.elapsed().as_micros() as u64;
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            state.metrics.observe(method, route, status, micros);
            let request_id = slot.request_id.as_str();
            if status >= 500 {
                tracing::warn!(request_id, method, route, status, micros, "request failed");
            } else {
                tracing::debug!(request_id, method, route, status, micros, "request");
            }
            if let Ok(value) = HeaderValue::from_str(request_id) {
                response.headers_mut().insert("x-request-id", value);
            }
            Ok(response)
        })
    }
}

/// A handler's future, with what its audit entry needs. Dropped unfinished (the connection went
/// away: a client that hung up, a reset), it is finished on a task of its own, and its entry
/// recorded then: a handler may have begun a change that goes on without it (work on the blocking
/// pool runs to its end), and a change is not left out of the audit log. (Not tracked: one still
/// running when the server stops finds the writer stopped, and its entry is logged as not
/// recorded.) The request's answer goes nowhere; the metrics count it under status 499 (the
/// client closed the request, as nginx logs it), or under its own status when that is a 5xx (the
/// node failed it either way, and the server-error alert must see it), with the time its handler
/// took: clients that give up on a stalled node show in the request counts and latencies.
struct Finishing {
    handler: Option<HandlerFuture>,
    state: AppState,
    slot: Arc<audit_trail::Slot>,
    /// It may change something (not a GET or HEAD), and a route took it.
    mutating: bool,
    method: &'static str,
    route: Option<MatchedPath>,
    started: Instant,
}

/// The status the metrics count a request under when its client went away before the answer.
pub const CLIENT_CLOSED: u16 = 499;

type HandlerFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Result<Response, std::convert::Infallible>, Panicked>> + Send>,
>;

impl Drop for Finishing {
    fn drop(&mut self) {
        let Some(handler) = self.handler.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (state, slot, mutating) = (self.state.clone(), self.slot.clone(), self.mutating);
        let (method, route, started) = (self.method, self.route.take(), self.started);
        runtime.spawn(async move {
            let status = match handler.await {
                Ok(Ok(response)) => response.status().as_u16(),
                Ok(Err(infallible)) => match infallible {},
                Err(Panicked) => 500,
            };
            audit_trail::record_after(&state, &slot, mutating && status != 405, status).await;
            let micros = started.elapsed().as_micros() as u64;
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            let counted = if status >= 500 { status } else { CLIENT_CLOSED };
            state.metrics.observe(method, route, counted, micros);
            let request_id = slot.request_id.as_str();
            tracing::info!(request_id, method, route, status, micros, "the client went away before the answer");
        });
    }
}

/// What [`catch_panic`] gives when the future panicked.
#[derive(Debug)]
pub struct Panicked;

/// Polls `future` on the calling task, turning a panic inside it into `Err(Panicked)`: what
/// spawning it and joining the task would give, without handing it to another task and waking
/// this one back (a round trip through the scheduler on every request). A future that panicked
/// is not polled again.
pub async fn catch_panic<F: std::future::Future>(future: F) -> Result<F::Output, Panicked> {
    use std::task::Poll;
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(_) => Poll::Ready(Err(Panicked)),
        }
    })
    .await
}

/// A request id: a random prefix drawn once per process, then a counter. Unique across nodes and
/// restarts for all practical purposes, and no system call per request.
/// `req-<12 hex, per process>-<counter>`. The letters first: stored beside a resource id that
/// ends in digits, an id starting with digits would read as one long digit run to a card-number
/// scan of storage.
pub(crate) fn next_request_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| auth::hex(&auth::random_32()[..6]));
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // As `format!("req-{prefix}-{n:x}")` writes it, digit by digit.
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    let mut id = String::with_capacity(5 + prefix.len() + digits as usize);
    id.push_str("req-");
    id.push_str(prefix);
    id.push('-');
    for i in (0..digits).rev() {
        id.push(char::from_digit(((n >> (4 * i)) & 0xF) as u32, 16).expect("a hex digit"));
    }
    id
}

/// Replaces the panic hook with one that logs the location only: a panic message may format
/// values from a request (a card number, a document), and logs must never hold them.
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(%location, "panic (message withheld)");
        eprintln!("rtpay: panic at {location} (message withheld)");
    }));
}

/// Serves over TLS until `shutdown` resolves; `mutual`: client certificates are verified and bind
/// the connection (see [`tls`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: AppState,
    acceptor: tokio_rustls::TlsAcceptor,
    mutual: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tls::serve(listener, router(state), acceptor, mutual, shutdown).await
}

/// The other end of a connection: its address, and the API key it last proved (see
/// [`auth::ConnectionKey`]). Made once per connection; each request carries a clone, as
/// `ConnectInfo<Peer>`.
#[derive(Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub(crate) key: Arc<auth::ConnectionKey>,
}

impl Peer {
    pub fn new(addr: std::net::SocketAddr) -> Peer {
        Peer { addr, key: Arc::default() }
    }
}

/// How long a client has to send a request's head, and, on a kept-alive connection, to begin
/// the next request once an answer went out: then the connection is closed. Without it, a client
/// that opened connections and sent nothing, or half a head, held them (and their tasks) for good.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The HTTP/1.1 connection settings of every listener: heads time out ([`HEADER_READ_TIMEOUT`]).
pub(crate) fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// Serves `router` on one accepted connection, with `extensions` added to each request (the
/// peer's address; its certificate's identity), until it closes or `watcher`'s shutdown ends it.
pub(crate) async fn serve_connection<I, L>(
    io: I,
    router: Router,
    extensions: L,
    watcher: hyper_util::server::graceful::Watcher,
    addr: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    L: tower_layer::Layer<Router>,
    L::Service: tower_service::Service<Request<hyper::body::Incoming>, Response = Response> + Clone + Send + 'static,
    <L::Service as tower_service::Service<Request<hyper::body::Incoming>>>::Future: Send + 'static,
    <L::Service as tower_service::Service<Request<hyper::body::Incoming>>>::Error:
        std::error::Error + Send + Sync + 'static,
{
    // The extensions wrap the router as one service: `Router::layer` would wrap each route anew,
    // for every connection.
    let service = hyper_util::service::TowerToHyperService::new(extensions.layer(router));
    let conn = http1().serve_connection(hyper_util::rt::TokioIo::new(linger::Lingering::new(io)), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%addr, error = %e, "connection ended with an error");
    }
}

/// Accepts connections until `shutdown` resolves, handing each to `serve` with a watcher of the
/// graceful shutdown, then lets open connections finish. Each answers as it writes, not held back
/// for the peer's acknowledgement of the previous segment (Nagle's algorithm): a response written
/// in parts (a long list) would otherwise wait for the client's delayed ACK, tens of milliseconds.
pub(crate) async fn accept_until(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    mut serve: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr, hyper_util::server::graceful::Watcher),
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        serve(stream, addr, graceful.watcher());
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves until `shutdown` resolves, then lets open connections finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state);
    accept_until(listener, shutdown, |stream, addr, watcher| {
        let peer = axum::Extension(axum::extract::ConnectInfo(Peer::new(addr)));
        tokio::spawn(serve_connection(stream, router.clone(), peer, watcher, addr));
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_and_a_lowercase_hex_counter() {
        let first = next_request_id();
        let second = next_request_id();
        let (head, n) = first.rsplit_once('-').unwrap();
        let (head2, n2) = second.rsplit_once('-').unwrap();
        assert_eq!(head, head2);
        assert!(head.starts_with("req-") && head.len() == 16, "{head}");
        // Other tests may draw ids in between; the counter only grows.
        let (n, n2) = (u64::from_str_radix(n, 16).unwrap(), u64::from_str_radix(n2, 16).unwrap());
        assert!(n2 > n);
        assert_eq!(first, format!("{head}-{n:x}"));
        assert_eq!(second, format!("{head}-{n2:x}"));
    }

    #[tokio::test]
    async fn a_panic_inside_a_caught_future_is_an_error_and_the_task_goes_on() {
        let panicking = catch_panic(async {
            tokio::task::yield_now().await;
            if std::hint::black_box(true) {
                panic!("inside the handler");
            }
            1
        });
        assert!(matches!(panicking.await, Err(Panicked)));
        let fine = catch_panic(async {
            tokio::task::yield_now().await;
            2
        });
        assert_eq!(fine.await.unwrap(), 2);
    }

    /// Through the middleware: a handler that panics answers a 500 problem with the request's id,
    /// is counted in the metrics under its route, and the service answers the next request.
    #[tokio::test]
    async fn the_middleware_answers_a_panicking_handler_with_a_500_and_serves_on() {
        use tower_service::Service;
        let dir = std::env::temp_dir().join(format!("rtpay-observe-{}-{}", std::process::id(), store::now_nanos()));
        let store = Arc::new(store::Store::open(&store::Location::Embedded(dir.clone())).unwrap());
        let state = AppState::new(store, auth::Keys::new([9; 32], "op"), Vec::new());
        async fn boom() -> &'static str {
            if std::hint::black_box(true) {
                panic!("inside the handler");
            }
            "unreachable"
        }
        let mut app = Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(ObserveLayer(state.clone()))
            .with_state(state.clone());
        let request = |path: &str| {
            axum::http::Request::builder().uri(path).header("x-request-id", "given-7").body(axum::body::Body::empty())
        };
        let response = app.call(request("/boom").unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["x-request-id"], "given-7");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let response = app.call(request("/fine").unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // Without a usable id of the client's, the request gets one of ours.
        let unusable = axum::http::Request::builder().uri("/fine").header("x-request-id", "no spaces allowed");
        let response = app.call(unusable.body(axum::body::Body::empty()).unwrap()).await.unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap();
        assert!(id.starts_with("req-") && id.len() > 17, "{id}");
        let metrics = state.metrics.render(&state.store.engine.stats);
        assert!(
            metrics.contains(r#"rtpay_http_requests_total{method="GET",route="/boom",status="500"} 1"#),
            "{metrics}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
