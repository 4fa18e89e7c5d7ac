//! Anchor K/V and a question to an answer: the frozen decoder reads the kept
//! K/V as its past, then `[LM]` (for `sac`) and the question, and generates.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{Error, Result};
use crate::model::{AttentionMask, Decoder, ForwardInput, KvCache, LayerKv, Path};

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSettings {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub max_tokens: usize,
}

impl SamplingSettings {
    fn processor(&self) -> LogitsProcessor {
        let sampling = match (self.temperature, self.top_p) {
            (t, _) if t <= 0.0 => Sampling::ArgMax,
            (temperature, Some(p)) if p < 1.0 => Sampling::TopP { p, temperature },
            (temperature, _) => Sampling::All { temperature },
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }
}

/// What the decoder reads before the question.
#[derive(Debug, Clone)]
pub struct DecoderContext {
    /// The kept K/V, one entry per layer.
    pub past: Vec<LayerKv>,
    /// Position id of the question's first token (L + 1 for a context at 1..=L).
    pub question_position: u32,
    /// Learned embeddings `[n, hidden]` read at the `n` positions just before
    /// the question: SAC's `[LM]`.
    pub prefix: Option<Tensor>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Eos,
    MaxTokens,
    /// The caller asked to stop (Ctrl-C).
    Interrupted,
}

/// One generated answer.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, without the EOS that ended them.
    pub tokens: Vec<u32>,
    pub stop: Stop,
    /// From the start of the question's prefill to the first new token.
    pub time_to_first_token: Duration,
    pub elapsed: Duration,
}

impl Generation {
    /// Decoding speed after the first token.
    pub fn tokens_per_second(&self) -> f64 {
        let rest = self
            .elapsed
            .saturating_sub(self.time_to_first_token)
            .as_secs_f64();
        match self.tokens.len() {
            0 | 1 => 0.0,
            n if rest > 0.0 => (n - 1) as f64 / rest,
            _ => 0.0,
        }
    }
}

/// Answers questions from one context; the context's K/V are loaded once and
/// shared by every question.
#[derive(Debug)]
pub struct Answerer<'a> {
    decoder: &'a Decoder,
    question_position: u32,
    prefix: Option<Tensor>,
    /// Positions of the context in `cache`; each question starts from them.
    context_len: usize,
    eos: Vec<u32>,
    cache: KvCache,
}

impl<'a> Answerer<'a> {
    pub fn new(
        decoder: &'a Decoder,
        context: DecoderContext,
        eos: &[u32],
        max_tokens: usize,
    ) -> Result<Self> {
        let c = decoder.config();
        if context.past.len() != c.num_layers {
            return Err(Error::InvalidInput(format!(
                "the context holds K/V for {} layers, the model has {}",
                context.past.len(),
                c.num_layers
            )));
        }
        let context_len = context.past.first().map_or(0, LayerKv::len);
        let cache = KvCache::new(context.past, max_tokens + 64)?;
        Ok(Answerer {
            decoder,
            question_position: context.question_position,
            prefix: context.prefix,
            context_len,
            eos: eos.to_vec(),
            cache,
        })
    }

    /// Generates an answer to `question_ids`, calling `on_token` with each new
    /// id; `on_token` returning `false` stops generation.
    pub fn answer(
        &mut self,
        question_ids: &[u32],
        sampling: &SamplingSettings,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<Generation> {
        let start = Instant::now();
        let device = self.decoder.device().clone();
        self.cache.truncate(self.context_len);

        let question = Tensor::new(question_ids, &device)?.unsqueeze(0)?;
        let mut embeds = self.decoder.embed(&question)?;
        let mut next_position = u64::from(self.question_position);
        if let Some(prefix) = &self.prefix {
            let prefix = prefix.to_dtype(embeds.dtype())?.unsqueeze(0)?;
            next_position = next_position.saturating_sub(prefix.dim(1)? as u64);
            embeds = Tensor::cat(&[&prefix, &embeds], 1)?;
        }
        let limit = self.decoder.config().max_position_embeddings as u64;
        let needed = next_position + embeds.dim(1)? as u64;
        if needed > limit {
            return Err(Error::InvalidInput(format!(
                "the question needs positions up to {needed}, but the model stops at {limit}; \
                 ask a shorter question or use a model with a longer context"
            )));
        }
        let mut processor = sampling.processor();
        let mut tokens = Vec::new();
        let mut time_to_first_token = None;
        let stop = loop {
            let seq = embeds.dim(1)? as u64;
            if next_position + seq > limit {
                break Stop::MaxTokens;
            }
            // Below `limit` (checked above), so it fits u32 for any real model.
            let first = u32::try_from(next_position).map_err(|_| {
                Error::InvalidInput(format!("position {next_position} exceeds u32"))
            })?;
            let positions = Tensor::arange(first, first + seq as u32, &device)?.unsqueeze(0)?;
            let past = self.cache.past()?;
            let out = self.decoder.forward(ForwardInput {
                embeds: &embeds,
                positions: &positions,
                mask: AttentionMask::Causal,
                past: past.as_deref(),
                lora: None,
                path: Path::Inference,
            })?;
            self.cache.append(&out.kv)?;
            next_position += seq;
            let last = out.hidden.narrow(1, seq as usize - 1, 1)?;
            let logits = self
                .decoder
                .logits(&last)?
                .flatten_all()?
                .to_dtype(DType::F32)?;
            let token = processor.sample(&logits)?;
            time_to_first_token.get_or_insert_with(|| start.elapsed());
            if self.eos.contains(&token) {
                break Stop::Eos;
            }
            tokens.push(token);
            if !on_token(token)? {
                break Stop::Interrupted;
            }
            if tokens.len() >= sampling.max_tokens {
                break Stop::MaxTokens;
            }
            embeds = self.decoder.embed(&Tensor::new(&[[token]], &device)?)?;
        };
        Ok(Generation {
            tokens,
            stop,
            time_to_first_token: time_to_first_token.unwrap_or_default(),
            elapsed: start.elapsed(),
        })
    }
}
