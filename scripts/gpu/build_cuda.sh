#!/usr/bin/env bash
# A `--features cuda` build of sac on a machine without a CUDA toolkit: nvcc,
# the CUDA runtime, cuBLAS, cuRAND and NVRTC from NVIDIA's PyPI wheels (CUDA
# 13.0), and a link-time stand-in for the driver library, whose real
# libcuda.so.1 the GPU machine's driver provides at run time.
#
#   scripts/gpu/build_cuda.sh [KIT_DIR] [TARGET_DIR]   (default target/cuda-kit, target/cuda)
#
# Prints the binary's path. CUDA_COMPUTE_CAP (default 90: H100, H200) picks
# the GPU the kernels are compiled for. At run time the GPU machine needs the
# CUDA 13 libraries (a toolkit's, or PyTorch's cu13 wheels') on
# LD_LIBRARY_PATH. A clean build takes about 11 minutes on 2 cores.
set -euo pipefail
ROOT=$(realpath "$(dirname "$0")/../..")
# Paths given are the caller's; the defaults are in the repository.
KIT=$(realpath -m "${1:-$ROOT/target/cuda-kit}")
TARGET=$(realpath -m "${2:-$ROOT/target/cuda}")
cd "$ROOT"
CUDA=$KIT/site/nvidia/cu13
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35)

if [ ! -x "$CUDA/bin/nvcc" ]; then
  mkdir -p "$KIT/wheels" "$KIT/site"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" "${WHEELS[@]}" >&2
  for w in "$KIT"/wheels/*.whl; do unzip -q -o "$w" -d "$KIT/site"; done
fi

# The linker asks for unversioned names; the wheels ship versioned ones.
for lib in cudart nvrtc cublas cublasLt; do ln -sf "lib$lib.so.13" "$CUDA/lib/lib$lib.so"; done
ln -sf libcurand.so.10 "$CUDA/lib/libcurand.so"

# The driver API that cudarc links against, every function a no-op: only
# its names matter at link time.
if [ ! -f "$CUDA/lib/stubs/libcuda.so" ]; then
  cargo fetch --locked -q
  version=$(grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version"/src/driver/sys/mod.rs | head -1)
  mkdir -p "$CUDA/lib/stubs"
  grep -o 'fn cu[A-Za-z0-9_]*' "$sys" | sed 's/^fn //' | sort -u |
    sed 's/.*/void &(void) {}/' > "$KIT/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$KIT/cuda_stub.c"
fi

export CUDA_ROOT=$CUDA CUDA_HOME=$CUDA CUDA_PATH=$CUDA NVCC=$CUDA/bin/nvcc PATH=$CUDA/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$CUDA/lib:$CUDA/lib/stubs CARGO_TARGET_DIR=$TARGET
cargo build --release --locked --features cuda --bin sac >&2
echo "$TARGET/release/sac"
