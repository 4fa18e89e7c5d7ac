//! The model runtime: configuration, weights, and a forward pass whose KV,
//! masks and positions are all in the caller's hands.

mod attention;
mod block;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod decoder;
pub mod gguf;
pub mod known;
pub mod kv;
pub mod lora;
pub mod mask;
pub mod ops;
pub mod probe;
pub mod projection;
pub mod rope;
pub mod source;

pub use config::{Architecture, ModelConfig};
pub use decoder::{Decoder, ForwardInput, ForwardOutput, Layers};
pub use kv::{HeadPairs, KvCache, LayerKv, SharedKv};
pub use lora::{LayerLora, LoraTarget, LowRank, ModelLora};
pub use mask::AttentionMask;
pub use ops::Kernels;
pub use probe::{AttentionProbe, Reduce};
pub use source::{HfFiles, Layout, ModelFiles, SourceError};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Memory-maps the safetensors weights of `files` and builds the decoder in
/// `dtype`, its projections packed in bf16 with `bf16_weights`
/// ([`Decoder::load`]).
pub fn load_decoder(
    files: &HfFiles,
    config: ModelConfig,
    device: &Device,
    dtype: DType,
    bf16_weights: bool,
) -> Result<Decoder> {
    // SAFETY: the files are mapped read-only; like every safetensors loader we
    // rely on them not being truncated while the model is alive.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
        .map_err(|source| Error::MapWeights {
            files: display_paths(&files.weights),
            source,
        })?;
    Decoder::load(config, vb, bf16_weights).map_err(|e| match e {
        Error::Candle(source) => Error::Weights {
            files: display_paths(&files.weights),
            source,
        },
        other => other,
    })
}

fn display_paths(paths: &[std::path::PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
