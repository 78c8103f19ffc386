#!/usr/bin/env bash
# The GPU checks of the runtime, as one script for a lent GPU machine (onnxruntime-gpu installed;
# torch with CUDA and SpikingJelly for bench/cuda.py): the CUDA test module, the runtime
# benchmark, then the GPU comparison with SpikingJelly and the dense limit. Output also goes to
# $OUT when set. The machine has no network, so the kernel libraries are built here first and
# carried (device tool: carry runtime/onnx_snn_runtime/native); with nvcc and the headers
# carried too (.cache/ort-headers) it rebuilds the CUDA library there.
set -uo pipefail
cd "$(dirname "$0")/.."
# onnxruntime-gpu finds cuBLAS/cuDNN from NVIDIA's pip packages when they are on the library path
NV=$(python3 -c "import glob, os, nvidia; print(':'.join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'lib'))))" 2>/dev/null)
export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/device_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  ls -l runtime/onnx_snn_runtime/native/ 2>&1
  if [ -d .cache/ort-headers ] && command -v nvcc >/dev/null; then bash scripts/build_kernels_cuda.sh; fi
  ONNX_SNN_REQUIRE_CUDA_KERNELS=1 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py
  python3 bench/runtime.py --T 50 --repeats 3
  python3 bench/cuda.py --T 50 --repeats 3
} 2>&1 | tee "$LOG"
