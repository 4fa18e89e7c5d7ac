//! SnapKV (Li et al., 2024): the last tokens of the context, the observation
//! window, already look where later questions will; each earlier K/V pair is
//! scored by the attention the window pays it. No extra pass: the window is
//! the last pass of the prefill, run with a probe.
//!
//! Followed from kvpress's `SnapKVPress`: a 64-token window, its weights
//! averaged over the window's queries, smoothed by an average pool of width 5
//! (zero padding counted, PyTorch's default) and averaged over the query
//! heads of each GQA group; the window itself is always kept, and every
//! head keeps the same count ([`budget::HeadBudget::Even`], `SnapKVPress`'s way;
//! [`budget::HeadBudget::Shared`] pools the budget as KVzip does). Unlike
//! `SnapKVPress`, the attention sinks ([`Snapkv::sinks`]) are kept too,
//! and the window shrinks to each head's share of the budget when that is
//! smaller, so the window alone never exceeds the ratio.

use std::time::Instant;

use super::budget::{self, HeadBudget, Scores};
use super::run::{self, Input};
use super::select::{self, KeptOffsets, Selection};
use super::{Cost, Emit, Facts, Keep, Method, Parts, Pass, Strategy, Takes};
use crate::error::Result;
use crate::model::{AttentionProbe, KvCache, Reduce};

/// `snapkv` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "snapkv",
    summary: "Training-free: the K/V the document's last 64 tokens attend to, chosen per layer \
         and KV head (SnapKV); about one prefill",
    takes: Takes {
        head_budget: Some(HeadBudget::Even),
        ..Takes::TRAINING_FREE
    },
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    Ok(Box::new(Snapkv {
        keep: parts.keep,
        head_budget: parts.head_budget,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapkv {
    pub keep: Keep,
    pub head_budget: HeadBudget,
}

/// Tokens in the observation window (kvpress's `window_size`).
pub const WINDOW: usize = 64;

/// Width of the average pool over the scores (kvpress's `kernel_size`).
pub const KERNEL: usize = 5;

/// The observation window for a context of `len` tokens when `budget` pairs
/// are kept over `slots` (layers x KV heads) and `sinks` tokens are kept
/// anyway: at most [`WINDOW`] and what is left of each head's share, at
/// least one token.
pub fn window(len: usize, budget: usize, slots: usize, sinks: usize) -> usize {
    (budget / slots)
        .saturating_sub(sinks)
        .clamp(1, WINDOW)
        .min(len)
}

/// PyTorch's `avg_pool1d(kernel_size=KERNEL, stride=1, padding=KERNEL / 2)`.
pub fn pool(row: &[f32]) -> Vec<f32> {
    let half = KERNEL / 2;
    (0..row.len())
        .map(|i| {
            let window = &row[i.saturating_sub(half)..(i + half + 1).min(row.len())];
            window.iter().sum::<f32>() / KERNEL as f32
        })
        .collect()
}

impl Strategy for Snapkv {
    fn facts(&self) -> Facts {
        Facts {
            method: &METHOD,
            ratio: self.keep.ratio,
            chunk_size: self.keep.chunk_size,
            per_head: true,
            soft_tokens: false,
        }
    }

    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost> {
        let started = Instant::now();
        let selection = self.select(pass, ids)?;
        select::emit(selection, self.keep.chunk_size, started, emit)
    }
}

impl Snapkv {
    fn select(&self, pass: &Pass, ids: &[u32]) -> Result<Selection> {
        let decoder = pass.decoder;
        let c = decoder.config();
        let len = ids.len();
        let budget = budget::budget(c.num_layers, c.num_kv_heads, len, self.keep.ratio);
        let slots = c.num_layers * c.num_kv_heads;
        let observed = len - window(len, budget, slots, self.keep.sinks);
        let started = Instant::now();
        let mut cache = KvCache::default();
        select::prefill(pass, self.keep.chunk_size, &ids[..observed], &mut cache)?;
        let probe = AttentionProbe {
            sinks: 0,
            keys: 0..observed,
            reduce: Reduce::Mean,
        };
        let past = cache.past()?;
        let out = run::forward(
            pass,
            Input {
                probe: (observed > 0).then_some(&probe),
                ..Input::causal(&ids[observed..], observed + 1, past.as_deref())
            },
        )?;
        cache.append(&out.kv)?;
        pass.report(len - observed);
        let prefill = pass.elapsed(started)?;

        let mut scores = Scores::new(c.num_layers, c.num_kv_heads, len);
        for (layer, measured) in out.attention.iter().enumerate() {
            let rows: Vec<Vec<f32>> = select::rows(measured)?.iter().map(|r| pool(r)).collect();
            scores.set(layer, 0, &rows);
        }
        let sinks = self.keep.sinks.min(observed);
        let kept = budget::top_k(
            &scores,
            &|p| p < sinks || p >= observed,
            budget,
            self.head_budget,
        )?;
        Ok(Selection {
            cache,
            kept: KeptOffsets::PerHead(kept),
            prefill,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_counts_the_zero_padding() {
        let pooled = pool(&[5.0, 0.0, 0.0, 0.0, 0.0, 10.0]);
        assert_eq!(pooled, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn window_fits_each_heads_share() {
        assert_eq!(window(1000, 4 * 200, 4, 4), WINDOW);
        assert_eq!(window(1000, 4 * 20, 4, 0), 20);
        assert_eq!(window(1000, 4 * 20, 4, 4), 16);
        assert_eq!(window(3, 1, 4, 4), 1);
        assert_eq!(window(1, 100, 1, 0), 1);
    }
}
