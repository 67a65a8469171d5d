//! `sgl price …`: a node's custom prices on its coordinator (PROTOCOL.md §5.8).
//! Reads node.json like `sgl node status` and authenticates with the node's
//! token (`X-Node-Auth`).

use anyhow::Context;
use clap::{Args, Subcommand};
use sgl::money::MicrosPerM;
use sgl::proto::api::{NodePricesResponse, SetPriceRequest};
use sgl::proto::{headers, routes};

use super::node::{registered, runtime, Registered, RemoteArgs};

#[derive(Debug, Subcommand)]
pub enum PriceCommand {
    /// Show the reference, band, custom and effective price of each model the
    /// node advertises (USD per 1M tokens).
    Show(RemoteArgs),
    /// Set a custom price for one model; it must lie within
    /// [reference × 0.5, reference × 5], and a cooldown applies between changes.
    Set(SetArgs),
    /// Drop a model's custom price: the reference price applies again.
    Reset(ResetArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The model, as the node advertises it.
    #[arg(long)]
    pub model: String,
    /// USD per 1M input tokens.
    #[arg(long, value_name = "USD", value_parser = usd_per_m)]
    pub input_per_m: MicrosPerM,
    /// USD per 1M output tokens.
    #[arg(long, value_name = "USD", value_parser = usd_per_m)]
    pub output_per_m: MicrosPerM,
}

/// A price argument, read as the coordinator reads it (to the nearest
/// micro-USD per 1M tokens).
fn usd_per_m(s: &str) -> Result<MicrosPerM, String> {
    MicrosPerM::parse_usd(s.trim())
        .ok_or_else(|| format!("{s:?} is not a non-negative USD amount (at most 1000)"))
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The model, as the node advertises it.
    #[arg(long)]
    pub model: String,
}

pub fn run(cmd: PriceCommand) -> anyhow::Result<()> {
    match cmd {
        PriceCommand::Show(args) => show(&args),
        PriceCommand::Set(a) => {
            let body = SetPriceRequest {
                model: a.model.clone(),
                input_per_m: Some(a.input_per_m.usd()),
                output_per_m: Some(a.output_per_m.usd()),
                reset: None,
            };
            change(&a.remote, &body)
        }
        PriceCommand::Reset(a) => {
            let body = SetPriceRequest {
                model: a.model.clone(),
                input_per_m: None,
                output_per_m: None,
                reset: Some(true),
            };
            change(&a.remote, &body)
        }
    }
}

fn call(r: &Registered, body: Option<&SetPriceRequest>) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{}", r.base, routes::path(routes::NODE_PRICES, &r.id));
    runtime()?.block_on(async {
        let http = reqwest::Client::new();
        let req = match body {
            None => http.get(&url),
            Some(b) => http.post(&url).json(b),
        };
        let resp = req
            .header(headers::NODE_AUTH, &r.token)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", r.base))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .context("reading the coordinator's answer")?;
        if !status.is_success() {
            anyhow::bail!("the coordinator answered {status}: {text}");
        }
        serde_json::from_str(&text).context("the coordinator's answer is not JSON")
    })
}

fn show(args: &RemoteArgs) -> anyhow::Result<()> {
    let r = registered(args)?;
    let value = call(&r, None)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let prices: NodePricesResponse =
        serde_json::from_value(value).context("unexpected prices answer")?;
    println!(
        "node {}  (USD per 1M tokens, input / output)",
        prices.node_id
    );
    if prices.prices.is_empty() {
        println!("no models advertised yet");
    }
    for p in &prices.prices {
        let custom = match &p.custom {
            Some(c) => format!("{} / {}", c.input_per_m, c.output_per_m),
            None => "none".to_string(),
        };
        println!("{}", p.model);
        println!(
            "  effective: {} / {}",
            p.effective.input_per_m, p.effective.output_per_m
        );
        println!("  custom:    {custom}");
        println!(
            "  reference: {} / {}  (allowed {} / {} to {} / {})",
            p.reference.input_per_m,
            p.reference.output_per_m,
            p.floor.input_per_m,
            p.floor.output_per_m,
            p.ceiling.input_per_m,
            p.ceiling.output_per_m
        );
        if let Some(until) = &p.cooldown_until {
            println!("  next change allowed after {until}");
        }
    }
    Ok(())
}

fn change(args: &RemoteArgs, body: &SetPriceRequest) -> anyhow::Result<()> {
    let r = registered(args)?;
    let value = call(&r, Some(body))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let eff = &value["price"]["effective"];
    println!(
        "{}: effective price now {} / {} USD per 1M tokens (input / output)",
        body.model, eff["inputPerM"], eff["outputPerM"]
    );
    Ok(())
}
