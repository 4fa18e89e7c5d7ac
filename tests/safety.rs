//! A .sack is untrusted input, and no command loses or leaves data: what a
//! header may make `ask` load, and how `compress` treats its output.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{
    MODEL_FILES, compress, compress_edge, fixture_dir, hub_cache, run_ok, sac, sac_fixture,
    sac_offline,
};
use serde_json::Value;

/// A ref name long enough that a patched header fits in its place.
const LONG_REF: &str = "a-branch-name-long-enough-to-hold-a-replacement-of-the-same-length-or-less-\
                        which-keeps-every-offset-in-the-file-where-it-was";

/// Rewrites the header JSON of the .sack at `path` with `edit`, padded with
/// spaces to its old length (so that every offset stays), and its CRC.
fn patch_header(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[16..16 + len]).unwrap();
    edit(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    assert!(json.len() <= len, "the patched header does not fit");
    json.resize(len, b' ');
    bytes[16..16 + len].copy_from_slice(&json);
    let crc = crc32fast::hash(&bytes[..16 + len]);
    bytes[16 + len..20 + len].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// A .sack made with Hub model `acme/tiny` at ref [`LONG_REF`], from a Hub
/// cache under `home` that is then removed: the model is nowhere local.
fn sack_of_uncached_hub_model(home: &Path) -> PathBuf {
    hub_cache(home, LONG_REF);
    let sack = home.join("d.sack");
    let flags = ["--revision", LONG_REF, "--compressor", "uniform"];
    compress(
        sac_offline(home),
        &sac_fixture("doc_edge.txt"),
        "acme/tiny",
        &flags,
        &sack,
    );
    std::fs::remove_dir_all(home.join("hub")).unwrap();
    sack
}

/// A copy of fixture model `name` in `dir`, a directory no sac command has
/// been given.
fn model_copy(name: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for file in MODEL_FILES {
        std::fs::copy(fixture_dir(name).join(file), dir.join(file)).unwrap();
    }
    dir.canonicalize().unwrap()
}

/// Counts the connections made to a local port, closing each at once.
struct Listener {
    endpoint: String,
    connections: Arc<AtomicUsize>,
}

impl Listener {
    fn start() -> Self {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", socket.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        std::thread::spawn(move || {
            for stream in socket.incoming() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Listener {
            endpoint,
            connections,
        }
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// `sac` online, the Hub at `endpoint`, caches under `home`.
fn sac_online(home: &Path, endpoint: &str) -> Command {
    let mut cmd = sac_offline(home);
    cmd.env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", endpoint);
    cmd
}

fn failure(cmd: &mut Command) -> String {
    common::failing(cmd)
}

#[test]
fn a_header_naming_an_uncached_hub_model_downloads_nothing() {
    let home = tempfile::tempdir().unwrap();
    let sack = sack_of_uncached_hub_model(home.path());
    let hub = Listener::start();
    let err = failure(
        sac_online(home.path(), &hub.endpoint)
            .arg("ask")
            .arg(&sack)
            .arg("Q?"),
    );
    assert_eq!(hub.count(), 0, "a .sack made sac go online: {err}");
    for what in [
        "was made with acme/tiny at revision a-branch-name",
        "not in the local Hugging Face cache",
        "`huggingface-cli download acme/tiny --revision a-branch-name",
        "pass --model DIR|FILE.gguf|HUB_ID",
        "--allow-download",
    ] {
        assert!(err.contains(what), "{what:?} missing: {err}");
    }
    // The user may opt in; then the Hub is asked (and this one fails).
    failure(
        sac_online(home.path(), &hub.endpoint)
            .arg("ask")
            .arg(&sack)
            .args(["Q?", "--allow-download"]),
    );
    assert!(hub.count() > 0, "--allow-download did not reach the Hub");
}

#[test]
fn a_header_revision_or_id_that_is_a_path_loads_nothing() {
    let home = tempfile::tempdir().unwrap();
    let sack = sack_of_uncached_hub_model(home.path());
    let model = model_copy("mistral", &home.path().join("m"));
    let model = model.to_str().unwrap();
    patch_header(&sack, |h| h["model"]["revision"] = model.into());
    let err = failure(sac_offline(home.path()).arg("ask").arg(&sack).arg("Q?"));
    assert!(err.contains("is not a Hub revision"), "{err}");
    for id in [model, "../../m", "acme/../../m"] {
        patch_header(&sack, |h| {
            h["model"]["id"] = id.into();
            h["model"]
                .as_object_mut()
                .unwrap()
                .insert("revision".into(), Value::Null);
        });
        let err = failure(sac_offline(home.path()).arg("ask").arg(&sack).arg("Q?"));
        assert!(err.contains("pass --model"), "{id}: {err}");
    }
    // Named on the command line, the same directory answers (it is a copy,
    // so its fingerprint is not the cached blobs').
    run_ok(sac_offline(home.path()).arg("ask").arg(&sack).args([
        "Q?",
        "--max-tokens",
        "2",
        "--force",
        "-m",
        model,
    ]));
}

#[test]
fn a_directory_the_user_loaded_answers_without_model() {
    let home = tempfile::tempdir().unwrap();
    let model = model_copy("qwen2", &home.path().join("m"));
    let sack = home.path().join("d.sack");
    compress_edge(sac_offline(home.path()), &model, "uniform", &sack);
    run_ok(
        sac_offline(home.path())
            .arg("ask")
            .arg(&sack)
            .args(["Q?", "--max-tokens", "2"]),
    );
    // Another user (another sac cache) has loaded no such directory.
    let other = tempfile::tempdir().unwrap();
    let err = failure(sac_offline(other.path()).arg("ask").arg(&sack).arg("Q?"));
    assert!(err.contains(&format!("pass --model {:?}", model)), "{err}");
}

#[test]
fn errors_do_not_quote_files_a_header_pointed_at() {
    let home = tempfile::tempdir().unwrap();
    hub_cache(home.path(), "main");
    let sack = home.path().join("d.sack");
    compress_edge(sac_offline(home.path()), "acme/tiny", "uniform", &sack);
    // The cached config changes under the name its fingerprint is read from.
    let config = home
        .path()
        .join("hub/models--acme--tiny/snapshots")
        .join("a".repeat(40));
    let config = config.join("config.json").canonicalize().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    // Of the same size: the fingerprint of a Hub blob is its name and size.
    std::fs::write(&config, text.replace("\"silu\"", "\"XQ7Z\"")).unwrap();
    let err = failure(sac_offline(home.path()).arg("ask").arg(&sack).arg("Q?"));
    assert!(!err.contains("XQ7Z"), "{err}");
    assert!(err.contains("sac model-info -m"), "{err}");
    // Named by the user, the model's problem is told in full.
    let out = sac_offline(home.path())
        .args(["model-info", "-m", "acme/tiny"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("XQ7Z"));
}

#[test]
fn compress_never_overwrites_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("in.txt");
    let text = std::fs::read(sac_fixture("doc_edge.txt")).unwrap();
    std::fs::write(&doc, &text).unwrap();
    std::os::unix::fs::symlink(&doc, dir.path().join("link.txt")).unwrap();
    std::fs::hard_link(&doc, dir.path().join("hard.txt")).unwrap();
    for out in ["in.txt", "link.txt", "hard.txt", "./in.txt"] {
        let err = failure(
            sac()
                .current_dir(dir.path())
                .args(["compress", "in.txt", "-o", out])
                .args(["-m", fixture_dir("llama3").to_str().unwrap()]),
        );
        assert!(err.contains("is the input document itself"), "{out}: {err}");
        assert_eq!(std::fs::read(&doc).unwrap(), text);
    }
}

#[test]
fn a_missing_output_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/x.sack");
    let err = failure(
        sac()
            .arg("compress")
            .arg(sac_fixture("doc_edge.txt"))
            .arg("-o")
            .arg(&out)
            .args(["-m", fixture_dir("llama3").to_str().unwrap()]),
    );
    assert!(
        err.contains(&format!(
            "the directory {} does not exist",
            dir.path().join("no/such/dir").display()
        )),
        "{err}"
    );
    assert!(!err.contains(".sac-"), "{err}");
}

/// Files in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn an_interrupted_compress_removes_its_temp_file() {
    let text = std::fs::read_to_string(sac_fixture("doc_long.txt")).unwrap();
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model");
    for signal in ["INT", "TERM"] {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("doc.txt");
        std::fs::write(&doc, text.repeat(3)).unwrap();
        let mut child = sac()
            .arg("compress")
            .arg(&doc)
            .arg("-m")
            .arg(&model)
            .args(["--compressor", "kvzip", "-q"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let seen = loop {
            if !others(dir.path(), &["doc.txt"]).is_empty() {
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert!(seen, "compress ended before its temp file was seen");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "SIG{signal}");
        assert_eq!(others(dir.path(), &["doc.txt"]), Vec::<String>::new());
    }
}

#[test]
fn empty_questions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("d.sack");
    let model = fixture_dir("llama3");
    compress_edge(sac(), &model, "uniform", &sack);
    let err = failure(sac().arg("ask").arg(&sack).arg(" "));
    assert!(err.contains("the question is empty"), "{err}");
    let err = failure(sac().arg("ask").arg(&sack).args(["Q?", "", "--json"]));
    assert!(err.contains("question 2 is empty"), "{err}");

    let batch = [
        r#"{"id": "a", "question": "Who?"}"#,
        r#"{"id": "b", "question": ""}"#,
        "{oops",
        "[1,2,3]",
        r#""a string""#,
        r#"{"id": "c", "question": "Where?"}"#,
    ]
    .join("\n");
    let mut child = sac()
        .arg("ask")
        .arg(&sack)
        .args(["--batch", "-", "--max-tokens", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), batch.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a batch with bad lines must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("4 of 6 batch lines are not questions"),
        "{err}"
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&Value> = lines.iter().map(|l| &l["id"]).collect();
    assert_eq!(
        ids,
        ["a", "b", "3", "4", "5", "c"]
            .map(|s| match s.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(s),
            })
            .iter()
            .collect::<Vec<_>>()
    );
    for (line, answered) in lines.iter().zip([true, false, false, false, false, true]) {
        assert_eq!(line.get("answer").is_some(), answered, "{line}");
        assert_eq!(line.get("error").is_some(), !answered, "{line}");
    }

    let err = failure(sac().arg("ask").arg(&sack).arg("--batch").arg(write(
        dir.path(),
        "dup.jsonl",
        "{\"id\": 7, \"question\": \"a\"}\n{\"id\": 7, \"question\": \"b\"}\n",
    )));
    assert!(
        err.contains("batch lines 1 and 2 have the same id 7"),
        "{err}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn documents_without_printable_text_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_dir("llama3");
    for (name, text, why) in [
        ("blank.txt", " \t\r\n\u{3000}\n", "is empty"),
        ("nul.txt", "\0\0\0\0", "no printable text"),
        (
            "invisible.txt",
            "\u{200b}\u{feff}\u{1}",
            "no printable text",
        ),
    ] {
        let doc = write(dir.path(), name, text);
        let err = failure(sac().arg("compress").arg(&doc).arg("-m").arg(&model));
        assert!(err.contains(why), "{name}: {err}");
    }
    assert_eq!(others(dir.path(), &[]).len(), 3, "nothing written");
}

#[test]
fn ratios_are_whole_and_at_most_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_dir("llama3");
    let out = sac()
        .arg("compress")
        .arg(sac_fixture("doc_edge.txt"))
        .args(["--ratio", "4.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give a whole number >= 1"), "{err}");
    let doc = write(dir.path(), "short.txt", "A short document of a few tokens.");
    let err = failure(sac().arg("compress").arg(&doc).arg("-m").arg(&model).args([
        "--compressor",
        "uniform",
        "--ratio",
        "100000",
    ]));
    assert!(
        err.contains("--ratio 100000 is more than the document's"),
        "{err}"
    );
    assert!(!dir.path().join("short.sack").exists());
}

#[test]
fn a_chunk_longer_than_the_document_is_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_dir("llama3");
    let doc = write(dir.path(), "short.txt", "A short document of a few tokens.");
    for compressor in ["kvzip", "snapkv", "streaming", "uniform", "full"] {
        let out = dir.path().join(format!("{compressor}.sack"));
        let flags = ["--compressor", compressor, "--chunk-size", "100000"];
        compress(sac(), &doc, &model, &flags, &out);
        let info = run_ok(sac().arg("info").arg(&out).arg("--json"));
        let info: Value = serde_json::from_slice(&info).unwrap();
        let chunk = info["header"]["compressor"]["chunk_size"].as_u64().unwrap();
        assert!(chunk < 100, "{compressor}: chunk {chunk}");
    }
}

#[test]
fn an_adapter_for_another_model_names_both() {
    let adapter = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/adapter");
    let err = failure(
        sac()
            .arg("compress")
            .arg(sac_fixture("doc_edge.txt"))
            .arg("--adapter")
            .arg(&adapter)
            .arg("-m")
            .arg(fixture_dir("llama3")),
    );
    assert!(err.contains("was trained on model"), "{err}");
    assert!(err.contains("but the model given is"), "{err}");
    assert!(err.contains("llama3"), "{err}");
    assert!(!err.contains("has shape"), "{err}");
}

#[test]
fn force_warns_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("d.sack");
    compress_edge(sac(), fixture_dir("llama3"), "uniform", &sack);
    // The same model with another tokenizer_config.json: a tokenizer that
    // differs, as a re-saved copy's might.
    let other = model_copy("llama3", &dir.path().join("m"));
    let config = other.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n")).unwrap();
    let err = failure(sac().arg("ask").arg(&sack).arg("Q?").arg("-m").arg(&other));
    assert!(err.contains("pass --force"), "{err}");
    let out = sac()
        .arg("ask")
        .arg(&sack)
        .args(["Q?", "--max-tokens", "2", "--force", "-m"])
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("sac: warning: ") && err.contains("(--force)"),
        "{err}"
    );
}

#[test]
fn completions_end_quietly_on_a_closed_pipe() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        for _ in 0..5 {
            let mut child = Command::new(env!("CARGO_BIN_EXE_sac"))
                .args(["completions", shell])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut first = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let status = child.wait().unwrap();
            assert!(status.success(), "{shell}: {status} {err}");
            assert!(err.is_empty(), "{shell}: {err}");
        }
    }
}
