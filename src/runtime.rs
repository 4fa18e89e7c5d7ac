//! A model ready to use: resolved files, config, weights, tokenizer and
//! fingerprints, loaded once per command.

use std::path::Path;

use candle_core::Device;

use crate::device::{DTypeSpec, DeviceSpec, Workload};
use crate::error::Result;
use crate::fingerprint::{DigestCache, ModelFingerprint, fingerprint};
use crate::model::gguf::GgufModel;
use crate::model::known::{KnownModels, NamedModel, Trusted};
use crate::model::{self, Decoder, Layout, ModelConfig, ModelFiles, source};
use crate::tokens::TextTokenizer;

/// What names a model and where it runs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A local directory or a Hub id.
    pub model: String,
    pub revision: Option<String>,
    /// The GGUF file in the Hub repository `model`.
    pub gguf_file: Option<String>,
    pub device: DeviceSpec,
    pub dtype: DTypeSpec,
    pub workload: Workload,
}

#[derive(Debug)]
pub struct LoadedModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    pub fingerprint: ModelFingerprint,
}

/// A model's files and fingerprints, found but not yet read as a model.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub files: ModelFiles,
    pub fingerprint: ModelFingerprint,
}

impl ResolvedModel {
    /// The model the user named: a directory, or a Hub id (which may be
    /// downloaded). A directory is noted in [`KnownModels`], so that a .sack
    /// made with it can find it again.
    pub fn named(spec: &ModelSpec) -> Result<Self> {
        let files = source::resolve(
            &spec.model,
            spec.revision.as_deref(),
            spec.gguf_file.as_deref(),
        )?;
        let resolved = Self::from_files(files)?;
        if resolved.files.revision.is_none() {
            KnownModels::open_default()
                .remember(&resolved.fingerprint, Path::new(&resolved.files.id));
        }
        Ok(resolved)
    }

    /// The model a .sack header names, from where `trusted` allows only.
    pub fn for_sack(named: NamedModel, trusted: &Trusted) -> Result<Self> {
        Self::from_files(trusted.resolve(named)?)
    }

    fn from_files(files: ModelFiles) -> Result<Self> {
        let fingerprint = fingerprint(&files, &mut DigestCache::open_default())?;
        Ok(Self { files, fingerprint })
    }

    /// Reads the config, tokenizer and weights, placed on `device` in
    /// `dtype` for `workload`, by the loader of the files' layout.
    pub fn load(
        self,
        device: DeviceSpec,
        dtype: DTypeSpec,
        workload: Workload,
    ) -> Result<LoadedModel> {
        let files = self.files;
        let device: Device = device.open()?;
        let precision = dtype.resolve(&device, workload);
        let dtype = precision.dtype;
        let (config, tokenizer, decoder) = match &files.layout {
            Layout::Hf(hf) => {
                let config = ModelConfig::from_file(&hf.config)?;
                let tokenizer = TextTokenizer::load(hf, &config)?;
                let decoder = model::load_decoder(
                    hf,
                    config.clone(),
                    &device,
                    dtype,
                    precision.bf16_weights,
                )?;
                (config, tokenizer, decoder)
            }
            Layout::Gguf(path) => {
                let gguf = GgufModel::open(path)?;
                let config = gguf.config()?;
                let tokenizer = gguf.tokenizer()?;
                let decoder =
                    gguf.decoder(config.clone(), &device, dtype, precision.bf16_weights)?;
                (config, tokenizer, decoder)
            }
        };
        Ok(LoadedModel {
            files,
            config,
            decoder,
            tokenizer,
            fingerprint: self.fingerprint,
        })
    }
}

impl LoadedModel {
    /// Loads the model the user named in `spec` ([`ResolvedModel::named`]).
    pub fn load(spec: &ModelSpec) -> Result<Self> {
        ResolvedModel::named(spec)?.load(spec.device, spec.dtype, spec.workload)
    }
}
