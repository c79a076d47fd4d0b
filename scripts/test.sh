#!/usr/bin/env bash
# Everything CI checks: set-up, formatting, lints as errors, and all tests (which use the real TensorRT-RTX
# builder, ONNX Runtime and the Python reference tools from the set-up cache).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# flake.nix: it must parse, and its outputs (shells, packages, apps, checks for both Linux systems) must evaluate
# with stand-in inputs (scripts/check-flake.nix), since nixpkgs cannot be fetched here. Uses Debian's nix-bin.
if ! command -v nix-instantiate >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null 2>&1 \
      || { $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null; }
  else
    echo "[test] notice: no nix-instantiate and no apt-get: flake.nix checks skipped" >&2
  fi
fi
if command -v nix-instantiate >/dev/null 2>&1; then
  nix-instantiate --parse flake.nix >/dev/null
  nix-instantiate --store dummy:// --eval --strict scripts/check-flake.nix >/dev/null
fi
cargo test
