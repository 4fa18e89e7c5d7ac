//! What the flags' values parse into: library values named in tables
//! (with the help each name shows), and checked numbers.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

use sac::compress::{HeadBudget, METHODS, Method};
use sac::layout::prompt::PromptFormat;
use sac::sack::KvEncoding;
use sac::train::{Stage, TrainMethod};

/// A `--compressor` value: a method, or `None` for `auto`.
pub(super) type CompressorPick = Option<&'static Method>;

/// Parses `--compressor`: `auto` or the name of a method in [`METHODS`],
/// each listed with its summary.
pub(super) fn compressor() -> impl TypedValueParser<Value = CompressorPick> {
    let auto = PossibleValue::new("auto").help(format!(
        "The adapter's method when an adapter is given, else `{}`",
        Method::default_for(None)
    ));
    let methods = METHODS
        .iter()
        .map(|m| PossibleValue::new(m.name).help(m.summary));
    PossibleValuesParser::new(std::iter::once(auto).chain(methods)).try_map(|name| {
        match name.as_str() {
            "auto" => Ok(None),
            name => Method::named(name)
                .map(Some)
                .ok_or_else(|| format!("`{name}` is not a compressor")),
        }
    })
}

/// A `--prompt` value: a layout, or `None` for `auto`.
pub(super) type PromptPick = Option<PromptFormat>;

/// `--prompt` values.
pub(super) const PROMPTS: Choices<PromptPick> = &[
    (
        "auto",
        "`raw` with an adapter, `chat` for a model with a chat template, else `raw`",
        None,
    ),
    (
        "chat",
        "The model's chat template: the document in the user turn, after a short instruction to \
         answer from it; each question follows it there",
        Some(PromptFormat::Chat),
    ),
    (
        "raw",
        "SAC's layout: \"### Context:\", \"### Question:\", \"### Answer:\" (what SAC adapters \
         are trained on)",
        Some(PromptFormat::Raw),
    ),
];

/// A flag's values, each the name of a library value, with its help.
pub(super) type Choices<T> = &'static [(&'static str, &'static str, T)];

/// `--kv-encoding` values.
pub(super) const KV_ENCODINGS: Choices<KvEncoding> = &[
    (
        "q8",
        "8-bit codes: keys per channel, values per token",
        KvEncoding::Q8,
    ),
    (
        "q4",
        "4-bit codes: keys per channel, values per token",
        KvEncoding::Q4,
    ),
    ("bf16", "", KvEncoding::Bf16),
    ("f16", "", KvEncoding::F16),
    ("f32", "Lossless for f32 models", KvEncoding::F32),
];

/// `--head-budget` values.
pub(super) const HEAD_BUDGETS: Choices<HeadBudget> = &[
    (
        "shared",
        "One budget for the whole model: heads that matter keep more",
        HeadBudget::Shared,
    ),
    (
        "even",
        "Every layer and KV head keeps the same number of tokens",
        HeadBudget::Even,
    ),
];

/// `--stage` values.
pub(super) const STAGES: Choices<Stage> = &[
    (
        "pretrain",
        "{\"text\"} rows: continue the text after its compressed context",
        Stage::Pretrain,
    ),
    (
        "qa",
        "{\"context\", \"question\", \"answer\"} rows: answer; only the answer is scored",
        Stage::Qa,
    ),
    (
        "autoencode",
        "{\"text\"} rows: restate the text from its soft tokens (gmsa)",
        Stage::Autoencode,
    ),
];

/// `sac train --method` values.
pub(super) const TRAIN_METHODS: Choices<TrainMethod> = &[
    (
        "sac",
        "Anchors, role embeddings, [LM] and attention LoRA (stages pretrain, qa)",
        TrainMethod::Sac,
    ),
    (
        "gmsa",
        "The encoder's LoRA and the alignment block (stage autoencode)",
        TrainMethod::Gmsa,
    ),
];

/// Parses a flag into the library value its name stands for, listing the
/// names with their help as clap's value enums do.
pub(super) fn choices<T: Copy + Send + Sync + 'static>(
    table: Choices<T>,
) -> impl TypedValueParser<Value = T> {
    let values = table.iter().map(|&(name, help, _)| match help {
        "" => PossibleValue::new(name),
        help => PossibleValue::new(name).help(help),
    });
    PossibleValuesParser::new(values).try_map(move |name| {
        table
            .iter()
            .find(|(n, ..)| *n == name)
            .map(|&(.., value)| value)
            .ok_or_else(|| format!("`{name}` is not one of the values"))
    })
}

/// `--ratio`: a whole number of document tokens per kept token.
pub(super) fn ratio(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(r) if r >= 1 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a ratio: give a whole number >= 1 of document tokens per kept token"
        )),
    }
}

pub(super) fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a number > 0")),
    }
}

pub(super) fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a number >= 0")),
    }
}

pub(super) fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("`{s}` is not a probability in (0, 1]")),
    }
}
