//! `sac`: Semantic-Anchor Compression of long documents into portable KV files.
//!
//! The data flows text -> tokens -> chunks -> compressor -> kept K/V ->
//! quantized tensors -> .sack -> decoder -> answer; each stage is a module
//! (`layout` places the document and the question for the model); see
//! docs/architecture.md.

pub mod adapter;
pub mod atomic;
pub mod compress;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod from_sack;
pub mod generate;
pub mod layout;
pub mod model;
pub mod runtime;
pub mod sack;
pub mod to_sack;
pub mod tokens;
pub mod train;

pub use error::{Error, Result};
