//! `sgl coordinator …`: run the coordinator and manage its store (nodes'
//! registration codes, API keys, credits).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use sgl::coordinator::{self, Config, Grid};
use sgl::money::Micros;
use sgl::payments::config::{EvmNetwork, PaymentsConfig};
use sgl::payments::Payments;
use sgl::store::{Store, WalletId};

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Serve the client API (/v1/…), the node API (/grid/…), the API key
    /// and credits routes (/compute/…) and, with --compute-provider, the
    /// Machines API (/compute/plans, /compute/provision, /compute/instances/…).
    Serve(ServeArgs),
    /// Node registration codes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// API keys (`x402c_…`), stored hashed.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Prepaid credits.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// The usage ledger: one row per job, with the revenue split.
    Usage(UsageArgs),
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// Database: a SQLite file path (created, WAL) or postgres://…
    /// Default: coordinator.db in $SGL_COORDINATOR_DIR or ~/.local/share/sgl-coordinator.
    #[arg(long, env = "SGL_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl DbArgs {
    fn url(&self) -> anyhow::Result<String> {
        if let Some(u) = &self.database_url {
            return Ok(u.clone());
        }
        let dir = match std::env::var_os("SGL_COORDINATOR_DIR") {
            Some(d) => PathBuf::from(d),
            None => dirs::data_dir()
                .context("no data directory; pass --database-url")?
                .join("sgl-coordinator"),
        };
        sgl::private_file::create_dir(&dir)?;
        Ok(dir.join("coordinator.db").display().to_string())
    }

    async fn open(&self) -> anyhow::Result<Store> {
        let url = self.url()?;
        Store::open(&url)
            .await
            .with_context(|| format!("opening the database {}", redact(&url)))
    }
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Network {
    /// Base mainnet USDC (eip155:8453).
    Base,
    /// Base Sepolia test USDC (eip155:84532).
    BaseSepolia,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SGL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The base URL clients reach this coordinator at (used in evidence URLs
    /// and payment challenges). Defaults to http://<listen>.
    #[arg(long, env = "SGL_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Development mode: any node may register without a code, and requests
    /// without credentials are served free. Never use it on a public address.
    #[arg(long)]
    pub dev: bool,
    #[command(flatten)]
    pub db: DbArgs,
    /// Keep everything in memory (development mode only): no store, no billing.
    #[arg(long, conflicts_with = "database_url")]
    pub in_memory: bool,
    /// A single-use registration code a node may register with (repeatable);
    /// `sgl coordinator nodes invite` makes stored ones.
    #[arg(long = "registration-code", value_name = "CODE")]
    pub registration_codes: Vec<String>,
    /// Wallet that receives x402 and MPP payments (0x…). Needed outside --dev.
    #[arg(long, env = "SGL_PAY_TO")]
    pub pay_to: Option<String>,
    /// x402 facilitator base URL (POST /verify, POST /settle).
    #[arg(long, env = "SGL_FACILITATOR_URL")]
    pub facilitator_url: Option<String>,
    /// Network and asset payments are taken in.
    #[arg(long, value_enum, default_value = "base")]
    pub network: Network,
    /// Seconds between node heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval: u64,
    /// Heartbeats a node may miss before it stops receiving work.
    #[arg(long, default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// Seconds between two price changes of the same node and model.
    #[arg(long, default_value_t = 60)]
    pub price_cooldown: u64,
    /// Attestation policy (TOML); default: the one shipped in attestation/policy.toml.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// A simulated-TEE public key (b58) whose evidence is accepted at the
    /// `simulated` level; development mode only (repeatable). A node's key
    /// lives in its config directory (simulated-tee-key.json).
    #[arg(long = "simulated-tee-key", value_name = "B58")]
    pub simulated_tee_keys: Vec<String>,
    /// AMD KDS base URL to fetch a VCEK that evidence lacks (e.g. https://kdsintf.amd.com).
    #[arg(long)]
    pub kds_url: Option<String>,
    /// Intel PCS/PCCS base URL for TDX collateral (e.g. https://api.trustedservices.intel.com).
    #[arg(long)]
    pub pcs_url: Option<String>,
    #[cfg(feature = "compute-plane")]
    #[command(flatten)]
    pub compute: super::compute::ComputeServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Make a single-use registration code for an operator wallet. The code
    /// is shown once; only its hash is stored.
    Invite {
        #[arg(long)]
        wallet: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make an API key for a wallet; shown once, stored hashed.
    Create {
        #[arg(long)]
        wallet: String,
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List a wallet's keys (id, label, last four characters, revoked).
    List {
        #[arg(long)]
        wallet: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke one of a wallet's keys by id.
    Revoke {
        #[arg(long)]
        wallet: String,
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add credits to a wallet (an operator grant, e.g. for a paid invoice).
    Grant {
        #[arg(long)]
        wallet: String,
        /// Amount in USD, e.g. 5 or 0.25 (micro-USD precision).
        #[arg(long)]
        amount: String,
        /// A unique reference for this grant (default: a random one).
        #[arg(long)]
        reference: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show a wallet's balance.
    Balance {
        #[arg(long)]
        wallet: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// How many of the newest rows.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[command(flatten)]
    pub db: DbArgs,
}

/// A wallet as the payments code keys it: EVM lowercase, Solana as given.
fn wallet(s: &str) -> anyhow::Result<WalletId> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x") {
        if hex.len() != 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("{s:?} is not an EVM address (0x and 40 hex digits)");
        }
        return Ok(WalletId::new_unchecked(s.to_ascii_lowercase()));
    }
    match sgl::proto::b58::decode_array::<32>(s, "Solana public key") {
        Ok(_) => Ok(WalletId::new_unchecked(s)),
        Err(_) => bail!("{s:?} is neither an EVM address nor a Solana public key"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

pub fn run(cmd: CoordinatorCommand) -> anyhow::Result<()> {
    match cmd {
        CoordinatorCommand::Serve(args) => serve(args),
        CoordinatorCommand::Nodes(NodesCommand::Invite { wallet: w, db }) => {
            let w = wallet(&w)?;
            runtime()?.block_on(async {
                let store = db.open().await?;
                let code = format!("sglreg_{}", coordinator::state::random_token());
                let hash = hex::encode(coordinator::state::secret_hash(&code));
                store.create_registration_code(&hash, w.as_str()).await?;
                println!("{code}");
                eprintln!("single-use registration code for {w}; pass it to `sgl node start --registration-code`");
                Ok(())
            })
        }
        CoordinatorCommand::Keys(cmd) => keys(cmd),
        CoordinatorCommand::Credits(cmd) => credits(cmd),
        CoordinatorCommand::Usage(args) => runtime()?.block_on(async {
            let store = args.db.open().await?;
            for r in store.usage_rows(args.limit).await? {
                println!("{}", serde_json::to_string(&usage_json(&r))?);
            }
            Ok(())
        }),
    }
}

fn usage_json(r: &sgl::store::UsageRow) -> serde_json::Value {
    serde_json::json!({
        "job_id": r.job_id, "node_id": r.node_id, "status": r.status, "method": r.method,
        "model": r.model, "payer_wallet": r.payer_wallet, "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens, "cost_micro_usd": r.cost,
        "quoted_micro_usd": r.quoted, "operator": r.operator_share, "platform": r.platform_share,
        "stakers": r.stakers_share, "burn": r.burn_share,
        "usage_signature": r.usage_signature,
    })
}

fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match cmd {
            KeysCommand::Create {
                wallet: w,
                label,
                db,
            } => {
                let w = wallet(&w)?;
                let store = db.open().await?;
                let p = offline_payments(store)?;
                let (key, rec) = p.create_api_key(&w, &label).await?;
                println!("{}", key.secret.as_str());
                eprintln!("API key {} for {w}: shown once, stored hashed", rec.id);
            }
            KeysCommand::List { wallet: w, db } => {
                let w = wallet(&w)?;
                let store = db.open().await?;
                for k in store.list_api_keys(&w).await? {
                    println!(
                        "{}  …{}  {:<20}  {}",
                        k.id,
                        k.key_last4,
                        k.label,
                        if k.revoked_at_ms.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
            KeysCommand::Revoke { wallet: w, id, db } => {
                let w = wallet(&w)?;
                let store = db.open().await?;
                if !store.revoke_api_key(&w, &id).await? {
                    bail!("{w} has no active key {id}");
                }
                println!("revoked {id}");
            }
        }
        Ok(())
    })
}

fn credits(cmd: CreditsCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match cmd {
            CreditsCommand::Grant {
                wallet: w,
                amount,
                reference,
                db,
            } => {
                let w = wallet(&w)?;
                let amount = Micros::parse_usd(&amount)
                    .filter(|m| m.0 > 0)
                    .with_context(|| format!("{amount:?} is not a positive USD amount"))?;
                let reference =
                    reference.unwrap_or_else(|| format!("grant-{}", uuid::Uuid::new_v4()));
                let store = db.open().await?;
                let b = store.top_up(&w, amount, &reference).await?;
                println!("{w}: balance {} USD", b.balance.to_usd_string());
            }
            CreditsCommand::Balance { wallet: w, db } => {
                let w = wallet(&w)?;
                let store = db.open().await?;
                let b = store.balance(&w).await?;
                println!(
                    "{w}: balance {} USD, held {} USD",
                    b.balance.to_usd_string(),
                    b.held.to_usd_string()
                );
            }
        }
        Ok(())
    })
}

/// A payments service for store-only work (key minting): never reaches a
/// facilitator, so its address and URL are placeholders it does not use.
fn offline_payments(store: Store) -> anyhow::Result<Payments> {
    let cfg = PaymentsConfig::new(Default::default(), "http://127.0.0.1:9");
    Ok(Payments::new(cfg, store)?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.in_memory && !args.dev {
        bail!("--in-memory keeps no ledger and is for development only: add --dev");
    }
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", args.listen));
    if !args.dev && !args.simulated_tee_keys.is_empty() {
        bail!("--simulated-tee-key is for development mode only (--dev)");
    }
    let policy = match &args.policy {
        Some(p) => sgl::attest::Policy::load(p)
            .with_context(|| format!("loading the policy {}", p.display()))?,
        None => sgl::attest::Policy::default_policy(),
    };
    let simulated_tee_keys = args
        .simulated_tee_keys
        .iter()
        .map(|k| sgl::proto::identity::Ed25519Public::from_b58(k))
        .collect::<Result<Vec<_>, _>>()
        .context("--simulated-tee-key")?;
    let vendor_services = match (&args.kds_url, &args.pcs_url) {
        (None, None) => None,
        (kds, pcs) => Some(sgl::coordinator::attestation::VendorServices {
            kds_url: kds
                .clone()
                .unwrap_or_else(|| "https://kdsintf.amd.com".into()),
            pcs_url: pcs
                .clone()
                .unwrap_or_else(|| "https://api.trustedservices.intel.com".into()),
            root_crl_url: "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
                .into(),
            cache_dir: dirs::cache_dir().map(|d| d.join("sgl").join("attestation")),
        }),
    };
    let config = Config {
        reference_prices: catalogue_prices(),
        policy: std::sync::Arc::new(policy),
        simulated_tee_keys,
        vendor_services,
        dev: args.dev,
        public_url: public_url.clone(),
        heartbeat_interval: Duration::from_secs(args.heartbeat_interval.max(1)),
        missed_heartbeats: args.missed_heartbeats.max(1),
        registration_codes: args.registration_codes.clone(),
        price_cooldown: Duration::from_secs(args.price_cooldown),
        ..Config::default()
    };
    runtime()?.block_on(async move {
        // The Machines API's routes, when configured.
        #[allow(unused_mut)]
        let mut extra = axum::Router::new();
        let grid = if args.in_memory {
            #[cfg(feature = "compute-plane")]
            if !args.compute.providers.is_empty() {
                bail!("--compute-provider needs a database (not --in-memory)");
            }
            Grid::new(config)
        } else {
            let store = args.db.open().await?;
            let payments = match (&args.pay_to, &args.facilitator_url) {
                (Some(to), Some(url)) => {
                    let pay_to = sgl::payments::evm::parse_address(to)
                        .map_err(|e| anyhow::anyhow!("--pay-to: {e}"))?;
                    let mut cfg = PaymentsConfig::new(pay_to, url.clone());
                    cfg.public_base_url = Some(public_url.clone());
                    cfg.networks = vec![match args.network {
                        Network::Base => EvmNetwork::base_usdc(),
                        Network::BaseSepolia => EvmNetwork::base_sepolia_usdc(),
                    }];
                    Some(Payments::new(cfg, store.clone())?)
                }
                (None, None) if args.dev => Some(offline_payments(store.clone())?),
                _ => bail!("billing needs --pay-to and --facilitator-url (or run with --dev)"),
            };
            #[cfg(feature = "compute-plane")]
            if let Some(machines) =
                super::compute::machines_router(&args.compute, payments.as_ref()).await?
            {
                extra = machines;
            }
            Grid::with_store(config, store, payments).await?
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "sgl coordinator listening on http://{addr}{}",
            if args.dev { " (development mode)" } else { "" }
        );
        coordinator::serve_with(grid, extra, listener, super::shutdown_signal())
            .await
            .context("serving")
    })
}

/// Reference prices from the model catalogue (models/catalogue.json).
fn catalogue_prices() -> std::collections::HashMap<String, sgl::money::TokenPrice> {
    use sgl::money::MicrosPerM;
    match sgl::catalogue::catalogue() {
        Ok(c) => c
            .models
            .iter()
            .map(|e| {
                let p = &e.price_per_million_micro_usd;
                (
                    e.id.clone(),
                    sgl::money::TokenPrice::new(MicrosPerM(p.input), MicrosPerM(p.output)),
                )
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "no model catalogue; default reference prices apply");
            Default::default()
        }
    }
}
