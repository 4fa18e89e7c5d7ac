//! Chunks to anchor K/V: the compressors.
//!
//! - `sac`: the paper's compressor. Each chunk is one bidirectional forward
//!   pass of the base model with LoRA on q/v, the i-th anchor's embedding plus
//!   the i-th role embedding; the anchors' K/V of every layer are kept.
//! - `uniform`: the training-free ablation. The same anchors, a plain causal
//!   pass per chunk, no role embeddings, no LoRA.
//! - `full`: every position's K/V from one causal prefill of the whole
//!   context (chunk by chunk, each chunk seeing all before it): a lossless
//!   prompt cache, the ceiling the others are measured against.

use std::fmt;
use std::str::FromStr;

use candle_core::{D, Device, Tensor};

use crate::adapter::{AdapterConfig, SacAdapter};
use crate::chunk::{self, Chunk};
use crate::error::{Error, Result};
use crate::model::{AttentionMask, Decoder, ForwardInput, KvCache, LayerKv, ModelConfig, Path};

/// Which compressor `sac compress` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Sac,
    Uniform,
    Full,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sac => "sac",
            Method::Uniform => "uniform",
            Method::Full => "full",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sac" => Ok(Method::Sac),
            "uniform" => Ok(Method::Uniform),
            "full" => Ok(Method::Full),
            other => Err(format!(
                "`{other}` is not a compressor; use sac, uniform or full"
            )),
        }
    }
}

/// Positions a context must leave free for the question and its answer.
pub const QUESTION_ROOM: usize = 64;

/// Checks that the compressor settings fit together: `sac` needs an adapter
/// and runs at the adapter's ratio and chunk size; `uniform` and `full` take no
/// adapter, and `full` keeps every token (ratio 1).
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
        (Method::Uniform | Method::Full, Some(_)) => Err(Error::InvalidInput(format!(
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
    /// 1-based position ids of the kept tokens, ascending.
    pub positions: Vec<u32>,
    /// Per layer, `[1, kv_heads, kept, head_dim]`; keys carry RoPE.
    pub layers: Vec<LayerKv>,
}

/// A configured compressor over one model.
#[derive(Debug)]
pub struct Compressor<'a> {
    decoder: &'a Decoder,
    method: Method,
    adapter: Option<&'a SacAdapter>,
    ratio: usize,
    chunk_size: usize,
    path: Path,
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
            path: Path::Inference,
        })
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

    /// Compresses the context `ids` (positions 1..=L), handing each chunk's
    /// kept K/V to `emit` as soon as it is computed, so nothing but the kept
    /// K/V (and, for `full`, the cache it attends to) stays in memory.
    pub fn compress(&self, ids: &[u32], mut emit: impl FnMut(ChunkKv) -> Result<()>) -> Result<()> {
        self.check_fits(ids.len())?;
        let mut cache = KvCache::default();
        for chunk in chunk::chunks(ids.len(), self.chunk_size) {
            let chunk_ids = &ids[chunk.start..chunk.start + chunk.len];
            let kept = match self.method {
                Method::Full => (0..chunk.len).collect(),
                _ => chunk::anchor_offsets(chunk.len, self.ratio),
            };
            let layers = self.run_chunk(&chunk, chunk_ids, &kept, &mut cache)?;
            let positions = kept
                .iter()
                .map(|&o| chunk.first_position() + o as u32)
                .collect();
            emit(ChunkKv {
                chunk,
                positions,
                layers,
            })?;
        }
        Ok(())
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
                Method::Uniform | Method::Full => AttentionMask::Causal,
            },
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
