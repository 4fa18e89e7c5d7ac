//! Semantic-Anchor Compression: compress long documents into portable KV files for LLMs.

pub mod sack;
