//! The `sac` binary driven as a user would: help, version, model loading errors.

mod common;

use std::process::{Command, Output};

use common::{MODEL_FILES, hub_cache, sac_offline};

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
    let out = sac_offline(home.path())
        .args(["model-info", "--model", "acme/not-cached"])
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
    let home = tempfile::tempdir().unwrap();
    hub_cache(home.path(), "main");
    let out = sac_offline(home.path())
        .args(["model-info", "--model", "acme/tiny", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "mistral");
    assert_eq!(info["revision"], "main");
}

#[test]
fn ask_fetches_the_hub_revision_the_sack_was_made_at() {
    // Only revision v1 is in the cache: asking at `main` would fail offline.
    let home = tempfile::tempdir().unwrap();
    hub_cache(home.path(), "v1");
    let sack = home.path().join("d.sack");
    common::run_ok(
        sac_offline(home.path())
            .arg("compress")
            .arg(common::sac_fixture("doc_edge.txt"))
            .args([
                "-m",
                "acme/tiny",
                "--revision",
                "v1",
                "--compressor",
                "uniform",
            ])
            .args(["-q", "-o"])
            .arg(&sack),
    );
    let info = common::run_ok(sac_offline(home.path()).arg("info").arg(&sack));
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("acme/tiny at revision v1"), "{info}");
    assert!(info.contains(".sack 1.1"), "{info}");
    common::run_ok(sac_offline(home.path()).arg("ask").arg(&sack).args([
        "Q?",
        "--max-tokens",
        "2",
    ]));
}

#[test]
fn a_sack_whose_model_moved_says_to_pass_model() {
    let dir = tempfile::tempdir().unwrap();
    let (before, after) = (dir.path().join("model"), dir.path().join("moved"));
    std::fs::create_dir(&before).unwrap();
    let src = common::fixture_dir("qwen2");
    for name in MODEL_FILES {
        std::fs::copy(src.join(name), before.join(name)).unwrap();
    }
    let sack = dir.path().join("d.sack");
    // A cache of its own: other tests note other copies of this model, which
    // `ask` would rightly find.
    let sac = || {
        let mut cmd = common::sac();
        cmd.env("SAC_CACHE_DIR", dir.path().join("cache"));
        cmd
    };
    common::run_ok(
        sac()
            .arg("compress")
            .arg(common::sac_fixture("doc_edge.txt"))
            .arg("-m")
            .arg(&before)
            .args(["--compressor", "uniform", "-q", "-o"])
            .arg(&sack),
    );
    std::fs::rename(&before, &after).unwrap();
    let err = common::failing(sac().arg("ask").arg(&sack).arg("Q?"));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("pass --model"), "{err}");
    common::run_ok(
        sac()
            .arg("ask")
            .arg(&sack)
            .args(["Q?", "--max-tokens", "2", "-m"])
            .arg(&after),
    );
}

#[test]
fn bad_device_is_a_usage_error() {
    let out = sac(&["model-info", "--model", "x", "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a device"));
}
