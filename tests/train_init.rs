//! `sac train --init`: an adapter seeds a run at another ratio or on another
//! model, and `--lora-targets` widens the LoRA to every attention projection.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::train::{
    adapter_tensors, compress_and_ask, model, qa_rows, s, train, train_command, train_ok,
    with_flags, write_rows,
};
use common::{fixture_dir, max_abs_diff, run_ok};
use sac::adapter::AdapterConfig;
use serde_json::Value;

/// A ratio curriculum: `--init` from an adapter at ratio 4 with `--ratio 8`
/// starts each anchor from the role embedding of its nearest ratio-4 anchor.
#[test]
fn an_adapter_at_one_ratio_seeds_another() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    write_rows(&data, &qa_rows(1));
    let at_4 = dir.path().join("r4");
    let flags = "--stage qa --grad-accum 1 --lr 1e-2 --steps 2";
    let args = with_flags(&["--data", s(&data), "--out", s(&at_4)], flags);
    train_ok("llama3", &args);
    // A step this small leaves the seeded tensors as they were (to 1e-6).
    let at_8 = dir.path().join("r8");
    let flags = "--ratio 8 --stage qa --steps 1 --lr 1e-12";
    let paths = ["--data", s(&data), "--out", s(&at_8), "--init", s(&at_4)];
    run_ok(train_command(&model("llama3")).args(with_flags(&paths, flags)));
    let config = AdapterConfig::load(&at_8).unwrap();
    assert_eq!(
        (config.ratio, config.mem_size, config.chunk_size),
        (8, 2, 16)
    );
    let (before, after) = (adapter_tensors(&at_4), adapter_tensors(&at_8));
    // 16-token chunks: ratio 8's anchors at 3 and 11 sit between ratio 4's
    // at 1, 5, 9 and 13, and take the earlier, rows 0 and 2.
    let rows = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let seeded = before["role_tokens"].index_select(&rows, 0).unwrap();
    assert!(max_abs_diff(&after["role_tokens"], &seeded) < 1e-6);
    for (name, t) in after.iter().filter(|(n, _)| *n != "role_tokens") {
        assert!(max_abs_diff(t, &before[name]) < 1e-6, "{name} changed");
    }
    assert!(compress_and_ask(dir.path(), &at_8)["tokens"].is_array());
}

/// An adapter made for another model of the same shape starts a run only
/// with `--init-any-model`; the new adapter names the model it trained on.
#[test]
fn an_adapter_of_another_model_starts_a_run_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    write_rows(&data, &qa_rows(1));
    let first = dir.path().join("first");
    let flags = "--stage qa --grad-accum 1 --steps 1";
    train_ok(
        "llama3",
        &with_flags(&["--data", s(&data), "--out", s(&first)], flags),
    );

    // The same weights behind a reformatted config.json: another fingerprint.
    let other = dir.path().join("other-model");
    std::fs::create_dir(&other).unwrap();
    for entry in std::fs::read_dir(fixture_dir("llama3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, other.join(path.file_name().unwrap())).unwrap();
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("config.json")).unwrap()).unwrap();
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();

    let next = dir.path().join("next");
    let paths = ["--data", s(&data), "--out", s(&next), "--init", s(&first)];
    let train_other = |extra: &[&str]| {
        let mut cmd = train_command(s(&other));
        cmd.args(with_flags(&paths, flags)).args(extra);
        cmd
    };
    let err = common::failing(&mut train_other(&[]));
    assert!(
        err.contains("was trained on model") && err.contains("--init-any-model"),
        "{err}"
    );
    assert!(!next.exists(), "a refused run writes nothing");

    run_ok(&mut train_other(&["--init-any-model"]));
    let stamped = |dir: &Path| AdapterConfig::load(dir).unwrap().base_model_fingerprint;
    assert!(stamped(&next).is_some());
    assert_ne!(stamped(&next), stamped(&first));
    assert!(compress_and_ask(dir.path(), &next)["tokens"].is_array());
}

/// LoRA on k and o too, on a model whose attention is wider than its
/// hidden size (o_proj reads 4 x 16 = 64 features into 32).
#[test]
fn lora_on_every_attention_projection_trains_and_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    write_rows(&data, &qa_rows(1));
    let out = dir.path().join("adapter");
    let flags =
        "--stage qa --steps 3 --grad-accum 1 --lr 1e-2 --lora-targets o_proj,q_proj,k_proj,v_proj";
    let args = with_flags(&["--data", s(&data), "--out", s(&out)], flags);
    train_ok("qwen3", &args);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let all = ["q_proj", "k_proj", "v_proj", "o_proj"];
    assert_eq!(config["lora_targets"], serde_json::json!(all));
    let tensors = adapter_tensors(&out);
    assert_eq!(
        tensors.len(),
        2 + 2 * 4 * 2,
        "roles, specials, 2 layers x 4 x A/B"
    );
    let dims = |name: &str| {
        tensors[&format!("layers.0.self_attn.{name}")]
            .dims()
            .to_vec()
    };
    assert_eq!(dims("k_proj.lora_b"), [4, 2 * 16]);
    assert_eq!(dims("o_proj.lora_a"), [4 * 16, 4]);
    assert_eq!(dims("o_proj.lora_b"), [4, 32]);
    // B starts at zero. The last layer's queries and output projection come
    // after its K/V, the last thing the compressor hands on: no gradient.
    for (name, b) in tensors.iter().filter(|(n, _)| n.ends_with("lora_b")) {
        let moved = max_abs_diff(b, &b.zeros_like().unwrap());
        let untouched = name.starts_with("layers.1.self_attn.q_proj")
            || name.starts_with("layers.1.self_attn.o_proj");
        assert_eq!(moved == 0.0, untouched, "{name} moved {moved}");
    }

    assert!(compress_and_ask(dir.path(), &out)["tokens"].is_array());

    // Going on from it with other targets is refused.
    let more_out = dir.path().join("more");
    let flags = "--stage qa --lora-targets q_proj,v_proj";
    let args = with_flags(
        &["--data", s(&data), "--out", s(&more_out), "--init", s(&out)],
        flags,
    );
    let more = train("qwen3", &args);
    assert!(!more.status.success());
    let err = String::from_utf8_lossy(&more.stderr);
    assert!(
        err.contains("--lora-targets q_proj,v_proj differs"),
        "{err}"
    );
}
