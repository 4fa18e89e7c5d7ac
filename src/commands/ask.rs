//! `sac ask`: answers from a .sack, one-shot, in a batch, or in a REPL.

use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use crate::cli::AskArgs;
use sac::device::Workload;
use sac::error::Error;
use sac::fingerprint::ModelFingerprint;
use sac::from_sack;
use sac::generate::{Answerer, Generation, SamplingSettings, Stop};
use sac::layout::prompt::{PromptFormat, PromptLayout, RAW_TURN};
use sac::model::SourceError;
use sac::model::known::{NamedModel, Trusted};
use sac::model::source::Network;
use sac::runtime::{LoadedModel, ResolvedModel};
use sac::sack::info::clean;
use sac::sack::{InfoFormat, SackHeader, SackReader, info};
use sac::tokens::{StopStrings, TextStream};

/// One answered question, as `--json` and `--batch` print it.
#[derive(Debug, Serialize)]
struct AnswerRecord<'a> {
    id: &'a Value,
    question: &'a str,
    answer: String,
    tokens: &'a [u32],
    /// Why the answer ended: `eos`, `stop_string` or `max_tokens`.
    stop: &'static str,
    ttft_ms: f64,
    tokens_per_s: f64,
}

/// The loaded .sack and model, ready for questions.
struct Session<'a> {
    model: &'a LoadedModel,
    /// How the document was framed; questions follow it alike.
    layout: &'a PromptLayout,
    stops: &'a StopStrings,
    answerer: Answerer<'a>,
    sampling: SamplingSettings,
    /// `sac info` of the file, for the REPL's `:info`.
    info: String,
}

/// Where the questions come from.
enum Questions<'a> {
    /// On the command line; `json` prints records instead of streamed text.
    Given { questions: &'a [String], json: bool },
    /// JSON lines from a file or standard input.
    Batch(&'a Path),
    /// Typed at a terminal.
    Repl,
}

/// `sac ask`'s flags, checked once before anything is read.
struct AskSettings<'a> {
    questions: Questions<'a>,
    sampling: SamplingSettings,
    /// Questions answered together.
    batch_size: usize,
}

impl<'a> AskSettings<'a> {
    fn resolve(args: &'a AskArgs) -> anyhow::Result<Self> {
        if args.sack.as_os_str() == "-" && args.batch.as_deref() == Some(Path::new("-")) {
            bail!("the .sack and the batch cannot both come from standard input");
        }
        check_questions(&args.questions)?;
        let questions = match (&args.batch, args.questions.is_empty()) {
            (Some(batch), _) => Questions::Batch(batch),
            (None, false) => Questions::Given {
                questions: &args.questions,
                json: args.json,
            },
            (None, true) if std::io::stdin().is_terminal() => Questions::Repl,
            (None, true) => bail!(
                "no question given: pass QUESTION..., or --batch FILE|-, or run on a terminal for the REPL"
            ),
        };
        Ok(AskSettings {
            questions,
            sampling: SamplingSettings {
                temperature: args.temperature,
                top_p: args.top_p,
                seed: args.seed,
                max_tokens: args.max_tokens as usize,
            },
            batch_size: args.batch_size as usize,
        })
    }
}

pub fn run(args: &AskArgs) -> anyhow::Result<()> {
    let settings = AskSettings::resolve(args)?;
    if args.sack.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the .sack from standard input")?;
        ask(args, &settings, SackReader::from_bytes(bytes, "<stdin>")?)
    } else {
        ask(args, &settings, SackReader::open(&args.sack)?)
    }
}

/// Loads the model the .sack names and answers the questions `settings` give.
fn ask<R: Read + Seek>(
    args: &AskArgs,
    settings: &AskSettings,
    mut reader: SackReader<R>,
) -> anyhow::Result<()> {
    // A missing or wrong --adapter is refused before the model loads.
    let adapter =
        from_sack::check_adapter(reader.header(), reader.file_name(), args.adapter.as_deref())?;
    let (model, forced) = load_model(args, reader.header(), reader.file_name())?;
    let layout = from_sack::layout(reader.header());
    let stops = stop_strings(args, reader.header(), &layout);
    let mut info = Vec::new();
    info::render(&reader, &mut info, InfoFormat::Human)?;
    let context = from_sack::load_context(&mut reader, &model.decoder, adapter)?;
    drop(reader);
    if let Some(differs) = forced {
        eprintln!("sac: warning: {differs}; answering anyway (--force)");
    }
    let tokenizer = &model.tokenizer;
    let mut answerer = Answerer::new(&model.decoder, context, tokenizer.eos())?;
    if !stops.is_empty() {
        answerer = answerer.with_stop_rule(Box::new(|ids: &[u32]| {
            Ok(stops.cut(&tokenizer.decode(ids)?).is_some())
        }));
    }
    let mut session = Session {
        model: &model,
        layout: &layout,
        stops: &stops,
        answerer,
        sampling: settings.sampling,
        info: String::from_utf8_lossy(&info).into_owned(),
    };
    let mut out = std::io::stdout().lock();
    let batch_size = settings.batch_size;
    match settings.questions {
        Questions::Batch(batch) => run_batch(&mut session, batch, batch_size, &mut out),
        Questions::Repl => {
            let info = session.info.clone();
            let mut answer = |question: &str, interrupted: &AtomicBool| {
                session.stream_answer(question, &mut std::io::stdout().lock(), interrupted)
            };
            super::repl::run(&mut answer, &info)
        }
        Questions::Given {
            questions,
            json: true,
        } => {
            let numbered: Vec<(Value, String)> = (1..)
                .map(Value::from)
                .zip(questions.iter().cloned())
                .collect();
            for group in numbered.chunks(batch_size) {
                session.json_answers(group, &mut out)?;
            }
            Ok(())
        }
        Questions::Given {
            questions,
            json: false,
        } => {
            for question in questions {
                session.stream_answer(question, &mut out, &AtomicBool::new(false))?;
            }
            Ok(())
        }
    }
}

/// The model to answer with: `--model` if given, else the one the header
/// names, found only in the Hub cache or among the directories the user has
/// loaded (a .sack never chooses what is downloaded or loaded). Fingerprints
/// are compared before any file is read as a model; with `--force`, how they
/// differ comes back for a warning.
fn load_model(
    args: &AskArgs,
    header: &SackHeader,
    file: &str,
) -> anyhow::Result<(LoadedModel, Option<String>)> {
    let (resolved, by_header) = match &args.model {
        Some(model) => (ResolvedModel::named(&args.placement.spec(model))?, false),
        None => {
            let fingerprint = ModelFingerprint {
                model: header.model.fingerprint.clone(),
                tokenizer: header.tokenizer.fingerprint.clone(),
            };
            let named = NamedModel {
                id: &header.model.id,
                revision: args
                    .placement
                    .revision
                    .as_deref()
                    .or(header.model.revision.as_deref()),
                gguf_file: args
                    .placement
                    .gguf_file
                    .as_deref()
                    .or(header.model.file.as_deref()),
                fingerprint: &fingerprint,
            };
            let trusted = Trusted {
                network: if args.allow_download {
                    Network::Allowed
                } else {
                    Network::CacheOnly
                },
                ..Trusted::user_default()
            };
            let resolved = ResolvedModel::for_sack(named, &trusted)
                .map_err(|e| anyhow::anyhow!(unavailable(file, named, e)))?;
            (resolved, true)
        }
    };
    let mut forced = None;
    for (what, theirs, ours) in [
        (
            "model",
            &header.model.fingerprint,
            &resolved.fingerprint.model,
        ),
        (
            "tokenizer",
            &header.tokenizer.fingerprint,
            &resolved.fingerprint.tokenizer,
        ),
    ] {
        if theirs == ours {
            continue;
        }
        let differs = format!(
            "{file} was made with {what} {} ({}), but {} has {what} {ours}",
            clean(theirs),
            clean(&header.model.id),
            resolved.files.id
        );
        if !args.force {
            bail!("{differs}; pass --force to answer anyway");
        }
        forced.get_or_insert(differs);
    }
    let id = resolved.files.id.clone();
    let mut at = resolved
        .files
        .revision
        .as_ref()
        .map_or(String::new(), |r| format!(" --revision {r}"));
    if let Some(file) = resolved.files.hub_gguf_file() {
        at.push_str(&format!(" --gguf-file {file}"));
    }
    match resolved.load(
        args.placement.device,
        args.placement.dtype,
        Workload::Inference,
    ) {
        Ok(model) => Ok((model, forced)),
        // The files came from the cache on the header's word: say what failed,
        // not what they hold.
        Err(e) if by_header => {
            bail!(
                "cannot load {id} as a model ({}); `sac model-info -m {id}{at}` shows why",
                e.kind()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// `--stop` strings, and for the `raw` layout without a trained adapter the
/// start of a new `###` line: such a model, once it has answered, goes on
/// with turns of its own. (A chat template's end of turn is an EOS id.)
fn stop_strings(args: &AskArgs, header: &SackHeader, layout: &PromptLayout) -> StopStrings {
    let mut strings = args.stop.clone();
    let trained = header.compressor.adapter_fingerprint.is_some();
    if layout.format == PromptFormat::Raw && !trained {
        strings.push(RAW_TURN.to_string());
    }
    StopStrings::new(strings)
}

/// Why the model a .sack names cannot be used, and what the user can do.
fn unavailable(file: &str, named: NamedModel, error: Error) -> String {
    let pass = "pass --model DIR|FILE.gguf|HUB_ID";
    match error {
        Error::NotCached {
            id,
            revision,
            cache,
            ..
        } => {
            let (what, gguf) = match named.gguf_file {
                Some(name) => (format!("{id} ({name})"), format!(" {name}")),
                None => (id.clone(), String::new()),
            };
            format!(
                "{file} was made with {what} at revision {revision}, which is not in the local \
                 Hugging Face cache ({}); fetch it with `huggingface-cli download {id}{gguf} \
                 --revision {revision}`, {pass}, or add --allow-download",
                cache.display()
            )
        }
        Error::UnknownLocalModel(dir) => format!(
            "{file} was made with the model in {dir:?}, and sac loads a directory that a .sack \
             names only once you have named it yourself: pass --model {dir:?}"
        ),
        Error::Source(
            why @ (SourceError::NotHubId(_)
            | SourceError::NotRevision(_)
            | SourceError::NotGgufName(_)
            | SourceError::NeitherHubIdNorDirectory(_)),
        ) => format!("{file} names its model oddly: {why}; {pass}"),
        other => format!(
            "cannot find the model {file} was made with ({}): {}; {pass}",
            clean(named.id),
            clean(&format!("{:#}", anyhow::Error::from(other)))
        ),
    }
}

impl Session<'_> {
    fn generate(
        &mut self,
        question: &str,
        mut on_token: impl FnMut(u32) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Generation> {
        let ids = self.layout.question_ids(&self.model.tokenizer, question)?;
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
        let mut stream = TextStream::new(tokenizer, self.stops);
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
        if questions.is_empty() {
            return Ok(());
        }
        let tokenizer = &self.model.tokenizer;
        let ids = questions
            .iter()
            .map(|(_, q)| self.layout.question_ids(tokenizer, q))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let generations = self
            .answerer
            .answer_batch(&ids, &self.sampling, |_, _| Ok(true))?;
        for ((id, question), generation) in questions.iter().zip(&generations) {
            let mut answer = tokenizer.decode(&generation.tokens)?;
            answer.truncate(self.stops.cut(&answer).unwrap_or(answer.len()));
            let record = AnswerRecord {
                id,
                question,
                answer,
                tokens: &generation.tokens,
                stop: generation.stop.name(),
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

/// A question, or why its batch line is not one; both carry the line's id.
type BatchItem = Result<(Value, String), (Value, String)>;

/// A batch line: plain text, or JSON, which must be an object with a
/// non-empty string `question` and an optional `id` (a string or a number;
/// the line number by default). A line starting with `{` is JSON; one
/// starting with `[` or `"` is JSON when it parses as such (then not an
/// object, so an error), else text. Blank lines are skipped.
fn parse_batch_line(line: &str, number: usize) -> Option<BatchItem> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return None;
    }
    let line_id = Value::from(number);
    let fail = |id: Value, why: &str| Some(Err((id, format!("batch line {number} {why}"))));
    let value = match serde_json::from_str::<Value>(trimmed) {
        Ok(value) if trimmed.starts_with(['{', '[', '"']) => value,
        // `{...` must be JSON; `"Dune" was written by whom?` is a question.
        Err(_) if trimmed.starts_with('{') => return fail(line_id, "is not valid JSON"),
        _ => return Some(Ok((line_id, trimmed.to_string()))),
    };
    let Value::Object(object) = value else {
        return fail(line_id, "is not a JSON object {\"question\": ...}");
    };
    let id = match object.get("id") {
        None => line_id,
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        Some(_) => {
            return fail(
                line_id,
                "has an \"id\" that is neither a string nor a number",
            );
        }
    };
    match object.get("question").and_then(Value::as_str) {
        None => fail(id, "has no string \"question\""),
        Some(q) if q.trim().is_empty() => fail(id, "has an empty question"),
        Some(q) => Some(Ok((id, q.to_string()))),
    }
}

/// The parsed lines of `input`; two lines with one id are refused here,
/// before anything is answered.
fn read_batch(input: impl BufRead) -> anyhow::Result<Vec<BatchItem>> {
    let mut items = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read batch line {}", i + 1))?;
        let Some(item) = parse_batch_line(&line, i + 1) else {
            continue;
        };
        let (Ok((id, _)) | Err((id, _))) = &item;
        if let Some(first) = seen.insert(id.to_string(), i + 1) {
            bail!("batch lines {first} and {} have the same id {id}", i + 1);
        }
        items.push(item);
    }
    Ok(items)
}

/// One JSON line for a batch line that is not a question.
#[derive(Debug, Serialize)]
struct ErrorRecord<'a> {
    id: &'a Value,
    error: &'a str,
}

/// Answers the questions of `batch` in groups of `batch_size`, printing each
/// group's JSON lines as soon as it is done and an error object, in its
/// place, for each line that is not a question. Fails at the end if any did.
fn run_batch(
    session: &mut Session,
    batch: &Path,
    batch_size: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let items = if batch.as_os_str() == "-" {
        read_batch(BufReader::new(std::io::stdin()))?
    } else {
        let file = std::fs::File::open(batch)
            .with_context(|| format!("cannot open batch file {}", batch.display()))?;
        read_batch(BufReader::new(file))?
    };
    let mut group = Vec::with_capacity(batch_size);
    let mut failed = 0;
    for item in &items {
        match item {
            Ok(question) => group.push(question.clone()),
            Err((id, error)) => {
                session.json_answers(&group, out)?;
                group.clear();
                serde_json::to_writer(&mut *out, &ErrorRecord { id, error })?;
                writeln!(out)?;
                failed += 1;
            }
        }
        if group.len() == batch_size {
            session.json_answers(&group, out)?;
            group.clear();
        }
    }
    session.json_answers(&group, out)?;
    if failed > 0 {
        bail!(
            "{failed} of {} batch lines are not questions (see their \"error\" objects)",
            items.len()
        );
    }
    Ok(())
}

/// Refuses empty questions given as arguments, before anything is loaded.
fn check_questions(questions: &[String]) -> anyhow::Result<()> {
    match questions.iter().position(|q| q.trim().is_empty()) {
        Some(_) if questions.len() == 1 => bail!("the question is empty"),
        Some(i) => bail!("question {} is empty", i + 1),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_are_text_or_json() {
        assert_eq!(parse_batch_line("  \n", 1), None);
        let q = |line, n| parse_batch_line(line, n).unwrap();
        assert_eq!(q("who?", 3), Ok((Value::from(3), "who?".into())));
        assert_eq!(
            q(r#"{"id": "a7", "question": "where?"}"#, 4),
            Ok((Value::from("a7"), "where?".into()))
        );
        assert_eq!(q("42", 5), Ok((Value::from(5), "42".into())));
        assert_eq!(
            q(r#""Dune" was written by whom?"#, 5),
            Ok((Value::from(5), r#""Dune" was written by whom?"#.into()))
        );
        for (line, why) in [
            (r#"{"id": 1}"#, "no string"),
            ("{oops", "not valid JSON"),
            ("[1,2,3]", "not a JSON object"),
            (r#""a string""#, "not a JSON object"),
            (r#"{"question": "  "}"#, "empty question"),
            (r#"{"id": [1], "question": "q"}"#, "neither a string"),
        ] {
            let Err((_, error)) = q(line, 6) else {
                panic!("{line} taken as a question")
            };
            assert!(error.contains(why), "{line}: {error}");
        }
        assert_eq!(
            q(r#"{"id": "x", "question": ""}"#, 7).unwrap_err().0,
            Value::from("x")
        );
    }

    #[test]
    fn duplicate_batch_ids_are_refused_up_front() {
        let input = "first\n{\"id\": 1, \"question\": \"again\"}\n";
        let err = read_batch(input.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("lines 1 and 2"), "{err}");
        let ok = read_batch("a\n\n{\"id\": \"1\", \"question\": \"b\"}\n".as_bytes());
        assert_eq!(ok.unwrap().len(), 2, "the string \"1\" is not the number 1");
    }

    #[test]
    fn empty_questions_are_refused() {
        assert!(check_questions(&["a".into(), "b".into()]).is_ok());
        let err = check_questions(&[" \t".into()]).unwrap_err().to_string();
        assert_eq!(err, "the question is empty");
        let err = check_questions(&["a".into(), "".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "question 2 is empty");
    }
}
