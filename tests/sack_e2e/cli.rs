//! The `sac info` subcommand, run as a binary.

use std::io::Write;
use std::process::{Command, Stdio};

use sac::sack::{KeptLayout, KvEncoding};

use crate::common::sample;

fn sac(args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sac"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn sample_file() -> (tempfile::TempDir, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.sack");
    let bytes = sample(KeptLayout::Shared, KvEncoding::Q8, Some(3));
    std::fs::write(&path, &bytes).unwrap();
    (dir, path.display().to_string(), bytes)
}

#[test]
fn info_prints_the_header_sizes_and_costs() {
    let (_dir, path, bytes) = sample_file();
    let (ok, out, err) = sac(&["info", &path], None);
    assert!(ok, "{err}");
    for expected in [
        format!("size        {} bytes", bytes.len()),
        "test/tiny (blake3:0123)".into(),
        "2 layers, 2 KV heads, head_dim 8".into(),
        "tiny.txt: 10000 tokens".into(),
        "adapter blake3:89ab".into(),
        "stored before RoPE".into(),
        "q8-channel".into(),
        "q8-token".into(),
        "bytes per kept position".into(),
        "bytes per document token".into(),
        "smaller than the full bf16 KV cache (1280000 bytes".into(),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }
}

#[test]
fn info_json_is_machine_readable_and_reads_stdin() {
    let (_dir, path, bytes) = sample_file();
    let (ok, from_file, err) = sac(&["info", "--json", &path], None);
    assert!(ok, "{err}");
    let (ok, from_stdin, err) = sac(&["info", "--json", "-"], Some(&bytes));
    assert!(ok, "{err}");
    let a: serde_json::Value = serde_json::from_str(&from_file).unwrap();
    let b: serde_json::Value = serde_json::from_str(&from_stdin).unwrap();
    assert_eq!(a["file_bytes"], bytes.len());
    assert_eq!(a["header"]["model"]["layers"], 2);
    assert_eq!(a["full_bf16_kv_bytes"], 10_000 * 2 * 2 * 2 * 8 * 2);
    assert_eq!(b["file"], "<stdin>");
    assert_eq!(a["storage"], b["storage"]);
    let kept = a["kept_per_head"].as_f64().unwrap();
    let per_kept = a["bytes_per_kept_position"].as_f64().unwrap();
    assert!((per_kept * kept - bytes.len() as f64).abs() < 1e-6 * bytes.len() as f64);
}

#[test]
fn info_refuses_newer_and_damaged_files_in_one_line() {
    let (_dir, path, mut bytes) = sample_file();
    bytes[8] = 2;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, out, err) = sac(&["info", &path], None);
    assert!(!ok && out.is_empty());
    assert!(err.contains(&path) && err.contains("version 2.0"), "{err}");
    assert!(err.contains("this sac reads format version 1.x"), "{err}");

    bytes[8] = 1;
    bytes[20] ^= 4;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = sac(&["info", &path], None);
    assert!(!ok && err.contains("checksum mismatch in header"), "{err}");

    let (ok, _, err) = sac(&["info", "/nonexistent/x.sack"], None);
    assert!(
        !ok && err.contains("/nonexistent/x.sack: opening the file"),
        "{err}"
    );
}
