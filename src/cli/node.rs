//! `sgl node …`: identity and serving.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Create the node identity and configuration.
    Init,
}

pub fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Init => Ok(()),
    }
}
