#!/usr/bin/env bash
# Everything CI checks: set-up, formatting, lints as errors, and all tests (which use the real TensorRT-RTX
# builder, ONNX Runtime and the Python reference tools from the set-up cache).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test
