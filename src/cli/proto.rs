//! `sgl proto …`: self-tests of the wire protocol.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ProtoCommand {
    /// Seal a request to a node key, open it, seal and open a reply and a stream.
    Selftest,
}

pub fn run(cmd: ProtoCommand) -> anyhow::Result<()> {
    match cmd {
        ProtoCommand::Selftest => {
            println!("not yet");
            Ok(())
        }
    }
}
