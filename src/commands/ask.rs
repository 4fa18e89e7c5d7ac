//! `sac ask`: answers from a .sack, one-shot, in a batch, or in a REPL.

use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use crate::cli::AskArgs;
use crate::generate::{Answerer, Generation, SamplingSettings, Stop};
use crate::pack;
use crate::runtime::LoadedModel;
use crate::sack::{InfoFormat, SackReader, info};
use crate::tokens::TextStream;

/// One answered question, as `--json` and `--batch` print it.
#[derive(Debug, Serialize)]
struct AnswerRecord<'a> {
    id: &'a Value,
    question: &'a str,
    answer: String,
    tokens: &'a [u32],
    ttft_ms: f64,
    tokens_per_s: f64,
}

/// The loaded .sack and model, ready for questions.
struct Session<'a> {
    model: &'a LoadedModel,
    answerer: Answerer<'a>,
    sampling: SamplingSettings,
    /// `sac info` of the file, for the REPL's `:info`.
    info: String,
}

pub fn run(args: &AskArgs) -> anyhow::Result<()> {
    if args.sack.as_os_str() == "-" && args.batch.as_deref() == Some(Path::new("-")) {
        bail!("the .sack and the batch cannot both come from standard input");
    }
    let repl = args.questions.is_empty() && args.batch.is_none();
    if repl && !std::io::stdin().is_terminal() {
        bail!(
            "no question given: pass QUESTION..., or --batch FILE|-, or run on a terminal for the REPL"
        );
    }
    if args.sack.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the .sack from standard input")?;
        ask(args, SackReader::from_bytes(bytes, "<stdin>")?, repl)
    } else {
        ask(args, SackReader::open(&args.sack)?, repl)
    }
}

/// Loads the model the .sack names and answers the questions `args` give.
fn ask<R: Read + Seek>(
    args: &AskArgs,
    mut reader: SackReader<R>,
    repl: bool,
) -> anyhow::Result<()> {
    let header = reader.header().clone();
    let model = match &args.model {
        Some(model) => LoadedModel::load(&args.placement.spec(model))?,
        None => {
            // The model the .sack was made with, at the Hub revision it was
            // fetched at unless --revision says otherwise.
            let mut spec = args.placement.spec(&header.model.id);
            spec.revision = spec.revision.or_else(|| header.model.revision.clone());
            LoadedModel::load(&spec).with_context(|| {
                format!(
                    "cannot load the model {} was made with (pass --model DIR|HUB_ID \
                     for a copy of it elsewhere)",
                    reader.file_name()
                )
            })?
        }
    };
    for (what, theirs, ours) in [
        ("model", &header.model.fingerprint, &model.fingerprint.model),
        (
            "tokenizer",
            &header.tokenizer.fingerprint,
            &model.fingerprint.tokenizer,
        ),
    ] {
        if theirs != ours && !args.force {
            bail!(
                "{} was made with {what} {theirs} ({}), but {} has {what} {ours}; \
                 pass --force to answer anyway",
                reader.file_name(),
                header.model.id,
                model.files.id
            );
        }
    }
    let mut info = Vec::new();
    info::render(&reader, &mut info, InfoFormat::Human)?;
    let context = pack::load_context(&mut reader, &model.decoder)?;
    drop(reader);
    let sampling = SamplingSettings {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens as usize,
    };
    let answerer = Answerer::new(&model.decoder, context, model.tokenizer.eos())?;
    let mut session = Session {
        model: &model,
        answerer,
        sampling,
        info: String::from_utf8_lossy(&info).into_owned(),
    };
    let mut out = std::io::stdout().lock();
    let batch_size = args.batch_size as usize;
    if let Some(batch) = &args.batch {
        return run_batch(&mut session, batch, batch_size, &mut out);
    }
    if repl {
        let info = session.info.clone();
        let mut answer = |question: &str, interrupted: &AtomicBool| {
            session.stream_answer(question, &mut std::io::stdout().lock(), interrupted)
        };
        return super::repl::run(&mut answer, &info);
    }
    if args.json {
        let numbered: Vec<(Value, String)> = (1..)
            .map(Value::from)
            .zip(args.questions.iter().cloned())
            .collect();
        for group in numbered.chunks(batch_size) {
            session.json_answers(group, &mut out)?;
        }
        return Ok(());
    }
    for question in &args.questions {
        session.stream_answer(question, &mut out, &AtomicBool::new(false))?;
    }
    Ok(())
}

impl Session<'_> {
    fn generate(
        &mut self,
        question: &str,
        mut on_token: impl FnMut(u32) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Generation> {
        let ids = self.model.tokenizer.question_ids(question)?;
        let mut failure = None;
        let generation =
            self.answerer
                .answer(&ids, &self.sampling, |token| match on_token(token) {
                    Ok(go_on) => Ok(go_on),
                    Err(e) => {
                        failure = Some(e);
                        Ok(false)
                    }
                })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(generation),
        }
    }

    /// Prints the answer token by token, then a newline.
    fn stream_answer(
        &mut self,
        question: &str,
        out: &mut impl Write,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<()> {
        let tokenizer = &self.model.tokenizer;
        let mut stream = TextStream::new(tokenizer);
        let generation = self.generate(question, |token| {
            if let Some(piece) = stream.push(token)? {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
            Ok(!interrupted.swap(false, Ordering::SeqCst))
        })?;
        if let Some(rest) = stream.finish()? {
            out.write_all(rest.as_bytes())?;
        }
        if generation.stop == Stop::Interrupted {
            write!(out, " [stopped]")?;
        }
        writeln!(out)?;
        out.flush()?;
        Ok(())
    }

    /// Answers `questions` (id, text) together and prints one JSON line each.
    fn json_answers(
        &mut self,
        questions: &[(Value, String)],
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        let tokenizer = &self.model.tokenizer;
        let ids = questions
            .iter()
            .map(|(_, q)| tokenizer.question_ids(q))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let generations = self
            .answerer
            .answer_batch(&ids, &self.sampling, |_, _| Ok(true))?;
        for ((id, question), generation) in questions.iter().zip(&generations) {
            let record = AnswerRecord {
                id,
                question,
                answer: tokenizer.decode(&generation.tokens)?,
                tokens: &generation.tokens,
                ttft_ms: generation.time_to_first_token.as_secs_f64() * 1e3,
                tokens_per_s: generation.tokens_per_second(),
            };
            serde_json::to_writer(&mut *out, &record)?;
            writeln!(out)?;
        }
        out.flush()?;
        Ok(())
    }
}

/// A batch line: plain text, or a JSON object with `question` and an optional `id`.
fn parse_batch_line(line: &str, number: usize) -> anyhow::Result<Option<(Value, String)>> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.starts_with('{') {
        let value: Value = serde_json::from_str(trimmed)
            .with_context(|| format!("batch line {number} is not valid JSON"))?;
        let question = value
            .get("question")
            .and_then(Value::as_str)
            .with_context(|| format!("batch line {number} has no string \"question\""))?;
        let id = value
            .get("id")
            .cloned()
            .unwrap_or_else(|| Value::from(number));
        return Ok(Some((id, question.to_string())));
    }
    Ok(Some((Value::from(number), trimmed.to_string())))
}

/// Answers the questions of `batch` in groups of `batch_size`, printing each
/// group's JSON lines as soon as it is done.
fn run_batch(
    session: &mut Session,
    batch: &Path,
    batch_size: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let input: Box<dyn BufRead> = if batch.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(batch)
            .with_context(|| format!("cannot open batch file {}", batch.display()))?;
        Box::new(BufReader::new(file))
    };
    let mut group = Vec::with_capacity(batch_size);
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read batch line {}", i + 1))?;
        if let Some(question) = parse_batch_line(&line, i + 1)? {
            group.push(question);
        }
        if group.len() == batch_size {
            session.json_answers(&group, out)?;
            group.clear();
        }
    }
    if !group.is_empty() {
        session.json_answers(&group, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_are_text_or_json() {
        assert_eq!(parse_batch_line("  \n", 1).unwrap(), None);
        let (id, q) = parse_batch_line("who?", 3).unwrap().unwrap();
        assert_eq!((id, q.as_str()), (Value::from(3), "who?"));
        let (id, q) = parse_batch_line(r#"{"id": "a7", "question": "where?"}"#, 4)
            .unwrap()
            .unwrap();
        assert_eq!((id, q.as_str()), (Value::from("a7"), "where?"));
        assert!(parse_batch_line(r#"{"id": 1}"#, 5).is_err());
        assert!(parse_batch_line("{oops", 6).is_err());
    }
}
