//! TLS to PostgreSQL: a private PostgreSQL cluster of the test's own (Debian's server binaries,
//! which scripts/setup installs where missing) with `ssl = on` and a certificate from the test's
//! own CA. With `sslmode=require` rtpay encrypts every connection and checks the certificate's
//! chain and host name; a server it cannot verify stops it before anything is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::json;

/// A PostgreSQL server in a temporary directory, on a port of its own, stopped when dropped.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

/// A PostgreSQL program to run: as the `postgres` user when the test runs as root (the server
/// refuses root), else as the test's user.
fn pg_command(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs a PostgreSQL program (see [`pg_command`]) and requires it to succeed.
fn pg_run(program: &Path, args: &[&str]) -> std::process::Output {
    let out = pg_command(program).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(out.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
    out
}

impl PrivatePostgres {
    fn start(dir: &Path, cert_pem: &str, key_pem: &str) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries are required (scripts/setup installs Debian's postgresql)")
            .map(|e| e.unwrap().path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max_by_key(|b| b.parent().unwrap().file_name().unwrap().to_string_lossy().parse::<u32>().unwrap_or(0))
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let out = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).output().unwrap();
            assert!(out.status.success());
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let data = dir.join("data");
        pg_run(&bin.join("initdb"), &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c ssl=on \
             -c ssl_cert_file={} -c ssl_key_file={} -c fsync=off",
            dir.display(),
            cert.display(),
            key.display()
        );
        let log = dir.join("server.log");
        pg_run(
            &bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "-o", &options, "start"],
        );
        PrivatePostgres { bin, data, port }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// A CA's PEM, and a certificate it issued for `names` with its key's PEM.
fn issued(ca_name: &str, names: &[&str]) -> (String, String, String) {
    let ca = TestCa::new(ca_name);
    let (cert, key) = ca.issue(names, &[]);
    (ca.pem(), cert, key)
}

fn migrate(url: &str, roots: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["migrate", "--postgres", url])
        .env("PGSSLROOTCERT", roots)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn rtpay_talks_to_postgresql_over_verified_tls_when_the_url_requires_it() {
    let dir = temp_dir("pg-tls");
    let (ca_pem, cert_pem, key_pem) = issued("rtpay test database CA", &["localhost"]);
    let pg = PrivatePostgres::start(&dir, &cert_pem, &key_pem);
    let roots = dir.join("ca.pem");
    std::fs::write(&roots, &ca_pem).unwrap();
    let (other_ca, _, _) = issued("another CA", &["localhost"]);
    let other_roots = dir.join("other-ca.pem");
    std::fs::write(&other_roots, other_ca).unwrap();
    let url = format!("postgres://postgres@localhost:{}/postgres?sslmode=require", pg.port);

    // A server whose certificate no trusted root issued, or that is reached under a name its
    // certificate does not hold, is refused before anything is written.
    let (ok, out) = migrate(&url, &other_roots);
    assert!(!ok && out.contains("UnknownIssuer"), "{out}");
    let by_address = format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=require", pg.port);
    let (ok, out) = migrate(&by_address, &roots);
    assert!(!ok && out.contains("not valid for name"), "{out}");
    let mut plain = ::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable", pg.port),
        ::postgres::NoTls,
    )
    .unwrap();
    let tables: i64 = plain
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'", &[])
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "nothing was created through a connection that was not verified");

    // Trusted: a node serves over it, and every connection it holds is encrypted.
    // Nextest runs each test in a process of its own: the nodes it starts inherit this.
    std::env::set_var("PGSSLROOTCERT", &roots);
    let server = Server::start(&temp_dir("pg-tls-node"), Some(&url));
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "tls").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let shop = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let body = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": shop, "amount": 250});
        assert_eq!(c.post("/v1/transfers", &key, &body).await.unwrap().status, 201);
        assert_eq!(balance(&mut c, &key, &shop).await["credits_posted"], json!(250));
    });
    let encrypted: Vec<bool> = plain
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'rtpay'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!encrypted.is_empty() && encrypted.iter().all(|e| *e), "rtpay's connections: {encrypted:?}");
}
