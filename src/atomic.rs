//! Files written atomically: under a temporary name in the target's directory,
//! fsynced, then renamed over the target. An interrupted write never leaves a
//! partial file under the final name, and never leaves its temporary file
//! behind for long:
//! - on SIGINT, SIGTERM or SIGHUP, [`remove_temp_files_on_signal`]'s handler
//!   deletes the temporary files being written, then exits;
//! - a process killed outright (SIGKILL) leaves its file, named
//!   `.NAME.sac-PID-XXXXXX.tmp`; the next write to `NAME` deletes such files
//!   once they are a minute old and (where that can be told) their process is
//!   gone. Nothing else is ever deleted.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};

/// A temporary file untouched this long, whose process is gone, is stale.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Random characters in a temporary file's name.
const RANDOM_CHARS: usize = 6;

/// The temporary files being written now, for the signal handler.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes SIGINT, SIGTERM and SIGHUP delete the temporary files being written
/// and exit with status 130. For commands that write files and have no other
/// use for those signals.
pub fn remove_temp_files_on_signal() -> Result<()> {
    ctrlc::set_handler(|| {
        // Held through `exit`, so the list cannot change under the sweep.
        let pending = pending();
        for path in pending.iter() {
            let _ = std::fs::remove_file(path);
        }
        // Not `std::process::exit`: that runs the C libraries' exit handlers
        // (the CUDA runtime's, cuBLAS's) while the main thread is still inside
        // them. A `sac train` on a GPU stopped by `timeout` aborted there with
        // glibc's "malloc_consolidate(): unaligned fastbin chunk detected".
        // SAFETY: `_exit` only ends the process.
        unsafe { libc::_exit(130) }
    })
    .map_err(Error::Signal)
}

/// Listed in [`PENDING`] while alive.
#[derive(Debug)]
struct Pending(PathBuf);

impl Pending {
    fn new(path: &Path) -> Self {
        pending().push(path.to_path_buf());
        Pending(path.to_path_buf())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        pending().retain(|p| *p != self.0);
    }
}

/// A file being written; [`commit`](Self::commit) makes it appear under its
/// target name. Dropping it uncommitted deletes the temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    temp: tempfile::NamedTempFile,
    target: PathBuf,
    _pending: Pending,
}

impl AtomicFile {
    /// Creates the temporary file next to `target`, first deleting stale ones
    /// of ours for the same target.
    pub fn create(target: &Path) -> io::Result<Self> {
        let dir = directory_of(target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let prefix = temp_prefix(&name);
        remove_stale(dir, &prefix);
        let mut builder = tempfile::Builder::new();
        let prefix = format!("{prefix}{}-", std::process::id());
        builder
            .prefix(&prefix)
            .suffix(".tmp")
            .rand_bytes(RANDOM_CHARS);
        // NamedTempFile defaults to 0600; the finished file should get the
        // usual umask-filtered mode like any other file the user creates.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let temp = builder.tempfile_in(dir)?;
        let pending = Pending::new(temp.path());
        Ok(Self {
            temp,
            target: target.to_path_buf(),
            _pending: pending,
        })
    }

    /// Flushes, fsyncs and renames the file over its target.
    pub fn commit(mut self) -> io::Result<()> {
        self.temp.flush()?;
        self.temp.as_file().sync_all()?;
        self.temp.persist(&self.target).map_err(|e| e.error)?;
        // The rename itself is durable only once the directory is synced.
        #[cfg(unix)]
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The directory a file at `path` goes into (`.` for a bare name).
pub fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// `.NAME.sac-`: what our temporary files for target `NAME` start with.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.sac-")
}

/// Deletes `PREFIX<pid>-<random>.tmp` files in `dir` that are stale.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((pid, random)) = rest.split_once('-') else {
            continue;
        };
        let ours = random.len() == RANDOM_CHARS
            && random.bytes().all(|b| b.is_ascii_alphanumeric())
            && entry.file_type().is_ok_and(|t| t.is_file());
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        // Where a live writer cannot be told from a dead one, only an hour
        // without a write makes a file stale.
        let stale_after = match cfg!(target_os = "linux") {
            true => STALE_AFTER,
            false => 60 * STALE_AFTER,
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= stale_after);
        if ours && old && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` runs; where that cannot be told, it does not.
fn process_alive(pid: u32) -> bool {
    pid == std::process::id()
        || (cfg!(target_os = "linux") && Path::new("/proc").join(pid.to_string()).exists())
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let write = || -> io::Result<()> {
        let mut file = AtomicFile::create(path)?;
        file.write_all(bytes)?;
        file.commit()
    };
    write().map_err(|e| Error::io("cannot write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"partial").unwrap();
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_bytes(&target, b"whole").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_files_are_pending_until_committed_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let listed = |f: &AtomicFile| pending().contains(&f.temp.path().to_path_buf());
        let f = AtomicFile::create(&dir.path().join("a")).unwrap();
        assert!(listed(&f));
        let path = f.temp.path().to_path_buf();
        f.commit().unwrap();
        assert!(!pending().contains(&path));
        let f = AtomicFile::create(&dir.path().join("b")).unwrap();
        let path = f.temp.path().to_path_buf();
        drop(f);
        assert!(!pending().contains(&path) && !path.exists());
    }

    #[test]
    fn stale_temp_files_of_ours_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - 2 * STALE_AFTER;
        let make = |name: &str, aged: bool| {
            let path = dir.path().join(name);
            let file = std::fs::File::create(&path).unwrap();
            if aged {
                file.set_modified(old).unwrap();
            }
            path
        };
        // No process has this pid (above Linux's pid_max).
        let dead = 4_000_000_000u32;
        let stale = make(&format!(".out.sack.sac-{dead}-aB3xY9.tmp"), true);
        let young = make(&format!(".out.sack.sac-{dead}-Cd4eF5.tmp"), false);
        let alive = make(
            &format!(".out.sack.sac-{}-Gh6iJ7.tmp", std::process::id()),
            true,
        );
        let other_target = make(&format!(".other.sack.sac-{dead}-Kl8mN9.tmp"), true);
        let not_ours = make(".out.sack-XyZ123.tmp", true);
        let mut f = AtomicFile::create(&dir.path().join("out.sack")).unwrap();
        f.write_all(b"new").unwrap();
        assert!(!stale.exists());
        for kept in [&young, &alive, &other_target, &not_ours] {
            assert!(kept.exists(), "{}", kept.display());
        }
        f.commit().unwrap();
    }
}
