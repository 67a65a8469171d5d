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
    /// Serve a model locally as an OpenAI-compatible API (no coordinator).
    #[cfg(feature = "node")]
    Serve(ServeArgs),
}

/// How to load the engine; shared by `node serve` and `bench`.
#[cfg(feature = "node")]
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Catalogue id (fetched with `sgl model fetch`) or a path to a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The model id to report to clients instead of the catalogue id or file stem.
    #[arg(long)]
    pub served_name: Option<String>,
    /// Weight format of the linear layers: auto (q8_0 on CPU), native (as in
    /// the file), q8_0 (batched kernel), q8_0-candle, q4_0, q4_1, q4k, q6k, f16, f32.
    #[arg(long, default_value = "auto")]
    pub requant: String,
    /// cpu, or cuda:N (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for a slot before new ones get HTTP 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Cap on the context length.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// A tokenizer.json to use instead of the GGUF's vocabulary.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A file holding a Jinja chat template to use instead of the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

#[cfg(feature = "node")]
impl EngineArgs {
    pub fn to_config(&self) -> anyhow::Result<sgl::engine::EngineConfig> {
        use anyhow::Context;
        use sgl::engine::{DeviceChoice, EngineConfig, WeightFormat};
        let mut c = EngineConfig::new(self.model.clone());
        c.served_name = self.served_name.clone();
        c.weight_format = WeightFormat::parse(&self.requant)
            .with_context(|| format!("unknown --requant {}", self.requant))?;
        c.device = match self.device.as_str() {
            "cpu" => DeviceChoice::Cpu,
            d => match d.strip_prefix("cuda") {
                Some("") => DeviceChoice::Cuda(0),
                Some(n) => DeviceChoice::Cuda(
                    n.trim_start_matches(':')
                        .parse()
                        .with_context(|| format!("bad --device {d}"))?,
                ),
                None => anyhow::bail!("--device must be cpu or cuda:N"),
            },
        };
        c.max_batch = self.max_batch;
        c.max_queue = self.max_queue;
        c.prefill_chunk = self.prefill_chunk;
        c.max_context = self.max_context;
        c.tokenizer_json = self.tokenizer.clone();
        if let Some(p) = &self.chat_template {
            c.chat_template = Some(
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            );
        }
        Ok(c)
    }
}

#[cfg(feature = "node")]
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on. Anything but loopback exposes an unauthenticated API.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8081)]
    pub port: u16,
    /// Largest request body accepted.
    #[arg(long, default_value_t = sgl::node::local_server::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
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
        #[cfg(feature = "node")]
        NodeCommand::Serve(args) => serve(args),
    }
}

#[cfg(feature = "node")]
fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let config = args.engine.to_config()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        // Tests and scripts read this line to find the port.
        println!("listening on http://{local}");
        let _ = std::io::stdout().flush();
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        };
        sgl::node::local_server::serve(listener, config, args.max_body_bytes, shutdown).await
    })
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
