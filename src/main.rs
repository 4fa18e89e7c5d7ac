//! `sac`: compress long documents into portable KV files for LLMs.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sac::sack::{InfoFormat, SackReader, info};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a .sack file holds and what it costs, without reading its tensors.
    Info {
        /// The .sack file, or `-` for standard input.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Info { file, json } => {
            let format = if json {
                InfoFormat::Json
            } else {
                InfoFormat::Human
            };
            let mut out = std::io::stdout().lock();
            if file.as_os_str() == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .context("reading standard input")?;
                info::render(&SackReader::from_bytes(bytes, "<stdin>")?, &mut out, format)?;
            } else {
                info::render(&SackReader::open(&file)?, &mut out, format)?;
            }
            out.flush().context("writing standard output")?;
        }
    }
    Ok(())
}
