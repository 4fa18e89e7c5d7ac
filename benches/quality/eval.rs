//! One row of the quality table: a compressor setting run through the real
//! `sac` binary (`compress` once per document, then `ask --batch` with every
//! question of it), or a peer's answers read back, scored against SQuAD's
//! gold answers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use sac::sack::SackReader;
use sac::train::metrics;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::common::run;
use crate::squad::{Document, Question};

/// A `--compressor` value with extra `compress` flags, written
/// `METHOD[+FLAG=VALUE...]` (`snapkv+head-budget=shared`), or `none` for no
/// document at all.
#[derive(Debug, Clone)]
pub struct Setting {
    pub spec: String,
    pub ratio: Option<usize>,
}

impl Setting {
    /// `spec` at each of `ratios`, or only at the ratio its own `+ratio=N`
    /// names (a trained adapter runs at its ratio alone).
    pub fn at_ratios(spec: &str, ratios: &[usize]) -> anyhow::Result<Vec<Setting>> {
        let mut parts = spec.split('+');
        let method = parts.next().unwrap_or_default();
        let (fixed, flags): (Vec<&str>, Vec<&str>) =
            parts.partition(|flag| flag.starts_with("ratio="));
        let spec = std::iter::once(method)
            .chain(flags)
            .collect::<Vec<_>>()
            .join("+");
        Ok(match fixed.as_slice() {
            [] => ratios
                .iter()
                .map(|&r| Setting {
                    spec: spec.clone(),
                    ratio: Some(r),
                })
                .collect(),
            [ratio] => vec![Setting {
                spec,
                ratio: Some(ratio["ratio=".len()..].parse().context("a ratio")?),
            }],
            _ => anyhow::bail!("{spec}: more than one +ratio="),
        })
    }

    fn method(&self) -> &str {
        self.spec.split('+').next().unwrap_or_default()
    }

    fn flags(&self) -> Vec<String> {
        self.spec
            .split('+')
            .skip(1)
            .map(|flag| format!("--{flag}"))
            .collect()
    }

    /// The value of `compress` flag `name` in the spec, if it has one.
    fn flag(&self, name: &str) -> Option<&str> {
        self.spec
            .split('+')
            .skip(1)
            .find_map(|flag| flag.strip_prefix(name)?.strip_prefix('='))
    }
}

/// How documents are compressed and answers asked for.
#[derive(Debug, Clone)]
pub struct Asking {
    pub layout: &'static str,
    /// sac's `--dtype`, for `compress` and `ask` alike.
    pub dtype: String,
    pub max_tokens: usize,
    /// Answers end at the first line break.
    pub stop: &'static str,
}

/// What a row measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub row: String,
    pub layout: String,
    pub ratio: Option<usize>,
    pub em: f64,
    pub f1: f64,
    /// Standard error of the mean F1.
    pub f1_se: f64,
    /// Answers holding a gold answer (normalised, as whole words).
    pub contains: f64,
    pub contains_se: f64,
    /// Mean answer length in words.
    pub words: f64,
    pub bytes_per_token: Option<f64>,
    pub compress_tokens_per_s: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub questions: usize,
    /// Wall time of the row (every `compress` and `ask`); none for peers.
    #[serde(default)]
    pub seconds: Option<f64>,
}

/// Mean and standard error of the mean, both in percent.
fn mean_se(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (100.0 * mean, 100.0 * (var / n).sqrt())
}

/// 1 when the normalised `answer` holds the normalised `gold` as whole words.
fn contains(answer: &str, gold: &str) -> f64 {
    let (answer, gold) = (metrics::normalize(answer), metrics::normalize(gold));
    let found = !gold.is_empty() && answer.windows(gold.len()).any(|w| w == gold.as_slice());
    f64::from(u8::from(found))
}

/// Scores `answers` (question, answer) into a row named `row`.
pub fn score(
    row: &str,
    layout: &str,
    ratio: Option<usize>,
    answers: &[(&Question, String)],
) -> Row {
    let collect = |f: &dyn Fn(&Question, &str) -> f64| -> Vec<f64> {
        answers.iter().map(|(q, a)| f(q, a)).collect()
    };
    let em = collect(&|q, a| metrics::best_of(metrics::exact_match, a, &q.answers));
    let f1 = collect(&|q, a| metrics::best_of(metrics::f1, a, &q.answers));
    let hit = collect(&|q, a| metrics::best_of(contains, a, &q.answers));
    let words: usize = answers
        .iter()
        .map(|(_, a)| a.split_whitespace().count())
        .sum();
    let (f1, f1_se) = mean_se(&f1);
    let (contains, contains_se) = mean_se(&hit);
    Row {
        row: row.to_string(),
        layout: layout.to_string(),
        ratio,
        em: mean_se(&em).0,
        f1,
        f1_se,
        contains,
        contains_se,
        words: words as f64 / answers.len().max(1) as f64,
        bytes_per_token: None,
        compress_tokens_per_s: None,
        ttft_ms: None,
        questions: answers.len(),
        seconds: None,
    }
}

/// The number just before `unit` in `sac compress`'s summary line
/// ("wrote F: N tokens, K kept (...), T tokens/s, ...").
fn summary_number(stderr: &[u8], unit: &str) -> Option<f64> {
    let line = String::from_utf8_lossy(stderr);
    let before = line.split(unit).next()?;
    before.rsplit(' ').next()?.parse().ok()
}

/// Runs `setting` over `documents` with `model`, working in `work`; every
/// answer goes to `work/answers.jsonl`. Returns the row and the answers by
/// question id.
pub fn evaluate(
    sac: &Path,
    model: &Path,
    documents: &[Document],
    setting: &Setting,
    asking: &Asking,
    work: &Path,
) -> anyhow::Result<(Row, Answers)> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(work)?;
    let (mut bytes, mut tokens, mut speed, mut ttft) = (0u64, 0u64, Vec::new(), Vec::new());
    let mut answers = Vec::new();
    let mut lines = Vec::new();
    for (i, doc) in documents.iter().enumerate() {
        let text = work.join(format!("doc{i}.txt"));
        let sack = work.join(format!("doc{i}.sack"));
        // No document: the layout around one full stop (`compress` refuses
        // a blank one).
        let closed_book = setting.method() == "none";
        std::fs::write(&text, if closed_book { "." } else { &doc.text })?;
        let mut compress = Command::new(sac);
        compress
            .arg("compress")
            .arg(&text)
            .arg("-o")
            .arg(&sack)
            .arg("-m")
            .arg(model)
            .args(["--prompt", asking.layout])
            .args(["--dtype", &asking.dtype])
            .args([
                "--compressor",
                if closed_book {
                    "full"
                } else {
                    setting.method()
                },
            ])
            .args(setting.flags());
        if let Some(ratio) = setting.ratio {
            compress.args(["--ratio", &ratio.to_string()]);
        }
        let out = run(&mut compress)?;
        if !closed_book {
            speed.extend(summary_number(&out.stderr, " tokens/s"));
            tokens += summary_number(&out.stderr, " tokens,").unwrap_or(0.0) as u64;
            bytes += std::fs::metadata(&sack)?.len();
        }

        let questions = work.join(format!("doc{i}.jsonl"));
        let batch: Vec<String> = doc
            .questions
            .iter()
            .map(|q| json!({"id": q.id, "question": q.question}).to_string())
            .collect();
        std::fs::write(&questions, batch.join("\n"))?;
        let mut ask = Command::new(sac);
        ask.arg("ask")
            .arg(&sack)
            .args(["-m".as_ref(), model.as_os_str()])
            .arg("--batch")
            .arg(&questions)
            .args(["--dtype", &asking.dtype])
            .args(["--max-tokens", &asking.max_tokens.to_string()])
            .args(["--stop", asking.stop]);
        // A GMSA file whose decoder was fine-tuned is answered with its adapter.
        if SackReader::open(&sack)?.header().decoder.adapter.is_some() {
            ask.arg("--adapter")
                .arg(setting.flag("adapter").unwrap_or_default());
        }
        let out = run(&mut ask)?;
        let by_id: HashMap<String, Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                let record: Value = serde_json::from_str(line)?;
                Ok((
                    record["id"].as_str().unwrap_or_default().to_string(),
                    record,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        for q in &doc.questions {
            let record = by_id
                .get(&q.id)
                .ok_or_else(|| anyhow::anyhow!("no answer to {}", q.id))?;
            let answer = record["answer"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_string();
            ttft.push(record["ttft_ms"].as_f64().unwrap_or(0.0));
            lines.push(
                json!({"id": q.id, "question": q.question, "gold": q.answers, "answer": answer})
                    .to_string(),
            );
            answers.push((q, answer));
        }
    }
    sac::atomic::write_bytes(
        &work.join("answers.jsonl"),
        (lines.join("\n") + "\n").as_bytes(),
    )?;
    let mut row = score(&setting.spec, asking.layout, setting.ratio, &answers);
    if setting.method() != "none" {
        row.bytes_per_token = Some(bytes as f64 / tokens.max(1) as f64);
        row.compress_tokens_per_s = Some(speed.iter().sum::<f64>() / speed.len().max(1) as f64);
    }
    row.ttft_ms = Some(ttft.iter().sum::<f64>() / ttft.len().max(1) as f64);
    row.seconds = Some(started.elapsed().as_secs_f64());
    let by_id = answers
        .into_iter()
        .map(|(q, a)| (q.id.clone(), a))
        .collect();
    Ok((row, by_id))
}

/// The rows of an earlier run's results.json.
pub fn earlier_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let results: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(serde_json::from_value(results["rows"].clone())?)
}

/// The answers [`evaluate`] wrote in `work`, by question id.
pub fn read_answers(work: &Path) -> anyhow::Result<Answers> {
    let path = work.join("answers.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)?;
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            Ok((field("id"), field("answer")))
        })
        .collect()
}

/// A peer's row: its name, layout and ratio.
pub type PeerRow = (String, String, Option<usize>);

/// Answers by question id.
pub type Answers = HashMap<String, String>;

/// A peer's answers: JSON lines `{"row", "layout", "ratio", "id", "answer"}`
/// (scripts/quality_hf.py, scripts/quality_kvpress.py), grouped by row,
/// layout and ratio.
pub fn peer_answers(path: &PathBuf) -> anyhow::Result<Vec<(PeerRow, Answers)>> {
    let text = std::fs::read_to_string(path)?;
    let mut groups: Vec<(PeerRow, Answers)> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)?;
        let key = (
            v["row"].as_str().unwrap_or_default().to_string(),
            v["layout"].as_str().unwrap_or_default().to_string(),
            v["ratio"].as_u64().map(|r| r as usize),
        );
        let answer = v["answer"].as_str().unwrap_or_default().trim().to_string();
        let id = v["id"].as_str().unwrap_or_default().to_string();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, answers)) => {
                answers.insert(id, answer);
            }
            None => groups.push((key, HashMap::from([(id, answer)]))),
        }
    }
    Ok(groups)
}

/// The share (percent) of `questions` both answer alike (after trimming),
/// over those both answered.
pub fn agreement(a: &Answers, b: &Answers) -> (f64, usize) {
    let both: Vec<_> = a
        .iter()
        .filter_map(|(id, x)| b.get(id).map(|y| x == y))
        .collect();
    let same = both.iter().filter(|&&s| s).count();
    (100.0 * same as f64 / both.len().max(1) as f64, both.len())
}

/// The table as markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| layout | compressor | ratio | EM | F1 (± se) | contains (± se) | words | .sack bytes / doc token | compress tokens/s | TTFT ms | questions |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let cell = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} ± {:.1} | {:.1} ± {:.1} | {:.1} | {} | {} | {} | {} |\n",
            r.layout,
            r.row,
            r.ratio.map_or("-".into(), |r| r.to_string()),
            r.em,
            r.f1,
            r.f1_se,
            r.contains,
            r.contains_se,
            r.words,
            cell(r.bytes_per_token, 1),
            cell(r.compress_tokens_per_s, 0),
            cell(r.ttft_ms, 0),
            r.questions,
        ));
    }
    out
}
