//! The benchmark's items: long documents of consecutive SQuAD v1.1 dev
//! paragraphs with every question asked about them (CC BY-SA 4.0; see
//! benches/quality/items/README.md), split by article into a part to tune
//! on and a dev part to report on.

use std::path::Path;

use anyhow::Context;
use sac::tokens::TextTokenizer;
use serde::{Deserialize, Serialize};

/// A document's fewest tokens; paragraphs are added until it has them.
pub const MIN_TOKENS: usize = 2000;

/// Which part of the articles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Every third article from the first (12 of 36): for tuning.
    Tune,
    /// The other 24: what the tables report.
    Dev,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Tune => "tune",
            Split::Dev => "dev",
        }
    }

    fn holds(self, article: usize) -> bool {
        article.is_multiple_of(3) == (self == Split::Tune)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
}

/// Consecutive paragraphs `paragraphs[0]..=paragraphs[1]` of one article.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    pub title: String,
    pub paragraphs: [usize; 2],
    /// Tokens of `text` alone, by the model the items were made with.
    pub tokens: usize,
    pub text: String,
    pub questions: Vec<Question>,
}

/// One line of the dataset's paragraphs.jsonl.
#[derive(Deserialize)]
struct Paragraph {
    title: String,
    para: usize,
    context: String,
    qas: Vec<Question>,
}

/// The documents of `split` from the dataset's `paragraphs.jsonl`: each
/// article's paragraphs in order, cut into documents of at least
/// [`MIN_TOKENS`] tokens (an article's remainder shorter than that is left
/// out).
pub fn make(
    source: &Path,
    split: Split,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<Vec<Document>> {
    let text = std::fs::read_to_string(source)
        .with_context(|| format!("cannot read {}", source.display()))?;
    let paragraphs: Vec<Paragraph> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not SQuAD paragraphs", source.display()))?;
    let mut documents = Vec::new();
    for (article, paragraphs) in paragraphs.chunk_by(|a, b| a.title == b.title).enumerate() {
        if !split.holds(article) {
            continue;
        }
        let mut open: Option<Document> = None;
        for p in paragraphs {
            let doc = open.get_or_insert_with(|| Document {
                title: p.title.clone(),
                paragraphs: [p.para, p.para],
                tokens: 0,
                text: String::new(),
                questions: Vec::new(),
            });
            if !doc.text.is_empty() {
                doc.text.push_str("\n\n");
            }
            doc.text.push_str(p.context.trim());
            doc.paragraphs[1] = p.para;
            doc.questions.extend(p.qas.iter().cloned());
            doc.tokens = tokenizer.encode(&doc.text)?.len();
            if doc.tokens >= MIN_TOKENS {
                documents.extend(open.take());
            }
        }
    }
    Ok(documents)
}

pub fn write(path: &Path, documents: &[Document]) -> anyhow::Result<()> {
    let lines: Vec<String> = documents
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    sac::atomic::write_bytes(path, (lines.join("\n") + "\n").as_bytes())?;
    Ok(())
}

pub fn read(path: &Path) -> anyhow::Result<Vec<Document>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .map(|line| {
            serde_json::from_str(line).with_context(|| format!("bad line in {}", path.display()))
        })
        .collect()
}

/// The documents a run asks about: the first of each article, then the
/// second of each, and so on, until they hold at least `questions`.
pub fn pick(documents: Vec<Document>, questions: usize) -> Vec<Document> {
    let mut by_article: Vec<Vec<Document>> = Vec::new();
    for doc in documents {
        match by_article.last_mut() {
            Some(last) if last[0].title == doc.title => last.push(doc),
            _ => by_article.push(vec![doc]),
        }
    }
    let rounds = by_article.iter().map(Vec::len).max().unwrap_or(0);
    let mut queues: Vec<_> = by_article.into_iter().map(Vec::into_iter).collect();
    let mut picked = Vec::new();
    let mut asked = 0;
    for _ in 0..rounds {
        for queue in &mut queues {
            if asked >= questions {
                return picked;
            }
            if let Some(doc) = queue.next() {
                asked += doc.questions.len();
                picked.push(doc);
            }
        }
    }
    picked
}
