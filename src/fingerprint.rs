//! Fingerprints: digests that name the exact weights and tokenizer a .sack was
//! made with, so that `ask` can refuse a mismatched model. Two fine-tunes of the
//! same shape differ in content, hence in fingerprint (llama.cpp's session files,
//! which check only shapes, cannot tell them apart).
//!
//! A file's digest is the SHA-256 of its bytes. SHA-256 is what the Hugging Face
//! Hub names its large-file blobs by, so for a file resolved into a Hub cache
//! `blobs/<sha256>` the digest is read off the name, at no cost, and a local
//! copy of the same file hashes to the same value. Other files are hashed once
//! and remembered in a cache keyed by path, size and modification time.
//!
//! The model fingerprint is `sha256:` + the SHA-256 of the text
//! `sac-model-v1\n` followed by one line `<role> <size> <file sha256>\n` for
//! `config.json` (role `config`) and then each weight file in load order (role
//! `weights`). The tokenizer fingerprint hashes `sac-tokenizer-v1\n` and the lines
//! of `tokenizer.json` and `tokenizer_config.json` the same way. File names do
//! not enter, so a renamed or moved copy keeps its fingerprint. A GGUF file's
//! model fingerprint is `sha256:` + the file's own SHA-256, its tokenizer's the
//! manifest of that one file (role `gguf`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::source::{Layout, ModelFiles};

/// The fingerprints of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// Weights and `config.json`.
    pub model: String,
    /// `tokenizer.json` and `tokenizer_config.json`.
    pub tokenizer: String,
}

/// Computes both fingerprints of `files`, using and updating `cache`.
pub fn fingerprint(files: &ModelFiles, cache: &mut DigestCache) -> Result<ModelFingerprint> {
    let result = match &files.layout {
        Layout::Hf(hf) => {
            let mut model = vec![("config", hf.config.as_path())];
            model.extend(hf.weights.iter().map(|w| ("weights", w.as_path())));
            let tokenizer = [
                ("tokenizer", hf.tokenizer.as_path()),
                ("tokenizer_config", hf.tokenizer_config.as_path()),
            ];
            ModelFingerprint {
                model: manifest_digest("sac-model-v1", &model, cache)?,
                tokenizer: manifest_digest("sac-tokenizer-v1", &tokenizer, cache)?,
            }
        }
        // One file holds both: the model is the file's own SHA-256, and the
        // tokenizer a manifest over it.
        Layout::Gguf(file) => ModelFingerprint {
            model: format!("sha256:{}", cache.file_digest(file)?.1),
            tokenizer: manifest_digest("sac-tokenizer-v1", &[("gguf", file.as_path())], cache)?,
        },
    };
    cache.save();
    Ok(result)
}

/// `sha256:` + SHA-256 of `tag\n` and one `<role> <size> <sha256>\n` line per file.
pub(crate) fn manifest_digest(
    tag: &str,
    files: &[(&str, &Path)],
    cache: &mut DigestCache,
) -> Result<String> {
    let mut manifest = format!("{tag}\n");
    for (role, path) in files {
        let (size, digest) = cache.file_digest(path)?;
        manifest.push_str(&format!("{role} {size} {digest}\n"));
    }
    Ok(format!(
        "sha256:{}",
        hex(&Sha256::digest(manifest.as_bytes()))
    ))
}

/// Lowercase hexadecimal of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedDigest {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// sac's own cache directory: `$SAC_CACHE_DIR`, else the platform cache
/// directory + `sac`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("SAC_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("sac")))
}

/// Remembered file digests, stored as JSON in the user's cache directory
/// (`$SAC_CACHE_DIR`, else the platform cache dir + `sac`).
#[derive(Debug, Default)]
pub struct DigestCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, CachedDigest>,
    dirty: bool,
}

impl DigestCache {
    /// The user's cache; an unreadable or corrupt cache file starts empty.
    pub fn open_default() -> Self {
        match cache_dir() {
            Some(dir) => Self::open(dir.join("file-digests.json")),
            None => Self::default(),
        }
    }

    /// The cache stored in `path`.
    pub fn open(path: PathBuf) -> Self {
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        DigestCache {
            path: Some(path),
            entries,
            dirty: false,
        }
    }

    /// `(size, sha256 hex)` of the file at `path`.
    pub fn file_digest(&mut self, path: &Path) -> Result<(u64, String)> {
        let real = path
            .canonicalize()
            .map_err(|e| Error::io("cannot open", path, e))?;
        let meta = real
            .metadata()
            .map_err(|e| Error::io("cannot stat", &real, e))?;
        if let Some(sha) = hub_blob_sha256(&real) {
            return Ok((meta.len(), sha));
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let key = real.to_string_lossy().into_owned();
        if let Some(hit) = self.entries.get(&key)
            && hit.size == meta.len()
            && hit.mtime_ns == mtime_ns
        {
            return Ok((hit.size, hit.sha256.clone()));
        }
        let sha256 = sha256_file(&real)?;
        self.entries.insert(
            key,
            CachedDigest {
                size: meta.len(),
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        self.dirty = true;
        Ok((meta.len(), sha256))
    }

    /// Writes the cache back if it changed. A cache that cannot be written is
    /// only a lost speed-up, so failures are ignored.
    pub fn save(&mut self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        let write = || -> std::io::Result<()> {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            tmp.write_all(&serde_json::to_vec(&self.entries)?)?;
            tmp.persist(path)?;
            Ok(())
        };
        if write().is_ok() {
            self.dirty = false;
        }
    }
}

/// The SHA-256 a Hub cache blob is named by (`.../blobs/<64 hex>`).
fn hub_blob_sha256(real: &Path) -> Option<String> {
    let name = real.file_name()?.to_str()?;
    let parent = real.parent()?.file_name()?;
    (parent == "blobs" && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::source::HfFiles;

    fn model_dir(weights: &[u8]) -> (tempfile::TempDir, ModelFiles) {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("config.json"), "{}").unwrap();
        std::fs::write(p("tokenizer.json"), "{\"tok\": 1}").unwrap();
        std::fs::write(p("tokenizer_config.json"), "{}").unwrap();
        std::fs::write(p("model.safetensors"), weights).unwrap();
        let files = ModelFiles {
            id: "x".into(),
            revision: None,
            layout: Layout::Hf(HfFiles {
                config: p("config.json"),
                tokenizer: p("tokenizer.json"),
                tokenizer_config: p("tokenizer_config.json"),
                generation_config: None,
                weights: vec![p("model.safetensors")],
            }),
        };
        (dir, files)
    }

    #[test]
    fn same_shape_different_weights_differ() {
        let cache_dir = tempfile::tempdir().unwrap();
        let mut cache = DigestCache::open(cache_dir.path().join("c.json"));
        let (_a, fa) = model_dir(&[1, 2, 3, 4]);
        let (_b, fb) = model_dir(&[1, 2, 3, 5]);
        let a = fingerprint(&fa, &mut cache).unwrap();
        let b = fingerprint(&fb, &mut cache).unwrap();
        assert_ne!(a.model, b.model);
        assert_eq!(a.tokenizer, b.tokenizer);
        assert!(a.model.starts_with("sha256:") && a.model.len() == 7 + 64);
    }

    #[test]
    fn cache_is_reused_and_invalidated_by_size() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache_path = cache_dir.path().join("c.json");
        let (_a, files) = model_dir(&[9; 100]);
        let first = fingerprint(&files, &mut DigestCache::open(cache_path.clone())).unwrap();
        assert!(cache_path.is_file());
        let mut reopened = DigestCache::open(cache_path.clone());
        assert_eq!(fingerprint(&files, &mut reopened).unwrap(), first);
        assert!(!reopened.dirty, "a warm cache hashes nothing");
        std::fs::write(files.weight_files()[0], [9; 101]).unwrap();
        let changed = fingerprint(&files, &mut DigestCache::open(cache_path)).unwrap();
        assert_ne!(changed.model, first.model);
    }

    #[test]
    fn hub_blob_names_are_digests() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "ab".repeat(32);
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join(&sha), b"not hashed").unwrap();
        let mut cache = DigestCache::default();
        assert_eq!(cache.file_digest(&blobs.join(&sha)).unwrap(), (10, sha));
        let plain = dir.path().join("x");
        std::fs::write(&plain, b"abc").unwrap();
        let (_, digest) = cache.file_digest(&plain).unwrap();
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
