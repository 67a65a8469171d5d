//! Code execution from the command line: the coordinator's switch-on flags
//! (`sgl coordinator serve --code-exec …`), the x402 discovery document it
//! serves beside it, and the client (`sgl compute run FILE`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Args, ValueEnum};
use sgl::compute::discovery::{self, Discovery, Resource};
use sgl::compute::exec::http::{CodeExec, PATH as EXEC_PATH};
use sgl::compute::exec::pricing::{ExecPricing, PriceOverride};
use sgl::compute::exec::{valid_file_name, NetworkPolicy, SandboxConfig, SandboxPool, Size};
use sgl::money::Micros;
use sgl::payments::wallet::WalletKey;
use sgl::payments::Payments;

/// `sgl coordinator serve` flags of code execution and discovery.
#[derive(Debug, Args)]
pub struct CodeExecServeArgs {
    /// Serve pay-per-request code execution (POST /api/x402/compute): Python
    /// or Node.js in a fresh bubblewrap sandbox per request, paid with x402
    /// v2 or credits. Needs billing (--pay-to and --facilitator-url, or
    /// --dev), bwrap and the interpreters; the server refuses to start
    /// without them.
    #[arg(long, env = "SGL_CODE_EXEC")]
    pub code_exec: bool,
    /// Sandboxes that run at once. Default: the number of CPU cores.
    #[arg(long, env = "SGL_CODE_EXEC_SLOTS", value_name = "N")]
    pub code_exec_slots: Option<usize>,
    /// Milliseconds a request waits for a free sandbox before 503.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_QUEUE_WAIT_MS",
        default_value_t = 2000,
        value_name = "MS"
    )]
    pub code_exec_queue_wait_ms: u64,
    /// The bubblewrap binary.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_BWRAP",
        default_value = "/usr/bin/bwrap",
        value_name = "PATH"
    )]
    pub code_exec_bwrap: PathBuf,
    /// The Python interpreter programs with `"stack": "python"` run in.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_PYTHON",
        default_value = "/usr/bin/python3",
        value_name = "PATH"
    )]
    pub code_exec_python: PathBuf,
    /// The Node.js binary programs with `"stack": "node"` run in.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_NODE",
        default_value = "/usr/bin/node",
        value_name = "PATH"
    )]
    pub code_exec_node: PathBuf,
    /// pasta (Debian's `passt`), for --code-exec-network egress.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_PASTA",
        default_value = "/usr/bin/pasta",
        value_name = "PATH"
    )]
    pub code_exec_pasta: PathBuf,
    /// iproute2's `ip`, for --code-exec-network egress (each run's network
    /// namespace and its rules).
    #[arg(
        long,
        env = "SGL_CODE_EXEC_IP",
        default_value = "/sbin/ip",
        value_name = "PATH"
    )]
    pub code_exec_ip: PathBuf,
    /// What sandboxed code may reach: `none` (no network at all) or `egress`
    /// (the internet through pasta, in a network namespace of its own per
    /// run whose rules prohibit the host's addresses, loopback, private,
    /// link-local, CGNAT, multicast and reserved ranges; DNS through the
    /// host's resolver). egress needs pasta (Debian's `passt`) and `ip`
    /// (iproute2); the server refuses to start without them.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_NETWORK",
        default_value = "none",
        value_name = "POLICY"
    )]
    pub code_exec_network: NetworkPolicy,
    /// The parent of the per-request work directories (made 0711; each run's
    /// own is 0700 and owned by the run's uid). The sandbox's uid binds its
    /// directory by path, so every directory above must be searchable by
    /// other users: not the coordinator's private data directory.
    #[arg(
        long,
        env = "SGL_CODE_EXEC_WORK_DIR",
        default_value = "/var/lib/sgl-sandboxes",
        value_name = "DIR"
    )]
    pub code_exec_work_dir: PathBuf,
    /// The first of the 65,536 unprivileged host uids the sandboxes run as
    /// (one per concurrent run; below 2^31). Coordinators sharing a host
    /// need ranges of their own: a run's leftovers are killed by uid.
    #[arg(long, env = "SGL_CODE_EXEC_UID_BASE", value_name = "UID")]
    pub code_exec_uid_base: Option<u32>,
    /// A size's price in USDC atomic units (micro-USD): SIZE=BASE[:PER_SECOND],
    /// the base covering the size's default timeout and the per-second rate
    /// each second asked for beyond it (repeatable; comma-separated in the
    /// environment). Default: small=2000:50, med=8000:120, large=30000:250.
    #[arg(
        long = "code-exec-price",
        env = "SGL_CODE_EXEC_PRICES",
        value_delimiter = ',',
        value_name = "SIZE=BASE[:PER_SECOND]"
    )]
    pub code_exec_prices: Vec<PriceOverride>,
    /// A file holding the --pay-to wallet's private key (hex): at start it
    /// signs the server's origin (EIP-191), the ownership proof that
    /// GET /.well-known/x402 publishes. Refused unless it is the --pay-to
    /// key.
    #[arg(long, env = "SGL_OWNERSHIP_KEY_FILE", value_name = "FILE")]
    pub ownership_key_file: Option<PathBuf>,
    /// A ready-made ownership proof (0x…, the pay-to wallet's EIP-191
    /// signature of the --public-url origin), for servers that do not hold
    /// the key (repeatable; comma-separated in the environment). Each is
    /// checked at start.
    #[arg(
        long = "ownership-proof",
        env = "SGL_OWNERSHIP_PROOFS",
        value_delimiter = ',',
        value_name = "SIGNATURE"
    )]
    pub ownership_proofs: Vec<String>,
}

/// The code-execution service over `payments`, when --code-exec is on: its
/// sandbox pool checked (tools present, work root private), its prices.
#[cfg_attr(not(feature = "coordinator"), allow(dead_code))]
pub fn code_exec(
    args: &CodeExecServeArgs,
    payments: Option<&Payments>,
) -> anyhow::Result<Option<CodeExec>> {
    if !args.code_exec {
        return Ok(None);
    }
    let Some(payments) = payments else {
        bail!(
            "--code-exec needs billing: a database with --pay-to and --facilitator-url \
             (or --dev), not --in-memory or --no-billing"
        );
    };
    let mut cfg = SandboxConfig::new(&args.code_exec_work_dir);
    cfg.bwrap = args.code_exec_bwrap.clone();
    cfg.python = args.code_exec_python.clone();
    cfg.node = args.code_exec_node.clone();
    cfg.pasta = args.code_exec_pasta.clone();
    cfg.ip = args.code_exec_ip.clone();
    cfg.network = args.code_exec_network;
    if let Some(n) = args.code_exec_slots {
        if n == 0 {
            bail!("--code-exec-slots must be at least 1");
        }
        cfg.slots = n;
    }
    cfg.queue_wait = Duration::from_millis(args.code_exec_queue_wait_ms);
    if let Some(u) = args.code_exec_uid_base {
        cfg.uid_base = u;
    }
    let pool = SandboxPool::new(cfg).map_err(|e| {
        anyhow::anyhow!(
            "--code-exec: the sandbox cannot start: {e} (install bubblewrap, python3 and \
             nodejs (and passt and iproute2 for --code-exec-network egress), or point \
             --code-exec-bwrap/--code-exec-python/--code-exec-node/--code-exec-pasta/--code-exec-ip \
             at them)"
        )
    })?;
    let pricing = ExecPricing::with_overrides(&args.code_exec_prices);
    Ok(Some(CodeExec::new(pool, payments.clone(), pricing)))
}

/// The x402 discovery document of this server: the paid resources it
/// serves (grid chat; Machines provisioning and code execution when they
/// are on) and the ownership proofs of its origin.
#[cfg_attr(not(feature = "coordinator"), allow(dead_code))]
pub fn discovery_doc(
    args: &CodeExecServeArgs,
    payments: &Payments,
    public_url: &str,
    machines: bool,
    exec: Option<&CodeExec>,
) -> anyhow::Result<Discovery> {
    let origin = discovery::origin(public_url).context("--public-url")?;
    let base = public_url.trim_end_matches('/');
    let pay_to = payments.config().pay_to;
    let mut proofs = Vec::new();
    if let Some(path) = &args.ownership_key_file {
        let key = WalletKey::load(path).context("--ownership-key-file")?;
        if key.address() != pay_to {
            bail!(
                "--ownership-key-file holds the key of {}, not of the pay-to wallet {}",
                sgl::payments::evm::lower(&key.address()),
                sgl::payments::evm::lower(&pay_to)
            );
        }
        proofs.push(discovery::ownership_proof(&key, &origin));
    }
    for p in &args.ownership_proofs {
        discovery::check_proof(p.trim(), &origin, &pay_to).context("--ownership-proof")?;
        proofs.push(p.trim().to_owned());
    }
    let mut resources = Vec::new();
    if let Some(x) = exec {
        let small = x.pricing().price(Size::Small);
        resources.push(Resource {
            url: format!("{base}{EXEC_PATH}"),
            method: "POST",
            about: format!(
                "Run a Python or Node.js program in a fresh sandbox. Body: \
                 `{{\"stack\": \"python\"|\"node\", \"size\": \"small\"|\"med\"|\"large\", \
                 \"timeout_seconds\": N, \"code\": \"…\", \"files\": {{\"name\": \"<base64>\"}}}}`; \
                 answer: `{{stdout, stderr, exit_code, execution_time_ms, files, stack, size, \
                 sandbox_id}}`. From {} USD (small) plus a per-second rate beyond the default \
                 timeout; the 402 quotes the exact amount and carries the `bazaar` extension \
                 with the request and response schemas. Charged only for a program that ran \
                 to its end (any exit code); 408, 413, 400 and 503 cost nothing.",
                small.base.to_usd_string()
            ),
        });
    }
    resources.push(Resource {
        url: format!("{base}{}", sgl::proto::routes::CHAT_COMPLETIONS),
        method: "POST",
        about: "OpenAI-compatible chat completions served by attested grid nodes; the \
                402 quotes the request's maximum cost."
            .into(),
    });
    if machines {
        resources.push(Resource {
            url: format!("{base}/compute/provision"),
            method: "POST",
            about: "Rent a virtual machine for prepaid hours (plans at GET /compute/plans, \
                    regions at GET /compute/regions, images at GET /compute/os)."
                .into(),
        });
    }
    Ok(Discovery {
        origin,
        resources,
        ownership_proofs: proofs,
        service_name: "sgl compute and inference".into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pay {
    /// An x402 v2 payment from --wallet-key-file.
    X402,
    /// Prepaid credits: --api-key, or an X-Auth signature from
    /// --wallet-key-file.
    Credits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StackArg {
    Python,
    Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SizeArg {
    Small,
    Med,
    Large,
}

/// `sgl compute run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The program to run.
    #[arg(value_name = "FILE")]
    pub program: PathBuf,
    #[arg(long, value_enum, default_value = "python")]
    pub stack: StackArg,
    #[arg(long, value_enum, default_value = "small")]
    pub size: SizeArg,
    /// Seconds the program may run (clamped to the size's maximum; longer
    /// than the size's default costs more).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// An input file placed in the program's work directory (repeatable).
    #[arg(long = "file", value_name = "NAME=PATH")]
    pub inputs: Vec<String>,
    /// Write the files the program created or changed here.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// How to pay.
    #[arg(long, value_enum, default_value = "x402")]
    pub pay: Pay,
    /// The most one run may cost with x402, in USD.
    #[arg(long, default_value = "0.05", value_name = "USD")]
    pub max_payment: String,
}

/// The request body of a run.
fn run_body(a: &RunArgs) -> anyhow::Result<serde_json::Value> {
    let code = std::fs::read_to_string(&a.program)
        .with_context(|| format!("reading {}", a.program.display()))?;
    let mut files = serde_json::Map::new();
    for f in &a.inputs {
        let Some((name, path)) = f.split_once('=') else {
            bail!("--file {f:?}: expected NAME=PATH");
        };
        if !valid_file_name(name) {
            bail!("--file {f:?}: {name:?} is not an accepted file name (a relative path without '..')");
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        files.insert(name.to_owned(), STANDARD.encode(bytes).into());
    }
    let stack = match a.stack {
        StackArg::Python => "python",
        StackArg::Node => "node",
    };
    let size = match a.size {
        SizeArg::Small => "small",
        SizeArg::Med => "med",
        SizeArg::Large => "large",
    };
    let mut body = serde_json::json!({"stack": stack, "size": size, "code": code, "files": files});
    if let Some(t) = a.timeout {
        body["timeout_seconds"] = t.into();
    }
    Ok(body)
}

/// Write the returned files under `dir`, refusing names that would leave it.
fn write_outputs(
    dir: &Path,
    files: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    for (name, b64) in files {
        if !valid_file_name(name) {
            bail!("the server returned a file named {name:?}; not written");
        }
        let bytes = b64
            .as_str()
            .and_then(|s| STANDARD.decode(s).ok())
            .with_context(|| format!("the returned file {name} is not base64"))?;
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The exit status a run's exit code becomes (a shell's 0–255).
fn exit_status(code: i64) -> i32 {
    match i32::try_from(code.rem_euclid(256)) {
        // A failure must not read as success once cut to eight bits.
        Ok(0) if code != 0 => 1,
        Ok(s) => s,
        Err(_) => 1,
    }
}

/// Run a program on the coordinator at `base`; exits the process with the
/// program's exit status.
pub fn run(
    base: &str,
    api_key: Option<&str>,
    wallet_key_file: Option<&Path>,
    json: bool,
    a: &RunArgs,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&run_body(a)?)?;
    let cap = Micros::parse_usd(&a.max_payment)
        .with_context(|| format!("--max-payment {:?} is not a USD amount", a.max_payment))?;
    let wallet = wallet_key_file
        .map(WalletKey::load)
        .transpose()
        .context("--wallet-key-file")?;
    if a.pay == Pay::Credits && api_key.is_none() && wallet.is_none() {
        bail!("--pay credits needs --api-key or --wallet-key-file");
    }
    if a.pay == Pay::X402 && wallet.is_none() {
        bail!("paying with x402 needs --wallet-key-file (or --pay credits)");
    }
    let url = format!("{}{EXEC_PATH}", base.trim_end_matches('/'));
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let (status, v) = rt.block_on(async {
        let http = reqwest::Client::builder()
            // Up to an hour of run time on large, plus the upload.
            .timeout(Duration::from_secs(3_900))
            .build()?;
        let send = |extra: Vec<(String, String)>| {
            let mut req = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            for (n, v) in extra {
                req = req.header(n, v);
            }
            req.send()
        };
        let mut headers: Vec<(String, String)> = Vec::new();
        if a.pay == Pay::Credits {
            if let Some(k) = api_key {
                headers.push(("x-api-key".into(), k.to_owned()));
            } else if let Some(w) = &wallet {
                let now_ms = i64::try_from(unix_now()).unwrap_or(0).saturating_mul(1000);
                for (n, v) in w.xauth_headers("POST", EXEC_PATH, &body, now_ms) {
                    headers.push((n.into(), v));
                }
            }
        }
        let mut resp = send(headers).await.context("calling the coordinator")?;
        if resp.status() == reqwest::StatusCode::PAYMENT_REQUIRED && a.pay == Pay::X402 {
            let required = resp
                .headers()
                .get("payment-required")
                .and_then(|v| v.to_str().ok())
                .context("the 402 carries no PAYMENT-REQUIRED header")?
                .to_owned();
            let w = wallet.as_ref().context("no wallet key")?;
            let (sig, _paid) = w.pay_x402(&required, cap, unix_now())?;
            resp = send(vec![("payment-signature".into(), sig)])
                .await
                .context("calling the coordinator")?;
        }
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        anyhow::Ok((status, v))
    })?;
    if status == reqwest::StatusCode::REQUEST_TIMEOUT {
        eprintln!(
            "sgl compute run: {} (nothing was charged)",
            v["error"]["message"]
                .as_str()
                .unwrap_or("the program timed out")
        );
        std::process::exit(124);
    }
    if !status.is_success() {
        if v["error"]["code"] == "insufficient_credits" {
            bail!(
                "insufficient credits: {} USD short",
                v["shortfall"].as_str().unwrap_or("?")
            );
        }
        let msg = v["error"]["message"]
            .as_str()
            .or_else(|| v["error"].as_str())
            .unwrap_or("request failed");
        let code = v["error"]["code"].as_str().unwrap_or("");
        bail!("{status}: {msg} ({code})");
    }
    if let Some(dir) = &a.out_dir {
        if let Some(files) = v["files"].as_object() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            write_outputs(dir, files)?;
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    } else {
        out.write_all(v["stdout"].as_str().unwrap_or("").as_bytes())?;
        let mut err = std::io::stderr().lock();
        err.write_all(v["stderr"].as_str().unwrap_or("").as_bytes())?;
        err.flush()?;
    }
    out.flush()?;
    let code = v["exit_code"].as_i64().unwrap_or(1);
    if code != 0 {
        std::process::exit(exit_status(code));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(3), 3);
        assert_eq!(exit_status(137), 137);
        assert_eq!(exit_status(256), 1);
        assert_eq!(exit_status(-1), 255);
    }
}
