//! Recording requests in the audit log.
//!
//! The `observe` middleware gives each request a [`Slot`]. Authentication fills in who is calling;
//! ledger handlers hand the entry to the writer with their command ([`crate::routes::submit`]), so
//! the action and its record commit together. Every other state-changing request (any method but
//! GET and HEAD), every read that reveals a secret ([`Slot::record_read`]) and every failed
//! authentication is appended by the middleware after the handler,
//! before the response goes out, with the HTTP status as outcome. Throttled requests (429) are not
//! recorded, only counted; a request recorded without an accepted credential counts against its
//! address's budget of failed authentications (see [`record_after`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::problem::Problem;
use crate::AppState;

/// The longest resource an audit entry names (characters).
pub const RESOURCE_LEN_MAX: usize = 200;

/// A client-chosen id (a txid, a refund's id, a number in a path) as the audit log may name it:
/// a digit run that could be a card number is masked. (Ids rtpay makes, and EndToEndIds, whose
/// dates are long digit runs, are named as they are.)
pub fn client_id(id: &str) -> String {
    vault::mask::redact_pans(id)
}

/// What the middleware knows about a request, and what handlers add.
#[derive(Debug, Default)]
pub struct Slot {
    pub action: String,
    pub request_id: String,
    /// The client's address, written out only for the entries that name it.
    source: Option<SocketAddr>,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    tenant: Option<u128>,
    actor: Option<String>,
    resource: Option<String>,
    /// Set when the entry went to the writer with the handler's command.
    recorded: bool,
    /// Set by a reading handler whose read is itself an action to record (a secret revealed).
    wanted: bool,
    /// Set when the request was counted as a failed authentication against its source.
    failure_counted: bool,
}

impl Slot {
    pub fn new(action: String, request_id: String, source: Option<SocketAddr>) -> Slot {
        Slot { action, request_id, source, ..Slot::default() }
    }

    /// The client's address as entries record it (empty when unknown; without the port when a
    /// trusted proxy named the client, see [`crate::proxy`]).
    pub fn source(&self) -> String {
        match self.source {
            Some(addr) if addr.port() == 0 => addr.ip().to_string(),
            Some(addr) => address(addr),
            None => String::new(),
        }
    }

    /// The client's address (port 0 when a trusted proxy named it).
    pub fn client(&self) -> Option<SocketAddr> {
        self.source
    }

    pub fn set_actor(&self, tenant: Option<u128>, actor: String) {
        let mut s = self.state.lock().expect("audit slot lock");
        s.tenant = tenant;
        s.actor = Some(actor);
    }

    /// Names what the request acted on: parsed ids, and client-chosen ones through
    /// [`client_id`]. Cut at [`RESOURCE_LEN_MAX`] characters (the audit log is append-only).
    pub fn set_resource(&self, resource: impl Into<String>) {
        let mut resource = resource.into();
        if let Some((cut, _)) = resource.char_indices().nth(RESOURCE_LEN_MAX) {
            resource.truncate(cut);
        }
        self.state.lock().expect("audit slot lock").resource = Some(resource);
    }

    /// The entry as it stands; `outcome` empty means "filled from the ledger's reply".
    pub fn draft(&self, outcome: String) -> audit::Draft {
        let s = self.state.lock().expect("audit slot lock");
        audit::Draft {
            tenant: s.tenant,
            actor: s.actor.clone().unwrap_or_else(|| "anonymous".to_owned()),
            action: self.action.clone(),
            resource: s.resource.clone().unwrap_or_default(),
            request_id: self.request_id.clone(),
            source: self.source(),
            outcome,
        }
    }

    /// The request is recorded though it changes nothing: it reveals a secret.
    pub fn record_read(&self) {
        self.state.lock().expect("audit slot lock").wanted = true;
    }

    fn wanted(&self) -> bool {
        self.state.lock().expect("audit slot lock").wanted
    }

    /// The request was counted as a failed authentication (`auth::count_failure`).
    pub fn mark_failure_counted(&self) {
        self.state.lock().expect("audit slot lock").failure_counted = true;
    }

    /// No credential was accepted and no failure counted: who sent it is unknown.
    fn unaccounted(&self) -> bool {
        let s = self.state.lock().expect("audit slot lock");
        s.actor.is_none() && !s.failure_counted
    }

    pub fn mark_recorded(&self) {
        self.state.lock().expect("audit slot lock").recorded = true;
    }

    /// The batch that carried the entry was not committed: the middleware records the request
    /// (as answered) instead.
    pub fn mark_unrecorded(&self) {
        self.state.lock().expect("audit slot lock").recorded = false;
    }

    pub fn recorded(&self) -> bool {
        self.state.lock().expect("audit slot lock").recorded
    }
}

/// `a.b.c.d:port` (as `Display` writes it, without its formatting machinery: a fifth of the
/// request middleware's own time); other addresses through `Display`.
fn address(addr: SocketAddr) -> String {
    let SocketAddr::V4(v4) = addr else { return addr.to_string() };
    let mut out = Vec::with_capacity(21);
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        crate::dto::push_decimal(&mut out, u64::from(octet));
    }
    out.push(b':');
    crate::dto::push_decimal(&mut out, u64::from(v4.port()));
    String::from_utf8(out).expect("ASCII digits and separators")
}

/// The request's slot, for handlers.
#[derive(Clone, Debug)]
pub struct Audit(pub Arc<Slot>);

impl FromRequestParts<AppState> for Audit {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Problem> {
        // Outside the middleware (never in the served router) a detached slot records nothing.
        Ok(Audit(parts.extensions.get::<Arc<Slot>>().cloned().unwrap_or_default()))
    }
}

/// Records who is calling on the request's slot, if it has one.
pub fn identify(parts: &Parts, tenant: Option<u128>, actor: String) {
    if let Some(slot) = parts.extensions.get::<Arc<Slot>>() {
        slot.set_actor(tenant, actor);
    }
}

/// Appends the slot's entry after the handler, when the request needs one and it is not recorded
/// yet. A failure to record is logged and counted; the response (already decided) goes out.
pub async fn record_after(state: &AppState, slot: &Slot, mutating: bool, status: u16) {
    if slot.recorded() || !(mutating || status == 401 || slot.wanted()) {
        return;
    }
    // A throttled request (429) did nothing and was not judged: recording each would turn a flood
    // into a flood of writes. They are counted in the request metrics; a lock itself is recorded.
    if status == 429 {
        return;
    }
    // Refused (4xx) though no credential was accepted, and not counted as a failed
    // authentication (`/oauth/token` refused before its client is known): counted as one now.
    // Every route checks the address's budget before it looks at a credential, so a flood of
    // them is answered 429, and those are not recorded: without this, anyone could grow the
    // append-only log, and fill the writer's queue, at wire speed. (A 5xx is rtpay's failure,
    // not the client's: a key look-up during an outage costs the client nothing.)
    if slot.unaccounted() && (400..500).contains(&status) {
        let source = slot.client().map(|a| crate::auth::canonical(a.ip()));
        let _ = state.auth_guard.failed(source, None, std::time::Instant::now());
    }
    let draft = slot.draft(status.to_string());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let submitted = state.store.engine.submit(store::Command::Audit(vec![draft]), Box::new(move |r| drop(tx.send(r))));
    let result = match submitted {
        Ok(()) => rx.await.unwrap_or_else(|_| Err(store::StoreError::Unavailable("writer stopped".into()))),
        Err(e) => Err(e),
    };
    if let Err(error) = result {
        state.metrics.audit_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(request_id = slot.request_id, %error, "audit entry not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for text in
            ["127.0.0.1:54321", "0.0.0.0:0", "255.255.255.255:65535", "10.20.3.4:8080", "[::1]:443", "[2001:db8::7]:1"]
        {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(address(addr), addr.to_string());
            assert_eq!(address(addr), text);
        }
    }
}
