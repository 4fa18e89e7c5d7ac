//! The quality benchmark: SQuAD v1.1 dev articles on a real model
//! (SmolLM2-135M-Instruct by default, `scripts/fetch_smollm2.sh`), every
//! compressor at several ratios in the `raw` and `chat` layouts, each
//! document compressed once and all of its questions asked of the .sack,
//! through the real `sac` binary.
//!
//! `cargo bench --bench quality -- [--split dev|tune] [--questions N]
//! [--quick] [--layouts raw,chat] [--ratios 2,4,8,16]
//! [--methods kvzip,snapkv+head-budget=shared,...] [--no-baselines]
//! [--peers FILE...]`.
//!
//! Writes OUT/results.{md,json}, each row's answers in
//! OUT/LAYOUT/ROW-rRATIO/answers.jsonl, and OUT/prompts.json: the token ids
//! of every context and question, which scripts/quality_hf.py and
//! scripts/quality_kvpress.py feed their models, so that the peers' rows
//! (`--peers`) come from the same ids. `--make-items PARAGRAPHS.jsonl`
//! rebuilds benches/quality/items/ from the dataset.

#[path = "../common/mod.rs"]
mod common;
mod eval;
mod squad;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use sac::device::{DTypeSpec, DeviceSpec, Workload};
use sac::layout::prompt::{PromptFormat, PromptLayout};
use sac::runtime::{LoadedModel, ModelSpec};
use serde_json::json;

use eval::{Asking, Row, Setting};
use squad::Split;

const ITEMS: &str = "benches/quality/items";

#[derive(Parser)]
struct Args {
    /// Where the answers and tables go.
    #[arg(long, default_value = "target/quality")]
    out: PathBuf,
    /// A model directory or .gguf file.
    #[arg(long, default_value = "target/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = Split::Dev)]
    split: Split,
    /// Documents are added (one per article in turn) until they hold this
    /// many questions.
    #[arg(long, default_value_t = 500)]
    questions: usize,
    /// 100 questions of the tune split, ratio 4, the raw layout.
    #[arg(long)]
    quick: bool,
    #[arg(long, value_delimiter = ',', default_value = "raw,chat", value_parser = parse_layout)]
    layouts: Vec<PromptFormat>,
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
    ratios: Vec<usize>,
    /// Compressors run at every ratio, as METHOD[+FLAG=VALUE...]; one with
    /// `+ratio=N` runs at N alone (`gmsa+adapter=DIR+ratio=8`). `--methods ''`
    /// runs only the `none` and `full` rows.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kvzip,snapkv,streaming,uniform"
    )]
    methods: Vec<String>,
    /// Leave out the `none` and `full` rows (a learning curve of adapters).
    #[arg(long)]
    no_baselines: bool,
    /// sac's `--dtype` for every `compress` and `ask` (the tables in
    /// docs/benchmarks.md are f32's).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Rows already in OUT/results.json for the same questions are read
    /// back (answers from their answers.jsonl), not run again.
    #[arg(long)]
    reuse: bool,
    /// Answer files of peers to score beside ours.
    #[arg(long, num_args = 1..)]
    peers: Vec<PathBuf>,
    /// Rebuild the item files from SQuAD's paragraphs.jsonl and stop.
    #[arg(long, value_name = "PARAGRAPHS.jsonl")]
    make_items: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn load(model: &Path) -> anyhow::Result<LoadedModel> {
    Ok(LoadedModel::load(&ModelSpec {
        model: model.to_string_lossy().into_owned(),
        revision: None,
        gguf_file: None,
        device: DeviceSpec::Cpu,
        dtype: DTypeSpec::Auto,
        workload: Workload::Inference,
    })?)
}

fn parse_layout(name: &str) -> Result<PromptFormat, String> {
    PromptFormat::from_name(name).ok_or_else(|| format!("unknown layout {name}: raw or chat"))
}

fn layout(format: PromptFormat, model: &LoadedModel) -> anyhow::Result<PromptLayout> {
    Ok(match format {
        PromptFormat::Raw => PromptLayout::raw(),
        PromptFormat::Chat => PromptLayout::chat(
            model
                .tokenizer
                .chat_template()
                .context("the model has no chat template")?,
        )?,
    })
}

/// The token ids every context and question is read as, per layout.
fn prompts(
    model: &LoadedModel,
    layouts: &[PromptFormat],
    docs: &[squad::Document],
    asking: &Asking,
) -> anyhow::Result<serde_json::Value> {
    let tokenizer = &model.tokenizer;
    let mut by_layout = serde_json::Map::new();
    for &format in layouts {
        let layout = layout(format, model)?;
        let docs = docs
            .iter()
            .map(|doc| {
                let questions = doc
                    .questions
                    .iter()
                    .map(|q| Ok(json!({"id": q.id, "ids": layout.question_ids(tokenizer, &q.question)?})))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(json!({"context_ids": layout.context_ids(tokenizer, &doc.text)?, "questions": questions}))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        by_layout.insert(format.name().into(), docs.into());
    }
    Ok(json!({
        "eos": tokenizer.eos(),
        "stop": asking.stop,
        "max_tokens": asking.max_tokens,
        "layouts": by_layout,
    }))
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let started = Instant::now();
    let sac = PathBuf::from(env!("CARGO_BIN_EXE_sac"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join(&args.model);
    let model = load(&model_path).with_context(|| {
        format!(
            "{}: run scripts/fetch_smollm2.sh first",
            args.model.display()
        )
    })?;
    if let Some(source) = &args.make_items {
        for split in [Split::Tune, Split::Dev] {
            let docs = squad::make(source, split, &model.tokenizer)?;
            let path = root.join(ITEMS).join(format!("{}.jsonl", split.name()));
            squad::write(&path, &docs)?;
            let questions: usize = docs.iter().map(|d| d.questions.len()).sum();
            eprintln!(
                "{}: {} documents, {questions} questions",
                path.display(),
                docs.len()
            );
        }
        return Ok(());
    }
    if args.quick {
        (args.split, args.questions, args.ratios, args.layouts) =
            (Split::Tune, 100, vec![4], vec![PromptFormat::Raw]);
    }
    let items = root
        .join(ITEMS)
        .join(format!("{}.jsonl", args.split.name()));
    let docs = squad::pick(squad::read(&items)?, args.questions);
    let questions: HashMap<&str, &squad::Question> = docs
        .iter()
        .flat_map(|d| &d.questions)
        .map(|q| (q.id.as_str(), q))
        .collect();
    std::fs::create_dir_all(&args.out)?;
    let asking = |layout| Asking {
        layout,
        dtype: args.dtype.clone(),
        max_tokens: args.max_tokens,
        stop: "\n",
    };
    let prompts = prompts(&model, &args.layouts, &docs, &asking("raw"))?;
    sac::atomic::write_bytes(
        &args.out.join("prompts.json"),
        prompts.to_string().as_bytes(),
    )?;
    eprintln!(
        "{} documents ({} to {} tokens), {} questions, split {}",
        docs.len(),
        docs.iter().map(|d| d.tokens).min().unwrap_or(0),
        docs.iter().map(|d| d.tokens).max().unwrap_or(0),
        questions.len(),
        args.split.name()
    );

    let mut settings = match args.no_baselines {
        true => Vec::new(),
        false => ["none", "full"]
            .map(|spec| Setting {
                spec: spec.into(),
                ratio: None,
            })
            .into(),
    };
    for method in args.methods.iter().filter(|m| !m.is_empty()) {
        settings.extend(Setting::at_ratios(method, &args.ratios)?);
    }
    let earlier: Vec<Row> = match args.reuse {
        true => eval::earlier_rows(&args.out.join("results.json"))?,
        false => Vec::new(),
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut reused = 0;
    let mut full: HashMap<&str, HashMap<String, String>> = HashMap::new();
    for layout in args.layouts.iter().map(|f| f.name()) {
        for setting in &settings {
            let name = match setting.ratio {
                Some(r) => format!("{}-r{r}", setting.spec),
                None => setting.spec.clone(),
            };
            // An adapter's path, as one directory name.
            let work = args.out.join(layout).join(name.replace('/', "_"));
            let again = earlier.iter().find(|r| {
                (r.row.as_str(), r.layout.as_str(), r.ratio)
                    == (&setting.spec, layout, setting.ratio)
                    && r.questions == questions.len()
            });
            reused += usize::from(again.is_some());
            let (row, answers) = match again {
                Some(row) => (row.clone(), eval::read_answers(&work)?),
                None => eval::evaluate(&sac, &model_path, &docs, setting, &asking(layout), &work)?,
            };
            eprintln!(
                "{}",
                eval::markdown(std::slice::from_ref(&row))
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
            if setting.spec == "full" {
                full.insert(layout, answers);
            }
            rows.push(row);
            // What is done so far, so that `--reuse` resumes a stopped run.
            save(&args.out, &rows, &[])?;
        }
    }
    let mut notes = Vec::new();
    for path in &args.peers {
        for ((row, layout, ratio), answers) in eval::peer_answers(path)? {
            let answered: Vec<(&squad::Question, String)> = answers
                .iter()
                .filter_map(|(id, a)| questions.get(id.as_str()).map(|q| (*q, a.clone())))
                .collect();
            if let Some(ours) = full.get(layout.as_str()).filter(|_| ratio.is_none()) {
                let (same, n) = eval::agreement(ours, &answers);
                notes.push(format!("{row} ({layout}) and our full give the same answer to {same:.1} % of {n} questions"));
            }
            rows.push(eval::score(&row, &layout, ratio, &answered));
        }
    }
    rows.sort_by(|a, b| (&a.layout, a.ratio, &a.row).cmp(&(&b.layout, b.ratio, &b.row)));
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let row_minutes = rows.iter().filter_map(|r| r.seconds).sum::<f64>() / 60.0;
    let mut table = eval::markdown(&rows);
    for note in &notes {
        table.push_str(&format!("\n{note}."));
    }
    let reused = match reused {
        0 => String::new(),
        n => format!(" ({n} rows read back from an earlier run)"),
    };
    table.push_str(&format!(
        "\n\n{} questions about {} documents of the {} split; the rows took \
         {row_minutes:.1} minutes, this run {minutes:.1}{reused}.\n",
        questions.len(),
        docs.len(),
        args.split.name()
    ));
    sac::atomic::write_bytes(&args.out.join("results.md"), table.as_bytes())?;
    save(&args.out, &rows, &notes)?;
    println!("{table}");
    Ok(())
}

/// Writes `out/results.json`.
fn save(out: &Path, rows: &[Row], notes: &[String]) -> anyhow::Result<()> {
    let minutes = rows.iter().filter_map(|r| r.seconds).sum::<f64>() / 60.0;
    sac::atomic::write_bytes(
        &out.join("results.json"),
        serde_json::to_string_pretty(&json!({"rows": rows, "notes": notes, "minutes": minutes}))?
            .as_bytes(),
    )?;
    Ok(())
}
