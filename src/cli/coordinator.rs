//! `sgl coordinator …`: run the coordinator and manage its store (nodes'
//! registration codes, API keys, credits).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use sgl::coordinator::{self, Config, Grid};
use sgl::money::Micros;
use sgl::payments::config::{EvmNetwork, MppConfig, PaymentsConfig};
use sgl::payments::facilitator::{CdpKey, FacilitatorAuth};
use sgl::payments::Payments;
use sgl::store::{Store, WalletId};

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Serve the client API (/v1/…), the node API (/grid/…), the API key
    /// and credits routes (/compute/…), the x402 discovery document
    /// (/.well-known/x402) and, with --compute-provider, the Machines API
    /// (/compute/plans, /compute/provision, /compute/instances/…), with
    /// --code-exec, sandboxed code execution (/api/x402/compute).
    Serve(Box<ServeArgs>),
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
    /// Operator payouts: batches of the operator share of unpaid usage rows.
    #[command(subcommand)]
    Payouts(PayoutsCommand),
}

#[derive(Debug, Subcommand)]
pub enum PayoutsCommand {
    /// Gather every unpaid operator share (80 % of each job's cost) into a
    /// new batch: one line per operator wallet whose unpaid total reaches
    /// --min-amount (the others wait for a later batch). Prints the batch as
    /// JSON; a usage row is in at most one batch, even when several plans
    /// run at once. Pay the lines, then run `payouts mark-paid`.
    Plan(PlanArgs),
    /// Close a planned batch with the transaction that paid it.
    MarkPaid {
        /// The batch id `payouts plan` printed (pb-…).
        batch: String,
        /// The payment's transaction hash (or reference).
        #[arg(long = "tx", value_name = "HASH")]
        tx: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Print a batch as JSON (`--out-csv` also writes its CSV).
    Show {
        batch: String,
        #[arg(long, value_name = "FILE")]
        out_csv: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The least an operator is paid in one batch, in micro-USD (1000000 =
    /// 1 USD); smaller unpaid totals stay for a later batch.
    #[arg(
        long,
        value_name = "MICROS",
        env = "SGL_PAYOUT_MIN_MICROS",
        default_value_t = 1_000_000
    )]
    pub min_amount: u64,
    /// Also write the batch as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub out_json: Option<PathBuf>,
    /// Also write the batch as CSV (batch_id,wallet,amount_micro_usd,amount_usd,rows).
    #[arg(long, value_name = "FILE")]
    pub out_csv: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArgs,
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
    /// Run as one of several coordinator replicas sharing this PostgreSQL
    /// database behind a load balancer: clients and nodes may reach any
    /// replica; jobs, node calls and streamed chunks cross between them
    /// through the database. Needs a postgres:// --database-url.
    #[arg(long, env = "SGL_REPLICA", conflicts_with = "in_memory")]
    pub replica: bool,
    /// A single-use registration code a node may register with (repeatable);
    /// `sgl coordinator nodes invite` makes stored ones.
    #[arg(long = "registration-code", value_name = "CODE")]
    pub registration_codes: Vec<String>,
    /// Wallet that receives x402 and MPP payments (0x…). Needed outside --dev.
    #[arg(long, env = "SGL_PAY_TO")]
    pub pay_to: Option<String>,
    /// x402 facilitator base URL (POST /verify, POST /settle, GET /supported).
    /// At start the coordinator asks GET /supported and refuses to run unless
    /// the facilitator settles scheme `exact` on --network for x402 v1 and v2.
    #[arg(long, env = "SGL_FACILITATOR_URL")]
    pub facilitator_url: Option<String>,
    /// Run without billing: nodes register and the API is served, but chat
    /// requests are refused (503 billing_not_configured) and there are no
    /// API key or credit routes. The shipped service starts this way until
    /// --pay-to and --facilitator-url are set.
    #[arg(long, env = "SGL_NO_BILLING")]
    pub no_billing: bool,
    /// A file holding a bearer token the facilitator wants
    /// (`Authorization: Bearer …` on every request). The token itself may be
    /// given in the environment variable SGL_FACILITATOR_TOKEN instead.
    #[arg(long, env = "SGL_FACILITATOR_TOKEN_FILE", value_name = "FILE")]
    pub facilitator_token_file: Option<PathBuf>,
    /// A Coinbase CDP API key for the facilitator (such as CDP's x402
    /// facilitator): the key file the CDP portal offers (JSON with `id` or
    /// `name` and `privateKey`), or a file holding the secret alone (an EC
    /// P-256 PEM key or a base64 Ed25519 key). Every request then carries a
    /// JWT signed for it. The secret itself may be given in the environment
    /// variable SGL_FACILITATOR_CDP_KEY_SECRET instead.
    #[arg(long, env = "SGL_FACILITATOR_CDP_KEY_FILE", value_name = "FILE")]
    pub facilitator_cdp_key_file: Option<PathBuf>,
    /// The CDP API key id (a UUID or `organizations/…/apiKeys/…`), when the
    /// key file does not name it.
    #[arg(long, env = "SGL_FACILITATOR_CDP_KEY_ID", value_name = "ID")]
    pub facilitator_cdp_key_id: Option<String>,
    /// Network and asset payments are taken in.
    #[arg(long, env = "SGL_NETWORK", value_enum, default_value = "base")]
    pub network: Network,
    /// Accept MPP (the `Payment` HTTP authentication scheme) beside x402:
    /// every 402 also carries `WWW-Authenticate: Payment` (method `evm`,
    /// intent `charge`, credential type `authorization`: an EIP-3009
    /// authorization of USDC on --network, what the pympp and mppx clients
    /// pay with), `Authorization: Payment` credentials are verified, each
    /// challenge is redeemed once, and paid answers carry `Payment-Receipt`.
    /// Needs --pay-to and --facilitator-url, which settles MPP payments.
    #[arg(long, env = "SGL_MPP")]
    pub mpp: bool,
    /// The MPP realm named in challenges. Default: the host of --public-url.
    #[arg(long, env = "SGL_MPP_REALM", value_name = "REALM")]
    pub mpp_realm: Option<String>,
    /// A file holding the MPP secret (at least 32 bytes), the HMAC key that
    /// binds challenge ids to their terms; coordinators behind one public
    /// URL must share it. The secret itself may be given in the environment
    /// variable SGL_MPP_SECRET instead. Without either, each process draws a
    /// random one, and challenges issued before a restart are refused.
    #[arg(long, env = "SGL_MPP_SECRET_FILE", value_name = "FILE")]
    pub mpp_secret_file: Option<PathBuf>,
    /// Seconds an MPP challenge stays valid.
    #[arg(
        long,
        env = "SGL_MPP_CHALLENGE_TTL",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    pub mpp_challenge_ttl: u64,
    /// The wallet MPP payments go to (0x…). Default: --pay-to.
    #[arg(long, env = "SGL_MPP_RECIPIENT", value_name = "ADDRESS")]
    pub mpp_recipient: Option<String>,
    /// Seconds between node heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval: u64,
    /// Heartbeats a node may miss before it stops receiving work.
    #[arg(long, default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// Seconds between two price changes of the same node and model.
    #[arg(long, default_value_t = 60)]
    pub price_cooldown: u64,
    /// Seconds a credit hold stays open without renewal. The coordinator
    /// renews the holds of its running jobs three times per lease; a hold
    /// nobody renews (its coordinator crashed) is released once the lease
    /// lapses. At start-up every open hold of a SQLite database is released
    /// (it serves one coordinator); on PostgreSQL only lapsed ones.
    #[arg(long, env = "SGL_HOLD_LEASE", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub hold_lease: u64,
    /// Credits of a wallet reserved at once for its grid requests, in
    /// quotes of the request that asks: the coordinator holds that block of
    /// the wallet's balance (a leased hold, renewed like the others) and
    /// admits the wallet's requests from it in memory, settling finished
    /// jobs in batched transactions; 0 takes a hold per request instead.
    /// While a block is held, the wallet's balance shows it as held.
    #[arg(
        long,
        env = "SGL_CREDIT_BLOCK",
        default_value_t = 64,
        value_name = "QUOTES"
    )]
    pub credit_block: u32,
    /// Milliseconds a wallet's credit block stays after its last request
    /// ends (sequential requests then reuse it); 0 gives it back with the
    /// settlement of that request, so a wallet at rest holds nothing.
    #[arg(
        long,
        env = "SGL_CREDIT_BLOCK_IDLE_MS",
        default_value_t = 0,
        value_name = "MS"
    )]
    pub credit_block_idle_ms: u64,
    /// When a credit-paid answer is released: `before-answer` (the default)
    /// withholds it until its settlement batch commits, so every answer
    /// delivered is billed; `after-answer` releases it at once and commits
    /// the batch behind it, taking a database commit off every request's
    /// path. Either way the ledger stays exact after a crash; with
    /// `after-answer` a crash between an answer and its batch's commit
    /// (milliseconds) leaves that answer unpaid to the operator, never
    /// overcharges the client. Needs --credit-block above 0.
    #[arg(
        long,
        env = "SGL_CREDIT_SETTLE",
        value_enum,
        default_value_t = sgl::payments::reservations::SettleOrder::BeforeAnswer,
        value_name = "ORDER"
    )]
    pub credit_settle: sgl::payments::reservations::SettleOrder,
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
    /// Seconds a reservation lives unless a chat call claims it (at most 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10))]
    pub reservation_ttl: u64,
    /// Unclaimed reservations one client may hold at once (per API key's
    /// wallet, else per address); past it, 429 too_many_reservations.
    #[arg(long, default_value_t = 16)]
    pub max_reservations_per_client: usize,
    /// A reverse proxy (address or CIDR block) whose X-Forwarded-For names
    /// the client, for the limits kept per client address (repeatable; the
    /// environment variable takes a comma-separated list). From a trusted
    /// proxy the client is the rightmost X-Forwarded-For entry that is not
    /// itself a trusted proxy; from any other peer the header is ignored.
    #[arg(
        long = "trusted-proxy",
        env = "SGL_TRUSTED_PROXIES",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<sgl::coordinator::client_addr::Cidr>,
    /// The most parallel slots a node may claim in its heartbeat; a larger
    /// claim is clamped to it.
    #[arg(long, default_value_t = 256)]
    pub max_node_slots: u32,
    /// A model nodes may advertise besides the catalogue's (repeatable).
    #[arg(long = "allow-model", value_name = "ID")]
    pub allowed_models: Vec<String>,
    #[command(flatten)]
    pub server: super::ServerLimitArgs,
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
    /// Revoke one of a wallet's keys by id. A running coordinator remembers
    /// a key it checked for one second, so the key stops working within a
    /// second.
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
        CoordinatorCommand::Serve(args) => serve(*args),
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
        CoordinatorCommand::Payouts(cmd) => payouts(cmd),
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

/// A batch as the files and stdout give it: micro-USD integers, plus the
/// USD amount as text for people.
fn batch_json(b: &sgl::store::PayoutBatch) -> serde_json::Value {
    serde_json::json!({
        "batch_id": b.id,
        "state": b.state,
        "created_at": sgl::timefmt::format_rfc3339_ms(b.created_at),
        "paid_at": b.paid_at.map(sgl::timefmt::format_rfc3339_ms),
        "tx_hash": b.tx_hash,
        "min_amount_micro_usd": b.min_amount.0,
        "total_micro_usd": b.total.0,
        "total_usd": b.total.to_usd_string(),
        "rows": b.payouts.iter().map(|l| l.rows).sum::<i64>(),
        "payouts": b.payouts.iter().map(|l| serde_json::json!({
            "wallet": l.wallet,
            "amount_micro_usd": l.amount.0,
            "amount_usd": l.amount.to_usd_string(),
            "rows": l.rows,
        })).collect::<Vec<_>>(),
    })
}

fn batch_csv(b: &sgl::store::PayoutBatch) -> String {
    let mut out = String::from("batch_id,wallet,amount_micro_usd,amount_usd,rows\n");
    for l in &b.payouts {
        // Wallets are hex or base58 and batch ids pb-<uuid>: nothing to quote.
        out.push_str(&format!(
            "{},{},{},{},{}\n",
            b.id,
            l.wallet,
            l.amount.0,
            l.amount.to_usd_string(),
            l.rows
        ));
    }
    out
}

/// Write a payout file readable by its owner only (it names wallets and
/// amounts), replacing any file of that name.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A transaction reference as `mark-paid` records it: printable ASCII, no
/// spaces, at most 128 characters (an EVM hash is 66, a Solana signature 88).
fn tx_reference(tx: &str) -> anyhow::Result<&str> {
    let tx = tx.trim();
    if tx.is_empty() || tx.len() > 128 || !tx.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("--tx must be the payment's transaction hash (1 to 128 printable characters, no spaces)");
    }
    Ok(tx)
}

fn payouts(cmd: PayoutsCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match cmd {
            PayoutsCommand::Plan(args) => {
                let store = args.db.open().await?;
                let batch = store.plan_payout(Micros(args.min_amount)).await?;
                let Some(b) = batch else {
                    eprintln!(
                        "nothing to pay: no operator has {} USD or more unpaid",
                        Micros(args.min_amount).to_usd_string()
                    );
                    let empty = serde_json::json!({
                        "batch_id": null, "total_micro_usd": 0, "payouts": [],
                        "min_amount_micro_usd": args.min_amount,
                    });
                    println!("{}", serde_json::to_string_pretty(&empty)?);
                    return Ok(());
                };
                // The batch is stored: print it before anything can fail
                // (`payouts show` prints it again).
                let json = serde_json::to_string_pretty(&batch_json(&b))?;
                println!("{json}");
                if let Some(p) = &args.out_json {
                    write_private(p, &format!("{json}\n"))?;
                }
                if let Some(p) = &args.out_csv {
                    write_private(p, &batch_csv(&b))?;
                }
                eprintln!(
                    "payout batch {}: {} USD to {} wallet(s); after paying, run \
                     `sgl coordinator payouts mark-paid {} --tx HASH`",
                    b.id,
                    b.total.to_usd_string(),
                    b.payouts.len(),
                    b.id
                );
            }
            PayoutsCommand::MarkPaid { batch, tx, db } => {
                let tx = tx_reference(&tx)?;
                let store = db.open().await?;
                let b = store.mark_payout_paid(&batch, tx).await??;
                println!("{}", serde_json::to_string_pretty(&batch_json(&b))?);
                eprintln!("payout batch {} marked paid by {tx}", b.id);
            }
            PayoutsCommand::Show { batch, out_csv, db } => {
                let store = db.open().await?;
                let Some(b) = store.payout_batch(&batch).await? else {
                    bail!("no payout batch {batch}");
                };
                if let Some(p) = &out_csv {
                    write_private(p, &batch_csv(&b))?;
                }
                println!("{}", serde_json::to_string_pretty(&batch_json(&b))?);
            }
        }
        Ok(())
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

/// The largest secret file read (keys, tokens).
const MAX_SECRET_FILE_BYTES: u64 = 16 * 1024;

/// A secret from an environment variable, if set (and not empty).
fn env_secret(name: &str) -> Option<zeroize::Zeroizing<String>> {
    std::env::var(name)
        .ok()
        .map(zeroize::Zeroizing::new)
        .filter(|v| !v.trim().is_empty())
}

/// The text of a secret file, read owner-only (tightened to 0600 first).
fn secret_file_text(
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let bytes = sgl::private_file::read_secret(path, MAX_SECRET_FILE_BYTES)
        .with_context(|| format!("reading {what}"))?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{what} ({}) is not UTF-8 text", path.display()))?;
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}

/// The facilitator's credentials from the flags and the environment; never
/// logged.
fn facilitator_auth(args: &ServeArgs) -> anyhow::Result<FacilitatorAuth> {
    let token = match &args.facilitator_token_file {
        Some(p) => Some(secret_file_text(p, "--facilitator-token-file")?),
        None => env_secret("SGL_FACILITATOR_TOKEN"),
    };
    let cdp_secret = match &args.facilitator_cdp_key_file {
        Some(p) => Some(secret_file_text(p, "--facilitator-cdp-key-file")?),
        None => env_secret("SGL_FACILITATOR_CDP_KEY_SECRET"),
    };
    match (token, cdp_secret) {
        (Some(_), Some(_)) => {
            bail!("give the facilitator either a bearer token or a CDP API key, not both")
        }
        (Some(t), None) => {
            FacilitatorAuth::bearer(&t).map_err(|e| anyhow::anyhow!("facilitator token: {e}"))
        }
        (None, Some(secret)) => {
            let key = CdpKey::from_file_text(&secret, args.facilitator_cdp_key_id.as_deref())
                .map_err(|e| anyhow::anyhow!("facilitator CDP key: {e}"))?;
            Ok(FacilitatorAuth::Cdp(Box::new(key)))
        }
        (None, None) => {
            if args.facilitator_cdp_key_id.is_some() {
                bail!("--facilitator-cdp-key-id needs --facilitator-cdp-key-file or SGL_FACILITATOR_CDP_KEY_SECRET");
            }
            Ok(FacilitatorAuth::None)
        }
    }
}

/// The host (and port) of a URL, the default MPP realm.
fn url_host(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    })
}

/// MPP from the flags and the environment, when --mpp is on.
fn mpp_config(args: &ServeArgs, public_url: &str) -> anyhow::Result<Option<MppConfig>> {
    if !args.mpp {
        if args.mpp_realm.is_some()
            || args.mpp_secret_file.is_some()
            || args.mpp_recipient.is_some()
        {
            bail!("--mpp-realm, --mpp-secret-file and --mpp-recipient need --mpp");
        }
        return Ok(None);
    }
    let realm = match &args.mpp_realm {
        Some(r) => r.clone(),
        None => url_host(public_url)
            .with_context(|| format!("no host in --public-url {public_url}; give --mpp-realm"))?,
    };
    if !MppConfig::valid_realm(&realm) {
        bail!("--mpp-realm must be printable ASCII without quotes or backslashes");
    }
    let secret = match &args.mpp_secret_file {
        Some(p) => Some(secret_file_text(p, "--mpp-secret-file")?),
        None => env_secret("SGL_MPP_SECRET"),
    };
    let secret = match secret {
        Some(s) => {
            let bytes = zeroize::Zeroizing::new(s.trim().as_bytes().to_vec());
            if bytes.len() < MppConfig::MIN_SECRET_BYTES {
                bail!(
                    "the MPP secret must be at least {} bytes",
                    MppConfig::MIN_SECRET_BYTES
                );
            }
            bytes
        }
        None => {
            let mut b = zeroize::Zeroizing::new(vec![0u8; 32]);
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            tracing::info!("MPP secret: drawn at random for this process");
            b
        }
    };
    if !(10..=86_400).contains(&args.mpp_challenge_ttl) {
        bail!("--mpp-challenge-ttl must be between 10 and 86400 seconds");
    }
    let mut cfg = MppConfig::new(realm, secret);
    cfg.validity = Duration::from_secs(args.mpp_challenge_ttl);
    if let Some(r) = &args.mpp_recipient {
        cfg.recipient = Some(
            sgl::payments::evm::parse_address(r)
                .map_err(|e| anyhow::anyhow!("--mpp-recipient: {e}"))?,
        );
    }
    Ok(Some(cfg))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.in_memory && !args.dev {
        bail!("--in-memory keeps no ledger and is for development only: add --dev");
    }
    if args.in_memory && args.mpp {
        bail!("--mpp needs a store for its redeemed challenges: drop --in-memory");
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
        reservation_ttl: Duration::from_secs(args.reservation_ttl),
        max_reservations_per_client: args.max_reservations_per_client.max(1),
        trusted_proxies: sgl::coordinator::client_addr::TrustedProxies(
            args.trusted_proxies.clone(),
        ),
        max_node_slots: args.max_node_slots.max(1),
        allowed_models: args.allowed_models.clone(),
        server_limits: args.server.limits(),
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
            #[cfg(feature = "compute-plane")]
            if args.compute.exec.code_exec {
                bail!("--code-exec needs a database and billing (not --in-memory)");
            }
            Grid::new(config)
        } else {
            let store = args
                .db
                .open()
                .await?
                .with_hold_lease(Duration::from_secs(args.hold_lease));
            let payments = match (&args.pay_to, &args.facilitator_url) {
                (to, url) if args.no_billing => {
                    if to.is_some() || url.is_some() {
                        bail!(
                            "--no-billing (SGL_NO_BILLING) conflicts with --pay-to and \
                             --facilitator-url: remove it to take payments"
                        );
                    }
                    tracing::warn!(
                        "billing is off: chat requests are refused until payments are set"
                    );
                    None
                }
                (Some(to), Some(url)) => {
                    let pay_to = sgl::payments::evm::parse_address(to)
                        .map_err(|e| anyhow::anyhow!("--pay-to: {e}"))?;
                    let mut cfg = PaymentsConfig::new(pay_to, url.clone());
                    cfg.public_base_url = Some(public_url.clone());
                    cfg.networks = vec![match args.network {
                        Network::Base => EvmNetwork::base_usdc(),
                        Network::BaseSepolia => EvmNetwork::base_sepolia_usdc(),
                    }];
                    cfg.facilitator_auth = facilitator_auth(&args)?;
                    cfg.mpp = mpp_config(&args, &public_url)?;
                    let p = Payments::new(cfg, store.clone())?;
                    // Fail at start, not at the first paying client.
                    p.check_facilitator()
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))
                        .context("the facilitator cannot settle what this coordinator accepts")?;
                    Some(p)
                }
                (None, None) if args.dev => {
                    if args.mpp {
                        bail!("--mpp needs --pay-to and --facilitator-url");
                    }
                    Some(offline_payments(store.clone())?)
                }
                _ => bail!(
                    "billing needs --pay-to and --facilitator-url (or --no-billing to start \
                     without it, or --dev)"
                ),
            };
            #[cfg(feature = "compute-plane")]
            {
                let machines =
                    super::compute::machines_router(&args.compute, payments.as_ref()).await?;
                let exec = super::code_exec::code_exec(&args.compute.exec, payments.as_ref())?;
                if let Some(p) = &payments {
                    let doc = super::code_exec::discovery_doc(
                        &args.compute.exec,
                        p,
                        &public_url,
                        machines.is_some(),
                        exec.as_ref(),
                    )?;
                    extra = extra.merge(sgl::compute::discovery::router(doc));
                }
                if let Some(m) = machines {
                    extra = extra.merge(m);
                }
                if let Some(x) = exec {
                    eprintln!(
                        "code execution: {} sandbox slot(s), network {}",
                        x.pool().slots(),
                        x.pool().config().network
                    );
                    extra = extra.merge(sgl::compute::exec::http::router(x));
                }
            }
            if args.credit_block == 0
                && args.credit_settle == sgl::payments::reservations::SettleOrder::AfterAnswer
            {
                anyhow::bail!(
                    "--credit-settle after-answer needs credit blocks (--credit-block above 0)"
                );
            }
            if let (Some(p), true) = (&payments, args.credit_block > 0) {
                p.enable_reservations(sgl::payments::reservations::ReserveConfig {
                    block_quotes: args.credit_block,
                    idle: Duration::from_millis(args.credit_block_idle_ms),
                    order: args.credit_settle,
                    ..Default::default()
                });
            }
            let replica = if args.replica {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let db = store
                    .replica_db(&id, sgl::coordinator::replica::LEASE)
                    .context("--replica")?;
                Some(sgl::coordinator::replica::Replica::join(db).await?)
            } else {
                None
            };
            let grid = Grid::with_store(config, store, payments).await?;
            match replica {
                Some(r) => grid.with_replica(r),
                None => grid,
            }
        };
        let payments = grid.payments.clone();
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "sgl coordinator listening on http://{addr}{}",
            if args.dev { " (development mode)" } else { "" }
        );
        let served = coordinator::serve_with(grid, extra, listener, super::shutdown_signal())
            .await
            .context("serving");
        // Settlements still queued are written, and the credit blocks given
        // back, before the process leaves.
        if let Some(r) = payments.as_ref().and_then(|p| p.reservations()) {
            r.close().await;
        }
        served
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
