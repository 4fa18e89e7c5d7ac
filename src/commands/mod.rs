//! What each subcommand does, on top of the library. Errors here are
//! `anyhow` errors with context, printed by `main` as one line.

mod adapter_import;
mod advice;
mod ask;
mod compress;
mod info;
mod model_info;
mod repl;
mod train;

use std::io::Write;

use crate::cli::{AdapterCommand, Cli, Command};

/// Runs the parsed command line; a library error a flag can fix names it.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    command(cli).map_err(advice::advise)
}

fn command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compress(args) => compress::run(&args),
        Command::Ask(args) => ask::run(&args),
        Command::Info(args) => info::run(&args),
        Command::ModelInfo(args) => model_info::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Adapter(AdapterCommand::Import(args)) => adapter_import::run(&args),
        Command::Completions { shell } => {
            // clap_complete panics on a write error; a closed pipe
            // (`sac completions bash | head`) must end quietly instead.
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "sac", &mut script);
            print(&script)
        }
        Command::Man => print(&crate::cli::man_page()?),
    }
}

fn print(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}
