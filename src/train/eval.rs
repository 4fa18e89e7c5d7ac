//! Exact match and F1 of greedy answers to held-out questions, made the way
//! `sac ask` makes them: the context compressed by the current adapter, the
//! anchors' K/V (SAC) or the decoder's K/V over the soft tokens (GMSA) as
//! the decoder's past, then SAC's `[LM]` and the question, greedy decoding
//! until EOS or the token budget.

use crate::adapter::Loaded;
use crate::compress::Compressor;
use crate::compress::gmsa::soft_tokens;
use crate::compress::sac::Sac;
use crate::error::Result;
use crate::from_sack::soft_past;
use crate::generate::{Answerer, DecoderContext, SamplingSettings};
use crate::layout::{self, SOFT_TOKENS_FIRST_POSITION};
use crate::model::{Decoder, Kernels, SharedKv};
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

/// What the decoder reads for a context's ids.
type ContextOf<'a> = dyn Fn(&[u32]) -> Result<DecoderContext> + 'a;

pub fn evaluate(
    decoder: &Decoder,
    tokenizer: &TextTokenizer,
    adapter: &Loaded,
    examples: &[EvalExample],
    max_tokens: usize,
) -> Result<EvalScores> {
    let sampling = SamplingSettings {
        temperature: 0.0,
        top_p: None,
        seed: 0,
        max_tokens,
    };
    // What the decoder reads for a context: made once per adapter, used for
    // every example.
    let context_of: Box<ContextOf> = match adapter {
        Loaded::Sac(adapter) => {
            let compressor = Compressor::new(decoder, Box::new(Sac::new(adapter)));
            let prefix = compressor.strategy().prefix()?;
            Box::new(move |ids| {
                Ok(DecoderContext {
                    past: compressor
                        .anchor_past(ids)?
                        .into_iter()
                        .map(SharedKv::from)
                        .collect(),
                    question_position: layout::question_position(ids.len())?,
                    prefix: prefix.clone(),
                    lora: None,
                })
            })
        }
        Loaded::Gmsa(adapter) => Box::new(move |ids| {
            let tokens = soft_tokens(decoder, adapter, ids, Kernels::Inference)?;
            soft_past(
                decoder,
                &tokens,
                SOFT_TOKENS_FIRST_POSITION,
                adapter.decoder_lora.clone(),
            )
        }),
    };
    let (mut em, mut f) = (0.0, 0.0);
    for example in examples {
        let context = context_of(&example.context)?;
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
