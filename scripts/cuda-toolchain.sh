# shellcheck shell=bash
# A CUDA 13.4 toolkit from PyPI wheels, enough to build `sgl --features cuda`
# on a machine without a GPU or a system CUDA install (CI), or on an operator's
# machine that lacks the toolkit. Needs no root.
#
# Usage:  source scripts/cuda-toolchain.sh      # installs once, then exports
#                                               # CUDA_HOME, NVCC, PATH, ...
# It is meant to be sourced: it leaves the caller's shell options alone and
# returns non-zero (without exiting an interactive shell) when the install fails.
#
# Environment:
#   SGL_CUDA_PREFIX    where the toolkit goes (default ~/.cache/sgl-cuda-13.4),
#                      outside any checkout; about 1.1 GB once installed
#   CUDA_COMPUTE_CAP   GPU architecture the kernels are built for. Default: the
#                      first GPU's as nvidia-smi reports it, else 90 (H100/H200);
#                      80 for A100, 89 for L4/L40S, 120 for Blackwell
#   CUDAFORGE_THREADS  parallel nvcc jobs for candle's kernels (default: all cores)
#
# Pins: CUDA 13.4 is the newest release cudarc 0.19 (under candle 0.11) knows;
# the pins below are the exact wheels the build was verified with.
#
# At run time the GPU build needs the driver's libcuda.so.1 and the CUDA 13
# runtime libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc):
# candle links them dynamically. They come from a system CUDA 13 install, or
# from these wheels via LD_LIBRARY_PATH (exported here). The libcuda stub made
# here only satisfies the linker.

_sgl_cuda_toolchain() {
  local prefix="${SGL_CUDA_PREFIX:-$HOME/.cache/sgl-cuda-13.4}"
  local site="$prefix/site"
  local cuda="$site/nvidia/cu13"
  local stub_dir="$prefix/stubs"
  local wheels=(
    "nvidia-cuda-nvcc==13.4.92" "nvidia-nvvm==13.4.92" "nvidia-cuda-crt==13.4.92"
    "nvidia-cuda-runtime==13.4.92" "nvidia-cuda-nvrtc==13.4.92"
    "nvidia-cublas==13.4.3.11" "nvidia-curand==10.4.5.25" "nvidia-cuda-cccl==13.3.5.0.6"
  )

  # Install (or reinstall when a pin changed) in a subshell, strict mode.
  # (Not `( … ) || …`: bash ignores `set -e` inside a tested subshell.)
  local status
  (
    set -euo pipefail
    missing=()
    for w in "${wheels[@]}"; do
      name="${w%%==*}"
      [ -d "$site/${name//-/_}-${w#*==}.dist-info" ] || missing+=("$w")
    done
    if [ ! -x "$cuda/bin/nvcc" ] || [ "${#missing[@]}" -gt 0 ]; then
      echo "installing the CUDA 13.4 toolkit wheels into $prefix (about 0.85 GB download)" >&2
      mkdir -p "$prefix"
      python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$site" "${wheels[@]}" >&2
    fi

    # The wheels ship versioned libraries only (libcudart.so.13, ...): add
    # the unversioned names the linker looks for.
    for lib in "$cuda"/lib/lib*.so.*; do
      [ -e "$lib" ] || continue
      base="${lib%%.so.*}.so"
      [ -e "$base" ] || ln -sf "$(basename "$lib")" "$base"
    done

    # No wheel ships libcuda (it comes with the driver). Build a link-only
    # stub exporting every driver API symbol that cuda.h declares.
    if [ ! -e "$stub_dir/libcuda.so" ]; then
      mkdir -p "$stub_dir"
      gcc -E -P -x c -I "$cuda/include" "$cuda/include/cuda.h" \
        | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | tr -d ' (' | sort -u \
        | awk '{ printf "void %s(void) {}\n", $1 }' > "$stub_dir/libcuda_stub.c"
      gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so.1" "$stub_dir/libcuda_stub.c"
      ln -sf libcuda.so.1 "$stub_dir/libcuda.so"
    fi
    "$cuda/bin/nvcc" --version | grep -q 'release 13\.4' \
      || { echo "nvcc in $cuda is not CUDA 13.4" >&2; exit 1; }
  )
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "cuda-toolchain: the CUDA toolkit could not be set up in $prefix" >&2
    return "$status"
  fi

  local cap="${CUDA_COMPUTE_CAP:-}"
  if [ -z "$cap" ] && command -v nvidia-smi >/dev/null 2>&1; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
  fi

  export CUDA_HOME="$cuda"
  export CUDA_PATH="$cuda"
  export CUDA_ROOT="$cuda"
  export NVCC="$cuda/bin/nvcc"
  export PATH="$cuda/bin:$PATH"
  export CUDA_COMPUTE_CAP="${cap:-90}"
  export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
  # Link time: the toolkit's libraries and the driver stub. Run time: the
  # toolkit's libraries only (the real libcuda.so.1 comes with the driver).
  export LIBRARY_PATH="$cuda/lib:$stub_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

_sgl_cuda_toolchain
_sgl_cuda_status=$?
unset -f _sgl_cuda_toolchain
# shellcheck disable=SC2317  # `return` when sourced, `exit` when run
return "$_sgl_cuda_status" 2>/dev/null || exit "$_sgl_cuda_status"
