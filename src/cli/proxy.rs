//! `sgl proxy`: the end-to-end sealing proxy on loopback, for unmodified
//! OpenAI clients. The work is in `sgl::client::proxy`; this parses the
//! flags, binds the address and serves until SIGTERM or Ctrl-C.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;

use super::chat::{EvidenceArgs, GridArgs};

/// What `sgl proxy --help` says after the flags.
const PROXY_HELP: &str = "\
Point any OpenAI client (the OpenAI SDKs, litellm, curl) at
http://127.0.0.1:8484/v1 with any API key. For each chat request the proxy
reserves a node on the grid, fetches the node's attestation evidence and
verifies it with this machine's policy and pinned vendor roots (as
`sgl chat --verify-evidence` does), seals the request to the keys that
evidence binds, sends it through the coordinator, verifies every signature of
the reply and opens it here. The coordinator sees neither the prompt nor the
answer.

Streams (\"stream\": true) come back as OpenAI chat.completion.chunk events,
other requests as a chat.completion; GET /v1/models is the coordinator's list.
A node whose evidence fails the policy is refused with 502 evidence_rejected
before anything is sent; a reply that does not verify is 502
verification_failed (an SSE error event once a stream has begun). There is no
fallback to the coordinator's plain mode.

A request may name node, max_price and require_attestation in its body, as in
the coordinator's plain mode; --node, --max-price and --require-hardware are
the defaults. Responses carry x-sgl-node-id, x-sgl-job-id and x-sgl-evidence
(the evidence format verified).

The proxy spends this machine's credentials (--api-key or --wallet-key) for
whoever reaches it, so it listens on loopback only.

Example:
  sgl proxy --coordinator https://grid.example --api-key x402c_... &
  curl -s http://127.0.0.1:8484/v1/chat/completions \\
    -H 'content-type: application/json' \\
    -d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'";

#[derive(Debug, Args)]
#[command(after_help = PROXY_HELP)]
pub struct ProxyArgs {
    /// Loopback address to listen on (port 0 picks a free one; the address
    /// is printed).
    #[arg(long, env = "SGL_PROXY_LISTEN", default_value = "127.0.0.1:8484")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub grid: GridArgs,
    #[command(flatten)]
    pub evidence: EvidenceArgs,
    /// Pin every request to this node id, unless the request names one.
    #[arg(long, value_name = "NODE_ID")]
    pub node: Option<String>,
    /// Highest blended price accepted, USD per 1M tokens, unless the request
    /// names one.
    #[arg(long, value_name = "USD_PER_M")]
    pub max_price: Option<f64>,
    /// Reserve only nodes whose hardware evidence the coordinator verified
    /// (the proxy verifies the evidence itself either way).
    #[arg(long)]
    pub require_hardware: bool,
    /// Largest request body accepted.
    #[arg(long, default_value_t = sgl::client::proxy::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub limits: super::ServerLimitArgs,
}

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {}: sgl proxy listens on loopback only (127.0.0.1 or ::1), because it \
             spends this machine's grid credentials and opens replies for whoever connects",
            args.listen
        );
    }
    let client = args.grid.client()?;
    let evidence = args.evidence.policy()?;
    let defaults = sgl::client::proxy::RouteDefaults {
        node: args.node.clone(),
        max_price: args.max_price,
        require_attestation: args.require_hardware.then(|| "hardware".to_string()),
    };
    let proxy = sgl::client::proxy::Proxy::new(client, evidence, defaults);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("sgl proxy: http://{addr}/v1 -> {}", args.grid.coordinator);
        sgl::client::proxy::serve(
            listener,
            proxy,
            args.max_body_bytes,
            args.limits.limits(),
            super::shutdown_signal(),
        )
        .await
        .context("serving")
    })
}
