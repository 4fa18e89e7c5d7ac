//! Cost of a model fingerprint on a file the size of Llama-3.2-1B's weights
//! (2.47 GB in bf16): cold (hashing every byte) and warm (the digest cache).
//!
//! `cargo bench --bench fingerprint -- [--bytes N]`

use std::io::Write;
use std::time::Instant;

use clap::Parser;
use sac::fingerprint::{DigestCache, fingerprint};
use sac::model::{HfFiles, Layout, ModelFiles};

#[derive(Parser)]
struct Args {
    /// Size of the stand-in weight file.
    #[arg(long, default_value_t = 2_471_645_608)]
    bytes: u64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name);
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::write(path(name), b"{}")?;
    }
    let mut weights = std::fs::File::create(path("model.safetensors"))?;
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut left = args.bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        weights.write_all(&block[..n])?;
        left -= n as u64;
    }
    weights.sync_all()?;
    let files = ModelFiles {
        id: "bench".into(),
        revision: None,
        layout: Layout::Hf(HfFiles {
            config: path("config.json"),
            tokenizer: path("tokenizer.json"),
            tokenizer_config: path("tokenizer_config.json"),
            generation_config: None,
            weights: vec![path("model.safetensors")],
        }),
    };
    let cache_path = path("digests.json");
    let start = Instant::now();
    fingerprint(&files, &mut DigestCache::open(cache_path.clone()))?;
    let cold = start.elapsed().as_secs_f64();
    let start = Instant::now();
    fingerprint(&files, &mut DigestCache::open(cache_path))?;
    let warm = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bytes": args.bytes,
            "cold_s": cold,
            "cold_gb_per_s": args.bytes as f64 / cold / 1e9,
            "warm_ms": warm * 1e3,
        })
    );
    Ok(())
}
