//! `sac compress`: text in, .sack out.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use crate::cli::CompressArgs;
use sac::adapter::{self, AdapterError};
use sac::compress::{Compressor, Cost, Emitted, Method, RepeatPrompt, Request, Settings, Strategy};
use sac::error::Error;
use sac::fingerprint::DigestCache;
use sac::layout::prompt::{PromptFormat, PromptLayout};
use sac::runtime::LoadedModel;
use sac::sack::{SackWriter, Sink, WriteOptions};
use sac::to_sack::{self, DocumentFacts, UsedAdapter};
use sac::tokens::TextTokenizer;

/// Where the .sack goes.
enum Output {
    File(PathBuf),
    Stdout,
}

/// What `compress` was asked, checked before the model loads.
struct CompressSettings<'a> {
    output: Output,
    model: String,
    /// The adapter's directory and config.
    adapter: Option<(&'a Path, adapter::Config)>,
    compressor: Settings,
    write: WriteOptions,
}

impl<'a> CompressSettings<'a> {
    fn resolve(args: &'a CompressArgs) -> anyhow::Result<Self> {
        let output = output_for(args)?;
        let adapter = args
            .adapter
            .as_deref()
            .map(|dir| anyhow::Ok((dir, adapter::Config::load(dir)?)))
            .transpose()?;
        let model = match (&args.model, &adapter) {
            (Some(m), _) => m.clone(),
            (None, Some((dir, config))) => config.trained_on().base_model_from(dir),
            (None, None) => bail!(
                "no model given: pass --model DIR|FILE.gguf|HUB_ID (or --adapter, or set SAC_MODEL)"
            ),
        };
        let trained = adapter.as_ref().map(|(_, config)| config.trained());
        let request = Request {
            method: args
                .compressor
                .unwrap_or(Method::default_for(trained.as_ref())),
            ratio: args.ratio.map(|r| r as usize),
            chunk_size: args.chunk_size.map(|c| c as usize),
            sinks: args.sinks.map(|s| s as usize),
            head_budget: args.head_budget,
        };
        let compressor = Settings::resolve(&request, trained.as_ref()).map_err(Error::from)?;
        Ok(CompressSettings {
            output,
            model,
            adapter,
            compressor,
            write: WriteOptions {
                encoding: args.kv_encoding,
                zstd_level: (args.zstd_level > 0).then_some(args.zstd_level),
            },
        })
    }
}

pub fn run(args: &CompressArgs) -> anyhow::Result<()> {
    // Everything that can be checked without the model is checked first.
    let CompressSettings {
        output,
        model: model_id,
        adapter: adapter_config,
        compressor: settings,
        write: options,
    } = CompressSettings::resolve(args)?;
    if matches!(output, Output::File(_)) {
        sac::atomic::remove_temp_files_on_signal()?;
    }
    let (text, file_name) = read_document(&args.input)?;

    let model = LoadedModel::load(&args.placement.spec(&model_id))?;
    let adapter = match &adapter_config {
        Some((dir, config)) => {
            // The model the adapter names is checked before its tensors are.
            let mismatch =
                config
                    .trained_on()
                    .model_mismatch(dir, &model.files.id, &model.fingerprint.model);
            if let Some(why) = mismatch {
                bail!(Error::from(AdapterError::OtherModel(Box::new(why))));
            }
            let a = adapter::Loaded::load(
                config,
                dir,
                &model.config,
                model.decoder.device(),
                model.decoder.dtype(),
            )?;
            let used = UsedAdapter {
                id: dir
                    .file_name()
                    .unwrap_or(dir.as_os_str())
                    .to_string_lossy()
                    .into_owned(),
                fingerprint: adapter::fingerprint(dir, &mut DigestCache::open_default())?,
                for_decoder: matches!(&a, adapter::Loaded::Gmsa(g) if g.decoder_lora.is_some()),
            };
            Some((a, used))
        }
        None => None,
    };
    let layout = prompt_layout(args.prompt, &settings, &model.tokenizer)?;
    let ids = layout.context_ids(&model.tokenizer, &text)?;
    let ratio = settings.ratio();
    let strategy = settings.build(
        adapter.as_ref().map(|(a, _)| a),
        || RepeatPrompt::new(&model.tokenizer, &layout),
        ids.len(),
    )?;
    // Soft tokens pool a short document into one; a ratio above the length
    // would keep no token of it.
    if ratio > ids.len() && !strategy.facts().soft_tokens {
        bail!(
            "--ratio {ratio} is more than the document's {} tokens (with the prompt's): \
             use a ratio of at most {}",
            ids.len(),
            ids.len()
        );
    }
    let compressor = Compressor::new(&model.decoder, strategy);
    compressor.check_document(ids.len())?;
    let document = DocumentFacts {
        text: &text,
        tokens: ids.len(),
        name: args.name.clone().or(file_name),
        layout: &layout,
    };
    let header = to_sack::header(
        &model,
        compressor.strategy(),
        adapter.as_ref().map(|(_, used)| used),
        &document,
    )?;
    let progress = progress_bar(compressor.strategy(), ids.len(), args.quiet);
    let report = |tokens| progress.inc(tokens);
    let compressor = compressor.with_progress(&report);
    let (summary, written) = match &output {
        Output::File(path) => {
            let writer = SackWriter::create(path, &header, options)?;
            (
                write_sack(writer, &compressor, &ids)?,
                path.display().to_string(),
            )
        }
        Output::Stdout => {
            let stdout = std::io::stdout();
            let writer = SackWriter::to_stream(stdout, "<stdout>", &header, options)?;
            (
                write_sack(writer, &compressor, &ids)?,
                "standard output".into(),
            )
        }
    };
    progress.finish_and_clear();
    if !args.quiet {
        let method = settings.method();
        let seconds = summary.cost.total.as_secs_f64();
        let versus_prefill = summary.cost.prefill.map_or(String::new(), |p| {
            format!(" ({:.1}x its prefill)", seconds / p.as_secs_f64().max(1e-9))
        });
        let facts = compressor.strategy().facts();
        eprintln!(
            "sac: wrote {written}: {} tokens, {:.0} {}{} ({method}, ratio {}), {:.0} tokens/s, {seconds:.2} s, {:.2} s of it waiting on the writer{versus_prefill}",
            ids.len(),
            summary.kept,
            if facts.soft_tokens {
                "soft tokens"
            } else {
                "kept"
            },
            if facts.per_head {
                " per head on average"
            } else {
                ""
            },
            ratio,
            ids.len() as f64 / seconds.max(1e-9),
            summary.writing.as_secs_f64(),
        );
    }
    Ok(())
}

/// The layout `choice` asks for: trained adapters are trained on `raw`;
/// `auto` (`None`) takes the model's chat template when it has one that
/// renders.
fn prompt_layout(
    choice: Option<PromptFormat>,
    settings: &Settings,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<PromptLayout> {
    let template = tokenizer.chat_template();
    match (choice, settings.is_trained(), template) {
        (Some(PromptFormat::Raw), ..) | (None, true, _) | (None, _, None) => {
            Ok(PromptLayout::raw())
        }
        (Some(PromptFormat::Chat), true, _) => {
            bail!(
                "{} adapters are trained on the raw layout; pass --prompt raw (or auto)",
                settings.method()
            )
        }
        (Some(PromptFormat::Chat), _, None) => {
            bail!("the model has no chat template; pass --prompt raw (or auto)")
        }
        (Some(PromptFormat::Chat), _, Some(t)) => Ok(PromptLayout::chat(t)?),
        (None, _, Some(t)) => Ok(PromptLayout::chat(t).unwrap_or_else(|e| {
            eprintln!(
                "sac: warning: {:#}; using the raw layout",
                anyhow::Error::from(e)
            );
            PromptLayout::raw()
        })),
    }
}

/// What a compression kept and cost.
struct Summary {
    /// Tokens kept per KV head on average, or soft tokens.
    kept: f64,
    cost: Cost,
    /// The part of the cost spent waiting for the writer (see
    /// [`to_sack::WriterWait`]).
    writing: Duration,
}

/// Compresses `ids` chunk by chunk into `writer`.
fn write_sack<S: Sink + Send>(
    mut writer: SackWriter<S>,
    compressor: &Compressor,
    ids: &[u32],
) -> anyhow::Result<Summary> {
    let c = compressor.decoder().config();
    let slots = (c.num_layers * c.num_kv_heads) as f64;
    let mut kept = 0.0;
    let (mut cost, wait) = to_sack::overlapped(&mut writer, |write| {
        compressor.compress(ids, |out| {
            kept += match &out {
                Emitted::Kv(chunk) => chunk.kept.pairs(c.num_layers, c.num_kv_heads) as f64 / slots,
                Emitted::Soft(soft) => soft.tokens.dim(0)? as f64,
            };
            write(&out)
        })
    })?;
    writer.finish()?;
    cost.total += wait.tail;
    Ok(Summary {
        kept,
        cost,
        writing: wait.blocked + wait.tail,
    })
}

/// Reads the document: UTF-8, not empty, from a file or standard input.
fn read_document(input: &Path) -> anyhow::Result<(String, Option<String>)> {
    let (bytes, name, shown) = if input.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
        (bytes, None, "standard input".to_string())
    } else {
        if input.is_dir() {
            bail!("{} is a directory, not a text file", input.display());
        }
        let bytes =
            std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
        let name = input.file_name().map(|n| n.to_string_lossy().into_owned());
        (bytes, name, input.display().to_string())
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{shown} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        bail!("{shown} is empty: there is nothing to compress");
    }
    if !text.chars().any(printable) {
        bail!("{shown} has no printable text (only control or invisible characters)");
    }
    Ok((text, name))
}

/// A character that shows: not white space, a control character, or one of
/// the invisible format characters (zero-width spaces and joiners, BOM, soft
/// hyphen).
fn printable(c: char) -> bool {
    !c.is_whitespace()
        && !c.is_control()
        && !matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

fn output_for(args: &CompressArgs) -> anyhow::Result<Output> {
    let output = match &args.output {
        Some(path) if path.as_os_str() == "-" => Output::Stdout,
        Some(path) => {
            check_output_file(path, &args.input)?;
            Output::File(path.clone())
        }
        None if args.input.as_os_str() == "-" => Output::Stdout,
        None => {
            let path = args.input.with_extension("sack");
            if path == args.input {
                bail!(
                    "{} already ends in .sack; pass -o OUT",
                    args.input.display()
                );
            }
            check_output_file(&path, &args.input)?;
            Output::File(path)
        }
    };
    if matches!(output, Output::Stdout) && std::io::stdout().is_terminal() {
        bail!(
            "refusing to write a binary .sack to a terminal; redirect standard output or pass -o OUT"
        );
    }
    Ok(output)
}

/// Refuses, before any work, an output that cannot be written or that is the
/// input itself (by any name: a link, a hard link, another spelling).
fn check_output_file(path: &Path, input: &Path) -> anyhow::Result<()> {
    let dir = sac::atomic::directory_of(path);
    if !dir.is_dir() {
        bail!(
            "cannot write {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!("cannot write {}: it is a directory", path.display());
    }
    if input.as_os_str() != "-" && same_file::is_same_file(input, path).unwrap_or(false) {
        bail!(
            "{} is the input document itself; refusing to overwrite it (pass another -o)",
            path.display()
        );
    }
    Ok(())
}

/// A bar over the tokens `strategy` runs through the model to compress
/// `len` tokens.
fn progress_bar(strategy: &dyn Strategy, len: usize, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(strategy.work(len)).with_message(strategy.work_label());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} compressing [{bar:30}] {pos}/{len} {msg}, {rate}, {eta} left",
        )
        .expect("static progress template")
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} tokens/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use sac::layout::chunk::{self, DEFAULT_CHUNK_SIZE, DEFAULT_RATIO};

    #[test]
    fn default_ratio_gives_the_reference_anchor_count() {
        assert_eq!(chunk::mem_size(DEFAULT_CHUNK_SIZE, DEFAULT_RATIO), 102);
    }

    #[test]
    fn documents_must_be_utf8_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(
            read_document(&empty)
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );
        let binary = dir.path().join("bin.txt");
        std::fs::write(&binary, b"ok\xff").unwrap();
        assert!(
            read_document(&binary)
                .unwrap_err()
                .to_string()
                .contains("offset 2")
        );
        assert!(
            read_document(dir.path())
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
        let missing = read_document(&dir.path().join("nope.txt")).unwrap_err();
        assert!(format!("{missing:#}").contains("nope.txt"));
    }
}
