//! The Machines API from the command line: the coordinator's switch-on
//! flags (`sgl coordinator serve --compute-provider …`) and the client
//! (`sgl compute plans|regions|os|provision|list|show|password|extend|resize|destroy|balance|topup`;
//! `sgl compute run` is in [`super::code_exec`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use sgl::compute::provider::{ApiConfig, Provider};
use sgl::compute::seal::Sealer;
use sgl::compute::{digitalocean, vultr, Machines, MachinesConfig};
use sgl::payments::Payments;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ComputeProvider {
    /// Vultr API v2; token from VULTR_API_KEY.
    Vultr,
    /// DigitalOcean API v2; token from DIGITALOCEAN_API_TOKEN.
    Digitalocean,
}

/// `sgl coordinator serve` flags of the Machines API. It is served when at
/// least one provider is named.
#[derive(Debug, Args)]
pub struct ComputeServeArgs {
    /// Serve the Machines API (/compute/plans, /compute/provision,
    /// /compute/instances/…) on this provider (repeatable).
    #[arg(long = "compute-provider", value_enum, value_name = "PROVIDER")]
    pub providers: Vec<ComputeProvider>,
    /// Vultr API root (tests point it at a loopback stand-in).
    #[arg(long, env = "SGL_VULTR_API_URL", default_value = vultr::DEFAULT_BASE_URL)]
    pub vultr_api_url: String,
    /// DigitalOcean API root.
    #[arg(long, env = "SGL_DIGITALOCEAN_API_URL", default_value = digitalocean::DEFAULT_BASE_URL)]
    pub digitalocean_api_url: String,
    /// Platform markup on provider prices, in basis points (2000 = 20 %).
    #[arg(long, default_value_t = 2000)]
    pub compute_markup_bps: u64,
    /// Seconds a fetched provider catalogue is served before it is refetched.
    #[arg(long, default_value_t = 600)]
    pub compute_catalogue_refresh: u64,
    /// Seconds after its prepaid time before an instance is destroyed.
    #[arg(long, default_value_t = 3600)]
    pub compute_grace: u64,
    /// Seconds between two runs of the expiry reaper.
    #[arg(long, default_value_t = 60)]
    pub compute_reap_interval: u64,
    /// Milliseconds between two status polls of a machine being created.
    #[arg(long, default_value_t = 5000)]
    pub compute_poll_interval_ms: u64,
    /// Status polls before a machine that never became active is destroyed
    /// and its order refunded.
    #[arg(long, default_value_t = 120)]
    pub compute_poll_attempts: u32,
    /// Milliseconds of the first backoff after a provider's 429 without
    /// Retry-After (doubled each retry).
    #[arg(long, default_value_t = 500)]
    pub compute_retry_backoff_ms: u64,
    /// File holding the 64-hex-digit key that seals root passwords at rest
    /// (or SGL_COMPUTE_SECRET).
    #[arg(long, value_name = "FILE")]
    pub compute_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub exec: super::code_exec::CodeExecServeArgs,
}

fn sealer(args: &ComputeServeArgs) -> anyhow::Result<Sealer> {
    let hex = match (&args.compute_secret_file, std::env::var("SGL_COMPUTE_SECRET")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?,
        (None, Ok(v)) => v,
        (None, Err(_)) => bail!(
            "--compute-provider needs a sealing key: SGL_COMPUTE_SECRET or --compute-secret-file (64 hex digits, e.g. `openssl rand -hex 32`)"
        ),
    };
    Sealer::from_hex(&hex).context("the compute secret must be 64 hex digits")
}

fn token(var: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => bail!("{var} is not set"),
    }
}

#[cfg_attr(not(feature = "coordinator"), allow(dead_code))]
/// The Machines API over `payments` when providers are configured:
/// orders left in flight by a previous run are reconciled first, the
/// catalogue is fetched and the reaper started. Its routes, to serve.
pub async fn machines_router(
    args: &ComputeServeArgs,
    payments: Option<&Payments>,
) -> anyhow::Result<Option<axum::Router>> {
    if args.providers.is_empty() {
        return Ok(None);
    }
    let Some(payments) = payments else {
        bail!("--compute-provider needs a database (not --in-memory)");
    };
    let api = |url: &str, tok: String| {
        let mut c = ApiConfig::new(url, tok);
        c.backoff = Duration::from_millis(args.compute_retry_backoff_ms);
        // Provider actions (a DigitalOcean power-off or resize) are polled
        // like a machine being created.
        c.action_poll = Duration::from_millis(args.compute_poll_interval_ms);
        c.action_attempts = args.compute_poll_attempts.max(1);
        c
    };
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    let mut seen = Vec::new();
    for p in &args.providers {
        if seen.contains(p) {
            continue;
        }
        seen.push(*p);
        match p {
            ComputeProvider::Vultr => providers.push(Arc::new(vultr::Vultr::new(api(
                &args.vultr_api_url,
                token("VULTR_API_KEY")?,
            ))?)),
            ComputeProvider::Digitalocean => {
                providers.push(Arc::new(digitalocean::DigitalOcean::new(api(
                    &args.digitalocean_api_url,
                    token("DIGITALOCEAN_API_TOKEN")?,
                ))?))
            }
        }
    }
    let mut cfg = MachinesConfig::new(sealer(args)?);
    cfg.markup_bps = args.compute_markup_bps;
    cfg.catalogue_refresh = Duration::from_secs(args.compute_catalogue_refresh);
    cfg.grace = Duration::from_secs(args.compute_grace);
    cfg.reap_interval = Duration::from_secs(args.compute_reap_interval.max(1));
    cfg.poll_interval = Duration::from_millis(args.compute_poll_interval_ms);
    cfg.poll_attempts = args.compute_poll_attempts.max(1);
    let m = Machines::new(cfg, payments.clone(), providers);
    let settled = m.reconcile().await;
    if settled > 0 {
        eprintln!("machines: reconciled {settled} order(s) left in flight");
    }
    m.catalogue().refresh_stale().await;
    tokio::spawn(m.clone().run_reaper());
    Ok(Some(sgl::compute::http::router(m)))
}

/// `sgl compute …`: the Machines API client.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// The coordinator serving the Machines API.
    #[arg(
        long,
        env = "SGL_COMPUTE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// An API key (`x402c_…`) for management calls and credits.
    #[arg(long, env = "COMPUTE_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// A file holding an EVM private key (hex): signs X-Auth headers when no
    /// API key is given, and pays 402 answers with x402.
    #[arg(long, env = "SGL_WALLET_KEY_FILE", global = true)]
    pub wallet_key_file: Option<PathBuf>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: ComputeCommand,
}

#[derive(Debug, Subcommand)]
pub enum ComputeCommand {
    /// Plans and prices (USD, markup included).
    Plans {
        /// vps, vhp, vdc or vcg (GPU).
        #[arg(long = "type")]
        kind: Option<String>,
    },
    /// Regions.
    Regions,
    /// OS images.
    Os,
    /// Rent a machine: pays with credits (--credits) or x402 from the wallet key.
    Provision {
        plan: String,
        region: String,
        #[arg(long)]
        os_id: u64,
        /// Prepaid hours (at least 24).
        #[arg(long, default_value_t = 24)]
        hours: u64,
        #[arg(long, default_value = "")]
        label: String,
        /// An OpenSSH public key file (required on DigitalOcean).
        #[arg(long)]
        ssh_key_file: Option<PathBuf>,
        /// vultr or digitalocean (implied by the plan).
        #[arg(long)]
        provider: Option<String>,
        /// Pay from prepaid credits.
        #[arg(long)]
        credits: bool,
    },
    /// Your instances.
    List,
    /// One instance.
    Show { id: String },
    /// The one-time root password (Vultr, no SSH key).
    Password { id: String },
    /// More prepaid hours.
    Extend {
        id: String,
        #[arg(long)]
        hours: u64,
        #[arg(long)]
        credits: bool,
    },
    /// Another plan on the same provider and region; the prepaid value is kept.
    Resize {
        id: String,
        plan: String,
        /// Confirm an irreversible disk growth (DigitalOcean).
        #[arg(long)]
        confirm_disk_resize: bool,
    },
    /// Destroy an instance now.
    Destroy { id: String },
    /// Your credits.
    Balance,
    /// Add credits, paid with x402 from the wallet key.
    Topup {
        /// USD, e.g. 50 or 2.5.
        amount: String,
    },
    /// Run a Python or Node.js program in a sandbox (POST /api/x402/compute),
    /// paid with x402 from the wallet key or with credits (--pay credits);
    /// prints its stdout and stderr and exits with its exit status.
    Run(Box<super::code_exec::RunArgs>),
}

/// A wallet key for signing.
struct Wallet {
    key: k256::ecdsa::SigningKey,
    address: alloy_primitives::Address,
}

impl Wallet {
    fn load(path: &std::path::Path) -> anyhow::Result<Wallet> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let hex_key = text.trim().trim_start_matches("0x");
        let bytes =
            zeroize::Zeroizing::new(hex::decode(hex_key).context("the wallet key must be hex")?);
        let key = k256::ecdsa::SigningKey::from_slice(&bytes).context("not a secp256k1 key")?;
        let address = alloy_primitives::Address::from_public_key(key.verifying_key());
        Ok(Wallet { key, address })
    }

    fn addr(&self) -> String {
        format!("{:#x}", self.address)
    }

    /// 65-byte r‖s‖v hex signature of a digest.
    fn sign(&self, digest: &alloy_primitives::B256) -> anyhow::Result<String> {
        let (sig, recid) = self
            .key
            .sign_prehash_recoverable(digest.as_slice())
            .context("signing")?;
        let mut out = sig.to_bytes().to_vec();
        out.push(27 + recid.to_byte());
        Ok(format!("0x{}", hex::encode(out)))
    }

    fn xauth(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<Vec<(String, String)>> {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            .to_string();
        let nonce = uuid::Uuid::new_v4().to_string();
        let msg =
            sgl::payments::xauth::message("base", &self.addr(), method, path, body, &ts, &nonce);
        let sig = self.sign(&alloy_primitives::eip191_hash_message(msg.as_bytes()))?;
        Ok(vec![
            ("X-Auth-Address".into(), self.addr()),
            ("X-Auth-Chain".into(), "base".into()),
            ("X-Auth-Signature".into(), sig),
            ("X-Auth-Timestamp".into(), ts),
            ("X-Auth-Nonce".into(), nonce),
            ("X-Auth-Sig-Encoding".into(), "hex".into()),
        ])
    }

    /// An x402 v1 `X-PAYMENT` answering the first EVM offer of a 402 body.
    fn pay(&self, challenge: &serde_json::Value) -> anyhow::Result<String> {
        use alloy_primitives::{B256, U256};
        use base64::Engine as _;
        use sgl::payments::config::EvmNetwork;
        let a = challenge["accepts"]
            .as_array()
            .and_then(|a| a.first())
            .context("the 402 offers no payment")?;
        let network = a["network"].as_str().unwrap_or_default();
        let net = [EvmNetwork::base_usdc(), EvmNetwork::base_sepolia_usdc()]
            .into_iter()
            .find(|n| n.v1_name == network)
            .with_context(|| format!("cannot pay on network {network:?}"))?;
        let asset = sgl::payments::evm::parse_address(a["asset"].as_str().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("asset: {e}"))?;
        if asset != net.asset {
            bail!("the 402 asks for an unknown asset on {network}");
        }
        let to = sgl::payments::evm::parse_address(a["payTo"].as_str().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("payTo: {e}"))?;
        let value: u64 = a["maxAmountRequired"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .context("maxAmountRequired")?;
        let timeout = a["maxTimeoutSeconds"].as_u64().unwrap_or(300);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let mut nonce = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let auth = sgl::payments::evm::Authorization {
            from: self.address,
            to,
            value: U256::from(value),
            valid_after: U256::ZERO,
            valid_before: U256::from(now + timeout),
            nonce: B256::from(nonce),
        };
        let sig = self.sign(&auth.signing_hash(&net.domain()))?;
        let payload = serde_json::json!({"x402Version": 1, "scheme": "exact", "network": network,
            "payload": {"signature": sig, "authorization": {
                "from": self.address.to_checksum(None), "to": to.to_checksum(None),
                "value": value.to_string(), "validAfter": "0",
                "validBefore": (now + timeout).to_string(), "nonce": format!("{:#x}", auth.nonce)}}});
        Ok(base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&payload)?))
    }
}

struct Client {
    base: String,
    http: reqwest::Client,
    api_key: Option<String>,
    wallet: Option<Wallet>,
}

impl Client {
    /// One call; with `pay`, a 402 is answered once with an x402 payment
    /// from the wallet key.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        pay: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let bytes = match &body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let mut payment: Option<String> = None;
        loop {
            let mut req = self.http.request(
                method.clone(),
                format!("{}{path}", self.base.trim_end_matches('/')),
            );
            if let Some(k) = &self.api_key {
                req = req.header("x-api-key", k);
            } else if let Some(w) = &self.wallet {
                let p = path.split('?').next().unwrap_or(path);
                for (n, v) in w.xauth(method.as_str(), p, &bytes)? {
                    req = req.header(n, v);
                }
            }
            if let Some(p) = &payment {
                req = req.header("x-payment", p);
            }
            if body.is_some() {
                req = req
                    .header("content-type", "application/json")
                    .body(bytes.clone());
            }
            let resp = req.send().await.context("calling the coordinator")?;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
            if status == reqwest::StatusCode::PAYMENT_REQUIRED && pay && payment.is_none() {
                if v["error"]["code"] == "insufficient_credits" {
                    bail!(
                        "insufficient credits: {} USD short",
                        v["shortfall"].as_str().unwrap_or("?")
                    );
                }
                let w = self.wallet.as_ref().context(
                    "payment required: pass --wallet-key-file to pay with x402, or --credits",
                )?;
                payment = Some(w.pay(&v)?);
                continue;
            }
            if !status.is_success() {
                let msg = v["error"]["message"].as_str().unwrap_or("request failed");
                let code = v["error"]["code"].as_str().unwrap_or("");
                bail!("{status}: {msg} ({code})");
            }
            return Ok(v);
        }
    }
}

fn print_instances(list: &[serde_json::Value]) {
    println!(
        "{:<36}  {:<12}  {:<22}  {:<6}  {:<15}  EXPIRES",
        "ID", "STATUS", "PLAN", "REGION", "IP"
    );
    for i in list {
        println!(
            "{:<36}  {:<12}  {:<22}  {:<6}  {:<15}  {}",
            i["id"].as_str().unwrap_or(""),
            i["status"].as_str().unwrap_or(""),
            i["plan"].as_str().unwrap_or(""),
            i["region"].as_str().unwrap_or(""),
            i["ip_address"].as_str().unwrap_or("-"),
            i["expires_at"].as_str().unwrap_or("")
        );
    }
}

pub fn run(args: ComputeArgs) -> anyhow::Result<()> {
    if let ComputeCommand::Run(r) = &args.cmd {
        return super::code_exec::run(
            &args.url,
            args.api_key.as_deref().filter(|k| !k.trim().is_empty()),
            args.wallet_key_file.as_deref(),
            args.json,
            r,
        );
    }
    let wallet = args
        .wallet_key_file
        .as_deref()
        .map(Wallet::load)
        .transpose()?;
    let client = Client {
        base: args.url.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?,
        api_key: args.api_key.clone().filter(|k| !k.trim().is_empty()),
        wallet,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        use reqwest::Method as M;
        use serde_json::json;
        let out = match &args.cmd {
            ComputeCommand::Plans { kind } => {
                let path = match kind {
                    Some(k) => format!("/compute/plans?type={k}"),
                    None => "/compute/plans".into(),
                };
                let v = client.call(M::GET, &path, None, false).await?;
                if !args.json {
                    println!(
                        "{:<26}  {:<12}  {:>4}  {:>7}  {:>6}  {:>10}  {:>9}  LOCATIONS",
                        "ID", "PROVIDER", "CPU", "RAM MB", "DISK", "USD/HOUR", "USD/DAY"
                    );
                    for p in v["plans"].as_array().into_iter().flatten() {
                        println!(
                            "{:<26}  {:<12}  {:>4}  {:>7}  {:>6}  {:>10}  {:>9}  {}",
                            p["id"].as_str().unwrap_or(""),
                            p["provider"].as_str().unwrap_or(""),
                            p["vcpu_count"],
                            p["ram"],
                            p["disk"],
                            p["hourly_cost"],
                            p["our_daily"],
                            p["locations"]
                                .as_array()
                                .map(|l| l
                                    .iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(","))
                                .unwrap_or_default()
                        );
                    }
                    return Ok(());
                }
                v
            }
            ComputeCommand::Regions => {
                let v = client.call(M::GET, "/compute/regions", None, false).await?;
                if !args.json {
                    for r in v["regions"].as_array().into_iter().flatten() {
                        println!(
                            "{:<8}  {:<12}  {}",
                            r["id"].as_str().unwrap_or(""),
                            r["provider"].as_str().unwrap_or(""),
                            r["city"].as_str().unwrap_or("")
                        );
                    }
                    return Ok(());
                }
                v
            }
            ComputeCommand::Os => {
                let v = client.call(M::GET, "/compute/os", None, false).await?;
                if !args.json {
                    for o in v["os_options"].as_array().into_iter().flatten() {
                        println!(
                            "{:<10}  {:<12}  {}",
                            o["id"],
                            o["provider"].as_str().unwrap_or(""),
                            o["name"].as_str().unwrap_or("")
                        );
                    }
                    return Ok(());
                }
                v
            }
            ComputeCommand::Provision {
                plan,
                region,
                os_id,
                hours,
                label,
                ssh_key_file,
                provider,
                credits,
            } => {
                let ssh = match ssh_key_file {
                    Some(f) => Some(
                        std::fs::read_to_string(f)
                            .with_context(|| format!("reading {}", f.display()))?
                            .trim()
                            .to_owned(),
                    ),
                    None => None,
                };
                let body = json!({"plan": plan, "region": region, "os_id": os_id, "label": label,
                    "prepaid_hours": hours, "ssh_public_key": ssh, "provider": provider,
                    "use_credits": credits});
                let v = client
                    .call(M::POST, "/compute/provision", Some(body), !credits)
                    .await?;
                if !args.json {
                    print_instances(std::slice::from_ref(&v["order"]));
                    if let Some(k) = v["management_api_key"].as_str() {
                        println!("management API key (shown once): {k}");
                    }
                    return Ok(());
                }
                v
            }
            ComputeCommand::List => {
                let v = client
                    .call(M::GET, "/compute/instances", None, false)
                    .await?;
                if !args.json {
                    print_instances(v["instances"].as_array().map(Vec::as_slice).unwrap_or(&[]));
                    return Ok(());
                }
                v
            }
            ComputeCommand::Show { id } => {
                let v = client
                    .call(M::GET, &format!("/compute/instances/{id}"), None, false)
                    .await?;
                if !args.json {
                    print_instances(std::slice::from_ref(&v["instance"]));
                    return Ok(());
                }
                v
            }
            ComputeCommand::Password { id } => {
                let v = client
                    .call(
                        M::POST,
                        &format!("/compute/instances/{id}/password"),
                        None,
                        false,
                    )
                    .await?;
                if !args.json {
                    println!(
                        "root@{}  {}",
                        v["access"]["ip_address"].as_str().unwrap_or("?"),
                        v["access"]["password"].as_str().unwrap_or("")
                    );
                    return Ok(());
                }
                v
            }
            ComputeCommand::Extend { id, hours, credits } => {
                client
                    .call(
                        M::POST,
                        &format!("/compute/instances/{id}/extend"),
                        Some(json!({"extend_hours": hours, "use_credits": credits})),
                        !credits,
                    )
                    .await?
            }
            ComputeCommand::Resize {
                id,
                plan,
                confirm_disk_resize,
            } => {
                client
                    .call(
                        M::POST,
                        &format!("/compute/instances/{id}/resize"),
                        Some(json!({"plan": plan, "confirm_disk_resize": confirm_disk_resize})),
                        false,
                    )
                    .await?
            }
            ComputeCommand::Destroy { id } => {
                client
                    .call(M::DELETE, &format!("/compute/instances/{id}"), None, false)
                    .await?
            }
            ComputeCommand::Balance => {
                let v = client
                    .call(M::GET, "/compute/credits/balance", None, false)
                    .await?;
                if !args.json {
                    println!(
                        "{}: balance {} USD",
                        v["wallet"].as_str().unwrap_or(""),
                        v["balance"].as_str().unwrap_or("0")
                    );
                    return Ok(());
                }
                v
            }
            ComputeCommand::Topup { amount } => {
                client
                    .call(
                        M::POST,
                        "/compute/credits/topup",
                        Some(json!({"amount": amount})),
                        true,
                    )
                    .await?
            }
            // Served before the client is built.
            ComputeCommand::Run(_) => return Ok(()),
        };
        if args.json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            match &args.cmd {
                ComputeCommand::Extend { .. } | ComputeCommand::Resize { .. } => {
                    print_instances(std::slice::from_ref(&out["instance"]))
                }
                ComputeCommand::Topup { .. } => println!(
                    "new balance {} USD",
                    out["new_balance"].as_str().unwrap_or("?")
                ),
                _ => println!("{}", out["status"].as_str().unwrap_or("done")),
            }
        }
        Ok(())
    })
}
