//! `sgl chat`: one sealed chat request through a coordinator, every signature
//! verified, the reply opened on this machine.

use std::io::{Read, Write};

use anyhow::Context;
use clap::Args;
use sgl::client::{ChatRequest, GridClient};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Coordinator base URL.
    #[arg(
        long,
        env = "SGL_COORDINATOR_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub coordinator: String,
    /// API key (`x402c_…`); not needed by a coordinator in development mode.
    #[arg(long, env = "SGL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model to ask.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Print the answer as it is generated (sealed SSE).
    #[arg(long)]
    pub stream: bool,
    /// Pin the request to this node id.
    #[arg(long, value_name = "NODE_ID")]
    pub node: Option<String>,
    /// Highest blended price accepted, USD per 1M tokens.
    #[arg(long, value_name = "USD_PER_M")]
    pub max_price: Option<f64>,
    /// Only nodes with verified hardware evidence.
    #[arg(long)]
    pub require_hardware: bool,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u64,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// A system message put before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Print a JSON summary (content, job id, node, usage, checks) instead of text.
    #[arg(long)]
    pub json: bool,
    /// The prompt; read from standard input when absent.
    pub prompt: Vec<String>,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let prompt = if args.prompt.is_empty() {
        let mut s = String::new();
        std::io::stdin()
            .take(4 * 1024 * 1024)
            .read_to_string(&mut s)
            .context("reading the prompt from standard input")?;
        s
    } else {
        args.prompt.join(" ")
    };
    if prompt.trim().is_empty() {
        anyhow::bail!("empty prompt: give it as arguments or on standard input");
    }
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(("system".to_string(), s.clone()));
    }
    messages.push(("user".to_string(), prompt));
    let req = ChatRequest {
        model: args.model.clone(),
        messages,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        stream: args.stream,
        node: args.node.clone(),
        max_price: args.max_price,
        require_attestation: args.require_hardware.then(|| "hardware".to_string()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = GridClient::new(&args.coordinator, args.api_key.clone())?;
        let res = client.reserve(&req).await.context("reserving a node")?;
        tracing::info!(node_id = %res.node_id, level = ?res.attestation_level, "reserved");
        let print_live = args.stream && !args.json;
        let out = client
            .chat(&res, &req, |delta| {
                if print_live {
                    print!("{delta}");
                    let _ = std::io::stdout().flush();
                }
            })
            .await
            .context("sealed chat")?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "content": out.content,
                    "job_id": out.job_id,
                    "node_id": out.node_id,
                    "usage": out.usage,
                    "usage_signed": out.usage_signed,
                    "attestation_level": res.attestation_level,
                    "signatures_verified": true,
                }))?
            );
        } else if print_live {
            println!();
        } else {
            println!("{}", out.content);
        }
        Ok(())
    })
}
