//! Compressed K/V (or soft tokens) to a .sack: the header that describes a
//! compressed document, then one segment per compressor chunk.

use candle_core::{DType, Tensor};

use crate::compress::{ChunkKv, Emitted, Kept, Strategy};
use crate::error::Result;
use crate::layout::prompt::PromptLayout;
use crate::layout::{FIRST_POSITION, SOFT_TOKENS_FIRST_POSITION};
use crate::runtime::LoadedModel;
use crate::sack::{
    AdapterRef, CompressorInfo, DecoderInfo, DocumentInfo, Floats, KeptLayout, KeptSet, KeyRope,
    KvInfo, KvSlot, ModelInfo, PromptInfo, SackHeader, SackWriter, Sink, SoftTokensInfo,
    TokenizerInfo, now_rfc3339,
};

/// The document being compressed, as the header records it.
#[derive(Debug, Clone)]
pub struct DocumentFacts<'a> {
    pub text: &'a str,
    pub tokens: usize,
    pub name: Option<String>,
    /// How the document (and so every question) is framed.
    pub layout: &'a PromptLayout,
}

/// The adapter a .sack is made with.
#[derive(Debug, Clone)]
pub struct UsedAdapter {
    /// Its directory's name.
    pub id: String,
    pub fingerprint: String,
    /// Whether answers need its decoder LoRA (a GMSA adapter's stage 2).
    pub for_decoder: bool,
}

/// The header of a .sack that `compressor` makes of `document` with `model`
/// (and `adapter`, if it has one).
pub fn header(
    model: &LoadedModel,
    compressor: &dyn Strategy,
    adapter: Option<&UsedAdapter>,
    document: &DocumentFacts,
) -> Result<SackHeader> {
    let c = &model.config;
    let facts = compressor.facts();
    let prefix = match compressor.prefix()? {
        Some(prefix) => prefix.to_dtype(DType::F32)?.to_vec2::<f32>()?,
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
            method: facts.method.name.into(),
            ratio: facts.ratio as f64,
            chunk_size: facts.chunk_size as u32,
            adapter_fingerprint: adapter.map(|a| a.fingerprint.clone()),
        },
        document: DocumentInfo::of_text(
            document.text.as_bytes(),
            document.tokens as u64,
            document.name.clone(),
        ),
        kv: KvInfo {
            layout: match facts.per_head {
                true => KeptLayout::PerHead,
                false => KeptLayout::Shared,
            },
            key_rope: KeyRope::Kept,
        },
        soft_tokens: facts.soft_tokens.then_some(SoftTokensInfo {
            hidden: c.hidden_size as u32,
        }),
        decoder: DecoderInfo {
            first_position: if facts.soft_tokens {
                SOFT_TOKENS_FIRST_POSITION
            } else {
                FIRST_POSITION
            },
            prefix_embeddings: prefix,
            // The raw layout is what a header without `prompt` means, so
            // such files stay readable by readers older than minor version 2.
            prompt: (*document.layout != PromptLayout::raw()).then(|| PromptInfo {
                format: document.layout.format.name().into(),
                before_document: document.layout.before_document.clone(),
                before_question: document.layout.before_question.clone(),
                after_question: document.layout.after_question.clone(),
            }),
            adapter: adapter.filter(|a| a.for_decoder).map(|a| AdapterRef {
                id: a.id.clone(),
                fingerprint: a.fingerprint.clone(),
            }),
        },
    })
}

/// Writes what a compressor emitted for one chunk as segment `chunk.index`.
pub fn write_chunk<S: Sink>(writer: &mut SackWriter<S>, emitted: &Emitted) -> Result<()> {
    match emitted {
        Emitted::Kv(chunk) => write_kv_chunk(writer, chunk),
        Emitted::Soft(soft) => {
            let tokens = floats(&soft.tokens)?;
            writer.add_soft_tokens(soft.chunk.index as u32, Floats::F32(&tokens))?;
            Ok(())
        }
    }
}

/// Writes one chunk's kept K/V, in the layout its kept sets have (the
/// header's, see [`header`]).
fn write_kv_chunk<S: Sink>(writer: &mut SackWriter<S>, chunk: &ChunkKv) -> Result<()> {
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
                    let own = kv.head(head as usize, positions.len())?;
                    let slot = KvSlot {
                        layer,
                        head: Some(head),
                    };
                    write_kv(writer, segment, slot, &own.k, &own.v)?;
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
