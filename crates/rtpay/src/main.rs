//! `rtpay`: a real-time payments core in one binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rtpay::serve::{init_logging, run, shutdown_signal, ServeConfig};
use store::Location;

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
    #[arg(long, env = "RTPAY_POSTGRES")]
    postgres: Option<String>,
}

impl StorageArgs {
    fn location(&self) -> Location {
        match &self.postgres {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::Embedded(self.data.clone()),
        }
    }
}

#[derive(Subcommand)]
enum CommandLine {
    /// Serve the HTTP API.
    Serve {
        #[command(flatten)]
        storage: StorageArgs,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", env = "RTPAY_LISTEN")]
        listen: SocketAddr,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        CommandLine::Serve { storage, listen } => {
            init_logging();
            let config = ServeConfig { data: storage.data, listen, postgres: storage.postgres };
            runtime().block_on(async {
                match run(config, shutdown_signal(), |r| println!("rtpay listening on http://{}", r.addr)).await {
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
                    println!(
                        "FAILED: {} violation(s) in {} accounts, {} transfer entries",
                        report.violations.len(),
                        report.accounts,
                        report.transfers
                    );
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("rtpay verify: {e}");
                    ExitCode::from(2)
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
