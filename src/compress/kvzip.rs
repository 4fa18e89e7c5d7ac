//! KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with
//! Context Reconstruction", NeurIPS 2025): after the context is prefilled,
//! the model is asked to repeat it, chunk by chunk, with the chunk itself fed
//! as the answer (teacher forcing). Each cached K/V pair is scored by the most
//! attention any reconstruction query pays it, and the best pairs across all
//! layers and heads are kept.
//!
//! Followed from snu-mllab/KVzip (`model/wrapper.py`: `self_task`, `scoring`;
//! `attention/score.py`: `_get_score`) and kvpress's `KVzipPress`:
//! - chunk i of the context is repeated after the prompt "Repeat the previous
//!   context exactly." (i = 0) or "Repeat the part of the previous context
//!   exactly, starting with" and the previous chunk's last 8 tokens (i > 0),
//!   asked the way the decoder is asked a question (`### Question:` /
//!   `### Answer:`, sac's analogue of KVzip's chat template);
//! - every repeat pass reads the whole prefilled context as its past, at the
//!   positions after it (L + 1, ...), and is then dropped: the repeat tokens
//!   of one chunk are never seen by the next;
//! - a chunk's scores are the softmax of every repeat query over the sinks,
//!   that chunk's keys and the repeat tokens (causally), taken on the chunk's
//!   keys, maxed over the queries and over the query heads of each GQA group;
//! - the sinks ([`Kvzip::sinks`], [`super::select::SINKS`] by default) are
//!   always kept and count against the budget, as kvpress scores them 1.0;
//!   the budget is shared across layers and heads ([`super::budget`]) unless
//!   the compressor is told otherwise ([`Kvzip::head_budget`]).
//!
//! KVzip repeats 2000-token chunks with FlashAttention; this decoder
//! materializes each pass's attention, `[heads, q, L + q]` per layer for a
//! repeat input of q tokens, so the chunk is `--chunk-size` (510 by default)
//! and memory stays bounded by the chunk, not by L x L.

use std::ops::Range;
use std::time::Instant;

use super::budget::{self, HeadBudget, Scores};
use super::run::{self, Input};
use super::select::{self, KeptOffsets, Selection};
use super::{Cost, Emit, Facts, Keep, Method, Parts, Pass, Strategy, Takes};
use crate::error::Result;
use crate::layout::prompt::PromptLayout;
use crate::model::{AttentionProbe, KvCache, Reduce};
use crate::tokens::TextTokenizer;

/// KVzip's instruction before the first chunk.
pub const REPEAT_FIRST: &str = "Repeat the previous context exactly.";

/// KVzip's instruction before later chunks, followed by the previous
/// chunk's last [`PREVIOUS_TOKENS`] tokens.
pub const REPEAT_NEXT: &str = "Repeat the part of the previous context exactly, starting with";

/// How many of the previous chunk's tokens say where to resume (KVzip's
/// `prev_postfix_size`).
pub const PREVIOUS_TOKENS: usize = 8;

/// The token ids the repeat inputs are built from, asked as a question in
/// the document's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepeatPrompt {
    /// Before the first chunk: the question prompt of [`REPEAT_FIRST`].
    pub first: Vec<u32>,
    /// Before later chunks: the text before a question, and [`REPEAT_NEXT`].
    pub next: Vec<u32>,
    /// After the previous chunk's tokens: the text after a question.
    pub answer: Vec<u32>,
}

impl RepeatPrompt {
    pub fn new(tokenizer: &TextTokenizer, layout: &PromptLayout) -> Result<Self> {
        Ok(RepeatPrompt {
            first: layout.question_ids(tokenizer, REPEAT_FIRST)?,
            next: tokenizer.encode(&format!("{}{REPEAT_NEXT}", layout.before_question))?,
            answer: tokenizer.encode(&layout.after_question)?,
        })
    }

    /// The repeat input for `chunk`: the prompt, then the chunk itself;
    /// `previous` is the chunk before it, if any.
    pub fn input(&self, chunk: &[u32], previous: Option<&[u32]>) -> Vec<u32> {
        let mut input = match previous {
            None => self.first.clone(),
            Some(previous) => {
                let tail = &previous[previous.len().saturating_sub(PREVIOUS_TOKENS)..];
                [self.next.as_slice(), tail, &self.answer].concat()
            }
        };
        input.extend_from_slice(chunk);
        input
    }

    /// The most tokens a repeat input of a chunk of `chunk_size` holds.
    pub fn longest_input(&self, chunk_size: usize) -> usize {
        let next = self.next.len() + PREVIOUS_TOKENS + self.answer.len();
        self.first.len().max(next) + chunk_size
    }
}

/// The context ranges scored together: `sinks..len` in chunks of `chunk_size`.
pub fn scored_chunks(len: usize, chunk_size: usize, sinks: usize) -> Vec<Range<usize>> {
    let sinks = sinks.min(len);
    (sinks..len)
        .step_by(chunk_size)
        .map(|start| start..(start + chunk_size).min(len))
        .collect()
}

/// `kvzip` in [`super::METHODS`].
pub static METHOD: Method = Method {
    name: "kvzip",
    summary: "Training-free: the K/V the model attends to when asked to repeat the document, \
         chosen per layer and KV head (KVzip); about 2-3x a prefill",
    takes: Takes {
        head_budget: Some(HeadBudget::Shared),
        ..Takes::TRAINING_FREE
    },
    build,
};

fn build<'a>(parts: &Parts<'a, '_>) -> Result<Box<dyn Strategy + 'a>> {
    Ok(Box::new(Kvzip {
        keep: parts.keep,
        head_budget: parts.head_budget,
        prompt: (parts.repeat_prompt)()?,
    }))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kvzip {
    pub keep: Keep,
    pub head_budget: HeadBudget,
    /// What the model is asked to repeat the context with.
    pub prompt: RepeatPrompt,
}

impl Strategy for Kvzip {
    fn facts(&self) -> Facts {
        Facts {
            method: &METHOD,
            ratio: self.keep.ratio,
            chunk_size: self.keep.chunk_size,
            per_head: true,
            soft_tokens: false,
        }
    }

    /// Each token once, and the chunks it repeats once more.
    fn work(&self, len: usize) -> u64 {
        let repeated: usize = scored_chunks(len, self.keep.chunk_size, self.keep.sinks)
            .iter()
            .map(|range| range.len())
            .sum();
        (len + repeated) as u64
    }

    fn work_label(&self) -> &'static str {
        "tokens (prefill, then repeat)"
    }

    /// The repeat prompt and a chunk of the context.
    fn reads_after(&self, _len: usize) -> usize {
        self.prompt.longest_input(self.keep.chunk_size)
    }

    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost> {
        let started = Instant::now();
        let selection = self.select(pass, ids)?;
        select::emit(selection, self.keep.chunk_size, started, emit)
    }
}

impl Kvzip {
    fn select(&self, pass: &Pass, ids: &[u32]) -> Result<Selection> {
        let decoder = pass.decoder;
        let c = decoder.config();
        let len = ids.len();
        let started = Instant::now();
        let mut cache = KvCache::default();
        select::prefill(pass, self.keep.chunk_size, ids, &mut cache)?;
        let prefill = pass.elapsed(started)?;

        let past = cache.past()?;
        let sinks = self.keep.sinks.min(len);
        let mut scores = Scores::new(c.num_layers, c.num_kv_heads, len);
        let chunks = scored_chunks(len, self.keep.chunk_size, sinks);
        for (i, range) in chunks.iter().enumerate() {
            let previous = i.checked_sub(1).map(|p| &ids[chunks[p].clone()]);
            let input = self.prompt.input(&ids[range.clone()], previous);
            let probe = AttentionProbe {
                sinks,
                keys: range.clone(),
                reduce: Reduce::Max,
            };
            let out = run::forward(
                pass,
                Input {
                    probe: Some(&probe),
                    ..Input::causal(&input, len + 1, past.as_deref())
                },
            )?;
            for (layer, measured) in out.attention.iter().enumerate() {
                scores.set(layer, range.start, &select::rows(measured)?);
            }
            pass.report(range.len());
        }
        let budget = budget::budget(c.num_layers, c.num_kv_heads, len, self.keep.ratio);
        let kept = budget::top_k(&scores, &|p| p < sinks, budget, self.head_budget)?;
        Ok(Selection {
            cache,
            kept: KeptOffsets::PerHead(kept),
            prefill,
        })
    }
}
