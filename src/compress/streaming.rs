//! StreamingLLM (Xiao et al., 2024) as a compressor: the attention sinks and
//! the most recent tokens, the same for every layer and head, from a full
//! causal prefill (kvpress's `StreamingLLMPress`: `n_sink` = 4, sinks inside
//! the kept count; [`Streaming::sinks`]). Keys keep RoPE at their document positions; kvpress notes
//! the paper's re-rotation to contiguous positions, which is not done here.

use std::time::Instant;

use super::select::{self, KeptOffsets, Selection};
use super::{Cost, Emit, Facts, Keep, Method, Parts, Pass, Strategy, Takes};
use crate::error::Result;
use crate::model::KvCache;

/// `streaming` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "streaming",
    summary: "The first 4 tokens and the most recent ones (StreamingLLM): a baseline",
    takes: Takes::TRAINING_FREE,
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    Ok(Box::new(Streaming { keep: parts.keep }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streaming {
    pub keep: Keep,
}

/// Kept 0-based offsets of a context of `len` tokens at `ratio`:
/// ceil(len / ratio) of them (at least the `sinks` first tokens), the sinks
/// first, the rest the last tokens.
pub fn kept(len: usize, ratio: usize, sinks: usize) -> Vec<usize> {
    let sinks = sinks.min(len);
    let recent = len.div_ceil(ratio).saturating_sub(sinks);
    (0..sinks)
        .chain(len - recent.min(len - sinks)..len)
        .collect()
}

impl Strategy for Streaming {
    fn facts(&self) -> Facts {
        Facts {
            method: &METHOD,
            ratio: self.keep.ratio,
            chunk_size: self.keep.chunk_size,
            per_head: false,
            soft_tokens: false,
        }
    }

    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost> {
        let started = Instant::now();
        let mut cache = KvCache::default();
        select::prefill(pass, self.keep.chunk_size, ids, &mut cache)?;
        let selection = Selection {
            cache,
            kept: KeptOffsets::Shared(kept(ids.len(), self.keep.ratio, self.keep.sinks)),
            prefill: pass.elapsed(started)?,
        };
        select::emit(selection, self.keep.chunk_size, started, emit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_then_recent() {
        assert_eq!(kept(100, 10, 4), [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]);
        assert_eq!(kept(10, 5, 4), [0, 1, 2, 3]);
        assert_eq!(kept(3, 5, 4), [0, 1, 2]);
        assert_eq!(kept(6, 1, 4), [0, 1, 2, 3, 4, 5]);
        assert_eq!(kept(10, 5, 0), [8, 9]);
    }
}
