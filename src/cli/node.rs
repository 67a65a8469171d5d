//! `sgl node …`: identity and serving.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use sgl::node::identity_files::{self, InitOptions, PublicKeys};
use sgl::proto::api::StatusRequest;
use sgl::proto::{headers, routes};

/// The public grid's coordinator, the default of the public node agent too.
const DEFAULT_COORDINATOR: &str = "https://grid.x402compute.cc";

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Create the node identity: an ed25519 keypair made on this machine, the
    /// X25519 key derived from it, and node.json. Prints the public keys.
    Init(InitArgs),
    /// Print the node's public keys (and the keybind signature once registered).
    Keys(KeysArgs),
    /// Join the grid and take jobs until SIGTERM or Ctrl-C: attest, register
    /// (or re-attach with node.json), heartbeat, hold the WebSocket, run jobs.
    #[cfg(feature = "node")]
    Start(StartArgs),
    /// Show this node's standing on its coordinator.
    Status(RemoteArgs),
    /// What this node's jobs earned its operator (micro-USD), per day and per
    /// model, paid and unpaid, from its coordinator.
    Earnings(EarningsArgs),
    /// Stop receiving new jobs (in-flight jobs finish).
    OffGrid(RemoteArgs),
    /// Receive jobs again after `off-grid`.
    OnGrid(RemoteArgs),
    /// The systemd service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Serve a model locally as an OpenAI-compatible API (no coordinator).
    #[cfg(feature = "node")]
    Serve(ServeArgs),
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write the hardened sgl-node.service unit for this binary, then
    /// `systemctl daemon-reload` and `systemctl enable --now sgl-node`.
    Install(ServiceInstallArgs),
    /// Print the unit that `install` would write.
    Print,
}

#[derive(Debug, Args)]
pub struct ServiceInstallArgs {
    /// Where units go.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// Only write the unit; do not reload, enable or start it.
    #[arg(long)]
    pub no_enable: bool,
}

/// Which engine answers.
#[cfg(feature = "node")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The in-process candle engine with continuous batching.
    Candle,
    /// Load-test engine: echoes the last user message back instantly; its
    /// answers are not model output. Only for measuring the coordinator
    /// (`sgl bench --compare-url`); never for real work.
    Echo,
}

/// `--engine`, shared by `node start` and `node serve`.
#[cfg(feature = "node")]
#[derive(Debug, Clone, Copy, Args)]
pub struct EngineSelect {
    /// The engine that answers. `echo` is a load-test engine that loads no
    /// model: it repeats the last user message back at once, so that `sgl
    /// bench` measures the coordinator rather than the model. Its answers
    /// are not model output; of the engine options it reads only --model /
    /// --served-name (the model id it answers to) and --max-batch (its slots).
    #[arg(long, value_enum, default_value = "candle")]
    pub engine: EngineKind,
    /// With `--engine echo`: milliseconds the echo engine waits before each
    /// token, to stand in for a model's decode pace in load and fault tests
    /// (0: answer at once).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub echo_token_delay_ms: u64,
    /// Echo engine only: after this many tokens, hold every job open without
    /// finishing it until it is cancelled. A stream is then certain to be
    /// mid-generation, for fault tests that kill a process mid-stream.
    #[arg(long, value_name = "TOKENS")]
    pub echo_stall_after: Option<u64>,
}

#[cfg(feature = "node")]
impl EngineSelect {
    /// The echo load-test engine for these engine options, or `None` for
    /// the candle engine. Warns in the log: whatever it serves is not model
    /// output.
    fn echo(&self, args: &EngineArgs) -> Option<sgl::node::executor::EchoExecutor> {
        match self.engine {
            EngineKind::Candle => None,
            EngineKind::Echo => {
                let name = args
                    .served_name
                    .clone()
                    .unwrap_or_else(|| args.model.clone());
                tracing::warn!(
                    model = %name,
                    "running the echo load-test engine: answers are not model output"
                );
                let slots = u32::try_from(args.max_batch).unwrap_or(u32::MAX);
                Some(
                    sgl::node::executor::EchoExecutor::new(name, slots)
                        .with_token_delay(std::time::Duration::from_millis(
                            self.echo_token_delay_ms,
                        ))
                        .stalling_after(self.echo_stall_after),
                )
            }
        }
    }
}

#[cfg(feature = "node")]
#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Coordinator base URL (default: orchestrator_url in node.json).
    #[arg(long, env = "SGL_COORDINATOR_URL")]
    pub coordinator: Option<String>,
    /// Single-use registration code from `sgl coordinator nodes invite`.
    #[arg(long, env = "SGL_REGISTRATION_CODE", hide_env_values = true)]
    pub registration_code: Option<String>,
    #[command(flatten)]
    pub engine: EngineSelect,
    #[command(flatten)]
    pub engine_args: EngineArgs,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval: u64,
    /// Seconds in-flight jobs get to finish on shutdown.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    /// Poll with heartbeats only; no WebSocket push.
    #[arg(long)]
    pub no_websocket: bool,
    /// Hardware evidence sent with each attestation: `auto` uses SEV-SNP or
    /// TDX when this machine has them (else the node self-reports), `none`
    /// never sends any, `simulated` signs with a local development key that
    /// only coordinators in --dev mode accept.
    #[arg(long, value_enum, default_value = "auto")]
    pub evidence: EvidenceMode,
}

#[cfg(feature = "node")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvidenceMode {
    Auto,
    None,
    Simulated,
}

/// The agent's evidence source for `mode` (see [`StartArgs::evidence`]).
#[cfg(feature = "node")]
fn evidence_fn(
    mode: EvidenceMode,
    dir: &std::path::Path,
) -> anyhow::Result<Option<std::sync::Arc<sgl::node::agent::EvidenceFn>>> {
    use sgl::attest::source::{best_source, SourceConfig};
    let mut cfg = SourceConfig::default();
    match mode {
        EvidenceMode::None => return Ok(None),
        EvidenceMode::Simulated => {
            cfg.simulated_key = Some(dir.join(sgl::attest::sim::KEY_FILE));
        }
        EvidenceMode::Auto => {}
    }
    let source = match best_source(&cfg) {
        Ok(s) => s,
        Err(e) if mode == EvidenceMode::Auto => {
            tracing::warn!(reason = %e, "no hardware evidence source; the node self-reports");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(source = source.kind().as_str(), "evidence source");
    let f = move |rd: &[u8; 64]| -> Result<Option<sgl::proto::api::Evidence>, String> {
        let ev = source.collect(rd).map_err(|e| e.to_string())?;
        let wire = serde_json::to_value(&ev)
            .and_then(serde_json::from_value)
            .map_err(|e| e.to_string())?;
        Ok(Some(wire))
    };
    Ok(Some(std::sync::Arc::new(f)))
}

#[derive(Debug, Args)]
pub struct RemoteArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Coordinator base URL (default: orchestrator_url in node.json).
    #[arg(long, env = "SGL_COORDINATOR_URL")]
    pub coordinator: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EarningsArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The window of the per-day and per-model totals, in UTC days (1 to 366).
    #[arg(long, default_value_t = 30)]
    pub days: u32,
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
    /// Weight format of the linear layers.
    #[arg(long, value_enum, ignore_case = true, default_value_t = sgl::engine::WeightFormat::Auto)]
    pub requant: sgl::engine::WeightFormat,
    /// Where the model runs. A service sets it with `Environment=SGL_DEVICE=cuda`.
    #[arg(long, env = "SGL_DEVICE", default_value = "cpu", value_parser = DeviceParser)]
    pub device: sgl::engine::DeviceChoice,
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
    /// CPU kernels: auto (the fastest this CPU runs), avx512, avxvnni
    /// (AVX2 with AVX-VNNI), avx2 or portable. All compute the same
    /// numbers; forcing one tests or measures it. A set the CPU lacks is
    /// refused.
    #[arg(long, env = "SGL_KERNEL", default_value = "auto", value_parser = parse_kernel)]
    pub kernel: sgl::engine::cpu::qmat::KernelChoice,
    /// MiB of KV rows kept for prompts that start the same way (a chat's
    /// system prompt and history); 0 turns prefix caching off. CPU only.
    #[arg(long, default_value_t = sgl::engine::DEFAULT_PREFIX_CACHE_MB, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub prefix_cache_mb: u64,
}

#[cfg(feature = "node")]
fn parse_kernel(s: &str) -> Result<sgl::engine::cpu::qmat::KernelChoice, String> {
    s.parse()
        .map_err(|e: sgl::engine::cpu::qmat::KernelError| e.to_string())
}

/// `--device`: `cpu`, and on a build with the `cuda` feature `cuda` (the
/// first GPU) or `cuda:N`. Not a plain `ValueEnum` since N is any ordinal,
/// and since a CUDA device on a build without CUDA deserves its reason.
#[cfg(feature = "node")]
#[derive(Debug, Clone, Copy)]
struct DeviceParser;

#[cfg(feature = "node")]
impl DeviceParser {
    fn parse(d: &str) -> Result<sgl::engine::DeviceChoice, String> {
        use sgl::engine::DeviceChoice;
        let ordinal = match d.strip_prefix("cuda") {
            _ if d == "cpu" => return Ok(DeviceChoice::Cpu),
            Some("") => 0,
            Some(n) => n
                .strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad --device {d}: a GPU is cuda or cuda:N"))?,
            None => return Err(format!("--device must be cpu, cuda or cuda:N, not {d:?}")),
        };
        if !cfg!(feature = "cuda") {
            return Err(format!(
                "--device {d}: this sgl was built without CUDA support; \
                 rebuild with `--features cuda` (README: Running on a GPU)"
            ));
        }
        Ok(DeviceChoice::Cuda(ordinal))
    }
}

#[cfg(feature = "node")]
impl clap::builder::TypedValueParser for DeviceParser {
    type Value = sgl::engine::DeviceChoice;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let parse = |d: &str| Self::parse(d);
        clap::builder::TypedValueParser::parse_ref(&parse, cmd, arg, value)
    }

    /// What `--help` lists: only what this build can run.
    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        use clap::builder::PossibleValue;
        let mut values = vec![PossibleValue::new("cpu").help("This machine's CPU")];
        if cfg!(feature = "cuda") {
            values.push(PossibleValue::new("cuda").help("The first GPU"));
            values.push(PossibleValue::new("cuda:N").help("The GPU with ordinal N"));
        }
        Some(Box::new(values.into_iter()))
    }
}

#[cfg(feature = "node")]
impl EngineArgs {
    pub fn to_config(&self) -> anyhow::Result<sgl::engine::EngineConfig> {
        use anyhow::Context;
        use sgl::engine::EngineConfig;
        // The catalogue and the cache are the node's business: the engine
        // gets a file and the id to serve it as.
        // Process-wide, as the kernels are; before the model loads, so that
        // a set this CPU lacks fails at once.
        let kernels = sgl::engine::cpu::qmat::select(self.kernel)
            .map_err(|e| anyhow::anyhow!("--kernel: {e}"))?;
        tracing::debug!(kernels = kernels.name(), "CPU kernels selected");
        let model = sgl::node::model_cache::resolve(&self.model)?;
        let id = self.served_name.clone().unwrap_or(model.id);
        let mut c = EngineConfig::new(model.path, id);
        c.weight_format = self.requant;
        c.device = self.device;
        c.max_batch = self.max_batch;
        c.max_queue = self.max_queue;
        c.prefill_chunk = self.prefill_chunk;
        c.max_context = self.max_context;
        c.prefix_cache_bytes = self.prefix_cache_mb << 20;
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
    pub engine_select: EngineSelect,
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
    #[command(flatten)]
    pub limits: super::ServerLimitArgs,
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
        NodeCommand::Start(args) => start(args),
        NodeCommand::Status(args) => remote(args, None),
        NodeCommand::Earnings(args) => earnings(args),
        NodeCommand::OffGrid(args) => remote(args, Some(true)),
        NodeCommand::OnGrid(args) => remote(args, Some(false)),
        NodeCommand::Service(cmd) => service(cmd),
        #[cfg(feature = "node")]
        NodeCommand::Serve(args) => serve(args),
    }
}

#[cfg(feature = "node")]
fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use sgl::node::local_server::Source;
    use std::io::Write;
    let source = match args.engine_select.echo(&args.engine) {
        Some(echo) => Source::Executor(std::sync::Arc::new(echo)),
        None => Source::Engine(args.engine.to_config()?),
    };
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
        sgl::node::local_server::serve(
            listener,
            source,
            args.max_body_bytes,
            args.limits.limits(),
            super::shutdown_signal(),
        )
        .await
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

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(feature = "node")]
async fn executor(
    args: &StartArgs,
) -> anyhow::Result<std::sync::Arc<dyn sgl::node::executor::Executor>> {
    use anyhow::Context;
    use sgl::node::engine_executor::EngineExecutor;
    if let Some(echo) = args.engine.echo(&args.engine_args) {
        return Ok(std::sync::Arc::new(echo));
    }
    let config = args.engine_args.to_config()?;
    let engine = tokio::task::spawn_blocking(move || sgl::engine::Engine::load(config))
        .await
        .context("loading the model")??;
    tracing::info!(model = %engine.info().id, "model loaded");
    Ok(std::sync::Arc::new(EngineExecutor::new(engine)))
}

#[cfg(feature = "node")]
fn start(args: StartArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use sgl::node::agent::{self, AgentConfig};
    let dir = args.dir.resolve()?;
    let mut config = AgentConfig::new(dir.clone());
    config.coordinator = args.coordinator.clone();
    config.registration_code = args.registration_code.clone();
    config.heartbeat_interval = std::time::Duration::from_secs(args.heartbeat_interval.max(1));
    config.drain_timeout = std::time::Duration::from_secs(args.drain_timeout);
    config.websocket = !args.no_websocket;
    let rt = runtime()?;
    rt.block_on(async {
        let executor = executor(&args).await?;
        let evidence = evidence_fn(args.evidence, &dir)?;
        agent::run(config, executor, evidence, super::shutdown_signal())
            .await
            .with_context(|| format!("node agent (config dir {})", dir.display()))
    })
}

/// A registered node as its own commands see it: the coordinator base URL
/// (without a trailing slash), the node id and its auth token.
pub(super) struct Registered {
    pub base: String,
    pub id: String,
    pub token: String,
}

/// Read node.json and name the coordinator these commands talk to.
pub(super) fn registered(args: &RemoteArgs) -> anyhow::Result<Registered> {
    let dir = args.dir.resolve()?;
    let file = identity_files::load_node_file(&dir)?;
    let base = args
        .coordinator
        .clone()
        .unwrap_or_else(|| file.orchestrator_url.clone());
    identity_files::check_coordinator_url(&base)?;
    let base = base.trim_end_matches('/').to_string();
    let (Some(id), Some(token)) = (file.node_id.clone(), file.auth_token.clone()) else {
        anyhow::bail!("this node is not registered yet; run `sgl node start` first");
    };
    Ok(Registered { base, id, token })
}

fn remote(args: RemoteArgs, off_grid: Option<bool>) -> anyhow::Result<()> {
    use anyhow::Context;
    let Registered { base, id, token } = registered(&args)?;
    let rt = runtime()?;
    let value: serde_json::Value = rt.block_on(async {
        let http = reqwest::Client::new();
        let req = match off_grid {
            None => http.get(format!("{base}{}", routes::path(routes::NODE, &id))),
            Some(off_grid) => http
                .post(format!("{base}{}", routes::path(routes::NODE_STATUS, &id)))
                .json(&StatusRequest { off_grid }),
        };
        let resp = req
            .header(headers::NODE_AUTH, &token)
            .header(headers::NODE_ID, &id)
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            anyhow::bail!("the coordinator answered {status}: {text}");
        }
        Ok::<_, anyhow::Error>(serde_json::from_str(&text)?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if let Some(off) = off_grid {
        println!(
            "node {id} is now {}",
            if off { "off-grid" } else { "on-grid" }
        );
    } else {
        println!("node id:         {id}");
        for (k, label) in [
            ("status", "status:          "),
            ("attestation_verified", "attested:        "),
            ("reputation_score", "reputation:      "),
            ("jobs_completed", "jobs completed:  "),
            ("jobs_failed", "jobs failed:     "),
        ] {
            println!("{label}{}", value.get(k).cloned().unwrap_or_default());
        }
    }
    Ok(())
}

fn earnings(args: EarningsArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use sgl::proto::api::{EarningsTotals, NodeEarningsResponse};
    let Registered { base, id, token } = registered(&args.remote)?;
    let rt = runtime()?;
    let text: String = rt.block_on(async {
        let url = format!(
            "{base}{}?days={}",
            routes::path(routes::NODE_EARNINGS, &id),
            args.days
        );
        let resp = reqwest::Client::new()
            .get(url)
            .header(headers::NODE_AUTH, &token)
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            anyhow::bail!("the coordinator answered {status}: {text}");
        }
        Ok::<_, anyhow::Error>(text)
    })?;
    let e: NodeEarningsResponse = serde_json::from_str(&text)
        .with_context(|| format!("an unexpected earnings answer: {text}"))?;
    if args.remote.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    let usd = |m: u64| sgl::money::Micros(m).to_usd_string();
    let line = |label: &str, t: &EarningsTotals| {
        println!(
            "{label:<24} {:>6} jobs  earned {:>14} USD  paid {:>14} USD  unpaid {:>14} USD",
            t.jobs,
            usd(t.earned_micro_usd),
            usd(t.paid_micro_usd),
            usd(t.unpaid_micro_usd)
        );
    };
    println!("node {} (operator wallet {})", e.node_id, e.operator_wallet);
    line("lifetime", &e.lifetime);
    line(&format!("last {} days", e.days), &e.window);
    for d in &e.by_day {
        line(&d.day, &d.totals);
    }
    for m in &e.by_model {
        line(&m.model, &m.totals);
    }
    Ok(())
}

fn service(cmd: ServiceCommand) -> anyhow::Result<()> {
    use anyhow::Context;
    use sgl::node::service;
    let bin = std::env::current_exe().context("locating this binary")?;
    match cmd {
        ServiceCommand::Print => {
            print!("{}", service::render(service::NODE_UNIT, &bin)?);
            Ok(())
        }
        ServiceCommand::Install(args) => {
            let path = service::install_node_unit(&args.unit_dir, &bin)
                .with_context(|| format!("writing the unit into {}", args.unit_dir.display()))?;
            println!("wrote {}", path.display());
            if args.no_enable {
                return Ok(());
            }
            for cmd in [
                vec!["daemon-reload"],
                vec!["enable", "--now", service::NODE_UNIT_NAME],
            ] {
                let status = std::process::Command::new("systemctl")
                    .args(&cmd)
                    .status()
                    .context("running systemctl")?;
                if !status.success() {
                    anyhow::bail!("systemctl {} failed ({status})", cmd.join(" "));
                }
            }
            println!("enabled and started {}", service::NODE_UNIT_NAME);
            Ok(())
        }
    }
}
