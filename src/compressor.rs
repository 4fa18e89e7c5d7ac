//! Chunks to anchor K/V: the compressors.
//!
//! - `sac`: the paper's compressor. Each chunk is one bidirectional forward
//!   pass of the base model with LoRA (q/v in the paper), the i-th anchor's embedding plus
//!   the i-th role embedding; the anchors' K/V of every layer are kept.
//! - `uniform`: the training-free ablation. The same anchors, a plain causal
//!   pass per chunk, no role embeddings, no LoRA.
//! - `full`: every position's K/V from one causal prefill of the whole
//!   context (chunk by chunk, each chunk seeing all before it): a lossless
//!   prompt cache, the ceiling the others are measured against.
//! - `kvzip`, `snapkv`, `streaming`: training-free selection from a full
//!   causal prefill ([`crate::select`]); KVzip and SnapKV keep different
//!   positions per layer and KV head.

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::{D, Device, Tensor};

use crate::adapter::{AdapterConfig, SacAdapter};
use crate::chunk::{self, Chunk};
use crate::error::{Error, Result};
use crate::model::{AttentionMask, Decoder, ForwardInput, KvCache, LayerKv, ModelConfig, Path};
use crate::select::budget::HeadBudget;

/// Which compressor `sac compress` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Sac,
    Uniform,
    Full,
    Kvzip,
    Snapkv,
    Streaming,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sac => "sac",
            Method::Uniform => "uniform",
            Method::Full => "full",
            Method::Kvzip => "kvzip",
            Method::Snapkv => "snapkv",
            Method::Streaming => "streaming",
        }
    }

    /// Whether each layer and KV head keeps its own positions.
    pub fn keeps_per_head(self) -> bool {
        matches!(self, Method::Kvzip | Method::Snapkv)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Positions a context must leave free for the question and its answer.
pub const QUESTION_ROOM: usize = 64;

/// Checks that the compressor settings fit together: `sac` needs an adapter
/// and runs at the adapter's ratio and chunk size; the others take no adapter,
/// and `full` keeps every token (ratio 1).
pub fn check_settings(
    method: Method,
    adapter: Option<&AdapterConfig>,
    ratio: usize,
    chunk_size: usize,
) -> Result<()> {
    if ratio == 0 || chunk_size == 0 {
        return Err(Error::InvalidInput(
            "ratio and chunk size must be positive".into(),
        ));
    }
    match (method, adapter) {
        (Method::Sac, None) => Err(Error::InvalidInput(
            "the sac compressor needs an adapter (--adapter DIR); without one, use --compressor uniform"
                .into(),
        )),
        (Method::Sac, Some(a)) if (a.ratio, a.chunk_size) != (ratio, chunk_size) => {
            Err(Error::InvalidInput(format!(
                "the adapter was trained for ratio {} and chunk size {}, not {ratio} and {chunk_size}",
                a.ratio, a.chunk_size
            )))
        }
        (_, Some(_)) if method != Method::Sac => Err(Error::InvalidInput(format!(
            "the {method} compressor takes no adapter"
        ))),
        (Method::Full, None) if ratio != 1 => Err(Error::InvalidInput(
            "the full compressor keeps every token; it takes no ratio".into(),
        )),
        _ => Ok(()),
    }
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

/// A configured compressor over one model.
pub struct Compressor<'a> {
    decoder: &'a Decoder,
    method: Method,
    adapter: Option<&'a SacAdapter>,
    ratio: usize,
    chunk_size: usize,
    repeat_prompt: Option<crate::select::RepeatPrompt>,
    sinks: usize,
    head_budget: Option<HeadBudget>,
    path: Path,
    progress: Option<Progress<'a>>,
}

impl std::fmt::Debug for Compressor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("method", &self.method)
            .field("ratio", &self.ratio)
            .field("chunk_size", &self.chunk_size)
            .field("sinks", &self.sinks)
            .field("head_budget", &self.head_budget())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<'a> Compressor<'a> {
    /// `sac` needs an adapter, which fixes the ratio and chunk size; the others
    /// take no adapter. See [`check_settings`].
    pub fn new(
        decoder: &'a Decoder,
        method: Method,
        adapter: Option<&'a SacAdapter>,
        ratio: usize,
        chunk_size: usize,
    ) -> Result<Self> {
        check_settings(method, adapter.map(|a| &a.config), ratio, chunk_size)?;
        Ok(Compressor {
            decoder,
            method,
            adapter,
            ratio,
            chunk_size,
            repeat_prompt: None,
            sinks: crate::select::SINKS,
            head_budget: None,
            path: Path::Inference,
            progress: None,
        })
    }

    /// Reports the work as it is done, [`Compressor::work`] in all, so that
    /// a progress bar moves during a selector's prefill and `kvzip`'s
    /// repeat passes too, not only as chunks are emitted.
    pub fn with_progress(mut self, progress: Progress<'a>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The tokens compressing a context of `len` tokens runs through the
    /// model: each once, and for `kvzip` once more, the chunks it repeats.
    pub fn work(&self, len: usize) -> u64 {
        let repeated: usize = match self.method {
            Method::Kvzip => crate::select::kvzip::scored_chunks(len, self.chunk_size, self.sinks)
                .iter()
                .map(|range| range.len())
                .sum(),
            _ => 0,
        };
        (len + repeated) as u64
    }

    /// Reports `tokens` more of [`Compressor::work`] done.
    pub(crate) fn report(&self, tokens: usize) {
        if let Some(progress) = self.progress {
            progress(tokens as u64);
        }
    }

    /// Runs the chunks on `path`: `Path::Training` keeps the graph from the
    /// adapter's tensors to the kept K/V, so `sac train` can backpropagate a
    /// decoder loss into the compressor.
    pub fn with_path(mut self, path: Path) -> Self {
        self.path = path;
        self
    }

    /// Refuses a context of `len` tokens that leaves the question no room
    /// inside the model's positions.
    pub fn check_fits(&self, len: usize) -> Result<()> {
        check_fits(self.decoder.config(), len, QUESTION_ROOM)
    }

    pub fn method(&self) -> Method {
        self.method
    }

    pub fn adapter(&self) -> Option<&'a SacAdapter> {
        self.adapter
    }

    pub fn ratio(&self) -> usize {
        self.ratio
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    pub fn decoder(&self) -> &'a Decoder {
        self.decoder
    }

    /// Tokens at the start of the context (for `uniform`, of every chunk)
    /// that every head keeps: the attention sinks. Not used by `sac` and
    /// `full`.
    pub fn sinks(&self) -> usize {
        self.sinks
    }

    /// Keeps the first `sinks` tokens ([`crate::select::SINKS`] unless
    /// told); 0 gives the reference's `uniform` and kvpress's `SnapKVPress`.
    pub fn with_sinks(mut self, sinks: usize) -> Self {
        self.sinks = sinks;
        self
    }

    /// How `kvzip` and `snapkv` spread their budget over layers and heads:
    /// as told, else `kvzip` shares one budget (as KVzip does) and `snapkv`
    /// gives every head the same (as kvpress's `SnapKVPress` does).
    pub fn head_budget(&self) -> HeadBudget {
        self.head_budget.unwrap_or(match self.method {
            Method::Kvzip => HeadBudget::Shared,
            _ => HeadBudget::Even,
        })
    }

    pub fn with_head_budget(mut self, spread: HeadBudget) -> Self {
        self.head_budget = Some(spread);
        self
    }

    pub fn repeat_prompt(&self) -> Option<&crate::select::RepeatPrompt> {
        self.repeat_prompt.as_ref()
    }

    /// The prompt `kvzip` asks the model to reconstruct the context with;
    /// `kvzip` refuses to run without one.
    pub fn with_repeat_prompt(mut self, prompt: crate::select::RepeatPrompt) -> Self {
        self.repeat_prompt = Some(prompt);
        self
    }

    /// [`Compressor::check_fits`], plus what a compressor needs beyond the
    /// question's room (`kvzip` places its repeat prompt after the context).
    pub fn check_document(&self, len: usize) -> Result<()> {
        self.check_fits(len)?;
        crate::select::check_fits(self, len)
    }

    /// Compresses the context `ids` (positions 1..=L), handing each chunk's
    /// kept K/V to `emit` as soon as it is computed, so nothing but the kept
    /// K/V (and, for `full` and the selectors, the cache they attend to)
    /// stays in memory.
    pub fn compress(
        &self,
        ids: &[u32],
        mut emit: impl FnMut(ChunkKv) -> Result<()>,
    ) -> Result<Cost> {
        self.check_document(ids.len())?;
        if let Some(select) = crate::select::selector(self.method) {
            return crate::select::compress(self, select, ids, emit);
        }
        let started = Instant::now();
        let mut cache = KvCache::default();
        for chunk in chunk::chunks(ids.len(), self.chunk_size) {
            let chunk_ids = &ids[chunk.start..chunk.start + chunk.len];
            let kept = match self.method {
                Method::Full => (0..chunk.len).collect(),
                Method::Uniform => chunk::uniform_offsets(chunk.len, self.ratio, self.sinks),
                _ => chunk::anchor_offsets(chunk.len, self.ratio),
            };
            let layers = self.run_chunk(&chunk, chunk_ids, &kept, &mut cache)?;
            self.report(chunk.len);
            let positions = kept
                .iter()
                .map(|&o| chunk.first_position() + o as u32)
                .collect();
            emit(ChunkKv {
                chunk,
                kept: Kept::Shared(positions),
                layers,
            })?;
        }
        let total = started.elapsed();
        Ok(Cost {
            total,
            prefill: (self.method == Method::Full).then_some(total),
        })
    }

    /// The kept K/V of the whole context `ids`, every layer's chunks
    /// concatenated along the sequence axis: the past the decoder reads.
    pub fn anchor_past(&self, ids: &[u32]) -> Result<Vec<LayerKv>> {
        let mut chunks: Vec<Vec<LayerKv>> = Vec::new();
        self.compress(ids, |chunk| {
            chunks.push(chunk.layers);
            Ok(())
        })?;
        let layers = chunks.first().map_or(0, Vec::len);
        (0..layers)
            .map(|layer| {
                let keys: Vec<&Tensor> = chunks.iter().map(|c| &c[layer].k).collect();
                let values: Vec<&Tensor> = chunks.iter().map(|c| &c[layer].v).collect();
                Ok(LayerKv {
                    k: Tensor::cat(&keys, 2)?,
                    v: Tensor::cat(&values, 2)?,
                })
            })
            .collect()
    }

    fn run_chunk(
        &self,
        chunk: &Chunk,
        ids: &[u32],
        kept: &[usize],
        cache: &mut KvCache,
    ) -> Result<Vec<LayerKv>> {
        let device = self.decoder.device();
        let ids_t = Tensor::new(ids, device)?.unsqueeze(0)?;
        let positions = Tensor::new(chunk.positions().as_slice(), device)?.unsqueeze(0)?;
        let kept_t = offsets_tensor(kept, device)?;
        let mut embeds = self.decoder.embed(&ids_t)?;
        if let (Method::Sac, Some(adapter)) = (self.method, self.adapter) {
            embeds = (embeds + role_embeddings(adapter, chunk.len, &kept_t, kept.len())?)?;
        }
        let past = if self.method == Method::Full {
            cache.past()?
        } else {
            None
        };
        let out = self.decoder.forward(ForwardInput {
            embeds: &embeds,
            positions: &positions,
            mask: match self.method {
                Method::Sac => AttentionMask::Full,
                _ => AttentionMask::Causal,
            },
            shared: None,
            past: past.as_deref(),
            lora: self.adapter.map(|a| &a.lora),
            path: self.path,
        })?;
        if self.method == Method::Full {
            cache.append(&out.kv)?;
            return Ok(out.kv);
        }
        out.kv.iter().map(|l| l.select(&kept_t)).collect()
    }
}

/// Refuses a context of `len` tokens (positions 1..=len) when the `room`
/// positions the decoder reads after it do not fit the model's positions or
/// its sliding window.
pub fn check_fits(config: &ModelConfig, len: usize, room: usize) -> Result<()> {
    let limit = config.max_position_embeddings;
    if len + room > limit {
        return Err(Error::InvalidInput(format!(
            "the document is {len} tokens long, but the model reads at most {limit} positions \
             and the decoder needs {room} after it; use a model with a longer context"
        )));
    }
    if let Some(window) = config.sliding_window.filter(|&w| len + room > w) {
        return Err(Error::InvalidInput(format!(
            "the document is {len} tokens long, but the model attends within a {window}-token \
             sliding window, which sac does not implement; use a shorter document or another model"
        )));
    }
    Ok(())
}

fn offsets_tensor(offsets: &[usize], device: &Device) -> Result<Tensor> {
    let offsets: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    Ok(Tensor::new(offsets.as_slice(), device)?)
}

/// `[1, len, hidden]`: role embedding i at the i-th kept offset, zero elsewhere.
fn role_embeddings(
    adapter: &SacAdapter,
    len: usize,
    kept: &Tensor,
    count: usize,
) -> Result<Tensor> {
    let roles = &adapter.role_tokens;
    let hidden = roles.dim(D::Minus1)?;
    let zeros = Tensor::zeros((len, hidden), roles.dtype(), roles.device())?;
    Ok(zeros
        .index_add(kept, &roles.narrow(0, 0, count)?, 0)?
        .unsqueeze(0)?)
}
