//! Where everything sits in front of the model: the prompt layout of a
//! document and its questions ([`prompt`]), the chunks of a context and the
//! tokens each compressor keeps of them ([`chunk`]), and the position ids
//! they all read at.
//!
//! One convention, end to end: a context of `L` tokens sits at position ids
//! [`FIRST_POSITION`]`..=L` (SAC numbers positions from 1), offsets into it
//! are 0-based, and the question starts at [`question_position`]; learned
//! embeddings read before the question (SAC's `[LM]`) take the positions
//! just before it. A .sack stores 0-based indices and its first position;
//! `to_sack` and `from_sack` convert at that boundary.

pub mod chunk;
pub mod prompt;

use crate::error::Result;
use crate::model::ModelConfig;

/// A context, question or .sack that does not fit the model's positions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error(
        "the document is {len} tokens long, but the model reads at most {limit} positions and \
         the decoder needs {room} after it; use a model with a longer context"
    )]
    PastPositions {
        len: usize,
        room: usize,
        limit: usize,
    },
    #[error(
        "the document is {len} tokens long, but the model attends within a {window}-token \
         sliding window, which sac does not implement; use a shorter document or another model"
    )]
    PastWindow { len: usize, window: usize },
    #[error(
        "{file} holds a {tokens}-token document, but the model reads at most {limit} positions"
    )]
    SackPastPositions {
        file: String,
        tokens: u64,
        limit: usize,
    },
    #[error(
        "the question needs positions up to {end}, but the model stops at {limit}; ask a \
         shorter question or use a model with a longer context"
    )]
    QuestionPastPositions { end: u64, limit: u64 },
    #[error("position {0} is past the last u32 position id")]
    PastU32(u64),
}

/// Position id of a context's first token.
pub const FIRST_POSITION: u32 = 1;

/// Position id of the first soft token: GMSA's decoder reads its soft
/// tokens from position 0, as the official code does, and the question right
/// after the last of them.
pub const SOFT_TOKENS_FIRST_POSITION: u32 = 0;

/// Positions a context must leave free for the question and its answer.
pub const QUESTION_ROOM: usize = 64;

/// The position id of 0-based context offset `offset`.
pub fn position(offset: usize) -> u32 {
    FIRST_POSITION + offset as u32
}

/// The position id of a question's first token after a context of `len`
/// tokens.
pub fn question_position(len: usize) -> Result<u32> {
    position_id(u64::from(FIRST_POSITION) + len as u64)
}

/// `position` as a position id.
pub fn position_id(position: u64) -> Result<u32> {
    Ok(u32::try_from(position).map_err(|_| FitError::PastU32(position))?)
}

/// The position id of the first of `prefix` learned embeddings read just
/// before a question at `question`.
pub fn prefix_position(question: u32, prefix: usize) -> u32 {
    question.saturating_sub(prefix as u32)
}

/// Positions the decoder reads after a context: `prefix` learned
/// embeddings, the question (or prompt) and `answer` tokens.
pub fn room(prefix: usize, question: usize, answer: usize) -> usize {
    prefix + question + answer
}

/// The most positions the model attends over: its position embeddings, or
/// its sliding window if smaller.
pub fn attention_limit(config: &ModelConfig) -> usize {
    config
        .max_position_embeddings
        .min(config.sliding_window.unwrap_or(usize::MAX))
}

/// Refuses a context of `len` tokens (positions 1..=len) when the `room`
/// positions the decoder reads after it do not fit the model's positions or
/// its sliding window.
pub fn check_fits(
    config: &ModelConfig,
    len: usize,
    room: usize,
) -> std::result::Result<(), FitError> {
    let limit = config.max_position_embeddings;
    if len + room > limit {
        return Err(FitError::PastPositions { len, room, limit });
    }
    if let Some(window) = config.sliding_window.filter(|&w| len + room > w) {
        return Err(FitError::PastWindow { len, window });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_question_follows_the_context_and_its_prefix_precedes_it() {
        assert_eq!(position(0), 1);
        assert_eq!(question_position(10).unwrap(), 11);
        assert_eq!(prefix_position(11, 1), 10);
        assert!(question_position(u32::MAX as usize).is_err());
    }
}
