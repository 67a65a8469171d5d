//! `sgl node …`: identity and serving.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use sgl::node::identity_files::{self, InitOptions, PublicKeys};

/// The public grid's coordinator, the default of the public node agent too.
const DEFAULT_COORDINATOR: &str = "https://grid.x402compute.cc";

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Create the node identity: an ed25519 keypair made on this machine, the
    /// X25519 key derived from it, and node.json. Prints the public keys.
    Init(InitArgs),
    /// Print the node's public keys (and the keybind signature once registered).
    Keys(KeysArgs),
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// Config directory holding keypair.json and node.json.
    #[arg(long, env = "SGL_NODE_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
}

impl DirArgs {
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        match &self.config_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(identity_files::default_config_dir()?),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TeeType {
    /// AMD SEV-SNP confidential VM.
    SevSnp,
    /// Intel TDX trust domain.
    Tdx,
    /// No TEE: the node can only self-report.
    None,
}

impl TeeType {
    fn wire(self) -> &'static str {
        match self {
            TeeType::SevSnp => "sev-snp",
            TeeType::Tdx => "tdx",
            TeeType::None => "none",
        }
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Replace an existing identity. The old keys are lost, and with them the
    /// node's standing on the grid.
    #[arg(long)]
    pub force: bool,
    /// Operator wallet that receives the USDC earnings.
    #[arg(long, value_name = "ADDRESS")]
    pub wallet: Option<String>,
    /// The TEE this machine runs in.
    #[arg(long, value_enum, default_value = "none")]
    pub tee_type: TeeType,
    /// Coordinator base URL (https, or http on loopback only).
    #[arg(long, env = "SGL_COORDINATOR_URL", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Init(args) => init(args),
        NodeCommand::Keys(args) => keys(args),
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let dir = args.dir.resolve()?;
    let opts = InitOptions {
        force: args.force,
        wallet_address: args.wallet.clone(),
        tee_type: args.tee_type.wire().to_string(),
        coordinator_url: args.coordinator.clone(),
    };
    let identity = identity_files::init(&dir, &opts)?;
    let node = identity_files::load_node_file(&dir)?;
    let keys = identity_files::public_keys(&dir, &identity, Some(&node));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
    } else {
        println!("Created a node identity in {}", dir.display());
        print_keys(&keys);
    }
    Ok(())
}

fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let dir = args.dir.resolve()?;
    let identity = identity_files::load_identity(&dir)?;
    let node = identity_files::load_node_file(&dir).ok();
    let keys = identity_files::public_keys(&dir, &identity, node.as_ref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
    } else {
        print_keys(&keys);
    }
    Ok(())
}

fn print_keys(k: &PublicKeys) {
    println!("ed25519 public key:  {}", k.ed25519_public_key);
    println!("X25519 public key:   {}", k.x25519_public_key);
    println!("key version:         {}", k.key_version);
    match (&k.node_id, &k.keybind_signature) {
        (Some(id), Some(sig)) => {
            println!("node id:             {id}");
            println!("keybind signature:   {sig}");
        }
        _ => println!("node id:             (not registered yet)"),
    }
}
