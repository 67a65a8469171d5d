//! `sgl chat`: one sealed chat request through a coordinator, every signature
//! verified, the reply opened on this machine.

use std::io::{Read, Write};

use anyhow::Context;
use clap::Args;
use sgl::client::{ChatRequest, GridClient};
use sgl::proto::openai::ChoiceParams;

use super::chat_output;

/// Where the grid is and how this machine pays it; shared by `sgl chat` and
/// `sgl proxy`.
#[derive(Debug, Args)]
pub struct GridArgs {
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
    /// Pay from a wallet instead of an API key: a file holding an EVM
    /// private key (64 hex digits), read owner-only (it is tightened to
    /// 0600). With --pay x402 each request's 402 is paid with an x402
    /// payment (an EIP-3009 authorization of USDC on Base or Base Sepolia);
    /// with --pay credits each request is signed by the wallet (X-Auth) and
    /// its prepaid credits pay.
    #[cfg(feature = "payments")]
    #[arg(
        long,
        env = "SGL_WALLET_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "api_key"
    )]
    pub wallet_key: Option<std::path::PathBuf>,
    /// How --wallet-key pays.
    #[cfg(feature = "payments")]
    #[arg(long, value_enum, default_value = "x402")]
    pub pay: PayWith,
    /// The most one request paid by x402 may cost, in USD; a 402 asking
    /// more is refused unsigned.
    #[cfg(feature = "payments")]
    #[arg(long, default_value = "1", value_name = "USD")]
    pub max_payment: String,
}

impl GridArgs {
    /// The grid client these flags describe.
    pub fn client(&self) -> anyhow::Result<GridClient> {
        #[allow(unused_mut)]
        let mut client = GridClient::new(&self.coordinator, self.api_key.clone())?;
        #[cfg(feature = "payments")]
        if let Some(w) = wallet_payment(self)? {
            client = client.with_wallet(w);
        }
        Ok(client)
    }
}

/// How this machine judges a node's evidence; shared by `sgl chat
/// --verify-evidence` and `sgl proxy`.
#[derive(Debug, Args)]
pub struct EvidenceArgs {
    /// Attestation policy the node's evidence must pass (default: the
    /// shipped one).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,
    /// Accept simulated evidence signed by this key (a development grid only).
    #[arg(long = "simulated-tee-key", value_name = "B58")]
    pub simulated_tee_keys: Vec<String>,
    /// Skip only the measurement allow-list of the evidence check.
    #[arg(long)]
    pub allow_any_measurement: bool,
}

impl EvidenceArgs {
    /// The policy, roots and allowances these flags describe.
    pub fn policy(&self) -> anyhow::Result<sgl::client::EvidencePolicy> {
        let policy = match &self.policy {
            Some(p) => {
                sgl::attest::Policy::load(p).with_context(|| format!("loading {}", p.display()))?
            }
            None => sgl::attest::Policy::default_policy(),
        };
        let simulated_keys = self
            .simulated_tee_keys
            .iter()
            .map(|k| sgl::proto::identity::Ed25519Public::from_b58(k))
            .collect::<Result<Vec<_>, _>>()
            .context("--simulated-tee-key")?;
        Ok(sgl::client::EvidencePolicy {
            policy,
            simulated_keys,
            allow_any_measurement: self.allow_any_measurement,
        })
    }
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub grid: GridArgs,
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
    /// Completions of the prompt, each printed (labelled); each may use
    /// --max-tokens. Only a node that implements `n` is reserved.
    #[arg(short = 'n', long = "n", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(sgl::proto::limits::MAX_N)))]
    pub choices: u32,
    /// Print each generated token with its log probability. Only a node
    /// that implements `logprobs` is reserved.
    #[arg(long)]
    pub logprobs: bool,
    /// With each token, the K most likely tokens at that step (implies
    /// --logprobs).
    #[arg(long, value_name = "K",
          value_parser = clap::value_parser!(u8).range(0..=i64::from(sgl::proto::limits::MAX_TOP_LOGPROBS)))]
    pub top_logprobs: Option<u8>,
    /// Before sending, fetch the node's evidence and verify it with this
    /// machine's policy and pinned vendor roots: the chain, the policy, and
    /// that the keys the prompt is sealed to are the ones the evidence binds.
    #[arg(long)]
    pub verify_evidence: bool,
    #[command(flatten)]
    pub evidence: EvidenceArgs,
    /// Print a JSON summary (content, job id, node, usage, checks) instead of text.
    #[arg(long)]
    pub json: bool,
    /// The prompt; read from standard input when absent.
    pub prompt: Vec<String>,
}

/// How a wallet pays for a chat request.
#[cfg(feature = "payments")]
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PayWith {
    /// A per-request x402 payment.
    X402,
    /// The wallet's prepaid credits, by a signed request.
    Credits,
}

/// The wallet payment the flags ask for, if any.
#[cfg(feature = "payments")]
fn wallet_payment(args: &GridArgs) -> anyhow::Result<Option<sgl::client::WalletPayment>> {
    use sgl::client::WalletPayment;
    let Some(path) = &args.wallet_key else {
        return Ok(None);
    };
    let key = sgl::payments::wallet::WalletKey::load(path)
        .with_context(|| format!("loading the wallet key {}", path.display()))?;
    Ok(Some(match args.pay {
        PayWith::X402 => {
            let cap = sgl::money::Micros::parse_usd(&args.max_payment).with_context(|| {
                format!("--max-payment {:?} is not a USD amount", args.max_payment)
            })?;
            WalletPayment::X402 { key, cap }
        }
        PayWith::Credits => WalletPayment::Credits { key },
    }))
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
        choices: ChoiceParams {
            n: args.choices,
            logprobs: match (args.logprobs, args.top_logprobs) {
                (_, Some(k)) => Some(k),
                (true, None) => Some(0),
                (false, None) => None,
            },
        },
    };
    let extended = req.choices.is_extended();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = args.grid.client()?;
        let res = client.reserve(&req).await.context("reserving a node")?;
        tracing::info!(node_id = %res.node_id, level = ?res.attestation_level, "reserved");
        let verdict = if args.verify_evidence {
            let how = args.evidence.policy()?;
            let v = client
                .verify_node_evidence(&res, &how)
                .await
                .context("verifying the node's evidence")?;
            if !args.json {
                eprintln!(
                    "evidence verified: {} ({:?}), policy {}",
                    v.format.as_str(),
                    v.attestation_level,
                    v.policy_digest
                );
            }
            Some(v)
        } else {
            None
        };
        // Several choices or logprobs are printed whole once all have come.
        let print_live = args.stream && !args.json && !extended;
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
                    "choices": (!out.choices.is_empty()).then_some(&out.choices),
                    "attestation_level": res.attestation_level,
                    "signatures_verified": true,
                    "payment": out.payment,
                    "evidence": verdict.as_ref().map(|v| serde_json::json!({
                        "verified": v.verified,
                        "format": v.format.as_str(),
                        "attestation_level": v.attestation_level,
                        "policy_digest": v.policy_digest,
                    })),
                }))?
            );
        } else if print_live {
            println!();
        } else if extended {
            print!("{}", chat_output::choices_text(&out.choices));
        } else {
            println!("{}", out.content);
        }
        if let (false, Some(p)) = (args.json, &out.payment) {
            let amount = p["amount_micro_usd"].as_u64().unwrap_or(0);
            eprintln!(
                "paid {} USD by {} (transaction {})",
                sgl::money::Micros(amount).to_usd_string(),
                p["scheme"].as_str().unwrap_or("x402"),
                p["settlement"]["transaction"]
                    .as_str()
                    .unwrap_or("not reported"),
            );
        }
        Ok(())
    })
}
