//! Running `sac train` on the fixture models, and using what it writes.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{fixture_dir, run_ok, sac, sac_fixture};

/// Small chunks, few anchors, rank 4: a step takes milliseconds.
pub const TINY: [&str; 8] = [
    "--chunk-size",
    "16",
    "--ratio",
    "4",
    "--lora-rank",
    "4",
    "--seed",
    "7",
];

pub fn model(name: &str) -> String {
    fixture_dir(name).to_string_lossy().into_owned()
}

pub fn doc() -> String {
    std::fs::read_to_string(sac_fixture("doc_long.txt")).unwrap()
}

pub fn write_rows(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// QA rows over slices of the fixture document.
pub fn qa_rows(n: usize) -> Vec<Value> {
    let text = doc();
    (0..n)
        .map(|i| {
            let context = &text[i * 120..i * 120 + 300];
            serde_json::json!({
                "context": context,
                "question": "What is the first word?",
                "answer": context.split_whitespace().next().unwrap(),
            })
        })
        .collect()
}

/// `sac train -m MODEL_DIR -q`, for the caller to add its flags.
pub fn train_command(model_dir: &str) -> Command {
    let mut cmd = sac();
    cmd.arg("train").args(["-m", model_dir, "-q"]);
    cmd
}

pub fn train(model_name: &str, args: &[&str]) -> Output {
    train_command(&model(model_name))
        .args(TINY)
        .args(args)
        .output()
        .expect("run sac train")
}

pub fn train_ok(model_name: &str, args: &[&str]) {
    let out = train(model_name, args);
    assert!(
        out.status.success(),
        "sac train {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lines of a run's `log.jsonl`.
pub fn log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The step losses of a run's `log.jsonl`.
pub fn losses(dir: &Path) -> Vec<f64> {
    log(dir)
        .iter()
        .filter_map(|r| r.get("loss").and_then(Value::as_f64))
        .collect()
}

pub fn adapter_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter.safetensors"), &Device::Cpu).unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `paths` (flags with their paths) followed by the space-separated `flags`.
pub fn with_flags<'a>(paths: &[&'a str], flags: &'a str) -> Vec<&'a str> {
    paths.iter().copied().chain(flags.split(' ')).collect()
}

/// Compresses the fixture document with `adapter` into `dir` and asks it a
/// question: the answer's JSON record.
pub fn compress_and_ask(dir: &Path, adapter: &Path) -> Value {
    let doc_path = dir.join("doc.txt");
    std::fs::write(&doc_path, doc()).unwrap();
    let sack = dir.join("doc.sack");
    run_ok(sac().arg("compress").arg(&doc_path).args([
        "-o",
        s(&sack),
        "--adapter",
        s(adapter),
        "-q",
    ]));
    let answer = run_ok(sac().arg("ask").arg(&sack).args([
        "What is the first word?",
        "--json",
        "--max-tokens",
        "4",
    ]));
    serde_json::from_slice(&answer).unwrap()
}
