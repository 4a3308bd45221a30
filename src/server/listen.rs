//! Serving the router on a socket. (Skeleton: the operational helper fills in header timeouts and graceful shutdown.)

use std::process::ExitCode;

use crate::config::ServeArgs;

/// `helpline serve`: resolve the config, bind, load the model, serve until SIGTERM/SIGINT.
pub fn run_cli(_model: Option<String>, _threads: usize, _args: &ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}
