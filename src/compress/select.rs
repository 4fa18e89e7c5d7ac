//! What the training-free selectors (`kvzip`, `snapkv`, `streaming`)
//! share: the whole context is prefilled causally (chunk by chunk, each
//! chunk seeing all before it, as `full` does), then the selector decides
//! which K/V pairs to keep, and they leave in chunks of positions like every
//! compressor's.
//!
//! Kept keys keep RoPE at their original positions, so the decoder reads them
//! where they were and the question still starts at L + 1.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::run::{self, Input};
use super::{ChunkKv, Cost, Emit, Emitted, Kept, Pass};
use crate::error::Result;
use crate::layout::{self, chunk};
use crate::model::{KvCache, LayerKv};

/// Tokens at the start of the context that every head keeps (attention
/// sinks) by default, for every training-free compressor (`uniform` in each
/// chunk): kvpress's `n_sink` for `KVzipPress` and `StreamingLLMPress`. Here
/// they are BOS and the start of `### Context:\n` (or of the chat
/// template's system turn), the analogue of the system prompt KVzip never
/// evicts.
pub const SINKS: usize = 4;

/// Emits what `selection` keeps, in chunks of `chunk_size` positions, and
/// what the whole compression, begun at `started`, cost.
pub(super) fn emit(
    selection: Selection,
    chunk_size: usize,
    started: Instant,
    emit: Emit,
) -> Result<Cost> {
    let past = selection.cache.past()?.unwrap_or_default();
    emit_chunks(&past, &selection.kept, chunk_size, emit)?;
    Ok(Cost {
        total: started.elapsed(),
        prefill: Some(selection.prefill),
    })
}

/// A selector's decision, with the prefilled cache it selects from.
pub(super) struct Selection {
    pub cache: KvCache,
    pub kept: KeptOffsets,
    /// Time spent on the plain causal prefill of the context.
    pub prefill: Duration,
}

/// Kept 0-based offsets into the context, ascending.
pub(super) enum KeptOffsets {
    /// The same for every layer and KV head.
    Shared(Vec<usize>),
    /// Per layer, per KV head.
    PerHead(Vec<Vec<Vec<usize>>>),
}

/// Prefills `ids` causally into `cache`, `chunk_size` tokens per pass, each
/// at the positions after the cache's (position ids from 1).
pub(super) fn prefill(
    pass: &Pass,
    chunk_size: usize,
    ids: &[u32],
    cache: &mut KvCache,
) -> Result<()> {
    for piece in ids.chunks(chunk_size) {
        let past = cache.past()?;
        let out = run::forward(pass, Input::causal(piece, cache.len() + 1, past.as_deref()))?;
        cache.append(&out.kv)?;
        pass.report(piece.len());
    }
    Ok(())
}

/// A probe's `[kv_heads, n]` measure as rows of f32.
pub(super) fn rows(measured: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(measured.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

/// Hands the kept K/V to `emit` one chunk of `chunk_size` positions at a time
/// (the .sack's segments).
fn emit_chunks(past: &[LayerKv], kept: &KeptOffsets, chunk_size: usize, emit: Emit) -> Result<()> {
    let len = past.first().map_or(0, LayerKv::len);
    for chunk in chunk::chunks(len, chunk_size) {
        let range = chunk.start..chunk.start + chunk.len;
        let inside = |set: &[usize]| -> Vec<usize> {
            let from = set.partition_point(|&o| o < range.start);
            let to = set.partition_point(|&o| o < range.end);
            set[from..to].to_vec()
        };
        let positions = |offsets: &[usize]| -> Vec<u32> {
            offsets.iter().map(|&o| layout::position(o)).collect()
        };
        let (kept, layers) = match kept {
            KeptOffsets::Shared(set) => {
                let offsets = inside(set);
                let layers = past
                    .iter()
                    .map(|kv| kv.gather_per_head(&vec![offsets.clone(); kv.k.dim(1)?]))
                    .collect::<Result<_>>()?;
                (Kept::Shared(positions(&offsets)), layers)
            }
            KeptOffsets::PerHead(sets) => {
                let offsets: Vec<Vec<Vec<usize>>> = sets
                    .iter()
                    .map(|heads| heads.iter().map(|set| inside(set)).collect())
                    .collect();
                let layers = past
                    .iter()
                    .zip(&offsets)
                    .map(|(kv, heads)| kv.gather_per_head(heads))
                    .collect::<Result<_>>()?;
                let kept = offsets
                    .iter()
                    .map(|heads| heads.iter().map(|set| positions(set)).collect())
                    .collect();
                (Kept::PerHead(kept), layers)
            }
        };
        emit(Emitted::Kv(ChunkKv {
            chunk,
            kept,
            layers,
        }))?;
    }
    Ok(())
}
