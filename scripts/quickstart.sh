#!/usr/bin/env bash
# The main job on a fresh machine: build sgl, create a node identity in a
# scratch directory, and run the end-to-end crypto self-test with it.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sgl-target}"
cargo build --release --bin sgl
SGL="$CARGO_TARGET_DIR/release/sgl"

WORK="${SGL_QUICKSTART_DIR:-$(mktemp -d)}"
export SGL_NODE_DIR="$WORK/node"
echo "== node identity in $SGL_NODE_DIR"
if [ -f "$SGL_NODE_DIR/keypair.json" ]; then "$SGL" node keys; else "$SGL" node init; fi

echo "== sealed round trip"
"$SGL" proto selftest
