//! Keys stored before RoPE (`key_rope: none`): the reader rotates them to their
//! document positions, giving back exactly the keys a RoPE-applied file holds.
//! This is what later lets several .sack files be placed side by side. Per-head
//! kept sets (kvzip) rotate each head at its own positions.

mod common;

use candle_core::{Device, Tensor};
use common::stacked::stacked;
use common::{fixture_dir, max_abs_diff, run_ok, sac, sac_fixture};
use sac::sack::{
    Floats, KeptLayout, KeptSet, KeyRope, KvSlot, SackReader, SackWriter, WriteOptions,
};

/// `keys` (`[heads, positions.len(), dim]`, all heads at `positions`)
/// rotated back to position 0.
fn unrotated(
    model: &sac::runtime::LoadedModel,
    keys: &[f32],
    positions: &[u32],
    first: i64,
) -> Vec<f32> {
    let dim = model.config.head_dim;
    let heads = keys.len() / dim / positions.len().max(1);
    let backwards: Vec<i64> = positions.iter().map(|&p| -(i64::from(p) + first)).collect();
    let backwards = Tensor::new(backwards.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let k = Tensor::from_slice(keys, (1, heads, positions.len(), dim), &Device::Cpu).unwrap();
    model
        .decoder
        .rotate(&k, &backwards)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn pre_rope_keys_are_rotated_on_load() {
    let model = common::load_model("llama3");
    // One kept set for all heads (uniform), and one per layer and head (kvzip).
    for compressor in ["uniform", "kvzip"] {
        let dir = tempfile::tempdir().unwrap();
        let rotated = dir.path().join("rotated.sack");
        run_ok(
            sac()
                .arg("compress")
                .arg(sac_fixture("doc_long.txt"))
                .arg("-o")
                .arg(&rotated)
                .arg("-m")
                .arg(fixture_dir("llama3"))
                .args(["--kv-encoding", "f32", "-q", "--compressor", compressor]),
        );

        // Rewrite the file with every key rotated back to position 0.
        let mut reader = SackReader::open(&rotated).unwrap();
        let mut header = reader.header().clone();
        header.kv.key_rope = KeyRope::None;
        let first = i64::from(header.decoder.first_position);
        let plain = dir.path().join("plain.sack");
        let options = WriteOptions {
            encoding: sac::sack::KvEncoding::F32,
            zstd_level: None,
        };
        let mut writer = SackWriter::create(&plain, &header, options).unwrap();
        for layer in 0..header.model.layers {
            let read = reader.read_layer(layer).unwrap();
            if header.kv.layout == KeptLayout::PerHead {
                for (head, h) in read.heads.iter().enumerate() {
                    let head = head as u32;
                    writer
                        .add_positions(0, KeptSet::Head { layer, head }, &h.positions)
                        .unwrap();
                    let keys = unrotated(&model, &h.keys, &h.positions, first);
                    let slot = KvSlot {
                        layer,
                        head: Some(head),
                    };
                    writer
                        .add_kv(0, slot, Floats::F32(&keys), Floats::F32(&h.values))
                        .unwrap();
                }
                continue;
            }
            let s = stacked(read).unwrap();
            if layer == 0 {
                writer
                    .add_positions(0, KeptSet::Shared, &s.positions)
                    .unwrap();
            }
            let keys = unrotated(&model, &s.keys, &s.positions, first);
            let slot = KvSlot { layer, head: None };
            writer
                .add_kv(0, slot, Floats::F32(&keys), Floats::F32(&s.values))
                .unwrap();
        }
        writer.finish().unwrap();

        let load =
            |path| common::load_context(&mut SackReader::open(path).unwrap(), &model.decoder);
        let (a, b) = (load(&rotated), load(&plain));
        assert_eq!(a.question_position, b.question_position);
        for (x, y) in a.past.iter().zip(&b.past) {
            let d = max_abs_diff(&x.kv.k, &y.kv.k);
            assert!(d <= 1e-5, "{compressor}: keys differ by {d}");
            assert_eq!(max_abs_diff(&x.kv.v, &y.kv.v), 0.0);
            let bias =
                |kv: &sac::model::SharedKv| kv.bias.as_ref().map(|b| b.to_vec2::<f32>().unwrap());
            assert_eq!(bias(x), bias(y));
            assert_eq!(x.bias.is_some(), compressor == "kvzip");
        }
        // Unrotated keys really differ from rotated ones (the test is not vacuous).
        let raw = SackReader::open(&plain)
            .unwrap()
            .read_layer(1)
            .unwrap()
            .heads[0]
            .keys
            .clone();
        let loaded: Vec<f32> = a.past[1]
            .kv
            .k
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = raw
            .iter()
            .zip(&loaded)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d > 0.1, "{compressor}");
    }
}
