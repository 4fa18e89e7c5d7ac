//! What each subcommand does, on top of the library. Errors here are
//! `anyhow` errors with context, printed by `main` as one line.

mod info;
mod model_info;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(args) => info::run(&args),
        Command::ModelInfo(args) => model_info::run(&args),
    }
}
