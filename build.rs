//! With the `cuda` feature, compiles sac's own CUDA kernels (`src/model/cuda`)
//! to PTX with nvcc (`$NVCC`, else on the PATH), for the GPU generation
//! `$CUDA_COMPUTE_CAP` names (default 75, the oldest CUDA 13 supports); the
//! driver compiles the PTX for the GPU at hand, of that generation or a
//! newer one, when the kernels are first loaded. Without the feature it does
//! nothing.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["masked_softmax"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=PATH");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    for kernel in KERNELS {
        let source = format!("src/model/cuda/{kernel}.cu");
        println!("cargo::rerun-if-changed={source}");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&source)
            .arg("-o")
            .arg(out.join(format!("{kernel}.ptx")))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC): {e}"));
        assert!(status.success(), "{nvcc} failed on {source}");
    }
}
