//! Prometheus metrics, rendered by hand in the text exposition format: per-route request counts
//! and latency histograms, plus the writer's batch and commit figures.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use store::engine_buckets::{BATCH_BUCKETS, COMMIT_BUCKETS_US};
use store::EngineStats;

/// Latency bucket upper bounds, in microseconds.
const LATENCY_BUCKETS_US: [u64; 12] =
    [250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];

#[derive(Default, Clone)]
struct RouteStats {
    count: u64,
    sum_us: u64,
    buckets: [u64; 13],
}

/// Route → (method, status) → figures. Keyed so that a request allocates nothing once its
/// route has been seen.
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, ByMethodStatus>>,
    /// Audit entries the middleware could not record (the request's own outcome stood).
    pub audit_failures: std::sync::atomic::AtomicU64,
    /// Card message steps decided again because another node's step on the authorization
    /// committed first (see `card_network::Failed::Raced`).
    pub card_steps_raced: std::sync::atomic::AtomicU64,
    /// How far this node's clock was ahead of the database's at the last measurement, in
    /// nanoseconds (see `clock::watch`); never measured on an embedded engine.
    pub clock_skew: Mutex<Option<i64>>,
    /// Webhook delivery attempts, by [`WebhookAttempt`].
    pub webhook_attempts: [std::sync::atomic::AtomicU64; 3],
    /// Webhook deliveries ended `failed` (every try refused or unreachable, or the key lost its
    /// webhook): nothing will send them again unless asked.
    pub webhook_failed: std::sync::atomic::AtomicU64,
    /// Card network messages: (request MTI, DE39 answered) → count; and their handling time.
    card_messages: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    card_message_latency: Mutex<RouteStats>,
    /// The DE4 amounts of approved 0100s and 0200s (in each card's currency's minor units, summed
    /// across currencies: a volume gauge, not an account).
    pub card_approved_minor: std::sync::atomic::AtomicU64,
}

/// The request MTIs the card metrics name; any other is counted as `other`.
const CARD_MTIS: [&str; 14] = [
    "0100",
    "0101",
    "0120",
    "0121",
    "0200",
    "0201",
    "0220",
    "0221",
    "0400",
    "0401",
    "0420",
    "0421",
    "0800",
    "unreadable",
];
/// The DE39 codes rtpay answers (cards::ResponseCode); any other is counted as `other`.
const CARD_CODES: [&str; 11] = ["00", "05", "14", "30", "51", "54", "57", "59", "61", "91", "96"];

/// How a webhook delivery attempt ended: the receiver answered 2xx, answered something else, or
/// could not be reached in time (no public address, refused, TLS, timed out).
#[derive(Clone, Copy)]
pub enum WebhookAttempt {
    Delivered = 0,
    Refused = 1,
    Unreachable = 2,
}

const WEBHOOK_OUTCOMES: [&str; 3] = ["delivered", "refused", "unreachable"];

type ByMethodStatus = BTreeMap<(&'static str, u16), RouteStats>;

/// The method as a static label; methods rtpay does not route are counted together.
pub fn method_name(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

impl Metrics {
    /// One card network message answered: its request MTI, the DE39 of the answer (empty: none),
    /// and how long it took.
    pub fn observe_card_message(&self, mti: &str, code: &str, micros: u64) {
        let mti = CARD_MTIS.iter().find(|m| **m == mti).copied().unwrap_or("other");
        let code = CARD_CODES.iter().find(|c| **c == code).copied().unwrap_or("other");
        *self.card_messages.lock().expect("metrics lock").entry((mti, code)).or_default() += 1;
        let mut latency = self.card_message_latency.lock().expect("metrics lock");
        latency.count += 1;
        latency.sum_us += micros;
        let i = LATENCY_BUCKETS_US.iter().position(|b| micros <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        latency.buckets[i] += 1;
    }

    pub fn observe(&self, method: &'static str, route: &str, status: u16, micros: u64) {
        let mut routes = self.routes.lock().expect("metrics lock");
        if !routes.contains_key(route) {
            routes.insert(route.to_owned(), BTreeMap::new());
        }
        let by_status = routes.get_mut(route).expect("inserted above");
        let stats = by_status.entry((method, status)).or_default();
        stats.count += 1;
        stats.sum_us += micros;
        let i = LATENCY_BUCKETS_US.iter().position(|b| micros <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        stats.buckets[i] += 1;
    }

    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP rtpay_http_requests_total HTTP requests by method, route and status.\n");
        out.push_str("# TYPE rtpay_http_requests_total counter\n");
        let routes = self.routes.lock().expect("metrics lock").clone();
        for (route, by) in &routes {
            for ((method, status), s) in by {
                let _ = writeln!(
                    out,
                    "rtpay_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                    s.count
                );
            }
        }
        out.push_str("# HELP rtpay_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE rtpay_http_request_duration_seconds histogram\n");
        let mut by_route: BTreeMap<(&str, &str), RouteStats> = BTreeMap::new();
        for (route, by) in &routes {
            for ((method, _), s) in by {
                let total = by_route.entry((method, route.as_str())).or_default();
                total.count += s.count;
                total.sum_us += s.sum_us;
                for (t, b) in total.buckets.iter_mut().zip(s.buckets) {
                    *t += b;
                }
            }
        }
        for ((method, route), s) in &by_route {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            histogram(
                &mut out,
                "rtpay_http_request_duration_seconds",
                &labels,
                &LATENCY_BUCKETS_US,
                &s.buckets,
                s.sum_us,
                1e6,
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
        };
        counter(
            &mut out,
            "rtpay_ledger_batches_total",
            "Batches committed by the writer.",
            engine.batches.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rtpay_ledger_events_total",
            "Ledger events (accounts and transfers) committed.",
            engine.events.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rtpay_ledger_commit_failures_total",
            "Batches whose commit failed (nothing acknowledged).",
            engine.commit_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rtpay_ledger_syncs_total",
            "Syncs of the embedded engine's log made beside the writer (each covers every batch committed before it).",
            engine.syncs.load(Ordering::Relaxed),
        );
        let _ = write!(
            out,
            "# HELP rtpay_ledger_sync_seconds_total Time spent in those syncs.\n# TYPE rtpay_ledger_sync_seconds_total counter\nrtpay_ledger_sync_seconds_total {}\n",
            engine.sync_us_sum.load(Ordering::Relaxed) as f64 / 1e6
        );
        counter(
            &mut out,
            "rtpay_audit_failures_total",
            "Audit entries that could not be recorded after their request.",
            self.audit_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rtpay_card_steps_raced_total",
            "Card message steps decided again: another node's step on the authorization committed first.",
            self.card_steps_raced.load(Ordering::Relaxed),
        );
        out.push_str("# HELP rtpay_webhook_attempts_total Webhook delivery attempts by outcome: delivered (2xx), refused (another status), unreachable (no answer in time).\n# TYPE rtpay_webhook_attempts_total counter\n");
        for (outcome, n) in WEBHOOK_OUTCOMES.iter().zip(&self.webhook_attempts) {
            let _ =
                writeln!(out, "rtpay_webhook_attempts_total{{outcome=\"{outcome}\"}} {}", n.load(Ordering::Relaxed));
        }
        counter(
            &mut out,
            "rtpay_webhook_deliveries_failed_total",
            "Webhook deliveries whose tries all failed (or whose key lost its webhook); sent again only on request.",
            self.webhook_failed.load(Ordering::Relaxed),
        );
        out.push_str("# HELP rtpay_card_messages_total Card network (ISO 8583) messages by request MTI and the response code (DE39) answered.\n# TYPE rtpay_card_messages_total counter\n");
        for ((mti, code), n) in self.card_messages.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "rtpay_card_messages_total{{mti=\"{mti}\",response_code=\"{code}\"}} {n}");
        }
        let latency = self.card_message_latency.lock().expect("metrics lock").clone();
        out.push_str("# HELP rtpay_card_message_duration_seconds Time to decide a card network message, from its frame to its answer.\n# TYPE rtpay_card_message_duration_seconds histogram\n");
        histogram(
            &mut out,
            "rtpay_card_message_duration_seconds",
            "",
            &LATENCY_BUCKETS_US,
            &latency.buckets,
            latency.sum_us,
            1e6,
        );
        counter(
            &mut out,
            "rtpay_card_approved_amount_minor_total",
            "DE4 amounts of approved authorizations and purchases (0100, 0200), in minor units, all currencies summed.",
            self.card_approved_minor.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rtpay_ledger_holds_expired_total",
            "Pending transfers released by timeout.",
            engine.expired.load(Ordering::Relaxed),
        );
        if let Some(skew) = *self.clock_skew.lock().expect("metrics lock") {
            let _ = write!(
                out,
                "# HELP rtpay_clock_skew_seconds How far this node's clock is ahead of PostgreSQL's (negative: behind), measured every minute; nodes compare their own clocks for leases (docs/OPERATIONS.md, Clocks).\n# TYPE rtpay_clock_skew_seconds gauge\nrtpay_clock_skew_seconds {}\n",
                skew as f64 / 1e9
            );
        }
        let _ = write!(
            out,
            "# HELP rtpay_ledger_cached_accounts Accounts the writer keeps in memory (at most --account-cache when a batch starts, plus those the batch reads).\n# TYPE rtpay_ledger_cached_accounts gauge\nrtpay_ledger_cached_accounts {}\n",
            engine.cached_accounts.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP rtpay_ledger_queue_depth Requests waiting for the writer.\n# TYPE rtpay_ledger_queue_depth gauge\nrtpay_ledger_queue_depth {}\n",
            engine.queue_depth.load(Ordering::Relaxed)
        );
        let load =
            |a: &[std::sync::atomic::AtomicU64]| a.iter().map(|b| b.load(Ordering::Relaxed)).collect::<Vec<u64>>();
        // The writer's commits and the syncs beside it, in microseconds, as seconds.
        let durations = [
            (
                "rtpay_ledger_commit_duration_seconds",
                "Time to apply and commit one batch (on the embedded engine without its sync, see rtpay_ledger_sync_duration_seconds).",
                &engine.commit_us_buckets,
                &engine.commit_us_sum,
            ),
            (
                "rtpay_ledger_sync_duration_seconds",
                "Time of each sync of the embedded engine's log made beside the writer; every reply of the batches it covers waits for it.",
                &engine.sync_us_buckets,
                &engine.sync_us_sum,
            ),
        ];
        for (name, help, buckets, sum_us) in durations {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
            histogram(&mut out, name, "", &COMMIT_BUCKETS_US, &load(buckets), sum_us.load(Ordering::Relaxed), 1e6);
        }
        out.push_str("# HELP rtpay_ledger_batch_events Events per committed batch.\n# TYPE rtpay_ledger_batch_events histogram\n");
        let batch = load(&engine.batch_len_buckets);
        histogram(
            &mut out,
            "rtpay_ledger_batch_events",
            "",
            &BATCH_BUCKETS,
            &batch,
            engine.events.load(Ordering::Relaxed),
            1.0,
        );
        out
    }
}

/// Writes one histogram; `divisor` turns stored units into the metric's (1e6: µs → seconds).
fn histogram(out: &mut String, name: &str, labels: &str, bounds: &[u64], buckets: &[u64], sum: u64, divisor: f64) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(buckets) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}", *bound as f64 / divisor);
    }
    cumulative += buckets.get(bounds.len()).copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "{name}_sum{braces} {}", sum as f64 / divisor);
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}
