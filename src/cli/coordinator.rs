//! `sgl coordinator …`: run the coordinator.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use sgl::coordinator::{self, Config};

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Serve the client API (/v1/…) and the node API (/grid/…).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SGL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The base URL clients reach this coordinator at (used in evidence URLs).
    /// Defaults to http://<listen>.
    #[arg(long, env = "SGL_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Development mode: any node may register without a code, and requests
    /// are served without payment. Never use it on a public address.
    #[arg(long)]
    pub dev: bool,
    /// A single-use registration code a node may register with (repeatable).
    #[arg(long = "registration-code", value_name = "CODE")]
    pub registration_codes: Vec<String>,
    /// Seconds between node heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval: u64,
    /// Heartbeats a node may miss before it stops receiving work.
    #[arg(long, default_value_t = 3)]
    pub missed_heartbeats: u32,
}

pub fn run(cmd: CoordinatorCommand) -> anyhow::Result<()> {
    match cmd {
        CoordinatorCommand::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if !args.dev {
        anyhow::bail!(
            "this coordinator build has no billing yet and only runs in development mode: pass --dev (loopback use only)"
        );
    }
    let config = Config {
        dev: args.dev,
        public_url: args
            .public_url
            .unwrap_or_else(|| format!("http://{}", args.listen)),
        heartbeat_interval: Duration::from_secs(args.heartbeat_interval.max(1)),
        missed_heartbeats: args.missed_heartbeats.max(1),
        registration_codes: args.registration_codes,
        ..Config::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        eprintln!("sgl coordinator listening on http://{addr} (development mode)");
        coordinator::run(config, listener, super::shutdown_signal())
            .await
            .context("serving")
    })
}
