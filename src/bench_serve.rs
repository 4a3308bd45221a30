//! `helpline bench serve`: a load generator for any OpenAI-compatible endpoint. (Skeleton.)

use std::process::ExitCode;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
}

pub fn run_cli(_args: &ServeBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}
