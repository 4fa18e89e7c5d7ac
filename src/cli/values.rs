//! What the flags' values parse into: library values named in tables
//! (with the help each name shows), and checked numbers.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

use sac::compress::{HeadBudget, Method};
use sac::layout::prompt::PromptFormat;
use sac::sack::KvEncoding;
use sac::train::Stage;

/// A `--compressor` value: a method, or `None` for `auto`.
pub(super) type CompressorPick = Option<Method>;

/// `--compressor` values.
pub(super) const COMPRESSORS: Choices<CompressorPick> = &[
    ("auto", "`sac` when an adapter is given, else `kvzip`", None),
    (
        "sac",
        "The paper's compressor (needs --adapter)",
        Some(Method::Sac),
    ),
    (
        "uniform",
        "Training-free: the same anchors from a plain causal pass",
        Some(Method::Uniform),
    ),
    (
        "full",
        "Every token kept: a prompt cache (lossless with --kv-encoding f32)",
        Some(Method::Full),
    ),
    (
        "kvzip",
        "Training-free: the K/V the model attends to when asked to repeat the document, chosen \
         per layer and KV head (KVzip); about 2-3x a prefill",
        Some(Method::Kvzip),
    ),
    (
        "snapkv",
        "Training-free: the K/V the document's last 64 tokens attend to, chosen per layer and \
         KV head (SnapKV); about one prefill",
        Some(Method::Snapkv),
    ),
    (
        "streaming",
        "The first 4 tokens and the most recent ones (StreamingLLM): a baseline",
        Some(Method::Streaming),
    ),
];

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
