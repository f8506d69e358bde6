//! Starting a server: keys, the operator token, storage, the listener, graceful shutdown.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use server::auth::{hex, new_secret, random_32, unhex, Keys, OPERATOR_SECRET_PREFIX};
use store::{Location, Store};

pub struct ServeConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub postgres: Option<String>,
    /// The audit signing key file; default `<data>/audit-signing-key`.
    pub audit_key: Option<PathBuf>,
    /// Requests per second each tenant may make on this node, and the burst above it.
    pub rate_limit: f64,
    pub rate_burst: Option<f64>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: server::proxy::TrustedProxies,
    /// The bearer token `/metrics` asks for, if any.
    pub metrics_token: Option<String>,
    pub tls: Option<server::tls::TlsFiles>,
    /// Where the vault's key-encryption keys live; default `file:<data>/kek`.
    pub kek: Option<crate::keys::KekConfig>,
    /// The card network's ISO 8583 listener, if any.
    pub iso8583_listen: Option<SocketAddr>,
    /// Plain TCP on the ISO 8583 listener even with a certificate (a link encrypted below it).
    pub iso8583_plain: bool,
    pub card_settings: server::card_network::CardSettings,
    pub pix: server::pix_rail::PixSettings,
    /// The certificate chain and key (PEM) that sign the payloads at charges' locations; `None`:
    /// a key made once per database, with no certificate.
    pub pix_jws: Option<(PathBuf, PathBuf)>,
    pub webhooks: server::webhook::WebhookSettings,
    /// Whether the secrets in the environment are used (`RTPAY_OPERATOR_TOKEN`,
    /// `RTPAY_SECRET_KEY`, `RTPAY_INDEX_KEY`); false: only the data directory's (the demo, which
    /// prints its operator token, makes its own).
    pub env_secrets: bool,
}

impl ServeConfig {
    pub fn location(&self) -> Location {
        match &self.postgres {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::Embedded(self.data.clone()),
        }
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Writes a new file readable by its owner only; never replaces one. The file appears whole or
/// not at all: its contents go to a private file beside it first, which is then linked under its
/// name (refused if the name exists). A write that fails (a full disk, a size limit) or a crash
/// leaves no empty or truncated key behind for the next start to trip on. (A crash between the
/// two steps leaves the staged copy, `.<name>.<pid>.<n>.new`, as private as the key.) On a file
/// system without hard links the file is written in place, as before.
pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let staged = staged_private(path, contents)?;
    let linked = std::fs::hard_link(&staged, path);
    let _ = std::fs::remove_file(&staged);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && links_unsupported(&e) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            if let Err(e) = file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()) {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        }
        linked => linked?,
    }
    sync_parent(path)
}

/// Whether `link(2)` failed for want of hard links on the file system (vfat, some FUSE mounts).
fn links_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::EMLINK))
}

/// Replaces `path` with `contents` (mode 0600), whole or not at all: written beside it, then
/// renamed over it. A symbolic link is followed: the file it names is replaced, and the link
/// stays.
pub(crate) fn replace_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let target = std::fs::canonicalize(path)?;
    let staged = staged_private(&target, contents)?;
    if let Err(e) = std::fs::rename(&staged, &target) {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    sync_parent(&target)
}

/// `contents` in a new private file beside `path`, synced to disk; removed again on failure.
fn staged_private(path: &Path, contents: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static STAGED: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| std::io::Error::other("a key file's path must name a file"))?;
    let mut staged_name = std::ffi::OsString::from(".");
    staged_name.push(name);
    staged_name.push(format!(".{}.{}.new", std::process::id(), STAGED.fetch_add(1, Ordering::Relaxed)));
    let staged = path.with_file_name(staged_name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    })();
    match written {
        Ok(()) => Ok(staged),
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            Err(e)
        }
    }
}

/// Makes a new name in `path`'s directory durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent)?.sync_all()
}

/// A key file this start makes: written only once the storage is found to need no other key
/// (see [`check_new_keys`]), so a node pointed at the wrong directory leaves nothing there.
pub struct NewKey {
    path: PathBuf,
    text: String,
}

impl NewKey {
    fn write(self) -> Result<(), Error> {
        write_private(&self.path, &self.text).map_err(|e| format!("cannot write {}: {e}", self.path.display()).into())
    }
}

/// The key under which API secrets are hashed: `RTPAY_SECRET_KEY` (64 hex digits; give every node
/// of a PostgreSQL cluster the same one) where `env`, else `<data>/secret-key`, made on first start.
pub fn hash_key(data: &Path, env: bool) -> Result<([u8; 32], Option<NewKey>), Error> {
    let path = data.join("secret-key");
    let (text, new) = match std::env::var("RTPAY_SECRET_KEY").ok().filter(|_| env) {
        Some(v) => (v, None),
        None if path.exists() => (std::fs::read_to_string(&path)?, None),
        None => {
            let text = new_hash_key();
            (text.clone(), Some(NewKey { path, text }))
        }
    };
    let bytes = unhex(text.trim()).filter(|b| b.len() == 32).ok_or("the secret key must be 64 hex digits")?;
    Ok((bytes.try_into().expect("32 bytes"), new))
}

/// A new key to hash API secrets under, as [`hash_key`] reads it.
pub(crate) fn new_hash_key() -> String {
    hex(&random_32())
}

/// The operator token: `RTPAY_OPERATOR_TOKEN` where `env`, else `<data>/operator-token`; made on
/// first start, printed once and written with mode 0600.
pub fn operator_token(data: &Path, env: bool) -> Result<(String, Option<NewKey>), Error> {
    if let Some(token) = std::env::var("RTPAY_OPERATOR_TOKEN").ok().filter(|_| env) {
        if token.len() < 32 {
            return Err("RTPAY_OPERATOR_TOKEN must be at least 32 characters".into());
        }
        return Ok((token, None));
    }
    let path = data.join("operator-token");
    if path.exists() {
        let token = std::fs::read_to_string(&path)?.trim().to_owned();
        // As short a token as the environment's is refused (an empty file written by hand, or
        // by an older rtpay that crashed between creating the file and writing it). Its
        // content is not echoed.
        if token.len() < 32 {
            return Err(format!("{} must hold an operator token of at least 32 characters", path.display()).into());
        }
        return Ok((token, None));
    }
    let token = new_secret(OPERATOR_SECRET_PREFIX);
    Ok((token.clone(), Some(NewKey { path, text: token })))
}

/// Refuses keys this start would make for storage that already has an audit log (every tenant and
/// key made, every operator action is in it): a node given a wrong or empty `--data`, or no
/// `--audit-key`, beside a cluster's database. A new secret key would open none of the API keys
/// the other nodes issued; an audit key that did not sign the log's heads would sign the next one,
/// and `rtpay audit verify` would fail on it for good. Also a key file that is there but is not the
/// one that signed the log.
async fn check_new_keys(
    store: &Arc<Store>,
    public_key: Vec<u8>,
    audit_key: &Path,
    new_hash_key: Option<&NewKey>,
    new_token: Option<&NewKey>,
    cluster: bool,
) -> Result<(), Error> {
    let queries = store.queries.clone();
    let (logged, signs) = tokio::task::spawn_blocking(move || -> store::Result<(bool, bool)> {
        Ok((queries.audit_head()?.is_some(), store::audit_key_signs(queries.as_ref(), &public_key)?))
    })
    .await??;
    if !signs {
        return Err(format!(
            "the audit log in this storage was not signed by the audit key {}: start this node with the key \
             that signed it (--audit-key, or the cluster's --data; every node uses the same one); nothing was signed",
            audit_key.display()
        )
        .into());
    }
    if let Some(new) = new_hash_key.filter(|_| logged) {
        return Err(format!(
            "this storage already holds tenants and their API keys, and this node has no secret key ({} nor \
             RTPAY_SECRET_KEY): start it with the cluster's keys (see `rtpay keys init`); none was made",
            new.path.display()
        )
        .into());
    }
    // A cluster's node with a token of its own would refuse the operator's (and count each try
    // towards the operator's lock). An embedded node's token file lives beside its database:
    // one deleted there is made again, the way to replace a lost one.
    if let Some(new) = new_token.filter(|_| logged && cluster) {
        return Err(format!(
            "this cluster's storage already has an audit log, and this node has no operator token ({} nor \
             RTPAY_OPERATOR_TOKEN): start it with the cluster's (see `rtpay keys init`); none was made",
            new.path.display()
        )
        .into());
    }
    Ok(())
}

/// The vault: its key-encryption keys (version 1 made on first start) and index key, after
/// [`refuse_new_keys_for_sealed_data`].
async fn open_vault(
    kek: crate::keys::KekConfig,
    data: &Path,
    env: bool,
    store: &Arc<Store>,
) -> Result<server::vault_service::VaultService, Error> {
    refuse_new_keys_for_sealed_data(&kek, data, env, store).await?;
    // Made on first start in the storage's turn for key rotations: nodes of a cluster starting
    // together on one fresh PKCS#11 token each found no version 1 and each made one, and the
    // token held two keys by one name, each node wrapping data keys under its own.
    let (turn_store, first_kek) = (store.clone(), kek.clone());
    tokio::task::spawn_blocking(move || -> Result<(), Error> {
        let _turn = turn_store.queries.key_rotation_turn()?;
        crate::keys::load(&first_kek, true)?;
        Ok(())
    })
    .await??;
    let rotation = kek.clone();
    Ok(server::vault_service::VaultService::new(crate::keys::loader(kek), &crate::keys::index_key(data, env)?)?
        .with_rotator(Box::new(move |q| crate::keys::rotate(&rotation, q).map_err(|e| e.to_string()))))
}

/// A node about to make its own vault keys (no key-encryption key, or no index key, where it was
/// told to look) for a database that already holds tenants' data keys is pointed at the wrong
/// keys: a wrong or empty `--data` beside `--postgres`, a mistyped `--kek`. Made anyway, its
/// keys would open none of the sealed data (500s) and wrap new data keys no other node can
/// open, and its blind indexes would find nothing. It stops before making any.
async fn refuse_new_keys_for_sealed_data(
    kek: &crate::keys::KekConfig,
    data: &Path,
    env: bool,
    store: &Arc<Store>,
) -> Result<(), Error> {
    let (no_kek, no_index_key) = (crate::keys::kek_missing(kek), crate::keys::index_key_missing(data, env));
    if !(no_kek || no_index_key) {
        return Ok(());
    }
    let store = store.clone();
    if tokio::task::spawn_blocking(move || store.queries.data_keys()).await??.is_empty() {
        return Ok(());
    }
    let missing = if no_kek { "key-encryption key" } else { "index key" };
    Err(format!(
        "the database already holds tenants' data keys, and this node has no {missing} where it looks \
         (--data {}, --kek): start it with the cluster's keys (see `rtpay keys init`); no vault key was made",
        data.display()
    )
    .into())
}

/// Where the audit signing key lives by default.
pub fn default_audit_key(data: &Path) -> PathBuf {
    data.join("audit-signing-key")
}

/// The Ed25519 key that signs the audit log's tree heads, from `path` (PKCS#8 as hex, mode 0600).
/// Every node of a PostgreSQL cluster must be given the same file.
pub fn audit_signer(path: &Path) -> Result<audit::Signer, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the audit key {}: {e}", path.display()))?;
    signer_of(path, &text)
}

/// [`audit_signer`], or a new key where `path` holds none (made on first start, written as a
/// [`NewKey`]).
pub fn audit_signer_or_new(path: &Path) -> Result<(audit::Signer, Option<NewKey>), Error> {
    if path.exists() {
        return Ok((audit_signer(path)?, None));
    }
    let text = new_audit_key()?;
    Ok((signer_of(path, &text)?, Some(NewKey { path: path.to_owned(), text })))
}

fn signer_of(path: &Path, text: &str) -> Result<audit::Signer, Error> {
    let pkcs8 = unhex(text.trim()).ok_or_else(|| format!("the audit key {} is not hex", path.display()))?;
    Ok(audit::Signer::from_pkcs8(&pkcs8).map_err(|e| format!("the audit key {}: {e}", path.display()))?)
}

/// A new audit signing key, as [`audit_signer`] reads it.
pub(crate) fn new_audit_key() -> Result<String, Error> {
    Ok(hex(&audit::Signer::generate_pkcs8()?))
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTPAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// How many threads serve HTTP and ISO 8583 by default: one per core but one, and at least one.
///
/// The ledger's writer is a thread of its own (it applies every batch), beside its syncer and its
/// checkpointer. With a worker on every core as well, the workers and those threads take turns on
/// the same cores. At the HTTP peak on two cores, with one worker instead of two, a request cost
/// the workers 10.7–11.8 µs instead of 11.7–13.3 and the peak rose 3–6 %, while the Pix and card
/// figures held (docs/BENCHMARKS.md, session 17). `serve --http-threads` sets it.
pub fn http_threads_default() -> usize {
    http_threads_for(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

fn http_threads_for(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    /// `https` or `http`.
    pub scheme: &'static str,
    pub operator_token: String,
    pub store: Arc<Store>,
    pub iso8583_addr: Option<SocketAddr>,
}

/// Connections the kernel completes and queues for a listener before rtpay accepts them; it caps
/// this at `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket with room for a burst of new connections. The standard library's and
/// tokio's `bind` queue 128: a burst larger than that (clients reconnecting at once after a
/// restart or a load balancer's failover) has its extra SYNs dropped, and those clients wait for
/// their retransmission, a second later.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The smallest `--rate-limit`: a request every 1,000 s.
const RATE_MIN: f64 = 0.001;

/// Opens storage, binds, and serves until `shutdown` resolves; `ready` is called once listening.
pub async fn run(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(&Running),
) -> Result<(), Error> {
    // From one request in about 17 minutes: a rate so small that the wait for a token could not
    // be written made every limited request a 500.
    let rate_ok = |v: f64| v.is_finite() && v >= RATE_MIN;
    if !rate_ok(config.rate_limit) || config.rate_burst.is_some_and(|b| !b.is_finite() || b < 1.0) {
        return Err(format!("--rate-limit must be above 0 (at least {RATE_MIN}) and --rate-burst at least 1").into());
    }
    let metrics_token = config.metrics_token.as_deref().map(server::routes::ops::MetricsToken::new).transpose()?;
    server::quiet_panics();
    // Bad PEM files are refused before anything is created or opened.
    let acceptor = config.tls.as_ref().map(server::tls::acceptor).transpose()?;
    let iso8583_tls = match &config.tls {
        Some(files) if config.iso8583_listen.is_some() && !config.iso8583_plain => {
            Some(server::tls::iso8583_tls(files)?)
        }
        _ => None,
    };
    let payload_signer =
        config.pix_jws.as_ref().map(|(cert, key)| server::jws::PayloadSigner::from_pem_files(cert, key)).transpose()?;
    let webhooks = server::webhook::WebhookClient::new(&config.webhooks)?;
    // Made private (the ledger and the key files live there); one that exists is left as it is.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&config.data)
        .map_err(|e| format!("cannot create data directory {}: {e}", config.data.display()))?;
    let (token, new_token) = operator_token(&config.data, config.env_secrets)?;
    let (hash_key, new_hash_key) = hash_key(&config.data, config.env_secrets)?;
    let keys = Keys::new(hash_key, &token);
    let location = config.location();
    let audit_key = config.audit_key.clone().unwrap_or_else(|| default_audit_key(&config.data));
    let (signer, new_audit_key) = audit_signer_or_new(&audit_key)?;
    let signer = Arc::new(signer);
    let public_key = signer.public_key().to_vec();
    // The listeners before the store: a port in use is refused with its own error, not by
    // closing a PostgreSQL store on the async threads (whose blocking client panics there).
    let listener = listen(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let iso8583 = match config.iso8583_listen {
        Some(a) => Some(listen(a).map_err(|e| format!("cannot listen on {a} (--iso8583-listen): {e}"))?),
        None => None,
    };
    let iso8583_addr = iso8583.as_ref().map(|l| l.local_addr()).transpose()?;
    let store =
        tokio::task::spawn_blocking(move || Store::open_with(&location, Arc::new(store::now_nanos), signer)).await??;
    let store = Arc::new(store);
    let kek = crate::keys::KekConfig::or_default(config.kek.clone(), &config.data);
    let keys_made = async {
        let cluster = matches!(config.location(), store::Location::Postgres(_));
        check_new_keys(&store, public_key.clone(), &audit_key, new_hash_key.as_ref(), new_token.as_ref(), cluster)
            .await?;
        // The vault's own check too, before any file is written (`open_vault` makes its keys).
        refuse_new_keys_for_sealed_data(&kek, &config.data, config.env_secrets, &store).await?;
        for new in [new_hash_key, new_audit_key].into_iter().flatten() {
            new.write()?;
        }
        if let Some(new) = new_token {
            let shown =
                format!("operator token (shown once; saved to {} with mode 0600): {}", new.path.display(), new.text);
            new.write()?;
            println!("{shown}");
        }
        open_vault(kek, &config.data, config.env_secrets, &store).await
    };
    let vault = match keys_made.await {
        Ok(vault) => vault,
        Err(e) => {
            // A PostgreSQL store is closed off the async threads: its client blocks, and dropped
            // here it panicked, hiding the error.
            let _ = tokio::task::spawn_blocking(move || drop(store)).await;
            return Err(e);
        }
    };
    let state = server::AppState::new(store.clone(), keys, public_key)
        .with_vault(vault)
        .with_tenant_rate(config.rate_limit, config.rate_burst.unwrap_or(config.rate_limit.max(1.0)))
        .with_card_settings(config.card_settings)
        .with_pix(config.pix)
        .with_webhooks(webhooks)
        .with_trusted_proxies(config.trusted_proxies)
        .with_metrics_token(metrics_token);
    if let Some(signer) = payload_signer {
        let _ = state.pix_runtime.signer.set(Arc::new(signer));
    }
    // Notifications a stopped node left pending (the outbox).
    server::webhook::resume(&state);
    // Off-us Pix whose verdict a stopped node never recorded.
    server::pix_rail::resume(&state);
    server::pix_return::resume(&state);
    // The leases and claims above compare clocks across nodes: this one's against PostgreSQL's.
    server::clock::watch(&state);
    // The card listener stops with the HTTP one.
    let (stop_cards, cards_stopped) = tokio::sync::oneshot::channel::<()>();
    let cards = iso8583.map(|listener| {
        let state = state.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = cards_stopped.await;
            };
            if let Err(e) = server::iso8583::serve(listener, state, iso8583_tls, stopped).await {
                tracing::error!(error = %e, "the ISO 8583 listener failed");
            }
        })
    });
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let running = Running { addr, scheme, operator_token: token, store: store.clone(), iso8583_addr };
    ready(&running);
    tracing::info!(%addr, engine = match config.postgres { Some(_) => "postgres", None => "embedded" }, "listening");
    match acceptor {
        Some(acceptor) => {
            let mutual = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            server::serve_tls(listener, state, acceptor, mutual, shutdown).await?
        }
        None => server::serve(listener, state, shutdown).await?,
    }
    let _ = stop_cards.send(());
    if let Some(cards) = cards {
        let _ = cards.await;
    }
    drop(running);
    // Let the writer finish what is queued, then stop it.
    if let Ok(store) = Arc::try_unwrap(store) {
        tokio::task::spawn_blocking(move || store.close()).await?;
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One core is left to the ledger's writer, but never the only one.
    #[test]
    fn http_threads_leave_one_core_to_the_writer_but_never_drop_to_none() {
        assert_eq!(http_threads_for(0), 1);
        assert_eq!(http_threads_for(1), 1);
        assert_eq!(http_threads_for(2), 1);
        assert_eq!(http_threads_for(8), 7);
    }

    /// A burst of connections beyond the old queue of 128 is completed by the kernel while the
    /// server is busy elsewhere: none waits for a SYN to be sent again.
    #[tokio::test]
    async fn a_burst_of_connections_is_queued_until_accepted() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts until every connection is open: the kernel's queue holds them all.
        let opening: Vec<_> = (0..400)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    std::time::Duration::from_millis(800),
                    tokio::net::TcpStream::connect(addr),
                ))
            })
            .collect();
        let mut open = Vec::new();
        for task in opening {
            match task.await.unwrap() {
                Ok(Ok(stream)) => open.push(stream),
                Ok(Err(e)) => panic!("connect: {e}"),
                Err(_) => panic!("a connection was not completed (the accept queue is full)"),
            }
        }
        assert_eq!(open.len(), 400);
        for _ in 0..400 {
            listener.accept().await.unwrap();
        }
        assert!(listen(addr).is_err(), "the address is taken while the listener lives");
    }
}
