//! `rtpay bench`: reproduces the figures in docs/BENCHMARKS.md.

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("not yet".into())
}
