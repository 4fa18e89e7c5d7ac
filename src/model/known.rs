//! Which model a .sack may be answered with when the user names none.
//!
//! A .sack is untrusted input: its header names a model, but must never choose
//! what is downloaded or loaded. So the model a header names is used only
//! - as a Hub model already in the local Hugging Face cache, at the header's
//!   revision (checked as a Hub name first); or
//! - as a local directory or `.gguf` file that the user has loaded before,
//!   named on the command line of `compress`, `ask`, `model-info` or
//!   `train`: each such load leaves a note under the sac cache directory
//!   (`models/<digest of the model and tokenizer fingerprints>` holding the
//!   paths that model was loaded from, newest first), and the header's
//!   fingerprints find it: the header's own path if it is noted and still
//!   there, else the newest noted path that is.
//!
//! The caller then checks the files' fingerprints against the header's before
//! reading any of them as a model.

use std::path::{Path, PathBuf};

use hf_hub::Cache;

use super::source::SourceError;
use crate::error::{Error, Result};
use crate::fingerprint::ModelFingerprint;
use crate::model::source::{self, ModelFiles, Network};

/// Paths kept in a model's note: copies of one model beyond these are
/// forgotten, oldest first.
const NOTED_PATHS: usize = 8;

/// Local models (directories, `.gguf` files) the user has loaded, by their
/// model and tokenizer fingerprints.
#[derive(Debug, Clone)]
pub struct KnownModels {
    dir: Option<PathBuf>,
}

impl KnownModels {
    /// The notes under the user's sac cache directory.
    pub fn open_default() -> Self {
        Self {
            dir: crate::fingerprint::cache_dir().map(|d| d.join("models")),
        }
    }

    /// The notes under `dir`.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir: Some(dir) }
    }

    /// The note of a model: named by the SHA-256 of its two fingerprints,
    /// so that a fingerprint (from a .sack) is never part of a path, and two
    /// copies of one model with different tokenizer files are two models.
    fn note(&self, fingerprint: &ModelFingerprint) -> Option<PathBuf> {
        use sha2::{Digest, Sha256};
        let key = format!("{}\n{}", fingerprint.model, fingerprint.tokenizer);
        let name = crate::fingerprint::hex(&Sha256::digest(key.as_bytes()));
        self.dir.as_ref().map(|d| d.join(name))
    }

    /// Notes that the model with `fingerprint` is (also, and most recently)
    /// at `path`. A note that cannot be written only costs a `--model`
    /// later, so failures are ignored.
    pub fn remember(&self, fingerprint: &ModelFingerprint, path: &Path) {
        let (Some(note), Some(text)) = (self.note(fingerprint), path.to_str()) else {
            return;
        };
        if text.contains('\n') {
            return;
        }
        let old = std::fs::read_to_string(&note).unwrap_or_default();
        let paths: Vec<&str> = std::iter::once(text)
            .chain(old.lines().filter(|line| *line != text))
            .take(NOTED_PATHS)
            .collect();
        let new = paths.join("\n");
        if new == old {
            return;
        }
        if let Some(parent) = note.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = crate::atomic::write_bytes(&note, new.as_bytes());
    }

    /// Where the model with `fingerprint` was loaded from, if noted: `named`
    /// (the path a .sack header gives) if it is one of the noted paths and
    /// still exists, else the newest noted path that exists, else the
    /// newest (whose absence the caller reports).
    pub fn recall(&self, fingerprint: &ModelFingerprint, named: &str) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.note(fingerprint)?).ok()?;
        let noted: Vec<PathBuf> = text
            .lines()
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .collect();
        let named = noted.iter().find(|p| p.as_os_str() == named && p.exists());
        named
            .or_else(|| noted.iter().find(|p| p.exists()))
            .or(noted.first())
            .cloned()
    }
}

/// What a .sack header says of its model.
#[derive(Debug, Clone, Copy)]
pub struct NamedModel<'a> {
    pub id: &'a str,
    pub revision: Option<&'a str>,
    /// The GGUF file in the Hub repository `id`, if the model is one.
    pub gguf_file: Option<&'a str>,
    pub fingerprint: &'a ModelFingerprint,
}

/// Where a header-named model may come from.
#[derive(Debug, Clone)]
pub struct Trusted {
    pub hub_cache: Cache,
    pub known: KnownModels,
    /// `ask --allow-download`: the user lets a Hub model the cache lacks be
    /// downloaded.
    pub network: Network,
}

impl Trusted {
    /// The user's Hub cache and notes; no downloads.
    pub fn user_default() -> Self {
        Self {
            hub_cache: source::hub_cache(),
            known: KnownModels::open_default(),
            network: Network::CacheOnly,
        }
    }

    /// Resolves the files of the model `named`, from the Hub cache or a
    /// noted directory only (see the module docs). Nothing is read as a
    /// model yet: the caller compares fingerprints first.
    pub fn resolve(&self, named: NamedModel) -> Result<ModelFiles> {
        if named.revision.is_some() || source::looks_like_hub_id(named.id) {
            let revision = named.revision.unwrap_or("main");
            return source::resolve_hub_in(
                &self.hub_cache,
                named.id,
                revision,
                named.gguf_file,
                self.network,
            );
        }
        if !Path::new(named.id).is_absolute() {
            return Err(SourceError::NeitherHubIdNorDirectory(named.id.to_string()).into());
        }
        match self.known.recall(named.fingerprint, named.id) {
            Some(path) => source::resolve_local(&path),
            None => Err(Error::UnknownLocalModel(named.id.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(model: &str) -> ModelFingerprint {
        ModelFingerprint {
            model: model.into(),
            tokenizer: "sha256:0".into(),
        }
    }

    const FP: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn notes_are_recalled_by_both_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownModels::at(dir.path().join("models"));
        assert_eq!(known.recall(&fp(FP), ""), None);
        known.remember(&fp(FP), Path::new("/models/tiny"));
        assert_eq!(
            known.recall(&fp(FP), ""),
            Some(PathBuf::from("/models/tiny"))
        );
        let other_tokenizer = ModelFingerprint {
            tokenizer: "sha256:1".into(),
            ..fp(FP)
        };
        assert_eq!(known.recall(&other_tokenizer, ""), None);
        // A fingerprint is no path: nothing outside the notes is read or written.
        for odd in ["sha256:../../etc/passwd", "../x", "", "/etc/passwd"] {
            known.remember(&fp(odd), Path::new("/x"));
        }
        for entry in std::fs::read_dir(dir.path().join("models")).unwrap() {
            let name = entry.unwrap().file_name();
            assert_eq!(name.len(), 64, "{name:?}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A model loaded from several places is found at the one a header
    /// names while it exists, else at the newest that does: a deleted copy
    /// does not hide the others.
    #[test]
    fn every_noted_copy_of_a_model_is_recalled() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownModels::at(dir.path().join("models"));
        let copy = |name: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path).unwrap();
            path
        };
        let (first, second, third) = (copy("first"), copy("second"), copy("third"));
        for path in [&first, &second, &third, &second] {
            known.remember(&fp(FP), path);
        }
        let name = |p: &Path| p.to_str().unwrap().to_string();
        assert_eq!(known.recall(&fp(FP), &name(&first)), Some(first.clone()));
        assert_eq!(known.recall(&fp(FP), "/elsewhere"), Some(second.clone()));
        std::fs::remove_dir(&second).unwrap();
        assert_eq!(known.recall(&fp(FP), &name(&second)), Some(third.clone()));
        std::fs::remove_dir(&third).unwrap();
        std::fs::remove_dir(&first).unwrap();
        assert_eq!(known.recall(&fp(FP), "/elsewhere"), Some(second.clone()));
        for i in 0..2 * NOTED_PATHS {
            known.remember(&fp(FP), &dir.path().join(format!("copy{i}")));
        }
        let note = std::fs::read_to_string(known.note(&fp(FP)).unwrap()).unwrap();
        assert_eq!(note.lines().count(), NOTED_PATHS);
    }

    /// A Hub cache holding the fixture model `mistral` as `acme/tiny` at
    /// `main`, and a note for a copy of it in `noted`.
    fn trusted(root: &Path) -> (Trusted, PathBuf) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/mistral");
        let commit = "c".repeat(40);
        let repo = root.join("hub/models--acme--tiny");
        let snapshot = repo.join("snapshots").join(&commit);
        let noted = root.join("noted");
        for dir in [&snapshot, &repo.join("refs"), &noted] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(repo.join("refs/main"), &commit).unwrap();
        for name in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ] {
            std::fs::copy(fixture.join(name), snapshot.join(name)).unwrap();
            std::fs::copy(fixture.join(name), noted.join(name)).unwrap();
        }
        let known = KnownModels::at(root.join("notes"));
        known.remember(&fp(FP), &noted);
        let trusted = Trusted {
            hub_cache: Cache::new(root.join("hub")),
            known,
            network: Network::CacheOnly,
        };
        (trusted, noted)
    }

    #[test]
    fn the_cache_and_noted_directories_resolve() {
        let root = tempfile::tempdir().unwrap();
        let (trusted, noted) = trusted(root.path());
        let (known_fp, zero_fp, x_fp) = (fp(FP), fp("sha256:0"), fp("x"));
        let named = |id, revision, fingerprint| NamedModel {
            id,
            revision,
            gguf_file: None,
            fingerprint,
        };
        let hub = trusted.resolve(named("acme/tiny", None, &x_fp)).unwrap();
        assert!(
            hub.paths()
                .iter()
                .all(|p| p.starts_with(root.path().join("hub")))
        );
        let dir = trusted
            .resolve(named("/anywhere", None, &known_fp))
            .unwrap();
        assert_eq!(dir.id, noted.canonicalize().unwrap().to_str().unwrap());
        let fixture = env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/parity/llama3";
        let err = trusted
            .resolve(named(&fixture, None, &zero_fp))
            .unwrap_err();
        assert!(matches!(err, Error::UnknownLocalModel(_)), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(300))]

        /// Whatever a header says, only files in the Hub cache or in a
        /// directory the user noted are resolved.
        #[test]
        fn no_header_reaches_outside_the_cache_or_the_notes(
            id in header_string(),
            revision in proptest::option::of(header_string()),
            gguf_file in proptest::option::of(header_string()),
            fingerprint in proptest::prop_oneof![
                proptest::strategy::Just(FP.to_string()),
                "sha256:[0-9a-f]{0,70}",
                ".{0,80}",
            ],
        ) {
            let root = tempfile::tempdir().unwrap();
            let (trusted, noted) = trusted(root.path());
            let named = NamedModel {
                id: &id,
                revision: revision.as_deref(),
                gguf_file: gguf_file.as_deref(),
                fingerprint: &fp(&fingerprint),
            };
            if let Ok(files) = trusted.resolve(named) {
                let allowed = [root.path().join("hub").canonicalize().unwrap(), noted.canonicalize().unwrap()];
                for path in files.paths() {
                    let real = path.canonicalize().unwrap();
                    proptest::prop_assert!(
                        allowed.iter().any(|a| real.starts_with(a)),
                        "{id:?} {revision:?} resolved {}", real.display()
                    );
                }
            }
        }
    }

    /// Ids and revisions as an attacker would write them: Hub-like names,
    /// traversals, absolute paths to real model directories, and noise.
    fn header_string() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let fixtures = env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/parity";
        prop_oneof![
            Just("acme/tiny".to_string()),
            Just("main".to_string()),
            Just(format!("{fixtures}/llama3")),
            Just("/".to_string()),
            Just("../../../..".to_string()),
            (
                prop::sample::select(vec![
                    "",
                    "/",
                    "../",
                    "./",
                    "acme/",
                    "acme/tiny/",
                    "~/",
                    "\\"
                ]),
                prop::sample::select(vec![
                    "tiny",
                    "..",
                    "../..",
                    "etc/passwd",
                    "main",
                    "refs/main",
                    "snapshots",
                    "acme/tiny",
                    "llama3",
                    "models--acme--tiny",
                ]),
                "[a-z./]{0,12}",
            )
                .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
            ".{0,40}",
        ]
    }
}
