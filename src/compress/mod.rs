//! Context ids to kept K/V: the compressors, one strategy each.
//!
//! - [`sac`]: the paper's compressor. Each chunk is one bidirectional
//!   forward pass of the base model with LoRA, the i-th anchor's embedding
//!   plus the i-th role embedding; the anchors' K/V of every layer are kept.
//! - [`uniform`]: the training-free ablation. The same anchors (and each
//!   chunk's own sinks), a plain causal pass per chunk.
//! - [`full`]: every position's K/V from one causal prefill of the whole
//!   context: a lossless prompt cache, the ceiling the others are measured
//!   against.
//! - [`kvzip`], [`snapkv`], [`streaming`]: training-free selection from a
//!   full causal prefill ([`select`]); KVzip and SnapKV keep different
//!   positions per layer and KV head.
//! - [`gmsa`]: GMSA's soft tokens: an encoder's hidden states pooled in
//!   groups and aligned to the decoder's input embeddings.
//!
//! A method is a [`Method`] (its name, what it takes, how it is built) and a
//! type implementing [`Strategy`] with its own settings, both in its own
//! file; [`METHODS`] lists them, and nothing else names one. What every
//! method needs from the caller (the decoder, the kernels, progress) comes
//! in a [`Pass`]; [`settings`] checks what the user asked for against what
//! the method takes and has it build its strategy.

pub mod budget;
mod chunked;
pub mod full;
pub mod gmsa;
pub mod kvzip;
mod run;
pub mod sac;
pub mod select;
pub mod settings;
pub mod snapkv;
pub mod streaming;
pub mod uniform;

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::Tensor;

pub use budget::HeadBudget;
pub use kvzip::RepeatPrompt;
pub use settings::{Request, Settings, SettingsError, Trained};

use crate::adapter;
use crate::error::{InputError, Result};
use crate::layout::{self, chunk::Chunk};
use crate::model::{Decoder, Kernels, LayerKv};

/// Every compressor, in the order `--compressor` lists them. A new one is
/// its own file, with its [`Method`], and a line here.
pub static METHODS: &[&Method] = &[
    &sac::METHOD,
    &uniform::METHOD,
    &full::METHOD,
    &kvzip::METHOD,
    &snapkv::METHOD,
    &streaming::METHOD,
    &gmsa::METHOD,
];

/// A compressor: its name (what a .sack records), what it takes, and how
/// its strategy is built from checked [`Settings`].
pub struct Method {
    pub name: &'static str,
    /// One line for `--help`.
    pub summary: &'static str,
    pub takes: Takes,
    /// The strategy for `parts`.
    pub build: for<'a, 'p> fn(&Parts<'a, 'p>) -> Result<Box<dyn Strategy + 'a>>,
}

/// The settings a method takes beyond a ratio and a chunk size, which
/// [`Settings::resolve`] checks a request against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takes {
    /// A trained adapter, which it needs (and whose ratio and chunk size it
    /// runs at); the others refuse one.
    pub adapter: bool,
    /// It keeps every token, and so takes no ratio.
    pub keeps_all: bool,
    /// Attention sinks: tokens at the start always kept.
    pub sinks: bool,
    /// How its budget is spread over layers and heads, by default; `None`
    /// when it has no such choice.
    pub head_budget: Option<HeadBudget>,
    /// A chunk size: it reads the context chunk by chunk. Without, it reads
    /// the whole context as one chunk.
    pub chunks: bool,
}

impl Takes {
    /// What a training-free method takes: no adapter, a ratio, attention
    /// sinks, and no head budget.
    pub const TRAINING_FREE: Takes = Takes {
        adapter: false,
        keeps_all: false,
        sinks: true,
        head_budget: None,
        chunks: true,
    };
}

/// How much a method keeps, and from what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Context tokens per kept token.
    pub ratio: usize,
    /// Tokens per chunk, at most the context's length.
    pub chunk_size: usize,
    /// Tokens at the start of the context (of each chunk for `uniform`)
    /// always kept.
    pub sinks: usize,
}

/// What a [`Method::build`] gets: the resolved settings, the loaded adapter
/// of a trained method, and the document's repeat prompt, made on demand.
pub struct Parts<'a, 'p> {
    pub keep: Keep,
    pub head_budget: HeadBudget,
    pub adapter: Option<&'a adapter::Loaded>,
    pub repeat_prompt: &'p dyn Fn() -> Result<RepeatPrompt>,
}

impl Method {
    /// The compressor to run when none is named: the adapter's method when
    /// there is one, else `kvzip`.
    pub fn default_for(adapter: Option<&Trained>) -> &'static Method {
        adapter.map_or(&kvzip::METHOD, |a| a.method)
    }

    /// The compressor called `name`.
    pub fn named(name: &str) -> Option<&'static Method> {
        METHODS.iter().copied().find(|m| m.name == name)
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Method {}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// What a compressor hands on for one chunk: kept K/V, or soft tokens.
#[derive(Debug, Clone)]
pub enum Emitted {
    Kv(ChunkKv),
    Soft(SoftTokens),
}

impl Emitted {
    /// The kept K/V, for a caller that reads nothing else.
    pub fn into_kv(self) -> Result<ChunkKv> {
        match self {
            Emitted::Kv(chunk) => Ok(chunk),
            Emitted::Soft(_) => Err(InputError::NotKv.into()),
        }
    }
}

/// Input embeddings a decoder reads in place of a chunk of the context.
#[derive(Debug, Clone)]
pub struct SoftTokens {
    pub chunk: Chunk,
    /// `[n, hidden]`.
    pub tokens: Tensor,
}

/// The K/V one chunk contributes to the .sack.
#[derive(Debug, Clone)]
pub struct ChunkKv {
    pub chunk: Chunk,
    pub kept: Kept,
    /// Per layer, `[1, kv_heads, kept, head_dim]`; keys carry RoPE.
    pub layers: Vec<LayerKv>,
}

/// Which tokens of a chunk are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// 1-based position ids every layer and KV head keeps, ascending.
    Shared(Vec<u32>),
    /// Per layer, per KV head, its own 1-based position ids, ascending. A
    /// layer's K/V hold head h's tokens in its first slots, zero-padded to
    /// the layer's longest set.
    PerHead(Vec<Vec<Vec<u32>>>),
}

impl Kept {
    /// K/V pairs kept: tokens times layers times KV heads.
    pub fn pairs(&self, layers: usize, kv_heads: usize) -> usize {
        match self {
            Kept::Shared(positions) => positions.len() * layers * kv_heads,
            Kept::PerHead(sets) => sets.iter().flatten().map(Vec::len).sum(),
        }
    }
}

/// Where a compression's time went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// The whole compression, `emit` included.
    pub total: Duration,
    /// The plain causal prefill of the context inside it, for the compressors
    /// that run one (`full`, `kvzip`, `snapkv`, `streaming`): the baseline
    /// their overhead is measured against.
    pub prefill: Option<Duration>,
}

/// Told of each piece of work as it is done: tokens run through the model.
pub type Progress<'a> = &'a (dyn Fn(u64) + 'a);

/// Receives each chunk's kept K/V (or soft tokens) as soon as it is computed.
pub type Emit<'e> = &'e mut dyn FnMut(Emitted) -> Result<()>;

/// What every compressor runs on: the model, the graph path, and where
/// progress goes.
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    pub decoder: &'a Decoder,
    /// `Kernels::Training` keeps the graph from the adapter's tensors to the
    /// kept K/V, so `sac train` can backpropagate a decoder loss into the
    /// compressor.
    pub kernels: Kernels,
    pub progress: Option<Progress<'a>>,
}

impl fmt::Debug for Pass<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pass")
            .field("kernels", &self.kernels)
            .field("progress", &self.progress.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> Pass<'a> {
    /// An inference pass without progress reports.
    pub fn new(decoder: &'a Decoder) -> Self {
        Pass {
            decoder,
            kernels: Kernels::Inference,
            progress: None,
        }
    }

    /// The time since `started`, once the work queued on the decoder's
    /// device is done: a GPU runs behind the thread that queues its kernels.
    /// Training reads no times, so its passes leave the queue running.
    pub fn elapsed(&self, started: Instant) -> Result<Duration> {
        if self.kernels == Kernels::Inference {
            self.decoder.device().synchronize()?;
        }
        Ok(started.elapsed())
    }

    /// Reports `tokens` more of [`Strategy::work`] done.
    pub fn report(&self, tokens: usize) {
        if let Some(progress) = self.progress {
            progress(tokens as u64);
        }
    }
}

/// What a .sack's header says of the compressor that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub method: &'static Method,
    /// Context tokens per kept token (1 for `full`).
    pub ratio: usize,
    /// Tokens per chunk: a .sack segment, and the unit of work.
    pub chunk_size: usize,
    /// Whether each layer and KV head keeps its own positions.
    pub per_head: bool,
    /// Whether it emits soft tokens rather than K/V.
    pub soft_tokens: bool,
}

/// One compression method with its settings.
pub trait Strategy: fmt::Debug {
    fn facts(&self) -> Facts;

    /// Learned embeddings `[n, hidden]` the decoder reads just before the
    /// question (SAC's `[LM]`).
    fn prefix(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The tokens compressing a context of `len` tokens runs through the
    /// model, which [`Pass::report`] counts off.
    fn work(&self, len: usize) -> u64 {
        len as u64
    }

    /// What [`Strategy::work`] counts, for a progress bar.
    fn work_label(&self) -> &'static str {
        "tokens"
    }

    /// Positions the compressor reads after a context of `len` tokens
    /// (`kvzip` asks the model to repeat it there); see [`layout::check_fits`].
    fn reads_after(&self, _len: usize) -> usize {
        0
    }

    /// Compresses the context `ids`, handing what each chunk gives (kept
    /// K/V at positions 1..=L, or soft tokens) to `emit` in order. Callers go
    /// through [`Compressor`], which checks the context fits first.
    fn compress(&self, pass: &Pass, ids: &[u32], emit: Emit) -> Result<Cost>;
}

/// A strategy and the pass it runs on.
#[derive(Debug)]
pub struct Compressor<'a> {
    strategy: Box<dyn Strategy + 'a>,
    pass: Pass<'a>,
}

impl<'a> Compressor<'a> {
    pub fn new(decoder: &'a Decoder, strategy: Box<dyn Strategy + 'a>) -> Self {
        Compressor {
            strategy,
            pass: Pass::new(decoder),
        }
    }

    /// Reports the work as it is done, [`Strategy::work`] in all.
    pub fn with_progress(mut self, progress: Progress<'a>) -> Self {
        self.pass.progress = Some(progress);
        self
    }

    /// Runs on `kernels` (see [`Pass::kernels`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.pass.kernels = kernels;
        self
    }

    pub fn strategy(&self) -> &dyn Strategy {
        self.strategy.as_ref()
    }

    pub fn decoder(&self) -> &'a Decoder {
        self.pass.decoder
    }

    /// Refuses a context of `len` tokens that leaves the question, or what
    /// the compressor reads after the context, no room inside the model's
    /// positions.
    pub fn check_document(&self, len: usize) -> Result<()> {
        let config = self.pass.decoder.config();
        layout::check_fits(config, len, layout::QUESTION_ROOM)?;
        let room = self.strategy.reads_after(len);
        let limit = layout::attention_limit(config);
        if room > 0 && len + room > limit {
            return Err(SettingsError::ReadsPastModel {
                method: self.strategy.facts().method,
                len,
                room,
                limit,
            }
            .into());
        }
        Ok(())
    }

    /// Compresses the context `ids`, handing each chunk's kept K/V (or soft
    /// tokens) to `emit` as soon as it is computed, so nothing but what is
    /// kept (and, for the compressors that prefill, the cache they attend
    /// to) stays in memory.
    pub fn compress(
        &self,
        ids: &[u32],
        mut emit: impl FnMut(Emitted) -> Result<()>,
    ) -> Result<Cost> {
        self.check_document(ids.len())?;
        self.strategy.compress(&self.pass, ids, &mut emit)
    }

    /// The kept K/V of the whole context `ids`, every layer's chunks
    /// concatenated along the sequence axis: the past the decoder reads.
    pub fn anchor_past(&self, ids: &[u32]) -> Result<Vec<LayerKv>> {
        let mut chunks: Vec<Vec<LayerKv>> = Vec::new();
        self.compress(ids, |out| {
            chunks.push(out.into_kv()?.layers);
            Ok(())
        })?;
        LayerKv::concat_chunks(&chunks)
    }
}
