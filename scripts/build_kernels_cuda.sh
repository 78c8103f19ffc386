#!/usr/bin/env bash
# Build runtime/onnx_snn_runtime/native/libonnx_snn_kernels_cuda.so: the CPU kernels of
# runtime/kernels/onnx_snn_kernels.cc plus the CUDA kernels of runtime/kernels/onnx_snn_kernels_cuda.cu,
# one onnx_snn domain with kernels for CPUExecutionProvider and CUDAExecutionProvider (see the
# header of the .cu). Safe to re-run.
#
# The onnxruntime headers are those scripts/build_kernels.sh finds or fetches (its --headers:
# ORT_INCLUDE_DIR, else .cache/ort-headers).
#
# The .cu is compiled twice: g++ -x c++ -DONNX_SNN_CUDA_HOST (host part, includes the .cc) and
# nvcc (device part), then linked by g++. Targets: sm_90 SASS + compute_90 PTX (override with
# CUDA_GENCODE). -fmad=false and no fast-math: results bit-identical to numpy.
#
# CUDA runtime: linked STATICALLY by default (libcudart_static.a), so the library needs no
# libcudart.so.13 at load time, only the driver (libcuda.so.1) when a CUDA kernel runs, and it
# loads on machines without CUDA (CPU sessions). ONNX_SNN_CUDART=shared links -lcudart instead
# (libcudart.so.13, found through the RUNPATH $CUDA_HOME/lib64 or LD_LIBRARY_PATH, or already
# loaded by onnxruntime's CUDA provider).
#
# nvcc: $NVCC, else nvcc on PATH, else $CUDA_HOME/bin/nvcc (CUDA_HOME default /usr/local/cuda).
#
# On failure prints one line "build_kernels_cuda.sh: CUDA kernels not built: <reason>" to stderr
# and exits 1 (a library built before is left as it was). On success prints the library's path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

fail() {
  echo "build_kernels_cuda.sh: CUDA kernels not built: $*" >&2
  exit 1
}

src=runtime/kernels/onnx_snn_kernels_cuda.cu
cpu_src=runtime/kernels/onnx_snn_kernels.cc
outdir=runtime/onnx_snn_runtime/native
out=$outdir/libonnx_snn_kernels_cuda.so
[ -f "$src" ] || fail "source $src is missing"
[ -f "$cpu_src" ] || fail "source $cpu_src is missing"
command -v g++ >/dev/null 2>&1 || fail "g++ not found"

nvcc=${NVCC:-}
if [ -z "$nvcc" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc=$(command -v nvcc)
  elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
  else
    fail "nvcc not found (set NVCC or CUDA_HOME)"
  fi
fi
[ -x "$nvcc" ] || command -v "$nvcc" >/dev/null 2>&1 || fail "nvcc $nvcc is not executable"

# The CUDA toolkit root: CUDA_HOME, else from nvcc's location (following symlinks).
cuda_home=${CUDA_HOME:-}
if [ -z "$cuda_home" ]; then
  cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v "$nvcc")")")")
fi
cudalib=
# nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc):
# try its own root, then /usr/local/cuda.
for h in "$cuda_home" /usr/local/cuda; do
  for d in "$h/lib64" "$h/targets/x86_64-linux/lib" "$h/lib"; do
    if [ -f "$d/libcudart_static.a" ] || [ -f "$d/libcudart.so" ]; then cudalib=$(readlink -f "$d"); break 2; fi
  done
done
[ -n "$cudalib" ] || fail "no libcudart under $cuda_home or /usr/local/cuda (set CUDA_HOME)"

incdir=$(bash scripts/build_kernels.sh --headers) || fail "onnxruntime headers unavailable (see the line above)"

gencode=${CUDA_GENCODE:-"-gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90"}
mkdir -p "$outdir"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/onnx_snn_cuda.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log=$outdir/build_cuda.log
: >"$log"

run() {
  echo "$*" >>"$log"
  "$@" >>"$log" 2>&1 || {
    reason=$(grep -m1 -E 'error|fatal|undefined' "$log" || true)
    fail "$1 failed: ${reason:-see $root/$log} (full log: $root/$log)"
  }
}

# shellcheck disable=SC2086
run "$nvcc" -O3 -std=c++17 -fmad=false -prec-div=true -prec-sqrt=true -ftz=false $gencode \
  -Xcompiler -fPIC -Xcompiler -fvisibility=hidden -c -o "$tmp/device.o" "$src"
run g++ -x c++ -O3 -fPIC -std=c++17 -fno-math-errno -ffp-contract=off -fvisibility=hidden -Wall -Wextra \
  -DONNX_SNN_CUDA_HOST -I "$root/runtime/kernels" -I "$incdir" -c -o "$tmp/host.o" "$src"
if [ "${ONNX_SNN_CUDART:-static}" = shared ]; then
  run g++ -shared -o "$out.tmp" "$tmp/host.o" "$tmp/device.o" -L"$cudalib" -lcudart -Wl,-rpath,"$cudalib"
else
  [ -f "$cudalib/libcudart_static.a" ] || fail "no libcudart_static.a in $cudalib (try ONNX_SNN_CUDART=shared)"
  run g++ -shared -o "$out.tmp" "$tmp/host.o" "$tmp/device.o" "$cudalib/libcudart_static.a" -ldl -lpthread -lrt \
    -Wl,--exclude-libs,ALL
fi
mv -f "$out.tmp" "$out"
rm -f "$log"
echo "$root/$out"
