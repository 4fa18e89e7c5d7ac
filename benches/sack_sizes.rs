//! Size report: bytes per kept position of every encoding for a random KV
//! cache shaped like Llama-3.2-1B (16 layers, 8 KV heads, head_dim 64) with
//! 1000 kept positions, written in segments of 128 as a compressor with chunk
//! 512 and ratio 4 would. Run with `cargo bench --bench sack_sizes`.
//!
//! Values are Gaussian; keys get a few outlier channels (×8), the structure
//! that makes per-channel key quantization worthwhile. Random data compresses
//! worse than real KV, so the zstd columns are a pessimistic bound.

use sac::sack::{
    CompressorInfo, DecoderInfo, DocumentInfo, Floats, KeptLayout, KeptSet, KeyRope, KvEncoding,
    KvInfo, KvSlot, ModelInfo, SackHeader, SackReader, SackWriter, TokenizerInfo, WriteOptions,
};

const LAYERS: u32 = 16;
const KV_HEADS: u32 = 8;
const HEAD_DIM: u32 = 64;
const KEPT: u32 = 1000;
const SEGMENT: u32 = 128;
const TOKENS: u64 = 4 * KEPT as u64;

/// splitmix64 → Box–Muller; deterministic so runs are comparable.
struct Gauss(u64);

impl Gauss {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn header() -> SackHeader {
    SackHeader {
        producer: "sack_sizes bench".into(),
        created: "2026-01-01T00:00:00Z".into(),
        model: ModelInfo {
            id: "meta-llama/Llama-3.2-1B".into(),
            revision: None,
            file: None,
            fingerprint: "random".into(),
            layers: LAYERS,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        },
        tokenizer: TokenizerInfo {
            fingerprint: "random".into(),
        },
        compressor: CompressorInfo {
            method: "bench".into(),
            ratio: 4.0,
            chunk_size: 512,
            adapter_fingerprint: None,
        },
        document: DocumentInfo::of_text(b"", TOKENS, None),
        decoder: DecoderInfo::default(),
        soft_tokens: None,
        kv: KvInfo {
            layout: KeptLayout::Shared,
            key_rope: KeyRope::Kept,
        },
    }
}

/// One segment of one layer: keys and values `[kv_heads, n, head_dim]`.
fn segment_kv(rng: &mut Gauss, n: u32) -> (Vec<f32>, Vec<f32>) {
    let len = (KV_HEADS * n * HEAD_DIM) as usize;
    let keys = (0..len)
        .map(|i| {
            let outlier = i % HEAD_DIM as usize % 16 == 3;
            rng.sample() * if outlier { 8.0 } else { 1.0 }
        })
        .collect();
    let values = (0..len).map(|_| rng.sample()).collect();
    (keys, values)
}

/// Writes the file; returns it and the layer-0 keys in `[kv_heads, KEPT, head_dim]`
/// order, as the reader stacks them.
fn write(options: WriteOptions) -> Result<(Vec<u8>, Vec<f32>), Box<dyn std::error::Error>> {
    let mut rng = Gauss(42);
    let mut bytes = Vec::new();
    let dim = HEAD_DIM as usize;
    let mut layer0_keys = vec![0f32; (KV_HEADS * KEPT) as usize * dim];
    let mut w = SackWriter::to_stream(&mut bytes, "<memory>", &header(), options)?;
    for (segment, start) in (0..KEPT).step_by(SEGMENT as usize).enumerate() {
        let n = SEGMENT.min(KEPT - start);
        let positions: Vec<u32> = (start..start + n).map(|p| 4 * p).collect();
        let segment = segment as u32;
        w.add_positions(segment, KeptSet::Shared, &positions)?;
        for layer in 0..LAYERS {
            let (k, v) = segment_kv(&mut rng, n);
            let slot = KvSlot { layer, head: None };
            w.add_kv(segment, slot, Floats::F32(&k), Floats::F32(&v))?;
            if layer == 0 {
                let per_head = n as usize * dim;
                for (h, chunk) in k.chunks(per_head).enumerate() {
                    let at = (h * KEPT as usize + start as usize) * dim;
                    layer0_keys[at..at + per_head].copy_from_slice(chunk);
                }
            }
        }
    }
    w.finish()?;
    Ok((bytes, layer0_keys))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "Llama-3.2-1B-shaped random KV: {LAYERS} layers x {KV_HEADS} KV heads x head_dim \
         {HEAD_DIM}, {KEPT} kept positions, segments of {SEGMENT}"
    );
    println!(
        "raw bf16 K+V per kept position: {} bytes\n",
        LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    );
    println!(
        "{:<6} {:<5} {:>10} {:>13} {:>13} {:>11} {:>20}",
        "enc", "zstd", "file bytes", "file B/pos", "K+V B/pos", "bits/elem", "layer-0 key rms err"
    );
    for encoding in KvEncoding::ALL {
        for zstd_level in [None, Some(3), Some(19)] {
            let (bytes, originals) = write(WriteOptions {
                encoding,
                zstd_level,
            })?;
            let mut reader = SackReader::from_bytes(bytes, "<memory>")?;
            let kv: u64 = reader
                .tensors()
                .iter()
                .filter(|e| !matches!(e.name, sac::sack::TensorName::Positions { .. }))
                .map(|e| e.stored_len)
                .sum();
            // Every head keeps the same positions: the layer's keys are
            // its heads' keys in order.
            let layer = reader.read_layer(0)?;
            let keys = layer.heads.iter().flat_map(|h| &h.keys);
            let rms = (originals
                .iter()
                .zip(keys)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                / originals.len() as f64)
                .sqrt();
            let elements = f64::from(KEPT * LAYERS * 2 * KV_HEADS * HEAD_DIM);
            println!(
                "{:<6} {:<5} {:>10} {:>13.1} {:>13.1} {:>11.2} {:>20.5}",
                format!("{encoding:?}").to_lowercase(),
                zstd_level.map_or("-".into(), |l| l.to_string()),
                reader.file_len(),
                reader.file_len() as f64 / f64::from(KEPT),
                kv as f64 / f64::from(KEPT),
                kv as f64 * 8.0 / elements,
                rms
            );
        }
    }
    Ok(())
}
