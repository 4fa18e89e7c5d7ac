//! `log.jsonl`: one JSON object per line, each with the step it describes.
//!
//! Lines are appended as they happen (one `write` each, so a crash can leave
//! at most a torn last line) rather than rewritten atomically, so the log can
//! be followed during a run. A resumed run first rewrites the log, atomically,
//! down to the lines of the steps its checkpoint holds.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub const FILE: &str = "log.jsonl";

#[derive(Debug)]
pub struct RunLog {
    path: PathBuf,
    file: File,
}

impl RunLog {
    /// Starts an empty log in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        crate::atomic::write_bytes(&path, b"")?;
        Self::open(path)
    }

    /// Continues the log in `dir` after `step` steps, dropping the lines of
    /// later steps (and any torn line) that the checkpoint does not cover.
    pub fn resume(dir: &Path, step: usize) -> Result<Self> {
        let path = dir.join(FILE);
        let old = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        let kept: String = old
            .lines()
            .filter(|line| {
                serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(Value::as_u64))
                    .is_some_and(|s| s <= step as u64)
            })
            .flat_map(|line| [line, "\n"])
            .collect();
        crate::atomic::write_bytes(&path, kept.as_bytes())?;
        Self::open(path)
    }

    fn open(path: PathBuf) -> Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("cannot open", &path, e))?;
        Ok(RunLog { path, file })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        let mut line = record.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io("cannot write", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_drops_steps_past_the_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RunLog::create(dir.path())?;
        for step in 1..=4 {
            log.write(&json!({"step": step, "loss": 1.0}))?;
        }
        log.write(&json!({"step": 2, "eval_em": 0.5}))?;
        drop(log);
        let path = dir.path().join(FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"step\": 5, \"lo");
        std::fs::write(&path, text).unwrap();
        let mut log = RunLog::resume(dir.path(), 2)?;
        log.write(&json!({"step": 3}))?;
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 2, 3]);
        Ok(())
    }
}
