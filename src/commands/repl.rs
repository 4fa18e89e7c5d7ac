//! The interactive prompt of `sac ask` on a terminal: line editing and
//! history (rustyline; dialoguer's raw-mode input cannot see Ctrl-D), `:help`,
//! `:info`, `:quit`. Ctrl-D leaves; Ctrl-C stops the current answer, not the
//! session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

const HELP: &str = "Type a question and press Enter. Commands:
  :help   this text
  :info   what the .sack holds
  :quit   leave (or Ctrl-D)
Ctrl-C stops an answer; Ctrl-D on an empty line leaves.";

/// Runs the prompt until the user leaves; `answer` prints one answer and
/// stops early once its flag is set.
pub fn run(
    answer: &mut dyn FnMut(&str, &AtomicBool) -> anyhow::Result<()>,
    info: &str,
) -> anyhow::Result<()> {
    let interrupted = interrupt_flag()?;
    let mut editor = DefaultEditor::new().context("cannot start the line editor")?;
    let history = dirs::data_dir().map(|d| d.join("sac").join("history"));
    if let Some(path) = &history {
        // A missing history file just means a first session.
        let _ = editor.load_history(path);
    }
    eprintln!("sac: ask away (:help for commands, Ctrl-D to leave)");
    loop {
        match editor.readline("? ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                match line {
                    ":quit" | ":q" | ":exit" => break,
                    ":help" | ":h" => println!("{HELP}"),
                    ":info" => print!("{info}"),
                    question => {
                        interrupted.store(false, Ordering::SeqCst);
                        // One failed answer does not end the session.
                        if let Err(e) = answer(question, &interrupted) {
                            eprintln!("sac: {e:#}");
                        }
                    }
                }
            }
            Err(ReadlineError::Interrupted) => eprintln!("(Ctrl-D or :quit to leave)"),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("cannot read from the terminal"),
        }
    }
    if let Some(path) = &history {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(path);
    }
    Ok(())
}

/// Sets up Ctrl-C to stop the current answer instead of the process.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&flag);
    ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;
    Ok(flag)
}
