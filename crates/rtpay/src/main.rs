//! `rtpay`: a real-time payments core in one binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use rtpay::serve::{init_logging, run, shutdown_signal, ServeConfig};
use store::Location;

/// jemalloc for every allocation of the process: Rust's through this allocator, SQLite's and
/// every other C library's through the `malloc` it exports. Under the Pix and HTTP benchmarks the
/// tokio workers spent a quarter of their waiting on glibc's arena locks (memory allocated on one
/// thread and freed on another: a request's on a worker, a batch's on the writer); with jemalloc
/// the HTTP peak rose 20 % and the Pix peak 15 % in the same sitting (docs/BENCHMARKS.md).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, which it reads before `main` (`MALLOC_CONF` in the environment still
/// overrides them). `oversize_threshold:0`: a freed block that jemalloc merges with its free
/// neighbours into 8 MiB or more is kept, like smaller ones, until its pages decay (10 s unused),
/// instead of being handed back to the kernel at once. A batch of 8,000 transfers frees buffers
/// that merge past 8 MiB, and the next batch took every page of them back through a page fault:
/// 225,000 faults in 6 s of the batch benchmark, about 8 % of the writer's time (36,000 without).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[unsafe(export_name = "malloc_conf")]
static JEMALLOC_CONF: JemallocConf = JemallocConf(c"oversize_threshold:0".as_ptr());

/// A C string pointer, as jemalloc declares `malloc_conf`.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[repr(transparent)]
struct JemallocConf(*const std::ffi::c_char);

// SAFETY: it points at a string in static memory that nothing writes.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
unsafe impl Sync for JemallocConf {}

#[derive(Parser)]
#[command(
    name = "rtpay",
    version,
    about = "A real-time payments core: a strict double-entry ledger behind an HTTP API."
)]
struct Cli {
    #[command(subcommand)]
    command: CommandLine,
}

#[derive(Args, Clone)]
struct StorageArgs {
    /// Data directory for the embedded engine (and the operator token and secret key).
    #[arg(long, default_value = "./data", env = "RTPAY_DATA")]
    data: PathBuf,
    /// Use PostgreSQL instead of the embedded engine, e.g. postgres://rtpay@127.0.0.1:5432/rtpay
    #[arg(long, env = "RTPAY_POSTGRES", hide_env_values = true)]
    postgres: Option<String>,
    /// The Ed25519 key (PKCS#8, hex) that signs the audit log's tree heads; created on first start.
    /// Default: <data>/audit-signing-key. Give every PostgreSQL node the same file.
    #[arg(long, env = "RTPAY_AUDIT_KEY_FILE")]
    audit_key: Option<PathBuf>,
    /// The vault's key-encryption keys: `file:PATH` (default file:<data>/kek) or
    /// `pkcs11:MODULE#TOKEN-LABEL` (user PIN in RTPAY_PKCS11_PIN).
    #[arg(long, env = "RTPAY_KEK")]
    kek: Option<rtpay::keys::KekConfig>,
}

impl StorageArgs {
    fn location(&self) -> Location {
        match &self.postgres {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::Embedded(self.data.clone()),
        }
    }
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum CommandLine {
    /// Serve the HTTP API.
    Serve {
        #[command(flatten)]
        storage: StorageArgs,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", env = "RTPAY_LISTEN")]
        listen: SocketAddr,
        /// Requests per second each tenant may make on this node (then 429 with Retry-After).
        #[arg(long, default_value_t = server::TENANT_RATE_DEFAULT, env = "RTPAY_RATE_LIMIT")]
        rate_limit: f64,
        /// Requests a tenant may make at once above its rate (default: one second's worth).
        #[arg(long, env = "RTPAY_RATE_BURST")]
        rate_burst: Option<f64>,
        /// Reverse proxies (address ranges, comma-separated: 10.0.0.0/8,2001:db8::/32) whose
        /// X-Forwarded-For names the client, for the failed-login throttle and the audit log.
        #[arg(long, env = "RTPAY_TRUSTED_PROXIES", value_delimiter = ',')]
        trusted_proxy: Vec<server::proxy::Cidr>,
        /// Require this bearer token at /metrics (at least 32 characters; prefer the environment
        /// variable, which other users cannot read from the process list).
        #[arg(long, env = "RTPAY_METRICS_TOKEN", hide_env_values = true)]
        metrics_token: Option<String>,
        /// Serve TLS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, env = "RTPAY_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
        #[arg(long, env = "RTPAY_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Verify client certificates against these CAs (PEM) and bind each connection to the
        /// tenant (SAN `urn:rtpay:tenant:<uuid>`) or operator (`urn:rtpay:operator`) they name.
        #[arg(long, env = "RTPAY_TLS_CLIENT_CA", requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Accept the card network's ISO 8583 authorizations on this address (TCP, 2-byte length).
        #[arg(long, env = "RTPAY_ISO8583_LISTEN")]
        iso8583_listen: Option<SocketAddr>,
        /// Serve ISO 8583 over plain TCP even with --tls-cert (by default the listener then speaks
        /// TLS, requiring a client certificate when --tls-client-ca is set): for a link already
        /// encrypted below it (IPsec, a private circuit).
        #[arg(long, env = "RTPAY_ISO8583_PLAIN")]
        iso8583_plain: bool,
        /// Seconds an approved authorization holds funds before the ledger releases them.
        #[arg(long, default_value_t = 604_800, env = "RTPAY_CARD_HOLD_SECONDS")]
        card_hold_seconds: u32,
        /// How far (percent) a capture may exceed its authorization (tips).
        #[arg(long, default_value_t = 20, env = "RTPAY_CARD_CAPTURE_TOLERANCE")]
        card_capture_tolerance: u32,
        /// This payment institution's ISPB (8 digits or capital letters): it names the
        /// institution in Pix EndToEndIds and BR Codes. Without it the Pix routes answer 503.
        #[arg(long, env = "RTPAY_ISPB")]
        ispb: Option<String>,
        /// The night of Pix night limits, in local hours of São Paulo: `START-END` (the Central
        /// Bank's default 20-6; 22-6 is the other window customers may choose).
        #[arg(long, default_value = "20-6", env = "RTPAY_PIX_NIGHT")]
        pix_night: String,
        /// The sandbox SPI's answer time for payments to other institutions (milliseconds).
        #[arg(long, default_value_t = 50, env = "RTPAY_SPI_LATENCY_MS")]
        spi_latency_ms: u64,
        /// Percent of payments to other institutions the sandbox SPI rejects (AC03).
        #[arg(long, default_value_t = 0, env = "RTPAY_SPI_REJECT_PERCENT")]
        spi_reject_percent: u8,
        /// Percent of payments to other institutions the sandbox SPI never answers.
        #[arg(long, default_value_t = 0, env = "RTPAY_SPI_TIMEOUT_PERCENT")]
        spi_timeout_percent: u8,
        /// How long a payment to another institution waits for the SPI's answer before the SPI is
        /// asked for the payment's status; its hold waits for the verdict (milliseconds; the SPI
        /// settles within 40 s).
        #[arg(long, default_value_t = 40_000, env = "RTPAY_SPI_TIMEOUT_MS")]
        spi_timeout_ms: u64,
        /// The host charges' locations are on (`https://HOST/qr/v2/...` in dynamic BR Codes; rtpay's
        /// listener serves those paths): at most 25 characters, lowercase letters, digits, `.`, `-`.
        #[arg(long, default_value = server::pix_rail::LOCATION_HOST_DEFAULT, env = "RTPAY_PIX_LOCATION_HOST")]
        pix_location_host: String,
        /// The certificate chain (PEM, leaf first) whose key signs the payloads at charges'
        /// locations: the JWK Set then carries it (`x5c`) for payers' apps to check against the
        /// location's host. Needs --pix-jws-key. Without both, a key made once per database signs.
        #[arg(long, env = "RTPAY_PIX_JWS_CERT", requires = "pix_jws_key")]
        pix_jws_cert: Option<PathBuf>,
        /// The certificate's private key (PEM, PKCS#8 or PKCS#1): P-256 signs ES256, RSA of 2,048
        /// to 4,096 bits signs RS256.
        #[arg(long, env = "RTPAY_PIX_JWS_KEY", requires = "pix_jws_cert")]
        pix_jws_key: Option<PathBuf>,
        /// PEM roots that webhook receivers' certificates are checked against (default: the
        /// system's bundle, /etc/ssl/certs/ca-certificates.crt).
        #[arg(long, env = "RTPAY_WEBHOOK_CA")]
        webhook_ca: Option<PathBuf>,
        /// rtpay's client certificate (PEM) for webhook deliveries (mTLS, as the API Pix asks).
        #[arg(long, env = "RTPAY_WEBHOOK_CLIENT_CERT", requires = "webhook_client_key")]
        webhook_client_cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, env = "RTPAY_WEBHOOK_CLIENT_KEY", requires = "webhook_client_cert")]
        webhook_client_key: Option<PathBuf>,
        /// The first wait between webhook delivery tries (milliseconds; doubles each try, up to
        /// --webhook-retry-max-ms; 24 tries in all).
        #[arg(long, default_value_t = 1_000, env = "RTPAY_WEBHOOK_RETRY_MS")]
        webhook_retry_ms: u64,
        /// The longest wait between two webhook delivery tries (milliseconds; by default 1 hour,
        /// so that the tries cover about 12 hours of a receiver's outage).
        #[arg(long, default_value_t = 3_600_000, env = "RTPAY_WEBHOOK_RETRY_MAX_MS")]
        webhook_retry_max_ms: u64,
        /// Let webhook receivers be on loopback, private or link-local addresses (labs and tests
        /// only: otherwise a tenant could make rtpay call into its own network).
        #[arg(long, env = "RTPAY_WEBHOOK_ALLOW_PRIVATE")]
        webhook_allow_private: bool,
        /// Threads that serve HTTP and ISO 8583 (default: one per core but one, and at least one:
        /// the ledger's writer, its syncer and its checkpointer have threads of their own).
        #[arg(long, env = "RTPAY_HTTP_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        http_threads: Option<u16>,
        /// Accounts the ledger's writer keeps in memory between batches (default 1,000,000); it
        /// reads the others from storage when a batch names them.
        #[arg(long, env = "RTPAY_ACCOUNT_CACHE", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        account_cache: Option<u64>,
    },
    /// Start an embedded server in a temporary directory and walk through the API.
    Demo {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Stop after the tour instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// Check every ledger invariant from storage; exits 1 on any violation.
    Verify {
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// The audit log: `rtpay audit verify` recomputes it from storage.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Keys: `rtpay keys init` writes a new cluster's shared keys; `rtpay keys rotate` adds a
    /// key-encryption key and re-wraps every data key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Apply pending schema migrations and exit.
    Migrate {
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Run the benchmarks and print the figures (see docs/BENCHMARKS.md).
    Bench(rtpay::bench::BenchArgs),
    /// The benchmark's baseline: a trivial axum JSON handler (used by `rtpay bench`).
    #[command(hide = true)]
    BenchBaseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new cluster's shared secrets into a directory, each file mode 0600: the API
    /// secrets' hashing key, the blind-index key, the operator token, the audit signing key and the
    /// key-encryption key. Give every node the same files, as its --data directory (a Kubernetes
    /// Secret mounted there, say). Refuses, writing nothing, when any of them exists.
    Init {
        /// The directory to write into (made with mode 0700 if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Create KEK version N+1 and re-wrap every tenant's data key under it, without downtime:
    /// old versions stay readable, and running nodes load the new one when they meet it.
    ///
    /// Where every node reads its own copy of the key file (a Kubernetes Secret), rotate in two
    /// steps: --add-only, give every node the new file, then --rewrap-only.
    Rotate {
        #[command(flatten)]
        storage: StorageArgs,
        /// Only add KEK version N+1; re-wrap nothing.
        #[arg(long, conflicts_with = "rewrap_only")]
        add_only: bool,
        /// Only re-wrap every data key under the newest KEK version there is; add none.
        #[arg(long)]
        rewrap_only: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute every entry's hash and every signed tree head from storage; report the first
    /// entry altered, removed, reordered or inserted. Exits 1 on a finding, 2 if storage fails.
    Verify {
        #[command(flatten)]
        storage: StorageArgs,
        /// The Ed25519 public key (hex) to check tree heads against; default: the one of the
        /// audit key file.
        #[arg(long)]
        public_key: Option<String>,
        /// A tree head saved outside storage, as `GET /v1/audit/tree-head` answered it (a JSON
        /// file): the log must still contain it. The heads in storage cannot show that the log
        /// was cut back together with them; a head kept elsewhere can.
        #[arg(long, value_name = "FILE")]
        head: Option<PathBuf>,
    },
}

/// A tree head saved from `GET /v1/audit/tree-head`.
fn saved_head(path: &Path) -> Result<(audit::TreeHead, Vec<u8>), String> {
    let fail = |why: &str| format!("--head {}: {why}", path.display());
    let text = std::fs::read(path).map_err(|e| fail(&e.to_string()))?;
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| fail(&format!("not JSON ({e})")))?;
    let size =
        value["tree_size"].as_u64().filter(|s| *s > 0).ok_or_else(|| fail("`tree_size` must be a positive integer"))?;
    let time = value["timestamp"].as_u64().ok_or_else(|| fail("`timestamp` must be an integer"))?;
    let root = value["root_hash"]
        .as_str()
        .and_then(server::auth::unhex)
        .and_then(|r| <audit::Hash>::try_from(r).ok())
        .ok_or_else(|| fail("`root_hash` must be 64 hex digits"))?;
    let signature = value["signature"]
        .as_str()
        .and_then(server::auth::unhex)
        .filter(|s| s.len() == 64)
        .ok_or_else(|| fail("`signature` must be 128 hex digits"))?;
    Ok((audit::TreeHead { size, root, time }, signature))
}

fn audit_verify(
    storage: &StorageArgs,
    public_key: Option<&str>,
    head: Option<&Path>,
) -> Result<store::AuditReport, String> {
    let saved = head.map(saved_head).transpose()?;
    let public_key = match public_key {
        Some(hex) => server::auth::unhex(hex).filter(|k| k.len() == 32).ok_or("--public-key must be 64 hex digits")?,
        None => {
            let path = storage.audit_key.clone().unwrap_or_else(|| rtpay::serve::default_audit_key(&storage.data));
            if !path.exists() {
                return Err(format!("no audit key at {}; pass --audit-key or --public-key", path.display()));
            }
            rtpay::serve::audit_signer(&path).map_err(|e| e.to_string())?.public_key().to_vec()
        }
    };
    if let (Some(path), Some((head, signature))) = (head, &saved) {
        if !audit::verify_head(&public_key, head, signature) {
            return Err(format!("--head {}: its signature does not verify under the audit log's key", path.display()));
        }
    }
    let queries = store::Store::open_queries(&storage.location()).map_err(|e| e.to_string())?;
    store::audit_verify(queries.as_ref(), &public_key, saved).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        CommandLine::Serve {
            storage,
            listen,
            rate_limit,
            rate_burst,
            trusted_proxy,
            metrics_token,
            tls_cert,
            tls_key,
            tls_client_ca,
            iso8583_listen,
            iso8583_plain,
            card_hold_seconds,
            card_capture_tolerance,
            ispb,
            pix_night,
            spi_latency_ms,
            spi_reject_percent,
            spi_timeout_percent,
            spi_timeout_ms,
            pix_location_host,
            pix_jws_cert,
            pix_jws_key,
            webhook_ca,
            webhook_client_cert,
            webhook_client_key,
            webhook_retry_ms,
            webhook_retry_max_ms,
            webhook_allow_private,
            http_threads,
            account_cache,
        } => {
            if spi_reject_percent as u16 + spi_timeout_percent as u16 > 100
                || spi_timeout_ms == 0
                || spi_timeout_ms > 3_600_000
                || spi_latency_ms > 3_600_000
            {
                eprintln!(
                    "rtpay serve: --spi-reject-percent and --spi-timeout-percent add up to at most 100; \
                     --spi-timeout-ms is 1..=3600000 and --spi-latency-ms at most 3600000"
                );
                return ExitCode::from(2);
            }
            let Some(night) =
                pix_night.split_once('-').and_then(|(a, b)| pix::limits::Night::new(a.parse().ok()?, b.parse().ok()?))
            else {
                eprintln!("rtpay serve: --pix-night must be START-END in whole hours 0-23, apart (e.g. 20-6), not `{pix_night}`");
                return ExitCode::from(2);
            };
            let host_ok = (1..=server::pix_rail::LOCATION_HOST_LEN_MAX).contains(&pix_location_host.len())
                && pix_location_host
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
                && !pix_location_host.starts_with(['.', '-'])
                && !pix_location_host.ends_with(['.', '-']);
            if !host_ok {
                eprintln!(
                    "rtpay serve: --pix-location-host must be a host name of 1 to {} lowercase letters, digits, `.` and `-`, not `{pix_location_host}`",
                    server::pix_rail::LOCATION_HOST_LEN_MAX
                );
                return ExitCode::from(2);
            }
            if let Some(ispb) = ispb.as_deref().filter(|i| !pix::ids::valid_ispb(i)) {
                eprintln!("rtpay serve: --ispb must be 8 digits or capital letters, not `{ispb}`");
                return ExitCode::from(2);
            }
            if card_hold_seconds == 0
                || card_hold_seconds > ledger::TIMEOUT_SECONDS_MAX
                || card_capture_tolerance > 1000
            {
                eprintln!(
                    "rtpay serve: --card-hold-seconds must be 1..={} and --card-capture-tolerance 0..=1000",
                    ledger::TIMEOUT_SECONDS_MAX
                );
                return ExitCode::from(2);
            }
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(server::tls::TlsFiles { cert, key, client_ca: tls_client_ca }),
                _ => None,
            };
            init_logging();
            if let Some(max) = account_cache {
                store::limit_account_cache(usize::try_from(max).unwrap_or(usize::MAX));
            }
            let config = ServeConfig {
                data: storage.data,
                listen,
                postgres: storage.postgres,
                audit_key: storage.audit_key,
                rate_limit,
                rate_burst,
                trusted_proxies: server::proxy::TrustedProxies::new(trusted_proxy),
                metrics_token,
                tls,
                kek: storage.kek,
                iso8583_listen,
                iso8583_plain,
                card_settings: server::card_network::CardSettings {
                    hold_seconds: card_hold_seconds,
                    capture_tolerance_percent: card_capture_tolerance,
                },
                pix: server::pix_rail::PixSettings {
                    ispb,
                    night,
                    simulator: server::spi::SimulatorSettings {
                        latency: std::time::Duration::from_millis(spi_latency_ms),
                        reject_percent: spi_reject_percent,
                        timeout_percent: spi_timeout_percent,
                    },
                    spi_timeout: std::time::Duration::from_millis(spi_timeout_ms),
                    location_host: pix_location_host,
                },
                pix_jws: pix_jws_cert.zip(pix_jws_key),
                webhooks: server::webhook::WebhookSettings {
                    ca: webhook_ca,
                    client_cert: webhook_client_cert.zip(webhook_client_key),
                    retry_base: std::time::Duration::from_millis(webhook_retry_ms.clamp(1, 3_600_000)),
                    retry_max: std::time::Duration::from_millis(webhook_retry_max_ms.clamp(1, 86_400_000)),
                    allow_private: webhook_allow_private,
                },
                env_secrets: true,
            };
            let threads = http_threads.map_or_else(rtpay::serve::http_threads_default, usize::from);
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads).enable_all();
            builder.build().expect("tokio runtime").block_on(async {
                let ready = |r: &rtpay::serve::Running| {
                    if let Some(a) = r.iso8583_addr {
                        println!("rtpay iso8583 listening on {a}");
                    }
                    println!("rtpay listening on {}://{}", r.scheme, r.addr);
                };
                match run(config, shutdown_signal(), ready).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("rtpay serve: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        CommandLine::Demo { listen, exit } => {
            if std::env::var_os("RTPAY_LOG").is_some() {
                init_logging();
            }
            match runtime().block_on(rtpay::demo::demo(listen, exit)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rtpay demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        CommandLine::Verify { storage } => {
            let report = store::Store::open_queries(&storage.location()).and_then(|q| store::verify_with(q.as_ref()));
            match report {
                Ok(report) if report.violations.is_empty() => {
                    println!(
                        "ok: {} accounts, {} transfer entries, every invariant holds",
                        report.accounts, report.transfers
                    );
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    for v in &report.violations {
                        println!("violation: {}", v.0);
                    }
                    let shown = match (report.violations_found as usize).saturating_sub(report.violations.len()) {
                        0 => String::new(),
                        more => format!(" ({more} more not shown)"),
                    };
                    println!(
                        "FAILED: {} violation(s){shown} in {} accounts, {} transfer entries",
                        report.violations_found, report.accounts, report.transfers
                    );
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("rtpay verify: {e}");
                    ExitCode::from(2)
                }
            }
        }
        CommandLine::Audit { command: AuditCommand::Verify { storage, public_key, head } } => {
            match audit_verify(&storage, public_key.as_deref(), head.as_deref()) {
                Ok(report) => match report.finding {
                    None => {
                        println!(
                            "ok: {} audit entries, {} signed tree heads, every hash and signature checks{}",
                            report.entries,
                            report.heads,
                            if head.is_some() { "; the saved tree head is contained" } else { "" }
                        );
                        ExitCode::SUCCESS
                    }
                    Some(finding) => {
                        println!("FAILED: {finding}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("rtpay audit verify: {e}");
                    ExitCode::from(2)
                }
            }
        }
        CommandLine::Keys { command: KeysCommand::Init { out } } => match rtpay::keys::init(&out) {
            Ok(files) => {
                println!("wrote a new cluster's keys, each readable by its owner only:");
                for file in files {
                    println!("  {}", file.display());
                }
                println!(
                    "give every node the same files as its --data directory (with --postgres it may be read-only), \
                     e.g. kubectl create secret generic rtpay-keys --from-file={dir}; the operator token is in \
                     {dir}/operator-token. Keep a copy apart from database backups: without these keys, API keys, \
                     vault data and blind indexes cannot be used.",
                    dir = out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rtpay keys init: {e}");
                ExitCode::FAILURE
            }
        },
        CommandLine::Keys { command: KeysCommand::Rotate { storage, add_only, rewrap_only } } => {
            let kek = rtpay::keys::KekConfig::or_default(storage.kek.clone(), &storage.data);
            let location = storage.location();
            // The rotation is recorded in the audit log, signed with the log's own key, before it
            // starts and when it ends: without the key, or if the first entry cannot be written,
            // nothing is rotated.
            let path = storage.audit_key.clone().unwrap_or_else(|| rtpay::serve::default_audit_key(&storage.data));
            let signer = match rtpay::serve::audit_signer(&path) {
                Ok(signer) => Arc::new(signer),
                Err(e) => {
                    eprintln!("rtpay keys rotate: {e} (pass --audit-key, the key that signs this storage's audit log); nothing was rotated");
                    return ExitCode::FAILURE;
                }
            };
            let queries = store::Store::open_queries(&location);
            let fits = queries
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|q| store::audit_key_signs(q.as_ref(), signer.public_key()));
            match fits {
                Ok(true) => {}
                Ok(false) => {
                    eprintln!(
                        "rtpay keys rotate: the audit log in this storage was not signed by the audit key {}; \
                         nothing was rotated",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("rtpay keys rotate: {e}; nothing was rotated");
                    return ExitCode::FAILURE;
                }
            }
            let draft = |outcome: String| audit::Draft {
                tenant: None,
                actor: "operator".into(),
                action: "keys.rotate".into(),
                resource: "kek".into(),
                request_id: String::new(),
                source: "cli".into(),
                outcome,
            };
            if let Err(e) = store::Store::append_audit_beside(&location, signer.clone(), vec![draft("started".into())])
            {
                eprintln!(
                    "rtpay keys rotate: the rotation could not be recorded in the audit log: {e}; nothing was rotated"
                );
                return ExitCode::FAILURE;
            }
            let result: Result<String, rtpay::serve::Error> = queries.map_err(|e| e.to_string().into()).and_then(|q| {
                if add_only {
                    Ok(format!(
                        "key-encryption key version {} added; no data key re-wrapped",
                        rtpay::keys::add_version(&kek, q.as_ref())?
                    ))
                } else if rewrap_only {
                    let (version, count) = rtpay::keys::rewrap(&kek, q.as_ref())?;
                    Ok(format!("{count} data key(s) re-wrapped under key-encryption key version {version}"))
                } else {
                    let (version, count) = rtpay::keys::rotate(&kek, q.as_ref())?;
                    Ok(format!("key-encryption key version {version} created; {count} data key(s) re-wrapped"))
                }
            });
            let outcome = match &result {
                Ok(done) => done.clone(),
                Err(e) => format!("failed: {e}"),
            };
            // An operator action like any other: recorded, whether it worked or not.
            let audited = store::Store::append_audit_beside(&location, signer, vec![draft(outcome)]);
            if let Err(e) = &audited {
                eprintln!("rtpay keys rotate: the rotation could not be recorded in the audit log: {e}");
            }
            match result {
                Ok(done) if audited.is_ok() => {
                    println!("{done}");
                    ExitCode::SUCCESS
                }
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("rtpay keys rotate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        CommandLine::Migrate { storage } => match store::Store::migrate(&storage.location()) {
            Ok(applied) if applied.is_empty() => {
                println!("schema up to date");
                ExitCode::SUCCESS
            }
            Ok(applied) => {
                println!("applied migrations {applied:?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rtpay migrate: {e}");
                ExitCode::FAILURE
            }
        },
        CommandLine::BenchBaseline { listen } => match runtime().block_on(rtpay::bench::baseline_server(listen)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rtpay bench-baseline: {e}");
                ExitCode::FAILURE
            }
        },
        CommandLine::Bench(args) => match rtpay::bench::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rtpay bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

#[cfg(all(test, target_os = "linux", not(target_env = "musl")))]
mod tests {
    /// C code's `malloc` (SQLite's page cache, for one) is jemalloc's, linked into this binary,
    /// not glibc's: one allocator, without glibc's arena locks.
    #[test]
    fn c_allocations_go_to_jemalloc() {
        let mut info = unsafe { std::mem::zeroed::<libc::Dl_info>() };
        // SAFETY: dladdr only reads the address and fills `info`.
        let found = unsafe { libc::dladdr(libc::malloc as *const libc::c_void, &mut info) };
        assert_ne!(found, 0, "malloc has no symbol information");
        // SAFETY: dladdr set a NUL-terminated path of the object holding the symbol.
        let object = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
        assert!(!object.contains("libc.so"), "malloc resolves to glibc's ({object})");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(std::fs::canonicalize(&object).unwrap(), std::fs::canonicalize(exe).unwrap());
        // And it works as one: memory from C's malloc is usable and freed by C's free.
        let p = unsafe { libc::malloc(4096) } as *mut u8;
        assert!(!p.is_null());
        unsafe {
            p.write_bytes(0xAB, 4096);
            assert_eq!(*p.add(4095), 0xAB);
            libc::free(p as *mut libc::c_void);
        }
    }

    /// Minor page faults of this thread so far.
    fn minor_faults() -> i64 {
        let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
        // SAFETY: getrusage only fills `usage`.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
        usage.ru_minflt
    }

    /// A large buffer freed and allocated again (a batch's, every batch) gets its pages back
    /// without faulting them in anew: jemalloc keeps blocks of 8 MiB and more until they decay,
    /// as it does smaller ones (`malloc_conf`), instead of returning them to the kernel at once.
    #[test]
    fn a_large_buffer_allocated_again_keeps_its_pages() {
        const LEN: usize = 32 << 20;
        let fill = || {
            let mut buffer: Vec<u8> = Vec::with_capacity(LEN);
            buffer.resize(LEN, 0xA5);
            std::hint::black_box(&buffer);
        };
        fill();
        let before = minor_faults();
        fill();
        let faults = minor_faults() - before;
        let pages = (LEN / 4096) as i64;
        assert!(faults < pages / 10, "{faults} page faults refilling {pages} pages");
        // And the option is the one in effect (huge pages, where on for every mapping, would
        // hide the faults).
        unsafe extern "C" {
            fn mallctl(
                name: *const libc::c_char,
                old: *mut libc::c_void,
                old_len: *mut usize,
                new: *mut libc::c_void,
                new_len: usize,
            ) -> libc::c_int;
        }
        let (mut threshold, mut len) = (usize::MAX, std::mem::size_of::<usize>());
        // SAFETY: `opt.oversize_threshold` is a size_t, read into one.
        let read = unsafe {
            mallctl(c"opt.oversize_threshold".as_ptr(), (&raw mut threshold).cast(), &mut len, std::ptr::null_mut(), 0)
        };
        assert_eq!((read, threshold), (0, 0));
    }
}
