//! Keys stored before RoPE (`key_rope: none`): the reader rotates them to their
//! document positions, giving back exactly the keys a RoPE-applied file holds.
//! This is what later lets several .sack files be placed side by side.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture_dir, max_abs_diff, run_ok, sac, sac_fixture};
use sac::sack::{Floats, KeptSet, KeyRope, KvSlot, SackReader, SackWriter, WriteOptions};

#[test]
fn pre_rope_keys_are_rotated_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let rotated = dir.path().join("rotated.sack");
    let model_dir = fixture_dir("llama3");
    run_ok(
        sac()
            .arg("compress")
            .arg(sac_fixture("doc_long.txt"))
            .arg("-o")
            .arg(&rotated)
            .arg("-m")
            .arg(&model_dir)
            .args(["--kv-encoding", "f32", "-q"]),
    );
    let model = common::load_model("llama3");

    // Rewrite the file with every key rotated back to position 0.
    let mut reader = SackReader::open(&rotated).unwrap();
    let mut header = reader.header().clone();
    header.kv.key_rope = KeyRope::None;
    let first = i64::from(header.decoder.first_position);
    let (heads, dim) = (
        header.model.kv_heads as usize,
        header.model.head_dim as usize,
    );
    let plain = dir.path().join("plain.sack");
    let options = WriteOptions {
        encoding: sac::sack::KvEncoding::F32,
        zstd_level: None,
    };
    let mut writer = SackWriter::create(&plain, &header, options).unwrap();
    for layer in 0..header.model.layers {
        let s = reader.read_layer(layer).unwrap().into_stacked().unwrap();
        if layer == 0 {
            writer
                .add_positions(0, KeptSet::Shared, &s.positions)
                .unwrap();
        }
        let backwards: Vec<i64> = s
            .positions
            .iter()
            .map(|&p| -(i64::from(p) + first))
            .collect();
        let backwards = Tensor::new(backwards.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let k = Tensor::from_vec(s.keys, (1, heads, s.positions.len(), dim), &Device::Cpu).unwrap();
        let unrotated: Vec<f32> = model
            .decoder
            .rotate(&k, &backwards)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let slot = KvSlot { layer, head: None };
        writer
            .add_kv(0, slot, Floats::F32(&unrotated), Floats::F32(&s.values))
            .unwrap();
    }
    writer.finish().unwrap();

    let a =
        sac::pack::load_context(&mut SackReader::open(&rotated).unwrap(), &model.decoder).unwrap();
    let b =
        sac::pack::load_context(&mut SackReader::open(&plain).unwrap(), &model.decoder).unwrap();
    assert_eq!(a.question_position, b.question_position);
    for (x, y) in a.past.iter().zip(&b.past) {
        let d = max_abs_diff(&x.k, &y.k);
        assert!(d <= 1e-5, "keys differ by {d}");
        assert_eq!(max_abs_diff(&x.v, &y.v), 0.0);
    }
    // Unrotated keys really differ from rotated ones (the test is not vacuous).
    let raw = SackReader::open(&plain)
        .unwrap()
        .read_layer(1)
        .unwrap()
        .into_stacked()
        .unwrap();
    let raw = Tensor::from_vec(raw.keys, a.past[1].k.shape(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&raw, &a.past[1].k) > 0.1);
}
