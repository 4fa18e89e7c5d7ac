//! Command-line flags, parsed once by clap into typed settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::{DTypeSpec, DeviceSpec};

/// Semantic-Anchor Compression: compress long documents into small, portable
/// KV files (.sack) and answer questions from them with the same base model.
#[derive(Debug, Parser)]
#[command(name = "sac", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a .sack file holds and what it costs, without reading its tensors.
    Info(InfoArgs),
    /// Show what sac sees of a model: architecture, sizes, fingerprints.
    ModelInfo(ModelInfoArgs),
}

/// Which model to run, and where.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local model directory or a Hugging Face Hub id (owner/name).
    #[arg(long, short = 'm', env = "SAC_MODEL", value_name = "DIR|HUB_ID")]
    pub model: String,

    /// Hub revision: branch, tag or commit (Hub ids only).
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,

    /// Device to run on: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value_t = DeviceSpec::Auto, value_name = "DEVICE")]
    pub device: DeviceSpec,

    /// Compute dtype: auto (f32 on CPU, bf16 on GPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto", value_name = "DTYPE")]
    pub dtype: DTypeSpec,
}

#[derive(Debug, Args)]
pub struct ModelInfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The .sack file, or `-` for standard input.
    pub file: PathBuf,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}
