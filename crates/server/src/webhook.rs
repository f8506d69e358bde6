//! Webhook notifications of received Pix (API Pix `PUT /webhook/{chave}`, callback `listaPix`):
//! when a Pix with a txid arrives on a key with a webhook, or one of its refunds reaches a final
//! status, its `{"pix":[...]}` body is POSTed to
//! `{webhookUrl}/pix` over TLS — with rtpay's client certificate when one is configured (the API
//! Pix asks for mTLS) — signed with HMAC-SHA256 under the tenant's webhook secret
//! (`x-rtpay-signature: sha256=<hex>` over `{x-rtpay-timestamp}.{x-rtpay-delivery}.{body}`, the
//! exact body bytes), and retried with exponential
//! backoff until the receiver answers 2xx or the tries run out. Every attempt is recorded in the
//! delivery's document (`GET /v1/pix/webhook-deliveries/{id}`: the EndToEndId for the receipt,
//! `{e2e}:{refund id}` for a refund), and the id goes with every POST (`x-rtpay-delivery`).
//!
//! The delivery is due from the commit on: the Pix's writer batch also writes its delivery record,
//! `pending` and marked as an outbox entry (with the key and the body to send), leased to the
//! committing node, which delivers it right after. Each attempt, and each wait between two,
//! renews the lease by compare and set on the record; every node sweeps the outbox every 2 s and
//! takes over a delivery whose lease ran out (its node stopped), from the attempts already made.
//! A sender that finds the record changed by another stops. So a notification is delivered at
//! least once: a receiver may see one twice if a node stops between a 2xx and its record, or when
//! asked to send it again ([`redeliver`]); `x-rtpay-delivery` tells notifications apart.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::AppState;

pub const WEBHOOK_KIND: &str = "pix-webhook";
pub const DELIVERY_KIND: &str = "pix-webhook-delivery";
/// Attempts per notification. With the default waits (1 s, doubling, at most 1 hour) they span
/// about 12 hours: a receiver down for a night's maintenance still gets its notifications.
pub const TRIES: u32 = 24;
/// The longest wait between two attempts when none is configured.
pub const RETRY_WAIT_MAX_DEFAULT: Duration = Duration::from_secs(3600);
pub const URL_LEN_MAX: usize = 512;
/// How long one attempt may take (connect, TLS, answer).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to one of a receiver's addresses may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How notifications leave: whom they trust, who they are, how they retry.
#[derive(Clone, Debug, Default)]
pub struct WebhookSettings {
    /// PEM roots the receivers' certificates are checked against; `None`: the system's bundle.
    pub ca: Option<PathBuf>,
    /// rtpay's client certificate and key (PEM), presented to receivers.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The first wait between tries (doubling after each).
    pub retry_base: Duration,
    /// The longest wait between two tries; zero: [`RETRY_WAIT_MAX_DEFAULT`].
    pub retry_max: Duration,
    /// Whether receivers may be on loopback, private or link-local addresses (labs and tests);
    /// off, a tenant cannot make rtpay call into its own network.
    pub allow_private: bool,
}

/// Attempts being made at once by a node, at most; beyond, a notification waits for a sweep.
pub const IN_FLIGHT_MAX: usize = 1024;
/// Name look-ups under way at once on a node, and for one tenant, at most (each holds a thread
/// of the blocking pool every storage query shares, 512 threads, for as long as the resolver
/// takes); an attempt that finds none free fails (and counts as a try).
pub const LOOKUPS_MAX: usize = 128;
pub const TENANT_LOOKUPS_MAX: usize = 8;
/// Notifications waiting in memory for their next attempt, at most, on a node and for one
/// tenant; beyond, one ends its task and a sweep takes it up when its wait is over (its lease
/// says when). With 24 tries over 12 hours, a busy tenant's dead receiver would otherwise keep
/// millions of waits in memory, or, with the node's bound alone, push every other tenant's waits
/// to the sweep.
pub const WAITING_MAX: usize = 20_000;
pub const TENANT_WAITING_MAX: usize = 2_000;
/// Attempts being made at once for one tenant, at most: a tenant whose receiver swallows
/// connections holds at most this share of the node's attempts, never all of them.
pub const TENANT_IN_FLIGHT_MAX: usize = 64;

/// Room for attempts: the node's and each tenant's. Taken for one attempt only, and given back
/// during the waits between attempts.
struct Slots {
    node: Arc<tokio::sync::Semaphore>,
    tenants: std::sync::Mutex<std::collections::HashMap<u128, usize>>,
    tenant_max: usize,
}

/// One attempt's room, given back when dropped. Owned, so that a blocking name look-up the
/// attempt started can keep it after the attempt timed out (see [`resolve`]).
struct Slot {
    slots: Arc<Slots>,
    tenant: u128,
    _node: tokio::sync::OwnedSemaphorePermit,
}

impl Slots {
    fn new(node_max: usize, tenant_max: usize) -> Slots {
        Slots { node: Arc::new(tokio::sync::Semaphore::new(node_max)), tenants: Default::default(), tenant_max }
    }

    /// Room for one attempt of `tenant`'s, if the node and the tenant have some.
    fn take(self: &Arc<Self>, tenant: u128) -> Option<Slot> {
        let node = self.node.clone().try_acquire_owned().ok()?;
        let mut tenants = self.tenants.lock().expect("webhook slots");
        let taken = tenants.entry(tenant).or_default();
        if *taken >= self.tenant_max {
            return None;
        }
        *taken += 1;
        Some(Slot { slots: self.clone(), tenant, _node: node })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut tenants = self.slots.tenants.lock().expect("webhook slots");
        if let Some(taken) = tenants.get_mut(&self.tenant) {
            *taken -= 1;
            if *taken == 0 {
                tenants.remove(&self.tenant);
            }
        }
    }
}

/// Whether `ip` is an address on the public internet (not loopback, private, link-local,
/// carrier-grade NAT, documentation, benchmarking, reserved, unspecified or multicast). An IPv6
/// address that carries an IPv4 one (mapped, compatible, NAT64's well-known prefix, 6to4) is
/// judged by that; the other translation and tunnelling prefixes (local NAT64, Teredo) and
/// site-local addresses are refused.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |high: u16, low: u16| {
                std::net::Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(std::net::IpAddr::V4(v4));
            }
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_public(std::net::IpAddr::V4(embedded(s[6], s[7])));
            }
            // SIIT's IPv4-translated form (`::ffff:0:a.b.c.d`, RFC 2765).
            if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
                return is_public(std::net::IpAddr::V4(embedded(s[6], s[7])));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(std::net::IpAddr::V4(embedded(s[6], s[7])));
            }
            if s[0] == 0x2002 {
                return is_public(std::net::IpAddr::V4(embedded(s[1], s[2])));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || (s[0] == 0x2001 && s[1] == 0)
                || (s[0] == 0x2001 && s[1] == 0xdb8)
                || s[..4] == [0x100, 0, 0, 0])
        }
    }
}

/// The host (without brackets) and port of a URL's authority: `host`, `host:port`, `[v6]` or
/// `[v6]:port`; the port defaults to 443.
pub(crate) fn host_and_port(authority: &str) -> Result<(&str, u16), &'static str> {
    let parse = |p: &str| p.parse::<u16>().map_err(|_| "a bad port");
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("a bad host name")?;
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, parse(port)?)),
            None if after.is_empty() => Ok((host, 443)),
            None => Err("a bad host name"),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host, parse(port)?)),
        None => Ok((authority, 443)),
    }
}

/// The TLS client for deliveries, built once at start (every error names the file).
pub struct WebhookClient {
    connector: tokio_rustls::TlsConnector,
    retry_base: Duration,
    retry_max: Duration,
    pub allow_private: bool,
    slots: Arc<Slots>,
    lookups: Arc<Slots>,
    waiting: Arc<Slots>,
}

impl WebhookClient {
    pub fn new(settings: &WebhookSettings) -> Result<WebhookClient, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = settings.ca.clone().unwrap_or_else(|| PathBuf::from(store::SYSTEM_ROOTS));
        let roots = if ca.exists() || settings.ca.is_some() {
            store::pem_roots(&ca).map_err(|e| format!("--webhook-ca {e}"))?
        } else {
            rustls::RootCertStore::empty()
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match &settings.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("--webhook-client-cert {}: {e}", cert.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--webhook-client-cert {}: not PEM certificates: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("--webhook-client-key {}: no PEM private key: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("--webhook-client-cert: {e}"))?
            }
        };
        // Bounded: a lease is the wait plus an attempt's time, in nanoseconds.
        let retry_base = if settings.retry_base.is_zero() { Duration::from_secs(1) } else { settings.retry_base }
            .min(Duration::from_secs(3600));
        let retry_max = if settings.retry_max.is_zero() { RETRY_WAIT_MAX_DEFAULT } else { settings.retry_max }
            .min(Duration::from_secs(86_400));
        Ok(WebhookClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            retry_base,
            retry_max,
            allow_private: settings.allow_private,
            slots: Arc::new(Slots::new(IN_FLIGHT_MAX, TENANT_IN_FLIGHT_MAX)),
            lookups: Arc::new(Slots::new(LOOKUPS_MAX, TENANT_LOOKUPS_MAX)),
            waiting: Arc::new(Slots::new(WAITING_MAX, TENANT_WAITING_MAX)),
        })
    }

    /// One POST of `body` to an `https://` URL, signed under each of `secrets`, in `slot`; the
    /// answer's status.
    async fn post(
        &self,
        slot: Slot,
        url: &str,
        body: Bytes,
        secrets: &[[u8; 32]],
        delivery: &str,
    ) -> Result<u16, String> {
        let rest = url.strip_prefix("https://").ok_or("not an https:// URL")?;
        let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
        let (host, port) = host_and_port(authority)?;
        let host_name = host.to_owned();
        let server_name = ServerName::try_from(host_name.clone()).map_err(|_| "a bad host name")?;
        // Resolved once and checked, then connected to those addresses, in turn (no second
        // resolution). A name that does not resolve and one that resolves to private addresses
        // only are told apart nowhere a tenant can read: that would map rtpay's own network.
        const NO_PUBLIC_ADDRESS: &str = "refused: the host has no public address";
        let lookup = {
            let host_name = host_name.clone();
            move || std::net::ToSocketAddrs::to_socket_addrs(&(host_name.as_str(), port)).map(Vec::from_iter)
        };
        let (_slot, found) = resolve(slot, &self.lookups, lookup).await;
        if let Err(e) = &found {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(e.to_string());
            }
        }
        let addrs: Vec<std::net::SocketAddr> = match found {
            Ok(found) => found.into_iter().filter(|a| self.allow_private || is_public(a.ip())).collect(),
            // With private receivers allowed there is nothing to hide: the resolver's own words.
            Err(e) if self.allow_private => return Err(format!("resolve: {e}")),
            Err(e) => {
                tracing::debug!(error = %e, "a webhook's host did not resolve");
                Vec::new()
            }
        };
        if addrs.is_empty() {
            return Err(NO_PUBLIC_ADDRESS.into());
        }
        let mut tried = Err(String::new());
        for addr in addrs {
            // Each its own time: an address that swallows packets leaves the others theirs.
            tried = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(connected) => connected.map_err(|e| format!("connect: {e}")),
                Err(_) => Err("connect: timed out".into()),
            };
            if tried.is_ok() {
                break;
            }
        }
        let tcp = tried?;
        let tls = self.connector.connect(server_name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        // Signed as it leaves: the timestamp is this attempt's.
        let timestamp = store::now_nanos() / 1_000_000_000;
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-rtpay-timestamp", timestamp)
            .header("x-rtpay-delivery", delivery)
            .header("x-rtpay-signature", signatures(secrets, timestamp, delivery, &body))
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        // The status is the answer; the body is not read (nor kept).
        Ok(response.status().as_u16())
    }
}

/// A webhook as stored (the document's id is the key's blind index).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredWebhook {
    pub url: String,
    pub key_sealed: String,
    pub created_at: u64,
}

/// A notification's record.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Delivery {
    pub end_to_end_id: String,
    /// The refund (`devolucao` id) whose final status this notifies; absent: the Pix's receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
    pub url: String,
    /// `pending`, `delivered` or `failed` (every try used).
    pub status: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: String,
}

/// One generation of a tenant's webhook signing secret (32 bytes, derived from the server's
/// secret key as two UUID-shaped halves: 244 bits of it vary; generation 0 is the one every
/// tenant starts with).
pub fn secret(state: &AppState, tenant: u128, generation: u32) -> [u8; 32] {
    let which = if generation == 0 { String::new() } else { format!("g{generation}") };
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(state.keys.derived_id(b"pix-webhook-secret-1", tenant, &which).as_bytes());
    out[16..].copy_from_slice(state.keys.derived_id(b"pix-webhook-secret-2", tenant, &which).as_bytes());
    out
}

/// The document recording a tenant's secret generation (absent: generation 0, nothing before it).
pub const SECRET_KIND: &str = "pix-webhook-secret";
const SECRET_ID: &str = "generation";

/// How long the secret before a rotation still signs, by default, and at most.
pub const OVERLAP_DEFAULT_SECONDS: u64 = 86_400;
pub const OVERLAP_MAX_SECONDS: u64 = 7 * 86_400;

/// Earlier secrets that sign beside the current one at most (beyond it, the overlap that ends
/// soonest ends first).
const EARLIER_MAX: usize = 3;

/// A tenant's secret generation: the current one signs every notification, and each earlier one
/// still in its overlap too, so that receivers can take a new secret on without refusing a
/// notification meanwhile. Each rotation's overlap runs its own course: rotating twice in a row
/// (a retried request) does not cut short the overlap of the secret the receivers hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretGeneration {
    pub generation: u32,
    /// Earlier generations and until when (ns) each signs, newest first.
    #[serde(default)]
    pub earlier: Vec<(u32, u64)>,
}

impl SecretGeneration {
    /// The generations that sign at `now`, the current one first, then the earlier ones, newest
    /// first.
    pub fn signing(&self, now: u64) -> Vec<u32> {
        let earlier = self.earlier.iter().filter(|(_, until)| now < *until).map(|(g, _)| *g);
        std::iter::once(self.generation).chain(earlier).collect()
    }

    /// Until when the last earlier secret signs, if one still does at `now`.
    pub fn overlap_until(&self, now: u64) -> Option<u64> {
        self.earlier.iter().map(|(_, until)| *until).filter(|until| now < *until).max()
    }

    /// The next generation: this one signs `overlap_ns` more beside it, with the earlier ones
    /// still in their overlaps; with no overlap, none of them signs any more (a leak).
    fn rotated(&self, now: u64, overlap_ns: u64) -> Option<SecretGeneration> {
        let mut earlier = Vec::new();
        if overlap_ns > 0 {
            // The secret just retired always signs through its overlap; of the earlier ones, past
            // the cap, the overlaps that end soonest go, not the oldest generations: a burst of
            // short rotations does not cut short the long overlap receivers rely on.
            let mut others: Vec<_> = self.earlier.iter().copied().filter(|(_, until)| now < *until).collect();
            others.sort_unstable_by_key(|(_, until)| std::cmp::Reverse(*until));
            others.truncate(EARLIER_MAX - 1);
            others.sort_unstable_by_key(|(generation, _)| std::cmp::Reverse(*generation));
            earlier.push((self.generation, now.saturating_add(overlap_ns)));
            earlier.extend(others);
        }
        Some(SecretGeneration { generation: self.generation.checked_add(1)?, earlier })
    }
}

/// The tenant's secret generation as stored, and the document's version (0: none stored).
pub fn secret_generation(q: &dyn store::Queries, tenant: u128) -> store::Result<(SecretGeneration, u64)> {
    match crate::pix_rail::read_document::<SecretGeneration>(q, SECRET_KIND, tenant, SECRET_ID)? {
        Some((doc, generation)) => Ok((generation, doc.version)),
        None => Ok((SecretGeneration::default(), 0)),
    }
}

/// Moves the tenant to a new secret generation (see [`SecretGeneration::rotated`]). `None` if
/// another rotation was stored first (compare and set on the document's version).
pub fn rotate_secret(
    q: &dyn store::Queries,
    tenant: u128,
    now: u64,
    overlap_ns: u64,
) -> store::Result<Option<SecretGeneration>> {
    let (current, version) = secret_generation(q, tenant)?;
    let next = current
        .rotated(now, overlap_ns)
        .ok_or_else(|| store::StoreError::Corrupt("secret generations exhausted".into()))?;
    let doc = store::Document {
        kind: SECRET_KIND.into(),
        tenant_id: tenant,
        id: SECRET_ID.into(),
        lookup: None,
        owner: None,
        created_at: now,
        version: version + 1,
        body: serde_json::to_string(&next).expect("serializable"),
    };
    Ok(q.put_document(&doc, version)?.then_some(next))
}

/// The signature of one POST: HMAC-SHA256 over `{timestamp}.{delivery}.{body}`, so that neither
/// the delivery's id (what a receiver tells repeats by) nor the time (what it refuses stale
/// replays by) can be changed without the secret.
pub fn sign(secret: &[u8; 32], timestamp: u64, delivery: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.{delivery}.").as_bytes());
    mac.update(body);
    format!("sha256={}", crate::auth::hex(&mac.finalize().into_bytes()))
}

/// The `x-rtpay-signature` header: one signature per secret, comma-separated, the current
/// secret's first (two while a rotation's overlap lasts). A receiver accepts the notification if
/// any of them checks out under a secret it holds.
pub fn signatures(secrets: &[[u8; 32]], timestamp: u64, delivery: &str, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, timestamp, delivery, body)).collect::<Vec<_>>().join(",")
}

/// The owner that marks a delivery still to be made (listed across tenants by every node's sweep).
pub const OUTBOX: &str = "webhook-outbox";
/// How often a node looks for pending deliveries whose sender's lease ran out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Pending deliveries one sweep looks at.
const SWEEP_MAX: usize = 256;
/// Slack on a lease beyond the attempt or the wait it covers.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// What a pending delivery needs to be made, and until when its sender holds it.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Outbox {
    key_index: String,
    pix: serde_json::Value,
    /// Nanoseconds; past it, any node's sweep may take the delivery over.
    #[serde(default)]
    lease_until: u64,
}

/// A delivery's document: its record, and while pending, what it sends.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct StoredDelivery {
    #[serde(flatten)]
    delivery: Delivery,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outbox: Option<Outbox>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether `id` has the form of a [`delivery_id`]: an EndToEndId, then a refund id (1 to 35
/// letters and digits) after a colon for a refund's notification.
pub fn is_delivery_id(id: &str) -> bool {
    let (e2e, refund) = match id.split_once(':') {
        Some((e2e, refund)) => (e2e, Some(refund)),
        None => (id, None),
    };
    pix::ids::end_to_end_id_shape('E', e2e)
        && refund.is_none_or(|r| (1..=35).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// A delivery's id: the Pix's EndToEndId for its receipt, `{e2e}:{refund id}` for a refund's
/// final status.
pub fn delivery_id(e2e: &str, refund: Option<&str>) -> String {
    match refund {
        Some(id) => format!("{e2e}:{id}"),
        None => e2e.to_owned(),
    }
}

/// The pending delivery of a received Pix (or of one of its refunds' final status), for its
/// writer batch (see the module's docs): leased to the committing node for its first attempt.
pub fn outbox_record(
    tenant: u128,
    key_index: &str,
    e2e: &str,
    refund: Option<&str>,
    pix: &serde_json::Value,
    at: u64,
) -> store::Record {
    outbox_record_as(tenant, key_index, e2e, refund, delivery_id(e2e, refund), pix, at)
}

/// [`outbox_record`] under the delivery id `id` (a MED return's, one per claim, is not its
/// refund's `{e2e}:MED`).
pub fn outbox_record_as(
    tenant: u128,
    key_index: &str,
    e2e: &str,
    refund: Option<&str>,
    id: String,
    pix: &serde_json::Value,
    at: u64,
) -> store::Record {
    let stored = StoredDelivery {
        delivery: Delivery {
            end_to_end_id: e2e.to_owned(),
            refund_id: refund.map(str::to_owned),
            url: String::new(),
            status: "pending".into(),
            attempts: 0,
            last_status: None,
            last_error: None,
            updated_at: crate::dto::rfc3339(at),
        },
        outbox: Some(Outbox {
            key_index: key_index.to_owned(),
            pix: pix.clone(),
            lease_until: at.saturating_add(nanos(ATTEMPT_TIMEOUT + LEASE_MARGIN)),
        }),
    };
    store::Record::Document(store::Document {
        kind: DELIVERY_KIND.into(),
        tenant_id: tenant,
        id,
        lookup: None,
        owner: Some(OUTBOX.into()),
        created_at: at,
        version: 1,
        body: serde_json::to_string(&stored).expect("serializable"),
    })
}

/// Writes the delivery's record over `held` (the version this sender wrote or read): the new
/// document, `None` when another sender changed it meanwhile (it owns the delivery now), or an
/// error when storage could not be written.
async fn record(
    state: &AppState,
    held: &store::Document,
    d: &Delivery,
    outbox: &Outbox,
) -> Result<Option<store::Document>, ()> {
    let pending = d.status == "pending";
    let stored = StoredDelivery { delivery: d.clone(), outbox: pending.then(|| outbox.clone()) };
    let next = store::Document {
        version: held.version + 1,
        body: serde_json::to_string(&stored).expect("serializable"),
        owner: pending.then(|| OUTBOX.to_owned()),
        ..held.clone()
    };
    let (st, doc, expected) = (state.clone(), next.clone(), held.version);
    match tokio::task::spawn_blocking(move || st.store.queries.update_document(&doc, expected)).await {
        Ok(Ok(true)) => Ok(Some(next)),
        Ok(Ok(false)) => Ok(None),
        _ => Err(()),
    }
}

/// Every node, every [`SWEEP_INTERVAL`], delivers the pending deliveries whose sender's lease ran
/// out (its node stopped, or it had no room to start): started once per node.
pub fn resume(state: &AppState) {
    if state.webhooks.is_none() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        // Each sweep reads a page, after the previous sweep's last one (from the oldest again
        // after the last page): deliveries behind many pending ones still held by a live sender
        // are found too.
        let mut after: Option<store::OwnerCursor> = None;
        loop {
            let st = state.clone();
            let from = after.take();
            let found = tokio::task::spawn_blocking(move || {
                st.store.queries.documents_by_owner(DELIVERY_KIND, OUTBOX, from.as_ref(), SWEEP_MAX)
            })
            .await;
            if let Ok(Ok(docs)) = found {
                after = store::OwnerCursor::next(&docs, SWEEP_MAX);
                let now = store::now_nanos();
                for doc in docs {
                    let lapsed = serde_json::from_str::<StoredDelivery>(&doc.body)
                        .ok()
                        .and_then(|s| s.outbox)
                        .is_some_and(|o| o.lease_until <= now);
                    if lapsed {
                        deliver(&state, doc);
                    }
                }
            }
            tokio::time::sleep(SWEEP_INTERVAL).await;
        }
    });
}

/// Delivers the outbox entry (`id`, a [`delivery_id`]) a commit wrote ([`outbox_record`]): in the
/// background, with retries, each attempt recorded.
pub fn notify(state: &AppState, tenant: u128, id: String) {
    if state.webhooks.is_none() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let st = state.clone();
        let found = tokio::task::spawn_blocking(move || st.store.queries.document(DELIVERY_KIND, tenant, &id)).await;
        if let Ok(Ok(Some(doc))) = found {
            deliver(&state, doc);
        }
    });
}

/// Why a delivery was not sent again.
#[derive(Debug, PartialEq, Eq)]
pub enum Redelivery {
    /// No delivery under this id (for this tenant).
    NotFound,
    /// It is still being made: its attempts are under way or waiting (or another request to
    /// send it again won).
    Pending,
    /// The Pix's key has no webhook (any more): there is nowhere to send it.
    NoWebhook,
    /// Storage could not be read, or this node sends no notifications.
    Unavailable(&'static str),
}

/// Sends a delivered or failed notification again, from its first attempt (a receiver that was
/// away for longer than the retries last, or lost what it was sent): the record is `pending`
/// again, leased to this node, and delivered as a new one is. It carries the Pix as it is now,
/// with all its refunds (a completed delivery keeps no body: a Pix's refund notifications, each
/// with every refund before it, would add up to the square of their number).
pub async fn redeliver(state: &AppState, tenant: u128, id: String) -> Result<Delivery, Redelivery> {
    if state.webhooks.is_none() {
        return Err(Redelivery::Unavailable("this node sends no webhook notifications"));
    }
    if !is_delivery_id(&id) {
        return Err(Redelivery::NotFound);
    }
    let e2e = id.split(':').next().unwrap_or_default().to_owned();
    let st = state.clone();
    let found = tokio::task::spawn_blocking(move || -> store::Result<_> {
        let q = st.store.queries.as_ref();
        let Some(doc) = q.document(DELIVERY_KIND, tenant, &id)? else { return Ok(None) };
        let Some((_, received)) = crate::routes::api_pix::read_received(q, tenant, &e2e)? else { return Ok(None) };
        let webhook = match &received.notified_key {
            Some(index) => q.document(WEBHOOK_KIND, tenant, index)?.map(|_| index.clone()),
            None => None,
        };
        let pix = crate::routes::api_pix::pix_view(q, tenant, &received)?;
        Ok(Some((doc, webhook, pix)))
    })
    .await;
    let (doc, webhook, pix) = match found {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return Err(Redelivery::NotFound),
        _ => return Err(Redelivery::Unavailable("the delivery could not be read")),
    };
    let mut delivery = serde_json::from_str::<StoredDelivery>(&doc.body)
        .map_err(|_| Redelivery::Unavailable("the delivery's record is unreadable"))?
        .delivery;
    if delivery.status == "pending" {
        return Err(Redelivery::Pending);
    }
    let key_index = webhook.ok_or(Redelivery::NoWebhook)?;
    let mut outbox = Outbox { key_index, pix, lease_until: 0 };
    let now = store::now_nanos();
    delivery.status = "pending".into();
    delivery.attempts = 0;
    delivery.last_status = None;
    delivery.last_error = None;
    delivery.updated_at = crate::dto::rfc3339(now);
    outbox.lease_until = now.saturating_add(nanos(ATTEMPT_TIMEOUT + LEASE_MARGIN));
    // Another request to send it again (or a sender) changed it meanwhile: it is being sent.
    let next = record(state, &doc, &delivery, &outbox)
        .await
        .map_err(|()| Redelivery::Unavailable("the delivery could not be written"))?
        .ok_or(Redelivery::Pending)?;
    deliver(state, next);
    Ok(delivery)
}

/// Makes a pending delivery's remaining attempts, holding it by compare and set on its record: a
/// sender that finds the record changed by another stops. Each attempt takes a slot (the node's
/// and the tenant's) for itself only, and reads the key's webhook anew: a receiver moved or removed
/// between attempts is followed. With no slot free, the sender stops; its lease runs out and a
/// sweep tries again.
fn deliver(state: &AppState, doc: store::Document) {
    let Some(client) = state.webhooks.clone() else { return };
    let Ok(stored) = serde_json::from_str::<StoredDelivery>(&doc.body) else { return };
    let (Some(mut outbox), mut delivery) = (stored.outbox, stored.delivery) else { return };
    if delivery.status != "pending" {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let tenant = doc.tenant_id;
        let mut held = doc;
        if delivery.attempts >= TRIES {
            delivery.status = "failed".into();
            if let Ok(Some(_)) = record(&state, &held, &delivery, &outbox).await {
                state.metrics.webhook_failed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let body = Bytes::from(serde_json::to_vec(&serde_json::json!({ "pix": [outbox.pix] })).expect("serializable"));
        for attempt in delivery.attempts..TRIES {
            let Some(slot) = client.slots.take(tenant) else {
                tracing::warn!(
                    "a webhook notification waits for a sweep: {IN_FLIGHT_MAX} attempts on this node, or \
                     {TENANT_IN_FLIGHT_MAX} of its tenant's, are under way"
                );
                return;
            };
            // The key's webhook and the tenant's secrets, as they are now.
            let (st, index) = (state.clone(), outbox.key_index.clone());
            let found = tokio::task::spawn_blocking(move || -> store::Result<_> {
                let q = st.store.queries.as_ref();
                Ok((q.document(WEBHOOK_KIND, tenant, &index)?, secret_generation(q, tenant)?.0))
            })
            .await;
            let (hook, generation) = match found {
                Ok(Ok((None, generation))) => (None, generation),
                Ok(Ok((Some(doc), generation))) => match serde_json::from_str::<StoredWebhook>(&doc.body) {
                    Ok(hook) => (Some(hook), generation),
                    // Not "no webhook": that would delete or end the notification.
                    Err(_) => {
                        tracing::error!("a webhook does not parse: its notifications wait");
                        return;
                    }
                },
                Ok(Err(store::StoreError::Corrupt(_))) => {
                    tracing::error!(
                        "a webhook or the tenant's secret generation does not parse: its notifications wait"
                    );
                    return;
                }
                // Storage is away: the lease runs out and a sweep takes it.
                _ => return,
            };
            let secrets: Vec<[u8; 32]> =
                generation.signing(store::now_nanos()).into_iter().map(|g| secret(&state, tenant, g)).collect();
            let Some(hook) = hook else {
                // No webhook on the key (any more). A notification never tried, as its commit wrote
                // it, leaves no record (most keys have no webhook); one with a history (tried
                // before, or asked for again) keeps it, ended.
                if held.version == 1 && delivery.attempts == 0 {
                    let (st, id) = (state.clone(), held.id.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        st.store.queries.delete_document(DELIVERY_KIND, tenant, &id)
                    })
                    .await;
                } else {
                    delivery.status = "failed".into();
                    delivery.last_error = Some("the key has no webhook".into());
                    delivery.updated_at = crate::dto::rfc3339(store::now_nanos());
                    if let Ok(Some(_)) = record(&state, &held, &delivery, &outbox).await {
                        state.metrics.webhook_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            };
            let url = format!("{}/pix", hook.url.trim_end_matches('/'));
            delivery.url = url.clone();
            // Held for this attempt.
            outbox.lease_until = store::now_nanos().saturating_add(nanos(ATTEMPT_TIMEOUT + LEASE_MARGIN));
            let Ok(Some(next)) = record(&state, &held, &delivery, &outbox).await else { return };
            held = next;
            // The slot goes with the attempt, given back when it ends (or, for a name look-up
            // still running when the attempt timed out, when the look-up ends).
            let outcome =
                tokio::time::timeout(ATTEMPT_TIMEOUT, client.post(slot, &url, body.clone(), &secrets, &held.id)).await;
            if not_tried(&outcome) {
                // As with no attempt slot free: the lease runs out and a sweep tries again.
                tracing::warn!("a webhook notification waits for a sweep: no name look-up is free on this node");
                return;
            }
            delivery.attempts = attempt + 1;
            delivery.updated_at = crate::dto::rfc3339(store::now_nanos());
            let counted = match outcome {
                Ok(Ok(status)) => {
                    delivery.last_status = Some(status);
                    delivery.last_error = None;
                    if (200..300).contains(&status) {
                        delivery.status = "delivered".into();
                        crate::metrics::WebhookAttempt::Delivered
                    } else {
                        crate::metrics::WebhookAttempt::Refused
                    }
                }
                Ok(Err(e)) => {
                    delivery.last_error = Some(e);
                    crate::metrics::WebhookAttempt::Unreachable
                }
                Err(_) => {
                    delivery.last_error = Some("timed out".into());
                    crate::metrics::WebhookAttempt::Unreachable
                }
            };
            state.metrics.webhook_attempts[counted as usize].fetch_add(1, Ordering::Relaxed);
            if delivery.status == "pending" && attempt + 1 == TRIES {
                delivery.status = "failed".into();
            }
            // Held through the wait before the next attempt.
            let wait = retry_wait(client.retry_base, client.retry_max, attempt);
            outbox.lease_until = store::now_nanos().saturating_add(nanos(wait + ATTEMPT_TIMEOUT + LEASE_MARGIN));
            let Ok(Some(next)) = record(&state, &held, &delivery, &outbox).await else { return };
            held = next;
            if delivery.status == "failed" {
                state.metrics.webhook_failed.fetch_add(1, Ordering::Relaxed);
            }
            if delivery.status != "pending" {
                return;
            }
            // Past the node's bound on waits in memory, the sweep makes the next attempt once
            // the lease (the wait, and an attempt's time) runs out.
            let Some(_waiting) = client.waiting.take(tenant) else { return };
            tokio::time::sleep(wait).await;
        }
    });
}

/// A look-up that found none of the node's (or its tenant's) name look-ups free.
const LOOKUP_BUSY: &str = "no name look-up free: tried again later";

/// Whether an attempt's outcome is no try at all: it found no name look-up free, so nothing was
/// sent. Counted, a tenant's burst of attempts (or other tenants' hosts that never answer DNS,
/// holding the node's look-ups) would spend a receiver's tries without ever reaching it.
fn not_tried(outcome: &Result<Result<u16, String>, tokio::time::error::Elapsed>) -> bool {
    matches!(outcome, Ok(Err(e)) if e == LOOKUP_BUSY)
}

/// Runs a blocking name look-up on the blocking pool, holding `slot` until it returns, and gives
/// the slot back with the addresses. The attempt's timeout drops the future, not the look-up
/// (glibc waits out a silent name server for 5 s a try, two tries each): without the slot, a
/// tenant whose names never resolve could start look-ups faster than they end, and fill the
/// blocking pool that every storage query shares. With it, a tenant holds at most
/// [`TENANT_IN_FLIGHT_MAX`] attempts; and each look-up holds one of `lookups` (at most
/// [`LOOKUPS_MAX`] on the node, well below the pool's threads, and [`TENANT_LOOKUPS_MAX`] for one
/// tenant) until it returns. With none free, the look-up fails at once (`WouldBlock`).
async fn resolve<F>(
    slot: Slot,
    lookups: &Arc<Slots>,
    lookup: F,
) -> (Option<Slot>, std::io::Result<Vec<std::net::SocketAddr>>)
where
    F: FnOnce() -> std::io::Result<Vec<std::net::SocketAddr>> + Send + 'static,
{
    let Some(looking) = lookups.take(slot.tenant) else {
        let busy = std::io::Error::new(std::io::ErrorKind::WouldBlock, LOOKUP_BUSY);
        return (Some(slot), Err(busy));
    };
    match tokio::task::spawn_blocking(move || {
        let _looking = looking;
        (slot, lookup())
    })
    .await
    {
        Ok((slot, found)) => (Some(slot), found),
        Err(_) => (None, Err(std::io::Error::other("the name look-up failed"))),
    }
}

/// The wait after attempt `attempt` (from 0) failed: `base` doubled per attempt, at most `max`.
fn retry_wait(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(31)).min(max)
}

#[cfg(test)]
mod tests {
    use super::{is_public, not_tried, resolve, retry_wait, SecretGeneration, Slots, RETRY_WAIT_MAX_DEFAULT, TRIES};
    use std::time::Duration;

    /// With the default waits, the tries outlast a receiver's outage of 12 hours (not 31 s, as
    /// six tries doubling from 1 s did), and no wait exceeds the cap, however many attempts.
    #[test]
    fn the_default_tries_span_about_twelve_hours() {
        let base = Duration::from_secs(1);
        let waits: Vec<Duration> = (0..TRIES - 1).map(|a| retry_wait(base, RETRY_WAIT_MAX_DEFAULT, a)).collect();
        assert_eq!(&waits[..3], [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4)]);
        assert_eq!(waits[11], Duration::from_secs(2048));
        assert_eq!(waits[12], RETRY_WAIT_MAX_DEFAULT);
        let span: Duration = waits.iter().sum();
        assert!(span >= Duration::from_secs(12 * 3600) && span <= Duration::from_secs(13 * 3600), "{span:?}");
        assert_eq!(retry_wait(Duration::from_secs(3600), Duration::from_secs(7200), 40), Duration::from_secs(7200));
        assert_eq!(retry_wait(Duration::from_millis(100), Duration::from_millis(250), 2), Duration::from_millis(250));
    }

    /// An earlier secret signs until its overlap ends, not at that instant; each rotation's
    /// overlap runs its own course, and one with no overlap ends them all.
    #[test]
    fn earlier_secrets_sign_until_their_overlaps_end() {
        assert_eq!(SecretGeneration::default().signing(5), [0]);
        let once = SecretGeneration::default().rotated(100, 900).unwrap();
        assert_eq!((once.signing(999), once.signing(1_000)), (vec![1, 0], vec![1]));
        assert_eq!(once.overlap_until(999), Some(1_000));
        // Rotated again at once (a retried request): the secret the receivers hold still signs.
        let twice = once.rotated(200, 900).unwrap();
        assert_eq!((twice.signing(999), twice.signing(1_050)), (vec![2, 1, 0], vec![2, 1]));
        assert_eq!(twice.overlap_until(1_050), Some(1_100));
        // At most three earlier secrets sign; an overlap ended is dropped.
        let many = (0..5).fold(twice, |g, i| g.rotated(300 + i, 10_000).unwrap());
        assert_eq!(many.signing(400), [7, 6, 5, 4]);
        let later = many.rotated(20_000, 10).unwrap();
        assert_eq!(later.earlier, [(7, 20_010)]);
        // After a leak, no overlap: only the new secret signs.
        let leaked = many.rotated(400, 0).unwrap();
        assert_eq!((leaked.signing(400), leaked.overlap_until(400)), (vec![8], None));
        // Past the cap, the overlaps that end soonest go: a week-long overlap outlives a burst
        // of minute-long ones after it.
        let held = SecretGeneration::default().rotated(100, 1_000_000).unwrap();
        let burst = (0..3).fold(held, |g, i| g.rotated(200 + i, 60).unwrap());
        assert_eq!(burst.earlier, [(3, 262), (2, 261), (0, 1_000_100)]);
        assert_eq!(burst.signing(300), [4, 0]);
        // The secret just retired signs through its overlap, however soon that ends.
        let long = (0..3).fold(SecretGeneration::default(), |g, i| g.rotated(100 + i, 1_000_000).unwrap());
        let then = long.rotated(5_000, 10).unwrap();
        assert_eq!(then.earlier, [(3, 5_010), (2, 1_000_102), (1, 1_000_101)]);
    }

    /// A name look-up that outlives its attempt (the attempt's future dropped on its timeout)
    /// keeps its tenant's slot, and one of the node's look-ups, until it returns: a tenant whose
    /// name servers never answer cannot start more look-ups than its share, nor the node more
    /// than its bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_up_outliving_its_attempt_keeps_its_slot() {
        let slots = std::sync::Arc::new(Slots::new(5, 2));
        let lookups = std::sync::Arc::new(Slots::new(3, 2));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Arc::new(std::sync::Mutex::new(released));
        for _ in 0..2 {
            let released = released.clone();
            let slot = slots.take(7).unwrap();
            let lookup = move || {
                released.lock().unwrap().recv().unwrap();
                Ok(Vec::new())
            };
            let timed_out = tokio::time::timeout(Duration::from_millis(20), resolve(slot, &lookups, lookup)).await;
            assert!(timed_out.is_err(), "the look-up is still running");
        }
        assert!(slots.take(7).is_none(), "the tenant's two look-ups still hold its share");
        assert!(slots.take(8).is_some(), "another tenant's attempts go on");
        assert!(lookups.take(7).is_none(), "the tenant's look-ups are held too");
        let other = lookups.take(8).expect("another tenant may look up");
        assert!(lookups.take(9).is_none(), "the node's look-ups are held too");
        let busy = resolve(slots.take(9).unwrap(), &lookups, || Ok(Vec::new())).await.1.unwrap_err();
        assert_eq!(busy.kind(), std::io::ErrorKind::WouldBlock, "none free: fails at once");
        // ... and, passed on by `post` as its words, is no try of the receiver's: not counted.
        assert!(not_tried(&Ok(Err(busy.to_string()))));
        assert!(!not_tried(&Ok(Err("refused: the host has no public address".into()))));
        assert!(!not_tried(&Ok(Ok(503))));
        drop(other);
        release.send(()).unwrap();
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Each look-up gives back its attempt's slot and its own as it ends, one after the other:
        // waited for both.
        while slots.take(7).is_none() || !lookups.tenants.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the slots were never given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let done = resolve(slots.take(7).unwrap(), &lookups, || Ok(vec!["192.0.2.1:443".parse().unwrap()])).await;
        assert!(
            done.0.is_some() && done.1.unwrap().len() == 1,
            "a look-up that ends gives the slot back with its answer"
        );
        assert!(lookups.tenants.lock().unwrap().is_empty(), "every look-up given back");
    }

    #[test]
    fn a_tenant_takes_at_most_its_share_of_the_attempts_and_gives_them_back() {
        let slots = std::sync::Arc::new(Slots::new(5, 2));
        let (a1, a2) = (slots.take(1).unwrap(), slots.take(1).unwrap());
        assert!(slots.take(1).is_none(), "tenant 1 is at its share");
        let b1 = slots.take(2).unwrap();
        let _b2 = slots.take(2).unwrap();
        let _c1 = slots.take(3).unwrap();
        assert!(slots.take(3).is_none(), "the node is full");
        drop(a1);
        assert!(slots.take(1).is_some(), "given back when dropped");
        drop((a2, b1));
        let _again = (slots.take(1).unwrap(), slots.take(2).unwrap());
        assert_eq!(slots.tenants.lock().unwrap().values().sum::<usize>(), 4);
    }

    #[test]
    fn only_public_addresses_are_public() {
        for ip in
            ["8.8.8.8", "200.160.2.3", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"]
        {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.0.0.5",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
            // Reserved, benchmarking and protocol-assignment IPv4 ranges.
            "240.0.0.1",
            "198.18.0.1",
            "198.19.255.1",
            "192.0.0.8",
            // IPv6 carrying a private IPv4 one: NAT64, 6to4, IPv4-compatible.
            "64:ff9b::a00:5",
            "::ffff:0:10.0.0.5",
            "::ffff:0:127.0.0.1",
            "2002:a00:5::1",
            "::10.0.0.5",
            // Local NAT64, Teredo, site-local, documentation, discard-only.
            "64:ff9b:1::808:808",
            "2001:0:4136:e378::1",
            "fec0::1",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn delivery_ids_are_an_end_to_end_id_and_perhaps_a_refund_id() {
        let e2e = "E607011902026120611531Zm4BK0fh1H";
        assert!(super::is_delivery_id(e2e));
        assert!(super::is_delivery_id(&super::delivery_id(e2e, Some("D1"))));
        assert!(super::is_delivery_id(&format!("{e2e}:MED")));
        for bad in
            ["", "4111111111111111", &format!("{e2e}:"), &format!("{e2e}:a-b"), &format!("{e2e}:{}", "x".repeat(36))]
        {
            assert!(!super::is_delivery_id(bad), "{bad}");
        }
    }

    #[test]
    fn authorities_give_their_host_and_port() {
        use super::host_and_port;
        assert_eq!(host_and_port("hooks.example"), Ok(("hooks.example", 443)));
        assert_eq!(host_and_port("hooks.example:8443"), Ok(("hooks.example", 8443)));
        assert_eq!(host_and_port("[2001:4860::8888]"), Ok(("2001:4860::8888", 443)));
        assert_eq!(host_and_port("[2001:4860::8888]:8443"), Ok(("2001:4860::8888", 8443)));
        assert!(host_and_port("hooks.example:x").is_err());
        assert!(host_and_port("[2001:4860::8888]x").is_err());
        assert!(host_and_port("[2001:4860::8888").is_err());
    }
}
