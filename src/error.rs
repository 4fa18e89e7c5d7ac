//! The library's error type. Every variant renders as one line that says what
//! failed and, where a file is involved, which one.

use std::path::PathBuf;

/// Errors raised by the `sac` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named file failed. The cause is the error's
    /// source, not part of this message, so that a chain printed whole
    /// (`{:#}`) names it once.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Compressor settings that do not fit together.
    #[error(transparent)]
    Settings(#[from] crate::compress::SettingsError),

    /// A training run that cannot start as asked.
    #[error(transparent)]
    Setup(#[from] crate::train::SetupError),

    /// A Hub revision or GGUF file name given with a local model.
    #[error("a revision and a GGUF file name apply to Hub ids, and `{0}` is a local model")]
    HubOptionsForLocalModel(String),

    /// A reference checkpoint whose anchor count no ratio gives.
    #[error("{}: no ratio gives {mem_size} anchors per {chunk_size}-token chunk; give the ratio", path.display())]
    UnknownRatio {
        path: PathBuf,
        mem_size: usize,
        chunk_size: usize,
    },

    /// Training diverged.
    #[error("the gradient norm is {norm}; the loss diverged (try a lower learning rate)")]
    Diverged { norm: f64 },

    /// No pretraining text is longer than the minimum context.
    #[error("{}: no text is long enough to pretrain on: each needs more than {min_context} tokens", path.display())]
    NothingToPretrain { path: PathBuf, min_context: usize },

    /// A CUDA device asked of a build without CUDA.
    #[error("this sac was built without CUDA; rebuild with `--features cuda` or run on the CPU")]
    NoCuda,

    /// A model directory or Hub snapshot lacks a file we need.
    #[error("{0}")]
    MissingModelFile(String),

    /// A Hub id or revision that is not a Hub name (a path, `..`, odd characters).
    #[error("{0}")]
    ModelName(String),

    /// A Hub model that may only come from the local cache is not all there.
    #[error(
        "`{file}` of {id} (revision {revision}) is not in the Hugging Face cache {}",
        cache.display()
    )]
    NotCached {
        id: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },

    /// A .sack names a local model directory that the user has not loaded
    /// from the command line on this machine.
    #[error("the local model {0:?}, which sac loads only when named on its command line")]
    UnknownLocalModel(String),

    /// `config.json` is malformed or describes something we cannot run.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A weight tensor is absent or has the wrong shape.
    #[error("weights: {0}")]
    Weights(String),

    /// The Hugging Face Hub could not deliver a file.
    #[error("{0}")]
    Hub(String),

    /// A SAC adapter is malformed or does not fit the model.
    #[error("adapter {0}")]
    Adapter(String),

    /// The tokenizer could not be loaded or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A model's chat template cannot be parsed or rendered into a layout.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A `--device` value or device request that cannot be satisfied.
    #[error("device: {0}")]
    Device(String),

    /// Training or evaluation data is unreadable or malformed; the message
    /// names the file and, for a bad row, its line.
    #[error("{0}")]
    Data(String),

    /// A training run cannot start or continue: its output directory, its
    /// checkpoint, or settings that differ from the checkpoint's.
    #[error("{0}")]
    Training(String),

    /// A caller passed tensors that do not fit together (shapes, positions, masks).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A .sack file is unreadable, or could not be written.
    #[error(transparent)]
    Sack(#[from] crate::sack::SackError),

    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// What failed, in a few words, without the details (which may quote the
    /// contents of a file).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "a file could not be read",
            Error::MissingModelFile(_) | Error::NotCached { .. } => "a file is missing",
            Error::ModelName(_) | Error::UnknownLocalModel(_) => "not a model sac may load",
            Error::Config { .. } => "its config is not one sac can run",
            Error::Weights(_) => "its weights do not fit its config.json",
            Error::Hub(_) => "the Hub client failed",
            Error::Adapter(_) => "the adapter does not fit",
            Error::Tokenizer(_) => "its tokenizer cannot be loaded",
            Error::ChatTemplate(_) => "its chat template cannot be used",
            Error::Device(_) | Error::NoCuda => "the device is not available",
            Error::HubOptionsForLocalModel(_) => "not a model sac may load",
            Error::UnknownRatio { .. } => "the adapter does not fit",
            Error::Diverged { .. } => "training diverged",
            Error::NothingToPretrain { .. } => "invalid input",
            Error::Data(_)
            | Error::Training(_)
            | Error::InvalidInput(_)
            | Error::Settings(_)
            | Error::Setup(_) => "invalid input",
            Error::Sack(_) => "a .sack is unreadable",
            Error::Candle(_) => "a tensor operation failed",
        }
    }

    /// Wraps an I/O error with the file it concerns and what we were doing.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this library.
pub type Result<T> = std::result::Result<T, Error>;
