//! `sgl attest …`: produce hardware evidence bound to the node's keys and a
//! challenge, verify evidence with a policy, and say which sources exist.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use sgl::attest::kds::DEFAULT_KDS_URL;
use sgl::attest::pcs::{DEFAULT_PCS_URL, DEFAULT_ROOT_CRL_URL};
use sgl::attest::source::{self, SourceConfig, SourceKind};
use sgl::attest::{self, Binding, Evidence, NodeBinding, Policy, VerifyOptions};
use sgl::node::identity_files;
use sgl::proto::identity::{Ed25519Public, NodeId, X25519Public, KEY_VERSION};

use super::node::DirArgs;

/// Produce evidence (`sgl attest --challenge C`), or verify or detect.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AttestArgs {
    #[command(subcommand)]
    pub command: Option<AttestCommand>,
    #[command(flatten)]
    pub produce: ProduceArgs,
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Say which evidence sources this machine has, and why the others are missing.
    Detect(DetectArgs),
    /// Verify an evidence file and print the verdict step by step; exits
    /// non-zero when any step fails.
    Verify(Box<VerifyArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SourceChoice {
    /// The best hardware source available (never simulated).
    Auto,
    /// SEV-SNP through configfs-tsm.
    SnpConfigfs,
    /// SEV-SNP through /dev/sev-guest.
    SevGuest,
    /// TDX through configfs-tsm.
    TdxConfigfs,
    /// Simulated evidence: development only, never hardware.
    Simulated,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The challenge to bind (from the coordinator, §6.3).
    #[arg(long, value_name = "C", required = true)]
    pub challenge: Option<String>,
    /// Write the evidence JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub dir: DirArgs,
    /// The node id to bind (default: node.json's).
    #[arg(long, value_name = "UUID")]
    pub node_id: Option<String>,
    /// The key version to bind.
    #[arg(long, default_value_t = KEY_VERSION)]
    pub key_version: u32,
    /// Which evidence source to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub source: SourceChoice,
    /// Shorthand for `--source simulated` (development only).
    #[arg(long)]
    pub simulated: bool,
    #[command(flatten)]
    pub paths: PathArgs,
}

#[derive(Debug, Args)]
pub struct PathArgs {
    /// The configfs-tsm report directory.
    #[arg(long, value_name = "DIR", default_value = source::DEFAULT_CONFIGFS_TSM)]
    pub configfs_tsm: PathBuf,
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub paths: PathArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The evidence JSON file (PROTOCOL.md §7a `evidence`).
    pub evidence: PathBuf,
    /// The policy file (default: the built-in attestation/policy.toml).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Node id of the binding.
    #[arg(long, value_name = "UUID", conflicts_with = "expect_report_data")]
    pub node_id: Option<String>,
    /// ed25519 public key (b58) of the binding.
    #[arg(long, value_name = "B58", conflicts_with = "expect_report_data")]
    pub ed25519: Option<String>,
    /// X25519 public key (b58) of the binding.
    #[arg(long, value_name = "B58", conflicts_with = "expect_report_data")]
    pub x25519: Option<String>,
    /// Key version of the binding.
    #[arg(long, default_value_t = KEY_VERSION)]
    pub key_version: u32,
    /// The challenge of the binding.
    #[arg(long, value_name = "C", conflicts_with = "expect_report_data")]
    pub challenge: Option<String>,
    /// When the challenge expires (unix seconds); checked against --now.
    #[arg(long, value_name = "UNIX", conflicts_with = "expect_report_data")]
    pub challenge_expires_at: Option<u64>,
    /// Check the report data against these 64 bytes (hex) instead of a node
    /// binding, for evidence produced elsewhere.
    #[arg(long, value_name = "HEX")]
    pub expect_report_data: Option<String>,
    /// Skip only the measurement allow-list (the verdict says so).
    #[arg(long)]
    pub allow_any_measurement: bool,
    /// Development mode: accept simulated evidence (never as hardware).
    #[arg(long)]
    pub dev: bool,
    /// A simulated-TEE public key (b58) to trust in development mode; default:
    /// the key in the config directory.
    #[arg(long, value_name = "B58")]
    pub simulated_key: Vec<String>,
    #[command(flatten)]
    pub dir: DirArgs,
    /// The verification time, unix seconds (default: now).
    #[arg(long, value_name = "UNIX")]
    pub now: Option<u64>,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
    /// AMD KDS base URL for a VCEK the evidence lacks.
    #[arg(long, env = "SGL_AMD_KDS_URL", default_value = DEFAULT_KDS_URL)]
    pub kds_url: String,
    /// Intel PCS (or PCCS) base URL for TDX collateral the evidence lacks.
    #[arg(long, env = "SGL_INTEL_PCS_URL", default_value = DEFAULT_PCS_URL)]
    pub pcs_url: String,
    /// Intel SGX root CA CRL URL.
    #[arg(long, env = "SGL_INTEL_ROOT_CRL_URL", default_value = DEFAULT_ROOT_CRL_URL)]
    pub root_crl_url: String,
    /// Cache for fetched VCEKs and collateral (default: ~/.cache/sgl/attest).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Never fetch: use only what the evidence carries.
    #[arg(long)]
    pub offline: bool,
}

pub fn run(args: AttestArgs) -> anyhow::Result<()> {
    match args.command {
        Some(AttestCommand::Detect(a)) => detect(a),
        Some(AttestCommand::Verify(a)) => verify(*a),
        None => produce(args.produce),
    }
}

fn simulated_key_path(dir: &DirArgs) -> anyhow::Result<PathBuf> {
    Ok(dir.resolve()?.join(attest::sim::KEY_FILE))
}

fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let challenge = args
        .challenge
        .clone()
        .ok_or_else(|| anyhow!("--challenge is required"))?;
    let dir = args.dir.resolve()?;
    let identity = identity_files::load_identity(&dir)?;
    let node_id = match &args.node_id {
        Some(id) => id.clone(),
        None => identity_files::load_node_file(&dir)?
            .node_id
            .ok_or_else(|| {
                anyhow!("the node is not registered yet (no node_id in node.json); pass --node-id")
            })?,
    };
    let binding = NodeBinding {
        node_id: NodeId::parse(&node_id).context("--node-id")?,
        ed25519: identity.ed25519_public(),
        x25519: identity.x25519_public(),
        key_version: args.key_version,
        challenge,
    };
    let simulated = args.simulated || matches!(args.source, SourceChoice::Simulated);
    let cfg = SourceConfig {
        configfs_tsm: args.paths.configfs_tsm.clone(),
        simulated_key: simulated.then(|| dir.join(attest::sim::KEY_FILE)),
        ..SourceConfig::default()
    };
    let src = match (simulated, args.source) {
        (true, _) => source::named_source(SourceKind::Simulated, &cfg)?,
        (false, SourceChoice::Auto) => source::best_source(&cfg)?,
        (false, SourceChoice::SnpConfigfs) => {
            source::named_source(SourceKind::SnpConfigfsTsm, &cfg)?
        }
        (false, SourceChoice::SevGuest) => source::named_source(SourceKind::SnpSevGuest, &cfg)?,
        (false, SourceChoice::TdxConfigfs) => {
            source::named_source(SourceKind::TdxConfigfsTsm, &cfg)?
        }
        (false, SourceChoice::Simulated) => unreachable!("handled above"),
    };
    let evidence = attest::produce_evidence(src.as_ref(), &binding)?;
    let text = evidence.to_json_pretty();
    match &args.out {
        Some(p) => std::fs::write(p, format!("{text}\n"))
            .with_context(|| format!("writing {}", p.display()))?,
        None => println!("{text}"),
    }
    eprintln!("evidence: {} from {}", evidence.format, src.kind().as_str());
    eprintln!("report data: {}", hex::encode(binding.report_data()));
    if simulated {
        let key = attest::sim::SimKey::load(&dir.join(attest::sim::KEY_FILE))?;
        eprintln!(
            "simulated-TEE public key: {} (development only; a verifier must be in development mode)",
            key.public()
        );
    }
    Ok(())
}

fn detect(args: DetectArgs) -> anyhow::Result<()> {
    let cfg = SourceConfig {
        configfs_tsm: args.paths.configfs_tsm,
        ..SourceConfig::default()
    };
    let found = source::detect(&cfg);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    for d in &found {
        println!(
            "{:<10} {:<26} {}",
            if d.available { "available" } else { "missing" },
            d.source.as_str(),
            d.reason
        );
    }
    match found
        .iter()
        .find(|d| d.available && d.source != SourceKind::Simulated)
    {
        Some(d) => println!("best: {}", d.source.as_str()),
        None => println!("best: none (no hardware evidence on this machine)"),
    }
    Ok(())
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let text = std::fs::read(&args.evidence)
        .with_context(|| format!("reading {}", args.evidence.display()))?;
    let evidence = Evidence::from_json(&text)?;
    let policy = match &args.policy {
        Some(p) => Policy::load(p)?,
        None => Policy::default_policy(),
    };
    let binding = if let Some(h) = &args.expect_report_data {
        let bytes = hex::decode(h.trim()).context("--expect-report-data is not hex")?;
        let rd: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
            anyhow!("--expect-report-data is {} bytes, expected 64", b.len())
        })?;
        Binding::ReportData(rd)
    } else {
        let (Some(node_id), Some(ed), Some(x), Some(challenge)) =
            (&args.node_id, &args.ed25519, &args.x25519, &args.challenge)
        else {
            bail!("give the binding: --node-id, --ed25519, --x25519 and --challenge (or --expect-report-data HEX)");
        };
        Binding::Node {
            binding: NodeBinding {
                node_id: NodeId::parse(node_id).context("--node-id")?,
                ed25519: Ed25519Public::from_b58(ed).context("--ed25519")?,
                x25519: X25519Public::from_b58(x).context("--x25519")?,
                key_version: args.key_version,
                challenge: challenge.clone(),
            },
            challenge_expires_at: args.challenge_expires_at,
        }
    };
    let now = match args.now {
        Some(n) => n,
        None => sgl::clock::Clock::system().now_secs(),
    };
    let mut opts = VerifyOptions::new(now);
    opts.dev_mode = args.dev;
    opts.allow_any_measurement = args.allow_any_measurement;
    for k in &args.simulated_key {
        opts.simulated_keys
            .push(Ed25519Public::from_b58(k).context("--simulated-key")?);
    }
    if args.dev && opts.simulated_keys.is_empty() {
        if let Ok(p) = simulated_key_path(&args.dir) {
            if p.exists() {
                opts.simulated_keys
                    .push(attest::sim::SimKey::load(&p)?.public());
            }
        }
    }
    if !args.offline {
        let cache = match &args.cache_dir {
            Some(d) => Some(d.clone()),
            None => dirs::cache_dir().map(|d| d.join("sgl").join("attest")),
        };
        opts = opts.with_vendor_services(&args.kds_url, &args.pcs_url, &args.root_crl_url, cache);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let verdict = runtime.block_on(attest::verify_evidence(&evidence, &binding, &policy, &opts));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&verdict)?);
    } else {
        print!("{}", verdict.render());
    }
    if verdict.verified {
        Ok(())
    } else {
        let step = verdict.first_failure().map_or("?", |c| c.step.as_str());
        bail!("evidence rejected (first failed step: {step})")
    }
}
