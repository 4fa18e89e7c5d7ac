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

    /// A model directory or Hub snapshot lacks a file we need.
    #[error("{0}")]
    MissingModelFile(String),

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
