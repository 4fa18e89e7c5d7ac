//! Training and evaluation data: JSON lines, read and checked in full before
//! a run starts (so a bad line stops it before anything is written),
//! tokenized into the prompt layout `sac ask` uses, and served in an order
//! that depends on the seed and the sample's index alone, so a resumed run
//! needs nothing but its step counter to continue with the same data.

use std::path::{Path, PathBuf};

use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::layout;
use crate::model::ModelConfig;
use crate::tokens::TextTokenizer;

use super::{Stream, rng};

/// What a training row holds and what the decoder learns from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `{"text"}`: the decoder continues the text after the compressed context.
    Pretrain,
    /// `{"context", "question", "answer"}`: the decoder answers; only the
    /// answer (and EOS) is scored.
    Qa,
    /// `{"text"}`: the decoder restates the whole text from its soft tokens
    /// (GMSA's first stage).
    Autoencode,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Qa => "qa",
            Stage::Autoencode => "autoencode",
        }
    }
}

/// One example as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Context ids for the compressor, at positions 1..=L.
    pub context: Vec<u32>,
    /// Tokens the decoder reads after the compressed context (and SAC's
    /// `[LM]`) without being scored on them (the question prompt, or GMSA's
    /// [`RESTATE`](super::gmsa::RESTATE); empty when pretraining).
    pub prompt: Vec<u32>,
    /// Tokens the decoder is trained to predict after the prompt.
    pub target: Vec<u32>,
}

impl Sample {
    /// Tokens one forward pass reads: the context, `[LM]`, the prompt and
    /// all but the last target.
    pub fn tokens(&self) -> usize {
        self.context.len() + self.prompt.len() + self.target.len()
    }
}

/// A question with its accepted answers, for evaluation.
#[derive(Debug, Clone)]
pub struct EvalExample {
    pub context: Vec<u32>,
    pub question: Vec<u32>,
    pub answers: Vec<String>,
}

/// How pretraining cuts a text into a context and its continuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PretrainWindow {
    pub min_context: usize,
    pub max_context: usize,
    /// Most continuation tokens the decoder predicts.
    pub continuation: usize,
}

/// The training examples and the order they are drawn in.
#[derive(Debug)]
pub struct TrainSet {
    examples: Examples,
    seed: u64,
    /// The row order of one epoch, kept while that epoch lasts.
    order: Option<(u64, Vec<u32>)>,
}

#[derive(Debug)]
enum Examples {
    /// Each text's context ids, cut to the longest window a sample can use.
    Pretrain {
        docs: Vec<Vec<u32>>,
        window: PretrainWindow,
    },
    /// One sample per row, as read (questions, texts to restate).
    Fixed(Vec<Sample>),
}

/// A data file that was read, with what was left out of it.
#[derive(Debug)]
pub struct Loaded<T> {
    pub data: T,
    /// Rows too short (pretraining) or too long (autoencoding) to use, left out.
    pub skipped: usize,
}

impl TrainSet {
    /// Reads `{"text"}` rows. Texts with fewer than `min_context + 1` tokens
    /// (with BOS and the context prefix) cannot give a context and a
    /// continuation and are skipped.
    pub fn pretrain(
        path: &Path,
        tokenizer: &TextTokenizer,
        window: PretrainWindow,
        seed: u64,
    ) -> Result<Loaded<Self>> {
        let mut docs = Vec::new();
        let mut skipped = 0;
        for (line, row) in read_rows(path)? {
            let text = string_field(path, line, &row, "text")?;
            let mut ids = tokenizer
                .context_ids(&text)
                .map_err(|e| line_error(path, line, e))?;
            if ids.len() <= window.min_context {
                skipped += 1;
                continue;
            }
            ids.truncate(window.max_context + window.continuation);
            docs.push(ids);
        }
        if docs.is_empty() {
            return Err(Error::NothingToPretrain {
                path: path.to_path_buf(),
                min_context: window.min_context,
            });
        }
        Ok(Loaded {
            data: TrainSet {
                examples: Examples::Pretrain { docs, window },
                seed,
                order: None,
            },
            skipped,
        })
    }

    /// Reads `{"context", "question", "answer"}` rows; the first answer is
    /// trained on, followed by `eos`.
    pub fn qa(
        path: &Path,
        tokenizer: &TextTokenizer,
        model: &ModelConfig,
        eos: u32,
        seed: u64,
    ) -> Result<Self> {
        let mut samples = Vec::new();
        for (line, row) in read_rows(path)? {
            let qa = QaRow::parse(path, line, &row)?;
            let mut target = tokenizer
                .encode(&qa.answers[0])
                .map_err(|e| line_error(path, line, e))?;
            target.push(eos);
            let sample = Sample {
                context: tokenizer
                    .context_ids(&qa.context)
                    .map_err(|e| line_error(path, line, e))?,
                prompt: tokenizer
                    .question_ids(&qa.question)
                    .map_err(|e| line_error(path, line, e))?,
                target,
            };
            let room = layout::room(1, sample.prompt.len(), sample.target.len());
            layout::check_fits(model, sample.context.len(), room)
                .map_err(|e| line_error(path, line, e))?;
            samples.push(sample);
        }
        Ok(TrainSet {
            examples: Examples::Fixed(samples),
            seed,
            order: None,
        })
    }

    /// Reads `{"text"}` rows to restate: the compressor reads each text as a
    /// context, the decoder reads `restate` after it and is scored on the
    /// text and `eos`. Texts whose context has more than `max_context`
    /// tokens are skipped.
    pub fn autoencode(
        path: &Path,
        tokenizer: &TextTokenizer,
        restate: &[u32],
        max_context: usize,
        eos: u32,
        seed: u64,
    ) -> Result<Loaded<Self>> {
        let mut samples = Vec::new();
        let mut skipped = 0;
        for (line, row) in read_rows(path)? {
            let text = string_field(path, line, &row, "text")?;
            let context = tokenizer
                .context_ids(&text)
                .map_err(|e| line_error(path, line, e))?;
            if context.len() > max_context {
                skipped += 1;
                continue;
            }
            let mut target = tokenizer
                .encode(&text)
                .map_err(|e| line_error(path, line, e))?;
            target.push(eos);
            samples.push(Sample {
                context,
                prompt: restate.to_vec(),
                target,
            });
        }
        if samples.is_empty() {
            return Err(DataError::NothingToRestate {
                path: path.to_path_buf(),
                max_context,
            }
            .into());
        }
        Ok(Loaded {
            data: TrainSet {
                examples: Examples::Fixed(samples),
                seed,
                order: None,
            },
            skipped,
        })
    }

    /// Rows in one epoch.
    pub fn len(&self) -> usize {
        match &self.examples {
            Examples::Pretrain { docs, .. } => docs.len(),
            Examples::Fixed(samples) => samples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `index`-th sample of the run (0-based, counting across epochs).
    /// Each epoch visits every row once, in an order shuffled by the seed and
    /// the epoch; a pretraining sample's context length is drawn from the
    /// seed and `index`.
    pub fn sample(&mut self, index: u64) -> Sample {
        let rows = self.len() as u64;
        let (epoch, offset) = (index / rows, (index % rows) as usize);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<u32> = (0..rows as u32).collect();
            order.shuffle(&mut rng(self.seed, Stream::Order, epoch));
            self.order = Some((epoch, order));
        }
        let row = self.order.as_ref().map_or(0, |(_, o)| o[offset] as usize);
        match &self.examples {
            Examples::Fixed(samples) => samples[row].clone(),
            Examples::Pretrain { docs, window } => {
                let ids = &docs[row];
                let longest = window.max_context.min(ids.len() - 1);
                let len = rng(self.seed, Stream::Window, index)
                    .random_range(window.min_context..=longest);
                let end = ids.len().min(len + window.continuation);
                Sample {
                    context: ids[..len].to_vec(),
                    prompt: Vec::new(),
                    target: ids[len..end].to_vec(),
                }
            }
        }
    }
}

/// Reads evaluation rows (`{"context", "question", "answer"}`, where
/// `answer` may be a list of accepted answers).
pub fn eval_examples(
    path: &Path,
    tokenizer: &TextTokenizer,
    model: &ModelConfig,
) -> Result<Vec<EvalExample>> {
    read_rows(path)?
        .into_iter()
        .map(|(line, row)| {
            let qa = QaRow::parse(path, line, &row)?;
            let example = EvalExample {
                context: tokenizer
                    .context_ids(&qa.context)
                    .map_err(|e| line_error(path, line, e))?,
                question: tokenizer
                    .question_ids(&qa.question)
                    .map_err(|e| line_error(path, line, e))?,
                answers: qa.answers,
            };
            let room = layout::room(1, example.question.len(), 1);
            layout::check_fits(model, example.context.len(), room)
                .map_err(|e| line_error(path, line, e))?;
            Ok(example)
        })
        .collect()
}

struct QaRow {
    context: String,
    question: String,
    answers: Vec<String>,
}

impl QaRow {
    fn parse(path: &Path, line: usize, row: &Map<String, Value>) -> Result<Self> {
        let answers = match row.get("answer") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| row_error(path, line, RowProblem::AnswerNotStrings))?,
            _ => {
                return Err(row_error(path, line, RowProblem::NoAnswer));
            }
        };
        Ok(QaRow {
            context: string_field(path, line, row, "context")?,
            question: string_field(path, line, row, "question")?,
            answers,
        })
    }
}

/// The JSON objects of a JSON-lines file with their 1-based line numbers;
/// blank lines are skipped.
fn read_rows(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(row)) => rows.push((i + 1, row)),
            Ok(_) => return Err(row_error(path, i + 1, RowProblem::NotObject)),
            Err(e) => return Err(row_error(path, i + 1, RowProblem::NotJson(e))),
        }
    }
    if rows.is_empty() {
        return Err(DataError::NoRows(path.to_path_buf()).into());
    }
    Ok(rows)
}

fn string_field(path: &Path, line: usize, row: &Map<String, Value>, key: &str) -> Result<String> {
    match row.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(row_error(path, line, RowProblem::Empty(key.into()))),
        _ => Err(row_error(path, line, RowProblem::NoString(key.into()))),
    }
}

/// Training or evaluation data that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{} holds no rows", .0.display())]
    NoRows(PathBuf),
    #[error("{} holds no text of at most {max_context} tokens to restate", path.display())]
    NothingToRestate { path: PathBuf, max_context: usize },
    #[error("{} line {line}: {problem}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        problem: RowProblem,
    },
    /// A row whose text cannot be tokenized or laid out.
    #[error("{} line {line}", path.display())]
    Unusable {
        path: PathBuf,
        line: usize,
        #[source]
        source: Box<Error>,
    },
}

/// What is wrong with a row.
#[derive(Debug, thiserror::Error)]
pub enum RowProblem {
    #[error("not a JSON object")]
    NotObject,
    #[error("not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("\"{0}\" is empty")]
    Empty(String),
    #[error("no string \"{0}\"")]
    NoString(String),
    #[error("\"answer\" must be a string or a list of strings")]
    AnswerNotStrings,
    #[error("no \"answer\" (a string, or a non-empty list of strings)")]
    NoAnswer,
}

fn row_error(path: &Path, line: usize, problem: RowProblem) -> Error {
    DataError::Row {
        path: path.to_path_buf(),
        line,
        problem,
    }
    .into()
}

fn line_error(path: &Path, line: usize, source: impl Into<Error>) -> Error {
    DataError::Unusable {
        path: path.to_path_buf(),
        line,
        source: Box::new(source.into()),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), lines).unwrap();
        f
    }

    /// The error reading `text` as rows of `stage`, as the loaders check them.
    fn error(text: &str, stage: Stage) -> String {
        let f = write(text);
        let check = || -> Result<()> {
            for (line, row) in read_rows(f.path())? {
                match stage {
                    Stage::Pretrain | Stage::Autoencode => {
                        drop(string_field(f.path(), line, &row, "text")?)
                    }
                    Stage::Qa => drop(QaRow::parse(f.path(), line, &row)?),
                }
            }
            Ok(())
        };
        check().unwrap_err().to_string()
    }

    #[test]
    fn bad_rows_name_their_line() {
        let pre = Stage::Pretrain;
        assert!(error("{\"text\": \"a\"}\n{oops\n", pre).contains("line 2: not valid JSON"));
        assert!(error("\n[1]\n", pre).contains("line 2: not a JSON object"));
        assert!(error("{\"txt\": \"a\"}\n", pre).contains("line 1: no string \"text\""));
        assert!(error("{\"text\": \" \"}\n", pre).contains("line 1: \"text\" is empty"));
        assert!(error("  \n\n", Stage::Qa).contains("holds no rows"));
        let qa = "{\"context\": \"c\", \"question\": \"q\"}\n";
        assert!(error(qa, Stage::Qa).contains("line 1: no \"answer\""));
        let qa = "{\"context\": \"c\", \"question\": \"q\", \"answer\": [1]}\n";
        assert!(error(qa, Stage::Qa).contains("list of strings"));
        let qa = "{\"context\": \"c\", \"answer\": \"a\"}\n";
        assert!(error(qa, Stage::Qa).contains("line 1: no string \"question\""));
        let ok = "{\"context\": \"c\", \"question\": \"q\", \"answer\": [\"a\", \"b\"]}\n";
        let rows = read_rows(write(ok).path()).unwrap();
        let row = QaRow::parse(Path::new("f"), 1, &rows[0].1).unwrap();
        assert_eq!(row.answers, ["a", "b"]);
    }

    fn pretrain_set(seed: u64) -> TrainSet {
        let docs = (0..5u32)
            .map(|d| (0..40).map(|t| d * 100 + t).collect())
            .collect();
        TrainSet {
            examples: Examples::Pretrain {
                docs,
                window: PretrainWindow {
                    min_context: 8,
                    max_context: 30,
                    continuation: 6,
                },
            },
            seed,
            order: None,
        }
    }

    #[test]
    fn order_is_a_permutation_per_epoch_fixed_by_the_seed() {
        let mut set = pretrain_set(7);
        let firsts = |set: &mut TrainSet, range: std::ops::Range<u64>| -> Vec<u32> {
            range.map(|i| set.sample(i).context[0] / 100).collect()
        };
        let epoch0 = firsts(&mut set, 0..5);
        let epoch1 = firsts(&mut set, 5..10);
        let mut sorted = epoch0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
        assert_ne!(epoch0, epoch1, "epochs are shuffled differently");
        // A fresh set (a resumed run) draws the same samples at the same indices.
        let mut again = pretrain_set(7);
        assert_eq!(again.sample(7), set.sample(7));
        assert_eq!(firsts(&mut again, 0..5), epoch0);
        assert_ne!(firsts(&mut pretrain_set(8), 0..5), epoch0);
    }

    #[test]
    fn pretrain_windows_stay_in_bounds() {
        let mut set = pretrain_set(1);
        let mut lengths = std::collections::BTreeSet::new();
        for i in 0..200 {
            let s = set.sample(i);
            assert!((8..=30).contains(&s.context.len()), "{}", s.context.len());
            assert!(!s.target.is_empty() && s.target.len() <= 6);
            assert!(s.prompt.is_empty());
            // The continuation follows the context directly.
            assert_eq!(s.target[0], s.context.last().unwrap() + 1);
            lengths.insert(s.context.len());
        }
        assert!(lengths.len() > 10, "context lengths vary: {lengths:?}");
    }
}
