//! Text to token ids and back, with the model's BOS and EOS ids.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::gguf::GgufTokenizerError;

/// A tokenizer that cannot be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: cannot load {}", path.display())]
    Load {
        path: std::path::PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizer: {}", path.display())]
    Gguf {
        path: std::path::PathBuf,
        #[source]
        problem: GgufTokenizerError,
    },
    #[error("tokenizer: cannot encode text")]
    Encode(#[source] tokenizers::Error),
    #[error("tokenizer: cannot decode tokens")]
    Decode(#[source] tokenizers::Error),
    #[error("tokenizer: the model names no EOS token to end answers with")]
    NoEos,
}
use crate::layout::prompt::{ChatTemplate, PromptLayout};
use crate::model::ModelConfig;
use crate::model::config::ConfigError;
use crate::model::source::HfFiles;

/// A model's tokenizer plus the special ids that frame a prompt, and its
/// chat template if it has one.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; BOS comes from `tokenizer_config.json`
    /// (`bos_token`), else `config.json`. EOS ids are the union of
    /// `config.json`, `generation_config.json` and `tokenizer_config.json`.
    pub fn load(files: &HfFiles, config: &ModelConfig) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|source| {
            TokenizerError::Load {
                path: files.tokenizer.clone(),
                source,
            }
        })?;
        let tok_config = read_json(&files.tokenizer_config)?;
        // A special token is written as its text or as `{"content": text}`.
        let token = |key: &str| -> Option<&str> {
            match tok_config.get(key)? {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("content")?.as_str(),
                _ => None,
            }
        };
        let special = |key: &str| inner.token_to_id(token(key)?);
        // tokenizer_config.json decides: `add_bos_token: false` or an explicit
        // `bos_token: null` (Qwen) means no BOS, whatever config.json says.
        let bos = match (tok_config.get("add_bos_token"), tok_config.get("bos_token")) {
            (Some(Value::Bool(false)), _) | (_, Some(Value::Null)) => None,
            (_, Some(_)) => special("bos_token"),
            (_, None) => config.bos_token_id,
        };
        let mut eos = config.eos_token_ids.clone();
        if let Some(path) = &files.generation_config {
            let ids = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
            match read_json(path)?.get("eos_token_id") {
                Some(Value::Array(a)) => eos.extend(a.iter().filter_map(ids)),
                Some(v) => eos.extend(ids(v)),
                None => {}
            }
        }
        eos.extend(special("eos_token"));
        let template = chat_template_of(&tok_config).map(|source| ChatTemplate {
            source,
            bos_token: token("bos_token").unwrap_or_default().to_string(),
            eos_token: token("eos_token").unwrap_or_default().to_string(),
        });
        Ok(Self::new(inner, bos, eos).with_chat_template(template))
    }

    /// A tokenizer with its BOS id (if prompts start with one) and EOS ids.
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, mut eos: Vec<u32>) -> Self {
        eos.sort_unstable();
        eos.dedup();
        TextTokenizer {
            inner,
            bos,
            eos,
            chat_template: None,
        }
    }

    /// Adds the model's chat template; the token that ends its turns (if the
    /// template prints one the vocabulary knows) becomes an EOS id too. A
    /// template that does not render is kept, to be refused where the chat
    /// layout is asked for.
    pub fn with_chat_template(mut self, template: Option<ChatTemplate>) -> Self {
        let end = template
            .as_ref()
            .and_then(|t| t.end_of_turn().ok().flatten());
        // Only a special token: an ordinary word after the answer is no end.
        let special = |id: &u32| self.inner.decode(&[*id], true).is_ok_and(|t| t.is_empty());
        let id = end
            .and_then(|end| self.inner.token_to_id(&end))
            .filter(special);
        if let Some(id) = id
            && !self.eos.contains(&id)
        {
            self.eos.push(id);
            self.eos.sort_unstable();
        }
        self.chat_template = template;
        self
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Token ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The context in the raw layout ([`PromptLayout::context_ids`]).
    pub fn context_ids(&self, text: &str) -> Result<Vec<u32>> {
        PromptLayout::raw().context_ids(self, text)
    }

    /// The question in the raw layout ([`PromptLayout::question_ids`]).
    pub fn question_ids(&self, question: &str) -> Result<Vec<u32>> {
        PromptLayout::raw().question_ids(self, question)
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e).into())
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> &[u32] {
        &self.eos
    }
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of
/// named templates of which the one named `default` is taken.
fn chat_template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    serde_json::from_str(&text).map_err(|e| ConfigError::NotJson(e).at(path))
}

/// Strings that end an answer where they appear; the answer is the text
/// before the first of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStrings(Vec<String>);

impl StopStrings {
    /// Empty strings are left out: they would end every answer at once.
    pub fn new(strings: impl IntoIterator<Item = String>) -> Self {
        StopStrings(strings.into_iter().filter(|s| !s.is_empty()).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where `text` ends: the start of the first stop string in it, if any.
    pub fn cut(&self, text: &str) -> Option<usize> {
        self.0.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// How much of `text`, which goes on, can be shown now: up to a stop
    /// string, and short of any tail that may grow into one.
    pub fn shown(&self, text: &str) -> usize {
        if let Some(cut) = self.cut(text) {
            return cut;
        }
        let held = self
            .0
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(|n| &s[..n])
            })
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        text.len() - held
    }
}

/// Turns generated ids into text pieces as soon as they decode to whole
/// characters, so answers can stream without splitting a UTF-8 sequence.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    stops: &'a StopStrings,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    /// A stream that ends its text before the first of `stops`.
    pub fn new(tokenizer: &'a TextTokenizer, stops: &'a StopStrings) -> Self {
        TextStream {
            tokenizer,
            stops,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one id; returns the new text, if any is complete (and cannot be
    /// the start of a stop string).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{fffd}') {
            return Ok(None);
        }
        let end = self.stops.shown(&text);
        Ok(self.emit(&text, end))
    }

    /// Text still held back at the end (an incomplete character, or what
    /// looked like the start of a stop string), once generation is over.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids)?;
        let end = self.stops.cut(&text).unwrap_or(text.len());
        Ok(self.emit(&text, end))
    }

    fn emit(&mut self, text: &str, end: usize) -> Option<String> {
        if end <= self.emitted
            || !text.is_char_boundary(self.emitted)
            || !text.is_char_boundary(end)
        {
            return None;
        }
        let piece = text[self.emitted..end].to_string();
        self.emitted = end;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

    /// A byte-level BPE tokenizer trained here on a few sentences.
    fn trained() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(
            &corpus,
            "the cat sat on the mat. héllo wörld, naïve café. ".repeat(20),
        )
        .unwrap();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(300)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![
                AddedToken::from("<s>", true),
                AddedToken::from("</s>", true),
            ])
            .build();
        let mut tokenizer: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            ByteLevel,
            PostProcessorWrapper,
            ByteLevel,
        > = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .unwrap();
        tokenizer
            .train_from_files(&mut trainer, vec![corpus.to_string_lossy().into()])
            .unwrap();
        let inner: tokenizers::Tokenizer = tokenizer.into();
        let bos = inner.token_to_id("<s>");
        let eos = inner.token_to_id("</s>").into_iter().collect();
        TextTokenizer::new(inner, bos, eos)
    }

    #[test]
    fn context_starts_with_bos_and_prefix() {
        let tok = trained();
        let ids = tok.context_ids("the cat").unwrap();
        assert_eq!(ids[0], tok.bos().unwrap());
        assert_eq!(tok.decode(&ids).unwrap(), "### Context:\nthe cat");
        let q = tok.question_ids("why?").unwrap();
        assert_eq!(
            tok.decode(&q).unwrap(),
            "\n### Question:\nwhy?\n### Answer:\n"
        );
    }

    /// `load` with this tokenizer and the given tokenizer_config.json.
    fn load_with(tokenizer_config: &str, bos_token_id: Option<u32>) -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        trained().inner.save(path("tokenizer.json"), false).unwrap();
        std::fs::write(path("tokenizer_config.json"), tokenizer_config).unwrap();
        let files = HfFiles {
            config: path("config.json"),
            tokenizer: path("tokenizer.json"),
            tokenizer_config: path("tokenizer_config.json"),
            generation_config: None,
            weights: Vec::new(),
        };
        let config = ModelConfig::from_json(&format!(
            r#"{{"model_type": "qwen2", "vocab_size": 300, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 1, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 64, "bos_token_id": {}}}"#,
            bos_token_id.map_or("null".into(), |b| b.to_string())
        ))
        .unwrap();
        TextTokenizer::load(&files, &config).unwrap()
    }

    #[test]
    fn bos_follows_the_tokenizer_config() {
        let s = trained().bos();
        assert_eq!(load_with(r#"{"bos_token": "<s>"}"#, Some(7)).bos(), s);
        // Qwen: no BOS token, although config.json names one.
        assert_eq!(load_with(r#"{"bos_token": null}"#, Some(7)).bos(), None);
        assert_eq!(
            load_with(r#"{"bos_token": "<s>", "add_bos_token": false}"#, None).bos(),
            None
        );
        assert_eq!(load_with("{}", Some(7)).bos(), Some(7));
    }

    #[test]
    fn stream_never_splits_characters() {
        let tok = trained();
        let text = "naïve café wörld";
        let none = StopStrings::default();
        let mut stream = TextStream::new(&tok, &none);
        let mut out = String::new();
        for id in tok.encode(text).unwrap() {
            if let Some(piece) = stream.push(id).unwrap() {
                out.push_str(&piece);
            }
        }
        assert_eq!(stream.finish().unwrap(), None);
        assert_eq!(out, text);
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_what_may_start_one() {
        let stops = StopStrings::new(["\n###".to_string(), "END".into(), String::new()]);
        assert_eq!(stops.cut("a\n### b END"), Some(1));
        assert_eq!(stops.cut("no stop"), None);
        assert_eq!(stops.shown("answer\n#"), 6);
        assert_eq!(stops.shown("answer E"), 7);
        assert_eq!(stops.shown("answer"), 6);
        assert!(StopStrings::new([String::new()]).is_empty());

        let tok = trained();
        let mut stream = TextStream::new(&tok, &stops);
        let mut out = String::new();
        for id in tok.encode("the cat\n### sat").unwrap() {
            out.push_str(&stream.push(id).unwrap().unwrap_or_default());
        }
        out.push_str(&stream.finish().unwrap().unwrap_or_default());
        assert_eq!(out, "the cat");
    }
}
