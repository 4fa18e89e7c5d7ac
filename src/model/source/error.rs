//! Why a model cannot be found or named.

use std::path::PathBuf;

use super::EXPECTED;

/// A model name that sac cannot resolve, or model files it cannot find.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "model `{0}` is neither a directory, a .gguf file nor a Hugging Face Hub id (owner/name)"
    )]
    Unknown(String),
    #[error("{0:?} is not a Hugging Face Hub id (owner/name)")]
    NotHubId(String),
    #[error("{0:?} is not a Hub revision (a branch, tag or commit)")]
    NotRevision(String),
    #[error("{0:?} is not a GGUF file name (a plain name ending in .gguf)")]
    NotGgufName(String),
    #[error("{0:?} is neither a Hugging Face Hub id nor a model directory")]
    NeitherHubIdNorDirectory(String),
    #[error("{} is a file but not a .gguf model; pass a .gguf file or a model directory", .0.display())]
    NotGgufFile(PathBuf),
    #[error(
        "model directory {} holds {} .gguf files ({}); pass the one to use",
        dir.display(),
        files.len(),
        files.join(", ")
    )]
    ManyGgufFiles { dir: PathBuf, files: Vec<String> },
    #[error("model directory {} has no `{name}` (a model directory holds {EXPECTED})", dir.display())]
    NoFile { dir: PathBuf, name: String },
    #[error(
        "`{}` of {} (revision {}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {}",
        .0.file, .0.id, .0.revision, .0.how()
    )]
    Offline(Box<HubFile>),
    #[error(
        "cannot get `{}` of {} (revision {}) from the Hugging Face Hub ({})",
        file.file, file.id, file.revision, file.how()
    )]
    Fetch {
        file: Box<HubFile>,
        #[source]
        source: hf_hub::api::sync::ApiError,
    },
    #[error("cannot set up the Hugging Face Hub client")]
    HubClient(#[source] hf_hub::api::sync::ApiError),
}

impl SourceError {
    /// What failed, in a few words (see [`Error::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Offline(_) | SourceError::Fetch { .. } | SourceError::NoFile { .. } => {
                "a file is missing"
            }
            SourceError::HubClient(_) => "the Hub client failed",
            _ => "not a model sac may load",
        }
    }
}

/// A file of a Hub repository, and the cache it is looked for in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub id: String,
    pub revision: String,
    pub file: String,
    pub cache: PathBuf,
}

impl HubFile {
    /// How a user gets the file by hand.
    fn how(&self) -> String {
        format!(
            "fetch it with `huggingface-cli download {} {} --revision {}` (the cache is {}) or \
             use a local model directory",
            self.id,
            self.file,
            self.revision,
            self.cache.display()
        )
    }
}
