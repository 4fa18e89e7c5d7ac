//! Kept K/V to a .sack and back: the header that describes a compressed
//! document, one segment per compressor chunk on the way out, decoder-ready
//! tensors on the way in. Per-head kept sets (KVzip, SnapKV) load padded to
//! each layer's longest set, the padding hidden by a `-inf` score bias.

use std::io::{Read, Seek};

use candle_core::{DType, Device, Tensor};

use crate::compressor::{ChunkKv, Compressor, Kept};
use crate::error::{Error, Result};
use crate::generate::DecoderContext;
use crate::model::{Decoder, LayerKv, SharedKv};
use crate::prompt::{PromptFormat, PromptLayout};
use crate::runtime::LoadedModel;
use crate::sack::{
    self, CompressorInfo, DecoderInfo, DocumentInfo, Floats, KeptLayout, KeptSet, KeyRope, KvInfo,
    KvSlot, ModelInfo, PromptInfo, SackHeader, SackReader, SackWriter, Sink, TokenizerInfo,
    now_rfc3339,
};

/// Position id of a document's first token: SAC numbers positions from 1.
pub const FIRST_POSITION: u32 = 1;

/// The document being compressed, as the header records it.
#[derive(Debug, Clone)]
pub struct DocumentFacts<'a> {
    pub text: &'a str,
    pub tokens: usize,
    pub name: Option<String>,
    /// How the document (and so every question) is framed.
    pub layout: &'a PromptLayout,
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
            revision: model.files.revision.clone(),
            file: model.files.hub_gguf_file(),
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
            layout: match compressor.method().keeps_per_head() {
                true => KeptLayout::PerHead,
                false => KeptLayout::Shared,
            },
            key_rope: KeyRope::Kept,
        },
        decoder: DecoderInfo {
            first_position: FIRST_POSITION,
            prefix_embeddings: prefix,
            // The raw layout is what a header without `prompt` means, so
            // such files stay readable by readers older than minor version 2.
            prompt: (*document.layout != PromptLayout::raw()).then(|| PromptInfo {
                format: document.layout.format.name().into(),
                before_document: document.layout.before_document.clone(),
                before_question: document.layout.before_question.clone(),
                after_question: document.layout.after_question.clone(),
            }),
        },
    })
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

/// Writes one chunk's kept K/V as segment `chunk.index`, in the layout its
/// kept sets have (the header's, see [`header`]).
pub fn write_chunk<S: Sink>(writer: &mut SackWriter<S>, chunk: &ChunkKv) -> Result<()> {
    let segment = chunk.chunk.index as u32;
    let indices =
        |positions: &[u32]| -> Vec<u32> { positions.iter().map(|p| p - FIRST_POSITION).collect() };
    match &chunk.kept {
        Kept::Shared(positions) => {
            writer.add_positions(segment, KeptSet::Shared, &indices(positions))?;
            for (layer, kv) in chunk.layers.iter().enumerate() {
                let slot = KvSlot {
                    layer: layer as u32,
                    head: None,
                };
                write_kv(writer, segment, slot, &kv.k, &kv.v)?;
            }
        }
        Kept::PerHead(sets) => {
            for ((layer, kv), heads) in chunk.layers.iter().enumerate().zip(sets) {
                for (head, positions) in heads.iter().enumerate() {
                    let (layer, head) = (layer as u32, head as u32);
                    let set = KeptSet::Head { layer, head };
                    writer.add_positions(segment, set, &indices(positions))?;
                    let own =
                        |t: &Tensor| t.narrow(1, head as usize, 1)?.narrow(2, 0, positions.len());
                    let slot = KvSlot {
                        layer,
                        head: Some(head),
                    };
                    write_kv(writer, segment, slot, &own(&kv.k)?, &own(&kv.v)?)?;
                }
            }
        }
    }
    Ok(())
}

fn write_kv<S: Sink>(
    writer: &mut SackWriter<S>,
    segment: u32,
    slot: KvSlot,
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let (keys, values) = (floats(k)?, floats(v)?);
    writer.add_kv(segment, slot, Floats::F32(&keys), Floats::F32(&values))?;
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
    let mut past = Vec::with_capacity(c.num_layers);
    for layer in 0..m.layers {
        let read = reader.read_layer(layer)?;
        past.push(layer_kv(read, decoder, &header, reader.file_name())?);
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
        Some(
            Tensor::from_vec(flat, (rows, c.hidden_size), decoder.device())?
                .to_dtype(decoder.dtype())?,
        )
    };
    Ok(DecoderContext {
        past,
        question_position,
        prefix,
    })
}

/// One layer of a .sack as the decoder reads it: heads that keep different
/// positions are zero-padded to the longest and the padding hidden by a
/// `-inf` bias; keys stored before RoPE are rotated to their positions.
fn layer_kv(
    layer: sack::LayerKv,
    decoder: &Decoder,
    header: &SackHeader,
    file: &str,
) -> Result<SharedKv> {
    let first = header.decoder.first_position;
    let c = decoder.config();
    let longest = layer
        .heads
        .iter()
        .map(|h| h.positions.len())
        .max()
        .unwrap_or(0);
    // CUDA refuses empty allocations; a layer that keeps nothing stays on
    // the CPU, and attention skips it.
    let device = if longest == 0 {
        &Device::Cpu
    } else {
        decoder.device()
    };
    let ragged = layer
        .heads
        .iter()
        .any(|h| h.positions != layer.heads[0].positions);
    let dim = c.head_dim;
    let mut keys = Vec::with_capacity(c.num_kv_heads * longest * dim);
    let mut values = Vec::with_capacity(keys.capacity());
    let mut bias = Vec::with_capacity(c.num_kv_heads * longest);
    let mut positions = Vec::with_capacity(bias.capacity());
    for head in layer.heads {
        let pad = longest - head.positions.len();
        keys.extend(
            head.keys
                .into_iter()
                .chain(std::iter::repeat_n(0.0, pad * dim)),
        );
        values.extend(
            head.values
                .into_iter()
                .chain(std::iter::repeat_n(0.0, pad * dim)),
        );
        bias.extend(
            std::iter::repeat_n(0.0, longest - pad)
                .chain(std::iter::repeat_n(f32::NEG_INFINITY, pad)),
        );
        positions.extend(
            head.positions
                .iter()
                .chain(std::iter::repeat_n(&0, pad))
                .map(|&p| i64::from(first) + i64::from(p)),
        );
    }
    let shape = (1, c.num_kv_heads, longest, dim);
    let load = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(decoder.dtype())?)
    };
    let mut k = load(keys)?;
    let v = load(values)?;
    match header.kv.key_rope {
        KeyRope::Kept => {}
        KeyRope::None => {
            let positions = Tensor::from_vec(positions, (c.num_kv_heads, longest), device)?;
            let heads = (0..c.num_kv_heads)
                .map(|h| decoder.rotate(&k.narrow(1, h, 1)?, &positions.narrow(0, h, 1)?))
                .collect::<Result<Vec<_>>>()?;
            k = Tensor::cat(&heads, 1)?;
        }
        KeyRope::Sequential => {
            return Err(Error::InvalidInput(format!(
                "{file} stores keys rotated as a contiguous prefix, which sac does not read"
            )));
        }
    }
    let bias = ragged
        .then(|| Tensor::from_vec(bias, (c.num_kv_heads, longest), device))
        .transpose()?;
    Ok(SharedKv {
        kv: LayerKv { k, v },
        bias,
    })
}
