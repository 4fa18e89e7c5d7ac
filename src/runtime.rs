//! A model ready to use: resolved files, config, weights, tokenizer and
//! fingerprints, loaded once per command.

use candle_core::Device;

use crate::device::{DTypeSpec, DeviceSpec};
use crate::error::Result;
use crate::fingerprint::{DigestCache, ModelFingerprint, fingerprint};
use crate::model::{self, Decoder, ModelConfig, ModelFiles, source};
use crate::tokens::TextTokenizer;

/// What names a model and where it runs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A local directory or a Hub id.
    pub model: String,
    pub revision: Option<String>,
    pub device: DeviceSpec,
    pub dtype: DTypeSpec,
}

#[derive(Debug)]
pub struct LoadedModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    pub fingerprint: ModelFingerprint,
}

impl LoadedModel {
    pub fn load(spec: &ModelSpec) -> Result<Self> {
        let files = source::resolve(&spec.model, spec.revision.as_deref())?;
        let config = ModelConfig::from_file(&files.config)?;
        let tokenizer = TextTokenizer::load(&files, &config)?;
        let device: Device = spec.device.open()?;
        let dtype = spec.dtype.resolve(&device);
        let decoder = model::load_decoder(&files, config.clone(), &device, dtype)?;
        let fingerprint = fingerprint(&files, &mut DigestCache::open_default())?;
        Ok(LoadedModel {
            files,
            config,
            decoder,
            tokenizer,
            fingerprint,
        })
    }
}
