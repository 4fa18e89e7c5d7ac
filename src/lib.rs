//! `sac`: Semantic-Anchor Compression of long documents into portable KV files.
//!
//! The data flows text -> tokens -> chunks -> compressor -> anchor KV ->
//! quantized tensors -> .sack -> decoder -> answer; each stage is a module
//! (`prompt` lays out the document and the question for the model).

pub mod adapter;
pub mod atomic;
pub mod chunk;
pub mod compress;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod from_sack;
pub mod generate;
pub mod model;
pub mod prompt;
pub mod runtime;
pub mod sack;
pub mod to_sack;
pub mod tokens;
pub mod train;

pub use error::{Error, Result};
