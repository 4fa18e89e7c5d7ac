//! The header: everything a reader needs to know before touching a tensor.
//!
//! It is JSON so that it stays readable with any tool for years and so that
//! minor format versions can add fields that older readers skip. Nothing in it
//! grows with the document except what fits in a number; the kept positions
//! themselves are `u32` tensors in the directory, because a ragged per-head
//! layout over a long document holds millions of them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The whole header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SackHeader {
    /// Name and version of the program that wrote the file, e.g. `sac 0.1.0`.
    pub producer: String,
    /// Creation time, RFC 3339 in UTC, e.g. `2026-05-01T12:00:00Z`.
    pub created: String,
    /// The base model whose KV cache this is, and its dimensions.
    pub model: ModelInfo,
    /// The tokenizer the token counts and positions refer to.
    pub tokenizer: TokenizerInfo,
    /// How the kept tokens were chosen.
    pub compressor: CompressorInfo,
    /// The source document.
    pub document: DocumentInfo,
    /// How the kept positions are laid out and what the stored keys carry.
    pub kv: KvInfo,
    /// How a decoder places the document and the question (absent in files
    /// that need nothing beyond the defaults).
    #[serde(default)]
    pub decoder: DecoderInfo,
    /// Present when the file holds soft tokens (input embeddings the decoder
    /// reads in place of the document) instead of K/V. Since minor version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_tokens: Option<SoftTokensInfo>,
}

/// Soft tokens: `soft.s{S}` tensors of shape `[n, hidden]`, read as input
/// embeddings at positions `decoder.first_position`, `+1`, … in order of
/// segments; the question follows the last of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftTokensInfo {
    /// Width of each soft token: the model's hidden size.
    pub hidden: u32,
}

/// Where the document sits among the decoder's position ids, and what the
/// decoder reads between the document and the question.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecoderInfo {
    /// Position id of the document's first token: the token at index `i` (as
    /// the kept positions count) sits at position id `first_position + i`, and
    /// the question starts at `first_position + document.tokens`. SAC numbers
    /// positions from 1.
    #[serde(default)]
    pub first_position: u32,
    /// Learned input embeddings read just before the question, at the position
    /// ids right before its first one: SAC's `[LM]` token, at the document's
    /// last position. Each has the model's hidden size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_embeddings: Vec<Vec<f32>>,
    /// The text around the document and the question; absent for the `raw`
    /// layout. Since minor version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptInfo>,
    /// The adapter whose LoRA the decoder reads soft tokens and answers
    /// with (a GMSA adapter whose second stage fine-tuned the decoder). It
    /// names the adapter so that a reader can ask the user for it; a reader
    /// never loads an adapter on a file's word. Since minor version 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterRef>,
}

/// An adapter, by name and fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterRef {
    /// A name for people: the adapter directory's name when the file was made.
    pub id: String,
    /// The adapter's fingerprint (its weights and config, hashed as a
    /// model's files are); a reader refuses an adapter whose differs.
    pub fingerprint: String,
}

/// Longest adapter id or fingerprint a header may hold, in bytes.
pub const MAX_ADAPTER_NAME: usize = 4096;

/// How the document and a question were framed: the text before the
/// document (after BOS in the `raw` layout), between the document and the
/// question, and after the question, where the answer starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptInfo {
    /// `raw` or `chat`.
    pub format: String,
    pub before_document: String,
    pub before_question: String,
    pub after_question: String,
}

/// Longest text a [`PromptInfo`] member may hold, in bytes.
pub const MAX_PROMPT_TEXT: usize = 65536;

/// Most learned prefix embeddings a header may hold.
pub const MAX_PREFIX_EMBEDDINGS: usize = 16;
/// Largest hidden size a prefix embedding may have.
pub const MAX_HIDDEN: usize = 65536;

/// The base model. A reader must refuse to pair the file with a model whose
/// fingerprint differs: the KV values are meaningless for any other weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Hub id or local name, e.g. `meta-llama/Llama-3.2-1B-Instruct`.
    pub id: String,
    /// The Hub revision (branch, tag or commit) the model was fetched at,
    /// so that `ask` fetches the same one; absent for a local directory.
    /// Since minor version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The GGUF file within the Hub repository `id`, for a model that is one
    /// file of a repository of GGUF files. Since minor version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Fingerprint of the weights, e.g. `blake3:…`; opaque to this module.
    pub fingerprint: String,
    /// Number of transformer layers that have a KV cache.
    pub layers: u32,
    /// Number of key/value heads per layer (after grouped-query sharing).
    pub kv_heads: u32,
    /// Size of one key or value head vector.
    pub head_dim: u32,
}

/// The tokenizer; positions index its tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// Fingerprint of the tokenizer definition; opaque to this module.
    pub fingerprint: String,
}

/// The compressor that chose the kept tokens and produced their KV.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressorInfo {
    /// Method name, e.g. `sac` or `kvzip`.
    pub method: String,
    /// Nominal compression ratio: document tokens per kept token.
    pub ratio: f64,
    /// Tokens per compressor chunk.
    pub chunk_size: u32,
    /// Fingerprint of the compressor adapter weights, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_fingerprint: Option<String>,
}

/// Facts about the source document, so a reader can tell which text a file
/// summarises without having it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentInfo {
    /// Number of tokens of the document under the tokenizer.
    pub tokens: u64,
    /// Number of bytes of the document text.
    pub bytes: u64,
    /// SHA-256 of the document text, 64 lowercase hex digits.
    pub sha256: String,
    /// A name for the document, e.g. its file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl DocumentInfo {
    /// Describes `text` (hashing it) for a document of `tokens` tokens.
    pub fn of_text(text: &[u8], tokens: u64, name: Option<String>) -> Self {
        let digest = Sha256::digest(text);
        let sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            tokens,
            bytes: text.len() as u64,
            sha256,
            name,
        }
    }
}

/// How kept positions and keys are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvInfo {
    /// Whether all layers and heads share one kept set, or each layer, or each
    /// (layer, head) has its own.
    pub layout: KeptLayout,
    /// Whether the stored keys have RoPE applied, and at which positions.
    pub key_rope: KeyRope,
}

/// Which tokens are kept can differ per layer and per head (training-free
/// selectors such as KVzip keep different tokens and counts per head), so the
/// layout says how many kept sets there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeptLayout {
    /// One kept set for the whole model; keys and values are `[kv_heads, n, head_dim]`.
    Shared,
    /// One kept set per layer; keys and values are `[kv_heads, n, head_dim]`.
    PerLayer,
    /// One kept set per (layer, KV head); keys and values are `[n, head_dim]`.
    PerHead,
}

/// What rotary position embedding the stored keys carry. Storing keys before
/// RoPE lets a reader place the kept tokens at other positions (e.g. packed
/// next to the question) by rotating them itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRope {
    /// Keys are stored before RoPE; the kept positions say where each token
    /// was in the document.
    None,
    /// RoPE was applied at each token's kept position (its index in the document).
    Kept,
    /// RoPE was applied at 0, 1, 2, … in order of the kept set (all segments
    /// concatenated), i.e. as if the kept tokens were a contiguous prefix.
    Sequential,
}

/// Sanity limits on the model dimensions: far above any real model, low enough
/// that products of them cannot overflow `u64` or describe absurd tensors.
pub const MAX_LAYERS: u32 = 1024;
/// See [`MAX_LAYERS`].
pub const MAX_KV_HEADS: u32 = 1024;
/// See [`MAX_LAYERS`].
pub const MAX_HEAD_DIM: u32 = 16384;
/// Positions are stored as `u32`, so a document can have at most this many tokens.
pub const MAX_TOKENS: u64 = 1 << 32;

impl SackHeader {
    /// The lowest format minor version whose members this header uses.
    pub fn minor_version(&self) -> u16 {
        if self.decoder.adapter.is_some() {
            4
        } else if self.soft_tokens.is_some() {
            3
        } else if self.decoder.prompt.is_some() || self.model.file.is_some() {
            2
        } else if self.model.revision.is_some() {
            1
        } else {
            0
        }
    }

    /// Checks the rules the JSON schema alone cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let m = &self.model;
        for (what, value, max) in [
            ("model.layers", m.layers, MAX_LAYERS),
            ("model.kv_heads", m.kv_heads, MAX_KV_HEADS),
            ("model.head_dim", m.head_dim, MAX_HEAD_DIM),
        ] {
            if value == 0 || value > max {
                return Err(format!("header {what} = {value} is outside 1..={max}"));
            }
        }
        if self.document.tokens > MAX_TOKENS {
            return Err(format!(
                "header document.tokens = {} exceeds {MAX_TOKENS}",
                self.document.tokens
            ));
        }
        let sha = &self.document.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("header document.sha256 is not 64 lowercase hex digits".into());
        }
        let c = &self.compressor;
        if !(c.ratio.is_finite() && c.ratio > 0.0) {
            return Err(format!(
                "header compressor.ratio = {} is not a positive number",
                c.ratio
            ));
        }
        if c.chunk_size == 0 {
            return Err("header compressor.chunk_size is 0".into());
        }
        let prefix = &self.decoder.prefix_embeddings;
        if prefix.len() > MAX_PREFIX_EMBEDDINGS {
            return Err(format!(
                "header decoder.prefix_embeddings has {} entries, at most {MAX_PREFIX_EMBEDDINGS} allowed",
                prefix.len()
            ));
        }
        if let Some(first) = prefix.first() {
            let width = first.len();
            if width == 0 || width > MAX_HIDDEN || prefix.iter().any(|e| e.len() != width) {
                return Err(
                    "header decoder.prefix_embeddings are not all of one width in 1..=65536".into(),
                );
            }
            if prefix.iter().flatten().any(|x| !x.is_finite()) {
                return Err("header decoder.prefix_embeddings hold a non-finite number".into());
            }
        }
        if u64::from(self.decoder.first_position) + self.document.tokens > u64::from(u32::MAX) {
            return Err("header decoder.first_position + document.tokens exceeds 2^32 - 1".into());
        }
        if (prefix.len() as u64) > u64::from(self.decoder.first_position) + self.document.tokens {
            return Err("header decoder.prefix_embeddings would sit before position 0".into());
        }
        if let Some(soft) = &self.soft_tokens {
            if soft.hidden == 0 || soft.hidden as usize > MAX_HIDDEN {
                return Err(format!(
                    "header soft_tokens.hidden = {} is outside 1..={MAX_HIDDEN}",
                    soft.hidden
                ));
            }
            if !prefix.is_empty() {
                return Err(
                    "header decoder.prefix_embeddings come with K/V, not soft tokens".into(),
                );
            }
        }
        if let Some(adapter) = &self.decoder.adapter {
            if self.soft_tokens.is_none() {
                return Err("header decoder.adapter comes with soft tokens, not K/V".into());
            }
            if adapter.fingerprint.is_empty()
                || adapter.fingerprint.len() > MAX_ADAPTER_NAME
                || adapter.id.len() > MAX_ADAPTER_NAME
            {
                return Err(format!(
                    "header decoder.adapter needs a fingerprint, and an id and fingerprint of \
                     at most {MAX_ADAPTER_NAME} bytes"
                ));
            }
        }
        if let Some(prompt) = &self.decoder.prompt {
            if !matches!(prompt.format.as_str(), "raw" | "chat") {
                return Err(format!(
                    "header decoder.prompt.format = {:?} is neither \"raw\" nor \"chat\"",
                    prompt.format
                ));
            }
            let texts = [
                &prompt.before_document,
                &prompt.before_question,
                &prompt.after_question,
            ];
            if texts.iter().any(|t| t.len() > MAX_PROMPT_TEXT) {
                return Err(format!(
                    "header decoder.prompt holds a text over {MAX_PROMPT_TEXT} bytes"
                ));
            }
        }
        chrono::DateTime::parse_from_rfc3339(&self.created).map_err(|e| {
            format!(
                "header created = {:?} is not an RFC 3339 time: {e}",
                self.created
            )
        })?;
        Ok(())
    }

    /// Bytes of the full, uncompressed KV cache of the document in bf16:
    /// tokens × layers × 2 (K and V) × kv_heads × head_dim × 2 bytes. This is
    /// what the file replaces, so it is the baseline of the compression ratio.
    /// Saturates instead of overflowing on absurd (hostile) dimensions.
    pub fn full_bf16_kv_bytes(&self) -> u64 {
        let m = &self.model;
        [
            u64::from(m.layers),
            2,
            u64::from(m.kv_heads),
            u64::from(m.head_dim),
            2,
        ]
        .into_iter()
        .fold(self.document.tokens, u64::saturating_mul)
    }
}

/// The current time in the header's `created` format.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid header for tests: Llama-3.2-1B dimensions unless changed.
    pub(crate) fn sample(layout: KeptLayout) -> SackHeader {
        SackHeader {
            producer: "sac test".into(),
            created: "2026-05-01T12:00:00Z".into(),
            model: ModelInfo {
                id: "meta-llama/Llama-3.2-1B".into(),
                revision: None,
                file: None,
                fingerprint: "blake3:00".into(),
                layers: 16,
                kv_heads: 8,
                head_dim: 64,
            },
            tokenizer: TokenizerInfo {
                fingerprint: "blake3:11".into(),
            },
            compressor: CompressorInfo {
                method: "sac".into(),
                ratio: 4.0,
                chunk_size: 512,
                adapter_fingerprint: None,
            },
            document: DocumentInfo::of_text(b"hello", 4000, Some("hello.txt".into())),
            decoder: DecoderInfo::default(),
            soft_tokens: None,
            kv: KvInfo {
                layout,
                key_rope: KeyRope::Kept,
            },
        }
    }

    #[test]
    fn sample_is_valid_and_round_trips_through_json() {
        let h = sample(KeptLayout::PerHead);
        h.validate().unwrap();
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains(r#""layout":"per_head""#), "{json}");
        assert_eq!(serde_json::from_str::<SackHeader>(&json).unwrap(), h);
    }

    #[test]
    fn a_hub_revision_round_trips_and_needs_minor_version_1() {
        let mut h = sample(KeptLayout::Shared);
        assert!(!serde_json::to_string(&h).unwrap().contains("revision"));
        assert_eq!(h.minor_version(), 0);
        h.model.revision = Some("v1.2".into());
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains(r#""revision":"v1.2""#), "{json}");
        assert_eq!(serde_json::from_str::<SackHeader>(&json).unwrap(), h);
        assert_eq!(h.minor_version(), 1);
    }

    #[test]
    fn a_prompt_round_trips_needs_minor_version_2_and_is_checked() {
        let mut h = sample(KeptLayout::Shared);
        h.decoder.prompt = Some(PromptInfo {
            format: "chat".into(),
            before_document: "<|im_start|>user\n".into(),
            before_question: "\n\nQuestion: ".into(),
            after_question: "<|im_end|>\n<|im_start|>assistant\n".into(),
        });
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<SackHeader>(&json).unwrap(), h);
        assert_eq!(h.minor_version(), 2);
        assert!(h.validate().is_ok());
        let mut odd = h.clone();
        odd.decoder.prompt.as_mut().unwrap().format = "jinja".into();
        assert!(odd.validate().unwrap_err().contains("neither"));
        let mut long = h.clone();
        long.decoder.prompt.as_mut().unwrap().after_question = "x".repeat(MAX_PROMPT_TEXT + 1);
        assert!(long.validate().unwrap_err().contains("over"));
    }

    #[test]
    fn a_decoder_adapter_needs_soft_tokens_and_minor_version_4() {
        let mut h = sample(KeptLayout::Shared);
        h.soft_tokens = Some(SoftTokensInfo { hidden: 64 });
        h.decoder.adapter = Some(AdapterRef {
            id: "gmsa-4".into(),
            fingerprint: "blake3:0123".into(),
        });
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<SackHeader>(&json).unwrap(), h);
        assert_eq!(h.minor_version(), 4);
        h.validate().unwrap();
        let mut kv = h.clone();
        kv.soft_tokens = None;
        assert!(kv.validate().unwrap_err().contains("not K/V"));
        let mut nameless = h.clone();
        nameless.decoder.adapter.as_mut().unwrap().fingerprint = String::new();
        assert!(nameless.validate().is_err());
        let mut long = h;
        long.decoder.adapter.as_mut().unwrap().id = "x".repeat(MAX_ADAPTER_NAME + 1);
        assert!(long.validate().is_err());
    }

    #[test]
    fn unknown_fields_from_newer_minor_versions_are_ignored() {
        let mut v = serde_json::to_value(sample(KeptLayout::Shared)).unwrap();
        v["model"]["rope_theta"] = 500000.0.into();
        v["future"] = "x".into();
        serde_json::from_value::<SackHeader>(v).unwrap();
    }

    #[test]
    fn sha256_of_text_matches_the_known_digest() {
        let d = DocumentInfo::of_text(b"abc", 1, None);
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.bytes, 3);
    }

    #[test]
    fn validation_rejects_out_of_range_values() {
        let cases: [fn(&mut SackHeader); 7] = [
            |h| h.model.layers = 0,
            |h| h.model.kv_heads = MAX_KV_HEADS + 1,
            |h| h.document.tokens = MAX_TOKENS + 1,
            |h| h.document.sha256 = "ABC".into(),
            |h| h.compressor.ratio = f64::NAN,
            |h| h.compressor.chunk_size = 0,
            |h| h.created = "yesterday".into(),
        ];
        for (i, break_it) in cases.iter().enumerate() {
            let mut h = sample(KeptLayout::Shared);
            break_it(&mut h);
            assert!(h.validate().is_err(), "case {i} accepted");
        }
    }

    #[test]
    fn now_is_a_valid_created_time() {
        let mut h = sample(KeptLayout::Shared);
        h.created = now_rfc3339();
        assert!(h.created.ends_with('Z'), "{}", h.created);
        h.validate().unwrap();
    }

    #[test]
    fn full_bf16_kv_bytes_follows_the_formula() {
        let h = sample(KeptLayout::Shared);
        assert_eq!(h.full_bf16_kv_bytes(), 4000 * 16 * 2 * 8 * 64 * 2);
    }
}
