//! Step 4 of the quality benchmark: every compressor on the test documents,
//! through the real `sac` binary (`compress`, then `ask --batch`), scored
//! with SQuAD's exact match and F1, and by whether the answer ends in the
//! asked value.

use std::path::{Path, PathBuf};
use std::process::Command;

use sac::train::metrics;
use serde::Serialize;
use serde_json::{Value, json};

use crate::common::run;
use crate::data::Example;

/// One compressor at one ratio.
#[derive(Debug, Clone)]
pub struct Setting {
    /// A `--compressor` value, or `none` for no context at all.
    pub method: &'static str,
    pub ratio: Option<usize>,
    pub adapter: Option<PathBuf>,
}

/// One row of the table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub method: &'static str,
    pub ratio: Option<usize>,
    pub em: f64,
    pub f1: f64,
    /// Answers whose last word is the value's (the values are one word).
    /// In the fact form the answer starts with the name, copied from the
    /// question, and a garbled copy of an unseen name fails EM while the
    /// value, what the question asks for, is right.
    pub value: f64,
    /// .sack bytes per document token (none without a document).
    pub bytes_per_token: Option<f64>,
    /// Document tokens per second of `sac compress`'s own timing.
    pub compress_tokens_per_s: Option<f64>,
    pub ttft_ms: f64,
}

/// The number just before `unit` in `sac compress`'s summary line
/// ("wrote F: N tokens, K kept (...), T tokens/s, ...").
fn summary_number(stderr: &[u8], unit: &str) -> Option<f64> {
    let line = String::from_utf8_lossy(stderr);
    let before = line.split(unit).next()?;
    before.rsplit(' ').next()?.parse().ok()
}

/// 1 when the normalised answers end in the same word, else 0.
fn same_last_word(prediction: &str, answer: &str) -> f64 {
    let last = |text| metrics::normalize(text).pop();
    f64::from(u8::from(last(prediction) == last(answer)))
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Evaluates `setting` with `model` on `test`, working in `work`; answers
/// stop after `max_tokens`. Every answer goes to `work/answers.jsonl` beside
/// its question and the expected answer, so that a table can be read back
/// answer by answer.
pub fn evaluate(
    sac: &Path,
    model: &Path,
    test: &[Example],
    setting: &Setting,
    work: &Path,
    max_tokens: usize,
) -> anyhow::Result<Row> {
    std::fs::create_dir_all(work)?;
    let (mut em, mut f1, mut value, mut ttft) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bytes, mut tokens, mut speed) = (0u64, 0u64, Vec::new());
    let mut answers = Vec::new();
    for (i, doc) in test.chunk_by(|a, b| a.context == b.context).enumerate() {
        let text = work.join(format!("doc{i}.txt"));
        let sack = work.join(format!("doc{i}.sack"));
        // No context at all: the prompt layout around a document of one full
        // stop (`sac compress` refuses an empty or blank one).
        let context = if setting.method == "none" {
            "."
        } else {
            doc[0].context.as_str()
        };
        std::fs::write(&text, context)?;
        let mut compress = Command::new(sac);
        compress
            .arg("compress")
            .arg(&text)
            .arg("-o")
            .arg(&sack)
            .arg("-m")
            .arg(model)
            .args([
                "--compressor",
                if setting.method == "none" {
                    "full"
                } else {
                    setting.method
                },
            ]);
        if let Some(ratio) = setting.ratio {
            compress.args(["--ratio", &ratio.to_string()]);
        }
        if let Some(adapter) = &setting.adapter {
            compress.arg("--adapter").arg(adapter);
        }
        let out = run(&mut compress)?;
        speed.extend(summary_number(&out.stderr, " tokens/s"));
        tokens += summary_number(&out.stderr, " tokens,").unwrap_or(0.0) as u64;
        bytes += std::fs::metadata(&sack)?.len();

        let questions = work.join(format!("doc{i}.jsonl"));
        let lines: Vec<String> = doc
            .iter()
            .enumerate()
            .map(|(j, e)| json!({"id": j, "question": e.question}).to_string())
            .collect();
        std::fs::write(&questions, lines.join("\n"))?;
        let out = run(Command::new(sac)
            .arg("ask")
            .arg(&sack)
            .arg("--batch")
            .arg(&questions)
            .args(["--max-tokens", &max_tokens.to_string()]))?;
        for (line, example) in String::from_utf8_lossy(&out.stdout).lines().zip(doc) {
            let record: Value = serde_json::from_str(line)?;
            let answer = record["answer"].as_str().unwrap_or_default();
            em.push(metrics::exact_match(answer, &example.answer));
            f1.push(metrics::f1(answer, &example.answer));
            value.push(same_last_word(answer, &example.answer));
            ttft.push(record["ttft_ms"].as_f64().unwrap_or(0.0));
            answers.push(
                json!({"document": i, "question": example.question,
                       "expected": example.answer, "answer": answer})
                .to_string(),
            );
        }
    }
    sac::atomic::write_bytes(
        &work.join("answers.jsonl"),
        (answers.join("\n") + "\n").as_bytes(),
    )?;
    let document = setting.method != "none";
    Ok(Row {
        method: setting.method,
        ratio: setting.ratio,
        em: 100.0 * mean(&em),
        f1: 100.0 * mean(&f1),
        value: 100.0 * mean(&value),
        bytes_per_token: document.then(|| bytes as f64 / tokens.max(1) as f64),
        compress_tokens_per_s: document.then(|| mean(&speed)),
        ttft_ms: mean(&ttft),
    })
}

/// The table as markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| compressor | ratio | EM | F1 | value | .sack bytes / doc token | compress tokens/s | TTFT ms |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} |\n",
            r.method,
            r.ratio.map_or("-".into(), |r| r.to_string()),
            r.em,
            r.f1,
            r.value,
            cell(r.bytes_per_token),
            cell(r.compress_tokens_per_s),
            r.ttft_ms
        ));
    }
    out
}
