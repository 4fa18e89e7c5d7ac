//! `sac ask --batch` against separate `sac ask` runs: N questions answered by
//! one process that loads the model and the .sack once and decodes up to
//! `--batch-size` questions per forward pass, against N processes that each
//! load everything and answer one question.
//!
//! The model is random (weights are not downloadable here) but real-sized:
//! Qwen2.5-0.5B's shape by default, with a BPE tokenizer trained on the
//! document so that questions have realistic token counts. Every answer runs
//! to `--max-tokens` unless it meets EOS, alike in both modes.
//!
//! `cargo bench --bench batch -- [--questions 100] [--max-tokens 16] [--batch-size 16] [--shape qwen-0.5b|tiny]`

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::bail;
use clap::{Parser, ValueEnum};
use common::run;
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    /// Qwen2.5-0.5B's layers and widths (24 layers, hidden 896).
    #[value(name = "qwen-0.5b")]
    Qwen05b,
    /// 2 layers, hidden 64: fixed costs only.
    Tiny,
}

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    questions: usize,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "qwen-0.5b")]
    shape: Shape,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

const SUBJECTS: [&str; 10] = [
    "teacher", "kitchen", "sailor", "library", "doctor", "baker", "harbour", "friend", "garden",
    "letter",
];
const ASKS: [&str; 10] = [
    "What did the {} do?",
    "Who carried the {}?",
    "When was the {} seen?",
    "Why was the {} busy?",
    "Where was the {}?",
    "Was the {} old or new?",
    "What happened to the {} in the evening?",
    "Who looked at the {}?",
    "How did the {} move?",
    "Which {} was quiet?",
];

fn sac(cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sac"));
    cmd.env("SAC_CACHE_DIR", cache).env("HF_HUB_OFFLINE", "1");
    cmd
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/sac/doc_long.txt"))?;
    let document = [text.as_str(); 4].join("\n");
    let questions: Vec<String> = (0..args.questions)
        .map(|i| ASKS[i % 10].replace("{}", SUBJECTS[(i / 10) % 10]))
        .collect();

    let (config, label) = match args.shape {
        Shape::Qwen05b => (common::qwen_0_5b_shape(), "qwen-0.5b"),
        Shape::Tiny => (
            json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
                   "tie_word_embeddings": true}),
            "tiny",
        ),
    };
    let model = work.path().join("model");
    let mut corpus: Vec<String> = document.lines().map(str::to_string).collect();
    corpus.extend(questions.iter().cloned());
    common::write_model_dir(&model, config, &corpus, 2048)?;

    let cache = work.path().join("cache");
    let doc = work.path().join("doc.txt");
    let sack = work.path().join("doc.sack");
    std::fs::write(&doc, &document)?;
    run(sac(&cache)
        .arg("compress")
        .arg(&doc)
        .arg("-o")
        .arg(&sack)
        .arg("-m")
        .arg(&model)
        .args(["--compressor", "uniform", "-q"]))?;
    let batch_file = work.path().join("questions.txt");
    std::fs::write(&batch_file, questions.join("\n"))?;
    let max_tokens = args.max_tokens.to_string();

    // A warm-up run puts the binary, the weights and the digests in place.
    run(sac(&cache)
        .arg("ask")
        .arg(&sack)
        .arg("warm-up?")
        .args(["--max-tokens", &max_tokens]))?;

    let start = Instant::now();
    for question in &questions {
        run(sac(&cache)
            .arg("ask")
            .arg(&sack)
            .arg(question)
            .args(["--max-tokens", &max_tokens]))?;
    }
    let separate = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let out = run(sac(&cache)
        .arg("ask")
        .arg(&sack)
        .arg("--batch")
        .arg(&batch_file)
        .args(["--max-tokens", &max_tokens])
        .args(["--batch-size", &args.batch_size.to_string()]))?;
    let batch = start.elapsed().as_secs_f64();
    let answered = String::from_utf8_lossy(&out.stdout).lines().count();
    if answered != questions.len() {
        bail!(
            "the batch answered {answered} of {} questions",
            questions.len()
        );
    }

    let n = questions.len() as f64;
    println!(
        "{n} questions, --max-tokens {max_tokens}, --batch-size {}, {label} random model",
        args.batch_size
    );
    println!(
        "separate runs: {separate:8.2} s ({:.1} ms per question)",
        separate * 1e3 / n
    );
    println!(
        "one --batch:   {batch:8.2} s ({:.1} ms per question)",
        batch * 1e3 / n
    );
    println!("ratio separate / batch: {:.1}x", separate / batch);
    println!(
        "{}",
        json!({"questions": questions.len(), "max_tokens": args.max_tokens,
               "batch_size": args.batch_size, "shape": label,
               "separate_s": separate, "batch_s": batch, "ratio": separate / batch})
    );
    Ok(())
}
