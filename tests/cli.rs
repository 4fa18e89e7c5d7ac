//! The `sac` binary driven as a user would: help, version, model loading errors.

mod common;

use std::process::{Command, Output};

fn sac(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sac"))
        .args(args)
        .env("SAC_CACHE_DIR", std::env::temp_dir().join("sac-test-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SAC_MODEL")
        .output()
        .expect("run sac")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_and_version() {
    let out = sac(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: sac"));
    let out = sac(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sac {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn model_info_describes_a_fixture_model() {
    let dir = common::fixture_dir("qwen3");
    let out = sac(&["model-info", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "qwen3");
    assert_eq!(info["head_dim"], 16);
    let fp = info["fingerprint"]["model"].as_str().unwrap();
    assert!(fp.starts_with("sha256:"), "{fp}");
    // Same shapes, different weights: different fingerprint.
    let other = sac(&[
        "model-info",
        "-m",
        common::fixture_dir("llama3").to_str().unwrap(),
        "--json",
    ]);
    let other: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_ne!(other["fingerprint"]["model"], info["fingerprint"]["model"]);
}

#[test]
fn missing_model_file_is_one_clear_line() {
    let src = common::fixture_dir("llama3");
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    let out = sac(&["model-info", "--model", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("`tokenizer.json`"), "{err}");
}

#[test]
fn offline_hub_id_not_in_cache_says_how_to_fetch() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sac"))
        .args(["model-info", "--model", "acme/not-cached"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("`config.json` of acme/not-cached"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn cached_hub_model_loads_offline() {
    // Lay out a Hub cache as huggingface_hub does: blobs named by content,
    // snapshot entries that link to them, a ref naming the snapshot.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--acme--tiny");
    let commit = "a".repeat(40);
    let snapshot = repo.join("snapshots").join(&commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), &commit).unwrap();
    let src = common::fixture_dir("mistral");
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let blob = repo.join("blobs").join(format!("{:0>64}", name.len()));
        std::fs::copy(src.join(name), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sac"))
        .args(["model-info", "--model", "acme/tiny", "--json"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("SAC_CACHE_DIR", home.path().join("sac"))
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "mistral");
    assert_eq!(info["revision"], "main");
}

#[test]
fn bad_device_is_a_usage_error() {
    let out = sac(&["model-info", "--model", "x", "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a device"));
}
