//! The `sac` binary: parse flags, run, map errors to exit codes.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

/// glibc's malloc maps every buffer above its threshold afresh and unmaps it
/// on free, so each tensor op page-faulted its output in: `sac train` spent as
/// long in the kernel as in user code. mimalloc keeps freed pages for reuse.
/// Built without transparent huge pages ("no_thp"): in a VM that hands freed
/// guest memory back to its host, every 2 MiB page mimalloc asked for was
/// faulted in again on the host, and a `sac train` step on SmolLM2 spent two
/// thirds of its time zeroing pages (25 s against 7 s for three steps).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pin_thread_count();
    park_idle_candle_workers();
    keep_freed_pages();
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`sac ... | head`) is the reader's choice, not a failure.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sac: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// mimalloc hands the pages of freed memory back to the kernel after 10 ms;
/// the next tensor of that size faults them in and the kernel zeroes them
/// again. A forward pass frees and allocates the same sizes layer after
/// layer, so keep them: `compress --compressor full` of 3,812 tokens went
/// from 445-457 to 605-623 tokens/s, peak RSS 3-5 % higher.
fn keep_freed_pages() {
    // `mi_option_purge_delay` in mimalloc.h's `mi_option_t` (v2 and v3),
    // which libmimalloc-sys does not name; -1 is "never purge".
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set is not thread-safe; this runs first thing in
    // `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// candle's CPU matmul asks for the thread count on every call, and unless
/// `RAYON_NUM_THREADS` is set that means reading `/proc/cpuinfo` each time (a
/// few hundred reads per generated token on a small model). Ask once, and pin
/// the answer in the variable candle reads.
fn pin_thread_count() {
    default_env("RAYON_NUM_THREADS", || {
        candle_core::utils::get_num_threads().to_string()
    });
}

/// candle's CPU ops run on a pool of its own beside rayon's (which runs the
/// matrix products and our attention), and its idle workers spin 25,000
/// times before they sleep, taking the cores rayon's threads are waiting
/// for. Let them sleep at once, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is
/// set. On two cores (`compress --compressor full`, SmolLM2, ten alternated
/// runs each): 856 -> 943 tokens/s at 510 tokens, 718 -> 813 at 2,048
/// (five runs), 631 -> 645 at 4,096; decoding and training unchanged.
fn park_idle_candle_workers() {
    default_env("CANDLE_BARRIER_POOL_SPIN_LIMIT", || "0".into());
}

/// Sets the environment variable `name` to `value()` unless the user set it.
/// Only for the start of `main`, before any other thread exists.
fn default_env(name: &str, value: impl FnOnce() -> String) {
    if std::env::var_os(name).is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists,
        // so nothing can read the environment concurrently.
        unsafe { std::env::set_var(name, value()) };
    }
}
