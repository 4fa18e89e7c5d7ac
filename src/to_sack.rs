//! Compressed K/V (or soft tokens) to a .sack: the header that describes a
//! compressed document, then one segment per compressor chunk.

use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use half::{bf16, f16};

use crate::compress::{Emitted, Kept, Strategy};
use crate::error::{Error, Result};
use crate::layout::prompt::PromptLayout;
use crate::layout::{FIRST_POSITION, SOFT_TOKENS_FIRST_POSITION};
use crate::runtime::LoadedModel;
use crate::sack::{
    AdapterRef, CompressorInfo, DecoderInfo, DocumentInfo, Floats, KeptLayout, KeptSet, KeyRope,
    KvInfo, KvSlot, ModelInfo, PromptInfo, SackHeader, SackWriter, Sink, SlotKv, SoftTokensInfo,
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

/// Runs `compress`, which hands each chunk a compressor emits to the
/// function it is given, and writes every chunk to `writer` on a thread of
/// its own while the next one is computed: the copy off the model's device
/// (which on a GPU waits for the chunk's kernels) and the encoding happen
/// there. Returns what `compress` returned and how long its caller waited
/// on the writer.
pub fn overlapped<S: Sink + Send, T>(
    writer: &mut SackWriter<S>,
    compress: impl FnOnce(&mut dyn FnMut(&Emitted) -> Result<()>) -> Result<T>,
) -> Result<(T, WriterWait)> {
    std::thread::scope(|scope| {
        // One chunk queued while one is written and the next is computed.
        let (queue, chunks) = mpsc::sync_channel::<Emitted>(1);
        let thread = scope.spawn(move || {
            chunks
                .iter()
                .try_for_each(|emitted| HostChunk::of(&emitted)?.write(writer))
        });
        let mut blocked = Duration::ZERO;
        let computed = compress(&mut |emitted| {
            let started = Instant::now();
            let sent = queue.send(emitted.clone());
            blocked += started.elapsed();
            // The writer hung up: its own error comes from `join` below.
            sent.map_err(|_| Error::WriterStopped)
        });
        drop(queue);
        let started = Instant::now();
        let written = thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let tail = started.elapsed();
        written?;
        Ok((computed?, WriterWait { blocked, tail }))
    })
}

/// How long [`overlapped`]'s caller waited on the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterWait {
    /// Handing chunks over while the writer was behind: inside the
    /// compressor's own time.
    pub blocked: Duration,
    /// After the compressor was done, until the writer was: the chunks
    /// still queued, copied off the device (on a GPU, once their kernels
    /// ran) and written. The compression's time is the compressor's and this.
    pub tail: Duration,
}

/// What a compressor emitted for one chunk, copied to the host.
struct HostChunk {
    segment: u32,
    content: HostContent,
}

enum HostContent {
    /// Each kept set's 0-based indices; each slot with where its keys and
    /// its values lie in `values`.
    Kv {
        sets: Vec<(KeptSet, Vec<u32>)>,
        slots: Vec<(KvSlot, Range<usize>, Range<usize>)>,
        values: HostFloats,
    },
    Soft(HostFloats),
}

impl HostChunk {
    /// Copies `emitted` off the device, in the layout its kept sets have
    /// (the header's, see [`header`]).
    fn of(emitted: &Emitted) -> Result<Self> {
        let chunk = match emitted {
            Emitted::Kv(chunk) => chunk,
            Emitted::Soft(soft) => {
                return Ok(HostChunk {
                    segment: soft.chunk.index as u32,
                    content: HostContent::Soft(HostFloats::of(&soft.tokens)?),
                });
            }
        };
        let indices = |positions: &[u32]| -> Vec<u32> {
            positions.iter().map(|p| p - FIRST_POSITION).collect()
        };
        let (mut sets, mut slots, mut tensors) = (Vec::new(), Vec::new(), Vec::new());
        match &chunk.kept {
            Kept::Shared(positions) => {
                sets.push((KeptSet::Shared, indices(positions)));
                for (layer, kv) in chunk.layers.iter().enumerate() {
                    slots.push(KvSlot {
                        layer: layer as u32,
                        head: None,
                    });
                    tensors.extend([kv.k.flatten_all()?, kv.v.flatten_all()?]);
                }
            }
            Kept::PerHead(heads) => {
                for ((layer, kv), heads) in chunk.layers.iter().enumerate().zip(heads) {
                    for (head, positions) in heads.iter().enumerate() {
                        let (layer, head) = (layer as u32, head as u32);
                        sets.push((KeptSet::Head { layer, head }, indices(positions)));
                        let own = kv.head(head as usize, positions.len())?;
                        slots.push(KvSlot {
                            layer,
                            head: Some(head),
                        });
                        tensors.extend([own.k.flatten_all()?, own.v.flatten_all()?]);
                    }
                }
            }
        }
        // One copy off the device for the whole chunk, not one a tensor.
        let values = HostFloats::of(&Tensor::cat(&tensors, 0)?)?;
        let mut end = 0;
        let mut next = |t: &Tensor| {
            let start = end;
            end += t.elem_count();
            start..end
        };
        let slots = slots
            .into_iter()
            .zip(tensors.chunks_exact(2))
            .map(|(slot, kv)| (slot, next(&kv[0]), next(&kv[1])))
            .collect();
        Ok(HostChunk {
            segment: chunk.chunk.index as u32,
            content: HostContent::Kv {
                sets,
                slots,
                values,
            },
        })
    }

    /// Writes the chunk as its segment: the kept positions of every set,
    /// then every slot's keys and values in one batch, which the writer
    /// encodes in parallel.
    fn write<S: Sink>(&self, writer: &mut SackWriter<S>) -> Result<()> {
        match &self.content {
            HostContent::Soft(tokens) => {
                writer.add_soft_tokens(self.segment, tokens.floats(0..tokens.len()))?
            }
            HostContent::Kv {
                sets,
                slots,
                values,
            } => {
                for (set, indices) in sets {
                    writer.add_positions(self.segment, *set, indices)?;
                }
                let slots: Vec<SlotKv> = slots
                    .iter()
                    .map(|(slot, k, v)| SlotKv {
                        slot: *slot,
                        keys: values.floats(k.clone()),
                        values: values.floats(v.clone()),
                    })
                    .collect();
                writer.add_kvs(self.segment, &slots)?;
            }
        }
        Ok(())
    }
}

/// A tensor's values copied to the host in the precision the model made
/// them, which the writer encodes from without a detour through f32.
enum HostFloats {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostFloats {
    fn of(t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::BF16 => Self::Bf16(flat.to_vec1()?),
            DType::F16 => Self::F16(flat.to_vec1()?),
            _ => Self::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        })
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// The values in `range`.
    fn floats(&self, range: Range<usize>) -> Floats<'_> {
        match self {
            Self::F32(v) => Floats::F32(&v[range]),
            Self::Bf16(v) => Floats::Bf16(&v[range]),
            Self::F16(v) => Floats::F16(&v[range]),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use candle_core::Device;

    use super::*;
    use crate::compress::ChunkKv;
    use crate::layout::chunk::{self, Chunk};
    use crate::model::LayerKv;
    use crate::sack::format::header::tests::sample;
    use crate::sack::{KeptLayout, WriteOptions};

    const TOKENS: usize = 300;

    fn header() -> SackHeader {
        let mut h = sample(KeptLayout::Shared);
        (h.model.layers, h.model.kv_heads, h.model.head_dim) = (2, 2, 4);
        h.document.tokens = TOKENS as u64;
        h
    }

    /// Every chunk of a document of [`TOKENS`] tokens, all kept, each value
    /// its own.
    fn chunks() -> Vec<Emitted> {
        chunk::chunks(TOKENS, 64)
            .map(|chunk: Chunk| {
                let layer = |l: usize| {
                    let t = |offset: f32| {
                        let n = 2 * chunk.len * 4;
                        let values: Vec<f32> = (0..n)
                            .map(|i| offset + (chunk.start * 8 + i) as f32 * 1e-3)
                            .collect();
                        Tensor::from_vec(values, (1, 2, chunk.len, 4), &Device::Cpu)
                    };
                    Ok(LayerKv {
                        k: t(l as f32)?,
                        v: t(-(l as f32))?,
                    })
                };
                let layers = (0..2)
                    .map(layer)
                    .collect::<candle_core::Result<_>>()
                    .unwrap();
                Emitted::Kv(ChunkKv {
                    kept: Kept::Shared(chunk.positions()),
                    chunk,
                    layers,
                })
            })
            .collect()
    }

    /// The .sack of [`chunks`] written through [`overlapped`] to `sink`.
    fn write_overlapped<W: Write + Send>(sink: W) -> Result<(usize, WriterWait)> {
        let mut writer = SackWriter::to_stream(sink, "<test>", &header(), WriteOptions::default())?;
        let (handed, waited) = overlapped(&mut writer, |write| {
            let mut handed = 0;
            for emitted in chunks() {
                write(&emitted)?;
                handed += 1;
            }
            Ok(handed)
        })?;
        writer.finish()?;
        Ok((handed, waited))
    }

    #[test]
    fn overlapped_writing_gives_the_bytes_of_writing_in_turn() -> Result<()> {
        let mut overlapped = Vec::new();
        assert_eq!(write_overlapped(&mut overlapped)?.0, chunks().len());
        let mut in_turn = Vec::new();
        let mut writer =
            SackWriter::to_stream(&mut in_turn, "<test>", &header(), WriteOptions::default())?;
        for emitted in chunks() {
            HostChunk::of(&emitted)?.write(&mut writer)?;
        }
        writer.finish()?;
        assert!(overlapped.len() > 4 * TOKENS);
        assert_eq!(overlapped, in_turn);
        Ok(())
    }

    /// Takes the first `left` bytes, then fails.
    struct Full {
        left: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.len() > self.left {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            self.left -= buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_writer_stops_the_compressor_with_its_own_error() {
        let err = write_overlapped(Full { left: 2_000 }).unwrap_err();
        assert!(matches!(err, Error::Sack(_)), "{err:?}");
        assert!(err.to_string().contains("<test>"), "{err}");
    }
}
