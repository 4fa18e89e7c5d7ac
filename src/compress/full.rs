//! Every position's K/V from one causal prefill of the whole context, chunk
//! by chunk, each chunk seeing all before it: a lossless prompt cache.

use super::chunked;
use super::run::{self, Input};
use super::{Cost, Emit, Facts, Method, Parts, Pass, Strategy, Takes};
use crate::error::Result;
use crate::layout::chunk;
use crate::model::KvCache;

/// `full` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "full",
    summary: "Every token kept: a prompt cache (lossless stored as f32)",
    takes: Takes {
        adapter: false,
        keeps_all: true,
        sinks: false,
        head_budget: None,
        chunks: true,
    },
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    Ok(Box::new(Full {
        chunk_size: parts.keep.chunk_size,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub chunk_size: usize,
}

impl Strategy for Full {
    fn facts(&self) -> Facts {
        Facts {
            method: &METHOD,
            ratio: 1,
            chunk_size: self.chunk_size,
            per_head: false,
            soft_tokens: false,
        }
    }

    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost> {
        let mut cache = KvCache::default();
        let encode = |chunk: &chunk::Chunk, chunk_ids: &[u32]| {
            let past = cache.past()?;
            let input = Input::causal(chunk_ids, chunk.first_position() as usize, past.as_deref());
            let kv = run::forward(pass, input)?.kv;
            cache.append(&kv)?;
            Ok(((0..chunk.len).collect(), kv))
        };
        let total = chunked::compress(pass, ids, self.chunk_size, encode, emit)?;
        Ok(Cost {
            total,
            prefill: Some(total),
        })
    }
}
