//! The REPL of `sac ask FILE.sack` driven through a pseudo-terminal, as a user
//! at a terminal meets it: the prompt, answers, `:help`, `:quit`, Ctrl-D and
//! Ctrl-C. rustyline only edits lines on a real terminal, so a pipe cannot
//! stand in for one here.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rexpect::process::WaitStatus;
use rexpect::session::{Options, PtySession, spawn_with_options};
use tempfile::TempDir;

/// What rustyline prints before each line it reads.
const PROMPT: &str = "? ";
/// Generous: a debug build on a loaded two-core machine.
const TIMEOUT_MS: u64 = 60_000;
const MAX_TOKENS: &str = "4";

/// A temporary home holding a .sack of `doc_long.txt` made with the qwen2
/// fixture model (the one whose greedy answers are visible text).
struct Setup {
    home: TempDir,
    sack: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let home = tempfile::tempdir().unwrap();
        let sack = home.path().join("doc_long.sack");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = sac(home.path())
            .arg("compress")
            .arg(root.join("tests/fixtures/sac/doc_long.txt"))
            .arg("-o")
            .arg(&sack)
            .arg("-m")
            .arg(root.join("tests/fixtures/parity/qwen2"))
            .args(["--compressor", "uniform", "-q"])
            .output()
            .expect("run sac compress");
        assert!(
            out.status.success(),
            "sac compress failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Setup { home, sack }
    }

    /// The answer `sac ask FILE QUESTION` prints (greedy decoding, so the REPL
    /// must print the same), as the pty reader sees it: one char per byte,
    /// without the final newline.
    fn one_shot_answer(&self, question: &str) -> String {
        let out = sac(self.home.path())
            .arg("ask")
            .arg(&self.sack)
            .arg(question)
            .args(["--max-tokens", MAX_TOKENS])
            .output()
            .expect("run sac ask");
        assert!(
            out.status.success(),
            "sac ask failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: String = out.stdout.iter().map(|&b| char::from(b)).collect();
        let answer = answer.trim_end_matches('\n').to_string();
        assert!(!answer.trim().is_empty(), "the fixture answers nothing");
        answer
    }

    /// `sac ask FILE.sack` with no question, on a fresh pseudo-terminal, once
    /// its first prompt is up.
    fn repl(&self) -> PtySession {
        self.repl_with(MAX_TOKENS)
    }

    fn repl_with(&self, max_tokens: &str) -> PtySession {
        let mut cmd = sac(self.home.path());
        cmd.arg("ask")
            .arg(&self.sack)
            .args(["--max-tokens", max_tokens]);
        let options = Options::new()
            .timeout_ms(Some(TIMEOUT_MS))
            .strip_ansi_escape_codes(true);
        let mut p = spawn_with_options(cmd, options).expect("spawn sac ask on a pty");
        p.exp_string("ask away").expect("no greeting");
        p.exp_string(PROMPT).expect("no first prompt");
        p
    }

    fn history(&self) -> PathBuf {
        self.home.path().join("data/sac/history")
    }
}

/// The binary with its caches, history and terminal pinned to the test.
fn sac(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sac"));
    cmd.env("SAC_CACHE_DIR", home.join("cache"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SAC_MODEL")
        // The history goes to $XDG_DATA_HOME/sac/history, never the real home.
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        // rustyline falls back to plain line reading on "dumb" terminals.
        .env("TERM", "xterm");
    cmd
}

/// Asks `question` and waits for its whole answer and the next prompt.
fn ask(p: &mut PtySession, question: &str, answer: &str) {
    p.send_line(question).unwrap();
    // The answer itself may hold "? ", so read prompt by prompt until all of
    // it has gone by; the pty turns "\n" into "\r\n".
    let mut seen = String::new();
    while !seen.replace('\r', "").contains(answer) {
        match p.exp_string(PROMPT) {
            Ok(before) => {
                seen.push_str(&before);
                seen.push_str(PROMPT);
            }
            Err(e) => panic!("no answer {answer:?} to {question:?} (seen {seen:?}): {e}"),
        }
    }
}

/// Waits for the process to end and checks that it succeeded.
fn expect_clean_exit(mut p: PtySession) {
    p.exp_eof().expect("sac did not leave");
    match p.process().wait().expect("wait for sac") {
        WaitStatus::Exited(_, 0) => {}
        other => panic!("sac ended with {other:?}"),
    }
}

#[test]
fn questions_help_info_and_quit() {
    let setup = Setup::new();
    let questions = ["Who wrote the report?", "What happened next?"];
    let answers = questions.map(|q| setup.one_shot_answer(q));
    let mut p = setup.repl();
    for (question, answer) in questions.iter().zip(&answers) {
        ask(&mut p, question, answer);
    }
    p.send_line(":help").unwrap();
    p.exp_string("Commands").expect(":help printed no help");
    p.exp_string(":quit").unwrap();
    p.exp_string(PROMPT).expect("no prompt after :help");
    p.send_line(":info").unwrap();
    p.exp_string("doc_long.sack")
        .expect(":info did not describe the file");
    p.exp_string(PROMPT).expect("no prompt after :info");
    p.send_line(":quit").unwrap();
    expect_clean_exit(p);
    let history = std::fs::read_to_string(setup.history()).expect("no history file");
    for line in questions {
        assert!(
            history.contains(line),
            "{line:?} not in history:\n{history}"
        );
    }
}

#[test]
fn ctrl_d_on_an_empty_prompt_leaves() {
    let setup = Setup::new();
    let mut p = setup.repl();
    p.send_control('d').unwrap();
    expect_clean_exit(p);
}

#[test]
fn ctrl_c_at_the_prompt_keeps_the_session() {
    let setup = Setup::new();
    let question = "Who wrote the report?";
    let answer = setup.one_shot_answer(question);
    let mut p = setup.repl();
    p.send_control('c').unwrap();
    p.exp_string("Ctrl-D or :quit to leave")
        .expect("Ctrl-C said nothing");
    p.exp_string(PROMPT).expect("no prompt after Ctrl-C");
    // Still answering.
    ask(&mut p, question, &answer);
    p.send_line(":quit").unwrap();
    expect_clean_exit(p);
}

#[test]
fn ctrl_c_stops_an_answer_not_the_session() {
    let setup = Setup::new();
    let question = "Who wrote the report?";
    let answer = setup.one_shot_answer(question);
    // Thousands of tokens take seconds even in release builds: time enough
    // to interrupt the answer once its first piece is out.
    let mut p = setup.repl_with("3000");
    p.send_line(question).unwrap();
    p.exp_string(&answer).expect("the answer did not start");
    p.send_control('c').unwrap();
    p.exp_string("[stopped]")
        .expect("Ctrl-C did not stop the answer");
    p.exp_string(PROMPT)
        .expect("no prompt after the stopped answer");
    p.send_line(":quit").unwrap();
    expect_clean_exit(p);
}
