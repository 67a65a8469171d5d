#!/usr/bin/env bash
# A CUDA 13.4 toolkit from PyPI wheels, enough to build `sgl --features cuda`
# on a machine without a GPU or a system CUDA install (CI), or on an operator's
# machine that lacks the toolkit. Needs no root.
#
# Usage:  source scripts/cuda-toolchain.sh      # installs once, then exports
#                                               # CUDA_HOME, NVCC, PATH, ...
# Environment:
#   SGL_CUDA_PREFIX    where the toolkit goes (default ~/.cache/sgl-cuda-13.4)
#   CUDA_COMPUTE_CAP   GPU architecture to build kernels for (default 90: H100/H200;
#                      80 for A100, 89 for L4/L40S, 120 for Blackwell)
#
# On a GPU machine the real driver's libcuda.so.1 is used at run time; the stub
# made here only satisfies the linker.
set -euo pipefail

SGL_CUDA_PREFIX="${SGL_CUDA_PREFIX:-$HOME/.cache/sgl-cuda-13.4}"
CUDA_VERSION_PIN=13.4.92
site="$SGL_CUDA_PREFIX/site"
cuda="$site/nvidia/cu13"

if [ ! -x "$cuda/bin/nvcc" ]; then
  echo "installing the CUDA $CUDA_VERSION_PIN toolkit wheels into $SGL_CUDA_PREFIX (about 0.85 GB)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$site" \
    "nvidia-cuda-nvcc==$CUDA_VERSION_PIN" "nvidia-nvvm==$CUDA_VERSION_PIN" "nvidia-cuda-crt==$CUDA_VERSION_PIN" \
    "nvidia-cuda-runtime==$CUDA_VERSION_PIN" "nvidia-cuda-nvrtc==$CUDA_VERSION_PIN" \
    "nvidia-cublas==13.4.*" "nvidia-curand" "nvidia-cuda-cccl" >&2
fi

# The wheels ship versioned libraries only (libcudart.so.13, ...): add the
# unversioned names the linker looks for.
for lib in "$cuda"/lib/lib*.so.*; do
  [ -e "$lib" ] || continue
  base="${lib%%.so.*}.so"
  [ -e "$base" ] || ln -sf "$(basename "$lib")" "$base"
done

# No wheel ships libcuda (it comes with the driver). Build a link-only stub
# exporting every driver API symbol that cuda.h declares.
stub_dir="$SGL_CUDA_PREFIX/stubs"
if [ ! -e "$stub_dir/libcuda.so" ]; then
  mkdir -p "$stub_dir"
  gcc -E -P -x c -I "$cuda/include" "$cuda/include/cuda.h" 2>/dev/null \
    | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | tr -d ' (' | sort -u \
    | awk '{ printf "void %s(void) {}\n", $1 }' > "$stub_dir/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so.1" "$stub_dir/libcuda_stub.c"
  ln -sf libcuda.so.1 "$stub_dir/libcuda.so"
fi

export CUDA_HOME="$cuda"
export CUDA_PATH="$cuda"
export CUDA_ROOT="$cuda"
export NVCC="$cuda/bin/nvcc"
export PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export LIBRARY_PATH="$cuda/lib:$stub_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
