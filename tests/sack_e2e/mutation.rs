//! Damaged files: bit flips across the file, truncation at every 1/64 of its
//! length and appended bytes must each give one clean error naming the file,
//! from opening or at the latest from reading every tensor.

use sac::sack::{KeptLayout, KvEncoding, SackError, SackReader};

use crate::common::{sample, soft_sample};

/// Opens and fully reads `bytes`; the error it must produce.
fn error_of(bytes: Vec<u8>) -> Option<SackError> {
    match SackReader::from_bytes(bytes, "damaged.sack") {
        Err(e) => Some(e),
        Ok(mut r) => r.verify().err(),
    }
}

fn assert_clean(bytes: Vec<u8>, what: &str) {
    let err = error_of(bytes).unwrap_or_else(|| panic!("{what}: damage went unnoticed"));
    let msg = err.to_string();
    assert!(msg.starts_with("damaged.sack: "), "{what}: {msg}");
    assert!(!msg.contains('\n'), "{what}: not one line: {msg}");
    assert!(
        matches!(
            err,
            SackError::Checksum { .. }
                | SackError::Malformed { .. }
                | SackError::NotSack { .. }
                | SackError::UnsupportedVersion { .. }
        ),
        "{what}: unexpected kind {err:?}"
    );
}

fn originals() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "shared q8 zstd",
            sample(KeptLayout::Shared, KvEncoding::Q8, Some(3)),
        ),
        (
            "per-head q4 raw",
            sample(KeptLayout::PerHead, KvEncoding::Q4, None),
        ),
        (
            "per-layer bf16 zstd",
            sample(KeptLayout::PerLayer, KvEncoding::Bf16, Some(1)),
        ),
        ("soft tokens q8 zstd", soft_sample(KvEncoding::Q8, Some(3))),
    ]
}

#[test]
fn every_bit_flip_is_caught() {
    for (name, file) in originals() {
        assert!(
            error_of(file.clone()).is_none(),
            "{name}: original must be valid"
        );
        // One flip per byte, cycling through the bit positions, covers every
        // region (preamble, header, payloads, directory, footer) and every bit index.
        for i in 0..file.len() {
            let mut damaged = file.clone();
            damaged[i] ^= 1 << (i % 8);
            assert_clean(damaged, &format!("{name}: bit {} of byte {i}", i % 8));
        }
    }
}

#[test]
fn every_truncation_is_caught() {
    for (name, file) in originals() {
        for k in 0..64 {
            let len = file.len() * k / 64;
            assert_clean(
                file[..len].to_vec(),
                &format!("{name}: truncated to {len} bytes"),
            );
        }
        assert_clean(
            file[..file.len() - 1].to_vec(),
            &format!("{name}: last byte cut"),
        );
    }
}

#[test]
fn appended_bytes_are_caught() {
    for (name, file) in originals() {
        let footer = file[file.len() - 32..].to_vec();
        let appendages: [(&str, Vec<u8>); 5] = [
            ("one zero byte", vec![0]),
            ("a newline", b"\n".to_vec()),
            ("32 garbage bytes", (0..32).collect()),
            ("a second copy of the footer", footer),
            ("the whole file again", file.clone()),
        ];
        for (what, tail) in appendages {
            let mut damaged = file.clone();
            damaged.extend_from_slice(&tail);
            assert_clean(damaged, &format!("{name}: appended {what}"));
        }
    }
}
