//! Anchor K/V to a .sack and back: the header that describes a compressed
//! document, one segment per compressor chunk on the way out, decoder-ready
//! tensors on the way in.

use std::io::{Read, Seek};

use candle_core::{DType, Tensor};

use crate::compressor::{ChunkKv, Compressor};
use crate::error::{Error, Result};
use crate::generate::DecoderContext;
use crate::model::{Decoder, LayerKv};
use crate::runtime::LoadedModel;
use crate::sack::{
    CompressorInfo, DecoderInfo, DocumentInfo, Floats, KeptLayout, KeptSet, KeyRope, KvInfo,
    KvSlot, ModelInfo, SackHeader, SackReader, SackWriter, Sink, TokenizerInfo, now_rfc3339,
};

/// Position id of a document's first token: SAC numbers positions from 1.
pub const FIRST_POSITION: u32 = 1;

/// The document being compressed, as the header records it.
#[derive(Debug, Clone)]
pub struct DocumentFacts<'a> {
    pub text: &'a str,
    pub tokens: usize,
    pub name: Option<String>,
}

/// The header of a .sack that `compressor` makes of `document` with `model`.
pub fn header(
    model: &LoadedModel,
    compressor: &Compressor,
    adapter_fingerprint: Option<String>,
    document: &DocumentFacts,
) -> Result<SackHeader> {
    let c = &model.config;
    let prefix = match compressor.adapter() {
        Some(adapter) => vec![
            adapter
                .lm_embedding()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        ],
        None => Vec::new(),
    };
    Ok(SackHeader {
        producer: format!("sac {}", env!("CARGO_PKG_VERSION")),
        created: now_rfc3339(),
        model: ModelInfo {
            id: model.files.id.clone(),
            fingerprint: model.fingerprint.model.clone(),
            layers: c.num_layers as u32,
            kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
        },
        tokenizer: TokenizerInfo {
            fingerprint: model.fingerprint.tokenizer.clone(),
        },
        compressor: CompressorInfo {
            method: compressor.method().name().into(),
            ratio: compressor.ratio() as f64,
            chunk_size: compressor.chunk_size() as u32,
            adapter_fingerprint,
        },
        document: DocumentInfo::of_text(
            document.text.as_bytes(),
            document.tokens as u64,
            document.name.clone(),
        ),
        kv: KvInfo {
            layout: KeptLayout::Shared,
            key_rope: KeyRope::Kept,
        },
        decoder: DecoderInfo {
            first_position: FIRST_POSITION,
            prefix_embeddings: prefix,
        },
    })
}

/// Writes one chunk's kept K/V as segment `chunk.index` of a shared layout.
pub fn write_chunk<S: Sink>(writer: &mut SackWriter<S>, chunk: &ChunkKv) -> Result<()> {
    let segment = chunk.chunk.index as u32;
    let indices: Vec<u32> = chunk.positions.iter().map(|p| p - FIRST_POSITION).collect();
    writer.add_positions(segment, KeptSet::Shared, &indices)?;
    for (layer, kv) in chunk.layers.iter().enumerate() {
        let keys = floats(&kv.k)?;
        let values = floats(&kv.v)?;
        let slot = KvSlot {
            layer: layer as u32,
            head: None,
        };
        writer.add_kv(segment, slot, Floats::F32(&keys), Floats::F32(&values))?;
    }
    Ok(())
}

fn floats(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Reads every layer of a .sack into the past the decoder attends to. Keys
/// stored before RoPE are rotated here, at their document positions.
pub fn load_context<R: Read + Seek>(
    reader: &mut SackReader<R>,
    decoder: &Decoder,
) -> Result<DecoderContext> {
    let header = reader.header().clone();
    let c = decoder.config();
    let m = &header.model;
    if (m.layers as usize, m.kv_heads as usize, m.head_dim as usize)
        != (c.num_layers, c.num_kv_heads, c.head_dim)
    {
        return Err(Error::InvalidInput(format!(
            "{} holds K/V for {} layers x {} KV heads x {} dims, the model has {} x {} x {}",
            reader.file_name(),
            m.layers,
            m.kv_heads,
            m.head_dim,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim
        )));
    }
    let first = header.decoder.first_position;
    let device = decoder.device();
    let mut past = Vec::with_capacity(c.num_layers);
    for layer in 0..m.layers {
        let stacked = reader.read_layer(layer)?.into_stacked().map_err(|_| {
            Error::InvalidInput(format!(
                "{} keeps different positions per KV head, which this decoder cannot read yet",
                reader.file_name()
            ))
        })?;
        let shape = (1, c.num_kv_heads, stacked.positions.len(), c.head_dim);
        let load = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(decoder.dtype())?)
        };
        let mut k = load(stacked.keys)?;
        let v = load(stacked.values)?;
        match header.kv.key_rope {
            KeyRope::Kept => {}
            KeyRope::None => {
                let positions: Vec<i64> = stacked
                    .positions
                    .iter()
                    .map(|&p| i64::from(first) + i64::from(p))
                    .collect();
                let positions = Tensor::new(positions.as_slice(), device)?.unsqueeze(0)?;
                k = decoder.rotate(&k, &positions)?;
            }
            KeyRope::Sequential => {
                return Err(Error::InvalidInput(format!(
                    "{} stores keys rotated as a contiguous prefix, which sac does not read",
                    reader.file_name()
                )));
            }
        }
        past.push(LayerKv { k, v });
    }
    let question_position = u64::from(first) + header.document.tokens;
    if question_position >= c.max_position_embeddings as u64 {
        return Err(Error::InvalidInput(format!(
            "{} holds a {}-token document, but the model reads at most {} positions",
            reader.file_name(),
            header.document.tokens,
            c.max_position_embeddings
        )));
    }
    let question_position = u32::try_from(question_position)
        .map_err(|_| Error::InvalidInput("the document is too long for u32 positions".into()))?;
    let prefix = header.decoder.prefix_embeddings;
    let prefix = if prefix.is_empty() {
        None
    } else {
        if prefix[0].len() != c.hidden_size {
            return Err(Error::InvalidInput(format!(
                "{}: learned prefix embeddings have width {}, the model's hidden size is {}",
                reader.file_name(),
                prefix[0].len(),
                c.hidden_size
            )));
        }
        let rows = prefix.len();
        let flat: Vec<f32> = prefix.into_iter().flatten().collect();
        Some(Tensor::from_vec(flat, (rows, c.hidden_size), device)?.to_dtype(decoder.dtype())?)
    };
    Ok(DecoderContext {
        past,
        question_position,
        prefix,
    })
}
