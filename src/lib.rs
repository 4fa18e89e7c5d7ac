//! `sac`: Semantic-Anchor Compression of long documents into portable KV files.
//!
//! The data flows text -> tokens -> chunks -> compressor -> anchor KV ->
//! quantized tensors -> .sack -> decoder -> answer; each stage is a module.

pub mod cli;
pub mod commands;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod model;
pub mod tokens;

pub use error::{Error, Result};
