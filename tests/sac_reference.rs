//! `sac compress` and `sac ask` against the SAC reference fixtures made with
//! HF transformers by `scripts/make_sac_fixtures.py` (docs/method.md: 510-token chunks,
//! 1-based positions, anchors at offsets 2, 7, ..., role embeddings, an
//! all-visible chunk mask, LoRA on q/v; the decoder reads [LM] at position L).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::stacked::stacked;
use common::{max_abs_diff, run_ok, sac, sac_fixture};
use sac::model::{AttentionMask, ForwardInput, Kernels};
use sac::sack::SackReader;

const TOLERANCE: f32 = 1e-4;

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(sac_fixture("reference.safetensors"), &Device::Cpu).unwrap()
}

fn base_model() -> String {
    common::fixture_dir("llama3").to_string_lossy().into_owned()
}

fn compress(doc: &str, out: &Path, extra: &[&str]) {
    let mut cmd = sac();
    cmd.arg("compress")
        .arg(sac_fixture(doc))
        .arg("-o")
        .arg(out)
        // f32 throughout: the reference's tolerance is f32's.
        .args([
            "-m",
            &base_model(),
            "--kv-encoding",
            "f32",
            "--dtype",
            "f32",
            "-q",
        ])
        .args(extra);
    run_ok(&mut cmd);
}

/// The anchor positions (1-based) and per-layer K/V stored in a .sack.
fn stored(path: &Path) -> (Vec<i64>, Vec<(Tensor, Tensor)>) {
    let mut reader = SackReader::open(path).unwrap();
    let header = reader.header().clone();
    let (heads, dim) = (
        header.model.kv_heads as usize,
        header.model.head_dim as usize,
    );
    let first = i64::from(header.decoder.first_position);
    let mut positions = Vec::new();
    let mut layers = Vec::new();
    for layer in 0..header.model.layers {
        let s = stacked(reader.read_layer(layer).unwrap()).unwrap();
        positions = s.positions.iter().map(|&p| i64::from(p) + first).collect();
        let shape = (heads, s.positions.len(), dim);
        layers.push((
            Tensor::from_vec(s.keys, shape, &Device::Cpu).unwrap(),
            Tensor::from_vec(s.values, shape, &Device::Cpu).unwrap(),
        ));
    }
    (positions, layers)
}

fn ask_tokens(sack_path: &Path, question: &str) -> Vec<i64> {
    let out = run_ok(sac().arg("ask").arg(sack_path).arg(question).args([
        "-m",
        &base_model(),
        "--json",
        "--max-tokens",
        "8",
    ]));
    let record: serde_json::Value = serde_json::from_slice(&out).unwrap();
    record["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

/// Teacher-forces the reference answer through the decoder reading `sack_path`
/// and returns the logits each answer token was chosen from.
fn answer_logits(sack_path: &Path, question_ids: &[u32], answer_ids: &[u32]) -> Tensor {
    let model = common::load_model("llama3");
    let mut reader = SackReader::open(sack_path).unwrap();
    let context = common::load_context(&mut reader, &model.decoder);
    let mut ids = question_ids.to_vec();
    ids.extend(&answer_ids[..answer_ids.len() - 1]);
    let mut embeds = model
        .decoder
        .embed(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let mut start = context.question_position;
    if let Some(prefix) = &context.prefix {
        embeds = Tensor::cat(&[&prefix.unsqueeze(0).unwrap(), &embeds], 1).unwrap();
        start -= prefix.dim(0).unwrap() as u32;
    }
    let seq = embeds.dim(1).unwrap() as u32;
    let positions = Tensor::arange(start, start + seq, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model
        .decoder
        .forward(ForwardInput {
            embeds: &embeds,
            positions: &positions,
            mask: AttentionMask::Causal,
            shared: Some(&context.past),
            past: None,
            lora: None,
            kernels: Kernels::Inference,
        })
        .unwrap();
    let n = answer_ids.len();
    let last = out.hidden.narrow(1, seq as usize - n, n).unwrap();
    model.decoder.logits(&last).unwrap().squeeze(0).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

fn check(doc: &str, key: &str, method_args: &[&str], variant: &str) {
    let reference = reference();
    let r = |name: &str| &reference[&format!("{key}.{name}")];
    let dir = tempfile::tempdir().unwrap();
    let sack_path = dir.path().join(format!("{key}-{variant}.sack"));
    compress(doc, &sack_path, method_args);

    let (positions, layers) = stored(&sack_path);
    assert_eq!(
        positions,
        r("anchor_positions").to_vec1::<i64>().unwrap(),
        "{key} {variant}: anchors"
    );
    let prefix = if variant == "sac" {
        String::new()
    } else {
        format!("{variant}.")
    };
    for (i, (k, v)) in layers.iter().enumerate() {
        let dk = max_abs_diff(k, r(&format!("{prefix}k.{i}")));
        let dv = max_abs_diff(v, r(&format!("{prefix}v.{i}")));
        assert!(
            dk <= TOLERANCE && dv <= TOLERANCE,
            "{key} {variant} layer {i}: K {dk}, V {dv}"
        );
    }

    let answer_key = if variant == "sac" {
        "answer".to_string()
    } else {
        format!("{variant}_answer")
    };
    let expected = r(&format!("{answer_key}_ids")).to_vec1::<i64>().unwrap();
    assert_eq!(
        ask_tokens(&sack_path, "What is the first word?"),
        expected,
        "{key} {variant}: answer"
    );
    let logits = answer_logits(
        &sack_path,
        &ids(r("question_ids")),
        &ids(r(&format!("{answer_key}_ids"))),
    );
    let d = max_abs_diff(&logits, r(&format!("{answer_key}_logits")));
    assert!(
        d <= TOLERANCE,
        "{key} {variant}: answer logits differ by {d}"
    );
}

#[test]
fn tokenization_matches_the_reference() {
    let model = common::load_model("llama3");
    let reference = reference();
    for (doc, key) in [("doc_long.txt", "long"), ("doc_edge.txt", "edge")] {
        let text = std::fs::read_to_string(sac_fixture(doc)).unwrap();
        assert_eq!(
            model.tokenizer.context_ids(&text).unwrap(),
            ids(&reference[&format!("{key}.context_ids")])
        );
        let question = model
            .tokenizer
            .question_ids("What is the first word?")
            .unwrap();
        assert_eq!(question, ids(&reference[&format!("{key}.question_ids")]));
    }
}

#[test]
fn sac_compressor_matches_the_reference() {
    let adapter = sac_fixture("adapter");
    let adapter = adapter.to_str().unwrap();
    check("doc_long.txt", "long", &["--adapter", adapter], "sac");
    check("doc_edge.txt", "edge", &["--adapter", adapter], "sac");
}

#[test]
fn uniform_compressor_matches_the_reference() {
    // The reference's uniform keeps no sinks (sac's default keeps 4).
    let flags = ["--compressor", "uniform", "--sinks", "0"];
    check("doc_long.txt", "long", &flags, "uniform");
    check("doc_edge.txt", "edge", &flags, "uniform");
}

#[test]
fn imported_reference_adapter_gives_identical_anchors() {
    let dir = tempfile::tempdir().unwrap();
    let imported = dir.path().join("imported");
    run_ok(
        sac()
            .args(["adapter", "import"])
            .arg(sac_fixture("adapter.pt"))
            .arg("-o")
            .arg(&imported)
            .args(["-m", &base_model()]),
    );
    let original_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sac_fixture("adapter/adapter_config.json")).unwrap())
            .unwrap();
    let imported_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(imported.join("adapter_config.json")).unwrap())
            .unwrap();
    for key in [
        "ratio",
        "chunk_size",
        "mem_size",
        "lora_rank",
        "lora_scale",
        "base_model_fingerprint",
    ] {
        assert_eq!(imported_config[key], original_config[key], "{key}");
    }
    let a = dir.path().join("a.sack");
    let b = dir.path().join("b.sack");
    compress(
        "doc_long.txt",
        &a,
        &["--adapter", sac_fixture("adapter").to_str().unwrap()],
    );
    compress(
        "doc_long.txt",
        &b,
        &["--adapter", imported.to_str().unwrap()],
    );
    let (pa, la) = stored(&a);
    let (pb, lb) = stored(&b);
    assert_eq!(pa, pb);
    for ((ka, va), (kb, vb)) in la.iter().zip(&lb) {
        assert_eq!(max_abs_diff(ka, kb), 0.0);
        assert_eq!(max_abs_diff(va, vb), 0.0);
    }
}
