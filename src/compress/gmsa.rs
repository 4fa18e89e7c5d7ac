//! GMSA (Tang et al., "GMSA: Enhancing Context Compression via Group Merging
//! and Layer Semantic Alignment", arXiv 2505.12215): an encoder, the base
//! model's first layers with LoRA on every linear layer, reads the document
//! causally at positions 0..n-1; its last hidden states (after the final
//! norm) are mean-pooled in runs of `merge_size`, a remainder into one more;
//! the alignment block, trained copies of the model's first layers, maps
//! the pooled vectors (positions 0..m-1, causal, then the final norm) to
//! soft tokens, which the decoder reads as input embeddings.
//!
//! The encoder reads the context ids the document's layout gives, as every
//! compressor does: in the raw layout that trained methods use, BOS and
//! "### Context:" before the text, where the official code encodes the bare
//! text. An adapter is trained on what it will be given.

use std::time::Instant;

use candle_core::Tensor;

use super::{
    Cost, Emit, Emitted, Facts, Method, Parts, Pass, SettingsError, SoftTokens, Strategy, Takes,
};
use crate::adapter::Loaded;
use crate::adapter::gmsa::GmsaAdapter;
use crate::error::Result;
use crate::layout::chunk::Chunk;
use crate::model::{Decoder, ForwardInput, Kernels, ops};

/// `gmsa` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "gmsa",
    summary: "GMSA: soft tokens pooled from an encoder's hidden states and aligned to the \
              decoder's input (needs a GMSA adapter); the smallest files",
    takes: Takes {
        adapter: true,
        keeps_all: false,
        sinks: false,
        head_budget: None,
        chunks: false,
    },
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    match parts.adapter {
        Some(Loaded::Gmsa(adapter)) => Ok(Box::new(Gmsa {
            adapter,
            len: parts.keep.chunk_size,
        })),
        _ => Err(SettingsError::NeedsAdapter(&METHOD).into()),
    }
}

/// GMSA with its adapter: the whole context is one chunk, encoded at once
/// as the official code does.
#[derive(Debug, Clone, Copy)]
pub struct Gmsa<'a> {
    pub adapter: &'a GmsaAdapter,
    /// The context's length: its one chunk.
    pub len: usize,
}

impl Strategy for Gmsa<'_> {
    fn facts(&self) -> Facts {
        Facts {
            method: &METHOD,
            ratio: self.adapter.config.merge_size,
            chunk_size: self.len,
            per_head: false,
            soft_tokens: true,
        }
    }

    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost> {
        let started = Instant::now();
        let tokens = soft_tokens(pass.decoder, self.adapter, ids, pass.kernels)?;
        pass.report(ids.len());
        emit(Emitted::Soft(SoftTokens {
            chunk: Chunk {
                index: 0,
                start: 0,
                len: ids.len(),
            },
            tokens,
        }))?;
        Ok(Cost {
            total: pass.elapsed(started)?,
            prefill: None,
        })
    }
}

/// Means of consecutive runs of `merge_size` rows of `hidden` (`[n, h]`),
/// the `n mod merge_size` rows left over pooled into one more:
/// `[ceil(n / merge_size), h]`, accumulated in f32 (f64 for f64).
pub fn group_merge(hidden: &Tensor, merge_size: usize) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let dtype = hidden.dtype();
    let x = hidden.to_dtype(ops::accumulation_dtype(dtype))?;
    let full = n - n % merge_size;
    let mut parts = Vec::with_capacity(2);
    if full > 0 {
        parts.push(
            x.narrow(0, 0, full)?
                .reshape((full / merge_size, merge_size, h))?
                .mean(1)?,
        );
    }
    if full < n {
        parts.push(x.narrow(0, full, n - full)?.mean_keepdim(0)?);
    }
    Ok(Tensor::cat(&parts, 0)?.to_dtype(dtype)?)
}

/// The soft tokens `[ceil(n / merge_size), hidden]` of the context `ids`.
pub fn soft_tokens(
    decoder: &Decoder,
    adapter: &GmsaAdapter,
    ids: &[u32],
    kernels: Kernels,
) -> Result<Tensor> {
    let device = decoder.device();
    let ids = Tensor::new(ids, device)?.unsqueeze(0)?;
    let embeds = decoder.embed(&ids)?;
    let encoded = decoder.forward_first(
        adapter.config.encoder_layers,
        ForwardInput {
            lora: Some(&adapter.encoder_lora),
            kernels,
            ..ForwardInput::causal(&embeds, &positions(embeds.dim(1)?, device)?)
        },
    )?;
    let pooled = group_merge(&encoded.hidden.squeeze(0)?, adapter.config.merge_size)?;
    let pooled = pooled.unsqueeze(0)?;
    let aligned = decoder.forward_with(
        &adapter.lsa,
        ForwardInput {
            kernels,
            ..ForwardInput::causal(&pooled, &positions(pooled.dim(1)?, device)?)
        },
    )?;
    Ok(aligned.hidden.squeeze(0)?)
}

/// Position ids `[1, len]`: 0..len.
fn positions(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::arange(0u32, len as u32, device)?.unsqueeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_pool_with_the_remainder_as_one_more() {
        let x = Tensor::arange(0f32, 10.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((5, 2))
            .unwrap();
        let pooled = group_merge(&x, 2).unwrap();
        assert_eq!(
            pooled.to_vec2::<f32>().unwrap(),
            [[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]
        );
        let whole = group_merge(&x, 5).unwrap();
        assert_eq!(whole.to_vec2::<f32>().unwrap(), [[4.0, 5.0]]);
        assert_eq!(group_merge(&x, 8).unwrap().dims(), [1, 2]);
    }
}
