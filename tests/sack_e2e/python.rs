//! Interop: `scripts/read_sack.py`, written from `man/sack.5` alone, must read
//! every layout and encoding the Rust writer produces, and soft tokens, and get
//! the same tensors.
//! It needs python3 with numpy and zstandard; with the environment variable CI
//! set their absence fails the test instead of skipping it.

use std::path::Path;
use std::process::Command;

use sac::sack::{SackReader, TensorValues};

use crate::common::all_variants;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/read_sack.py")
}

/// Whether the reference reader can run here.
fn python_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, zstandard"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but python3 with numpy and zstandard is missing (pip install numpy zstandard)"
        );
        eprintln!("skipping: python3 with numpy and zstandard not found");
    }
    ok
}

#[test]
fn python_reads_every_encoding_identically() {
    if !python_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in all_variants() {
        let file = dir.path().join(format!("{name}.sack"));
        let dump = dir.path().join(&name);
        std::fs::write(&file, &bytes).unwrap();
        let out = Command::new("python3")
            .arg(script())
            .arg(&file)
            .arg("--dump")
            .arg(&dump)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut r = SackReader::from_bytes(bytes, name.clone()).unwrap();
        let names: Vec<String> = r.tensors().iter().map(|e| e.name.to_string()).collect();
        assert!(!names.is_empty());
        for tensor in names {
            let py = std::fs::read(dump.join(format!("{tensor}.bin"))).unwrap();
            let words = py.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]);
            match r.read_tensor(&tensor).unwrap().values {
                TensorValues::U32(rust) => {
                    assert_eq!(rust, words.map(u32::from_le_bytes).collect::<Vec<_>>());
                }
                TensorValues::F32(rust) => {
                    let py: Vec<f32> = words.map(f32::from_le_bytes).collect();
                    assert_eq!(rust.len(), py.len(), "{name}/{tensor}");
                    for (a, b) in rust.iter().zip(&py) {
                        assert!(
                            (a - b).abs() <= 1e-6,
                            "{name}/{tensor}: rust {a}, python {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn python_refuses_damaged_files() {
    if !python_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = all_variants().swap_remove(3);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    let file = dir.path().join("damaged.sack");
    std::fs::write(&file, &bytes).unwrap();
    let out = Command::new("python3")
        .arg(script())
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged.sack") && err.contains("checksum mismatch"),
        "{err}"
    );
}
