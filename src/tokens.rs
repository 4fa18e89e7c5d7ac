//! Text to token ids and back, with the model's BOS and EOS ids.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{ModelConfig, ModelFiles};

/// A model's tokenizer plus the special ids that frame a prompt.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; BOS comes from `tokenizer_config.json`
    /// (`bos_token`), else `config.json`. EOS ids are the union of
    /// `config.json`, `generation_config.json` and `tokenizer_config.json`.
    pub fn load(files: &ModelFiles, config: &ModelConfig) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|e| {
            Error::Tokenizer(format!("cannot load {}: {e}", files.tokenizer.display()))
        })?;
        let tok_config = read_json(&files.tokenizer_config)?;
        let special = |key: &str| -> Option<u32> {
            let token = match tok_config.get(key)? {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            inner.token_to_id(token)
        };
        let bos = special("bos_token").or(config.bos_token_id);
        let mut eos = config.eos_token_ids.clone();
        if let Some(path) = &files.generation_config {
            match read_json(path)?.get("eos_token_id") {
                Some(Value::Number(n)) => eos.extend(n.as_u64().map(|n| n as u32)),
                Some(Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
        eos.extend(special("eos_token"));
        eos.sort_unstable();
        eos.dedup();
        Ok(TextTokenizer { inner, bos, eos })
    }

    /// Token ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode tokens: {e}")))
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("not JSON: {e}"),
    })
}
