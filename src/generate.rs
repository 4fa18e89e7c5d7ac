//! Anchor K/V and a question to an answer: the frozen decoder reads the kept
//! K/V as its past, then `[LM]` (for `sac`) and the question, and generates.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{InputError, Result};
use crate::layout;
use crate::layout::FitError;
use crate::model::{
    AttentionMask, Decoder, ForwardInput, Kernels, KvCache, ModelLora, SharedKv, mask,
};

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
    /// The kept K/V, one entry per layer; a layer whose KV heads keep
    /// different positions carries a bias hiding each head's padding.
    pub past: Vec<SharedKv>,
    /// Position id of the question's first token (L + 1 for a context at 1..=L).
    pub question_position: u32,
    /// Learned embeddings `[n, hidden]` read at the `n` positions just before
    /// the question: SAC's `[LM]`.
    pub prefix: Option<Tensor>,
    /// LoRA the decoder reads and answers with: a GMSA adapter's, when its
    /// second stage fine-tuned the decoder.
    pub lora: Option<ModelLora>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Eos,
    /// The answer's text reached a stop string ([`Answerer::with_stop_rule`]).
    StopString,
    MaxTokens,
    /// The caller asked to stop (Ctrl-C).
    Interrupted,
}

impl Stop {
    /// How `--json` names it.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Eos => "eos",
            Stop::StopString => "stop_string",
            Stop::MaxTokens => "max_tokens",
            Stop::Interrupted => "interrupted",
        }
    }
}

/// Whether the ids generated so far end the answer (by its text, say).
pub type StopRule<'a> = Box<dyn Fn(&[u32]) -> Result<bool> + 'a>;

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

/// Answers questions from one context. The context's K/V are loaded once and
/// read by every question; questions answered together share each forward
/// pass, which costs about what one question costs while the weights, not
/// the arithmetic, bound a decoding step.
pub struct Answerer<'a> {
    decoder: &'a Decoder,
    shared: Vec<SharedKv>,
    question_position: u32,
    prefix: Option<Tensor>,
    lora: Option<ModelLora>,
    eos: Vec<u32>,
    stop_rule: Option<StopRule<'a>>,
}

impl std::fmt::Debug for Answerer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answerer")
            .field("question_position", &self.question_position)
            .field("lora", &self.lora.is_some())
            .field("eos", &self.eos)
            .field("stop_rule", &self.stop_rule.is_some())
            .finish_non_exhaustive()
    }
}

/// One question's progress inside [`Answerer::answer_batch`].
struct Row {
    processor: LogitsProcessor,
    tokens: Vec<u32>,
    stop: Option<Stop>,
    /// Position id of the next token fed for this row.
    next_position: u64,
    /// Padding positions in front of this row's tokens in the batch cache.
    pad: usize,
    time_to_first_token: Option<Duration>,
    elapsed: Duration,
}

impl<'a> Answerer<'a> {
    pub fn new(decoder: &'a Decoder, context: DecoderContext, eos: &[u32]) -> Result<Self> {
        let c = decoder.config();
        if context.past.len() != c.num_layers {
            return Err(InputError::Layers {
                what: "the context's K/V",
                got: context.past.len(),
                model: c.num_layers,
            }
            .into());
        }
        Ok(Answerer {
            decoder,
            shared: context.past,
            question_position: context.question_position,
            prefix: context.prefix,
            lora: context.lora,
            eos: eos.to_vec(),
            stop_rule: None,
        })
    }

    /// Ends each answer, with [`Stop::StopString`], once `rule` says so of
    /// the ids it has generated (the last one included).
    pub fn with_stop_rule(mut self, rule: StopRule<'a>) -> Self {
        self.stop_rule = Some(rule);
        self
    }

    /// Generates an answer to `question_ids`, calling `on_token` with each new
    /// id; `on_token` returning `false` stops generation.
    pub fn answer(
        &self,
        question_ids: &[u32],
        sampling: &SamplingSettings,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<Generation> {
        self.answer_batch(&[question_ids], sampling, |_, token| on_token(token))?
            .pop()
            .ok_or_else(|| InputError::NoAnswer.into())
    }

    /// Answers several questions in one batch: the questions are left-padded
    /// to one length and decoded step by step together, each with its own
    /// sampler seeded as a lone question's would be; rows that finish leave
    /// the batch. `on_token(row, id)` sees each new id; `false` stops every
    /// row. Returns one [`Generation`] per question, in order.
    pub fn answer_batch(
        &self,
        questions: &[&[u32]],
        sampling: &SamplingSettings,
        mut on_token: impl FnMut(usize, u32) -> Result<bool>,
    ) -> Result<Vec<Generation>> {
        let start = Instant::now();
        let device = self.decoder.device().clone();
        let prefix_len = self.prefix.as_ref().map_or(Ok(0), |p| p.dim(0))?;
        let first_position = u64::from(layout::prefix_position(self.question_position, prefix_len));
        let limit = self.decoder.config().max_position_embeddings as u64;
        let lengths: Vec<usize> = questions.iter().map(|q| prefix_len + q.len()).collect();
        let width = lengths.iter().copied().max().unwrap_or(0);
        if lengths.contains(&0) {
            return Err(InputError::EmptyQuestion.into());
        }
        if first_position + width as u64 > limit {
            return Err(FitError::QuestionPastPositions {
                end: first_position + width as u64,
                limit,
            }
            .into());
        }
        let mut rows: Vec<Row> = lengths
            .iter()
            .map(|&len| Row {
                processor: sampling.processor(),
                tokens: Vec::new(),
                stop: None,
                next_position: first_position + len as u64,
                pad: width - len,
                time_to_first_token: None,
                elapsed: Duration::ZERO,
            })
            .collect();
        let mut embeds = self.padded_embeds(questions, width)?;
        let mut positions = position_ids(
            rows.iter().flat_map(|r| {
                (0..width).map(move |j| (first_position + j as u64).saturating_sub(r.pad as u64))
            }),
            (rows.len(), width),
            &device,
        )?;
        let mut cache = KvCache::default();
        let mut active: Vec<usize> = (0..rows.len()).collect();
        loop {
            let seq = embeds.dim(1)?;
            let pads: Vec<usize> = active.iter().map(|&r| rows[r].pad).collect();
            let mask = match pads.iter().any(|&p| p > 0) {
                true => Some(mask::left_padded_causal(&pads, seq, cache.len(), &device)?),
                false => None,
            };
            let past = cache.past()?;
            let out = self.decoder.forward(ForwardInput {
                embeds: &embeds,
                positions: &positions,
                mask: mask
                    .as_ref()
                    .map_or(AttentionMask::Causal, AttentionMask::Additive),
                shared: Some(&self.shared),
                past: past.as_deref(),
                lora: self.lora.as_ref(),
                kernels: Kernels::Inference,
            })?;
            cache.append(&out.kv)?;
            let logits = self
                .decoder
                .logits(&out.hidden.narrow(1, seq - 1, 1)?)?
                .squeeze(1)?
                .to_dtype(DType::F32)?;
            let mut interrupted = false;
            let mut going_on = Vec::with_capacity(active.len());
            for (slot, &r) in active.iter().enumerate() {
                let row = &mut rows[r];
                let token = row.processor.sample(&logits.get(slot)?)?;
                row.time_to_first_token
                    .get_or_insert_with(|| start.elapsed());
                row.stop = if self.eos.contains(&token) {
                    Some(Stop::Eos)
                } else {
                    row.tokens.push(token);
                    if !on_token(r, token)? {
                        interrupted = true;
                    }
                    let full =
                        row.tokens.len() >= sampling.max_tokens || row.next_position >= limit;
                    match &self.stop_rule {
                        Some(rule) if rule(&row.tokens)? => Some(Stop::StopString),
                        _ => full.then_some(Stop::MaxTokens),
                    }
                };
                row.elapsed = start.elapsed();
                if row.stop.is_none() {
                    going_on.push(slot);
                }
            }
            if interrupted {
                for &slot in &going_on {
                    rows[active[slot]].stop = Some(Stop::Interrupted);
                }
                break;
            }
            if going_on.is_empty() {
                break;
            }
            if going_on.len() < active.len() {
                let kept: Vec<u32> = going_on.iter().map(|&s| s as u32).collect();
                cache.select_rows(&Tensor::new(kept.as_slice(), &device)?)?;
            }
            active = going_on.iter().map(|&s| active[s]).collect();
            let next: Vec<u32> = active
                .iter()
                .filter_map(|&r| rows[r].tokens.last().copied())
                .collect();
            embeds = self
                .decoder
                .embed(&Tensor::new(next.as_slice(), &device)?.unsqueeze(1)?)?;
            positions = position_ids(
                active.iter().map(|&r| rows[r].next_position),
                (active.len(), 1),
                &device,
            )?;
            for &r in &active {
                rows[r].next_position += 1;
            }
        }
        Ok(rows
            .into_iter()
            .map(|row| Generation {
                tokens: row.tokens,
                stop: row.stop.unwrap_or(Stop::MaxTokens),
                time_to_first_token: row.time_to_first_token.unwrap_or_default(),
                elapsed: row.elapsed,
            })
            .collect())
    }

    /// `[rows, width, hidden]`: each question's embeddings after `[LM]` (if
    /// any), left-padded with zeros to `width`.
    fn padded_embeds(&self, questions: &[&[u32]], width: usize) -> Result<Tensor> {
        let device = self.decoder.device();
        let rows = questions
            .iter()
            .map(|q| {
                let mut parts = Vec::with_capacity(3);
                let tokens = self
                    .decoder
                    .embed(&Tensor::new(*q, device)?.unsqueeze(0)?)?;
                if let Some(prefix) = &self.prefix {
                    parts.push(prefix.to_dtype(tokens.dtype())?.unsqueeze(0)?);
                }
                parts.push(tokens);
                let len: usize = parts
                    .iter()
                    .map(|p| p.dim(1))
                    .sum::<candle_core::Result<_>>()?;
                if len < width {
                    let hidden = parts[0].dim(2)?;
                    let pad = Tensor::zeros((1, width - len, hidden), parts[0].dtype(), device)?;
                    parts.insert(0, pad);
                }
                Ok(Tensor::cat(&parts, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// A u32 `[rows, cols]` tensor of position ids, which the model's limit keeps
/// well inside u32.
fn position_ids(
    ids: impl Iterator<Item = u64>,
    shape: (usize, usize),
    device: &candle_core::Device,
) -> Result<Tensor> {
    let ids = ids.map(layout::position_id).collect::<Result<Vec<u32>>>()?;
    Ok(Tensor::from_vec(ids, shape, device)?)
}
