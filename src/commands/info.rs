//! `sac info`: describe a .sack from its header and directory alone.

use std::io::{Read, Write};

use anyhow::Context;

use crate::cli::InfoArgs;
use sac::sack::{InfoFormat, SackReader, info};

pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let format = if args.json {
        InfoFormat::Json
    } else {
        InfoFormat::Human
    };
    let mut out = std::io::stdout().lock();
    if args.file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
        info::render(&SackReader::from_bytes(bytes, "<stdin>")?, &mut out, format)?;
    } else {
        info::render(&SackReader::open(&args.file)?, &mut out, format)?;
    }
    out.flush().context("cannot write standard output")?;
    Ok(())
}
