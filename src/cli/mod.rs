//! Command-line flags, parsed once by clap into typed settings.

use std::path::PathBuf;

mod man;
mod values;

use clap::{Args, Parser, Subcommand};

pub use man::man_page;
use sac::compress::HeadBudget;
use sac::device::{DTypeSpec, DeviceSpec, Workload};
use sac::model::LoraTarget;
use sac::runtime::ModelSpec;
use sac::sack::KvEncoding;
use sac::train::{Length, PretrainWindow, Stage, TrainMethod, TrainSettings};
use values::{
    CompressorPick, HEAD_BUDGETS, KV_ENCODINGS, PROMPTS, PromptPick, STAGES, TRAIN_METHODS,
    choices, compressor, non_negative, positive, probability, ratio,
};

/// Semantic-Anchor Compression: compress long documents into small, portable
/// KV files (.sack) and answer questions from them with the same base model.
#[derive(Debug, Parser)]
#[command(name = "sac", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compress a text file into a .sack holding its anchor K/V.
    Compress(CompressArgs),
    /// Answer questions about a compressed document: one-shot, batch or REPL.
    Ask(AskArgs),
    /// Show what a .sack file holds and what it costs, without reading its tensors.
    Info(InfoArgs),
    /// Show what sac sees of a model: architecture, sizes, fingerprints.
    ModelInfo(ModelInfoArgs),
    /// Train a compressor's adapter with the base model frozen: SAC's (role
    /// embeddings, [LM], LoRA) or GMSA's (encoder LoRA, alignment block).
    ///
    /// The loss is next-token cross-entropy through the frozen decoder reading
    /// the compressed context as `sac ask` does. Checkpoints, the adapter
    /// (adapter.safetensors, adapter_config.json) and log.jsonl go to --out;
    /// --resume continues an interrupted run exactly.
    Train(Box<TrainArgs>),
    /// Work with SAC adapters.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff, as installed in man/sac.1) to standard output.
    Man,
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Convert the reference implementation's adapter.pt into an adapter directory.
    Import(AdapterImportArgs),
}

#[derive(Debug, Args)]
pub struct AdapterImportArgs {
    /// The PyTorch state dict (role_tokens, special_tokens, LoRA A/B of q/v, or also k/o).
    #[arg(value_name = "ADAPTER.pt")]
    pub pt: PathBuf,

    /// The adapter directory to write.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Tokens per chunk the adapter was trained with.
    #[arg(long, default_value_t = 510, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_size: u32,

    /// Compression ratio. Default: derived from the number of role embeddings.
    #[arg(long, value_parser = ratio)]
    pub ratio: Option<u32>,

    /// LoRA scale (alpha / rank); the reference uses 2.
    #[arg(long, default_value_t = 2.0)]
    pub lora_scale: f64,
}

/// Which model to run, and where.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local model directory, a llama.cpp .gguf file (or a directory
    /// holding one), or a Hugging Face Hub id (owner/name).
    #[arg(
        long,
        short = 'm',
        env = "SAC_MODEL",
        value_name = "DIR|FILE.gguf|HUB_ID"
    )]
    pub model: String,

    #[command(flatten)]
    pub placement: Placement,
}

/// Hub revision, device and dtype: how a model is fetched and run.
#[derive(Debug, Clone, Args)]
pub struct Placement {
    /// Hub revision: branch, tag or commit (Hub ids only).
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,

    /// The GGUF file to use in a Hub repository of GGUF files (Hub ids only),
    /// e.g. SmolLM2-135M-Instruct.Q4_1.gguf.
    #[arg(long, value_name = "NAME")]
    pub gguf_file: Option<String>,

    /// Device to run on: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value_t = DeviceSpec::Auto, value_name = "DEVICE")]
    pub device: DeviceSpec,

    /// Compute dtype: auto (bf16 on a GPU; f32 on a CPU, with bf16 weights
    /// where it has AVX512-BF16), f32, bf16 or f16.
    #[arg(long, default_value = "auto", value_name = "DTYPE")]
    pub dtype: DTypeSpec,
}

impl ModelArgs {
    pub fn spec(&self) -> ModelSpec {
        self.placement.spec(&self.model)
    }
}

impl Placement {
    /// The spec of `model` placed as these flags say.
    pub fn spec(&self, model: &str) -> ModelSpec {
        ModelSpec {
            model: model.to_string(),
            revision: self.revision.clone(),
            gguf_file: self.gguf_file.clone(),
            device: self.device,
            dtype: self.dtype,
            workload: Workload::Inference,
        }
    }
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

#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The text file to compress, or `-` for standard input.
    #[arg(value_name = "FILE|-")]
    pub input: PathBuf,

    /// Where to write the .sack (`-` for standard output). Default: FILE with
    /// its extension replaced by .sack, or standard output when reading `-`.
    #[arg(long, short = 'o', value_name = "OUT")]
    pub output: Option<PathBuf>,

    /// Base model: a directory, a .gguf file or a Hub id. Default: the
    /// adapter's base model.
    #[arg(
        long,
        short = 'm',
        env = "SAC_MODEL",
        value_name = "DIR|FILE.gguf|HUB_ID"
    )]
    pub model: Option<String>,

    #[command(flatten)]
    pub placement: Placement,

    /// Adapter directory of a trained compressor, sac or gmsa
    /// (adapter.safetensors + adapter_config.json).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Which compressor to run.
    #[arg(long, default_value = "auto", value_parser = compressor())]
    pub compressor: CompressorPick,

    /// Document tokens per kept token. Default: the adapter's, else 5.
    #[arg(long, value_parser = ratio)]
    pub ratio: Option<u32>,

    /// Tokens per chunk. Default: the adapter's, else 510.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_size: Option<u32>,

    /// Training-free compressors keep the document's first N tokens (the
    /// attention sinks; `uniform`: each chunk's); 0 keeps none, as the SAC
    /// reference's `uniform` does. Default: 4.
    #[arg(long, value_name = "N")]
    pub sinks: Option<u32>,

    /// How `kvzip` and `snapkv` spread the kept tokens over layers and KV
    /// heads. Default: shared for kvzip, even for snapkv.
    #[arg(long, value_parser = choices(HEAD_BUDGETS))]
    pub head_budget: Option<HeadBudget>,

    /// How the document and the questions are laid out for the model; the
    /// .sack records it, so `ask` frames questions the same way.
    #[arg(long, default_value = "auto", value_parser = choices(PROMPTS))]
    pub prompt: PromptPick,

    /// Storage precision of the kept K/V.
    #[arg(long, default_value = "bf16", value_parser = choices(KV_ENCODINGS))]
    pub kv_encoding: KvEncoding,

    /// zstd level for every tensor (1-19); 0 stores them uncompressed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub zstd_level: i32,

    /// A name for the document in the header. Default: the file name.
    #[arg(long)]
    pub name: Option<String>,

    /// No progress bar or summary on standard error.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The .sack file, or `-` for standard input.
    #[arg(value_name = "FILE.sack|-")]
    pub sack: PathBuf,

    /// Questions to answer, one after the other. None on a terminal opens the REPL.
    #[arg(value_name = "QUESTION")]
    pub questions: Vec<String>,

    /// Base model. Default: the one named in the .sack header, if it is in
    /// the local Hugging Face cache at the revision the .sack was made with,
    /// or a directory or .gguf file you have loaded with sac before; see
    /// --allow-download.
    #[arg(
        long,
        short = 'm',
        env = "SAC_MODEL",
        value_name = "DIR|FILE.gguf|HUB_ID"
    )]
    pub model: Option<String>,

    #[command(flatten)]
    pub placement: Placement,

    /// The adapter directory a .sack made with a GMSA adapter whose decoder
    /// was fine-tuned (stage 2) is answered with; `sac info` names it. It
    /// must be that adapter (its fingerprint is checked).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub temperature: f64,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (0 < P <= 1).
    #[arg(long, value_name = "P", value_parser = probability)]
    pub top_p: Option<f64>,

    /// Seed for sampling.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,

    /// End each answer where this text appears (repeatable). Answers also
    /// end at the model's end-of-sequence ids and, from a .sack in the raw
    /// layout made without a SAC adapter, at a new "###" line.
    #[arg(long, value_name = "STRING")]
    pub stop: Vec<String>,

    /// Print one JSON object per answer.
    #[arg(long)]
    pub json: bool,

    /// Read questions from FILE (or `-`), one per line or as JSON lines
    /// {"id": ..., "question": ...}; write JSON lines.
    #[arg(long, value_name = "FILE|-", conflicts_with = "questions")]
    pub batch: Option<PathBuf>,

    /// With --batch or --json, how many questions are decoded together (one
    /// forward pass per step for all of them).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch_size: u32,

    /// Answer even if the model's fingerprint differs from the one in the
    /// .sack (with a warning on standard error).
    #[arg(long)]
    pub force: bool,

    /// Without --model, let the Hub model the .sack names be downloaded when
    /// the local Hugging Face cache lacks it. Without this flag a .sack never
    /// causes a download: its model comes from the cache, or from a directory
    /// you have loaded yourself with sac on this machine.
    #[arg(long)]
    pub allow_download: bool,
}

/// The flags of `sac train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Training rows, as JSON lines: {"text"} to pretrain or autoencode,
    /// {"context", "question", "answer"} for qa.
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: PathBuf,

    /// Questions scored (exact match, F1) at every checkpoint: JSON lines
    /// {"context", "question", "answer"}, the answer a string or a list.
    #[arg(long, value_name = "FILE.jsonl")]
    pub eval: Option<PathBuf>,

    /// The adapter directory to write: adapter.safetensors and
    /// adapter_config.json (for compress --adapter), checkpoint.safetensors, log.jsonl.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,

    /// The compressor to train.
    #[arg(long, default_value = "sac", value_parser = choices(TRAIN_METHODS))]
    pub method: TrainMethod,

    /// What the decoder learns. Default: pretrain for sac, autoencode for
    /// gmsa. gmsa's qa (its second stage) fine-tunes the decoder as a LoRA,
    /// the compressor of the --init adapter frozen.
    #[arg(long, value_parser = choices(STAGES))]
    pub stage: Option<Stage>,

    /// Start from this adapter (e.g. qa after pretrain) instead of a fresh one.
    #[arg(long, value_name = "ADAPTER_DIR")]
    pub init: Option<PathBuf>,

    /// Accept an --init adapter made for another model of the same shape (an
    /// earlier checkpoint of this one, say): it only starts the run, and the
    /// new adapter is stamped with this model's fingerprint.
    #[arg(long, requires = "init")]
    pub init_any_model: bool,

    /// Document tokens per anchor (sac) or per soft token (gmsa's merge
    /// size). Default: the --init adapter's, else 5 (sac) or 4 (gmsa). An
    /// --init adapter at another ratio seeds this one: each anchor starts
    /// from the role embedding of its nearest anchor there.
    #[arg(long, value_parser = ratio)]
    pub ratio: Option<u32>,

    /// Tokens per chunk (sac). Default: the --init adapter's, else 510.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_size: Option<u32>,

    /// LoRA rank (for gmsa's qa stage, the decoder's). Default: the --init
    /// adapter's, else 128 (16 for gmsa's decoder).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub lora_rank: Option<u32>,

    /// Projections LoRA adapts, comma-separated: sac's attention
    /// projections, gmsa's any linear layer (its encoder's, or in the qa
    /// stage its decoder's). Default: the --init adapter's, else
    /// q_proj,v_proj for sac (the paper's), all seven for gmsa.
    #[arg(
        long,
        value_name = "PROJ,...",
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(LoraTarget::ALL.map(LoraTarget::name)),
    )]
    pub lora_targets: Option<Vec<String>>,

    /// Gmsa: layers of the base model the encoder runs. Default: the --init
    /// adapter's, else 8.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub encoder_layers: Option<u32>,

    /// Gmsa: layers of the alignment block, copies of the base model's first
    /// layers. Default: the --init adapter's, else 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub lsa_layers: Option<u32>,

    /// Peak learning rate. Default: 1e-4 for pretrain and autoencode, 5e-5
    /// for qa (the papers').
    #[arg(long, value_parser = positive)]
    pub lr: Option<f64>,

    /// Steps of linear warmup before the cosine decay. Default: 3% of the steps.
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<u32>,

    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub weight_decay: f64,

    /// Clip the gradients to this global L2 norm.
    #[arg(long, default_value_t = 2.0, value_parser = positive)]
    pub max_grad_norm: f64,

    /// Samples per backward pass (run one after another, summed into one loss).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,

    /// Backward passes per optimizer step; a step sees --batch x --grad-accum samples.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub grad_accum: u32,

    /// Optimizer steps in the run.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: Option<u32>,

    /// Passes over the data (default 1 unless --steps is given).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: Option<u32>,

    /// Write a checkpoint and the adapter (and evaluate) every N steps, and at the end.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub save_every: u32,

    /// End this run after step N, keeping the schedule of --steps/--epochs;
    /// continue later with --resume.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub stop_after: Option<u32>,

    /// Continue the run whose checkpoint is in --out (same data and settings).
    #[arg(long)]
    pub resume: bool,

    /// Seed for the initialisation, the data order and the pretraining context lengths.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Pretrain: fewest context tokens before the continuation.
    #[arg(long, value_name = "N", default_value_t = 510, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_context: u32,

    /// Pretrain: most context tokens before the continuation. Autoencode:
    /// longest text restated (longer ones are skipped).
    #[arg(long, value_name = "N", default_value_t = 2040, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_context: u32,

    /// Pretrain: most continuation tokens the decoder predicts.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub continuation: u32,

    /// Most tokens generated per evaluation answer.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub eval_max_tokens: u32,

    /// No progress bar or summary on standard error.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl TrainArgs {
    /// The run's settings; errors name the flags at fault, in one line.
    pub fn settings(&self) -> Result<TrainSettings, String> {
        let length = match (self.steps, self.epochs) {
            (Some(_), Some(_)) => return Err("give --steps or --epochs, not both".into()),
            (Some(n), None) => Length::Steps(n as usize),
            (None, n) => Length::Epochs(n.unwrap_or(1) as usize),
        };
        if self.min_context > self.max_context {
            return Err(format!(
                "--min-context {} exceeds --max-context {}",
                self.min_context, self.max_context
            ));
        }
        let method = self.method;
        let stage = self.stage.unwrap_or(method.stages()[0]);
        let size = |v: Option<u32>| v.map(|n| n as usize);
        Ok(TrainSettings {
            method,
            stage,
            data: self.data.clone(),
            eval: self.eval.clone(),
            out: self.out.clone(),
            init: self.init.clone(),
            init_any_model: self.init_any_model,
            ratio: size(self.ratio),
            chunk_size: size(self.chunk_size),
            lora_rank: size(self.lora_rank),
            lora_targets: self.lora_targets.as_deref().map(LoraTarget::from_names),
            encoder_layers: size(self.encoder_layers),
            lsa_layers: size(self.lsa_layers),
            lr: self.lr.unwrap_or(match stage {
                Stage::Pretrain | Stage::Autoencode => 1e-4,
                Stage::Qa => 5e-5,
            }),
            warmup_steps: size(self.warmup_steps),
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            batch: self.batch as usize,
            grad_accum: self.grad_accum as usize,
            length,
            save_every: self.save_every as usize,
            stop_after: size(self.stop_after),
            resume: self.resume,
            seed: self.seed,
            window: PretrainWindow {
                min_context: self.min_context as usize,
                max_context: self.max_context as usize,
                continuation: self.continuation as usize,
            },
            eval_max_tokens: self.eval_max_tokens as usize,
        })
    }
}
