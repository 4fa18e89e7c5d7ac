//! `sac train --method gmsa` on the tiny GMSA fixture models. Stage 1
//! (autoencoding): the alignment block starts as the model's first layer,
//! the loss falls, every trainable moves while the base model does not, a
//! resumed run equals an uninterrupted one, the adapter compresses and
//! answers. Stage 2 (qa): only the decoder's LoRA moves, resuming is exact,
//! and its .sack files are answered only with that adapter. Settings that
//! belong to the other method are refused in one line with nothing written.

mod common;

use std::path::{Path, PathBuf};

use common::train::{
    adapter_tensors, compress_and_ask, doc, log, losses, qa_rows, s, train_command, write_rows,
};
use common::{load_model_at, max_abs_diff, run_ok, sac};
use sac::adapter::{Config, GmsaConfig};
use sac::model::LoraTarget;
use sac::train::params::Trainables;
use serde_json::Value;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gmsa")
        .join(name)
        .join("model")
}

/// Encoder of 2 layers, merge size 4, rank 4, all seven projections.
const SHAPE: [&str; 10] = [
    "--method",
    "gmsa",
    "--encoder-layers",
    "2",
    "--ratio",
    "4",
    "--lora-rank",
    "4",
    "--seed",
    "3",
];

fn train(model: &str, args: &[&str]) -> std::process::Output {
    train_command(model_dir(model).to_str().unwrap())
        .args(args)
        .output()
        .expect("run sac train")
}

fn train_ok(model: &str, args: &[&str]) {
    let out = train(model, args);
    assert!(
        out.status.success(),
        "sac train {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` texts of the fixture document to restate.
fn texts(path: &Path, n: usize) {
    let text = doc();
    let rows: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({"text": &text[i * 200..i * 200 + 240]}))
        .collect();
    write_rows(path, &rows);
}

#[test]
fn a_fresh_alignment_block_is_the_models_first_layer() {
    let m = load_model_at(&model_dir("llama3"));
    let config = GmsaConfig {
        method: "gmsa".into(),
        base_model: "m".into(),
        base_model_fingerprint: None,
        encoder_layers: 2,
        merge_size: 4,
        lsa_layers: 1,
        lora_rank: 4,
        lora_scale: 8.0,
        lora_targets: LoraTarget::names(&LoraTarget::ALL),
        decoder_lora: None,
    };
    let params = Trainables::init(Config::Gmsa(config), &m.decoder, 0).unwrap();
    let named: Vec<_> = params.named().collect();
    let layer = m.decoder.layer_tensors(0).unwrap();
    // 2 encoder layers x 7 projections x A/B, and the block's tensors.
    assert_eq!(named.len(), 2 * 7 * 2 + layer.len());
    for (name, tensor) in &layer {
        let (_, var) = named
            .iter()
            .find(|(n, _)| *n == format!("lsa.layers.0.{name}"))
            .unwrap_or_else(|| panic!("no lsa.layers.0.{name}"));
        assert_eq!(max_abs_diff(var.as_tensor(), tensor), 0.0, "{name}");
    }
    // LoRA B starts at zero, so the encoder starts as the base model.
    for (name, var) in named.iter().filter(|(n, _)| n.ends_with("lora_b")) {
        let sum = var.as_tensor().abs().unwrap().sum_all().unwrap();
        assert_eq!(sum.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    assert_eq!(params.config().trained().method.name, "gmsa");
}

#[test]
fn autoencoding_trains_resumes_exactly_and_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.jsonl");
    texts(&data, 3);
    let eval = dir.path().join("eval.jsonl");
    write_rows(&eval, &qa_rows(2));
    let weights = model_dir("qwen2").join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let (whole, halves) = (dir.path().join("whole"), dir.path().join("halves"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = SHAPE.to_vec();
        args.extend(["--data", s(&data), "--eval", s(&eval), "--out", s(out)]);
        args.extend(["--steps", "8", "--grad-accum", "1", "--save-every", "4"]);
        args.extend(["--lr", "5e-3", "--eval-max-tokens", "4"]);
        args.extend(extra);
        train_ok("qwen2", &args);
    };
    run(&whole, &[]);
    run(&halves, &["--stop-after", "4"]);
    let early = adapter_tensors(&halves);
    run(&halves, &["--resume"]);
    let late = adapter_tensors(&halves);

    let (a, b) = (adapter_tensors(&whole), late.clone());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let d = max_abs_diff(t, &b[name]);
        assert!(d <= 1e-6, "{name} differs by {d} after resuming");
    }
    assert_eq!(losses(&whole), losses(&halves));
    let evals = log(&whole)
        .iter()
        .filter(|r| r.get("eval_f1").is_some())
        .count();
    assert_eq!(evals, 2, "an evaluation at steps 4 and 8");

    // Every epoch restates the same three texts: the second does it better.
    let l = losses(&whole);
    assert_eq!(l.len(), 8);
    let mean = |r: std::ops::Range<usize>| l[r].iter().sum::<f64>() / 3.0;
    assert!(
        mean(3..6) < mean(0..3) - 0.2,
        "the loss does not fall: {l:?}"
    );
    for (name, t) in &late {
        assert!(max_abs_diff(t, &early[name]) > 0.0, "{name} did not move");
    }
    assert!(late.keys().any(|n| n.starts_with("lsa.layers.0.mlp")));
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "base weights changed"
    );

    let config: Value =
        serde_json::from_slice(&std::fs::read(whole.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["method"], "gmsa");
    assert_eq!(config["lora_scale"], 8.0, "alpha 32 / rank 4");
    let record = compress_and_ask(dir.path(), &whole);
    assert!(record["tokens"].is_array());
}

/// Runs `sac train` expecting a one-line error containing `expected`, with
/// nothing written to its output directory.
fn assert_refused(model: &str, args: &[&str], out: &Path, expected: &str) {
    let output = train(model, args);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} was accepted");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(expected), "{args:?}: {err}");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
}

#[test]
fn the_other_methods_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.jsonl");
    texts(&data, 1);
    let out = dir.path().join("out");
    let gmsa_adapter = model_dir("qwen2").parent().unwrap().join("adapter");
    let base = ["--data", s(&data), "--out", s(&out)];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    let cases: [(&[&str], &str); 6] = [
        (
            &["--method", "gmsa", "--stage", "pretrain"],
            "--method gmsa has no --stage pretrain (it trains autoencode, qa)",
        ),
        (
            &["--method", "gmsa", "--stage", "qa"],
            "pass --init with an adapter of its first stage",
        ),
        (
            &["--method", "gmsa", "--chunk-size", "16"],
            "--chunk-size applies to --method sac only",
        ),
        (
            &["--encoder-layers", "2"],
            "--encoder-layers applies to --method gmsa only",
        ),
        (
            &["--lora-targets", "q_proj,up_proj"],
            "--method sac cannot adapt up_proj",
        ),
        (
            &["--stage", "autoencode"],
            "--method sac has no --stage autoencode",
        ),
    ];
    for (extra, expected) in cases {
        assert_refused("qwen2", &with(extra), &out, expected);
    }
    let init: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--init", s(&gmsa_adapter)])
        .collect();
    assert_refused(
        "qwen2",
        &init,
        &out,
        "the --init adapter is gmsa's, not --method sac's",
    );
    // Longer than the model can restate: refused before anything is written.
    assert_refused(
        "qwen2",
        &with(&["--method", "gmsa", "--max-context", "4000"]),
        &out,
        "--max-context 4000, restated in full",
    );
}

/// Runs `cmd`, expecting a one-line error containing `expected`.
fn assert_fails(cmd: &mut std::process::Command, expected: &str) {
    let out = cmd.output().expect("run sac");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(expected), "{cmd:?}: {err}");
}

#[test]
fn stage_two_trains_the_decoder_lora_alone_and_ask_needs_that_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    write_rows(&data, &qa_rows(3));
    let stage1 = model_dir("qwen2").parent().unwrap().join("adapter");
    let (whole, halves) = (dir.path().join("whole"), dir.path().join("halves"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--method", "gmsa", "--stage", "qa", "--init", s(&stage1)];
        args.extend(["--data", s(&data), "--eval", s(&data), "--out", s(out)]);
        args.extend(["--steps", "6", "--grad-accum", "1", "--save-every", "3"]);
        args.extend(["--lr", "5e-3", "--lora-rank", "4", "--seed", "3"]);
        args.extend(["--eval-max-tokens", "4"]);
        args.extend(extra);
        train_ok("qwen2", &args);
    };
    run(&whole, &[]);
    run(&halves, &["--stop-after", "3"]);
    let early = adapter_tensors(&halves);
    run(&halves, &["--resume"]);
    let late = adapter_tensors(&halves);
    let whole_tensors = adapter_tensors(&whole);
    assert_eq!(whole_tensors.len(), late.len());
    for (name, t) in &whole_tensors {
        let d = max_abs_diff(t, &late[name]);
        assert!(d <= 1e-6, "{name} differs by {d} after resuming");
    }
    assert_eq!(losses(&whole), losses(&halves));
    let l = losses(&whole);
    let mean = |r: std::ops::Range<usize>| l[r].iter().sum::<f64>() / 3.0;
    assert!(
        mean(3..6) < mean(0..3) - 0.2,
        "the loss does not fall: {l:?}"
    );

    // The compressor is the --init adapter's, bit for bit; the decoder's
    // LoRA (every layer, all seven projections) is new, and moved.
    let init = adapter_tensors(&stage1);
    for (name, t) in &init {
        assert_eq!(max_abs_diff(t, &late[name]), 0.0, "{name} moved");
    }
    let decoder: Vec<_> = late.keys().filter(|n| n.starts_with("decoder.")).collect();
    assert_eq!(decoder.len(), 4 * 7 * 2, "4 layers x 7 projections x A/B");
    assert_eq!(late.len(), init.len() + decoder.len());
    for name in decoder {
        assert!(
            max_abs_diff(&late[name], &early[name]) > 0.0,
            "{name} did not move"
        );
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(whole.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["decoder_lora"]["rank"], 4);
    assert_eq!(config["decoder_lora"]["scale"], 8.0, "alpha 32 / rank 4");
    assert_eq!(
        config["lora_rank"], 4,
        "the encoder's, as the --init adapter's"
    );

    // A .sack made with it names it, and is answered only with it.
    let doc_path = dir.path().join("doc.txt");
    std::fs::write(&doc_path, doc()).unwrap();
    let sack = dir.path().join("doc.sack");
    run_ok(sac().arg("compress").arg(&doc_path).args([
        "-o",
        s(&sack),
        "--adapter",
        s(&whole),
        "-q",
    ]));
    let info = String::from_utf8(run_ok(sac().arg("info").arg(&sack))).unwrap();
    assert!(
        info.contains("decoder     with the LoRA of adapter whole"),
        "{info}"
    );
    let ask = |extra: &[&str]| {
        let mut cmd = sac();
        cmd.arg("ask")
            .arg(&sack)
            .args(["What is the first word?", "--json"]);
        cmd.args(["--max-tokens", "4"]).args(extra);
        cmd
    };
    assert_fails(&mut ask(&[]), "which was not given: pass --adapter DIR");
    // Refused before any model is looked for.
    assert_fails(
        &mut ask(&["--model", "/nonexistent/model"]),
        "which was not given: pass --adapter DIR",
    );
    assert_fails(&mut ask(&["--adapter", s(&stage1)]), "is another");
    let answer: Value =
        serde_json::from_slice(&run_ok(&mut ask(&["--adapter", s(&whole)]))).unwrap();
    assert!(answer["tokens"].is_array());
    // The same answer from a pipe and from a batch.
    let piped = run_ok(
        sac()
            .arg("ask")
            .arg("-")
            .args(["What is the first word?", "--json", "--max-tokens", "4"])
            .args(["--adapter", s(&whole)])
            .stdin(std::fs::File::open(&sack).unwrap()),
    );
    let piped: Value = serde_json::from_slice(&piped).unwrap();
    assert_eq!(piped["tokens"], answer["tokens"]);
    let batch = dir.path().join("batch.jsonl");
    std::fs::write(&batch, "What is the first word?\n").unwrap();
    let batched = run_ok(sac().arg("ask").arg(&sack).args([
        "--batch",
        s(&batch),
        "--max-tokens",
        "4",
        "--adapter",
        s(&whole),
    ]));
    let batched: Value = serde_json::from_slice(&batched).unwrap();
    assert_eq!(batched["tokens"], answer["tokens"]);

    // A file answered by the base model refuses an adapter for its decoder.
    let stage1_sack = dir.path().join("stage1.sack");
    run_ok(sac().arg("compress").arg(&doc_path).args([
        "-o",
        s(&stage1_sack),
        "--adapter",
        s(&stage1),
        "-q",
    ]));
    let mut cmd = sac();
    cmd.arg("ask")
        .arg(&stage1_sack)
        .args(["Q?", "--adapter", s(&whole)]);
    assert_fails(&mut cmd, "leave out --adapter");
}
