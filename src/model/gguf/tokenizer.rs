//! A GGUF file's tokenizer, built from `tokenizer.ggml.*` as a `tokenizers`
//! tokenizer laid out as the model's published `tokenizer.json` is:
//! byte-level BPE ("gpt2") with the vocabulary and merges of the file and the
//! pre-tokenizer `tokenizer.ggml.pre` names, or SentencePiece BPE ("llama")
//! with merges ranked by the pieces' scores and byte fallback; the control
//! tokens are special tokens; `tokenizer.chat_template` is the chat template.

use tokenizers::models::bpe::Vocab;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::GgufModel;
use crate::error::{Error, Result};
use crate::layout::prompt::ChatTemplate;
use crate::tokens::{TextTokenizer, TokenizerError};

/// Llama 3's split, as its `tokenizer.json` (and llama.cpp's "llama-bpe") has it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split (llama.cpp's "qwen2"): single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's space.
const SPACE: &str = "\u{2581}";

/// llama.cpp's token types.
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Why a GGUF file's tokenizer cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum GgufTokenizerError {
    #[error("has no `tokenizer.ggml.model`")]
    NoModel,
    #[error("has no array `{0}`")]
    NoArray(String),
    #[error("`{0}` holds a non-string")]
    NotStrings(String),
    #[error(
        "tokenizer model {0:?} is not supported (sac reads byte-level BPE, \"gpt2\", and \
         SentencePiece BPE, \"llama\")"
    )]
    Kind(String),
    #[error(
        "pre-tokenizer {0:?} is not supported (sac knows default, gpt-2, smollm, llama-bpe and \
         qwen2)"
    )]
    PreTokenizer(String),
    #[error("merge {0:?} is not two tokens")]
    Merge(String),
    #[error("has no score for every token")]
    NoScores,
    #[error("cannot build its BPE")]
    Bpe(#[source] tokenizers::Error),
    #[error("cannot build its normalizer")]
    Normalizer(#[source] tokenizers::Error),
}

fn tokenizer_error(model: &GgufModel, problem: GgufTokenizerError) -> Error {
    TokenizerError::Gguf {
        path: model.path().to_path_buf(),
        problem,
    }
    .into()
}

/// The strings of array `key`.
fn strings<'a>(model: &'a GgufModel, key: &str) -> Result<Vec<&'a str>> {
    match model.meta(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(tokenizer_error(
                    model,
                    GgufTokenizerError::NotStrings(key.into()),
                )),
            })
            .collect(),
        _ => Err(tokenizer_error(
            model,
            GgufTokenizerError::NoArray(key.into()),
        )),
    }
}

/// Token to id, the ids being the positions in `tokenizer.ggml.tokens`.
fn vocabulary(tokens: &[&str]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.to_string(), id as u32))
        .collect()
}

/// The pre-tokenizer of llama.cpp's pre-tokenizer type `pre`, and whether
/// the vocabulary is NFC-normalized first.
fn pre_tokenizer(pre: &str) -> Option<(PreTokenizerWrapper, bool)> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |pattern: &str| -> Option<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .ok()
        .map(Into::into)
    };
    Some(match pre {
        "default" | "gpt-2" | "gpt2" => (byte_level(true), false),
        "smollm" => (
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            false,
        ),
        "llama-bpe" | "llama3" => (
            Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false)]).into(),
            false,
        ),
        "qwen2" => (
            Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false)]).into(),
            true,
        ),
        _ => return None,
    })
}

/// Builds the tokenizer of `model`.
pub(super) fn build(model: &GgufModel) -> Result<TextTokenizer> {
    let kind = model
        .string("tokenizer.ggml.model")
        .map_err(|_| tokenizer_error(model, GgufTokenizerError::NoModel))?;
    let tokens = strings(model, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = model
        .numbers("tokenizer.ggml.token_type")
        .into_iter()
        .map(|t| t as i64)
        .collect();
    let mut inner = match kind {
        "gpt2" => byte_level_bpe(model, &tokens)?,
        "llama" => sentencepiece_bpe(model, &tokens, &types)?,
        _ => {
            return Err(tokenizer_error(
                model,
                GgufTokenizerError::Kind(kind.into()),
            ));
        }
    };
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| matches!(**t, CONTROL | USER_DEFINED))
        .map(|(token, t)| AddedToken::from(token.to_string(), *t == CONTROL))
        .collect();
    inner.add_special_tokens(&added);
    // llama.cpp's default: BOS for SentencePiece vocabularies, none for BPE.
    let add_bos = match model.meta("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(add)) => *add,
        _ => kind == "llama",
    };
    let bos = add_bos
        .then(|| model.id("tokenizer.ggml.bos_token_id"))
        .flatten()
        .filter(|&id| (id as usize) < tokens.len());
    let eos = [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ]
    .iter()
    .filter_map(|key| model.id(key))
    .filter(|&id| (id as usize) < tokens.len())
    .collect();
    let token = |key: &str| {
        model
            .id(key)
            .and_then(|id| tokens.get(id as usize))
            .map_or(String::new(), |t| t.to_string())
    };
    let template = match model.meta("tokenizer.chat_template") {
        Some(Value::String(source)) => Some(ChatTemplate {
            source: source.clone(),
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
        }),
        _ => None,
    };
    Ok(TextTokenizer::new(inner, bos, eos).with_chat_template(template))
}

/// Byte-level BPE ("gpt2"): the vocabulary and merges of the file, and the
/// pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_bpe(model: &GgufModel, tokens: &[&str]) -> Result<Tokenizer> {
    let pre = model.string("tokenizer.ggml.pre").unwrap_or("default");
    let (pre_tokenizer, nfc) = pre_tokenizer(pre)
        .ok_or_else(|| tokenizer_error(model, GgufTokenizerError::PreTokenizer(pre.into())))?;
    let vocab = vocabulary(tokens);
    let merges = strings(model, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tokenizer_error(model, GgufTokenizerError::Merge(merge.into())))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == "llama-bpe" || pre == "llama3")
        .build()
        .map_err(|e| tokenizer_error(model, GgufTokenizerError::Bpe(e)))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    if nfc {
        inner.with_normalizer(Some(NFC));
    }
    Ok(inner)
}

/// SentencePiece BPE ("llama"), laid out as Hugging Face's conversion of a
/// `tokenizer.model` is: spaces as `▁` (and one before the text when
/// `add_space_prefix`, the default), merges ranked by the merged piece's
/// score, unknown characters spelled in `<0xXX>` byte pieces.
fn sentencepiece_bpe(model: &GgufModel, tokens: &[&str], types: &[i64]) -> Result<Tokenizer> {
    let scores: Vec<f32> = model
        .numbers("tokenizer.ggml.scores")
        .into_iter()
        .map(|x| x as f32)
        .collect();
    if scores.len() != tokens.len() {
        return Err(tokenizer_error(model, GgufTokenizerError::NoScores));
    }
    let vocab = vocabulary(tokens);
    let merges = sentencepiece_merges(tokens, &scores, &vocab);
    let unk = model
        .id("tokenizer.ggml.unknown_token_id")
        .or_else(|| types.iter().position(|t| *t == UNKNOWN).map(|i| i as u32))
        .and_then(|id| tokens.get(id as usize));
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| tokenizer_error(model, GgufTokenizerError::Bpe(e)))?;
    let prefix = !matches!(
        model.meta("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(false))
    );
    let replace = |from: &str, to: &str| {
        Replace::new(from, to)
            .map_err(|e| tokenizer_error(model, GgufTokenizerError::Normalizer(e)))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        normalizers.push(Prepend::new(SPACE.into()).into());
    }
    normalizers.push(replace(" ", SPACE)?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut inner = Tokenizer::new(bpe);
    inner.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// The merges a SentencePiece BPE vocabulary implies: every split of a
/// piece into two pieces of the vocabulary, ranked by the whole piece's
/// score (highest first), ties in vocabulary order.
fn sentencepiece_merges<'t>(
    tokens: &[&'t str],
    scores: &[f32],
    ids: &Vocab,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, &'t str, &'t str)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((score, l, r, left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}
