//! Runs real `rtpay serve` processes for end-to-end tests, and talks to them over real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rtpay::client::Client;
use rtpay::process::{KeysEnv, Spawn};
use serde_json::{json, Value};

pub use rtpay::process::OPERATOR;

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rtpay-{tag}-{}-{}", std::process::id(), store::now_nanos()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub postgres: Option<String>,
    /// The ISO 8583 listener, when started with `--iso8583-listen`.
    pub iso8583: Option<SocketAddr>,
    /// Whether `RTPAY_OPERATOR_TOKEN` is set to [`OPERATOR`]; when not, the server uses (and on
    /// first start creates) `<data>/operator-token`.
    pub operator_env: bool,
    /// The extra `serve` arguments, given again on restart.
    args: Vec<String>,
}

impl Server {
    /// Starts `rtpay serve` on a free port and waits until it is listening.
    pub fn start(data: &Path, postgres: Option<&str>) -> Server {
        Self::start_on(data, postgres, "127.0.0.1:0")
    }

    pub fn start_on(data: &Path, postgres: Option<&str>, listen: &str) -> Server {
        Self::start_with(data, postgres, listen, true)
    }

    /// Starts with no `RTPAY_OPERATOR_TOKEN` in the environment: the operator token comes from
    /// `<data>/operator-token`.
    pub fn start_without_operator_env(data: &Path, postgres: Option<&str>) -> Server {
        Self::start_with(data, postgres, "127.0.0.1:0", false)
    }

    pub fn start_with(data: &Path, postgres: Option<&str>, listen: &str, operator_env: bool) -> Server {
        Self::start_with_args(data, postgres, listen, operator_env, &[])
    }

    /// Starts with more `serve` arguments.
    pub fn start_with_args(
        data: &Path,
        postgres: Option<&str>,
        listen: &str,
        operator_env: bool,
        args: &[&str],
    ) -> Server {
        Self::start_logged(data, postgres, listen, operator_env, args, None)
    }

    /// Starts with the server's debug log written to `log`.
    pub fn start_logged(
        data: &Path,
        postgres: Option<&str>,
        listen: &str,
        operator_env: bool,
        args: &[&str],
        log: Option<&Path>,
    ) -> Server {
        let spawn = Spawn {
            args,
            log,
            exe: Path::new(env!("CARGO_BIN_EXE_rtpay")),
            data,
            postgres,
            listen,
            keys: if operator_env { KeysEnv::Fixed } else { KeysEnv::SecretOnly },
            wait: Duration::from_secs(60),
        };
        let process = spawn.start().unwrap_or_else(|e| panic!("{e}"));
        Server {
            child: Some(process.child),
            addr: process.addr,
            iso8583: process.iso8583,
            data: data.to_owned(),
            postgres: postgres.map(str::to_owned),
            operator_env,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let listen = self.addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The old port may take a moment to be free again.
            let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
            let attempt = std::panic::catch_unwind(|| {
                Server::start_with_args(&self.data, self.postgres.as_deref(), &listen, self.operator_env, &args)
            });
            match attempt {
                Ok(mut s) => {
                    self.child = s.child.take();
                    return;
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    /// `rtpay verify` on this server's storage, as a separate process.
    pub fn verify(&self) -> (bool, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rtpay"));
        command.arg("verify").arg("--data").arg(&self.data);
        if let Some(url) = &self.postgres {
            command.arg("--postgres").arg(url);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

impl Server {
    /// `rtpay audit verify` on this server's storage (its keys in the data directory), as a
    /// separate process.
    pub fn audit_verify(&self) -> (bool, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rtpay"));
        command.args(["audit", "verify", "--data"]).arg(&self.data);
        if let Some(url) = &self.postgres {
            command.arg("--postgres").arg(url);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two nodes, started with `args`, on one fresh PostgreSQL database; they share their key files,
/// as a cluster's nodes must (see docs/OPERATIONS.md).
pub fn two_nodes(tag: &str, args: &[&str]) -> (Server, Server) {
    let url = store::testing::fresh_postgres_database();
    let (dir_a, dir_b) = (temp_dir(&format!("{tag}-a")), temp_dir(&format!("{tag}-b")));
    let a = Server::start_with_args(&dir_a, Some(&url), "127.0.0.1:0", true, args);
    for file in ["kek", "index-key", "audit-signing-key"] {
        std::fs::copy(dir_a.join(file), dir_b.join(file)).unwrap();
    }
    let b = Server::start_with_args(&dir_b, Some(&url), "127.0.0.1:0", true, args);
    (a, b)
}

pub fn uuid() -> String {
    server::auth::new_uuid().to_string()
}

/// A tenant with its API key.
pub async fn tenant(client: &mut Client, name: &str) -> (String, String) {
    let r = client.post("/v1/tenants", OPERATOR, &json!({ "name": name })).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let v = r.json();
    (v["id"].as_str().unwrap().to_owned(), v["api_key"]["secret"].as_str().unwrap().to_owned())
}

pub async fn account(client: &mut Client, key: &str, body: Value) -> String {
    let r = client.post("/v1/accounts", key, &body).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    r.json()["id"].as_str().unwrap().to_owned()
}

/// A holder (`kind` person or company) in the tenant of `key`; its id.
pub async fn new_holder(client: &mut Client, key: &str, kind: &str, name: &str, document: &str) -> String {
    let r = client.post("/v1/holders", key, &json!({"kind": kind, "name": name, "document": document})).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    r.json()["id"].as_str().unwrap().to_owned()
}

pub async fn balance(client: &mut Client, key: &str, account: &str) -> Value {
    let r = client.get(&format!("/v1/accounts/{account}"), key).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    r.json()["balance"].clone()
}

/// The node's `/metrics` text once it holds a sample of `name` (a node on PostgreSQL measures its
/// clock a moment after it starts); fails after 10 s without one.
pub async fn metrics_with(client: &mut Client, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client.send(hyper::Method::GET, "/metrics", None, None).await.unwrap();
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        if text.lines().any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{']))) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {name} sample: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A TCP proxy in front of PostgreSQL that a test can cut (`up` false refuses new connections;
/// bumping `generation` cuts the open ones) and restore.
pub struct Switch {
    pub addr: SocketAddr,
    pub up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections being proxied.
    pub open: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Switch {
    /// PostgreSQL goes away: new connections are refused, and this returns once every open one is
    /// cut. (Called outside the runtime's workers, which close them.)
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.up.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.open.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the proxy's connections were not cut");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A proxy in front of the PostgreSQL of `url`, and the URL through it. Call within a runtime.
#[allow(dead_code)]
pub async fn proxied_postgres(url: &str) -> (Switch, String) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let rest = url.split("://").nth(1).unwrap();
    let hostport = rest.split('@').next_back().unwrap().split('/').next().unwrap();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    let target: SocketAddr = format!("{host}:{port}").parse().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let generation = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let (up2, gen2, open2) = (up.clone(), generation.clone(), open.clone());
    /// Counts a proxied connection until it ends.
    struct Open(Arc<AtomicU64>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            open2.fetch_add(1, Ordering::SeqCst);
            let counted = Open(open2.clone());
            let born = gen2.load(Ordering::SeqCst);
            // `cut` clears `up` before it bumps the generation: read after it, `up` tells whether
            // `born` is already the cut's.
            if !up2.load(Ordering::SeqCst) {
                drop((inbound, counted));
                continue;
            }
            let gen3 = gen2.clone();
            tokio::spawn(async move {
                let _counted = counted;
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                let cut = async {
                    while gen3.load(Ordering::SeqCst) == born {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! { _ = copy => {}, _ = cut => {} }
            });
        }
    });
    let proxied = url.replacen(hostport, &addr.to_string(), 1);
    (Switch { addr, up, generation, open }, proxied)
}

/// A certificate authority of the tests' own (rcgen), issuing certificates for TLS tests.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for the DNS names `dns` and the URIs `uris`, to a new key: (certificate PEM,
    /// key PEM).
    pub fn issue(&self, dns: &[&str], uris: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        (self.issue_to(&key, dns, uris).pem(), key.serialize_pem())
    }

    /// A certificate for `dns` and `uris` to `key`.
    pub fn issue_to(&self, key: &rcgen::KeyPair, dns: &[&str], uris: &[&str]) -> rcgen::Certificate {
        let mut params = rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(rcgen::Ia5String::try_from(uri.to_string()).unwrap()));
        }
        params.signed_by(key, &self.cert, &self.key).unwrap()
    }
}

/// Makes PostgreSQL refuse every insert into `table` (a trigger raising an error), as a storage
/// failure rtpay must answer without losing or inventing anything; [`allow_inserts`] undoes it.
pub fn refuse_inserts(admin: &mut postgres::Client, table: &str) {
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'inserts into {table} refused by the test'; END $$; \
             CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse_{table}()"
        ))
        .unwrap();
}

pub fn allow_inserts(admin: &mut postgres::Client, table: &str) {
    admin.batch_execute(&format!("DROP TRIGGER refuse_{table} ON {table}")).unwrap();
}
