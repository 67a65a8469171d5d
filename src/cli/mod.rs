//! The command line: one file per command group. Each parses its flags into a
//! typed configuration and calls the library; nothing here does the work itself.

mod attest;
#[cfg(feature = "node")]
mod bench;
#[cfg(feature = "node")]
mod chat;
#[cfg(feature = "node")]
mod chat_output;
#[cfg(feature = "compute-plane")]
mod code_exec;
#[cfg(feature = "compute-plane")]
mod compute;
#[cfg(feature = "coordinator")]
mod coordinator;
#[cfg(feature = "node")]
mod model;
mod node;
mod price;
mod proto;
#[cfg(feature = "node")]
mod proxy;

use clap::{Parser, Subcommand};

/// sgl: an open confidential inference grid.
///
/// A node proves with hardware evidence that it runs inside an enclave, serves
/// chat completions from an in-process engine and seals every reply end to end.
#[derive(Debug, Parser)]
#[command(name = "sgl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run and manage a node: identity, keys, serving.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// This node's custom prices on its coordinator: show, set, reset.
    #[command(subcommand)]
    Price(price::PriceCommand),
    /// Ask the grid: a sealed chat request, every signature verified.
    #[cfg(feature = "node")]
    Chat(chat::ChatArgs),
    /// A local OpenAI-compatible server that seals every request end to end.
    #[cfg(feature = "node")]
    Proxy(proxy::ProxyArgs),
    /// Hardware attestation: produce evidence bound to this node's keys and a
    /// challenge, verify evidence against a policy, detect evidence sources.
    Attest(attest::AttestArgs),
    /// Models: the catalogue, fetching and the local cache.
    #[cfg(feature = "node")]
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Measure the engine: TTFT, decode and prompt throughput, and the ratio to
    /// the memory-bandwidth bound.
    #[cfg(feature = "node")]
    Bench(bench::BenchArgs),
    /// The SGL wire protocol: self-tests of the E2E crypto.
    #[command(subcommand)]
    Proto(proto::ProtoCommand),
    /// Run the coordinator that nodes register with and clients call.
    #[cfg(feature = "coordinator")]
    #[command(subcommand)]
    Coordinator(coordinator::CoordinatorCommand),
    /// Rent and manage machines (the Machines API): plans, provision, list,
    /// show, password, extend, resize, destroy, credits.
    #[cfg(feature = "compute-plane")]
    Compute(compute::ComputeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(cmd) => node::run(cmd),
        Command::Price(cmd) => price::run(cmd),
        Command::Attest(args) => attest::run(args),
        Command::Proto(cmd) => proto::run(cmd),
        #[cfg(feature = "node")]
        Command::Chat(args) => chat::run(args),
        #[cfg(feature = "node")]
        Command::Proxy(args) => proxy::run(args),
        #[cfg(feature = "node")]
        Command::Model(cmd) => model::run(cmd),
        #[cfg(feature = "node")]
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "coordinator")]
        Command::Coordinator(cmd) => coordinator::run(cmd),
        #[cfg(feature = "compute-plane")]
        Command::Compute(args) => compute::run(args),
    }
}

/// Logs go to stderr; stdout is for the command's output.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on SIGTERM or Ctrl-C.
#[cfg(any(feature = "node", feature = "coordinator"))]
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The limits of a server this binary runs (see `sgl::http`), shared by
/// `coordinator serve` and `node serve`.
#[cfg(any(feature = "node", feature = "coordinator"))]
#[derive(Debug, Clone, clap::Args)]
pub struct ServerLimitArgs {
    /// Seconds a connection may take to send a whole request head, counted
    /// from its opening or, kept alive, from its last response (the idle
    /// keep-alive timeout); then it is closed.
    #[arg(long, env = "SGL_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout: u64,
    /// Seconds a request body may take to arrive after its head; then the
    /// request fails and the connection is closed.
    #[arg(long, env = "SGL_BODY_READ_TIMEOUT", default_value_t = 30)]
    pub body_read_timeout: u64,
    /// Connections served at once. Default: the open-file limit less 256
    /// descriptors of headroom (65,280 under systemd's LimitNOFILE=65536),
    /// so accepting never fails for want of a descriptor. Past it, the oldest
    /// connection that has sent nothing yet is closed to make room.
    #[arg(long, env = "SGL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

#[cfg(any(feature = "node", feature = "coordinator"))]
impl ServerLimitArgs {
    pub fn limits(&self) -> sgl::http::ServerLimits {
        sgl::http::ServerLimits {
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout.max(1)),
            body_read_timeout: std::time::Duration::from_secs(self.body_read_timeout.max(1)),
            max_connections: self
                .max_connections
                .unwrap_or_else(sgl::http::default_max_connections)
                .max(1),
        }
    }
}
