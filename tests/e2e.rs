//! `sac compress` and `sac ask` driven as a user drives them: pipes, batches,
//! bad input, mismatched models, and the `full` compressor's losslessness.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::{Device, Tensor};
use common::{failing, fixture_dir, run_ok, sac, sac_fixture};
use sac::generate::{Answerer, DecoderContext, SamplingSettings};
use sac::layout::prompt::PromptLayout;
use sac::model::{ForwardInput, SharedKv};

fn model(name: &str) -> String {
    fixture_dir(name).to_string_lossy().into_owned()
}

fn compress_to(doc: &Path, out: &Path, model_name: &str, extra: &[&str]) {
    common::compress(sac(), doc, model(model_name), extra, out);
}

fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Greedy tokens from one causal pass over the whole prompt (context then
/// question at positions 1, 2, ..., in `layout`), with no compression and
/// no file.
fn uncompressed_greedy(
    m: &sac::runtime::LoadedModel,
    layout: &PromptLayout,
    text: &str,
    question: &str,
    max_tokens: usize,
) -> Vec<u32> {
    let mut ids = layout.context_ids(&m.tokenizer, text).unwrap();
    let context_len = ids.len();
    ids.extend(layout.question_ids(&m.tokenizer, question).unwrap());
    let dev = Device::Cpu;
    let prompt = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions = Tensor::arange(1u32, ids.len() as u32 + 1, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    // Prefill everything but the last prompt token; the answerer feeds that one.
    let n = ids.len() - 1;
    let embeds = m.decoder.embed(&prompt.narrow(1, 0, n).unwrap()).unwrap();
    let positions = positions.narrow(1, 0, n).unwrap();
    let out = m
        .decoder
        .forward(ForwardInput::causal(&embeds, &positions))
        .unwrap();
    let context = DecoderContext {
        past: out.kv.into_iter().map(SharedKv::from).collect(),
        question_position: ids.len() as u32,
        prefix: None,
        lora: None,
    };
    assert!(context_len < n);
    let sampling = SamplingSettings {
        temperature: 0.0,
        top_p: None,
        seed: 0,
        max_tokens,
    };
    let answerer = Answerer::new(&m.decoder, context, m.tokenizer.eos()).unwrap();
    answerer
        .answer(&ids[n..], &sampling, |_| Ok(true))
        .unwrap()
        .tokens
}

#[test]
fn full_compressor_is_lossless_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let doc = sac_fixture("doc_long.txt");
    let question = "What is the first word?";
    // qwen2 and mistral have untied heads, so their greedy tokens vary.
    for name in ["qwen2", "mistral"] {
        let sack = dir.path().join(format!("{name}.sack"));
        compress_to(
            &doc,
            &sack,
            name,
            &["--compressor", "full", "--kv-encoding", "f32"],
        );
        let out = run_ok(sac().arg("ask").arg(&sack).arg(question).args([
            "--json",
            "--max-tokens",
            "12",
        ]));
        let tokens = common::json_ids(&json_lines(&out)[0]["tokens"]);
        let text = std::fs::read_to_string(&doc).unwrap();
        let m = common::load_model(name);
        let expected = uncompressed_greedy(&m, &PromptLayout::raw(), &text, question, 12);
        assert!(
            expected
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1,
            "degenerate reference"
        );
        assert_eq!(tokens, expected, "{name}");
    }
}

/// A chat template in the spirit of the fixtures' special tokens.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";

#[test]
fn the_chat_layout_is_recorded_and_answers_as_one_causal_pass() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen2");
    std::fs::create_dir(&model).unwrap();
    for file in common::MODEL_FILES {
        std::fs::copy(fixture_dir("qwen2").join(file), model.join(file)).unwrap();
    }
    let config = model.join("tokenizer_config.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    tok["chat_template"] = TEMPLATE.into();
    std::fs::write(&config, tok.to_string()).unwrap();

    let doc = sac_fixture("doc_edge.txt");
    let sack = dir.path().join("chat.sack");
    let flags = ["--compressor", "full", "--kv-encoding", "f32"];
    common::compress(sac(), &doc, &model, &flags, &sack);
    let info: serde_json::Value =
        serde_json::from_slice(&run_ok(sac().arg("info").arg(&sack).arg("--json"))).unwrap();
    let prompt = &info["header"]["decoder"]["prompt"];
    assert_eq!(prompt["format"], "chat", "{info}");
    assert_eq!(prompt["after_question"], "<|end_of_text|>ASSISTANT:");
    let question = "What is the first word?";
    let out =
        run_ok(
            sac()
                .arg("ask")
                .arg(&sack)
                .arg(question)
                .args(["--json", "--max-tokens", "12"]),
        );
    let answer = &json_lines(&out)[0];
    let tokens = common::json_ids(&answer["tokens"]);
    let m = common::load_model_at(&model);
    let layout = PromptLayout::chat(m.tokenizer.chat_template().unwrap()).unwrap();
    let text = std::fs::read_to_string(&doc).unwrap();
    assert_eq!(
        tokens,
        uncompressed_greedy(&m, &layout, &text, question, 12)
    );

    // Raw on request: no prompt in the header, a 1.0 file as before.
    let raw = dir.path().join("raw.sack");
    let flags = ["--prompt", "raw", "--compressor", "uniform"];
    common::compress(sac(), &doc, &model, &flags, &raw);
    let info = String::from_utf8(run_ok(sac().arg("info").arg(&raw))).unwrap();
    assert!(
        info.contains(".sack 1.0") && info.contains("prompt      raw"),
        "{info}"
    );
    // A model without a template cannot be asked for one.
    let err = failing(
        sac()
            .arg("compress")
            .arg(&doc)
            .args(["-m", &self::model("qwen2"), "--prompt", "chat", "-o"])
            .arg(dir.path().join("x.sack")),
    );
    assert!(err.contains("has no chat template"), "{err}");
}

#[test]
fn shell_pipeline_compresses_and_asks() {
    let script = format!(
        "cat '{doc}' | '{sac}' compress - -m '{m}' -q | '{sac}' ask - 'What is it?' -m '{m}' --max-tokens 4 --json",
        doc = sac_fixture("doc_long.txt").display(),
        sac = env!("CARGO_BIN_EXE_sac"),
        m = model("qwen2"),
    );
    let out = run_ok(
        Command::new("sh")
            .args(["-c", &script])
            .env("SAC_CACHE_DIR", std::env::temp_dir().join("sac-test-cache")),
    );
    let record = &json_lines(&out)[0];
    assert_eq!(record["question"], "What is it?");
    assert_eq!(record["tokens"].as_array().unwrap().len(), 4);
}

#[test]
fn default_output_replaces_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("notes.txt");
    std::fs::copy(sac_fixture("doc_edge.txt"), &doc).unwrap();
    run_ok(
        sac()
            .arg("compress")
            .arg(&doc)
            .args(["-m", &model("qwen3"), "-q"]),
    );
    let info = run_ok(
        sac()
            .arg("info")
            .arg(dir.path().join("notes.sack"))
            .arg("--json"),
    );
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["header"]["document"]["name"], "notes.txt");
    // Without an adapter, `auto` is kvzip.
    assert_eq!(info["header"]["compressor"]["method"], "kvzip");
}

#[test]
fn batch_answers_every_question_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("d.sack");
    compress_to(&sac_fixture("doc_long.txt"), &sack, "mistral", &[]);
    let batch = dir.path().join("questions.txt");
    std::fs::write(
        &batch,
        "Who?\n\n{\"id\": \"q-7\", \"question\": \"Where?\"}\nWhen?\n",
    )
    .unwrap();
    let out = run_ok(
        sac()
            .arg("ask")
            .arg(&sack)
            .arg("--batch")
            .arg(&batch)
            .args(["--max-tokens", "3"]),
    );
    let records = json_lines(&out);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["id"], 1);
    assert_eq!(records[1]["id"], "q-7");
    assert_eq!(records[1]["question"], "Where?");
    assert_eq!(records[2]["id"], 4);
    for r in &records {
        assert_eq!(r["tokens"].as_array().unwrap().len(), 3);
        assert!(r["ttft_ms"].as_f64().unwrap() > 0.0);
        assert!(r["answer"].is_string() && r["tokens_per_s"].is_number());
    }
    // The same questions from standard input.
    let mut child = sac()
        .arg("ask")
        .arg(&sack)
        .args(["--batch", "-", "--max-tokens", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        &std::fs::read(&batch).unwrap(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let from_stdin = json_lines(&out.stdout);
    assert_eq!(from_stdin.len(), records.len());
    for (a, b) in from_stdin.iter().zip(&records) {
        for key in ["id", "question", "answer", "tokens"] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
}

#[test]
fn bad_input_is_one_clear_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, b"text \xff\xfe more").unwrap();
    let sub = dir.path().join("folder");
    std::fs::create_dir(&sub).unwrap();
    let cases = [
        (empty.clone(), "is empty"),
        (binary.clone(), "not UTF-8"),
        (sub.clone(), "is a directory"),
        (dir.path().join("missing.txt"), "missing.txt"),
    ];
    for (input, expected) in cases {
        let err = failing(
            sac()
                .arg("compress")
                .arg(&input)
                .args(["-m", &model("qwen2")]),
        );
        assert!(err.contains(expected), "{input:?}: {err}");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "nothing written: {names:?}");
}

#[test]
fn too_long_document_suggests_a_longer_context_model() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("long.txt");
    let text = std::fs::read_to_string(sac_fixture("doc_long.txt")).unwrap();
    std::fs::write(&doc, text.repeat(4)).unwrap();
    let err = failing(
        sac()
            .arg("compress")
            .arg(&doc)
            .args(["-m", &model("qwen2")]),
    );
    assert!(err.contains("longer context"), "{err}");
    assert!(!dir.path().join("long.sack").exists());
}

#[test]
fn mismatched_model_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("d.sack");
    compress_to(&sac_fixture("doc_edge.txt"), &sack, "qwen2", &[]);
    let err = failing(
        sac()
            .arg("ask")
            .arg(&sack)
            .arg("Q?")
            .args(["-m", &model("mistral")]),
    );
    let info: serde_json::Value =
        serde_json::from_slice(&run_ok(sac().arg("info").arg(&sack).arg("--json"))).unwrap();
    let fingerprint = info["header"]["model"]["fingerprint"].as_str().unwrap();
    assert!(
        err.contains(fingerprint) && err.contains("--force"),
        "{err}"
    );
    run_ok(sac().arg("ask").arg(&sack).arg("Q?").args([
        "-m",
        &model("mistral"),
        "--force",
        "--max-tokens",
        "2",
    ]));
    // A model of another shape cannot read the K/V, --force or not.
    let err =
        failing(
            sac()
                .arg("ask")
                .arg(&sack)
                .arg("Q?")
                .args(["-m", &model("qwen3"), "--force"]),
        );
    assert!(err.contains("the model has"), "{err}");
}

#[test]
fn closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("d.sack");
    compress_to(&sac_fixture("doc_edge.txt"), &sack, "qwen2", &[]);
    let mut child = sac()
        .arg("ask")
        .arg(&sack)
        .arg("Tell me everything.")
        .args(["--max-tokens", "400"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_question_without_a_terminal_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("d.sack");
    compress_to(&sac_fixture("doc_edge.txt"), &sack, "qwen2", &[]);
    let err = failing(sac().arg("ask").arg(&sack).stdin(Stdio::null()));
    assert!(err.contains("no question"), "{err}");
}

#[test]
fn conflicting_flags_are_refused_before_any_work() {
    let doc = sac_fixture("doc_edge.txt");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.sack");
    for (flags, expected) in [
        (
            &["--compressor", "full", "--ratio", "5"][..],
            "takes no ratio",
        ),
        (&["--compressor", "sac"][..], "needs an adapter"),
        (
            &["--compressor", "uniform", "--revision", "main"][..],
            "--revision and --gguf-file apply to Hub ids",
        ),
    ] {
        let err = failing(
            sac()
                .arg("compress")
                .arg(&doc)
                .arg("-o")
                .arg(&out)
                .args(["-m", &model("qwen2")])
                .args(flags),
        );
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
    assert!(!out.exists());
    let usage = sac()
        .args(["ask", "x.sack", "q", "--top-p", "0"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
