//! The one error type of the `.sack` module.
//!
//! A `.sack` travels between machines and people, so every message names the
//! file it is about and says what was being done or what was expected: the user
//! has to decide from one line whether the file is damaged, from a newer `sac`,
//! or not a `.sack` at all.

use std::io;

/// Everything that can go wrong reading or writing a `.sack`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SackError {
    /// The operating system refused a read or write.
    #[error("{file}: {action}")]
    Io {
        /// The file (or `<stdin>`, `<stdout>`, …) being read or written.
        file: String,
        /// What was being done, including the expected size or position.
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The file does not start with the `.sack` magic bytes.
    #[error("{file}: not a .sack file (it does not start with the .sack magic bytes)")]
    NotSack {
        /// The file.
        file: String,
    },

    /// The file's major format version is not the one this build reads.
    #[error(
        "{file}: .sack format version {found_major}.{found_minor} is not supported; \
         this sac reads format version {supported}.x (the file was written by a newer sac, \
         or is damaged)"
    )]
    UnsupportedVersion {
        /// The file.
        file: String,
        /// Major version stored in the file.
        found_major: u16,
        /// Minor version stored in the file.
        found_minor: u16,
        /// The major version this build reads.
        supported: u16,
    },

    /// A stored CRC-32 does not match the bytes it covers.
    #[error(
        "{file}: checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x} \
         (the file is damaged)"
    )]
    Checksum {
        /// The file.
        file: String,
        /// Which part failed: `header`, `directory`, `footer`, `tensor key.l0.s0`.
        what: String,
        /// The checksum stored in the file.
        stored: u32,
        /// The checksum of the bytes actually read.
        computed: u32,
    },

    /// The file breaks a rule of the format: a size out of range, a missing
    /// footer, invalid JSON, an inconsistent directory.
    #[error("{file}: {what}")]
    Malformed {
        /// The file.
        file: String,
        /// The broken rule, in words.
        what: String,
    },

    /// A tensor was asked for by a name the directory does not hold.
    #[error("{file}: no tensor named {name:?}")]
    NoSuchTensor {
        /// The file.
        file: String,
        /// The requested name.
        name: String,
    },

    /// The writer was called in a way that would produce an invalid file.
    #[error("{file}: {what}")]
    InvalidArgument {
        /// The file being written.
        file: String,
        /// What was wrong with the call.
        what: String,
    },

    /// A tensor holds values that the requested quantized encoding cannot represent.
    #[error("{file}: cannot quantize {tensor}: {reason}")]
    Unquantizable {
        /// The file being written.
        file: String,
        /// The tensor name.
        tensor: String,
        /// Why (non-finite value, magnitude beyond the f16 range of the scales).
        reason: String,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = SackError> = std::result::Result<T, E>;

/// Builds a closure that wraps an [`io::Error`] with the file and the action.
pub(crate) fn io_err(file: &str, action: impl Into<String>) -> impl FnOnce(io::Error) -> SackError {
    let file = file.to_owned();
    let action = action.into();
    move |source| SackError::Io {
        file,
        action,
        source,
    }
}
