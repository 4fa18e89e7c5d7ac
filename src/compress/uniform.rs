//! The training-free ablation of SAC: each chunk alone through a plain
//! causal pass, keeping the chunk's own first tokens (a chunk encoded
//! without its predecessors has its own attention sinks) and then evenly
//! spaced ones, ceil(len / r) in all ([`chunk::uniform_offsets`]). With no
//! sinks the kept tokens are exactly SAC's anchors, the reference's uniform.

use super::chunked;
use super::run::{self, Input};
use super::{Cost, Emit, Facts, Keep, Method, Parts, Pass, Strategy, Takes};
use crate::error::Result;
use crate::layout::chunk;

/// `uniform` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "uniform",
    summary: "Training-free: the same anchors from a plain causal pass",
    takes: Takes::TRAINING_FREE,
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    Ok(Box::new(Uniform { keep: parts.keep }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uniform {
    pub keep: Keep,
}

impl Strategy for Uniform {
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
        let encode = |chunk: &chunk::Chunk, chunk_ids: &[u32]| {
            let kept = chunk::uniform_offsets(chunk.len, self.keep.ratio, self.keep.sinks);
            let kv = run::forward(
                pass,
                Input::causal(chunk_ids, chunk.first_position() as usize, None),
            )?
            .kv;
            let kept_t = chunked::offsets_tensor(pass, &kept)?;
            let kv = kv
                .iter()
                .map(|l| l.select(&kept_t))
                .collect::<Result<_>>()?;
            Ok((kept, kv))
        };
        let total = chunked::compress(pass, ids, self.keep.chunk_size, encode, emit)?;
        Ok(Cost {
            total,
            prefill: None,
        })
    }
}
