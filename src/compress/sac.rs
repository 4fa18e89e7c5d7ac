//! SAC (Semantic-Anchor Compression): each chunk is one bidirectional
//! forward pass of the base model with the adapter's LoRA, the i-th anchor's
//! embedding plus the i-th role embedding; the anchors' K/V of every layer
//! are kept. The ratio and chunk size are the adapter's, as trained.

use candle_core::{D, Tensor};

use super::SettingsError;
use super::chunked;
use super::run::{self, Input};
use super::{Cost, Emit, Facts, Method, Parts, Pass, Strategy, Takes};
use crate::adapter::{Loaded, SacAdapter};
use crate::error::Result;
use crate::layout::chunk;
use crate::model::{AttentionMask, LayerKv};

/// `sac` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "sac",
    summary: "The paper's compressor (needs an adapter)",
    takes: Takes {
        adapter: true,
        keeps_all: false,
        sinks: false,
        head_budget: None,
        chunks: true,
    },
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    match parts.adapter {
        Some(Loaded::Sac(adapter)) => Ok(Box::new(Sac::new(adapter))),
        _ => Err(SettingsError::NeedsAdapter(&METHOD).into()),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Sac<'a> {
    adapter: &'a SacAdapter,
}

impl<'a> Sac<'a> {
    pub fn new(adapter: &'a SacAdapter) -> Self {
        Sac { adapter }
    }
}

impl Strategy for Sac<'_> {
    fn facts(&self) -> Facts {
        Facts {
            method: &METHOD,
            ratio: self.adapter.config.ratio,
            chunk_size: self.adapter.config.chunk_size,
            per_head: false,
            soft_tokens: false,
        }
    }

    fn prefix(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.adapter.lm_embedding()?.unsqueeze(0)?))
    }

    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost> {
        let encode = |chunk: &chunk::Chunk, chunk_ids: &[u32]| self.encode(pass, chunk, chunk_ids);
        let total = chunked::compress(pass, ids, self.adapter.config.chunk_size, encode, emit)?;
        Ok(Cost {
            total,
            prefill: None,
        })
    }
}

impl Sac<'_> {
    /// One chunk's bidirectional pass: the chunk's anchor offsets (0-based)
    /// and their K/V in every layer. Chunks are independent of each other,
    /// which lets `sac train` backpropagate into one chunk at a time.
    pub fn encode(
        &self,
        pass: &Pass,
        chunk: &chunk::Chunk,
        chunk_ids: &[u32],
    ) -> Result<(Vec<usize>, Vec<LayerKv>)> {
        let kept = chunk::anchor_offsets(chunk.len, self.adapter.config.ratio);
        let kept_t = chunked::offsets_tensor(pass, &kept)?;
        let roles = role_embeddings(self.adapter, chunk.len, &kept_t, kept.len())?;
        let input = Input {
            extra: Some(roles),
            mask: AttentionMask::Full,
            lora: Some(&self.adapter.lora),
            ..Input::causal(chunk_ids, chunk.first_position() as usize, None)
        };
        let kv = run::forward(pass, input)?.kv;
        let kv = kv
            .iter()
            .map(|l| l.select(&kept_t))
            .collect::<Result<_>>()?;
        Ok((kept, kv))
    }
}

/// `[1, len, hidden]`: role embedding i at the i-th kept offset, zero elsewhere.
fn role_embeddings(
    adapter: &SacAdapter,
    len: usize,
    kept: &Tensor,
    count: usize,
) -> Result<Tensor> {
    let roles = &adapter.role_tokens;
    let hidden = roles.dim(D::Minus1)?;
    let zeros = Tensor::zeros((len, hidden), roles.dtype(), roles.device())?;
    Ok(zeros
        .index_add(kept, &roles.narrow(0, 0, count)?, 0)?
        .unsqueeze(0)?)
}
