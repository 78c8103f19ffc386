#!/usr/bin/env bash
# Build the native onnxruntime custom-op library (every op of the onnx_snn domain: IFNeuron,
# IFNeuronSeq, IFNeuronSeqConst, IFNeuronSeqAvgPool, IFNeuronSeqConstAvgPool; see the header of
# runtime/kernels/onnx_snn_kernels.cc) into runtime/onnx_snn_runtime/native/libonnx_snn_kernels.so.
# Safe to re-run.
#
# The onnxruntime pip wheel ships no C/C++ headers. Unless ORT_INCLUDE_DIR names a directory that
# holds onnxruntime_cxx_api.h, they are taken from Debian 13 (trixie)'s libonnxruntime-dev package,
# downloaded (not installed, no root) with apt using a private sources list and state directory
# under .cache/ort-headers/ and unpacked there with dpkg-deb. The library is not linked against
# libonnxruntime: every onnxruntime symbol comes through the OrtApi pointer at registration.
#
# A later run reuses the unpacked headers (delete .cache/ort-headers/ to fetch them again).
# apt's output goes to .cache/ort-headers/build.log.
#
# On failure prints one line "build_kernels.sh: native kernels not built: <reason>" to stderr and
# exits 1; a library built before is then left as it was. On success prints the library's path.
# With --headers it only finds (or fetches) the headers and prints their directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

fail() {
  echo "build_kernels.sh: native kernels not built: $*" >&2
  exit 1
}

src=runtime/kernels/onnx_snn_kernels.cc
outdir=runtime/onnx_snn_runtime/native
out=$outdir/libonnx_snn_kernels.so
cache=$root/.cache/ort-headers
log=$cache/build.log

[ -f "$src" ] || fail "source $src is missing"
command -v g++ >/dev/null 2>&1 || fail "g++ not found"

# Directory holding onnxruntime_cxx_api.h (or the dir above an onnxruntime/ subdirectory with it).
find_header_dir() {
  local d=$1
  if [ -f "$d/onnxruntime_cxx_api.h" ]; then
    echo "$d"
  elif [ -f "$d/onnxruntime/onnxruntime_cxx_api.h" ]; then
    echo "$d/onnxruntime"
  elif [ -f "$d/onnxruntime/core/session/onnxruntime_cxx_api.h" ]; then
    echo "$d/onnxruntime/core/session"
  else
    return 1
  fi
}

incdir=
if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
  [ -d "$ORT_INCLUDE_DIR" ] || fail "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR is not a directory"
  incdir=$(find_header_dir "$ORT_INCLUDE_DIR") \
    || fail "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_cxx_api.h"
else
  mkdir -p "$cache"
  : >"$log"
  if [ -d "$cache/root/usr/include" ]; then
    incdir=$(find_header_dir "$cache/root/usr/include") || incdir=
  fi
  if [ -z "$incdir" ]; then
    command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (set ORT_INCLUDE_DIR to onnxruntime's C/C++ headers)"
    command -v dpkg-deb >/dev/null 2>&1 || fail "dpkg-deb not found (set ORT_INCLUDE_DIR to onnxruntime's C/C++ headers)"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || fail "$keyring not found (set ORT_INCLUDE_DIR to onnxruntime's C/C++ headers)"
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian trixie main" >"$cache/sources.list"
    mkdir -p "$cache/lists/partial" "$cache/cache/archives/partial" "$cache/debs"
    apt_opts=(
      -o "Dir::Etc::SourceList=$cache/sources.list"
      -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$cache/lists"
      -o "Dir::Cache=$cache/cache"
      -o "Debug::NoLocking=1"
      -o "APT::Sandbox::User=$(id -un)"
    )
    # apt-get update exits 0 when it cannot fetch an index (it only warns): check for the index.
    if ! apt-get "${apt_opts[@]}" -q update >>"$log" 2>&1 \
        || ! ls "$cache"/lists/*_dists_trixie_main_binary-*_Packages* >/dev/null 2>&1; then
      fail "apt-get update for Debian trixie failed (no network?); see $log"
    fi
    rm -f "$cache"/debs/libonnxruntime-dev_*.deb
    (cd "$cache/debs" && apt-get "${apt_opts[@]}" -q download libonnxruntime-dev) >>"$log" 2>&1 \
      || fail "apt-get download libonnxruntime-dev failed; see $log"
    deb=$(ls "$cache"/debs/libonnxruntime-dev_*.deb 2>/dev/null | head -n 1 || true)
    [ -n "$deb" ] || fail "apt-get download produced no libonnxruntime-dev .deb; see $log"
    rm -rf "$cache/root.tmp"
    dpkg-deb -x "$deb" "$cache/root.tmp" >>"$log" 2>&1 || fail "dpkg-deb -x $deb failed; see $log"
    rm -rf "$cache/root"
    mv "$cache/root.tmp" "$cache/root"
    incdir=$(find_header_dir "$cache/root/usr/include") \
      || fail "no onnxruntime_cxx_api.h in $deb"
  fi
fi

# --headers: only print the header directory (scripts/build_kernels_cuda.sh uses it)
if [ "${1:-}" = --headers ]; then
  echo "$incdir"
  exit 0
fi

mkdir -p "$outdir"
# No -march (the library must run on any x86_64) and nothing that relaxes IEEE float semantics:
# results must be bit-identical to numpy float32/float64 arithmetic. -fno-math-errno is harmless
# (no libm calls). -ffp-contract=off keeps g++ from fusing v1 - s*th into an FMA on targets that
# have one.
cmd=(g++ -O3 -shared -fPIC -std=c++17 -fno-math-errno -ffp-contract=off -fvisibility=hidden
     -Wall -Wextra -I "$incdir" -o "$out.tmp" "$src")
echo "${cmd[*]}" >>"$log" 2>/dev/null || true
gcclog=$outdir/build.log
"${cmd[@]}" >"$gcclog" 2>&1 || {
  reason=$(grep -m1 -E 'error|fatal' "$gcclog" || true)
  rm -f "$out.tmp"
  fail "g++ failed: ${reason:-see $root/$gcclog} (full log: $root/$gcclog)"
}
rm -f "$gcclog"
mv -f "$out.tmp" "$out"
echo "$root/$out"
