//! What the user asks of a compressor, checked and resolved once, and the
//! strategy built from it: the one place that knows every method.

use super::budget::HeadBudget;
use super::full::Full;
use super::kvzip::{Kvzip, RepeatPrompt};
use super::sac::Sac;
use super::select::SINKS;
use super::snapkv::Snapkv;
use super::streaming::Streaming;
use super::uniform::Uniform;
use super::{Method, Strategy};
use crate::adapter::{AdapterConfig, SacAdapter};
use crate::error::Result;
use crate::layout::chunk::{DEFAULT_CHUNK_SIZE, DEFAULT_RATIO};

/// A compressor request, before it is checked: `None` takes the method's
/// default (an adapter's ratio and chunk size for `sac`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub ratio: Option<usize>,
    pub chunk_size: Option<usize>,
    /// Tokens kept at the start of the context (of each chunk for `uniform`).
    pub sinks: Option<usize>,
    /// How `kvzip` and `snapkv` spread their budget over layers and heads.
    pub head_budget: Option<HeadBudget>,
}

impl Request {
    /// `method` with every setting at its default.
    pub fn new(method: Method) -> Self {
        Request {
            method,
            ratio: None,
            chunk_size: None,
            sinks: None,
            head_budget: None,
        }
    }
}

/// Why a request cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("ratio and chunk size must be positive")]
    NotPositive,
    #[error("the sac compressor needs an adapter")]
    NeedsAdapter,
    #[error(
        "the adapter was trained for ratio {trained_ratio} and chunk size {trained_chunk_size}, \
         not {ratio} and {chunk_size}"
    )]
    NotAsTrained {
        trained_ratio: usize,
        trained_chunk_size: usize,
        ratio: usize,
        chunk_size: usize,
    },
    #[error("the {0} compressor takes no adapter")]
    TakesNoAdapter(Method),
    #[error("the full compressor keeps every token; it takes no ratio")]
    FullTakesRatio,
    #[error("attention sinks apply to the training-free compressors, not to {0}")]
    NoSinks(Method),
    #[error("a head budget applies to kvzip and snapkv, not to {0}")]
    NoHeadBudget(Method),
    #[error(
        "the document is {len} tokens long and {method} reads up to {room} more after it to \
         score it, but the model attends over at most {limit} positions; use a smaller chunk \
         size, another compressor or a model with a longer context"
    )]
    ReadsPastModel {
        method: Method,
        len: usize,
        room: usize,
        limit: usize,
    },
}

/// A checked request: every setting resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    method: Method,
    ratio: usize,
    chunk_size: usize,
    sinks: usize,
    head_budget: HeadBudget,
}

impl Settings {
    /// Checks `request` against the adapter it comes with, if any: `sac`
    /// needs one and runs at its ratio and chunk size; the others take none,
    /// and `full` keeps every token.
    pub fn resolve(
        request: &Request,
        adapter: Option<&AdapterConfig>,
    ) -> std::result::Result<Self, SettingsError> {
        let method = request.method;
        let default_ratio = match method {
            Method::Full => 1,
            _ => DEFAULT_RATIO,
        };
        let ratio = request
            .ratio
            .or(adapter.map(|a| a.ratio))
            .unwrap_or(default_ratio);
        let chunk_size = request
            .chunk_size
            .or(adapter.map(|a| a.chunk_size))
            .unwrap_or(DEFAULT_CHUNK_SIZE);
        if ratio == 0 || chunk_size == 0 {
            return Err(SettingsError::NotPositive);
        }
        match (method, adapter) {
            (Method::Sac, None) => return Err(SettingsError::NeedsAdapter),
            (Method::Sac, Some(a)) if (a.ratio, a.chunk_size) != (ratio, chunk_size) => {
                return Err(SettingsError::NotAsTrained {
                    trained_ratio: a.ratio,
                    trained_chunk_size: a.chunk_size,
                    ratio,
                    chunk_size,
                });
            }
            (Method::Sac, Some(_)) => {}
            (_, Some(_)) => return Err(SettingsError::TakesNoAdapter(method)),
            (Method::Full, None) if ratio != 1 => return Err(SettingsError::FullTakesRatio),
            _ => {}
        }
        if request.sinks.is_some() && matches!(method, Method::Sac | Method::Full) {
            return Err(SettingsError::NoSinks(method));
        }
        let default_budget = match method {
            Method::Kvzip => HeadBudget::Shared,
            Method::Snapkv => HeadBudget::Even,
            _ if request.head_budget.is_some() => return Err(SettingsError::NoHeadBudget(method)),
            _ => HeadBudget::Shared,
        };
        Ok(Settings {
            method,
            ratio,
            chunk_size,
            sinks: request.sinks.unwrap_or(SINKS),
            head_budget: request.head_budget.unwrap_or(default_budget),
        })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    pub fn ratio(&self) -> usize {
        self.ratio
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Whether the method runs a trained adapter (and so the layout it was
    /// trained on).
    pub fn is_trained(&self) -> bool {
        self.method == Method::Sac
    }

    /// The strategy for a context of `len` tokens: a chunk longer than the
    /// context is the context (an adapter's chunk size stays as trained).
    /// `adapter` is the loaded adapter of [`Settings::resolve`]'s config;
    /// `repeat_prompt` is asked for by `kvzip` only.
    pub fn build<'a>(
        &self,
        adapter: Option<&'a SacAdapter>,
        repeat_prompt: impl FnOnce() -> Result<RepeatPrompt>,
        len: usize,
    ) -> Result<Box<dyn Strategy + 'a>> {
        let (ratio, chunk_size, sinks) = (self.ratio, self.chunk_size.min(len.max(1)), self.sinks);
        let head_budget = self.head_budget;
        Ok(match (self.method, adapter) {
            (Method::Sac, Some(adapter)) => Box::new(Sac::new(adapter)),
            (Method::Sac, None) => return Err(SettingsError::NeedsAdapter.into()),
            (Method::Uniform, _) => Box::new(Uniform {
                ratio,
                chunk_size,
                sinks,
            }),
            (Method::Full, _) => Box::new(Full { chunk_size }),
            (Method::Kvzip, _) => Box::new(Kvzip {
                ratio,
                chunk_size,
                sinks,
                head_budget,
                prompt: repeat_prompt()?,
            }),
            (Method::Snapkv, _) => Box::new(Snapkv {
                ratio,
                chunk_size,
                sinks,
                head_budget,
            }),
            (Method::Streaming, _) => Box::new(Streaming {
                ratio,
                chunk_size,
                sinks,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals() {
        let full = Settings::resolve(&Request::new(Method::Full), None).unwrap();
        assert_eq!((full.ratio(), full.chunk_size()), (1, DEFAULT_CHUNK_SIZE));
        let kvzip = Settings::resolve(&Request::new(Method::Kvzip), None).unwrap();
        assert_eq!(kvzip.ratio(), DEFAULT_RATIO);
        assert_eq!(kvzip.head_budget, HeadBudget::Shared);
        let snapkv = Settings::resolve(&Request::new(Method::Snapkv), None).unwrap();
        assert_eq!(
            (snapkv.head_budget, snapkv.sinks),
            (HeadBudget::Even, SINKS)
        );
        let refused = |request: Request| Settings::resolve(&request, None).unwrap_err();
        assert_eq!(
            refused(Request::new(Method::Sac)),
            SettingsError::NeedsAdapter
        );
        assert_eq!(
            refused(Request {
                ratio: Some(4),
                ..Request::new(Method::Full)
            }),
            SettingsError::FullTakesRatio
        );
        assert_eq!(
            refused(Request {
                sinks: Some(2),
                ..Request::new(Method::Full)
            }),
            SettingsError::NoSinks(Method::Full)
        );
        assert_eq!(
            refused(Request {
                head_budget: Some(HeadBudget::Even),
                ..Request::new(Method::Streaming)
            }),
            SettingsError::NoHeadBudget(Method::Streaming)
        );
        assert_eq!(
            refused(Request {
                ratio: Some(0),
                ..Request::new(Method::Uniform)
            }),
            SettingsError::NotPositive
        );
    }
}
