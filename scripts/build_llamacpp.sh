#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-quantize from the source
# that PyPI's llama-cpp-python sdist vendors (Debian bookworm has no llama.cpp
# package), for the side-by-side benchmarks of docs/benchmarks.md. The sdist
# comes from PyPI's simple index, checked against its sha256; cmake from PyPI
# if the machine has none. Everything is cached under target/llamacpp, so a
# second run only prints where the binaries are.
#   scripts/build_llamacpp.sh    # prints the build's bin directory
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
URL=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$VERSION.tar.gz
DIR=target/llamacpp
SRC=$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$DIR/build-$VERSION
TOOLS=(llama-bench llama-quantize)

if [ -x "$BUILD/bin/llama-bench" ] && [ -x "$BUILD/bin/llama-quantize" ]; then
    echo "$BUILD/bin"
    exit 0
fi
mkdir -p "$DIR"
archive=$DIR/llama_cpp_python-$VERSION.tar.gz
if ! echo "$SHA256  $archive" | sha256sum --check --status 2>/dev/null; then
    curl --fail --silent --show-error --location -o "$archive.part" "$URL"
    echo "$SHA256  $archive.part" | sha256sum --check --status || {
        echo "build_llamacpp.sh: $URL does not have the expected sha256" >&2
        exit 1
    }
    mv "$archive.part" "$archive"
fi
[ -d "$SRC" ] || tar -xzf "$archive" -C "$DIR"

cmake=$(command -v cmake || true)
if [ -z "$cmake" ]; then
    python3 -m venv "$DIR/venv"
    "$DIR/venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja
    cmake=$DIR/venv/bin/cmake
fi
# GGML_NATIVE: the instructions of this CPU (AVX-512, BF16 where it has them),
# as a user building llama.cpp here would get.
"$cmake" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
"$cmake" --build "$BUILD" --parallel "$(nproc)" --target "${TOOLS[@]}" >&2
echo "$BUILD/bin"
