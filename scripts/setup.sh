#!/usr/bin/env bash
# Create .venv and install onnx-snn with its torch, dev, serve and NIR extras (and Norse). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# PyTriton's tritonserver (the serve extra) runs its Python backend through a stub built against
# CPython 3.11 before 3.11.6; the standard library of 3.11.6 and later calls a lock method that
# stub lacks (pytriton issue #51). Debian 12's python3 (3.11.2) matches it: prefer it if present.
servable='import sys; v = sys.version_info; sys.exit(v[:2] == (3, 11) and v[2] >= 6)'
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
      && /usr/bin/python3 -c 'import sys; v = sys.version_info; sys.exit(not (v[:2] == (3, 11) and v[2] < 6))'; then
    PYTHON=/usr/bin/python3
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -c "$servable" || echo "setup.sh: note: .venv's Python is 3.11.6 or newer, on which" \
  "'onnx-snn serve' cannot start PyTriton's server; rm -rf .venv and re-run with a Python <= 3.11.5" \
  "(Debian 12: apt-get install python3-venv) to serve" >&2
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch 2.13.0 (a plain `torch` would pull a CUDA build of several GB).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[torch,dev,serve,nir,nir-test]"
# Norse, an importer the NIR tests run: its torchvision dependency does not import beside the CPU
# torch, and Norse's NIR import does not use it, so it is installed without dependencies.
.venv/bin/python -m pip install -q --no-deps "norse==1.1.0"
# The native neuron kernels (optional: without them the runtime uses the models' function bodies).
bash scripts/build_kernels.sh || echo "setup.sh: continuing without native kernels (onnx-snn info says what runs)" >&2
# Their CUDA build, where the CUDA compiler is (used by CUDA sessions that ask for native kernels).
if command -v nvcc >/dev/null && [ -f scripts/build_kernels_cuda.sh ]; then
  bash scripts/build_kernels_cuda.sh || echo "setup.sh: continuing without the CUDA kernels" >&2
fi
