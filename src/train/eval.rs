//! Exact match and F1 of greedy answers to held-out questions, made the way
//! `sac ask` makes them: the context compressed by the current adapter, the
//! anchors' K/V as the decoder's past, then `[LM]` and the question, greedy
//! decoding until EOS or the token budget.

use crate::adapter::SacAdapter;
use crate::compress::Compressor;
use crate::compress::sac::Sac;
use crate::error::Result;
use crate::generate::{Answerer, DecoderContext, SamplingSettings};
use crate::layout;
use crate::model::{Decoder, SharedKv};
use crate::tokens::TextTokenizer;

use super::data::EvalExample;
use super::metrics::{best_of, exact_match, f1};

/// Mean scores over an evaluation set, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalScores {
    pub em: f64,
    pub f1: f64,
    pub examples: usize,
}

pub fn evaluate(
    decoder: &Decoder,
    tokenizer: &TextTokenizer,
    adapter: &SacAdapter,
    examples: &[EvalExample],
    max_tokens: usize,
) -> Result<EvalScores> {
    let compressor = Compressor::new(decoder, Box::new(Sac::new(adapter)));
    let prefix = compressor.strategy().prefix()?;
    let sampling = SamplingSettings {
        temperature: 0.0,
        top_p: None,
        seed: 0,
        max_tokens,
    };
    let (mut em, mut f) = (0.0, 0.0);
    for example in examples {
        let question_position = layout::question_position(example.context.len())?;
        let context = DecoderContext {
            past: compressor
                .anchor_past(&example.context)?
                .into_iter()
                .map(SharedKv::from)
                .collect(),
            question_position,
            prefix: prefix.clone(),
        };
        let answerer = Answerer::new(decoder, context, tokenizer.eos())?;
        let generation = answerer.answer(&example.question, &sampling, |_| Ok(true))?;
        let answer = tokenizer.decode(&generation.tokens)?;
        em += best_of(exact_match, &answer, &example.answers);
        f += best_of(f1, &answer, &example.answers);
    }
    let n = examples.len().max(1) as f64;
    Ok(EvalScores {
        em: em / n,
        f1: f / n,
        examples: examples.len(),
    })
}
