//! The fuzz target's seed corpus (`fuzz/corpus/sack_reader/seed-*.sack`):
//! small valid files in every layout and encoding. This test keeps them valid
//! as the format evolves; `SACK_WRITE_SEEDS=1 cargo test --test sack_e2e seeds`
//! rewrites them.

use std::path::{Path, PathBuf};

use sac::sack::SackReader;

use crate::common::all_variants;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/sack_reader")
}

#[test]
fn seed_corpus_is_valid() {
    if std::env::var_os("SACK_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(corpus()).unwrap();
        for (name, bytes) in all_variants() {
            std::fs::write(corpus().join(format!("seed-{name}.sack")), bytes).unwrap();
        }
    }
    let mut seeds = 0;
    for entry in std::fs::read_dir(corpus()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        {
            SackReader::open(&path).unwrap().verify().unwrap();
            seeds += 1;
        }
    }
    assert_eq!(seeds, all_variants().len(), "one seed per variant");
}
