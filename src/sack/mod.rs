//! `.sack`: the portable file a compressed document lives in.
//!
//! A `.sack` holds, for a few kept ("anchor") tokens of a document, the keys and
//! values every layer of a base model computed for them, plus what is needed to
//! use and trust them later: the model and tokenizer fingerprints, the
//! compressor, facts about the source text and the kept positions. Files travel
//! between machines and people, so every file is untrusted input and must stay
//! readable for years: the layout is specified byte by byte in `man/sack.5`,
//! every part is checksummed, and `scripts/read_sack.py` reads it independently.
//!
//! Writing is streaming ([`SackWriter`]): tensors go out as the compressor
//! produces them, even to a pipe. Reading is lazy ([`SackReader`]): opening
//! checks the header and directory; a layer's tensors are read on demand.
//!
//! This module knows nothing of candle or of models: tensors are slices of
//! `f32` (or `half` floats) with a shape, so it can be tested and fuzzed cheaply.

pub mod encoding;
pub mod error;
pub mod format;
pub mod info;
pub mod reader;
pub mod writer;

pub use encoding::{Compression, Dtype, Encoding, Floats, KvEncoding, TensorValues};
pub use error::{Result, SackError};
pub use format::directory::{KeptSet, KvSlot, TensorEntry, TensorName};
pub use format::header::{
    AdapterRef, CompressorInfo, DecoderInfo, DocumentInfo, KeptLayout, KeyRope, KvInfo, ModelInfo,
    PromptInfo, SackHeader, SoftTokensInfo, TokenizerInfo, now_rfc3339,
};
pub use info::InfoFormat;
pub use reader::{DecodedTensor, HeadKv, SackReader, StoredLayer};
pub use writer::{SackWriter, Sink, SlotKv, StreamSink, WriteOptions};
