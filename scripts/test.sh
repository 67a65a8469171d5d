#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs what the tests need
# (Python clients, the test model), then format, lint and test.
#
# Environment:
#   CARGO_TARGET_DIR  build directory, kept between runs (default ~/.cache/sgl-target)
#   SGL_MODEL_DIR     model cache (default ~/.cache/sgl/models)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sgl-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
FEATURES=full

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "python packages for the client-compatibility tests"
python3 -m pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --all-targets --features "$FEATURES" -- -D warnings

step "build"
cargo build --features "$FEATURES" --bins

step "tests"
cargo test --features "$FEATURES" --no-fail-fast
