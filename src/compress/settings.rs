//! What the user asks of a compressor, checked once against what the method
//! takes, and the strategy the method builds from it.

use super::budget::HeadBudget;
use super::kvzip::RepeatPrompt;
use super::select::SINKS;
use super::{Keep, METHODS, Method, Parts, Strategy};
use crate::adapter::Loaded;
use crate::error::Result;
use crate::layout::chunk::{DEFAULT_CHUNK_SIZE, DEFAULT_RATIO};

/// A compressor request, before it is checked: `None` takes the method's
/// default (a trained method's adapter's ratio and chunk size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub method: &'static Method,
    pub ratio: Option<usize>,
    pub chunk_size: Option<usize>,
    /// Tokens kept at the start of the context (of each chunk for `uniform`).
    pub sinks: Option<usize>,
    /// How `kvzip` and `snapkv` spread their budget over layers and heads.
    pub head_budget: Option<HeadBudget>,
}

impl Request {
    /// `method` with every setting at its default.
    pub fn new(method: &'static Method) -> Self {
        Request {
            method,
            ratio: None,
            chunk_size: None,
            sinks: None,
            head_budget: None,
        }
    }
}

/// What an adapter was trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trained {
    pub method: &'static Method,
    pub ratio: usize,
    /// `None` for a method that reads the context whole.
    pub chunk_size: Option<usize>,
}

/// Why a request cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("ratio and chunk size must be positive")]
    NotPositive,
    #[error("the {0} compressor needs an adapter")]
    NeedsAdapter(&'static Method),
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
    #[error("the adapter is for the {adapter} compressor, not {method}")]
    AdapterFor {
        adapter: &'static Method,
        method: &'static Method,
    },
    #[error("the adapter was trained for ratio {trained_ratio}, not {ratio}")]
    RatioNotAsTrained { trained_ratio: usize, ratio: usize },
    #[error("the {0} compressor reads the document whole; it takes no chunk size")]
    NoChunks(&'static Method),
    #[error("the {0} compressor takes no adapter")]
    TakesNoAdapter(&'static Method),
    #[error("the {0} compressor keeps every token; it takes no ratio")]
    KeepsAll(&'static Method),
    #[error("attention sinks apply to the training-free compressors, not to {0}")]
    NoSinks(&'static Method),
    #[error("a head budget applies to {takers}, not to {0}", takers = head_budget_methods())]
    NoHeadBudget(&'static Method),
    #[error(
        "the document is {len} tokens long and {method} reads up to {room} more after it to \
         score it, but the model attends over at most {limit} positions; use a smaller chunk \
         size, another compressor or a model with a longer context"
    )]
    ReadsPastModel {
        method: &'static Method,
        len: usize,
        room: usize,
        limit: usize,
    },
}

/// A checked request: every setting resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    method: &'static Method,
    ratio: usize,
    chunk_size: usize,
    sinks: usize,
    head_budget: HeadBudget,
}

impl Settings {
    /// Checks `request` against the adapter it comes with, if any: a
    /// trained method (`sac`, `gmsa`) needs its own and runs at its ratio
    /// (and chunk size); the others take none, and `full` keeps every token.
    pub fn resolve(
        request: &Request,
        adapter: Option<&Trained>,
    ) -> std::result::Result<Self, SettingsError> {
        let method = request.method;
        let takes = method.takes;
        let default_ratio = if takes.keeps_all { 1 } else { DEFAULT_RATIO };
        let ratio = request
            .ratio
            .or(adapter.map(|a| a.ratio))
            .unwrap_or(default_ratio);
        let chunk_size = match (takes.chunks, request.chunk_size) {
            (false, Some(_)) => return Err(SettingsError::NoChunks(method)),
            (false, None) => usize::MAX,
            (true, asked) => asked
                .or(adapter.and_then(|a| a.chunk_size))
                .unwrap_or(DEFAULT_CHUNK_SIZE),
        };
        if ratio == 0 || chunk_size == 0 {
            return Err(SettingsError::NotPositive);
        }
        match (takes.adapter, adapter) {
            (true, None) => return Err(SettingsError::NeedsAdapter(method)),
            (true, Some(a)) if a.method != method => {
                return Err(SettingsError::AdapterFor {
                    adapter: a.method,
                    method,
                });
            }
            (true, Some(a)) => match a.chunk_size {
                Some(trained) if (a.ratio, trained) != (ratio, chunk_size) => {
                    return Err(SettingsError::NotAsTrained {
                        trained_ratio: a.ratio,
                        trained_chunk_size: trained,
                        ratio,
                        chunk_size,
                    });
                }
                None if a.ratio != ratio => {
                    return Err(SettingsError::RatioNotAsTrained {
                        trained_ratio: a.ratio,
                        ratio,
                    });
                }
                _ => {}
            },
            (false, Some(_)) => return Err(SettingsError::TakesNoAdapter(method)),
            (false, None) if takes.keeps_all && ratio != 1 => {
                return Err(SettingsError::KeepsAll(method));
            }
            _ => {}
        }
        if request.sinks.is_some() && !takes.sinks {
            return Err(SettingsError::NoSinks(method));
        }
        let head_budget = match (takes.head_budget, request.head_budget) {
            (Some(default), asked) => asked.unwrap_or(default),
            (None, Some(_)) => return Err(SettingsError::NoHeadBudget(method)),
            (None, None) => HeadBudget::Shared,
        };
        Ok(Settings {
            method,
            ratio,
            chunk_size,
            sinks: request.sinks.unwrap_or(SINKS),
            head_budget,
        })
    }

    pub fn method(&self) -> &'static Method {
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
        self.method.takes.adapter
    }

    /// The strategy for a context of `len` tokens: a chunk longer than the
    /// context is the context (an adapter's chunk size stays as trained).
    /// `adapter` is the loaded adapter of [`Settings::resolve`]'s config;
    /// `repeat_prompt` is asked for by `kvzip` only.
    pub fn build<'a>(
        &self,
        adapter: Option<&'a Loaded>,
        repeat_prompt: impl Fn() -> Result<RepeatPrompt>,
        len: usize,
    ) -> Result<Box<dyn Strategy + 'a>> {
        (self.method.build)(&Parts {
            keep: Keep {
                ratio: self.ratio,
                chunk_size: self.chunk_size.min(len.max(1)),
                sinks: self.sinks,
            },
            head_budget: self.head_budget,
            adapter,
            repeat_prompt: &repeat_prompt,
        })
    }
}

/// The methods that take a head budget, for a message: "kvzip and snapkv".
pub fn head_budget_methods() -> String {
    let names: Vec<&str> = METHODS
        .iter()
        .filter(|m| m.takes.head_budget.is_some())
        .map(|m| m.name)
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{full, kvzip, sac, snapkv, streaming, uniform};

    #[test]
    fn defaults_and_refusals() {
        let full = Settings::resolve(&Request::new(&full::METHOD), None).unwrap();
        assert_eq!((full.ratio(), full.chunk_size()), (1, DEFAULT_CHUNK_SIZE));
        let kvzip = Settings::resolve(&Request::new(&kvzip::METHOD), None).unwrap();
        assert_eq!(kvzip.ratio(), DEFAULT_RATIO);
        assert_eq!(kvzip.head_budget, HeadBudget::Shared);
        let snapkv = Settings::resolve(&Request::new(&snapkv::METHOD), None).unwrap();
        assert_eq!(
            (snapkv.head_budget, snapkv.sinks),
            (HeadBudget::Even, SINKS)
        );
        let refused = |request: Request| Settings::resolve(&request, None).unwrap_err();
        assert_eq!(
            refused(Request::new(&sac::METHOD)),
            SettingsError::NeedsAdapter(&sac::METHOD)
        );
        assert_eq!(
            refused(Request {
                ratio: Some(4),
                ..Request::new(&full::METHOD)
            }),
            SettingsError::KeepsAll(&full::METHOD)
        );
        assert_eq!(
            refused(Request {
                sinks: Some(2),
                ..Request::new(&full::METHOD)
            }),
            SettingsError::NoSinks(&full::METHOD)
        );
        assert_eq!(
            refused(Request {
                head_budget: Some(HeadBudget::Even),
                ..Request::new(&streaming::METHOD)
            }),
            SettingsError::NoHeadBudget(&streaming::METHOD)
        );
        assert_eq!(
            SettingsError::NoHeadBudget(&streaming::METHOD).to_string(),
            "a head budget applies to kvzip and snapkv, not to streaming"
        );
        for method in METHODS {
            assert_eq!(Method::named(method.name), Some(*method));
        }
        assert_eq!(Method::named("gzip"), None);
        assert_eq!(
            refused(Request {
                ratio: Some(0),
                ..Request::new(&uniform::METHOD)
            }),
            SettingsError::NotPositive
        );
    }
}
