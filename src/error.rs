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

    /// The thread writing a .sack ended before the compressor did (its own
    /// error is the one reported).
    #[error("the .sack writer stopped early")]
    WriterStopped,

    /// A CUDA device asked of a build without CUDA.
    #[error("this sac was built without CUDA; rebuild with `--features cuda` or run on the CPU")]
    NoCuda,

    /// A model name, file or Hub snapshot that sac cannot load.
    #[error(transparent)]
    Source(#[from] crate::model::SourceError),

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
    #[error("{}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        problem: crate::model::config::ConfigError,
    },

    /// The weight files cannot be mapped.
    #[error("weights: cannot map {files}")]
    MapWeights {
        files: String,
        #[source]
        source: candle_core::Error,
    },

    /// A weight tensor is absent or has the wrong shape.
    #[error("weights: {files} do not fit the model")]
    Weights {
        files: String,
        #[source]
        source: candle_core::Error,
    },

    /// A SAC adapter is malformed or does not fit the model.
    #[error(transparent)]
    Adapter(Box<crate::adapter::AdapterError>),

    /// The tokenizer could not be loaded or failed on input.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokens::TokenizerError),

    /// A model's chat template cannot be parsed or rendered into a layout.
    #[error(transparent)]
    ChatTemplate(#[from] crate::layout::prompt::TemplateError),

    /// A CUDA device that cannot be opened.
    #[error("device: cannot open cuda:{ordinal}")]
    Cuda {
        ordinal: usize,
        #[source]
        source: candle_core::Error,
    },

    /// Training or evaluation data is unreadable or malformed.
    #[error(transparent)]
    Data(#[from] crate::train::DataError),

    /// A training checkpoint that cannot be written or read back.
    #[error(transparent)]
    Checkpoint(#[from] crate::train::CheckpointError),

    /// A context, question or .sack that does not fit the model's positions.
    #[error(transparent)]
    Fit(#[from] crate::layout::FitError),

    /// A .sack whose context this model cannot read.
    #[error(transparent)]
    Context(#[from] crate::from_sack::ContextError),

    /// A caller passed values that do not fit together.
    #[error(transparent)]
    Input(#[from] InputError),

    /// Our own data could not be serialized.
    #[error("cannot serialize {what}")]
    Serialize {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The handler that removes partial files on Ctrl-C cannot be installed.
    #[error("cannot install a signal handler")]
    Signal(#[source] ctrlc::Error),

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
            Error::Source(e) => e.kind(),
            Error::NotCached { .. } => "a file is missing",
            Error::UnknownLocalModel(_) | Error::HubOptionsForLocalModel(_) => {
                "not a model sac may load"
            }
            Error::Config { .. } => "its config is not one sac can run",
            Error::MapWeights { .. } | Error::Weights { .. } => {
                "its weights do not fit its config.json"
            }
            Error::Adapter(_) | Error::UnknownRatio { .. } => "the adapter does not fit",
            Error::Tokenizer(_) => "its tokenizer cannot be loaded",
            Error::ChatTemplate(_) => "its chat template cannot be used",
            Error::Cuda { .. } | Error::NoCuda => "the device is not available",
            Error::Diverged { .. } => "training diverged",
            Error::Context(_) => "the .sack does not fit the model",
            Error::NothingToPretrain { .. }
            | Error::Data(_)
            | Error::Checkpoint(_)
            | Error::Fit(_)
            | Error::Input(_)
            | Error::Settings(_)
            | Error::Setup(_) => "invalid input",
            Error::Serialize { .. } | Error::Signal(_) | Error::WriterStopped => {
                "sac failed inside"
            }
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

impl From<crate::adapter::AdapterError> for Error {
    fn from(error: crate::adapter::AdapterError) -> Self {
        Error::Adapter(Box::new(error))
    }
}

/// Values a caller passed that do not fit together: a misuse of the
/// library's API rather than bad user input, which is checked before.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("K/V layers hold different lengths")]
    RaggedLayers,
    #[error("{what} has {got} layers, the model {model}")]
    Layers {
        what: &'static str,
        got: usize,
        model: usize,
    },
    #[error("K/V tensor of shape {0:?} is not 4-D")]
    NotFourD(Vec<usize>),
    #[error("embeddings have width {got}, the model {model}")]
    EmbeddingWidth { got: usize, model: usize },
    #[error("position ids have shape {got:?}, expected [{batch}, {seq}]")]
    PositionShape {
        got: Vec<usize>,
        batch: usize,
        seq: usize,
    },
    #[error("mask has shape {got:?}, expected [{seq}, {keys}] or [{batch}, {seq}, {keys}]")]
    MaskShape {
        got: Vec<usize>,
        batch: usize,
        seq: usize,
        keys: usize,
    },
    #[error("probe sinks 0..{sinks} and keys {keys:?} overlap or are reversed")]
    ProbeOverlap {
        sinks: usize,
        keys: std::ops::Range<usize>,
    },
    #[error("probe keys {keys:?} reach past the {past} past keys")]
    ProbePastKeys {
        keys: std::ops::Range<usize>,
        past: usize,
    },
    #[error("AdamW holds {held} parameters, given {params} with {grads} gradients")]
    OptimizerParams {
        held: usize,
        params: usize,
        grads: usize,
    },
    #[error("a backward pass needs a sample")]
    NoSample,
    #[error("a training sample has no target")]
    NoTarget,
    #[error("an empty question")]
    EmptyQuestion,
    #[error("no answer generated")]
    NoAnswer,
    #[error("the compressor emits soft tokens, not K/V")]
    NotKv,
    #[error("{layers} layers x {heads} KV heads x {len} tokens are too many scores to rank")]
    TooManyScores {
        layers: usize,
        heads: usize,
        len: usize,
    },
    #[error("cannot initialise {name}")]
    Init {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Shorthand for results of this library.
pub type Result<T> = std::result::Result<T, Error>;
