//! A .sack to what the decoder reads: the layout questions are framed in,
//! and every layer's kept K/V as decoder-ready tensors. Per-head kept sets
//! (KVzip, SnapKV) load padded to each layer's longest set, the padding
//! hidden by a `-inf` score bias. Soft tokens (GMSA) are read by the decoder
//! once, as input embeddings, and their K/V are the past questions read.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::adapter::{self, GmsaAdapter};
use crate::error::Result;
use crate::fingerprint::DigestCache;
use crate::generate::DecoderContext;
use crate::layout::prompt::{PromptFormat, PromptLayout};
use crate::layout::{self, FitError};
use crate::model::{Decoder, ForwardInput, HeadPairs, ModelLora, SharedKv};
use crate::sack::{self, KeyRope, SackHeader, SackReader, info};

/// A .sack whose context this model cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error(
        "{file} holds K/V for {} layers x {} KV heads x {} dims, the model has {} x {} x {}",
        stored.0, stored.1, stored.2, model.0, model.1, model.2
    )]
    Shape {
        file: String,
        stored: (u32, u32, u32),
        model: (usize, usize, usize),
    },
    #[error(
        "{file}: learned prefix embeddings have width {width}, the model's hidden size is {hidden}"
    )]
    PrefixWidth {
        file: String,
        width: usize,
        hidden: usize,
    },
    #[error("{file} stores keys rotated as a contiguous prefix, which sac does not read")]
    SequentialRope { file: String },
    #[error("{file} holds no soft tokens")]
    NoSoftTokens { file: String },
    #[error("{file} holds soft tokens of width {width}, the model's hidden size is {hidden}")]
    SoftTokenWidth {
        file: String,
        width: u32,
        hidden: usize,
    },
    #[error(
        "{file} is answered with the decoder LoRA of adapter {id} ({fingerprint}), which was not given"
    )]
    NeedsAdapter {
        file: String,
        id: String,
        fingerprint: String,
    },
    #[error("{file} is answered by the base model alone, not with the adapter {}", dir.display())]
    AdapterNotNeeded { file: String, dir: PathBuf },
    #[error(
        "{file} is answered with the decoder LoRA of adapter {named}, and {} is another ({found})",
        dir.display()
    )]
    OtherAdapter {
        file: String,
        /// Its id and fingerprint.
        named: String,
        dir: PathBuf,
        found: String,
    },
    #[error("the adapter {} has no decoder LoRA", .0.display())]
    NoDecoderLora(PathBuf),
}

/// How the document of `header` was framed, so questions are framed alike.
pub fn layout(header: &SackHeader) -> PromptLayout {
    match &header.decoder.prompt {
        None => PromptLayout::raw(),
        Some(p) => PromptLayout {
            // `validate` admits only "raw" and "chat".
            format: PromptFormat::from_name(&p.format).unwrap_or(PromptFormat::Raw),
            before_document: p.before_document.clone(),
            before_question: p.before_question.clone(),
            after_question: p.after_question.clone(),
        },
    }
}

/// Reads every layer of a .sack into the past the decoder attends to. Keys
/// stored before RoPE are rotated here, at their document positions. A file
/// whose header names an adapter for the decoder is read with the decoder
/// LoRA of `adapter`, checked against this file's header by
/// [`check_adapter`].
pub fn load_context<R: Read + Seek>(
    reader: &mut SackReader<R>,
    decoder: &Decoder,
    adapter: CheckedAdapter,
) -> Result<DecoderContext> {
    let header = reader.header().clone();
    let lora = decoder_lora(adapter, decoder)?;
    let c = decoder.config();
    let m = &header.model;
    if (m.layers as usize, m.kv_heads as usize, m.head_dim as usize)
        != (c.num_layers, c.num_kv_heads, c.head_dim)
    {
        return Err(ContextError::Shape {
            file: reader.file_name().into(),
            stored: (m.layers, m.kv_heads, m.head_dim),
            model: (c.num_layers, c.num_kv_heads, c.head_dim),
        }
        .into());
    }
    if let Some(soft) = header.soft_tokens {
        if soft.hidden as usize != c.hidden_size {
            return Err(ContextError::SoftTokenWidth {
                file: reader.file_name().into(),
                width: soft.hidden,
                hidden: c.hidden_size,
            }
            .into());
        }
        return soft_context(reader, decoder, &header, lora);
    }
    let first = header.decoder.first_position;
    let mut past = Vec::with_capacity(c.num_layers);
    for layer in 0..m.layers {
        let read = reader.read_layer(layer)?;
        past.push(layer_kv(read, decoder, &header, reader.file_name())?);
    }
    let question_position = u64::from(first) + header.document.tokens;
    if question_position >= c.max_position_embeddings as u64 {
        return Err(FitError::SackPastPositions {
            file: reader.file_name().into(),
            tokens: header.document.tokens,
            limit: c.max_position_embeddings,
        }
        .into());
    }
    let question_position = layout::position_id(question_position)?;
    let prefix = header.decoder.prefix_embeddings;
    let prefix = if prefix.is_empty() {
        None
    } else {
        if prefix[0].len() != c.hidden_size {
            return Err(ContextError::PrefixWidth {
                file: reader.file_name().into(),
                width: prefix[0].len(),
                hidden: c.hidden_size,
            }
            .into());
        }
        let rows = prefix.len();
        let flat: Vec<f32> = prefix.into_iter().flatten().collect();
        Some(
            Tensor::from_vec(flat, (rows, c.hidden_size), decoder.device())?
                .to_dtype(decoder.dtype())?,
        )
    };
    Ok(DecoderContext {
        past,
        question_position,
        prefix,
        lora: None,
    })
}

/// The past of a file of soft tokens: the decoder's K/V over them, read as
/// input embeddings from the header's first position.
fn soft_context<R: Read + Seek>(
    reader: &mut SackReader<R>,
    decoder: &Decoder,
    header: &SackHeader,
    lora: Option<ModelLora>,
) -> Result<DecoderContext> {
    let c = decoder.config();
    // Rows as the directory lists them, checked before any is read.
    let rows: u64 = reader
        .tensors()
        .iter()
        .map(|e| e.shape.first().copied().unwrap_or(0))
        .sum();
    let first = u64::from(header.decoder.first_position);
    if first + rows >= c.max_position_embeddings as u64 {
        return Err(FitError::SackPastPositions {
            file: reader.file_name().into(),
            tokens: rows,
            limit: c.max_position_embeddings,
        }
        .into());
    }
    let (values, n) = reader.read_soft_tokens()?;
    if n == 0 {
        return Err(ContextError::NoSoftTokens {
            file: reader.file_name().into(),
        }
        .into());
    }
    let tokens = Tensor::from_vec(values, (n, c.hidden_size), decoder.device())?
        .to_dtype(decoder.dtype())?;
    soft_past(decoder, &tokens, layout::position_id(first)?, lora)
}

/// The decoder LoRA of a checked adapter, if there is one.
fn decoder_lora(adapter: CheckedAdapter, decoder: &Decoder) -> Result<Option<ModelLora>> {
    let Some(dir) = adapter.0 else {
        return Ok(None);
    };
    let c = decoder.config();
    GmsaAdapter::load(dir, c, decoder.device(), decoder.dtype())?
        .decoder_lora
        .map(Some)
        .ok_or_else(|| ContextError::NoDecoderLora(dir.to_path_buf()).into())
}

/// The adapter directory a .sack's answers are read with, as
/// [`check_adapter`] found it; the only way to make one, so that
/// [`load_context`] never reads a file with an unchecked adapter.
#[derive(Debug, Clone, Copy)]
pub struct CheckedAdapter<'a>(Option<&'a Path>);

/// The adapter directory the answers of a .sack (`file`, with `header`)
/// are read with: none when the header names no adapter, else `dir`, which
/// the user gives and whose fingerprint must be the one named. The file
/// names its adapter; it never chooses one to load. Nothing is loaded, so
/// `ask` checks this before the model.
pub fn check_adapter<'a>(
    header: &SackHeader,
    file: &str,
    dir: Option<&'a Path>,
) -> Result<CheckedAdapter<'a>> {
    let (named, dir) = match (&header.decoder.adapter, dir) {
        (None, None) => return Ok(CheckedAdapter(None)),
        (None, Some(dir)) => {
            return Err(ContextError::AdapterNotNeeded {
                file: file.into(),
                dir: dir.to_path_buf(),
            }
            .into());
        }
        (Some(named), None) => {
            return Err(ContextError::NeedsAdapter {
                file: file.into(),
                id: info::clean(&named.id),
                fingerprint: info::clean(&named.fingerprint),
            }
            .into());
        }
        (Some(named), Some(dir)) => (named, dir),
    };
    let found = adapter::fingerprint(dir, &mut DigestCache::open_default())?;
    if found != named.fingerprint {
        return Err(ContextError::OtherAdapter {
            file: file.into(),
            named: format!(
                "{} ({})",
                info::clean(&named.id),
                info::clean(&named.fingerprint)
            ),
            dir: dir.to_path_buf(),
            found,
        }
        .into());
    }
    Ok(CheckedAdapter(Some(dir)))
}

/// The past of soft tokens `[n, hidden]` (in the model's dtype): the K/V
/// over them of the decoder (with `lora`, a GMSA adapter's decoder LoRA, if
/// given), read as input embeddings from position `first`; the question
/// follows at `first + n`, read with the same LoRA. Positions are checked by
/// the caller.
pub fn soft_past(
    decoder: &Decoder,
    tokens: &Tensor,
    first: u32,
    lora: Option<ModelLora>,
) -> Result<DecoderContext> {
    let n = tokens.dim(0)?;
    let question_position = first as u64 + n as u64;
    let positions =
        Tensor::arange(first, question_position as u32, decoder.device())?.unsqueeze(0)?;
    let out = decoder.forward(ForwardInput {
        lora: lora.as_ref(),
        ..ForwardInput::causal(&tokens.unsqueeze(0)?, &positions)
    })?;
    Ok(DecoderContext {
        past: out.kv.into_iter().map(SharedKv::from).collect(),
        question_position: layout::position_id(question_position)?,
        prefix: None,
        lora,
    })
}

/// One layer of a .sack as the decoder reads it: heads that keep different
/// positions are padded ([`SharedKv::from_heads`]); keys stored before RoPE
/// are rotated to their positions.
fn layer_kv(
    layer: sack::StoredLayer,
    decoder: &Decoder,
    header: &SackHeader,
    file: &str,
) -> Result<SharedKv> {
    if header.kv.key_rope == KeyRope::Sequential {
        return Err(ContextError::SequentialRope { file: file.into() }.into());
    }
    let first = i64::from(header.decoder.first_position);
    let c = decoder.config();
    let ragged = layer
        .heads
        .iter()
        .any(|h| h.positions != layer.heads[0].positions);
    let longest = layer
        .heads
        .iter()
        .map(|h| h.positions.len())
        .max()
        .unwrap_or(0);
    // Keys stored before RoPE: each head's position ids, padded as its K/V are.
    let positions = (header.kv.key_rope == KeyRope::None).then(|| {
        layer
            .heads
            .iter()
            .flat_map(|h| {
                h.positions
                    .iter()
                    .map(|&p| first + i64::from(p))
                    .chain(std::iter::repeat_n(first, longest - h.positions.len()))
            })
            .collect::<Vec<i64>>()
    });
    let heads = layer
        .heads
        .into_iter()
        .map(|h| HeadPairs {
            keys: h.keys,
            values: h.values,
        })
        .collect();
    let mut shared =
        SharedKv::from_heads(heads, c.head_dim, ragged, decoder.device(), decoder.dtype())?;
    if let Some(positions) = positions {
        let k = &shared.kv.k;
        let positions = Tensor::from_vec(positions, (c.num_kv_heads, longest), k.device())?;
        let heads = (0..c.num_kv_heads)
            .map(|h| decoder.rotate(&k.narrow(1, h, 1)?, &positions.narrow(0, h, 1)?))
            .collect::<Result<Vec<_>>>()?;
        shared.kv.k = Tensor::cat(&heads, 1)?;
    }
    Ok(shared)
}
