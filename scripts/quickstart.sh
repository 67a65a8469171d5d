#!/usr/bin/env bash
# The main job on a fresh machine: build sgl, fetch the test model, start a
# local grid (a coordinator in development mode and one node on loopback), and
# ask it a real chat question, sealed end to end, streamed and verified.
#
# Environment:
#   CARGO_TARGET_DIR      build directory (default ~/.cache/sgl-target)
#   SGL_MODEL_DIR         model cache (default ~/.cache/sgl/models)
#   SGL_QUICKSTART_DIR    scratch directory for the node identity and logs
#   SGL_PORT              coordinator port (default 18080)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sgl-target}"
echo "== build (release)"
cargo build --release --features full --bin sgl
SGL="$CARGO_TARGET_DIR/release/sgl"

echo "== model"
"$SGL" model fetch smollm2-135m

WORK="${SGL_QUICKSTART_DIR:-$(mktemp -d)}"
PORT="${SGL_PORT:-18080}"
BASE="http://127.0.0.1:$PORT"
export SGL_NODE_DIR="$WORK/node"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== coordinator on $BASE (development mode; logs in $WORK/coordinator.log)"
"$SGL" coordinator serve --dev --listen "127.0.0.1:$PORT" >"$WORK/coordinator.log" 2>&1 &
pids+=($!)

echo "== node identity in $SGL_NODE_DIR"
if [ ! -f "$SGL_NODE_DIR/keypair.json" ]; then
  "$SGL" node init --wallet 0x0000000000000000000000000000000000000001 --coordinator "$BASE"
fi

echo "== node (logs in $WORK/node.log)"
RUST_LOG=info "$SGL" node start --coordinator "$BASE" --model smollm2-135m >"$WORK/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  if "$SGL" node status --coordinator "$BASE" --json 2>/dev/null | grep -q '"active"'; then break; fi
  sleep 1
done

echo "== a sealed, streamed chat request"
"$SGL" chat --coordinator "$BASE" --stream --max-tokens 48 --temperature 0 \
  "What is the capital of France? Answer in one sentence."
