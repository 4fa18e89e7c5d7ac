//! Property test: random layouts, shapes, segment counts (ragged and empty
//! ones included), input precisions, encodings and compression round-trip.

use half::{bf16, f16};
use proptest::prelude::*;
use sac::sack::encoding::{decode, encode_floats};
use sac::sack::{
    Encoding, Floats, KeptLayout, KeptSet, KvEncoding, KvSlot, SackHeader, SackReader, SackWriter,
    Sink, TensorName, TensorValues, WriteOptions,
};
use std::collections::HashMap;
use std::io::{Read, Seek};

use crate::common::{Rng, header, sets, slots_of};

#[derive(Clone, Copy, Debug)]
enum Precision {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Debug)]
struct Case {
    layout: KeptLayout,
    dims: (u32, u32, u32),
    segments: u32,
    precision: Precision,
    encoding: KvEncoding,
    zstd_level: Option<i32>,
    scale_exp: i32,
    seed: u64,
    via_file: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            Just(KeptLayout::Shared),
            Just(KeptLayout::PerLayer),
            Just(KeptLayout::PerHead)
        ],
        (1u32..4, 1u32..4, 1u32..10),
        0u32..4,
        prop_oneof![
            Just(Precision::F32),
            Just(Precision::Bf16),
            Just(Precision::F16)
        ],
        prop_oneof![
            Just(KvEncoding::F32),
            Just(KvEncoding::Bf16),
            Just(KvEncoding::F16),
            Just(KvEncoding::Q8),
            Just(KvEncoding::Q4)
        ],
        prop_oneof![Just(None), (1i32..6).prop_map(Some)],
        -8i32..8,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                layout,
                dims,
                segments,
                precision,
                encoding,
                zstd_level,
                scale_exp,
                seed,
                via_file,
            )| {
                Case {
                    layout,
                    dims,
                    segments,
                    precision,
                    encoding,
                    zstd_level,
                    scale_exp,
                    seed,
                    via_file,
                }
            },
        )
}

/// Largest error the encoding may add to `x`, for a tensor whose values span
/// `range` with magnitudes up to `amax`. Quantized: half a step of the widest
/// possible group, including the outward rounding of the f16 parameters.
fn tolerance(enc: Encoding, x: f32, range: f32, amax: f32) -> f32 {
    let rounding = 4.0 * f32::EPSILON * amax;
    let half_step = |levels: f32| {
        let step =
            (range + amax * 2f32.powi(-10)) / levels * (1.0 + 2f32.powi(-10)) + 2f32.powi(-24);
        0.5 * step + rounding
    };
    match enc {
        Encoding::F32 => 0.0,
        Encoding::Bf16 => x.abs() * 2f32.powi(-8),
        Encoding::F16 => x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
        Encoding::Q8Channel | Encoding::Q8Token => half_step(255.0),
        Encoding::Q4Channel | Encoding::Q4Token => half_step(15.0),
        Encoding::U32 => unreachable!("positions are not floats"),
    }
}

/// What went into a file, by tensor name: positions, and float originals as
/// the model produced them (widened to f32).
#[derive(Default)]
struct Written {
    positions: HashMap<String, Vec<u32>>,
    floats: HashMap<String, Vec<f32>>,
}

fn widen(f: Floats<'_>) -> Vec<f32> {
    match f {
        Floats::F32(x) => x.to_vec(),
        Floats::Bf16(x) => x.iter().map(|y| y.to_f32()).collect(),
        Floats::F16(x) => x.iter().map(|y| y.to_f32()).collect(),
    }
}

fn write_case<S: Sink>(mut w: SackWriter<S>, case: &Case, h: &SackHeader) -> Written {
    let (_, heads, dim) = case.dims;
    let mut rng = Rng(case.seed);
    let scale = 2f32.powi(case.scale_exp);
    let mut written = Written::default();
    let mut last = vec![0u32; sets(h).len()];
    for segment in 0..case.segments {
        for (i, set) in sets(h).into_iter().enumerate() {
            let n = rng.below(7) as usize;
            let positions: Vec<u32> = (0..n)
                .map(|_| {
                    last[i] += 1 + rng.below(50) as u32;
                    last[i]
                })
                .collect();
            w.add_positions(segment, set, &positions).unwrap();
            let name = TensorName::Positions { set, segment }.to_string();
            written.positions.insert(name, positions);
            for slot in slots_of(h, set) {
                let per = if slot.head.is_some() {
                    1
                } else {
                    heads as usize
                };
                let len = per * n * dim as usize;
                let mut make = || -> Vec<f32> { (0..len).map(|_| rng.normal() * scale).collect() };
                let (k, v) = (make(), make());
                let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
                    k.iter().map(|&x| bf16::from_f32(x)).collect(),
                    v.iter().map(|&x| bf16::from_f32(x)).collect(),
                );
                let (kh, vh): (Vec<f16>, Vec<f16>) = (
                    k.iter().map(|&x| f16::from_f32(x)).collect(),
                    v.iter().map(|&x| f16::from_f32(x)).collect(),
                );
                let (kf, vf) = match case.precision {
                    Precision::F32 => (Floats::F32(&k), Floats::F32(&v)),
                    Precision::Bf16 => (Floats::Bf16(&kb), Floats::Bf16(&vb)),
                    Precision::F16 => (Floats::F16(&kh), Floats::F16(&vh)),
                };
                w.add_kv(segment, slot, kf, vf).unwrap();
                let key = TensorName::Key { slot, segment }.to_string();
                let value = TensorName::Value { slot, segment }.to_string();
                written.floats.insert(key, widen(kf));
                written.floats.insert(value, widen(vf));
            }
        }
    }
    w.finish().unwrap();
    written
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let (layers, heads, dim) = case.dims;
    let h = header(case.layout, layers, heads, dim);
    let options = WriteOptions {
        encoding: case.encoding,
        zstd_level: case.zstd_level,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.sack");
    if case.via_file {
        let written = write_case(SackWriter::create(&path, &h, options).unwrap(), case, &h);
        check(SackReader::open(&path).unwrap(), &written, case, &h)
    } else {
        let mut bytes = Vec::new();
        let w = SackWriter::to_stream(&mut bytes, "<memory>", &h, options).unwrap();
        let written = write_case(w, case, &h);
        check(
            SackReader::from_bytes(bytes, "<memory>").unwrap(),
            &written,
            case,
            &h,
        )
    }
}

/// Reads everything back: tensor by tensor (exact codec bits, error bounds)
/// and layer by layer (segments assembled in order, split per head).
fn check<R: Read + Seek>(
    mut r: SackReader<R>,
    written: &Written,
    case: &Case,
    h: &SackHeader,
) -> Result<(), TestCaseError> {
    let (layers, heads, dim) = case.dims;
    prop_assert_eq!(r.header(), h);
    prop_assert_eq!(r.segments(), case.segments);

    let entries = r.tensors().to_vec();
    let mut decoded = HashMap::new();
    for e in &entries {
        let name = e.name.to_string();
        let t = r.read_tensor(&name).unwrap();
        match &t.values {
            TensorValues::U32(p) => prop_assert_eq!(p, &written.positions[&name]),
            TensorValues::F32(got) => {
                let orig = &written.floats[&name];
                let shape = &e.shape;
                // The file adds nothing to the codec: same bits as encoding alone.
                let payload =
                    encode_floats(Floats::F32(orig), e.encoding, shape, e.group_size).unwrap();
                let TensorValues::F32(direct) =
                    decode(&payload, e.encoding, shape, e.group_size).unwrap()
                else {
                    unreachable!()
                };
                prop_assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    direct.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
                let lo = orig.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = orig.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let amax = lo.abs().max(hi.abs());
                for (x, y) in orig.iter().zip(got) {
                    let tol = tolerance(e.encoding, *x, hi - lo, amax);
                    prop_assert!(
                        (x - y).abs() <= tol,
                        "{}: {} -> {} (tol {})",
                        name,
                        x,
                        y,
                        tol
                    );
                }
            }
        }
        decoded.insert(e.name, t.values);
    }
    // Layers assemble the segments in order, split per head.
    for layer in 0..layers {
        let got = r.read_layer(layer).unwrap();
        for head in 0..heads {
            let (mut pos, mut keys, mut values) = (Vec::new(), Vec::new(), Vec::new());
            for segment in 0..r.segments() {
                let (set, slot) = match case.layout {
                    KeptLayout::Shared => (KeptSet::Shared, KvSlot { layer, head: None }),
                    KeptLayout::PerLayer => (KeptSet::Layer(layer), KvSlot { layer, head: None }),
                    KeptLayout::PerHead => (
                        KeptSet::Head { layer, head },
                        KvSlot {
                            layer,
                            head: Some(head),
                        },
                    ),
                };
                let TensorValues::U32(p) = &decoded[&TensorName::Positions { set, segment }] else {
                    unreachable!()
                };
                let n = p.len() * dim as usize;
                let part = |v: &TensorValues| -> Vec<f32> {
                    let TensorValues::F32(v) = v else {
                        unreachable!()
                    };
                    let start = if slot.head.is_some() {
                        0
                    } else {
                        head as usize * n
                    };
                    v[start..start + n].to_vec()
                };
                pos.extend_from_slice(&p[..]);
                keys.extend(part(&decoded[&TensorName::Key { slot, segment }]));
                values.extend(part(&decoded[&TensorName::Value { slot, segment }]));
            }
            let got_head = &got.heads[head as usize];
            prop_assert_eq!(&got_head.positions, &pos);
            prop_assert_eq!(&got_head.keys, &keys);
            prop_assert_eq!(&got_head.values, &values);
        }
    }
    r.verify().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_files_round_trip(case in case()) {
        run(&case)?;
    }
}
