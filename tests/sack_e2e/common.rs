//! Fixtures shared by the `.sack` integration tests: headers and small,
//! deterministic files in every layout.

use sac::sack::{
    AdapterRef, CompressorInfo, DecoderInfo, DocumentInfo, Floats, KeptLayout, KeptSet, KeyRope,
    KvEncoding, KvInfo, KvSlot, ModelInfo, SackHeader, SackWriter, Sink, SoftTokensInfo,
    TokenizerInfo, WriteOptions,
};

/// splitmix64: deterministic data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Roughly standard normal (sum of uniforms), enough for KV-like data.
    pub fn normal(&mut self) -> f32 {
        let s: f64 = (0..4)
            .map(|_| (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
            .sum();
        ((s - 2.0) * 3f64.sqrt()) as f32
    }
}

pub fn header(layout: KeptLayout, layers: u32, kv_heads: u32, head_dim: u32) -> SackHeader {
    SackHeader {
        producer: "sac tests".into(),
        created: "2026-05-01T12:00:00Z".into(),
        model: ModelInfo {
            id: "test/tiny".into(),
            revision: None,
            file: None,
            fingerprint: "blake3:0123".into(),
            layers,
            kv_heads,
            head_dim,
        },
        tokenizer: TokenizerInfo {
            fingerprint: "blake3:4567".into(),
        },
        compressor: CompressorInfo {
            method: "sac".into(),
            ratio: 4.0,
            chunk_size: 64,
            adapter_fingerprint: Some("blake3:89ab".into()),
        },
        document: DocumentInfo::of_text(b"a tiny document", 10_000, Some("tiny.txt".into())),
        decoder: DecoderInfo::default(),
        soft_tokens: None,
        kv: KvInfo {
            layout,
            key_rope: KeyRope::None,
        },
    }
}

/// The kept sets of a layout, in a fixed order.
pub fn sets(h: &SackHeader) -> Vec<KeptSet> {
    let (layers, heads) = (h.model.layers, h.model.kv_heads);
    match h.kv.layout {
        KeptLayout::Shared => vec![KeptSet::Shared],
        KeptLayout::PerLayer => (0..layers).map(KeptSet::Layer).collect(),
        KeptLayout::PerHead => (0..layers)
            .flat_map(|layer| (0..heads).map(move |head| KeptSet::Head { layer, head }))
            .collect(),
    }
}

/// The slots (layer, head) whose keys and values use `set`'s positions.
pub fn slots_of(h: &SackHeader, set: KeptSet) -> Vec<KvSlot> {
    match set {
        KeptSet::Shared => (0..h.model.layers)
            .map(|layer| KvSlot { layer, head: None })
            .collect(),
        KeptSet::Layer(layer) => vec![KvSlot { layer, head: None }],
        KeptSet::Head { layer, head } => vec![KvSlot {
            layer,
            head: Some(head),
        }],
    }
}

/// Writes `segments` segments of random data: each set keeps 0..=`max_kept`
/// positions per segment. Returns nothing; the sink holds the file.
pub fn write_random<S: Sink>(
    w: &mut SackWriter<S>,
    h: &SackHeader,
    rng: &mut Rng,
    segments: u32,
    max_kept: u64,
) {
    let mut last = vec![0u32; sets(h).len()];
    for segment in 0..segments {
        for (i, set) in sets(h).into_iter().enumerate() {
            let n = rng.below(max_kept + 1) as usize;
            let positions: Vec<u32> = (0..n)
                .map(|_| {
                    last[i] += 1 + rng.below(5) as u32;
                    last[i]
                })
                .collect();
            w.add_positions(segment, set, &positions).unwrap();
            for slot in slots_of(h, set) {
                let heads = if slot.head.is_some() {
                    1
                } else {
                    h.model.kv_heads as usize
                };
                let len = heads * n * h.model.head_dim as usize;
                let k: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
                let v: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
                w.add_kv(segment, slot, Floats::F32(&k), Floats::F32(&v))
                    .unwrap();
            }
        }
    }
}

/// A small valid file in memory.
pub fn sample(layout: KeptLayout, encoding: KvEncoding, zstd_level: Option<i32>) -> Vec<u8> {
    let h = header(layout, 2, 2, 8);
    let mut bytes = Vec::new();
    let options = WriteOptions {
        encoding,
        zstd_level,
    };
    let mut w = SackWriter::to_stream(&mut bytes, "<memory>", &h, options).unwrap();
    write_random(&mut w, &h, &mut Rng(7), 2, 5);
    w.finish().unwrap();
    bytes
}

/// A small valid file of soft tokens in memory: three segments of 1 to 5
/// rows of width 8; the zstd-packed ones name an adapter for the decoder.
pub fn soft_sample(encoding: KvEncoding, zstd_level: Option<i32>) -> Vec<u8> {
    let mut h = header(KeptLayout::Shared, 2, 2, 8);
    h.soft_tokens = Some(SoftTokensInfo { hidden: 8 });
    h.compressor.method = "gmsa".into();
    h.decoder.adapter = zstd_level.map(|_| AdapterRef {
        id: "gmsa-4".into(),
        fingerprint: "blake3:89ab".into(),
    });
    let mut bytes = Vec::new();
    let options = WriteOptions {
        encoding,
        zstd_level,
    };
    let mut w = SackWriter::to_stream(&mut bytes, "<memory>", &h, options).unwrap();
    let mut rng = Rng(11);
    for segment in 0..3 {
        let rows = 1 + rng.below(5) as usize;
        let tokens: Vec<f32> = (0..rows * 8).map(|_| rng.normal()).collect();
        w.add_soft_tokens(segment, Floats::F32(&tokens)).unwrap();
    }
    w.finish().unwrap();
    bytes
}

/// Every layout × encoding, with and without zstd, and soft tokens in every
/// encoding.
pub fn all_variants() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for layout in [
        KeptLayout::Shared,
        KeptLayout::PerLayer,
        KeptLayout::PerHead,
    ] {
        for encoding in KvEncoding::ALL {
            for level in [None, Some(3)] {
                let name = variant_name(&format!("{layout:?}"), encoding, level);
                out.push((name, sample(layout, encoding, level)));
            }
        }
    }
    for encoding in KvEncoding::ALL {
        for level in [None, Some(3)] {
            out.push((
                variant_name("soft", encoding, level),
                soft_sample(encoding, level),
            ));
        }
    }
    out
}

/// `shared-q8-zstd3`, `soft-f32-raw`: a variant's name, as the seed corpus
/// files are named.
fn variant_name(kind: &str, encoding: KvEncoding, level: Option<i32>) -> String {
    let level = level.map_or("raw".into(), |l| format!("zstd{l}"));
    format!("{kind}-{encoding:?}-{level}").to_lowercase()
}
