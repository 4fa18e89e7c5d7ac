//! What the chunk-by-chunk compressors (`sac`, `uniform`, `full`) share:
//! the loop over chunks, one forward pass per chunk, and the kept offsets'
//! K/V emitted as each chunk is done.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::{ChunkKv, Emit, Emitted, Kept, Pass};
use crate::error::Result;
use crate::layout::chunk::{self, Chunk};
use crate::model::LayerKv;

/// The 0-based `offsets` as a u32 tensor on the decoder's device.
pub(super) fn offsets_tensor(pass: &Pass, offsets: &[usize]) -> Result<Tensor> {
    let offsets: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    Ok(Tensor::new(offsets.as_slice(), pass.decoder.device())?)
}

/// Runs `encode` over the chunks of `ids` in order: it returns the chunk's
/// kept 0-based offsets and their K/V, which go to `emit` as kept position
/// ids. Returns the time taken.
pub(super) fn compress(
    pass: &Pass,
    ids: &[u32],
    chunk_size: usize,
    mut encode: impl FnMut(&Chunk, &[u32]) -> Result<(Vec<usize>, Vec<LayerKv>)>,
    emit: Emit,
) -> Result<Duration> {
    let started = Instant::now();
    for chunk in chunk::chunks(ids.len(), chunk_size) {
        let (kept, layers) = encode(&chunk, &ids[chunk.start..chunk.start + chunk.len])?;
        pass.report(chunk.len);
        let positions = kept
            .iter()
            .map(|&o| chunk.first_position() + o as u32)
            .collect();
        emit(Emitted::Kv(ChunkKv {
            chunk,
            kept: Kept::Shared(positions),
            layers,
        }))?;
    }
    pass.elapsed(started)
}
